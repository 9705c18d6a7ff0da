"""One study, two fields of view: the left leg and the right leg in separate series (issue 18).

Sites that image an extremity in a dedicated coil scan one limb at a time, so a study holds the
same sequence twice, once per leg. The method compares each leg with the other, so such a study
is analysed as if both legs had been imaged together:

* **Pairing** (index, :func:`pair_sides`): two usable series of the same class and orientation
  in one study are the left and the right leg when their left-right ranges in patient
  coordinates lie apart (centres at least :data:`MIN_CENTRE_SEPARATION_MM` apart, overlapping
  by at most :data:`MAX_RANGE_OVERLAP_FRACTION` of the narrower). **Which is left comes from
  the geometry** (DICOM LPS: +x is the patient's left), never from the description or the
  Laterality tag; when those say otherwise, a warning names the series
  (:func:`laterality_warnings`).
* **Composition** (convert, :func:`compose`): the session's image is built on the grid of the
  finer series (the *reference*), extended to hold the other one. The reference's voxels are
  copied unchanged; the other series is resampled onto that grid (exactly, by index, when the
  two grids line up; else by cubic B-spline, through-plane too when the slices do not
  coincide). Each voxel comes from the series whose field-of-view centre is nearer in x —
  unless that series shows no tissue there that the other shows (local signal below
  :data:`DARK_FRACTION` of the other's: a swollen leg reaching past the middle, outside the
  other leg's coil) — or from the only series covering it; voxels neither covers are 0.
  Everything
  downstream (segmentation, registration, tables, report, exports) then works per session as
  for a bilateral acquisition.
* **What may bias the comparison** is measured, written to the image's JSON sidecar
  (``SplitSeries``) and raised as the QC flag ``split_series_differ`` (warn): in-plane or
  slice spacing differing by more than :data:`SPACING_TOLERANCE` (partial volume and
  interpolation differ between the legs), slices that do not coincide (one leg interpolated
  across slices), orientations differing by more than :data:`MAX_TILT_DEG`, different
  receive coils, and tissue signal levels differing by more than
  :data:`MAX_SIGNAL_RATIO` (coil or receiver gain: the lesion and edema thresholds compare one
  leg's signal with the other's). A leg touching the in-plane edge of *its own* field of view
  (which lies inside the composed image, where the segmentation's border check cannot see it)
  raises ``limb_cut_by_fov`` for that side here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipeline import qc as qc_mod

#: Two one-leg fields of view have centres at least this far apart from left to right (the
#: knee centres of a small child lie ~70 mm apart); two bilateral acquisitions of one study are
#: shifted by a few mm.
MIN_CENTRE_SEPARATION_MM: Final = 40.0
#: ...and their left-right ranges overlap by at most this fraction of the narrower one (a
#: one-leg field of view is 1.3-1.6 x the leg, so two overlap by a margin at most; a bilateral
#: field of view holds a one-leg one entirely).
MAX_RANGE_OVERLAP_FRACTION: Final = 0.5
#: Grids line up when the other series' voxel centres fall within this fraction of a voxel of
#: the reference grid's (then it is copied by index, not interpolated).
ALIGNED_FRACTION: Final = 0.01
#: In-plane or slice spacings of the two legs differing by more than this (relative) bias the
#: comparison: partial volume at the limb's edge and interpolation differ between the legs.
SPACING_TOLERANCE: Final = 0.10
#: Slices of the two series off by more than this fraction of the slice spacing do not
#: coincide: one leg is interpolated across slices.
SLICE_OFFSET_FRACTION: Final = 0.10
#: Slice normals of the two series more than this apart: the legs are cut at other angles.
MAX_TILT_DEG: Final = 1.0
#: Tissue signal of the two legs' T1-weighted series differing by more than this factor points
#: to another coil or receiver gain (two healthy legs differ by a few per cent; swelling and
#: edema lower T1 tissue signal by ~10 %).
MAX_SIGNAL_RATIO: Final = 1.25

#: Tissue, for the field-of-view edge check: brighter than this fraction of the tissue level
#: (muscle on a T1-weighted image is ~0.4 x fat; background noise is a few per cent).
TISSUE_FRACTION: Final = 0.25

#: Where the two fields of view overlap, the series nearer in x gives a voxel unless its
#: local signal is below this fraction of the other's there (it does not see the tissue the
#: other sees: a leg reaching past the middle, outside the nearer series' coil).
DARK_FRACTION: Final = 0.25
#: In-plane smoothing (mm) of that local signal: a few voxels, so that noise does not decide.
LOCAL_SIGNAL_SIGMA_MM: Final = 2.0

SIDES: Final = ("left", "right")
_SIDE_WORDS: Final = {"left": {"left", "lt", "lft", "l", "links", "sin", "sinistra"},
                      "right": {"right", "rt", "rgt", "r", "rechts", "dex", "dextra"}}
_TAG_SIDE: Final = {"L": "left", "R": "right"}


# --------------------------------------------------------------------------------------------
# pairing (index)
# --------------------------------------------------------------------------------------------

def pair_sides(range_a_mm: Sequence[float] | None,
               range_b_mm: Sequence[float] | None) -> tuple[str, str] | None:
    """The sides of two series from their left-right ranges in LPS x (mm), or None when they
    are not one leg each (a range unknown, centres too close, or ranges overlapping)."""
    if range_a_mm is None or range_b_mm is None:
        return None
    (a0, a1), (b0, b1) = sorted(range_a_mm), sorted(range_b_mm)
    centre_a, centre_b = (a0 + a1) / 2, (b0 + b1) / 2
    if abs(centre_a - centre_b) < MIN_CENTRE_SEPARATION_MM:
        return None
    overlap = max(0.0, min(a1, b1) - max(a0, b0))
    narrower = min(a1 - a0, b1 - b0)
    if narrower <= 0 or overlap > MAX_RANGE_OVERLAP_FRACTION * narrower:
        return None
    return ("left", "right") if centre_a > centre_b else ("right", "left")


def hinted_sides(description: str, laterality_tag: str = "") -> dict[str, str]:
    """What the description and the Laterality tag say about the side: ``{'description':
    side, 'Laterality tag': side}`` for those that name exactly one side."""
    hints: dict[str, str] = {}
    words = set(re.split(r"[^a-z]+", description.lower()))
    named = [side for side, vocabulary in _SIDE_WORDS.items() if words & vocabulary]
    if len(named) == 1:
        hints["description"] = named[0]
    tag = _TAG_SIDE.get(laterality_tag.strip().upper())
    if tag:
        hints["Laterality tag"] = tag
    return hints


def laterality_warnings(side: str, name: str, description: str,
                        laterality_tag: str = "") -> list[str]:
    """A warning when the description or the Laterality tag names the other side than the
    geometry shows (the geometry is used)."""
    wrong = [source for source, hint in hinted_sides(description, laterality_tag).items()
             if hint != side]
    if not wrong:
        return []
    other = "left" if side == "right" else "right"
    verb = "says" if len(wrong) == 1 else "say"
    return [f"{name}: the {' and the '.join(wrong)} {verb} {other}, the image geometry shows "
            f"the {side} leg; the geometry is used"]


# --------------------------------------------------------------------------------------------
# composition (convert)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One leg's series: its side (from geometry), image, name for messages, receive coil,
    Frame of Reference."""

    side: str
    image: sitk.Image
    name: str
    coil: str | None = None
    #: FrameOfReferenceUID: two series place the legs in one coordinate system only when equal
    frame_of_reference: str | None = None


