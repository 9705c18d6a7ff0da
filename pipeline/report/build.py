"""The subject report: one self-contained HTML page per subject.

``python -m pipeline.report.build --subject-dir D --out D/report.html`` reads the outputs of the
earlier stages in ``D`` (``summary.json``, ``longitudinal.tsv``, ``volumes.tsv``, the per-session
NIfTI images and label maps named in ``summary.json`` with their registration transforms
``_xfm.tfm``, and optionally ``index.tsv``, ``problems.tsv``, ``profile_csa.tsv`` and
``circumference.tsv``) and writes one HTML file that needs no network: figures are PNG data
URIs, CSS is inline, there is no JavaScript.

Slice positions are chosen once in **baseline coordinates** (marrow-lesion centre, largest
swelling, a coronal plane through the femora) and every session is resampled onto the same
baseline slice through its rigid registration (``_xfm.tfm`` maps baseline points to session
points), so the same anatomy is compared across sessions.

QC flags (``summary.json`` ``qc_flags``, :mod:`pipeline.qc`) are listed in a box next to the
pattern headline, which then says that the pattern rests only on what passed QC. A value that
is ``n/a`` because of an exclude flag shows as "not available" with its codes (cell title and
footnote), never as 0; timelines break their lines there and mark the day, the profile leaves
out what is not available, and overlays of a flagged session say "excluded: <code>" in their
caption. A summary without ``qc_flags`` renders as before.

Measurement uncertainty and confirmation (issue 13), read tolerantly (older outputs render as
before): values in the tables show ``± half-width`` of their 95 % interval from the ``*_ci95``
columns (nothing extra where it is ``n/a``), and a change from baseline inside its MDC95 says
"within measurement error" (``change_beyond_mdc95 == no``). The timeline draws the intervals
as bands and error bars, the ±MDC95 band around the baseline in a change panel, and hollow
markers for changes within measurement error. ``summary.json`` ``confirmation`` is stated next
to the pattern (an unconfirmed progression in a box right under it) and ``session_states``
fill the "Sessions against day 0" table; the Methods paragraph on uncertainty takes its numbers
from the tables and thresholds.

Patient name, ID and birth date are never rendered unless ``--show-phi`` is given (the pipeline
does not carry them into its outputs; keys naming them are dropped from the tables).

Every string that comes from DICOM headers or files is rendered as text (Jinja2 autoescape).
Each figure is built in its own ``try`` block: a figure that fails is replaced by a note that says
which figure and why, and the rest of the report is still written.

Display convention: axial slices in radiological convention (patient's right on the viewer's
left, anterior up), derived from the image geometry (direction cosines), never from array order.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory
from skimage.measure import find_contours

from pipeline import __version__, labels, qc
from pipeline.extent import affine_of, as_transform
from pipeline.io.files import read_tsv, write_text_atomic
from pipeline.report import html

log = logging.getLogger(__name__)

TEMPLATE_NAME = "report.html"

#: Report wording of each response pattern: a measurement aid, never a diagnosis.
PATTERN_PHRASES: dict[str, str] = {
    "pseudo-progression": "Pattern consistent with pseudo-progression",
    "progression": "Pattern consistent with progression",
    "response": "Pattern consistent with response",
    "stable": "Pattern consistent with stable findings",
    "indeterminate": "Pattern indeterminate (too few sessions to compare)",
}

STRUCTURE_TITLES: dict[str, str] = {
    "limb": "limb (all)",
    "soft_tissue": "soft tissue",
    "bone": "bone (incl. lesion)",
    "marrow_lesion": "marrow lesion",
    "edema": "edema",
}

#: Colour-blind-safe line colours for the timeline (Okabe-Ito).
AFFECTED_COLOR = "#D55E00"
CONTRALATERAL_COLOR = "#0072B2"
EDEMA_COLOR = "#56B4E9"
EVENT_COLOR = "#555555"
#: The ±MDC95 band of the change panel (bluish green: not the grey of "not available").
MDC_COLOR = "#009E73"
MDC_ALPHA = 0.22
#: Opacity of the shaded 95 % interval bands of the timeline.
CI_ALPHA = 0.2
#: Words for a change inside its MDC95 (figures, tables, legend).
WITHIN_ERROR = "within measurement error"

#: Figure resolution: enough to read contours on paper, small enough for ~5 MB at 5 sessions.
FIGURE_DPI = 100
GEOMETRY_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------
# Geometry: radiological axial slices from any stored orientation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxialSlice:
    """One axial slice ready for display in radiological convention.

    Attributes
    ----------
    pixels : ndarray of shape (R, C)
        Row 0 is the most anterior row, column 0 the patient's rightmost column, so that
        ``imshow(pixels)`` (origin upper) shows patient right on the viewer's left, anterior up.
    spacing_rc_mm : tuple of float
        Pixel spacing along rows (anterior-posterior) and columns (right-left), in mm.
    z_mm : float
        Physical LPS z (superior positive) of the slice centre, in mm.
    slice_index : int
        Index of the slice in the LPS-reoriented volume (0 = most inferior).
    """

    pixels: np.ndarray
    spacing_rc_mm: tuple[float, float]
    z_mm: float
    slice_index: int


def orient_lps(image: sitk.Image) -> sitk.Image:
    """Permute and flip `image` so index axes run toward patient Left, Posterior, Superior.

    Only axis permutations and flips are applied (no interpolation); for an oblique acquisition
    the closest LPS axes are chosen from the direction cosines. Geometry is preserved: every
    voxel keeps its physical position.

    Parameters
    ----------
    image : SimpleITK.Image
        3-D image in any stored orientation.

    Returns
    -------
    SimpleITK.Image
        The same voxels with a (near-)identity direction matrix.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    return sitk.DICOMOrient(image, "LPS")


def slice_z_positions_mm(image_lps: sitk.Image) -> np.ndarray:
    """Physical z (mm, LPS, superior positive) of each slice centre of an LPS-oriented image.

    Parameters
    ----------
    image_lps : SimpleITK.Image
        Output of :func:`orient_lps`.

    Returns
    -------
    ndarray of shape (Z,)
    """
    nx, ny, nz = image_lps.GetSize()
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    return np.array(
        [
            image_lps.TransformContinuousIndexToPhysicalPoint((cx, cy, float(k)))[2]
            for k in range(nz)
        ]
    )


def nearest_slice_index(image_lps: sitk.Image, z_mm: float) -> int:
    """Index of the slice of `image_lps` whose centre is nearest to physical `z_mm`."""
    return int(np.argmin(np.abs(slice_z_positions_mm(image_lps) - z_mm)))


def covers_z(image_lps: sitk.Image, z_mm: float) -> bool:
    """Whether physical `z_mm` lies within the slab covered by `image_lps` (half a slice margin)."""
    z = slice_z_positions_mm(image_lps)
    half_mm = abs(image_lps.GetSpacing()[2]) / 2.0
    return bool(z.min() - half_mm <= z_mm <= z.max() + half_mm)


def radiological_axial_slice(image: sitk.Image, z_mm: float) -> AxialSlice:
    """The axial slice nearest to physical `z_mm`, oriented for radiological display.

    Parameters
    ----------
    image : SimpleITK.Image
        3-D image in any stored orientation (the direction matrix decides left and right).
    z_mm : float
        Physical LPS z in mm; the nearest slice is taken.

    Returns
    -------
    AxialSlice
        ``pixels[r, c]``: r runs anterior to posterior, c runs patient right to patient left,
        so the patient's left appears on the viewer's right.
    """
    image_lps = image if _is_lps(image) else orient_lps(image)
    k = nearest_slice_index(image_lps, z_mm)
    # numpy order is [z, y, x]; in LPS orientation y grows posterior and x grows to the left,
    # which is exactly the radiological screen layout (rows top->bottom, columns left->right).
    pixels = sitk.GetArrayViewFromImage(image_lps)[k].copy()
    sx, sy, _ = image_lps.GetSpacing()
    return AxialSlice(
        pixels=pixels,
        spacing_rc_mm=(float(sy), float(sx)),
        z_mm=float(slice_z_positions_mm(image_lps)[k]),
        slice_index=k,
    )


