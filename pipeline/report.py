"""The subject report: one self-contained HTML page per subject.

``python -m pipeline.report --subject-dir D --out D/report.html`` reads the outputs of the
earlier stages in ``D`` (``summary.json``, ``longitudinal.tsv``, ``volumes.tsv``, the per-session
NIfTI images and label maps named in ``summary.json``, and optionally ``index.tsv`` and
``problems.tsv``) and writes one HTML file that needs no network: figures are PNG data URIs, CSS
is inline, there is no JavaScript.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory
from skimage.measure import find_contours

from pipeline import __version__, labels
from pipeline.io_utils import read_tsv, write_text_atomic

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "templates"
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
    """Candidate slice positions of one session, from its label map.

    Attributes
    ----------
    lesion_z_mm : float or None
        Physical z (mm) of the marrow-lesion centroid, None without lesion voxels.
    largest_limb_z_mm : float or None
        Physical z (mm) of the slice with the largest affected-limb area, None without limb.
    """

    lesion_z_mm: float | None
    largest_limb_z_mm: float | None


def slice_candidates(dseg: sitk.Image, affected_side: str | None) -> SliceChoice:
    """Lesion centroid z and largest affected-limb-area z of a label map.

    Parameters
    ----------
    dseg : SimpleITK.Image
        Label map (values of :mod:`pipeline.labels`), any stored orientation.
    affected_side : str or None
        'left' or 'right'; anything else uses both sides.

    Returns
    -------
    SliceChoice
    """
    dseg_lps = orient_lps(dseg)
    lab = sitk.GetArrayViewFromImage(dseg_lps)
    sides = [affected_side] if affected_side in labels.SIDE_OFFSET else list(labels.SIDES)
    lesion_z = None
    # the affected side's lesion first; a lesion on the other side only if there is none
    for lesion_values in (
        [labels.label_value(s, labels.LESION) for s in sides],
        [labels.label_value(s, labels.LESION) for s in labels.SIDES],
    ):
        idx = np.argwhere(np.isin(lab, lesion_values))
        if idx.size:
            cz, cy, cx = idx.mean(axis=0)
            lesion_z = float(
                dseg_lps.TransformContinuousIndexToPhysicalPoint((float(cx), float(cy), float(cz)))[
                    2
                ]
            )
            break
    limb_values = [v for s in sides for v in labels.structure_labels(s, "limb")]
    area = np.isin(lab, limb_values).sum(axis=(1, 2))
    limb_z = None
    if area.max(initial=0) > 0:
        limb_z = float(slice_z_positions_mm(dseg_lps)[int(np.argmax(area))])
    return SliceChoice(lesion_z_mm=lesion_z, largest_limb_z_mm=limb_z)


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


def render_timeline(
    rows: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    affected_side: str,
    thresholds: Mapping[str, Any],
    baseline_day: int | None,
) -> str:
    """Timeline panels (PNG, base64) of volumes and asymmetry against day since day 0.

    Parameters
    ----------
    rows : sequence of mapping
        Rows of ``longitudinal.tsv`` (values may be strings, 'n/a' for missing).
    events : sequence of mapping
        Clinical events with ``day`` and ``label``; drawn as vertical lines.
    affected_side : str
        Used in the legend only.
    thresholds : mapping
        ``flare_asymmetry_pp`` draws the flare threshold on the asymmetry panel.
    baseline_day : int or None
        Day of the baseline session.

    Returns
    -------
    str
        Base64-encoded PNG.
    """
    fig = Figure(figsize=(8.0, 8.6), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    ax_vol, ax_asym, ax_lesion, ax_edema = axes
    plotted = False

    d, aff = _series(rows, "soft_tissue", "affected_ml")
    if d:
        ax_vol.plot(d, aff, "o-", color=AFFECTED_COLOR, label=f"affected ({affected_side})")
        plotted = True
    d, con = _series(rows, "soft_tissue", "contralateral_ml")
    if d:
        ax_vol.plot(d, con, "s--", color=CONTRALATERAL_COLOR, label="contralateral")
    ax_vol.set_ylabel("soft tissue (mL)")

    for structure, style in (("soft_tissue", "o-"), ("limb", "^:")):
        d, asym = _series(rows, structure, "asymmetry_pct")
        if d:
            ax_asym.plot(
                d,
                asym,
                style,
                color=AFFECTED_COLOR if structure == "soft_tissue" else "#999999",
                label=STRUCTURE_TITLES[structure],
            )
            plotted = True
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

    for ax, structure, color, name in (
        (ax_lesion, "marrow_lesion", AFFECTED_COLOR, "marrow lesion"),
        (ax_edema, "edema", EDEMA_COLOR, "edema"),
    ):
        d, vals = _series(rows, structure, "affected_ml")
        if d:
            ax.plot(d, vals, "o-", color=color, label=f"{name}, affected side")
            plotted = True
        ax.set_ylabel(f"{name} (mL)")
        ax.set_ylim(bottom=0)

    if not plotted:
        raise ValueError("longitudinal.tsv has no numeric values to plot")

    marks = _event_marks(events)
    for ax in axes:
        for day in marks:
            ax.axvline(day, color=EVENT_COLOR, linestyle=":" if day else "-", linewidth=0.8)
        ax.grid(True, color="#eeeeee")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, frameon=False)
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


def _draw_panel(ax: Any, sl: AxialSlice, lab: np.ndarray, title: str) -> list[int]:
    vmin, vmax = _window(sl.pixels)
    ax.imshow(
        sl.pixels,
        cmap="gray",
        vmin=vmin,
        vmax=vmax,
        aspect=sl.spacing_rc_mm[0] / sl.spacing_rc_mm[1],
    )
    present = [int(v) for v in np.unique(lab) if v != labels.BACKGROUND]
    for value in present:
        color = _rgb(value)
        mask = np.pad(lab == value, 1).astype(np.float32)
        for contour in find_contours(mask, 0.5):
            ax.plot(contour[:, 1] - 1, contour[:, 0] - 1, color=color, linewidth=0.9)
    ax.set_xlim(-0.5, sl.pixels.shape[1] - 0.5)
    ax.set_ylim(sl.pixels.shape[0] - 0.5, -0.5)
    style = {
        "color": "white",
        "fontsize": 11,
        "fontweight": "bold",
        "transform": ax.transAxes,
        "bbox": {"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"},
    }
    ax.text(0.02, 0.5, "R", ha="left", va="center", **style)
    ax.text(0.98, 0.5, "L", ha="right", va="center", **style)
    ax.text(0.5, 0.98, "A", ha="center", va="top", **style)
    ax.text(0.5, 0.02, "P", ha="center", va="bottom", **style)
    ax.set_title(title, fontsize=9, parse_math=False)
    ax.set_xticks([])
    ax.set_yticks([])
    return present


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
    panels = [(fluid_sl, "fluid-sensitive")]
    if t1 is not None:
        panels.append((radiological_axial_slice(t1, z_mm), "T1-weighted"))
    rows, cols = fluid_sl.pixels.shape
    height_in = 4.2 * (rows * fluid_sl.spacing_rc_mm[0]) / (cols * fluid_sl.spacing_rc_mm[1])
    fig = Figure(
        figsize=(4.2 * len(panels), min(max(height_in, 2.0), 8.0) + 0.8), layout="constrained"
    )
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    present: set[int] = set()
    for ax, (sl, name) in zip(axes, panels, strict=True):
        present.update(_draw_panel(ax, sl, lab, name))
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
    return _figure_to_base64(fig), fluid_sl.z_mm


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


def _longitudinal_table(
    rows: Sequence[Mapping[str, str]], baseline_date: str
) -> list[dict[str, Any]]:
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
        table.append(
            {
                "study_date": str(r.get("study_date", "")),
                "day": str(r.get("day", "")),
                "structure": STRUCTURE_TITLES.get(str(r.get("structure")), str(r.get("structure"))),
                "affected_ml": _fmt(r.get("affected_ml")),
                "contralateral_ml": _fmt(r.get("contralateral_ml")),
                "difference_ml": _fmt(r.get("difference_ml"), signed=True),
                "asymmetry_pct": _fmt(asym, signed=True),
                "asymmetry_change_pp": _fmt(
                    None if asym is None or base is None else asym - base, signed=True
                ),
                "change_from_baseline_pct": _fmt(r.get("change_from_baseline_pct"), signed=True),
                "is_baseline": str(r.get("study_date")) == baseline_date,
            }
        )
    return table


def _overlay_figures(
    subject_dir: Path,
    sessions: Sequence[Mapping[str, Any]],
    affected_side: str | None,
    baseline_date: str,
) -> list[FigureResult]:
    titles = [f"Session {s.get('study_date', '?')} (day {s.get('day', '?')})" for s in sessions]

    # pass 1: candidate slice positions from the label maps only (keeps memory low)
    candidates: dict[int, SliceChoice] = {}
    for i, s in enumerate(sessions):
        try:
            dseg = _read_image(subject_dir, s.get("files", {}).get("dseg"), "label map")
            candidates[i] = slice_candidates(dseg, affected_side)
        except Exception as exc:  # reported per figure in pass 2
            log.info("slice candidates of %s: %s", titles[i], exc)
    base_i = next((i for i, s in enumerate(sessions) if s.get("study_date") == baseline_date), 0)
    ref_z: float | None = None
    ref_what = ""
    order = [base_i] + [i for i in range(len(sessions)) if i != base_i]
    for attr, what in (
        ("lesion_z_mm", "marrow-lesion centre"),
        ("largest_limb_z_mm", "largest affected-limb cross-section"),
    ):
        found = next(
            (j for j in order if j in candidates and getattr(candidates[j], attr) is not None),
            None,
        )
        if found is not None:
            ref_z = getattr(candidates[found], attr)
            ref_what = f"{what} at {sessions[found].get('study_date', '?')}"
            break

    # pass 2: render each session
    results = []
    for i, s in enumerate(sessions):
        fig = FigureResult(title=titles[i])
        try:
            files = s.get("files", {}) or {}
            fluid = _read_image(subject_dir, files.get("fluid"), "fluid-sensitive image")
            dseg = _read_image(subject_dir, files.get("dseg"), "label map")
            fluid_lps = orient_lps(fluid)
            z, why = ref_z, f"common slice: {ref_what}"
            if z is None or not covers_z(fluid_lps, z):
                own = candidates.get(i)
                z = (
                    next(
                        (c for c in (own.lesion_z_mm, own.largest_limb_z_mm) if c is not None), None
                    )
                    if own
                    else None
                )
                why = (
                    "own slice (common position outside this session's coverage)"
                    if ref_z is not None
                    else "own slice"
                )
                if z is None:
                    z = float(np.median(slice_z_positions_mm(fluid_lps)))
                    why = "central slice (no labels found)"
            # work on the one displayed slice: T1 and labels are resampled onto it only,
            # which keeps memory at one slice for 512x512x200 series
            k = nearest_slice_index(fluid_lps, z)
            fluid_slab = fluid_lps[:, :, k : k + 1]
            if same_grid(fluid, dseg):
                dseg_slab = orient_lps(dseg)[:, :, k : k + 1]
            else:
                fig.notes.append(
                    "label map is not on the fluid image grid; resampled "
                    "(nearest neighbour) for display"
                )
                dseg_slab = resample_onto(dseg, fluid_slab, is_label=True)
            del fluid, dseg
            t1_slab = None
            try:
                t1 = _read_image(subject_dir, files.get("t1"), "T1 image")
                t1_slab = resample_onto(t1, fluid_slab, is_label=False)
            except Exception as exc:
                fig.notes.append(f"T1 panel not shown: {exc}")
            fig.png_base64, z_shown = render_overlay(fluid_slab, dseg_slab, t1_slab, z)
            fig.caption = (
                f"Axial slice at z = {z_shown:.1f} mm ({why}). Radiological "
                "convention: patient's right on the viewer's left, anterior up."
            )
        except Exception as exc:
            log.warning("overlay %s failed: %s", titles[i], exc)
            fig.error = f"{type(exc).__name__}: {exc}"
        results.append(fig)
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def build_context(subject_dir: Path) -> dict[str, Any]:
    """Everything the template needs, read from the outputs in `subject_dir`.

    Parameters
    ----------
    subject_dir : Path
        Folder with ``summary.json`` and the tables and images of one subject.

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

    affected = str(summary.get("affected_side", "n/a"))
    source = str(summary.get("affected_side_source", ""))
    source_text = {
        "config": "as configured",
        "auto": "determined automatically from the images",
        "automatic": "determined automatically from the images",
    }.get(source, source)
    classification = str(summary.get("classification", "indeterminate"))
    baseline_date = str(summary.get("baseline_study_date", ""))
    sessions = sorted(summary.get("sessions", []) or [], key=_session_key)
    events = sorted(summary.get("events", []) or [], key=lambda e: _to_int(e.get("day")) or 0)
    thresholds = summary.get("thresholds", {}) or {}

    figures: list[FigureResult] = []
    timeline = FigureResult(title="Timeline")
    try:
        timeline.png_base64 = render_timeline(
            longitudinal, events, affected, thresholds, _to_int(summary.get("baseline_day"))
        )
        timeline.caption = (
            "Soft-tissue volume of both limbs, soft-tissue and whole-limb asymmetry "
            "(100 × (affected / contralateral − 1)), and marrow lesion and edema volume of the "
            "affected side, against day since day 0. Vertical lines: day 0 and clinical events."
        )
    except Exception as exc:
        log.warning("timeline failed: %s", exc)
        timeline.error = f"{type(exc).__name__}: {exc}"
    figures.append(timeline)

    overlays = _overlay_figures(
        subject_dir, sessions, affected if affected in labels.SIDE_OFFSET else None, baseline_date
    )
    figures.extend(overlays)

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

    return {
        "subject": str(summary.get("subject", subject_dir.name)),
        "affected_side": affected,
        "affected_side_source": source_text,
        "day0": str(summary.get("day0", "n/a")),
        "baseline_study_date": baseline_date or "n/a",
        "baseline_day": str(summary.get("baseline_day", "n/a")),
        "classification": classification,
        "pattern_phrase": PATTERN_PHRASES.get(classification, f"Pattern: {classification}"),
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
        "overlays": overlays,
        "failed_figures": [f for f in figures if f.error],
        "longitudinal": _longitudinal_table(longitudinal, baseline_date),
        "volumes": [
            {
                "study_date": r.get("study_date", ""),
                "day": r.get("day", ""),
                "side": r.get("side", ""),
                "role": r.get("role", ""),
                "structure": STRUCTURE_TITLES.get(r.get("structure", ""), r.get("structure", "")),
                "volume_ml": _fmt(r.get("volume_ml")),
            }
            for r in volumes
        ],
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
        "thresholds": _flatten(thresholds),
        "settings": _flatten(summary.get("settings", {}) or {}),
        "software": _flatten(summary.get("software", {}) or {}),
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
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(TEMPLATE_NAME).render(**context)


def build_report(subject_dir: Path, out_path: Path) -> None:
    """Build the self-contained HTML report of one subject and write it atomically.

    Parameters
    ----------
    subject_dir : Path
        Subject results folder (``summary.json``, ``longitudinal.tsv``, ``volumes.tsv``, session
        images, optional ``index.tsv`` and ``problems.tsv``).
    out_path : Path
        Where to write the HTML file.
    """
    html = render_html(build_context(Path(subject_dir)))
    write_text_atomic(out_path, html)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m pipeline.report --subject-dir D --out D/report.html``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--subject-dir",
        type=Path,
        required=True,
        help="subject results folder containing summary.json",
    )
    parser.add_argument("--out", type=Path, required=True, help="output HTML file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_report(args.subject_dir, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