@dataclass
class Composition:
    """The session image composed of two one-leg series, what was done, and the QC flags."""

    image: sitk.Image
    record: dict[str, Any]
    flags: list[qc_mod.QCFlag] = field(default_factory=list)


def _corners_mm(image: sitk.Image) -> NDArray[np.float64]:
    """Physical points (8, 3) of the corner voxel centres of an image."""
    size = image.GetSize()
    return np.array([image.TransformIndexToPhysicalPoint((i, j, k))
                     for i in (0, size[0] - 1) for j in (0, size[1] - 1)
                     for k in (0, size[2] - 1)], dtype=float)


def x_range_mm(image: sitk.Image) -> tuple[float, float]:
    """Left-right range (LPS x, mm) of an image's voxel centres."""
    x = _corners_mm(image)[:, 0]
    return float(x.min()), float(x.max())


def _normal(image: sitk.Image) -> NDArray[np.float64]:
    return np.asarray(image.GetDirection(), float).reshape(3, 3)[:, 2]


def _union_grid(reference: sitk.Image, other: sitk.Image) -> sitk.Image:
    """The reference grid (same spacing, direction; origin moved by whole voxels) extended to
    hold both images' voxel centres."""
    ref_size = np.array(reference.GetSize(), float)
    idx = np.array([reference.TransformPhysicalPointToContinuousIndex(tuple(p))
                    for p in _corners_mm(other)])
    lo = np.minimum(0, np.floor(idx.min(axis=0) + ALIGNED_FRACTION)).astype(int)
    hi = np.maximum(ref_size - 1, np.ceil(idx.max(axis=0) - ALIGNED_FRACTION)).astype(int)
    grid = sitk.Image([int(v) for v in hi - lo + 1], sitk.sitkFloat32)
    grid.SetSpacing(reference.GetSpacing())
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in lo]))
    return grid