def _is_lps(image: sitk.Image) -> bool:
    return bool(np.allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6))


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOLERANCE) -> bool:
    """Whether two images share size, spacing, origin and direction (within `tol`)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def resample_onto(moving: sitk.Image, reference: sitk.Image, *, is_label: bool) -> sitk.Image:
    """Resample `moving` onto the grid of `reference` with an identity transform.

    Linear interpolation for intensities (float32 output), nearest neighbour for labels.
    Voxels outside `moving` become 0.
    """
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    pixel_type = moving.GetPixelID() if is_label else sitk.sitkFloat32
    return sitk.Resample(
        moving, reference, sitk.Transform(3, sitk.sitkIdentity), interpolator, 0.0, pixel_type
    )


@dataclass(frozen=True)
class SliceChoice:
    """Candidate slice positions of one session, from its label map (session coordinates).

    Attributes
    ----------
    lesion_z_mm : float or None
        Physical z (mm) of the marrow-lesion centroid, None without lesion voxels.
    largest_limb_z_mm : float or None
        Physical z (mm) of the slice with the largest affected-limb area, None without limb.
    lesion_point_mm : tuple of float or None
        Physical LPS point (mm) of the marrow-lesion centroid.
    swelling_z_mm : float or None
        Physical z (mm) of the slice with the largest affected-minus-contralateral limb area;
        None when either limb is missing.
    swelling_mm2 : float or None
        That area difference, in mm^2.
    bone_point_mm : tuple of float or None
        Physical LPS centroid (mm) of the bone labels of both sides (the femora), used to
        place the coronal reformat; the limbs' centroid without bone.
    """

    lesion_z_mm: float | None
    largest_limb_z_mm: float | None
    lesion_point_mm: tuple[float, float, float] | None = None
    swelling_z_mm: float | None = None
    swelling_mm2: float | None = None
    bone_point_mm: tuple[float, float, float] | None = None


def _centroid_point(image_lps: sitk.Image, mask_zyx: np.ndarray) -> tuple[float, float, float]:
    cz, cy, cx = np.argwhere(mask_zyx).mean(axis=0)
    p = image_lps.TransformContinuousIndexToPhysicalPoint((float(cx), float(cy), float(cz)))
    return (float(p[0]), float(p[1]), float(p[2]))


def slice_candidates(dseg: sitk.Image, affected_side: str | None) -> SliceChoice:
    """Lesion centroid, largest affected-limb area, largest swelling and femoral centroid.

    Parameters
    ----------
    dseg : SimpleITK.Image
        Label map (values of :mod:`pipeline.labels`), any stored orientation.
    affected_side : str or None
        'left' or 'right'; anything else uses both sides (and no swelling is computed).

    Returns
    -------
    SliceChoice
        Positions in the physical (scanner) coordinates of this label map.
    """
    dseg_lps = orient_lps(dseg)
    lab = sitk.GetArrayViewFromImage(dseg_lps)
    sides = [affected_side] if affected_side in labels.SIDE_OFFSET else list(labels.SIDES)
    lesion_point = None
    # the affected side's lesion first; a lesion on the other side only if there is none
    for lesion_values in (
        [labels.label_value(s, labels.LESION) for s in sides],
        [labels.label_value(s, labels.LESION) for s in labels.SIDES],
    ):
        mask = np.isin(lab, lesion_values)
        if mask.any():
            lesion_point = _centroid_point(dseg_lps, mask)
            break
    z_mm = slice_z_positions_mm(dseg_lps)
    pixel_mm2 = float(dseg_lps.GetSpacing()[0] * dseg_lps.GetSpacing()[1])
    limb_values = [v for s in sides for v in labels.structure_labels(s, "limb")]
    area = np.isin(lab, limb_values).sum(axis=(1, 2))
    limb_z = None
    if area.max(initial=0) > 0:
        limb_z = float(z_mm[int(np.argmax(area))])
    swelling_z = swelling_mm2 = None
    if affected_side in labels.SIDE_OFFSET:
        other = labels.other_side(affected_side)
        aff = np.isin(lab, labels.structure_labels(affected_side, "limb")).sum(axis=(1, 2))
        con = np.isin(lab, labels.structure_labels(other, "limb")).sum(axis=(1, 2))
        both = (aff > 0) & (con > 0)  # only cross-sections holding both limbs compare
        if both.any():
            diff = np.where(both, (aff - con) * pixel_mm2, -np.inf)
            k = int(np.argmax(diff))
            swelling_z, swelling_mm2 = float(z_mm[k]), float(diff[k])
    bone_values = [v for s in labels.SIDES for v in labels.structure_labels(s, "bone")]
    bone = np.isin(lab, bone_values)
    if not bone.any():
        bone = lab > 0
    bone_point = _centroid_point(dseg_lps, bone) if bone.any() else None
    return SliceChoice(
        lesion_z_mm=None if lesion_point is None else lesion_point[2],
        largest_limb_z_mm=limb_z,
        lesion_point_mm=lesion_point,
        swelling_z_mm=swelling_z,
        swelling_mm2=swelling_mm2,
        bone_point_mm=bone_point,
    )


@dataclass(frozen=True)
class Swelling:
    """Where the affected limb exceeds the contralateral one most (baseline coordinates).

    Attributes
    ----------
    session : str
        Session label (``YYYYMMDD``) where the difference peaks.
    z_mm : float
        Baseline z (mm, LPS, superior +) of that cross-section of the affected limb.
    distance_mm : float or None
        Its distance from the affected limb's landmark (proximal +), when known.
    difference_mm2 : float
        Affected minus contralateral limb cross-sectional area, mm^2.
    """

    session: str
    z_mm: float
    distance_mm: float | None
    difference_mm2: float


def largest_swelling(
    csa_rows: Sequence[Mapping[str, Any]],
    affected_side: str,
    z_range_mm: tuple[float, float] | None = None,
) -> Swelling | None:
    """The cross-section with the largest affected-minus-contralateral limb area.

    Both limbs are compared at the same distance from their own landmark (contralateral area
    linearly interpolated at each affected cross-section's distance, never extrapolated).

    Parameters
    ----------
    csa_rows : sequence of mapping
        Rows of ``profile_csa.tsv`` (session, side, z_mm, distance_mm, limb_area_mm2).
    affected_side : str
        'left' or 'right'.
    z_range_mm : (float, float) or None
        Only cross-sections with baseline z in this range (the common extent) count.

    Returns
    -------
    Swelling or None
        None without both sides in any session.
    """
    if affected_side not in labels.SIDE_OFFSET:
        return None
    other = labels.other_side(affected_side)
    by: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in csa_rows:
        d, z, a = (_to_float(r.get(k)) for k in ("distance_mm", "z_mm", "limb_area_mm2"))
        if d is None or z is None or a is None:
            continue
        if z_range_mm is not None and not z_range_mm[0] <= z <= z_range_mm[1]:
            continue
        by.setdefault((str(r.get("session", "")), str(r.get("side", ""))), []).append((d, z, a))
    best: Swelling | None = None
    for (session, side), aff in sorted(by.items()):
        con = sorted(by.get((session, other), []))
        if side != affected_side or len(con) < 2:
            continue
        cd = np.array([c[0] for c in con])
        ca = np.array([c[2] for c in con])
        for d, z, a in aff:
            if not cd[0] <= d <= cd[-1]:
                continue
            diff = a - float(np.interp(d, cd, ca))
            if best is None or diff > best.difference_mm2:
                best = Swelling(session=session, z_mm=z, distance_mm=d, difference_mm2=diff)
    return best


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


@dataclass
class FigureResult:
    """A rendered figure (base64 PNG) or the reason it could not be rendered."""

    title: str
    png_base64: str | None = None
    caption: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    #: session label of an overlay ('' for the timeline and the profile)
    session: str = ""
    #: QC labels of that session: ``{severity, text, meaning}``, exclude first
    qc_labels: list[dict[str, str]] = field(default_factory=list)


def _figure_to_base64(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _to_int(value: Any) -> int | None:
    f = _to_float(value)
    return None if f is None else int(round(f))


def _series(
    rows: Sequence[Mapping[str, Any]], structure: str, column: str
) -> tuple[list[int], list[float]]:
    points = sorted(
        (d, v)
        for r in rows
        if r.get("structure") == structure
        for d, v in [(_to_int(r.get("day")), _to_float(r.get(column)))]
        if d is not None and v is not None
    )
    return [p[0] for p in points], [p[1] for p in points]


def _event_marks(events: Sequence[Mapping[str, Any]]) -> dict[int, list[str]]:
    marks: dict[int, list[str]] = {0: ["day 0"]}
    for ev in events:
        day = _to_int(ev.get("day"))
        if day is None:
            continue
        text = str(ev.get("label") or ev.get("category") or "event")
        marks.setdefault(day, [])
        if text not in marks[day]:
            marks[day].append(text)
    if len(marks[0]) > 1:
        marks[0].remove("day 0")
    return marks


def _gapped_series(
    rows: Sequence[Mapping[str, Any]], structure: str, column: str
) -> tuple[list[int], list[float]]:
    """Like :func:`_series`, with NaN where a session's value is missing (lines break there,
    so a missing session never looks like a straight line through it)."""
    points: dict[int, float] = {}
    for r in rows:
        day = _to_int(r.get("day"))
        if r.get("structure") != structure or day is None:
            continue
        v = _to_float(r.get(column))
        points[day] = math.nan if v is None else v
    days = sorted(points)
    return days, [points[d] for d in days]


def _plot_gapped(
    ax: Any, rows: Sequence[Mapping[str, Any]], structure: str, column: str, style: str,
    missing: set[int], **kwargs: Any,
) -> bool:
    """Plot one series with gaps, adding the days without a value to `missing`; False (and
    nothing drawn) when no value at all is available."""
    days, vals = _gapped_series(rows, structure, column)
    gaps = {d for d, v in zip(days, vals, strict=True) if math.isnan(v)}
    if len(gaps) == len(days):
        return False
    ax.plot(days, vals, style, **kwargs)
    missing |= gaps
    return True


def _mark_unavailable(ax: Any, days: Collection[int]) -> None:
    """A grey band and the words 'not available' on each day of `ax` whose value is not
    available (QC): drawn across the panel, so it never reads as a value (0 or any other)."""
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for k, day in enumerate(sorted(days)):
        ax.axvline(day, color="#999999", alpha=0.3, linewidth=9, solid_capstyle="butt",
                   label="not available (QC)" if k == 0 else None)
        ax.text(day, 0.96, "not available", transform=trans, rotation=90, ha="center",
                va="top", fontsize=7, color="#555555", parse_math=False)


def _gapped_columns(
    rows: Sequence[Mapping[str, Any]], structure: str, *columns: str
) -> tuple[list[int], list[list[float]]]:
    """Days of `structure` and, per column, its values with NaN where missing (aligned)."""
    points: dict[int, list[float]] = {}
    for r in rows:
        day = _to_int(r.get("day"))
        if r.get("structure") != structure or day is None:
            continue
        points[day] = [math.nan if (v := _to_float(r.get(c))) is None else v for c in columns]
    days = sorted(points)
    return days, [[points[d][k] for d in days] for k in range(len(columns))]


def within_error_flag(row: Mapping[str, Any]) -> bool:
    """Whether the row's change from baseline is inside its MDC95 (``change_beyond_mdc95``
    is ``no``); ``yes``, ``n/a`` or no such column: not marked."""
    return str(row.get("change_beyond_mdc95") or "").strip().lower() == "no"


def _change_within_mdc(change: float | None, mdc: float | None) -> bool:
    """A change whose size does not exceed its known MDC95 (the caller leaves out the
    baseline, the reference itself)."""
    return change is not None and mdc is not None and abs(change) <= mdc


def _band(
    ax: Any, days: Sequence[int], vals: Sequence[float], ci: Sequence[float], color: str,
    label: str | None = None, hatch: bool = False,
) -> bool:
    """Shade value ± ci (95 % interval); nothing where either is missing. False when no
    interval wider than zero is known (nothing drawn). `hatch`: hatched, not filled (a second
    band on the same panel stays readable where the two overlap)."""
    v, c = np.asarray(vals, float), np.asarray(ci, float)
    ok = np.isfinite(v) & np.isfinite(c)
    if not (ok & (c > 0)).any():
        return False
    lo, hi = np.where(ok, v - c, np.nan), np.where(ok, v + c, np.nan)
    if hatch:
        ax.fill_between(days, lo, hi, facecolor="none", edgecolor=color, hatch="////",
                        alpha=0.45, linewidth=0, label=label)
    else:
        ax.fill_between(days, lo, hi, color=color, alpha=CI_ALPHA, linewidth=0, label=label)
    # a session with no known neighbour would vanish in the band: an error bar shows it too
    ax.errorbar(days, v, yerr=np.where(ok, c, 0.0), fmt="none", ecolor=color, alpha=0.7,
                elinewidth=0.8, capsize=2.5)
    return True


def _errorbars(ax: Any, days: Sequence[int], vals: Sequence[float], ci: Sequence[float],
               color: str) -> bool:
    v, c = np.asarray(vals, float), np.asarray(ci, float)
    ok = np.isfinite(v) & np.isfinite(c)
    if not (ok & (c > 0)).any():
        return False
    ax.errorbar(days, np.where(ok, v, np.nan), yerr=np.where(ok, c, 0.0), fmt="none",
                ecolor=color, elinewidth=1.0, capsize=3)
    return True


def _hollow(ax: Any, days: Sequence[int], vals: Sequence[float], within: Sequence[bool],
            color: str, marker: str = "o") -> bool:
    """Redraw the markers of the sessions whose change is within measurement error hollow."""
    pts = [(d, v) for d, v, w in zip(days, vals, within, strict=True) if w and math.isfinite(v)]
    if not pts:
        return False
    ax.plot(*zip(*pts, strict=True), marker, linestyle="none", markerfacecolor="white",
            markeredgecolor=color, markeredgewidth=1.4, zorder=5)
    return True


def _within_legend(ax: Any) -> None:
    ax.plot([], [], "o", markerfacecolor="white", markeredgecolor="#555555",
            markeredgewidth=1.4, label=WITHIN_ERROR)


def _row_flags(rows: Sequence[Mapping[str, Any]], structure: str, days: Sequence[int]
               ) -> list[bool]:
    by_day = {_to_int(r.get("day")): within_error_flag(r) for r in rows
              if r.get("structure") == structure}
    return [by_day.get(d, False) for d in days]


def _plot_change(
    ax: Any, rows: Sequence[Mapping[str, Any]], flare_pp: float | None, baseline_day: int | None,
    missing: set[int],
) -> bool:
    """Swelling change from baseline (soft-tissue asymmetry change, pp; with one limb only the
    affected soft tissue's change, %), the ±MDC95 band around the baseline (zero), the flare
    threshold, and hollow markers where the change is within its MDC95."""
    days, (chg, mdc) = _gapped_columns(rows, "soft_tissue", "asymmetry_change_pp",
                                       "asymmetry_change_pp_ci95")
    unit, what = "pp", "soft-tissue asymmetry\nchange (pp)"
    if not any(math.isfinite(v) for v in chg):
        # older tables: the change is computed here from the asymmetry
        days, (asym,) = _gapped_columns(rows, "soft_tissue", "asymmetry_pct")
        base = dict(zip(days, asym, strict=True)).get(baseline_day) if baseline_day is not None \
            else None
        if base is not None and math.isfinite(base):
            chg, mdc = [a - base for a in asym], [math.nan] * len(days)
    if not any(math.isfinite(v) for v in chg):
        days, (chg, mdc) = _gapped_columns(rows, "soft_tissue", "change_from_baseline_pct",
                                           "change_from_baseline_pct_ci95")
        unit, what = "%", "soft-tissue change\nfrom baseline (%)"
        if not any(math.isfinite(v) for d, v in zip(days, chg, strict=True)
                   if d != baseline_day):
            ax.set_ylabel(what)
            ax.text(0.5, 0.5, "not available (no change from baseline)", transform=ax.transAxes,
                    ha="center", va="center", color="#777777", fontsize=8)
            return False
    if baseline_day in days:  # the baseline is the reference: change 0, no interval
        k = days.index(baseline_day)
        if not math.isfinite(chg[k]):
            chg[k] = 0.0
        mdc[k] = math.nan
    # the band breaks where a session's MDC95 is not known (never drawn across it); a session
    # with no known neighbour gets a short band of its own
    bd = np.array([d for d in days if d != baseline_day], float)
    bm = np.array([m for d, m in zip(days, mdc, strict=True) if d != baseline_day], float)
    if (np.isfinite(bm) & (bm > 0)).any():
        style = {"color": MDC_COLOR, "alpha": MDC_ALPHA, "linewidth": 0}
        ax.fill_between(bd, -bm, bm, label="±MDC95 around baseline (measurement error)", **style)
        w = max(0.5, 0.02 * (max(days) - min(days)))
        for i, (d, m) in enumerate(zip(bd, bm, strict=True)):
            alone = all(not (0 <= j < len(bm) and math.isfinite(bm[j])) for j in (i - 1, i + 1))
            if math.isfinite(m) and alone:
                ax.fill_between([d - w, d + w], [-m, -m], [m, m], **style)
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    if flare_pp is not None:
        ax.axhline(flare_pp, color=AFFECTED_COLOR, linestyle=(0, (2, 3)), linewidth=0.9,
                   label=f"flare threshold +{flare_pp:g} {unit}")
    gaps = {d for d, v in zip(days, chg, strict=True) if math.isnan(v)}
    ax.plot(days, chg, "o-", color=AFFECTED_COLOR, label="soft tissue, affected vs baseline")
    within = [d != baseline_day and _change_within_mdc(v if math.isfinite(v) else None,
                                                       m if math.isfinite(m) else None)
              for d, v, m in zip(days, chg, mdc, strict=True)]
    if _hollow(ax, days, chg, within, AFFECTED_COLOR):
        _within_legend(ax)
    ax.set_ylabel(what)
    missing |= gaps
    return True


def render_timeline(
    rows: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    affected_side: str,
    thresholds: Mapping[str, Any],
    baseline_day: int | None,
    unavailable_days: Collection[int] = (),
) -> str:
    """Timeline panels (PNG, base64) of volumes and asymmetry against day since day 0.

    Panels: soft-tissue volume of both limbs, soft-tissue and whole-limb asymmetry, the
    soft-tissue asymmetry change from baseline with its MDC95 band around the baseline and the
    flare threshold, marrow lesion and edema of the affected side. Where the tables carry
    95 % intervals (``*_ci95`` columns) volumes get shaded bands and asymmetry error bars;
    a session whose change from baseline is within its MDC95 has a hollow marker.

    Parameters
    ----------
    rows : sequence of mapping
        Rows of ``longitudinal.tsv`` (values may be strings, 'n/a' for missing).
    events : sequence of mapping
        Clinical events with ``day`` and ``label``; drawn as vertical lines.
    affected_side : str
        Used in the legend only.
    thresholds : mapping
        ``flare_asymmetry_pp`` draws the flare threshold on the asymmetry panels.
    baseline_day : int or None
        Day of the baseline session.
    unavailable_days : collection of int
        Days of sessions with a QC exclude flag: a missing value there is marked with a grey
        band ("not available"); any missing value breaks its line.

    Returns
    -------
    str
        Base64-encoded PNG.
    """
    fig = Figure(figsize=(8.0, 10.8), layout="constrained")
    axes = fig.subplots(5, 1, sharex=True)
    ax_vol, ax_asym, ax_change, ax_lesion, ax_edema = axes
    missing: list[set[int]] = [set() for _ in axes]
    hollow = [False] * len(axes)
    plotted = False
    for column, style, color, label in (
        ("affected_ml", "o-", AFFECTED_COLOR, f"affected ({affected_side})"),
        ("contralateral_ml", "s--", CONTRALATERAL_COLOR, "contralateral"),
    ):
        drawn = _plot_gapped(ax_vol, rows, "soft_tissue", column, style, missing[0],
                             color=color, label=label)
        plotted |= drawn and column == "affected_ml"
        days, (vals, ci) = _gapped_columns(rows, "soft_tissue", column, f"{column}_ci95")
        _band(ax_vol, days, vals, ci, color, "95 % interval", hatch=column != "affected_ml")
        if column == "affected_ml":
            hollow[0] = _hollow(ax_vol, days, vals, _row_flags(rows, "soft_tissue", days), color)
    ax_vol.set_ylabel("soft tissue (mL)")

    for structure, style in (("soft_tissue", "o-"), ("limb", "^:")):
        color = AFFECTED_COLOR if structure == "soft_tissue" else "#999999"
        plotted |= _plot_gapped(
            ax_asym, rows, structure, "asymmetry_pct", style, missing[1],
            color=color, label=STRUCTURE_TITLES[structure],
        )
        days, (vals, ci) = _gapped_columns(rows, structure, "asymmetry_pct", "asymmetry_pct_ci95")
        _errorbars(ax_asym, days, vals, ci, color)
    ax_asym.axhline(0.0, color="#bbbbbb", linewidth=0.8)
    flare_pp = _to_float(thresholds.get("flare_asymmetry_pp"))
    if flare_pp is not None and baseline_day is not None:
        d, asym = _series(rows, "soft_tissue", "asymmetry_pct")
        base = dict(zip(d, asym, strict=True)).get(baseline_day)
        if base is not None:
            ax_asym.axhline(
                base + flare_pp,
                color=AFFECTED_COLOR,
                linestyle=(0, (2, 3)),
                linewidth=0.9,
                label=f"baseline + {flare_pp:g} pp (flare)",
            )
    ax_asym.set_ylabel("asymmetry (%)")

    _plot_change(ax_change, rows, flare_pp, baseline_day, missing[2])

    for k, ax, structure, color, name in (
        (3, ax_lesion, "marrow_lesion", AFFECTED_COLOR, "marrow lesion"),
        (4, ax_edema, "edema", EDEMA_COLOR, "edema"),
    ):
        plotted |= _plot_gapped(ax, rows, structure, "affected_ml", "o-", missing[k],
                                color=color, label=f"{name}, affected side")
        days, (vals, ci) = _gapped_columns(rows, structure, "affected_ml", "affected_ml_ci95")
        _band(ax, days, vals, ci, color, "95 % interval")
        hollow[k] = _hollow(ax, days, vals, _row_flags(rows, structure, days), color)
        ax.set_ylabel(f"{name} (mL)")
        ax.set_ylim(bottom=0)

    if not plotted:
        raise ValueError("longitudinal.tsv has no numeric values to plot")
    for ax, gaps, h in zip(axes, missing, hollow, strict=True):
        if h:
            _within_legend(ax)
        _mark_unavailable(ax, gaps & set(unavailable_days))

    marks = _event_marks(events)
    for ax in axes:
        for day in marks:
            ax.axvline(day, color=EVENT_COLOR, linestyle=":" if day else "-", linewidth=0.8)
        ax.grid(True, color="#eeeeee")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7.5, frameon=False)
    trans = blended_transform_factory(ax_vol.transData, ax_vol.transAxes)
    for day, texts in sorted(marks.items()):
        ax_vol.text(
            day,
            1.02,
            "; ".join(texts),
            transform=trans,
            rotation=35,
            fontsize=7,
            ha="left",
            va="bottom",
            color=EVENT_COLOR,
            parse_math=False,
        )
    ax_edema.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_edema.set_xlabel("day since day 0")
    return _figure_to_base64(fig)


def _window(pixels: np.ndarray) -> tuple[float, float]:
    vals = pixels[np.isfinite(pixels)]
    if vals.size and (vals > 0).any():
        vals = vals[vals > 0]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _rgb(label: int) -> tuple[float, float, float]:
    r, g, b = labels.LABEL_COLORS.get(label, (255, 0, 255))
    return (r / 255.0, g / 255.0, b / 255.0)


@dataclass(frozen=True)
class CoronalSlice:
    """One coronal slice ready for display in radiological convention.

    Attributes
    ----------
    pixels : ndarray of shape (R, C)
        Row 0 is the most superior row, column 0 the patient's rightmost column.
    spacing_rc_mm : tuple of float
        Pixel spacing along rows (superior-inferior) and columns (right-left), in mm.
    row_z_mm : ndarray of shape (R,)
        Physical z (mm, LPS) of each row.
    y_mm : float
        Physical LPS y (posterior +) of the slice, in mm.
    """

    pixels: np.ndarray
    spacing_rc_mm: tuple[float, float]
    row_z_mm: np.ndarray
    y_mm: float


def radiological_coronal_slice(slab_lps: sitk.Image) -> CoronalSlice:
    """A one-voxel-thick coronal slab of an LPS-oriented image, for radiological display.

    Parameters
    ----------
    slab_lps : SimpleITK.Image
        Output of :func:`coronal_slab` (or any LPS image of y size 1, e.g. resampled onto one).

    Returns
    -------
    CoronalSlice
        Superior up, patient's right on the viewer's left.
    """
    if slab_lps.GetSize()[1] != 1 or not _is_lps(slab_lps):
        raise ValueError("expected an LPS-oriented coronal slab of one voxel in y")
    arr = sitk.GetArrayFromImage(slab_lps)  # [z, 1, x]; z grows superior, x grows to the left
    sx, _, sz = slab_lps.GetSpacing()
    centre = slab_lps.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0))
    return CoronalSlice(
        pixels=arr[::-1, 0, :].copy(),
        spacing_rc_mm=(float(sz), float(sx)),
        row_z_mm=slice_z_positions_mm(slab_lps)[::-1].copy(),
        y_mm=float(centre[1]),
    )


def axial_slab(reference_lps: sitk.Image, z_mm: float) -> sitk.Image:
    """The one-slice sub-grid of `reference_lps` (LPS-oriented) nearest to physical `z_mm`."""
    k = nearest_slice_index(reference_lps, z_mm)
    return reference_lps[:, :, k : k + 1]


def coronal_slab(reference_lps: sitk.Image, y_mm: float) -> sitk.Image:
    """The one-row (coronal) sub-grid of `reference_lps` (LPS-oriented) nearest to `y_mm`."""
    nx, ny, nz = reference_lps.GetSize()
    ys = np.array(
        [
            reference_lps.TransformContinuousIndexToPhysicalPoint(
                ((nx - 1) / 2.0, float(j), (nz - 1) / 2.0)
            )[1]
            for j in range(ny)
        ]
    )
    j = int(np.argmin(np.abs(ys - y_mm)))
    return reference_lps[:, j : j + 1, :]


def resample_to_slab(
    moving: sitk.Image, slab: sitk.Image, transform: sitk.Transform, *, is_label: bool
) -> sitk.Image:
    """Resample a session image onto a baseline sub-grid through its registration transform.

    ``transform`` maps baseline points to session points (:mod:`pipeline.register`), the
    convention ``sitk.Resample`` expects. Nearest neighbour for labels, linear otherwise.
    """
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    pixel_type = moving.GetPixelID() if is_label else sitk.sitkFloat32
    return sitk.Resample(moving, slab, transform, interpolator, 0.0, pixel_type)


def crop_box(
    masks: Sequence[np.ndarray], spacing_rc_mm: tuple[float, float], margin_mm: float = 15.0
) -> tuple[slice, slice]:
    """Row and column slices around the union of `masks` plus a margin (all rows if empty)."""
    shape: tuple[int, ...] = tuple(masks[0].shape) if masks else (1, 1)
    union = np.zeros(shape, bool)
    for m in masks:
        if m.shape == union.shape:
            union |= m
    if not union.any():
        return slice(None), slice(None)
    rows, cols = np.nonzero(union)
    mr = int(math.ceil(margin_mm / spacing_rc_mm[0]))
    mc = int(math.ceil(margin_mm / spacing_rc_mm[1]))
    n_rows, n_cols = shape[0], shape[1]
    return (
        slice(max(int(rows.min()) - mr, 0), min(int(rows.max()) + mr + 1, n_rows)),
        slice(max(int(cols.min()) - mc, 0), min(int(cols.max()) + mc + 1, n_cols)),
    )


#: Orientation letters (viewer's left, right, top, bottom) of each displayed plane.
MARKERS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
}


def _draw_panel(
    ax: Any,
    pixels: np.ndarray,
    spacing_rc_mm: tuple[float, float],
    lab: np.ndarray,
    title: str,
    markers: tuple[str, str, str, str] = MARKERS["axial"],
) -> list[int]:
    vmin, vmax = _window(pixels)
    ax.imshow(
        pixels,
        cmap="gray",
        vmin=vmin,
        vmax=vmax,
        aspect=spacing_rc_mm[0] / spacing_rc_mm[1],
        interpolation="nearest",  # true voxels; also compresses far better than smoothing
    )
    present = [int(v) for v in np.unique(lab) if v != labels.BACKGROUND]
    for value in present:
        color = _rgb(value)
        mask = np.pad(lab == value, 1).astype(np.float32)
        for contour in find_contours(mask, 0.5):
            ax.plot(contour[:, 1] - 1, contour[:, 0] - 1, color=color, linewidth=0.9)
    ax.set_xlim(-0.5, pixels.shape[1] - 0.5)
    ax.set_ylim(pixels.shape[0] - 0.5, -0.5)
    style = {
        "color": "white",
        "fontsize": 11,
        "fontweight": "bold",
        "transform": ax.transAxes,
        "bbox": {"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"},
    }
    left, right, top, bottom = markers
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.set_title(title, fontsize=9, parse_math=False)
    ax.set_xticks([])
    ax.set_yticks([])
    return present


def _legend(fig: Figure, present: set[int]) -> None:
    # one legend entry per tissue class (same hue on both sides)
    unique: dict[str, Line2D] = {}
    for v in sorted(present, key=lambda v: (v - 1) % 4):
        if v in labels.LABEL_COLORS and v in labels.LABEL_NAMES:
            name = labels.LABEL_NAMES[v].split(" ", 1)[-1]
            unique.setdefault(name, Line2D([], [], color=_rgb(v), label=name))
    if unique:
        fig.legend(
            handles=list(unique.values()),
            loc="outside lower center",
            ncol=len(unique),
            fontsize=8,
            frameon=False,
        )


def render_panels(
    panels: Sequence[tuple[np.ndarray, str]],
    lab: np.ndarray,
    spacing_rc_mm: tuple[float, float],
    plane: str = "axial",
    row_marks: Sequence[tuple[float, str, str]] = (),
) -> str:
    """Side-by-side grey-scale panels with the same label contours (PNG, base64).

    Parameters
    ----------
    panels : sequence of (ndarray of shape (R, C), str)
        Display-oriented images (radiological) and their titles.
    lab : ndarray of shape (R, C)
        Label map on the same pixels.
    spacing_rc_mm : tuple of float
        Row and column pixel spacing in mm; sets the physical aspect ratio.
    plane : str
        'axial' or 'coronal' (orientation letters).
    row_marks : sequence of (row, text, linestyle)
        Horizontal lines across every panel (e.g. axial positions on a coronal view).
    """
    rows, cols = lab.shape
    ratio = (rows * spacing_rc_mm[0]) / max(cols * spacing_rc_mm[1], 1e-6)
    width_in = 4.2 if len(panels) > 1 else 6.0
    height_in = min(max(width_in * ratio, 1.6), 8.0)
    fig = Figure(figsize=(width_in * len(panels), height_in + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    present: set[int] = set()
    for ax, (pixels, name) in zip(axes, panels, strict=True):
        present.update(_draw_panel(ax, pixels, spacing_rc_mm, lab, name, MARKERS[plane]))
        for row, text, style in row_marks:
            if -0.5 <= row <= rows - 0.5:
                ax.axhline(row, color="#ff33ff", linewidth=0.9, linestyle=style)
                if not text:
                    continue
                # labels right of centre: clear of the R/L/S/I letters at the edges and centre
                ax.text(
                    cols * 0.6,
                    row - 0.4,
                    text,
                    color="#ff33ff",
                    fontsize=7,
                    ha="left",
                    va="bottom",
                    parse_math=False,
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "edgecolor": "none"},
                )
    _legend(fig, present)
    return _figure_to_base64(fig)


def render_overlay(
    fluid: sitk.Image, dseg: sitk.Image, t1: sitk.Image | None, z_mm: float
) -> tuple[str, float]:
    """Fluid-sensitive and T1 axial slices with label contours, radiological convention.

    Parameters
    ----------
    fluid : SimpleITK.Image
        Fluid-sensitive image; defines the grid.
    dseg : SimpleITK.Image
        Label map on the fluid grid (or the same one-slice slab).
    t1 : SimpleITK.Image or None
        T1-weighted image on the fluid grid (a one-slice slab is enough); None: fluid only.
    z_mm : float
        Physical z in mm; the nearest slice is shown.

    Returns
    -------
    png_base64 : str
    z_mm : float
        Physical z of the slice actually shown.
    """
    fluid_sl = radiological_axial_slice(fluid, z_mm)
    lab = radiological_axial_slice(dseg, z_mm).pixels
    panels = [(fluid_sl.pixels, "fluid-sensitive")]
    if t1 is not None:
        panels.append((radiological_axial_slice(t1, z_mm).pixels, "T1-weighted"))
    return render_panels(panels, lab, fluid_sl.spacing_rc_mm, "axial"), fluid_sl.z_mm


def render_profile(
    csa_rows: Sequence[Mapping[str, Any]],
    affected_side: str,
    session_titles: Mapping[str, str],
    swelling: Swelling | None,
) -> str:
    """Limb cross-sectional area along the thigh, affected vs contralateral, per session.

    Top: limb area (cm^2) against distance from each limb's landmark (proximal +), affected
    solid, contralateral dashed, one colour per session. Bottom: affected minus contralateral
    at the same distance (contralateral interpolated).
    """
    other = labels.other_side(affected_side) if affected_side in labels.SIDE_OFFSET else ""
    by: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in csa_rows:
        d, a = _to_float(r.get("distance_mm")), _to_float(r.get("limb_area_mm2"))
        if d is not None and a is not None:
            by.setdefault((str(r.get("session")), str(r.get("side"))), []).append((d, a / 100.0))
    sessions = sorted({s for s, _ in by})
    if not sessions:
        raise ValueError("profile_csa.tsv has no usable rows")
    fig = Figure(figsize=(8.0, 6.4), layout="constrained")
    ax_area, ax_diff = fig.subplots(2, 1, sharex=True)
    colors = _session_colors(len(sessions))
    for color, ses in zip(colors, sessions, strict=True):
        title = session_titles.get(ses, ses)
        aff = sorted(by.get((ses, affected_side), []))
        con = sorted(by.get((ses, other), []))
        if aff:
            ax_area.plot(*zip(*aff, strict=True), "-", color=color, label=f"{title} affected")
        if con:
            ax_area.plot(*zip(*con, strict=True), "--", color=color, label=f"{title} contra")
        if aff and len(con) >= 2:
            cd, ca = np.array(con).T
            pts = [(d, a - float(np.interp(d, cd, ca))) for d, a in aff if cd[0] <= d <= cd[-1]]
            if pts:
                ax_diff.plot(*zip(*pts, strict=True), "o-", ms=2.5, color=color, label=title)
    for ax in (ax_area, ax_diff):
        ax.axvline(0.0, color="#888888", linewidth=0.8)
        if swelling is not None and swelling.distance_mm is not None:
            ax.axvline(swelling.distance_mm, color="#ff33ff", linewidth=0.9, linestyle=":")
        ax.grid(alpha=0.3)
    ax_diff.axhline(0.0, color="#bbbbbb", linewidth=0.8)
    ax_area.set_ylabel("limb cross-sectional area (cm²)")
    ax_diff.set_ylabel("affected − contralateral (cm²)")
    ax_diff.set_xlabel("distance from the femoral landmark (mm, proximal +)")
    ax_area.legend(fontsize=7, ncol=2, loc="best")
    if ax_diff.lines:
        ax_diff.legend(fontsize=7, ncol=3, loc="best")
    return _figure_to_base64(fig)


def _session_colors(n: int) -> list[str]:
    # Okabe-Ito without the two colours used for affected/contralateral elsewhere
    palette = ["#000000", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", "#0072B2"]
    return [palette[i % len(palette)] for i in range(n)]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _read_optional_tsv(path: Path, notes: list[str]) -> list[dict[str, str]] | None:
    if not path.exists():
        return None
    try:
        return read_tsv(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        notes.append(f"{path.name} could not be read: {exc}")
        return None


def _read_image(subject_dir: Path, rel: Any, what: str) -> sitk.Image:
    if not rel:
        raise FileNotFoundError(f"no {what} file listed for this session in summary.json")
    path = subject_dir / str(rel)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {rel} not found in the subject folder")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(f"{what} file {rel} could not be read: {first}") from exc


def _fmt(value: Any, digits: int = 1, signed: bool = False) -> str:
    f = _to_float(value)
    if f is None:
        return "n/a"
    return f"{f:+.{digits}f}" if signed else f"{f:.{digits}f}"


def _flatten(mapping: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(mapping, Mapping):
        out: list[tuple[str, str]] = []
        for key, value in mapping.items():
            out.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(mapping, list | tuple):
        return [(prefix, json.dumps(mapping, default=str))]
    return [(prefix, "n/a" if mapping is None else str(mapping))]


def _series_used(row: Mapping[str, Any], used: set[tuple[str, str]]) -> bool:
    if str(row.get("status", "")).strip().lower() in ("used", "selected"):
        return True
    date, desc = str(row.get("study_date", "")), str(row.get("series_description", ""))
    return (date, f"{desc} (series {row.get('series_number', '')})") in used or (date, desc) in used


def _session_key(session: Mapping[str, Any]) -> tuple[int, str]:
    day = _to_int(session.get("day"))
    return (day if day is not None else 10**9, str(session.get("study_date", "")))


def _sides(affected: str) -> tuple[list[str], list[str]]:
    """(affected sides, contralateral sides): both for both when the side is not known."""
    if affected in labels.SIDE_OFFSET:
        return [affected], [labels.other_side(affected)]
    return list(labels.SIDES), list(labels.SIDES)


def _longitudinal_reasons(
    index: QCIndex, row: Mapping[str, Any], affected: str, baseline_date: str
) -> dict[str, list[str]]:
    """Per column of a ``longitudinal.tsv`` row, the QC codes that make it not available."""
    aff, con = _sides(affected)
    s, date, row_qc = str(row.get("structure")), row.get("study_date"), row.get("qc")
    a = index.unavailable(date, aff, s, row_qc)
    c = index.unavailable(date, con, s, row_qc)
    base_a = index.unavailable(baseline_date, aff, s)
    base_c = index.unavailable(baseline_date, con, s)
    return {
        "affected_ml": a,
        "contralateral_ml": c,
        "difference_ml": _merge(a, c),
        "asymmetry_pct": _merge(a, c),
        "asymmetry_change_pp": _merge(a, c, base_a, base_c),
        "change_from_baseline_pct": _merge(a, base_a),
    }


def _longitudinal_table(
    rows: Sequence[Mapping[str, str]],
    baseline_date: str,
    index: QCIndex | None = None,
    affected: str = "",
    notes: Footnotes | None = None,
    excluded_dates: Collection[str] = (),
) -> list[dict[str, Any]]:
    index = index if index is not None else QCIndex(None, {})
    notes = notes if notes is not None else Footnotes()
    base_asym = {
        r.get("structure"): _to_float(r.get("asymmetry_pct"))
        for r in rows
        if r.get("study_date") == baseline_date
    }
    order = {s: i for i, s in enumerate(labels.STRUCTURES)}
    table = []
    for r in sorted(
        rows,
        key=lambda r: (
            _to_int(r.get("day")) or 0,
            str(r.get("study_date")),
            order.get(str(r.get("structure")), 99),
        ),
    ):
        asym = _to_float(r.get("asymmetry_pct"))
        base = base_asym.get(r.get("structure"))
        why = _longitudinal_reasons(index, r, affected, baseline_date)
        date = str(r.get("study_date", ""))
        # the table's own asymmetry change (newer outputs); else computed here; 0 at baseline
        asym_change = _to_float(r.get("asymmetry_change_pp"))
        if asym_change is None and asym is not None and base is not None:
            asym_change = asym - base
        asym_change_within = date != baseline_date and _change_within_mdc(
            asym_change, _to_float(r.get("asymmetry_change_pp_ci95")))

        def cell(column: str, value: Any, signed: bool = False, within: bool = False,
                 _why: Any = why, _r: Any = r) -> Cell:
            return value_cell(value, _why[column], notes, signed=signed,
                              ci=_r.get(f"{column}_ci95"), within_error=within)

        table.append(
            {
                "study_date": date,
                "day": str(r.get("day", "")),
                "structure": STRUCTURE_TITLES.get(str(r.get("structure")), str(r.get("structure"))),
                "affected_ml": cell("affected_ml", r.get("affected_ml")),
                "contralateral_ml": cell("contralateral_ml", r.get("contralateral_ml")),
                "difference_ml": cell("difference_ml", r.get("difference_ml"), True),
                "asymmetry_pct": cell("asymmetry_pct", asym, True),
                "asymmetry_change_pp": cell(
                    "asymmetry_change_pp", asym_change, True, asym_change_within
                ),
                "change_from_baseline_pct": cell(
                    "change_from_baseline_pct", r.get("change_from_baseline_pct"), True,
                    within_error_flag(r),
                ),
                "qc": ", ".join(_row_qc(index, r, None)),
                "is_baseline": date == baseline_date,
                "excluded": date in excluded_dates,
            }
        )
    return table


def _row_qc(index: QCIndex, row: Mapping[str, Any], side: str | None) -> list[str]:
    """QC codes shown in a table row: the summary's flags, else the row's ``qc`` column."""
    if index.flags is None:
        return _split_codes(row.get("qc"))
    return index.codes(index.session(row.get("study_date")), side)


def _volumes_table(
    rows: Sequence[Mapping[str, Any]], index: QCIndex, notes: Footnotes
) -> list[dict[str, Any]]:
    """``volumes.tsv`` for display: 'not available' (with its QC codes) instead of n/a."""
    out = []
    for r in rows:
        side, structure = str(r.get("side", "")), str(r.get("structure", ""))
        codes = index.unavailable(r.get("study_date"), [side], structure, r.get("qc"))
        out.append(
            {
                "study_date": r.get("study_date", ""),
                "day": r.get("day", ""),
                "side": side,
                "role": r.get("role", ""),
                "structure": STRUCTURE_TITLES.get(structure, structure),
                "volume_ml": value_cell(r.get("volume_ml"), codes, notes,
                                        ci=r.get("volume_ml_ci95")),
                "qc": ", ".join(_row_qc(index, r, side)),
            }
        )
    return out


@dataclass
class OverlayView:
    """One slice position shown for every session (baseline coordinates)."""

    key: str
    title: str
    plane: str  # 'axial' (position = baseline z) or 'coronal' (position = baseline y)
    position_mm: float | None
    why: str
    figures: list[FigureResult] = field(default_factory=list)
    note: str = ""


@dataclass
class _Pending:
    figure: FigureResult
    fluid: np.ndarray
    t1: np.ndarray | None
    lab: np.ndarray
    spacing_rc_mm: tuple[float, float]
    row_z_mm: np.ndarray | None
    session_z_mm: float | None
    base_mm: float  # baseline z (axial) or y (coronal) of the slice shown


def _identity() -> sitk.Transform:
    return sitk.Transform(3, sitk.sitkIdentity)


def _xfm_path(subject_dir: Path, session: Mapping[str, Any]) -> Path | None:
    """The session's ``_xfm.tfm`` next to its label map (BIDS-like name), if present."""
    files = session.get("files") or {}
    if files.get("xfm"):
        return subject_dir / str(files["xfm"])
    dseg = str(files.get("dseg") or "")
    if dseg.endswith("_dseg.nii.gz"):
        path = subject_dir / (dseg[: -len("_dseg.nii.gz")] + "_xfm.tfm")
        if path.exists():
            return path
    label = session.get("session")
    if label:
        hits = sorted((subject_dir / f"ses-{label}").glob("*_xfm.tfm"))
        if hits:
            return hits[0]
    return None


def _to_baseline_point(transform: sitk.Transform, point: Sequence[float]) -> np.ndarray:
    """A session point mapped into baseline space (inverse of the baseline->session map)."""
    a, b = affine_of(transform)
    return np.asarray(np.linalg.solve(a, np.asarray(point, dtype=float) - b))


def _plan_views(
    candidates: Mapping[int, SliceChoice],
    transforms: Mapping[int, sitk.Transform],
    order: Sequence[int],
    dates: Sequence[str],
    swelling: Swelling | None,
    session_dates: Mapping[str, str],
) -> list[OverlayView]:
    def mapped(i: int, point: Sequence[float] | None) -> np.ndarray | None:
        if point is None:
            return None
        return _to_baseline_point(transforms.get(i, _identity()), point)

    lesion = OverlayView(
        "lesion", "Axial slice through the marrow-lesion centre", "axial", None, ""
    )
    for i in order:
        p = mapped(i, candidates[i].lesion_point_mm) if i in candidates else None
        if p is not None:
            lesion.position_mm = float(p[2])
            lesion.why = f"centre of the marrow lesion segmented at {dates[i]}"
            break
    else:
        lesion.note = "No marrow lesion was segmented in any session: this view is not shown."

    swell = OverlayView("swelling", "Axial slice through the largest swelling", "axial", None, "")
    if swelling is not None:
        swell.position_mm = swelling.z_mm
        where = (
            f", {swelling.distance_mm:+.0f} mm from the landmark"
            if swelling.distance_mm is not None
            else ""
        )
        swell.why = (
            "largest limb cross-sectional area difference, affected − contralateral: "
            f"{swelling.difference_mm2 / 100.0:+.1f} cm² at "
            f"{session_dates.get(swelling.session, swelling.session)}{where}"
        )
    else:
        own = [
            (c.swelling_mm2, i, c)
            for i, c in candidates.items()
            if c.swelling_mm2 is not None and c.swelling_z_mm is not None
        ]
        if own:
            diff, i, best = max(own, key=lambda t: t[0])
            x, y = (best.bone_point_mm or (0.0, 0.0, 0.0))[:2]
            p = mapped(i, (x, y, float(best.swelling_z_mm or 0.0)))
            swell.position_mm = None if p is None else float(p[2])
            swell.why = (
                "largest limb cross-sectional area difference, affected − contralateral, from "
                f"the label maps: {diff / 100.0:+.1f} cm² at {dates[i]}"
            )
        else:
            for i in order:
                cand = candidates.get(i)
                if cand is not None and cand.largest_limb_z_mm is not None:
                    x, y = (cand.bone_point_mm or (0.0, 0.0, 0.0))[:2]
                    p = mapped(i, (x, y, cand.largest_limb_z_mm))
                    swell.position_mm = None if p is None else float(p[2])
                    swell.why = (
                        "largest affected-limb cross-section (no contralateral limb to compare) "
                        f"at {dates[i]}"
                    )
                    break
            else:
                swell.note = "No limb was segmented: this view is not shown."

    coronal = OverlayView("coronal", "Coronal reformat through the femora", "coronal", None, "")
    for i in order:
        p = mapped(i, candidates[i].bone_point_mm) if i in candidates else None
        if p is not None:
            coronal.position_mm = float(p[1])
            coronal.why = f"through the centroid of the segmented femora at {dates[i]}"
            break
    else:
        coronal.note = "No limb was segmented: the coronal reformat is not shown."
    return [lesion, swell, coronal]


def _overlay_views(
    subject_dir: Path,
    sessions: Sequence[Mapping[str, Any]],
    affected_side: str | None,
    baseline_date: str,
    swelling: Swelling | None,
    extent_z_mm: tuple[float, float] | None,
    registration: Mapping[str, Any],
    not_for_planning: Collection[str] = (),
) -> list[OverlayView]:
    """Axial (lesion centre, largest swelling) and coronal views, the same positions in
    baseline coordinates for every session, each session resampled through its registration.

    Sessions named in `not_for_planning` (QC exclude flags) do not choose the positions unless
    no other session can; they are still shown."""
    dates = [str(s.get("study_date", "?")) for s in sessions]
    titles = [f"Session {dates[i]} (day {s.get('day', '?')})" for i, s in enumerate(sessions)]
    base_i = next((i for i, s in enumerate(sessions) if s.get("study_date") == baseline_date), 0)
    order = [base_i] + [i for i in range(len(sessions)) if i != base_i]
    session_dates = {str(s.get("session", "")): dates[i] for i, s in enumerate(sessions)}

    # pass 1: transforms, candidate positions from the label maps, the baseline grid
    transforms: dict[int, sitk.Transform] = {}
    session_notes: dict[int, list[str]] = {i: [] for i in range(len(sessions))}
    for i, s in enumerate(sessions):
        transforms[i] = _identity()
        if i == base_i:
            continue
        try:
            path = _xfm_path(subject_dir, s)
            if path is None:
                session_notes[i].append(
                    "no registration transform (_xfm.tfm) found: shown at the baseline's "
                    "scanner coordinates, not registered"
                )
            else:
                transforms[i] = as_transform(path)
                affine_of(transforms[i])  # rigid/affine only
        except Exception as exc:
            transforms[i] = _identity()
            session_notes[i].append(f"registration transform not usable ({exc}): not registered")
        reg = registration.get(str(s.get("session", ""))) or {}
        if reg.get("poor"):
            why = "; ".join(str(r) for r in reg.get("poor_reasons") or []) or "see QC"
            session_notes[i].append(
                f"registration flagged poor ({why}): positions may not match the baseline"
            )
    candidates: dict[int, SliceChoice] = {}
    reference: sitk.Image | None = None
    for i in order:
        try:
            dseg = _read_image(subject_dir, sessions[i].get("files", {}).get("dseg"), "label map")
            candidates[i] = slice_candidates(dseg, affected_side)
            if i == base_i:
                reference = orient_lps(dseg)
        except Exception as exc:  # reported per figure in pass 2
            log.info("slice candidates of %s: %s", titles[i], exc)
    if reference is None and sessions:
        try:
            fluid = _read_image(
                subject_dir, sessions[base_i].get("files", {}).get("fluid"), "fluid image"
            )
            reference = orient_lps(fluid)
        except Exception as exc:
            log.info("baseline reference grid: %s", exc)
    planning = {
        i: c
        for i, c in candidates.items()
        if str(sessions[i].get("session", "")) not in not_for_planning
    }
    views = _plan_views(planning or candidates, transforms, order, dates, swelling, session_dates)
    if reference is None:
        for v in views:
            v.position_mm = None
            v.note = (
                "The baseline session's label map and fluid image could not be read: there is "
                "no common grid to place the slices on."
            )

    # pass 2: each session once; every view resampled onto its baseline slab
    pending: dict[str, list[_Pending | FigureResult]] = {v.key: [] for v in views}
    for i, s in enumerate(sessions):
        label = str(s.get("session", ""))
        figs = {v.key: FigureResult(title=titles[i], session=label) for v in views}
        try:
            files = s.get("files", {}) or {}
            fluid = _read_image(subject_dir, files.get("fluid"), "fluid-sensitive image")
            dseg = _read_image(subject_dir, files.get("dseg"), "label map")
            t1 = None
            t1_note = None
            try:
                t1 = _read_image(subject_dir, files.get("t1"), "T1 image")
            except Exception as exc:
                t1_note = f"T1 panel not shown: {exc}"
            dseg_lps = orient_lps(dseg)
        except Exception as exc:
            log.warning("overlays of %s failed: %s", titles[i], exc)
            for v in views:
                if v.position_mm is not None and reference is not None:
                    figs[v.key].error = f"{type(exc).__name__}: {exc}"
                    pending[v.key].append(figs[v.key])
            continue
        transform = transforms[i]
        for v in views:
            fig = figs[v.key]
            if v.position_mm is None or reference is None:
                continue
            fig.notes.extend(session_notes[i])
            if t1_note:
                fig.notes.append(t1_note)
            try:
                if v.plane == "axial":
                    slab = axial_slab(reference, v.position_mm)
                else:
                    slab = coronal_slab(reference, v.position_mm)
                centre = slab.TransformContinuousIndexToPhysicalPoint(
                    tuple((n - 1) / 2.0 for n in slab.GetSize())
                )
                session_z = float(transform.TransformPoint(centre)[2])
                if v.plane == "axial" and not covers_z(dseg_lps, session_z):
                    zs = slice_z_positions_mm(dseg_lps)
                    fig.notes.append(
                        f"this session does not cover the position (z = {session_z:.1f} mm in "
                        f"its coordinates; it covers {zs.min():.1f} to {zs.max():.1f} mm)"
                    )
                    pending[v.key].append(fig)
                    continue
                fl = resample_to_slab(fluid, slab, transform, is_label=False)
                lb = resample_to_slab(dseg, slab, transform, is_label=True)
                t1s = None if t1 is None else resample_to_slab(t1, slab, transform, is_label=False)
                if v.plane == "axial":
                    a = radiological_axial_slice(fl, v.position_mm)
                    pending[v.key].append(
                        _Pending(
                            fig,
                            a.pixels,
                            None if t1s is None else radiological_axial_slice(t1s, a.z_mm).pixels,
                            radiological_axial_slice(lb, a.z_mm).pixels,
                            a.spacing_rc_mm,
                            None,
                            session_z,
                            float(centre[2]),
                        )
                    )
                else:
                    c = radiological_coronal_slice(fl)
                    pending[v.key].append(
                        _Pending(
                            fig,
                            c.pixels,
                            None if t1s is None else radiological_coronal_slice(t1s).pixels,
                            radiological_coronal_slice(lb).pixels,
                            c.spacing_rc_mm,
                            c.row_z_mm,
                            None,
                            float(centre[1]),
                        )
                    )
            except Exception as exc:
                log.warning("%s of %s failed: %s", v.title, titles[i], exc)
                fig.error = f"{type(exc).__name__}: {exc}"
                pending[v.key].append(fig)
        del fluid, dseg, dseg_lps, t1

    # pass 3: one crop per view (union of all sessions' labels), then render
    axial_marks = [(v.position_mm, v.key) for v in views if v.plane == "axial"]
    for v in views:
        items = pending[v.key]
        spacing = next((p.spacing_rc_mm for p in items if isinstance(p, _Pending)), (1.0, 1.0))
        rows, cols = crop_box(
            [p.lab > 0 for p in items if isinstance(p, _Pending)], spacing, margin_mm=15.0
        )
        for p in items:
            if isinstance(p, FigureResult):
                v.figures.append(p)
                continue
            fig = p.figure
            try:
                panels = [(p.fluid[rows, cols], "fluid-sensitive")]
                if p.t1 is not None:
                    panels.append((p.t1[rows, cols], "T1-weighted"))
                marks: list[tuple[float, str, str]] = []
                if p.row_z_mm is not None:
                    z_rows = p.row_z_mm[rows]
                    idx = np.arange(z_rows.size, dtype=float)
                    for z, key in axial_marks:
                        if z is not None:
                            label = "lesion centre" if key == "lesion" else "largest swelling"
                            marks.append((_z_to_row(z_rows, idx, z), label, "-"))
                    if extent_z_mm is not None:
                        for z in extent_z_mm:
                            marks.append((_z_to_row(z_rows, idx, z), "", "--"))
                fig.png_base64 = render_panels(
                    panels, p.lab[rows, cols], p.spacing_rc_mm, v.plane, marks
                )
                if v.plane == "axial":
                    fig.caption = (
                        f"Axial slice at baseline z = {p.base_mm:.1f} mm (nearest slice to "
                        f"{v.position_mm:.1f} mm: {v.why}); "
                        f"z = {p.session_z_mm:.1f} mm in this session's scanner coordinates. "
                        "Resampled into baseline space through the session's rigid registration "
                        "(labels nearest neighbour). Radiological convention: patient's right on "
                        "the viewer's left, anterior up."
                    )
                else:
                    fig.caption = (
                        f"Coronal reformat at baseline y = {p.base_mm:.1f} mm ({v.why}), "
                        "resampled through the session's registration. Superior up, patient's "
                        "right on the viewer's left, physical aspect ratio "
                        f"({p.spacing_rc_mm[0]:.1f} mm slices × {p.spacing_rc_mm[1]:.1f} mm "
                        "pixels). Magenta lines: the axial positions above; dashed: the common "
                        "extent over which volumes are counted."
                    )
            except Exception as exc:
                log.warning("%s of %s failed: %s", v.title, fig.title, exc)
                fig.error = f"{type(exc).__name__}: {exc}"
            v.figures.append(fig)
    return views


def _z_to_row(z_rows: np.ndarray, idx: np.ndarray, z_mm: float) -> float:
    """Fractional display row of physical `z_mm` (rows run superior to inferior)."""
    if z_rows.size < 2:
        return 0.0 if z_rows.size else -1.0
    step = float(z_rows[1] - z_rows[0])
    return float(idx[0] + (z_mm - float(z_rows[0])) / step) if step else -1.0


# --------------------------------------------------------------------------------------------
# QC flags (summary.json ``qc_flags``, the ``qc`` column of the tables): what the image cannot
# show is said, never measured. Read tolerantly: a summary from before the flags has none, and
# a code added later still shows (with its code as its meaning).
# --------------------------------------------------------------------------------------------

NOT_AVAILABLE = "not available"
_NO_CODES = ("", "n/a", "none")


@dataclass(frozen=True)
class FlagView:
    """One QC flag as the report shows it."""

    session: str
    side: str
    code: str
    severity: str  # 'exclude' or 'warn'
    message: str
    slices: tuple[int, ...] = ()

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(labels.SIDES) if self.side not in labels.SIDE_OFFSET else (self.side,)

    @property
    def meaning(self) -> str:
        return qc.MEANING.get(self.code, self.code.replace("_", " "))


def read_flags(summary: Mapping[str, Any], notes: list[str]) -> list[FlagView] | None:
    """The QC flags of `summary`; None when it predates them (no ``qc_flags`` key).

    A malformed entry is not dropped silently: it is named in `notes`.
    """
    raw = summary.get("qc_flags")
    if raw is None:
        return None
    if not isinstance(raw, list):
        notes.append(f"summary.json: qc_flags is not a list ({type(raw).__name__}): ignored")
        return []
    flags = []
    for item in raw:
        if not isinstance(item, Mapping) or not item.get("code"):
            notes.append(f"summary.json: a QC flag without a code was ignored: {str(item)[:120]}")
            continue
        slices = item.get("slices") or []
        flags.append(
            FlagView(
                session=str(item.get("session", "")),
                side=str(item.get("side", qc.BOTH)),
                code=str(item["code"]),
                # anything but an explicit warn counts as exclude: never over-trust a number
                severity="warn" if str(item.get("severity", "")).lower() == "warn" else "exclude",
                message=str(item.get("message", "")),
                slices=tuple(int(k) for k in slices if _to_int(k) is not None)
                if isinstance(slices, list)
                else (),
            )
        )
    return flags


def _split_codes(value: Any) -> list[str]:
    """QC codes of a table's ``qc`` cell (comma-separated; 'n/a' or empty when none)."""
    codes = [c.strip() for c in str(value or "").split(",")]
    return [c for c in codes if c.lower() not in _NO_CODES]


def _merge(*code_lists: Sequence[str]) -> list[str]:
    out: list[str] = []
    for codes in code_lists:
        out.extend(c for c in codes if c not in out)
    return out


@dataclass
class QCIndex:
    """Which (session, side, structure) an exclude flag makes not available, and why.

    Mirrors :func:`pipeline.qc.unavailable`, tolerant of codes it does not know (those remove
    every structure). Tables name sessions by study date; flags by session label.
    """

    flags: list[FlagView] | None
    session_of_date: dict[str, str]
    gone: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.flags or []:
            if f.severity != "exclude":
                continue
            for side in f.sides:
                for s in qc.EXCLUDED_STRUCTURES.get(f.code, labels.STRUCTURES):
                    codes = self.gone.setdefault((f.session, side, s), [])
                    if f.code not in codes:
                        codes.append(f.code)

    def session(self, date: Any) -> str:
        d = str(date or "")
        return self.session_of_date.get(d, d.replace("-", ""))

    def unavailable(
        self, date: Any, sides: Sequence[str], structure: str, row_qc: Any = None
    ) -> list[str]:
        """Codes that make `structure` of `sides` at `date` not available. Without flags in
        the summary (an older one), the row's own ``qc`` column is taken as the reason."""
        if self.flags is None:
            return _split_codes(row_qc)
        ses = self.session(date)
        return _merge(*(self.gone.get((ses, side, structure), []) for side in sides))

    def codes(self, session: str, side: str | None = None) -> list[str]:
        """Codes of any severity raised for `session` (and `side`), in order."""
        return _merge(
            [
                f.code
                for f in self.flags or []
                if f.session == session and (side is None or side in f.sides)
            ]
        )

    def flagged_sessions(self, severity: str) -> set[str]:
        """Labels of the sessions with a flag of `severity`."""
        return {f.session for f in self.flags or [] if f.severity == severity}

    def n(self, severity: str) -> int:
        return sum(1 for f in self.flags or [] if f.severity == severity)

    def session_excluded(self, session: Mapping[str, Any]) -> bool:
        """Marked excluded in summary.json, or every structure of both sides not available."""
        label = str(session.get("session", ""))
        return session.get("excluded") is True or all(
            (label, side, s) in self.gone for side in labels.SIDES for s in labels.STRUCTURES
        )


@dataclass(frozen=True)
class Cell:
    """A table value; ``reason`` holds the QC codes when it is not available.

    ``ci`` is the half-width of its 95 % interval, formatted ('' when not known: nothing
    extra is shown, never "± n/a"); ``within_error`` marks a change from baseline inside its
    MDC95.
    """

    text: str
    reason: str = ""
    note: int | None = None
    ci: str = ""
    within_error: bool = False

    def __str__(self) -> str:
        return f"{self.text} ± {self.ci}" if self.ci else self.text


@dataclass
class Footnotes:
    """Numbered reasons of the 'not available' cells of one table."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def mark(self, codes: Sequence[str]) -> int:
        reason = ", ".join(codes)
        for item in self.items:
            if item["reason"] == reason:
                return int(item["n"])
        words = "; ".join(qc.MEANING.get(c, c) for c in codes)
        self.items.append({"n": len(self.items) + 1, "reason": reason, "meaning": words})
        return len(self.items)


def value_cell(
    value: Any,
    codes: Sequence[str],
    notes: Footnotes,
    digits: int = 1,
    signed: bool = False,
    ci: Any = None,
    within_error: bool = False,
) -> Cell:
    """A formatted number; 'not available' with its QC codes when missing for a QC reason
    (never 0), plain 'n/a' when missing for another (no contralateral limb, no baseline).

    `ci` (half-width of the 95 % interval, same unit) is shown as "± ci" only with a value
    and a known interval; `within_error` marks the value as a change within its MDC95.
    """
    text = _fmt(value, digits, signed)
    if text != "n/a":
        half = _to_float(ci)
        return Cell(text, ci="" if half is None else _fmt(abs(half), digits),
                    within_error=within_error)
    if not codes:
        return Cell(text)
    return Cell(NOT_AVAILABLE, ", ".join(codes), notes.mark(codes))


def _session_day(session_info: Mapping[str, tuple[str, str]], session: str) -> tuple[str, str]:
    return session_info.get(session, (session or "?", "?"))


def flag_box(
    index: QCIndex,
    session_info: Mapping[str, tuple[str, str]],
    sessions: Sequence[Mapping[str, Any]],
) -> dict[str, Any] | None:
    """The QC box at the top of the report; None for a summary without ``qc_flags``."""
    if index.flags is None:
        return None
    order = {ses: i for i, ses in enumerate(session_info)}
    rows = []
    for f in sorted(
        index.flags,
        key=lambda f: (order.get(f.session, len(order)), f.session, f.severity != "exclude",
                       f.side, f.code),
    ):
        date, day = _session_day(session_info, f.session)
        side = "both sides" if f.side == qc.BOTH else f.side
        rows.append({"date": date, "day": day, "side": side, "code": f.code,
                     "meaning": f.meaning, "severity": f.severity, "message": f.message})
    excluded = [
        f"{s.get('study_date', '?')} (day {s.get('day', '?')})"
        for s in sessions
        if s.get("excluded") is True
    ]
    return {"rows": rows, "n_exclude": index.n("exclude"), "n_warn": index.n("warn"),
            "excluded_sessions": excluded}


def pattern_headline(classification: str, index: QCIndex) -> tuple[str, str]:
    """The pattern phrase and, when an exclude flag exists, what it rests on."""
    phrase = PATTERN_PHRASES.get(classification, f"Pattern: {classification}")
    n = index.n("exclude")
    if not n:
        return phrase, ""
    if classification == "indeterminate":
        return (
            "Pattern indeterminate (what passed quality control cannot decide)",
            f"{n} exclude flag(s): the sessions or structures they name are not measured; "
            "see the QC flags below.",
        )
    return (
        phrase,
        f"Rests only on what passed quality control: {n} exclude flag(s) remove sessions or "
        "structures from it (QC flags below).",
    )


def figure_qc_labels(index: QCIndex, session: str) -> list[dict[str, str]]:
    """Caption labels of a session's overlay: 'excluded: <code>' first, then warnings."""
    out = []
    for f in index.flags or []:
        if f.session != session:
            continue
        text = f"{'excluded' if f.severity == 'exclude' else 'QC warning'}: {f.code}"
        if f.side != qc.BOTH:
            text += f" ({f.side})"
        item = {"severity": f.severity, "text": text, "meaning": f.meaning}
        if item not in out:
            out.append(item)
    return sorted(out, key=lambda d: d["severity"] != "exclude")


def unavailable_days(index: QCIndex, sessions: Sequence[Mapping[str, Any]]) -> set[int]:
    """Days of sessions with an exclude flag or marked excluded (timeline bands)."""
    flagged = index.flagged_sessions("exclude")
    days = set()
    for s in sessions:
        day = _to_int(s.get("day"))
        if day is not None and (s.get("excluded") is True or str(s.get("session")) in flagged):
            days.add(day)
    return days


def drop_unavailable_csa(
    rows: Sequence[dict[str, str]], index: QCIndex
) -> tuple[list[dict[str, str]], list[str]]:
    """Profile rows without the (session, side) whose limb is not available; the sessions
    left out, for the caption."""
    kept, dropped = [], []
    for r in rows:
        ses, side = str(r.get("session", "")), str(r.get("side", ""))
        if index.gone.get((ses, side, "limb")):
            if ses not in dropped:
                dropped.append(ses)
            continue
        kept.append(r)
    return kept, dropped


def qc_legend() -> list[dict[str, str]]:
    """Every QC code with its meaning (QC section)."""
    return [{"code": c, "meaning": m} for c, m in qc.MEANING.items()]


# --------------------------------------------------------------------------------------------
# Uncertainty and confirmation (summary.json ``session_states`` and ``confirmation``, the
# ``*_ci95`` columns of the tables): what lies beyond measurement error, and what a later scan
# confirmed. Read tolerantly: outputs from before them render as before.
# --------------------------------------------------------------------------------------------

#: CSS class of each session state's badge (docs/design.md "Confirmation in time").
STATE_CLASSES: dict[str, str] = {
    "baseline": "baseline",
    "no change": "no-change",
    "unconfirmed flare": "unconfirmed",
    "confirmed flare": "confirmed",
    "resolved": "resolved",
    "not assessable": "not-assessable",
}
#: What each state means (badge tooltip and Methods), with the iRECIST / LYRIC equivalent.
STATE_MEANINGS: dict[str, str] = {
    "baseline": "the reference session (the last on or before day 0)",
    "no change": "no flare criterion beyond its threshold and its MDC95 (iRECIST iSD, LYRIC SD)",
    "unconfirmed flare": "a flare not (yet) confirmed by a later scan (iRECIST iUPD, LYRIC IR)",
    "confirmed flare": "still flaring on a scan at least the minimum interval after the first "
    "flare of the episode (iRECIST iCPD)",
    "resolved": "back within the resolution criteria after a flare (iUPD not confirmed)",
    "not assessable": "cannot be compared with the baseline (QC exclusion, or before baseline)",
}
FLARE_STATES = ("unconfirmed flare", "confirmed flare")
_END_STATES = ("no change", "resolved")


def _state_class(state: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", state.lower()).strip("-")
    return STATE_CLASSES.get(state, slug or "unknown")


def _texts(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v is not None and str(v)]
    return [str(value)] if value else []


def _day_key(day: Any, date: Any = "") -> tuple[int, str]:
    d = _to_int(day)
    return (d if d is not None else 10**9, str(date))


def session_state_rows(
    summary: Mapping[str, Any], notes: list[str]
) -> list[dict[str, Any]] | None:
    """Rows of the "Sessions against day 0" table, by day; None for a summary without
    ``session_states`` (older outputs). A malformed entry is named in `notes`."""
    raw = summary.get("session_states")
    if raw is None:
        return None
    if not isinstance(raw, list):
        notes.append(f"summary.json: session_states is not a list ({type(raw).__name__}): "
                     "ignored")
        return []
    baseline = str(summary.get("baseline_study_date", ""))
    rows = []
    for item in raw:
        if not isinstance(item, Mapping):
            notes.append(f"summary.json: a session state was ignored: {str(item)[:120]}")
            continue
        state = str(item.get("state") or "not recorded")
        rows.append(
            {
                "study_date": str(item.get("study_date", "?")),
                "day": str(item.get("day", "?")),
                "timing": str(item.get("timing") or ""),
                "state": state,
                "state_class": _state_class(state),
                "state_meaning": STATE_MEANINGS.get(state, state),
                "criteria": _texts(item.get("criteria")),
                "within_error": _texts(item.get("within_measurement_error")),
                "note": str(item.get("note") or ""),
                "is_baseline": str(item.get("study_date")) == baseline,
            }
        )
    return sorted(rows, key=lambda r: _day_key(r["day"], r["study_date"]))


def _episodes(
    states: Sequence[Mapping[str, Any]],
) -> list[tuple[list[Mapping[str, Any]], Mapping[str, Any] | None]]:
    """Flare episodes: (the flaring sessions, the session that ended it or None while open).
    A session without any flare ends an episode; one not assessable does not."""
    out: list[tuple[list[Mapping[str, Any]], Mapping[str, Any] | None]] = []
    current: list[Mapping[str, Any]] = []
    for st in states:
        if st["state"] in FLARE_STATES:
            current.append(st)
        elif st["state"] in _END_STATES and current:
            out.append((current, st))
            current = []
    if current:
        out.append((current, None))
    return out


def _days(states: Sequence[Mapping[str, Any]]) -> str:
    days = [str(s["day"]) for s in states]
    if len(days) == 1:
        return f"day {days[0]}"
    return f"days {', '.join(days[:-1])} and {days[-1]}"


def confirmation_headline(
    summary: Mapping[str, Any], classification: str, states: Sequence[Mapping[str, Any]] | None
) -> dict[str, str] | None:
    """The confirmation next to the pattern: ``{status, text, detail, alert}``; None when
    there is nothing to confirm (``not applicable``) or the summary predates confirmation.

    ``alert`` is set for a progression that is not confirmed: the report must not let it read
    as established progression (iRECIST iUPD, LYRIC indeterminate response).
    """
    conf = str(summary.get("confirmation") or "").strip().lower()
    if not conf or conf == "not applicable":
        return None
    states = states or []
    n = _to_int((summary.get("thresholds") or {}).get("confirmation_min_interval_days"))
    gap = f"at least {n} days" if n is not None else "some days"
    episodes = _episodes(states)
    if conf == "confirmed":
        first = next((s for s in states if s["state"] == "confirmed flare"), None)
        if first is None:
            return {"status": "confirmed", "text": "Flare confirmed", "detail": "", "alert": ""}
        return {"status": "confirmed", "text": f"Flare confirmed on day {first['day']}",
                "detail": first.get("note", ""), "alert": ""}
    if conf != "unconfirmed":
        return {"status": _state_class(conf), "text": f"Confirmation: {conf}", "detail": "",
                "alert": ""}
    flares, end = episodes[-1] if episodes else ([], None)
    start = _to_int(flares[0]["day"]) if flares else None
    by = f" (day {start + n} or later)" if start is not None and n is not None else ""
    if end is None:
        text = "Flare not confirmed: a later scan must confirm it"
        detail = (f"flaring on {_days(flares)}; a scan {gap} after the first flare{by} that "
                  "still flares confirms it" if flares else "")
    else:
        text = "Flare not confirmed"
        detail = (f"flaring on {_days(flares)}, never still flaring {gap} after the first "
                  f"flare; {end['state']} on day {end['day']}")
    alert = ""
    if classification == "progression":
        last = flares[-1]["day"] if flares else "?"
        when = (f"A scan on day {start + n} or later ({gap} after the first flare, day "
                f"{start})" if start is not None and n is not None else "A later scan")
        alert = (
            f"UNCONFIRMED: progression is not established. The flare at the last session "
            f"(day {last}) has not been confirmed by a later scan (iRECIST iUPD, LYRIC "
            f"indeterminate response). {when} that still flares would confirm it; one back "
            "at baseline would make it a pseudo-progression."
        )
    return {"status": "unconfirmed", "text": text, "detail": detail, "alert": alert}


def _span(values: Iterable[float | None], digits: int = 1) -> str | None:
    """'lo–hi' (or one value) of the finite `values`; None without any."""
    vals = sorted(v for v in values if v is not None and math.isfinite(v))
    if not vals:
        return None
    lo, hi = _fmt(vals[0], digits), _fmt(vals[-1], digits)
    return lo if lo == hi else f"{lo}–{hi}"


def _ci_values(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    return [v for r in rows for k, x in r.items()
            if str(k).endswith("_ci95") for v in [_to_float(x)] if v is not None]


def uncertainty_methods(
    longitudinal: Sequence[Mapping[str, Any]],
    volumes: Sequence[Mapping[str, Any]],
    thresholds: Mapping[str, Any],
    baseline_date: str,
    states: Sequence[Mapping[str, Any]] | None,
) -> list[str]:
    """The Methods paragraphs on measurement uncertainty and confirmation, with this subject's
    numbers (intervals, MDC95, thresholds) taken from its tables and summary."""
    paragraphs: list[str] = []
    has_columns = any(str(k).endswith("_ci95") for r in [*longitudinal, *volumes] for k in r)
    cis = _ci_values(longitudinal) + _ci_values(volumes)
    if not has_columns:
        paragraphs.append(
            "These outputs carry no measurement uncertainty (written by a version without "
            "it): values are shown without intervals, and the clinical thresholds alone "
            "decided each flare criterion."
        )
    elif not cis:
        paragraphs.append(
            "No 95 % interval is known for any value of this subject (no repeatability model "
            "for its structures): the clinical thresholds alone decided each flare criterion."
        )
    elif not any(c > 0 for c in cis):
        paragraphs.append(
            "The repeatability model in use gives a 95 % interval of 0 for every value of "
            "this subject: it has not been fitted to a scan–rescan study, so no measurement "
            "error is accounted for and the clinical thresholds alone decided each flare "
            "criterion (every MDC95 below reads 0)."
        )
    if has_columns and cis:
        def col(structure: str, column: str, baseline: bool | None = None) -> list[float | None]:
            return [_to_float(r.get(column)) for r in longitudinal
                    if r.get("structure") == structure
                    and (baseline is None or (r.get("study_date") == baseline_date) == baseline)]

        rel = _span(100.0 * c / v for r in volumes if r.get("structure") == "soft_tissue"
                    for v, c in [(_to_float(r.get("volume_ml")),
                                  _to_float(r.get("volume_ml_ci95")))]
                    if v and c is not None)
        base = next((r for r in longitudinal if r.get("study_date") == baseline_date
                     and r.get("structure") == "soft_tissue"), None)
        parts = []
        if rel:
            parts.append(f"±{rel} % of a soft-tissue volume")
        if base is not None and _to_float(base.get("affected_ml_ci95")) is not None:
            parts.append(f"affected soft tissue at baseline {_fmt(base.get('affected_ml'))} ± "
                         f"{_fmt(base.get('affected_ml_ci95'))} mL")
        for structure, name in (("marrow_lesion", "marrow lesion"), ("edema", "edema")):
            s = _span(col(structure, "affected_ml_ci95"))
            if s:
                parts.append(f"{name} of the affected side ±{s} mL")
        asym = _span(col("soft_tissue", "asymmetry_pct_ci95"))
        if asym:
            parts.append(f"soft-tissue asymmetry ±{asym} pp")
        paragraphs.append(
            "Each value is shown with its 95 % interval (value ± half-width; the half-width is "
            "1.96 × the standard deviation of one measurement). That standard deviation comes "
            "from the repeatability model of the scan–rescan study (benchmarks/repeatability.py):"
            " the same anatomy imaged again with no true change (new noise, repositioning, "
            "other slice positions and thickness, other bias field) and measured by the whole "
            "workflow; per structure it is fitted as a function of the volume, the pixel size, "
            "the slice thickness and the residual misregistration to the baseline. Asymmetry "
            "and change from baseline are ratios of two volumes: their intervals follow by "
            "first-order error propagation, the two volumes independent."
            + (f" For this subject: {'; '.join(parts)}." if parts else "")
        )
        mdc = []
        s = _span(col("soft_tissue", "asymmetry_change_pp_ci95", baseline=False))
        if s:
            mdc.append(f"soft-tissue asymmetry change {s} pp")
        for structure, name in (("marrow_lesion", "marrow-lesion"), ("edema", "edema")):
            base_ci = next(iter(col(structure, "affected_ml_ci95", baseline=True)), None)
            s = _span(None if c is None or base_ci is None else math.hypot(c, base_ci)
                      for c in col(structure, "affected_ml_ci95", baseline=False))
            if s:
                mdc.append(f"{name} volume change {s} mL")
        t = {k: _to_float(v) for k, v in thresholds.items()}
        limits = []
        if t.get("flare_asymmetry_pp") is not None:
            limits.append(f"soft-tissue asymmetry +{t['flare_asymmetry_pp']:g} pp")
        for key, name in (("lesion", "marrow lesion"), ("edema", "edema")):
            ratio, least = t.get(f"flare_{key}_ratio"), t.get(f"flare_{key}_min_ml")
            if ratio is not None and least is not None:
                limits.append(f"{name} ×{ratio:g} and +{least:g} mL")
        within = [f"day {st['day']}: {w}" for st in states or [] for w in st["within_error"]]
        paragraphs.append(
            "The 95 % interval of a change between a session and the baseline is its minimal "
            "detectable change, MDC95 = 1.96 √(sd₁² + sd₂²) (the repeatability coefficient when "
            "both are measured alike)"
            + (f"; for this subject: {'; '.join(mdc)}" if mdc else "")
            + ". A flare criterion counts only when its change exceeds both its clinical "
            "threshold"
            + (f" ({'; '.join(limits)}; see Thresholds)" if limits else " (see Thresholds)")
            + " and its MDC95. A change above the threshold but within its MDC95 is reported as "
            "“within measurement error” and does not count"
            + (f" ({len(within)} for this subject: {'; '.join(within)})." if within
               else " (none for this subject).")
            + " Resolution and response accept a return to baseline within measurement error;"
            " a response needs its decrease beyond the MDC95. In the tables, “within "
            "measurement error” marks a change from baseline whose size does not exceed its "
            "MDC95; in the timeline such sessions have hollow markers."
        )
    n = _to_int(thresholds.get("confirmation_min_interval_days"))
    crs = _to_int(thresholds.get("crs_window_days"))
    if states is not None:
        gap = f"at least {n} days" if n is not None else "at least the configured interval"
        paragraphs.append(
            "Confirmation in time (iRECIST, Seymour et al. 2017; LYRIC, Cheson et al. 2016): the "
            "first session of an episode that flares is an unconfirmed flare (iUPD; LYRIC "
            f"indeterminate response); a later session {gap} after the episode's first flare "
            "that still flares is a confirmed flare (iCPD). A session without any flare "
            "criterion ends the episode: resolved when it is back within the resolution "
            "criteria, else no change; a later flare opens a new episode. A progression whose "
            "last flare is not confirmed is reported as UNCONFIRMED. Each session is placed "
            "against day 0 (the infusion)"
            + (f", the CRS window (days 1–{crs})" if crs is not None else "")
            + " and the clinical events."
        )
    return paragraphs



# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


#: Keys that would carry protected health information; never rendered unless show_phi.
PHI_KEY_RE = re.compile(
    r"patient.?(name|id|birth|sex|age|address|telephone)|birth.?date|other.?patient|"
    r"referring.?physician|institution.?address|accession",
    re.I,
)


def is_phi_key(key: str) -> bool:
    """Whether a (possibly dotted) key names patient-identifying data (PatientName, ...)."""
    return bool(PHI_KEY_RE.search(key.replace("_", "").replace(" ", "")))


def _registration_of(
    subject_dir: Path, summary: Mapping[str, Any], sessions: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Registration results per session label: summary.json first, else the ``_xfm.json``."""
    out: dict[str, Any] = dict(summary.get("registration") or {})
    for s in sessions:
        label = str(s.get("session", ""))
        if not label or label in out:
            continue
        tfm = _xfm_path(subject_dir, s)
        js = tfm.with_suffix(".json") if tfm is not None else None
        if js is not None and js.exists():
            try:
                out[label] = json.loads(js.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
    return out


def _vector(values: Any, digits: int = 2) -> str:
    if not isinstance(values, list | tuple) or not values:
        return "n/a"
    return ", ".join(_fmt(v, digits, signed=True) for v in values)


def _registration_table(
    sessions: Sequence[Mapping[str, Any]], registration: Mapping[str, Any], baseline_date: str
) -> list[dict[str, Any]]:
    table = []
    for s in sessions:
        label = str(s.get("session", ""))
        row: dict[str, Any] = {
            "study_date": str(s.get("study_date", "")),
            "day": str(s.get("day", "")),
            "is_baseline": str(s.get("study_date")) == baseline_date,
        }
        reg = registration.get(label)
        if row["is_baseline"]:
            row.update(status="reference (baseline)", poor=False)
        elif not reg:
            row.update(status="no registration result found", poor=True)
        else:
            q = reg.get("quality") or {}
            poor = bool(reg.get("poor"))
            row.update(
                translation=_vector(reg.get("translation_mm")),
                rotation=_vector(reg.get("rotation_deg")),
                bone_dice=_fmt(q.get("bone_dice"), 3),
                limb_dice=_fmt(q.get("limb_dice"), 3),
                centroid=_fmt(q.get("centroid_distance_mm"), 2),
                z_vs_profile=_fmt(q.get("z_vs_bone_profile_mm"), 2, signed=True),
                overlap=_fmt(q.get("overlap_mm"), 0),
                poor=poor,
                status=(
                    "POOR: " + "; ".join(str(r) for r in reg.get("poor_reasons") or [])
                    if poor
                    else "ok"
                ),
                initialisation=str(reg.get("initialisation") or ""),
            )
        table.append(row)
    return table


def _circumference_table(
    rows: Sequence[Mapping[str, Any]], affected: str, session_info: Mapping[str, tuple[str, str]]
) -> list[dict[str, str]]:
    """One row per session and distance: tape (convex hull) and contour circumference, cm."""
    if affected not in labels.SIDE_OFFSET:
        return []
    other = labels.other_side(affected)
    cells: dict[tuple[str, float], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        d = _to_float(r.get("distance_mm"))
        if d is not None:
            cells.setdefault((str(r.get("session", "")), d), {})[str(r.get("side"))] = r
    out = []
    for (ses, d), by_side in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        date, day = session_info.get(ses, (ses, "?"))

        def cm(side: str, column: str, _by: Mapping[str, Mapping[str, Any]] = by_side) -> Any:
            v = _to_float((_by.get(side) or {}).get(column))
            return None if v is None else v / 10.0

        a, c = cm(affected, "hull_circumference_mm"), cm(other, "hull_circumference_mm")
        out.append(
            {
                "study_date": date,
                "day": day,
                "distance_cm": _fmt(d / 10.0, 0, signed=True),
                "affected_cm": _fmt(a),
                "contralateral_cm": _fmt(c),
                "difference_cm": _fmt(None if a is None or c is None else a - c, signed=True),
                "affected_contour_cm": _fmt(cm(affected, "circumference_mm")),
                "contralateral_contour_cm": _fmt(cm(other, "circumference_mm")),
            }
        )
    return out


def build_context(subject_dir: Path, show_phi: bool = False) -> dict[str, Any]:
    """Everything the template needs, read from the outputs in `subject_dir`.

    Parameters
    ----------
    subject_dir : Path
        Folder with ``summary.json`` and the tables and images of one subject.
    show_phi : bool
        Render keys naming patient-identifying data (PatientName, PatientID, birth date...)
        found in the summary's settings/software tables. Off by default; the pipeline does not
        carry such data into its outputs in the first place.

    Returns
    -------
    dict
        Template context (plain strings, lists and dicts; images as base64 PNG).

    Raises
    ------
    FileNotFoundError
        If ``summary.json`` is missing.
    """
    subject_dir = Path(subject_dir)
    summary_path = subject_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(
            f"{summary_path} not found: run the longitudinal stage for this subject first"
        )
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    input_notes: list[str] = []

    longitudinal = _read_optional_tsv(subject_dir / "longitudinal.tsv", input_notes)
    if longitudinal is None:
        input_notes.append("longitudinal.tsv is missing: no volume table or timeline.")
        longitudinal = []
    volumes = _read_optional_tsv(subject_dir / "volumes.tsv", input_notes) or []
    index_rows = _read_optional_tsv(subject_dir / "index.tsv", input_notes)
    problems = _read_optional_tsv(subject_dir / "problems.tsv", input_notes)
    csa_rows = _read_optional_tsv(subject_dir / "profile_csa.tsv", input_notes)
    circ_rows = _read_optional_tsv(subject_dir / "circumference.tsv", input_notes)

    affected = str(summary.get("affected_side", "n/a"))
    source = str(summary.get("affected_side_source", ""))
    source_text = {
        "config": "as configured",
        "configuration": "as configured",
        "auto": "determined automatically from the images",
        "automatic": "determined automatically from the images",
    }.get(source, source)
    classification = str(summary.get("classification", "indeterminate"))
    baseline_date = str(summary.get("baseline_study_date", ""))
    sessions = sorted(summary.get("sessions", []) or [], key=_session_key)
    events = sorted(summary.get("events", []) or [], key=lambda e: _to_int(e.get("day")) or 0)
    thresholds = summary.get("thresholds", {}) or {}
    extent = summary.get("extent_mm") or {}
    z_lo, z_hi = _to_float(extent.get("z_min_mm")), _to_float(extent.get("z_max_mm"))
    extent_z = (z_lo, z_hi) if z_lo is not None and z_hi is not None else None
    unilateral = bool(summary.get("unilateral"))
    registration = _registration_of(subject_dir, summary, sessions)
    session_info = {
        str(s.get("session", "")): (str(s.get("study_date", "?")), str(s.get("day", "?")))
        for s in sessions
    }
    session_titles = {k: f"{d} (day {day})" for k, (d, day) in session_info.items()}
    affected_known = affected if affected in labels.SIDE_OFFSET else None
    index = QCIndex(
        read_flags(summary, input_notes),
        {str(s.get("study_date")): str(s["session"]) for s in sessions if s.get("session")},
    )
    qc_days = unavailable_days(index, sessions)

    figures: list[FigureResult] = []
    timeline = FigureResult(title="Timeline")
    try:
        timeline.png_base64 = render_timeline(
            longitudinal,
            events,
            affected,
            thresholds,
            _to_int(summary.get("baseline_day")),
            qc_days,
        )
        timeline.caption = (
            "Soft-tissue volume of both limbs, soft-tissue and whole-limb asymmetry "
            "(100 × (affected / contralateral − 1)), the soft-tissue asymmetry change from "
            "baseline with the flare threshold, and marrow lesion and edema volume of the "
            "affected side, against day since day 0. Vertical lines: day 0 and clinical events."
        )
        if _ci_values(longitudinal):
            timeline.caption += (
                " Shaded bands and error bars: 95 % interval of each value (repeatability "
                "model, see Methods). Green band around zero in the change panel: ±MDC95, the "
                "change the method cannot tell from measurement error; a flare needs a change "
                "beyond both it and the threshold. Hollow markers: change from baseline within "
                "measurement error."
            )
        if qc_days:
            timeline.caption += (
                " Grey bands: not available at that session (QC exclude flag, see the QC "
                "flags at the top); lines are broken there, not drawn through."
            )
    except Exception as exc:
        log.warning("timeline failed: %s", exc)
        timeline.error = f"{type(exc).__name__}: {exc}"
    figures.append(timeline)

    csa_dropped: list[str] = []
    if csa_rows:
        csa_rows, csa_dropped = drop_unavailable_csa(csa_rows, index)
    swelling = None
    if csa_rows and affected_known and not unilateral:
        try:
            swelling = largest_swelling(csa_rows, affected_known, extent_z)
        except Exception as exc:
            log.warning("largest swelling from profile_csa.tsv: %s", exc)
    profile = FigureResult(title="Cross-sectional area profile")
    if csa_rows is None:
        profile.error = "profile_csa.tsv not found in the subject folder"
    else:
        try:
            profile.png_base64 = render_profile(csa_rows, affected, session_titles, swelling)
            profile.caption = (
                "Limb cross-sectional area per slice (baseline coordinates) against the distance "
                "from each limb's own femoral landmark (proximal positive): affected solid, "
                "contralateral dashed, one colour per session. Bottom: affected minus "
                "contralateral at the same distance. Grey line: landmark; magenta dotted: the "
                "largest swelling shown in the images. A sudden step from one slice to the next "
                "usually means a segmentation error at that level."
            )
            if csa_dropped:
                profile.caption += " Not drawn (limb not available, QC exclude flag): " + (
                    ", ".join(session_titles.get(ses, ses) for ses in csa_dropped) + "."
                )
        except Exception as exc:
            log.warning("profile failed: %s", exc)
            profile.error = f"{type(exc).__name__}: {exc}"
    figures.append(profile)

    views = _overlay_views(
        subject_dir,
        sessions,
        affected_known,
        baseline_date,
        swelling,
        extent_z,
        registration,
        index.flagged_sessions("exclude"),
    )
    for v in views:
        for f in v.figures:
            f.qc_labels = figure_qc_labels(index, f.session)
        figures.extend(v.figures)
    for v in views:
        for f in v.figures:
            f.title = f"{v.title}: {f.title}" if not f.title.startswith(v.title) else f.title

    session_warnings = [
        {"session": str(s.get("study_date", s.get("session", "?"))), "warning": str(w)}
        for s in sessions
        for w in (s.get("warnings") or [])
    ]
    # summary names a used series "<description> (series <number>)" per study date
    used_series = {
        (str(s.get("study_date", "")), str(v))
        for s in sessions
        for v in (s.get("anatomical_series"), s.get("fluid_series"))
        if v
    }
    inputs = summary.get("inputs", {}) or {}
    index_columns = [
        "study_date",
        "series_number",
        "series_description",
        "sequence_class",
        "orientation",
        "n_files",
        "status",
        "reason",
    ]
    landmarks = summary.get("landmarks") or {}

    def flat(mapping: Any) -> list[tuple[str, str]]:
        return [(k, v) for k, v in _flatten(mapping) if show_phi or not is_phi_key(k)]

    pattern_phrase, pattern_qc_note = pattern_headline(classification, index)
    states = session_state_rows(summary, input_notes)
    confirmation = confirmation_headline(summary, classification, states)
    long_notes, vol_notes = Footnotes(), Footnotes()
    long_table = _longitudinal_table(
        longitudinal,
        baseline_date,
        index,
        affected,
        long_notes,
        {str(s.get("study_date", "")) for s in sessions if index.session_excluded(s)},
    )

    return {
        "subject": str(summary.get("subject", subject_dir.name)),
        "patient_fingerprint": str(summary.get("patient_fingerprint") or ""),
        "affected_side": affected,
        "affected_side_source": source_text,
        "day0": str(summary.get("day0", "n/a")),
        "baseline_study_date": baseline_date or "n/a",
        "baseline_day": str(summary.get("baseline_day", "n/a")),
        "classification": classification,
        "pattern_phrase": pattern_phrase,
        "pattern_qc_note": pattern_qc_note,
        "confirmation": confirmation,
        "session_states": states,
        "uncertainty_methods": uncertainty_methods(
            longitudinal, volumes, thresholds, baseline_date, states
        ),
        "has_intervals": bool(_ci_values(longitudinal) or _ci_values(volumes)),
        "within_error_label": WITHIN_ERROR,
        "state_legend": [((name, _state_class(name)), meaning)
                         for name, meaning in STATE_MEANINGS.items()],
        "qc_box": flag_box(index, session_info, sessions),
        "qc_legend": qc_legend(),
        "reasons": [str(r) for r in summary.get("reasons", []) or []],
        "warnings": [str(w) for w in summary.get("warnings", []) or []],
        "session_warnings": session_warnings,
        "sessions": [
            {
                "study_date": str(s.get("study_date", "n/a")),
                "day": str(s.get("day", "n/a")),
                "anatomical_series": str(s.get("anatomical_series") or "n/a"),
                "fluid_series": str(s.get("fluid_series") or "n/a"),
                "is_baseline": str(s.get("study_date")) == baseline_date,
            }
            for s in sessions
        ],
        "events": [
            {k: str(e.get(k, "")) for k in ("day", "date", "label", "category")} for e in events
        ],
        "timeline": timeline,
        "profile": profile,
        "views": views,
        "failed_figures": [f for f in figures if f.error],
        "longitudinal": long_table,
        "longitudinal_notes": long_notes.items,
        "longitudinal_has_qc": any(r["qc"] for r in long_table),
        "circumference": _circumference_table(circ_rows or [], affected, session_info),
        "circumference_found": circ_rows is not None,
        "registration": _registration_table(sessions, registration, baseline_date),
        "n_poor_registrations": sum(
            1 for s in sessions if (registration.get(str(s.get("session", ""))) or {}).get("poor")
        ),
        "extent": {
            "method": str(extent.get("method", "")),
            "z_min_mm": _fmt(extent.get("z_min_mm")),
            "z_max_mm": _fmt(extent.get("z_max_mm")),
            "length_mm": _fmt(extent.get("length_mm")),
        }
        if extent
        else None,
        "landmarks": [
            {
                "side": str(side),
                "z_mm": _fmt((lm or {}).get("z_mm")),
                "method": str((lm or {}).get("method", "")),
            }
            for side, lm in sorted(landmarks.items())
        ],
        "unilateral": unilateral,
        "volumes": _volumes_table(volumes, index, vol_notes),
        "volumes_notes": vol_notes.items,
        "index_columns": index_columns,
        "index_rows": None
        if index_rows is None
        else [
            {
                **{c: str(r.get(c) or "") for c in index_columns},
                "used": _series_used(r, used_series),
            }
            for r in index_rows
        ],
        "problems": problems,
        "input_notes": input_notes,
        "thresholds": flat(thresholds),
        "settings": flat(summary.get("settings", {}) or {}),
        "software": flat(summary.get("software", {}) or {}),
        "n_input_files": str(inputs.get("n_files", "n/a")),
        "input_checksum": str(inputs.get("sha256_of_list", "n/a")),
        "run_date": str(summary.get("run_date", "n/a")),
        "report_version": __version__,
        "label_legend": [
            {
                "value": v,
                "name": labels.LABEL_NAMES[v],
                "color": "#{:02x}{:02x}{:02x}".format(*labels.LABEL_COLORS[v]),
            }
            for v in sorted(labels.LABEL_NAMES)
            if v != labels.BACKGROUND
        ],
    }


def render_html(context: Mapping[str, Any]) -> str:
    """Render the report template with autoescaping on (all file-derived text shows as text)."""
    return html.render(TEMPLATE_NAME, **context)


def build_report(subject_dir: Path, out_path: Path, show_phi: bool = False) -> None:
    """Build the self-contained HTML report of one subject and write it atomically.

    Parameters
    ----------
    subject_dir : Path
        Subject results folder (``summary.json``, ``longitudinal.tsv``, ``volumes.tsv``, session
        images and ``_xfm.tfm``, optional ``index.tsv``, ``problems.tsv``, ``profile_csa.tsv``,
        ``circumference.tsv``).
    out_path : Path
        Where to write the HTML file.
    show_phi : bool
        See :func:`build_context`.
    """
    html = render_html(build_context(Path(subject_dir), show_phi=show_phi))
    write_text_atomic(out_path, html)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m pipeline.report.build --subject-dir D --out D/report.html``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--subject-dir",
        type=Path,
        required=True,
        help="subject results folder containing summary.json",
    )
    parser.add_argument("--out", type=Path, required=True, help="output HTML file")
    parser.add_argument(
        "--show-phi",
        action="store_true",
        help="render patient-identifying keys (name, ID, birth date) if any are present",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_report(args.subject_dir, args.out, show_phi=args.show_phi)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
