"""QC flags: what the image cannot show is said, never measured.

A flag is raised per session and side by the step that can see the problem (segmentation:
field of view, signal, contrast; registration: alignment with the baseline) and travels with
the results to ``summary.json`` (``qc_flags``) and to the tables (column ``qc``).

Each code has one meaning and one consequence, defined here and nowhere else:

=========================== ========= ==========================================================
code                        severity  consequence for the numbers
=========================== ========= ==========================================================
``limb_cut_by_fov``         warn      the limb touches the in-plane edge of the image; volumes
                                      of every session are counted over the region that every
                                      session covers in 3-D, so a clipped session cannot fake a
                                      change (absolute volumes and asymmetry are of that region)
``signal_void_slices``      warn      end slices with coil-edge signal loss, wrap or artefact
                                      are left out of the extent (listed in the message);
                                      ``exclude`` when such slices lie between good ones
``fluid_not_fat_suppressed`` exclude  subcutaneous fat is not darker than muscle on the
                                      fluid-sensitive image: edema and marrow lesion are not
                                      available (empty), limb, soft tissue and bone stay
``anatomical_not_t1_like``  exclude   fat is not brighter than muscle on the anatomical image:
                                      bone and limb outlines cannot be trusted; nothing of the
                                      session is available
``registration_failed``     exclude   the session could not be aligned with the baseline:
                                      nothing of the session is available and it does not
                                      narrow the common extent
``contralateral_from_other_session``
                            warn      the session images the affected limb alone: its
                                      contralateral values come from the nearest session that
                                      images that limb (``contralateral_session`` of
                                      ``longitudinal.tsv``), at most
                                      ``response.contralateral_max_age_days`` away; asymmetry
                                      is against them, their sd x sqrt(2)
``split_series_differ``     warn      the left and right leg come from separate series of the
                                      study (pipeline/io/split.py) that differ in pixel or
                                      slice spacing, slice positions, tilt, receive coil or
                                      tissue signal level enough to bias the comparison of the
                                      legs (listed in the message); nothing is removed
``limb_not_in_view``        warn      the session does not image this side's limb (a follow-up
                                      of the affected leg alone, a one-leg study): its volumes
                                      are not measured, empty (never 0)
``contralateral_too_old``   warn      the session images the affected limb alone and the
                                      nearest session imaging the contralateral limb is more
                                      than ``response.contralateral_max_age_days`` away: no
                                      contralateral value, asymmetry not available
=========================== ========= ==========================================================

An ``exclude`` flag makes its structures *not available*: empty in ``volumes.tsv`` and
``longitudinal.tsv`` (never 0), and left out of the response pattern.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from pipeline.labels import SIDES, STRUCTURES

Severity = Literal["exclude", "warn"]

LIMB_CUT_BY_FOV: Final = "limb_cut_by_fov"
SIGNAL_VOID_SLICES: Final = "signal_void_slices"
FLUID_NOT_FAT_SUPPRESSED: Final = "fluid_not_fat_suppressed"
ANATOMICAL_NOT_T1_LIKE: Final = "anatomical_not_t1_like"
REGISTRATION_FAILED: Final = "registration_failed"
IMAGES_DO_NOT_OVERLAP: Final = "images_do_not_overlap"
CONTRALATERAL_FROM_OTHER_SESSION: Final = "contralateral_from_other_session"
CONTRALATERAL_TOO_OLD: Final = "contralateral_too_old"
SPLIT_SERIES_DIFFER: Final = "split_series_differ"
LIMB_NOT_IN_VIEW: Final = "limb_not_in_view"

#: Structures made not available by an ``exclude`` flag of each code (all: every structure).
EXCLUDED_STRUCTURES: Final[dict[str, tuple[str, ...]]] = {
    LIMB_CUT_BY_FOV: STRUCTURES,
    SIGNAL_VOID_SLICES: STRUCTURES,
    FLUID_NOT_FAT_SUPPRESSED: ("marrow_lesion", "edema"),
    ANATOMICAL_NOT_T1_LIKE: STRUCTURES,
    REGISTRATION_FAILED: STRUCTURES,
    IMAGES_DO_NOT_OVERLAP: STRUCTURES,
    # raised by the longitudinal step, always ``warn``: nothing measured is removed
    CONTRALATERAL_FROM_OTHER_SESSION: (),
    CONTRALATERAL_TOO_OLD: (),
    # raised by the converter, always ``warn``: the legs are measured, the message says why
    # their comparison may be biased
    SPLIT_SERIES_DIFFER: (),
    # raised by measure for a side with no limb in the label map; its volumes are None there
    LIMB_NOT_IN_VIEW: (),
}

#: What each code means for the numbers, in words (README, report legend).
MEANING: Final[dict[str, str]] = {
    LIMB_CUT_BY_FOV: "limb cut by the in-plane edge of the image; every session is measured "
    "over the region all sessions cover",
    SIGNAL_VOID_SLICES: "slices with signal loss or artefact, left out of the extent",
    FLUID_NOT_FAT_SUPPRESSED: "fluid-sensitive image not fat-suppressed: edema and marrow "
    "lesion not available",
    ANATOMICAL_NOT_T1_LIKE: "anatomical image not T1-like (fat not brighter than muscle): "
    "session not measured",
    REGISTRATION_FAILED: "registration to the baseline failed: session not measured",
    IMAGES_DO_NOT_OVERLAP: "the anatomical and fluid images of the session do not overlap in "
    "space: session not segmented, not measured",
    CONTRALATERAL_FROM_OTHER_SESSION: "affected limb alone in the image: the contralateral "
    "reference comes from the nearest session that images it",
    CONTRALATERAL_TOO_OLD: "affected limb alone in the image and no session imaging the "
    "contralateral limb near enough: asymmetry not available",
    SPLIT_SERIES_DIFFER: "left and right leg imaged in separate series that differ (spacing, "
    "slices, coil or signal level): their comparison may be biased",
    LIMB_NOT_IN_VIEW: "this limb is not in the session's images: its volumes are not measured",
}

BOTH: Final = "both"


@dataclass(frozen=True)
class QCFlag:
    """One QC finding of one session (and side, or ``'both'``).

    ``slices`` lists affected slice indices of the session's label map (numpy axis 0 of the
    LPS-oriented array) where the code concerns slices.
    """

    session: str
    side: str
    code: str
    severity: Severity
    message: str
    slices: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.code not in EXCLUDED_STRUCTURES:
            raise ValueError(f"unknown QC code {self.code!r}")
        if self.severity not in ("exclude", "warn"):
            raise ValueError(f"severity must be exclude or warn, not {self.severity!r}")
        if self.side not in (*SIDES, BOTH):
            raise ValueError(f"side must be left, right or both, not {self.side!r}")

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(SIDES) if self.side == BOTH else (self.side,)

    @property
    def excluded_structures(self) -> tuple[str, ...]:
        return EXCLUDED_STRUCTURES[self.code] if self.severity == "exclude" else ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["slices"] = list(self.slices)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], session: str | None = None) -> QCFlag:
        return cls(
            session=str(session if session is not None else d["session"]),
            side=str(d["side"]),
            code=str(d["code"]),
            severity=d["severity"],
            message=str(d["message"]),
            slices=tuple(int(k) for k in d.get("slices", ()) or ()),
        )


def image_sidecar_facts(
        image_paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """What a converter left in the JSON sidecars of NIfTI images composed of two one-leg
    series (:mod:`pipeline.io.split`): their QC flags (``QCFlags``), and per composed image
    the grids of its series (``SplitSeries``; a point is seen only inside one of them:
    :class:`pipeline.extent.FieldOfView`). Nothing for an image without a sidecar."""
    flags: dict[tuple[str, str], dict[str, Any]] = {}
    pieces: list[list[Any]] = []
    for path in map(Path, image_paths):
        sidecar = path.with_name(path.name.removesuffix(".gz").removesuffix(".nii") + ".json")
        if not sidecar.is_file():
            continue
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        role = str(data.get("Role") or path.name)
        for flag in data.get("QCFlags", []):
            # one flag per code and side: the images' findings joined, each named
            key = (flag["code"], flag["side"])
            named = f"{role} image: {flag['message']}"
            if key in flags:
                flags[key]["message"] += f"; {named}"
            else:
                flags[key] = dict(flag, message=named)
        series = (data.get("SplitSeries") or {}).get("series") or {}
        if series:
            pieces.append([part["grid"] for _, part in sorted(series.items())])
    return list(flags.values()), pieces


def flags_from_json(items: Iterable[Mapping[str, Any]], session: str | None = None) -> list[QCFlag]:
    """Flags from their JSON form (``session`` overrides the stored one when given)."""
    return [QCFlag.from_json(d, session) for d in items]


def unavailable(flags: Iterable[QCFlag]) -> dict[tuple[str, str, str], list[str]]:
    """``(session, side, structure) -> [codes]`` for every structure an exclude flag removes."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for f in flags:
        for side in f.sides:
            for s in f.excluded_structures:
                codes = out.setdefault((f.session, side, s), [])
                if f.code not in codes:
                    codes.append(f.code)
    return out