def _aligned(grid: sitk.Image, image: sitk.Image) -> bool:
    """Whether `image`'s voxels sit on `grid`'s voxels (same spacing and direction, offset by
    whole voxels), so that it is copied by index."""
    if not np.allclose(grid.GetSpacing(), image.GetSpacing(), rtol=1e-4) or not np.allclose(
            grid.GetDirection(), image.GetDirection(), atol=1e-5):
        return False
    idx = np.array(grid.TransformPhysicalPointToContinuousIndex(image.GetOrigin()))
    return bool(np.all(np.abs(idx - np.round(idx)) <= ALIGNED_FRACTION))


def _onto(grid: sitk.Image, image: sitk.Image, exact: bool) -> NDArray[np.float32]:
    """`image` on `grid` (z, y, x), 0 outside it: by index when `exact`, else cubic B-spline
    clipped to the image's own range (a spline overshoots at edges)."""
    source = sitk.Cast(image, sitk.sitkFloat32)
    method = sitk.sitkNearestNeighbor if exact else sitk.sitkBSpline
    out = sitk.GetArrayFromImage(sitk.Resample(source, grid, sitk.Transform(), method, 0.0,
                                               sitk.sitkFloat32))
    if not exact:
        values = sitk.GetArrayViewFromImage(source)
        np.clip(out, min(0.0, float(values.min())), float(values.max()), out=out)
    return out


def _index_map(grid: sitk.Image, image: sitk.Image) -> list[NDArray[np.float64]]:
    """For each axis of `image` (x, y, z), its continuous index at every voxel of `grid`, as
    arrays broadcastable to the grid's (z, y, x) shape (the map is affine, so separable)."""
    g_dir = np.asarray(grid.GetDirection(), float).reshape(3, 3) * np.asarray(grid.GetSpacing())
    i_dir = np.asarray(image.GetDirection(), float).reshape(3, 3)
    to_index = (i_dir.T / np.asarray(image.GetSpacing())[:, None])  # physical -> index
    matrix = to_index @ g_dir  # grid index -> image index
    offset = to_index @ (np.asarray(grid.GetOrigin()) - np.asarray(image.GetOrigin()))
    size = grid.GetSize()
    axes = [np.arange(n, dtype=float) for n in size]
    shapes = [(1, 1, size[0]), (1, size[1], 1), (size[2], 1, 1)]
    return [offset[b] + sum(matrix[b, a] * axes[a].reshape(shapes[a]) for a in range(3))
            for b in range(3)]


def _coverage(grid: sitk.Image, image: sitk.Image) -> NDArray[np.bool_]:
    """Voxels of `grid` inside `image`'s field of view (within half a voxel of its box)."""
    shape = grid.GetSize()[::-1]
    inside = np.ones(shape, bool)
    for index, n in zip(_index_map(grid, image), image.GetSize(), strict=True):
        inside &= (index >= -0.5) & (index <= n - 0.5)
    return inside


def _x_of_voxels(grid: sitk.Image) -> NDArray[np.float64]:
    """LPS x (mm) of every voxel of `grid`, broadcastable to its (z, y, x) shape."""
    direction = np.asarray(grid.GetDirection(), float).reshape(3, 3)[0] * np.asarray(
        grid.GetSpacing())
    size = grid.GetSize()
    shapes = [(1, 1, size[0]), (1, size[1], 1), (size[2], 1, 1)]
    return grid.GetOrigin()[0] + sum(
        direction[a] * np.arange(size[a], dtype=float).reshape(shapes[a]) for a in range(3))


def _local_signal(array: NDArray[np.float32], grid: sitk.Image) -> NDArray[np.float32]:
    """`array` smoothed in-plane (Gaussian, sigma :data:`LOCAL_SIGNAL_SIGMA_MM`): whether a
    series shows tissue around a voxel, not its noise."""
    from scipy import ndimage  # noqa: PLC0415 - only split sessions use it

    sigma_px = [0.0] + [LOCAL_SIGNAL_SIGMA_MM / v for v in grid.GetSpacing()[1::-1]]
    out: NDArray[np.float32] = ndimage.gaussian_filter(array, sigma_px)
    return out


def _tissue_level(array: NDArray[np.floating[Any]]) -> float | None:
    """Median signal of the tissue (above Otsu's threshold of the non-zero voxels), None when
    the image holds too little signal."""
    from skimage.filters import threshold_otsu  # noqa: PLC0415 - only split sessions use it

    values = array[array > 0]
    if values.size < 100 or float(values.max()) <= float(values.min()):
        return None
    tissue = values[values > threshold_otsu(values)]
    return float(np.median(tissue)) if tissue.size else None


def _medial_edge(image: sitk.Image, towards_left: bool) -> tuple[int, int]:
    """The in-plane edge of `image` facing the other leg, as (array axis, 0 or -1) of its
    (z, y, x) array: the edge whose outward direction points most toward the other leg."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    sign = 1.0 if towards_left else -1.0  # LPS +x is the patient's left
    edges = [(2, -1, direction[0, 0]), (2, 0, -direction[0, 0]),
             (1, -1, direction[0, 1]), (1, 0, -direction[0, 1])]
    axis, end, _ = max(edges, key=lambda e: sign * e[2])
    return axis, end


def _cut_slices(array: NDArray[np.floating[Any]], level: float | None, pixel_mm: float,
                min_contact_mm: float, medial: tuple[int, int]) -> list[int]:
    """Slices where the leg (the largest piece of tissue brighter than
    :data:`TISSUE_FRACTION` of the tissue `level`, :func:`_tissue_level`) runs along an
    in-plane edge of its own field of view for `min_contact_mm` or more. The `medial` edge
    (facing the other leg) is left out: a one-leg field of view often cuts the other leg
    there, and this leg's tissue past it is the other series' to show."""
    from scipy import ndimage  # noqa: PLC0415 - only split sessions use it

    if level is None:
        return []
    labelled, n = ndimage.label(array > level * TISSUE_FRACTION)
    if n == 0:
        return []
    leg = labelled == 1 + int(np.argmax(np.bincount(labelled.ravel())[1:]))
    edge = np.zeros(array.shape[1:], bool)
    width = qc_mod.EDGE_PX
    edge[:width, :] = edge[-width:, :] = edge[:, :width] = edge[:, -width:] = True
    axis, end = medial
    strip = (slice(None), slice(-width, None) if end == -1 else slice(0, width))
    edge[strip if axis == 2 else strip[::-1]] = False
    contact = (leg & edge[None]).sum(axis=(1, 2)) * pixel_mm / width
    return [int(k) for k in np.nonzero(contact >= min_contact_mm)[0]]


def _differences(reference: Part, other: Part, grid: sitk.Image) -> list[str]:
    """What differs between the two series enough to bias the comparison of the legs."""
    why: list[str] = []
    ref_sp, oth_sp = np.array(reference.image.GetSpacing()), np.array(other.image.GetSpacing())
    if np.any(np.abs(oth_sp[:2] / ref_sp[:2] - 1) > SPACING_TOLERANCE):
        why.append(f"in-plane pixels {_mm(ref_sp[:2])} ({reference.side}) against "
                   f"{_mm(oth_sp[:2])} ({other.side})")
    if abs(oth_sp[2] / ref_sp[2] - 1) > SPACING_TOLERANCE:
        why.append(f"slice spacing {ref_sp[2]:.3g} mm ({reference.side}) against "
                   f"{oth_sp[2]:.3g} mm ({other.side})")
    cos = float(np.clip(abs(_normal(reference.image) @ _normal(other.image)), -1, 1))
    tilt = math.degrees(math.acos(cos))
    if tilt > MAX_TILT_DEG:
        why.append(f"slices tilted {tilt:.1f} degrees against each other")
    else:
        k = np.array(grid.TransformPhysicalPointToContinuousIndex(other.image.GetOrigin()))[2]
        offset = abs(k - round(k))
        if offset > SLICE_OFFSET_FRACTION:
            why.append(f"the {other.side} leg's slices lie {offset * ref_sp[2]:.2g} mm off the "
                       f"{reference.side} leg's: interpolated across slices")
    if reference.frame_of_reference and other.frame_of_reference \
            and reference.frame_of_reference != other.frame_of_reference:
        why.append("the two series have different Frames of Reference (the patient may have "
                   "been moved between them): their relative position is not guaranteed")
    if reference.coil and other.coil and reference.coil != other.coil:
        why.append(f"receive coils {reference.coil!r} ({reference.side}) and {other.coil!r} "
                   f"({other.side})")
    return why


def grid_record(image: sitk.Image) -> dict[str, Any]:
    """An image's grid as JSON: ``origin_mm``, ``direction`` (9, row-major), ``spacing_mm``,
    ``size`` (:meth:`pipeline.extent.Geometry.of_record` reads it back)."""
    return {"origin_mm": [round(v, 4) for v in image.GetOrigin()],
            "direction": [round(v, 8) for v in image.GetDirection()],
            "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
            "size": list(image.GetSize())}


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _mm(values: NDArray[np.float64]) -> str:
    return " x ".join(f"{v:.3g}" for v in values) + " mm"


def compose(parts: Sequence[Part], *, t1_like: bool, min_contact_mm: float) -> Composition:
    """Both legs' series as one image (see the module's description).

    Parameters
    ----------
    parts : two Part, one per side
    t1_like : bool
        The series are the anatomical (T1-weighted) ones: their tissue signal levels are
        compared (a fluid-sensitive image's level moves with edema, so it is not) and each
        leg's contact with its own field of view's edge is checked.
    min_contact_mm : float
        Length of contact with the field of view's edge that cuts a limb (segmentation's
        ``min_fov_contact_mm``).
    """
    by_side = {p.side: p for p in parts}
    if sorted(by_side) != sorted(SIDES):
        raise ValueError(f"two series, one per side, are needed; got {[p.side for p in parts]}")
    ordered = sorted(parts, key=lambda p: (float(np.prod(p.image.GetSpacing()[:2])),
                                           p.side != "left"))
    reference, other = ordered
    grid = _union_grid(reference.image, other.image)
    exact_other = _aligned(grid, other.image)
    arrays = {reference.side: _onto(grid, reference.image, True),
              other.side: _onto(grid, other.image, exact_other)}
    covered = {p.side: _coverage(grid, p.image) for p in parts}
    ranges = {p.side: x_range_mm(p.image) for p in parts}
    boundary_x = (sum(ranges["left"]) + sum(ranges["right"])) / 4
    x = _x_of_voxels(grid)
    nearer_left = (x >= boundary_x) | ~covered["right"]
    # where the nearer series shows no tissue that the other one shows (a swollen leg reaching
    # past the middle into the other leg's field of view, outside that leg's coil), the
    # other series' voxels are the leg's
    local = {side: _local_signal(arrays[side], grid) for side in SIDES}
    left_blind = local["left"] < DARK_FRACTION * local["right"]
    right_blind = local["right"] < DARK_FRACTION * local["left"]
    from_left = covered["left"] & ((nearer_left & ~left_blind) | (~nearer_left & right_blind)
                                   | ~covered["right"])
    from_right = covered["right"] & ~from_left
    composed = np.where(from_left, arrays["left"], np.where(from_right, arrays["right"], 0))
    image = sitk.GetImageFromArray(composed.astype(np.float32))
    image.CopyInformation(grid)

    differences = _differences(reference, other, grid)
    levels = {p.side: _tissue_level(sitk.GetArrayViewFromImage(p.image)) for p in parts}
    ratio = None
    if t1_like and levels["left"] and levels["right"]:
        ratio = levels["left"] / levels["right"]
        if max(ratio, 1 / ratio) > MAX_SIGNAL_RATIO:
            differences.append(f"tissue signal of the left leg {ratio:.2f} x the right leg's "
                               "(another coil or receiver gain): the lesion and edema "
                               "thresholds compare one leg's signal with the other's")
    flags: list[qc_mod.QCFlag] = []
    if differences:
        flags.append(qc_mod.QCFlag(
            "", qc_mod.BOTH, qc_mod.SPLIT_SERIES_DIFFER, "warn",
            "left and right leg imaged in separate series that differ: "
            + "; ".join(differences)))
    if t1_like:
        for p in parts:
            array = sitk.GetArrayViewFromImage(p.image)
            cut = _cut_slices(np.asarray(array), levels[p.side],
                              float(min(p.image.GetSpacing()[:2])), min_contact_mm,
                              _medial_edge(p.image, p.side == "right"))
            flag = qc_mod.fov_flag(p.side, cut, array.shape[0])
            if flag is not None:
                flags.append(qc_mod.QCFlag(
                    "", p.side, flag.code, flag.severity,
                    flag.message.replace("the in-plane edge of the image",
                                         f"the in-plane edge of its own series ({p.name})"),
                    flag.slices))
    record = {
        "layout": "left and right leg in separate series, composed on the reference grid",
        "reference_side": reference.side,
        "series": {p.side: {"name": p.name, "grid": grid_record(p.image),
                            "x_range_mm": [round(v, 2) for v in ranges[p.side]],
                            "receive_coil": p.coil,
                            "tissue_signal": _rounded(levels[p.side])} for p in parts},
        "other_copied_by_index": exact_other,
        "other_resampled": None if exact_other else "cubic B-spline",
        "boundary_x_mm": round(boundary_x, 2),
        "tissue_signal_ratio_left_right": None if ratio is None else round(ratio, 4),
        "differences": differences,
    }
    return Composition(image, record, flags)