def codes_for(flags: Iterable[QCFlag], session: str, side: str | None = None) -> list[str]:
    """Codes (any severity) raised for `session` (and `side`, when given), in order."""
    out: list[str] = []
    for f in flags:
        if f.session == session and (side is None or side in f.sides) and f.code not in out:
            out.append(f.code)
    return out


def session_excluded(flags: Sequence[QCFlag], session: str) -> bool:
    """True when an exclude flag removes every structure of both sides of `session`."""
    gone = unavailable(flags)
    return all((session, side, s) in gone for side in SIDES for s in STRUCTURES)


def describe(flag: QCFlag) -> str:
    """One line for reasons and logs: ``session 20240301, left: limb_cut_by_fov (warn): ...``."""
    side = "both sides" if flag.side == BOTH else flag.side
    return f"session {flag.session}, {side}: {flag.code} ({flag.severity}): {flag.message}"


# --------------------------------------------------------------------------- image checks
# Pure functions on arrays of shape (Z, Y, X) in the segmentation's LPS-ordered frame (axis 0
# runs inferior to superior). Each returns what it saw; the flags are made from it below.
# The thresholds a user tunes are settings (config/config.yaml, segment:); these are fixed.

#: A slice's signal level: this percentile of the limb's column band, its brightest tissue
#: short of a few hot voxels.
SLICE_SIGNAL_PERCENTILE: Final = 99.0
#: A series' typical level: this percentile of its slices' levels (the coil's sensitive
#: middle, not pulled down by the void slices being looked for).
TYPICAL_LEVEL_PERCENTILE: Final = 75.0
#: The in-plane image edge is this many voxels wide: scanners and converters often pad the
#: matrix with a row or column of zeros, and a limb that close to the edge has no air around
#: it anyway.
EDGE_PX: Final = 2
#: Subcutaneous fat: from this depth (mm) inside the skin (past the skin itself) ...
RING_OUTER_DEPTH_MM: Final = 1.5
#: ... to this depth (mm), thinner than the subcutaneous fat of a limb.
RING_INNER_DEPTH_MM: Final = 5.0
#: The ring is at least one voxel deep and one voxel wide whatever the pixel size.
RING_MIN_OUTER_PX: Final = 1
RING_MIN_INNER_PX: Final = 2
#: Deep tissue (mostly muscle): more than this (mm; at least DEEP_MIN_PX voxels) inside the
#: skin, past any subcutaneous fat ...
DEEP_TISSUE_DEPTH_MM: Final = 15.0
DEEP_MIN_PX: Final = 3
#: ... and this many voxels away from bone (cortex and its partial volume).
BONE_CLEARANCE_PX: Final = 2
#: In-plane 3 x 3 neighbourhood: depths are measured within each slice.
_PLANE: Final = np.ones((1, 3, 3), bool)


def slice_signal(image: NDArray[np.floating[Any]], band: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Per slice, a high percentile (:data:`SLICE_SIGNAL_PERCENTILE`) of `image` inside
    `band` (a column band of one limb, the same in every slice): a robust "brightest tissue"
    level that does not need the limb outline, which is exactly what fails on a slice without
    signal."""
    out = np.zeros(image.shape[0])
    for k in range(image.shape[0]):
        vals = image[k][band[k]]
        out[k] = float(np.percentile(vals, SLICE_SIGNAL_PERCENTILE)) if vals.size else 0.0
    return out


def void_slices(levels: Sequence[NDArray[np.float64]], fraction: float) -> list[int]:
    """Slices whose signal (any of `levels`, one per image) is below `fraction` of that
    image's typical level (:data:`TYPICAL_LEVEL_PERCENTILE` over slices)."""
    bad: set[int] = set()
    for lv in levels:
        ref = float(np.percentile(lv, TYPICAL_LEVEL_PERCENTILE))
        if ref > 0:
            bad.update(int(k) for k in np.nonzero(lv < fraction * ref)[0])
    return sorted(bad)


def _runs(slices: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for k in sorted(slices):
        if runs and k == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs


def format_slices(slices: Sequence[int]) -> str:
    """``[0, 1, 2, 7]`` -> ``'0-2, 7'``."""
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in _runs(slices))


def void_flag(side: str, slices: Sequence[int], n_slices: int, fraction: float,
              *, uncovered: bool = False) -> QCFlag | None:
    """``signal_void_slices`` for one side: ``warn`` when the slices are runs at the ends of
    the series (left out of the extent), ``exclude`` when some lie between good slices.
    `uncovered`: the slices hold no signal at all because the leg's own series does not
    reach them (the legs imaged in separate series, :mod:`pipeline.io.split`), not signal
    loss."""
    if not slices:
        return None
    runs = _runs(slices)
    interior = [r for r in runs if r[0] > 0 and r[1] < n_slices - 1]
    where = format_slices(slices)
    what = ("are not covered by this leg's own series (the legs were imaged in separate "
            "series)" if uncovered else
            f"have signal below {fraction:.0%} of the series' typical level")
    if interior:
        return QCFlag("", side, SIGNAL_VOID_SLICES, "exclude",
                      f"slices {where} of {n_slices} {what}, some between good slices: the "
                      "limb cannot be measured as one piece", tuple(slices))
    why = "" if uncovered else " (coil edge or artefact)"
    return QCFlag("", side, SIGNAL_VOID_SLICES, "warn",
                  f"slices {where} of {n_slices} {what}{why}: left out of the extent",
                  tuple(slices))


def border_contact_slices(limb: NDArray[np.bool_], pixel_mm: float,
                          min_contact_mm: float) -> list[int]:
    """Slices where `limb` runs along the in-plane edge of the image for at least
    `min_contact_mm` (a limb cut by the field of view).

    The edge is the outer :data:`EDGE_PX` voxels; the contact length is the voxels of the
    limb on it over the edge's width.
    """
    edge = np.zeros(limb.shape[1:], bool)
    edge[:EDGE_PX, :] = edge[-EDGE_PX:, :] = edge[:, :EDGE_PX] = edge[:, -EDGE_PX:] = True
    contact = (limb & edge[None]).sum(axis=(1, 2)) * pixel_mm / EDGE_PX
    return [int(k) for k in np.nonzero(contact >= min_contact_mm)[0]]


def fov_flag(side: str, slices: Sequence[int], n_slices: int) -> QCFlag | None:
    """``limb_cut_by_fov`` (warn): volumes then cover the region every session covers."""
    if not slices:
        return None
    return QCFlag("", side, LIMB_CUT_BY_FOV, "warn",
                  f"the limb is cut by the in-plane edge of the image on slices "
                  f"{format_slices(slices)} of {n_slices}: volumes of every session are "
                  "counted over the region that every session covers", tuple(slices))


def subcutaneous_ring(limb: NDArray[np.bool_], pixel_mm: float) -> NDArray[np.bool_]:
    """Voxels 1.5 to 5 mm (:data:`RING_OUTER_DEPTH_MM`, :data:`RING_INNER_DEPTH_MM`) inside
    the skin of `limb`, per slice: mostly subcutaneous fat, whatever the contrast (its
    location, not its signal, defines it)."""
    outer_px = max(RING_MIN_OUTER_PX, round(RING_OUTER_DEPTH_MM / pixel_mm))
    inner_px = max(RING_MIN_INNER_PX, round(RING_INNER_DEPTH_MM / pixel_mm))
    from scipy import ndimage  # here: the table steps read flags only

    outer = ndimage.binary_erosion(limb, _PLANE, iterations=outer_px)
    inner = ndimage.binary_erosion(limb, _PLANE, iterations=inner_px)
    return outer & ~inner


def deep_tissue(limb: NDArray[np.bool_], bone: NDArray[np.bool_],
                pixel_mm: float) -> NDArray[np.bool_]:
    """Voxels more than 15 mm (:data:`DEEP_TISSUE_DEPTH_MM`) inside the skin and away from
    bone: mostly muscle."""
    depth_px = max(DEEP_MIN_PX, round(DEEP_TISSUE_DEPTH_MM / pixel_mm))
    from scipy import ndimage

    deep = ndimage.binary_erosion(limb, _PLANE, iterations=depth_px)
    return deep & ~ndimage.binary_dilation(bone, _PLANE, iterations=BONE_CLEARANCE_PX)


def contrast_ratio(image: NDArray[np.floating[Any]], region: NDArray[np.bool_],
                   reference: NDArray[np.bool_]) -> float | None:
    """Median of `image` in `region` over its median in `reference` (None when either is
    empty or the reference is not positive)."""
    if not region.any() or not reference.any():
        return None
    ref = float(np.median(image[reference]))
    return None if ref <= 0 else float(np.median(image[region])) / ref


def t1_like_flag(ratio: float | None, minimum: float) -> QCFlag | None:
    """``anatomical_not_t1_like`` when subcutaneous fat is darker than muscle on the
    anatomical image: `ratio` is the median of the fat ring over that of the deep tissue."""
    if ratio is None or ratio >= minimum:
        return None
    return QCFlag("", BOTH, ANATOMICAL_NOT_T1_LIKE, "exclude",
                  f"subcutaneous fat is darker than muscle on the anatomical image "
                  f"(fat ring / deep tissue {ratio:.2f} < {minimum:g}): not T1-weighted, "
                  "Dixon in-phase or proton-density-like (fat-suppressed?); bone and limb "
                  "outlines are not trusted, the session is not measured")


def fat_suppression_flag(ratio: float | None, maximum: float) -> QCFlag | None:
    """``fluid_not_fat_suppressed`` when subcutaneous fat is not darker than muscle by
    `maximum` on the fluid-sensitive image."""
    if ratio is None or ratio <= maximum:
        return None
    return QCFlag("", BOTH, FLUID_NOT_FAT_SUPPRESSED, "exclude",
                  f"subcutaneous fat / muscle signal on the fluid-sensitive image is "
                  f"{ratio:.2f} (> {maximum:g}): fat is not suppressed, so fat would read as "
                  "fluid; edema and marrow lesion are not available")
