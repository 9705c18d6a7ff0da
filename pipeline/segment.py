"""Per-session segmentation: left/right limb, bone, marrow lesion and edema -> one label map.

The label map (values in :mod:`pipeline.labels`) is written on the fluid-sensitive series' grid.
The T1-weighted series is resampled onto that grid through physical space (never assumed
aligned). Left and right come from the image geometry: the limb whose centroid has the larger
LPS x coordinate is the patient's left.

Method (each step's numbers go to the QC sidecar):

1. N4 bias-field correction of the T1-weighted image on a shrunk copy; the same receive field
   divides the fluid image (one coil, one session).
2. Limbs: T1 half-maximum edge threshold between background and the tissue just inside the skin
   (unbiased under partial volume), holes filled per axial slice, components; two touching
   thighs are split by a two-seed watershed on the distance transform.
3. Bone: the dark cortical ring on T1 (below half the muscle level), thin septa removed by an
   opening, holes filled: cortex plus marrow cavity.
4. Marrow lesion: marrow voxels whose fluid signal exceeds the contralateral marrow's 99th
   percentile (seed), grown by hysteresis down to half-way between lesion and marrow, with T1 at
   or below muscle-plus-partial-volume.
5. Edema: soft tissue whose fluid signal exceeds the contralateral soft tissue's 99.5th
   percentile (seed), grown by hysteresis to half-way between edema and muscle, specks removed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage
from skimage import filters, measure, morphology, segmentation

from pipeline import __version__
from pipeline import qc as qc_mod
from pipeline.io.files import atomic_path, write_json_atomic
from pipeline.labels import BONE, EDEMA, LESION, SIDE_OFFSET, SOFT_TISSUE
from pipeline.mirror import MirroredReference, mirrored_references

BoolArray = NDArray[np.bool_]
_DISK1 = ndimage.generate_binary_structure(2, 1)
FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class SegmentSettings:
    """Tunable settings; defaults mirror config/config.yaml (segment: ...)."""

    n4_shrink: int = 4
    n4_iterations: tuple[int, ...] = (50, 40, 30)
    n4_control_points: int = 8
    min_limb_area_mm2: float = 400.0
    edge_fraction: float = 0.25
    lesion_seed_percentile: float = 99.0
    lesion_t1_max_rel_muscle: float = 1.4
    edema_seed_percentile: float = 99.5
    edema_seed_min_rel_muscle: float = 1.45
    min_lesion_component_mm3: float = 100.0
    min_edema_component_mm3: float = 60.0
    edema_grow_fraction: float = 0.4
    edema_mirror_seed_ratio: float = 1.4
    edema_mirror_grow_ratio: float = 1.2
    edema_mirror_min_bone_dice: float = 0.5
    signal_void_fraction: float = 0.4
    min_fov_contact_mm: float = 3.0
    t1_like_min_fat_ratio: float = 0.93
    fat_suppressed_max_fat_ratio: float = 0.7


@dataclass
class SegmentResult:
    """Label map (SimpleITK image on the fluid grid) and QC statistics."""

    labels: sitk.Image
    qc: dict[str, Any] = field(default_factory=dict)


def read_image(path: str | Path) -> sitk.Image:
    """Read an image as float32 with its geometry."""
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def resample_to(moving: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Resample `moving` onto `reference`'s grid through physical space (linear, 0 outside)."""
    same = (
        moving.GetSize() == reference.GetSize()
        and np.allclose(moving.GetSpacing(), reference.GetSpacing(), atol=1e-4)
        and np.allclose(moving.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        and np.allclose(moving.GetDirection(), reference.GetDirection(), atol=1e-5)
    )
    if same:
        return moving
    return sitk.Resample(
        moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )


class NoOverlapError(ValueError):
    """The anatomical and fluid images of a session share no volume in patient space."""


def _physical_box(image: sitk.Image) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Box in patient coordinates (LPS mm) covered by an image, voxel edges included."""
    size = image.GetSize()
    corners = np.array([
        image.TransformContinuousIndexToPhysicalPoint((i, j, k))
        for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5)
        for k in (-0.5, size[2] - 0.5)
    ])
    return corners.min(axis=0), corners.max(axis=0)


def check_overlap(t1: sitk.Image, fluid: sitk.Image, t1_name: str, fluid_name: str) -> None:
    """Raise NoOverlapError naming both files when the two images share no volume (the T1
    resampled onto the fluid grid would be empty: nothing could be segmented)."""
    (a_lo, a_hi), (f_lo, f_hi) = _physical_box(t1), _physical_box(fluid)
    if (np.minimum(a_hi, f_hi) - np.maximum(a_lo, f_lo) > 0).all():
        return

    def extent(lo: NDArray[np.float64], hi: NDArray[np.float64]) -> str:
        return " x ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi, strict=True))

    raise NoOverlapError(
        f"{t1_name} and {fluid_name} do not overlap in space (LPS mm: "
        f"{extent(a_lo, a_hi)} vs {extent(f_lo, f_hi)}): the anatomical and fluid images of "
        "a session must cover the same anatomy; session not segmented"
    )


def n4_log_bias(image: sitk.Image, mask: sitk.Image, settings: SegmentSettings) -> sitk.Image:
    """Log bias field of `image` at full resolution, estimated by N4 on a shrunk copy.

    The B-spline mesh has ``n4_control_points`` in-plane: a field of view holding both legs
    is 400+ mm wide, and surface-coil shading varies within each leg (the default 4 points
    left the lateral quadriceps of a real thigh 25 % brighter than the rest). Along z the
    mesh keeps 4 points (the fewest): more let the field bend at the end slices, where it
    hid the thin metaphyseal cortex of the phantom's last slice.
    """
    size = image.GetSize()
    shrink = max(1, min(settings.n4_shrink, min(size[0], size[1]) // 48))
    shrink_z = 1 if size[2] < 4 * shrink else shrink
    factors = [shrink, shrink, shrink_z]
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(settings.n4_iterations))
    cp = settings.n4_control_points
    corrector.SetNumberOfControlPoints([cp, cp, 4])
    corrector.Execute(small, small_mask)
    return corrector.GetLogBiasFieldAsImage(image)


def _fill_per_slice(mask: BoolArray) -> BoolArray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def limb_masks(
    t1: FloatArray,
    spacing_zyx_mm: tuple[float, float, float],
    x_of_column_mm: FloatArray,
    settings: SegmentSettings,
    qc: dict[str, Any],
) -> dict[str, BoolArray]:
    """Left and right limb masks (Z, Y, X) from a bias-corrected T1 image.

    Parameters
    ----------
    t1 : ndarray of shape (Z, Y, X)
        Bias-corrected T1-weighted image, axial slices along axis 0.
    spacing_zyx_mm : tuple of float
        Voxel spacing in mm.
    x_of_column_mm : ndarray of shape (X,)
        LPS x coordinate (mm) of each column at the image centre; larger is the patient's left.
    """
    pixel_mm2 = spacing_zyx_mm[1] * spacing_zyx_mm[2]
    body, info = body_mask(t1, settings.edge_fraction)
    qc.update(info)
    left = np.zeros_like(body)
    right = np.zeros_like(body)
    min_px = settings.min_limb_area_mm2 / pixel_mm2
    n_split = 0
    single_slices = 0
    for k in range(body.shape[0]):
        lab, n = ndimage.label(body[k])
        parts: list[BoolArray] = []
        comps = [c for c in (lab == i for i in range(1, n + 1)) if c.sum() >= min_px]
        for comp in comps:
            # only a lone component as wide as two limbs side by side can be two touching
            # limbs; a calf's own waist (the shin) must not split it
            halves = split_touching(comp) if len(comps) == 1 and _wide(comp) else None
            if halves is not None and min(h.sum() for h in halves) >= min_px:
                parts.extend(halves)
                n_split += 1
            else:
                parts.append(comp)
        parts = sorted(parts, key=lambda c: -int(c.sum()))[:2]
        xs = []
        for comp in parts:
            cols = np.nonzero(comp.any(axis=0))[0]
            xs.append(float(np.average(x_of_column_mm[cols], weights=comp.sum(axis=0)[cols])))
        if len(parts) == 2:
            is_left = [xs[0] > xs[1], xs[1] > xs[0]]
        else:
            single_slices += len(parts)
            is_left = [x > 0.0 for x in xs]
        for comp, lft in zip(parts, is_left, strict=False):
            (left if lft else right)[k] |= comp
    qc.update(slices_split=n_split, slices_single_limb=single_slices)
    return {"left": left, "right": right}


def body_mask(t1: FloatArray, edge_fraction: float = 0.25) -> tuple[BoolArray, dict[str, float]]:
    """Everything that is not air (Z, Y, X), with the skin edge placed at half maximum.

    A low threshold (12 % of the way from air to the brightest tissue) with holes filled per
    slice gives the topology, robust to dark strands crossing the fat. The outer edge is then
    refined voxel by voxel: a voxel in the boundary band belongs to the limb when its signal is
    at least `edge_fraction` of the way from air to the tissue just inside it (mean of the first
    inner voxel layer within 7 x 7 voxels). That layer mixes skin with the brighter
    subcutaneous fat, while a voxel on the edge holds mostly skin (on T1 about half as bright
    as fat), so the edge at 50 % partial volume is at about half the *skin* level, a quarter
    of the way to the layer: 0.25 keeps the limb volume within 0.15 % for pixels of 0.9 to
    1.8 mm and slices of 4 to 6 mm on the phantom (skin 1.2 mm at half the fat signal).
    """
    air = float(np.percentile(t1, 30))
    hi = float(np.percentile(t1, 99.5))
    rough = _fill_per_slice(t1 > air + 0.12 * (hi - air))
    rough = ndimage.binary_opening(rough, structure=np.ones((1, 3, 3), bool))
    outside = ~ndimage.binary_dilation(rough, structure=np.ones((1, 3, 3), bool), iterations=3)
    bg = float(np.mean(t1[outside])) if outside.any() else air
    plane = np.ones((1, 3, 3), bool)
    core = ndimage.binary_erosion(rough, structure=plane, iterations=2)
    # The reference is the first voxel layer fully inside the skin edge: thin, dimmer skin
    # dominates it, as it dominates the partial-volume voxels on the edge.
    layer = ndimage.binary_erosion(rough, structure=plane) & ~core
    weight = ndimage.uniform_filter(layer.astype(np.float32), size=(1, 7, 7))
    local = ndimage.uniform_filter(np.where(layer, t1, 0).astype(np.float32), size=(1, 7, 7))
    inside_level = np.divide(local, weight, out=np.full_like(local, hi), where=weight > 1e-3)
    band = ndimage.binary_dilation(rough, structure=plane, iterations=2) & ~core
    edge = band & (t1 >= bg + edge_fraction * (inside_level - bg))
    body = _fill_per_slice(core | edge)
    body = ndimage.binary_opening(body, structure=plane)
    return body, {"background_level": bg, "rough_threshold": air + 0.12 * (hi - air)}


def _wide(mask2d: BoolArray, min_aspect: float = 1.4) -> bool:
    """True when the component is at least `min_aspect` times wider (x) than tall (y)."""
    rows = np.nonzero(mask2d.any(axis=1))[0]
    cols = np.nonzero(mask2d.any(axis=0))[0]
    return bool(cols[-1] - cols[0] + 1 >= min_aspect * (rows[-1] - rows[0] + 1))


def split_touching(mask2d: BoolArray) -> tuple[BoolArray, BoolArray] | None:
    """Split one 2-D component holding two touching limbs by a two-seed watershed.

    Seeds are the distance-transform maxima on either side of the narrowest column of the
    component's left-right occupancy profile. Returns None when the profile has no waist
    (a single limb).
    """
    profile = mask2d.sum(axis=0).astype(float)
    cols = np.nonzero(profile)[0]
    c0, c1 = int(cols[0]), int(cols[-1])
    width = c1 - c0
    if width < 10:
        return None
    lo, hi = c0 + width // 4, c1 - width // 4
    waist = lo + int(np.argmin(profile[lo : hi + 1]))
    if profile[waist] > 0.85 * min(profile[c0:waist].max(), profile[waist : c1 + 1].max()):
        return None
    dist = ndimage.distance_transform_edt(mask2d)
    markers = np.zeros(mask2d.shape, dtype=np.int32)
    for m, (a, b) in enumerate(((c0, waist), (waist + 1, c1 + 1)), start=1):
        sub = dist[:, a:b]
        r, c = np.unravel_index(int(np.argmax(sub)), sub.shape)
        markers[r, a + c] = m
    ws = segmentation.watershed(-dist, markers, mask=mask2d)
    return ws == 1, ws == 2


def _muscle_level_t1(t1: FloatArray, limb: BoolArray) -> tuple[float, float]:
    """Muscle and fat T1 levels in a limb: the two classes of an Otsu split of tissue signal."""
    vals = t1[limb]
    fat = float(np.percentile(vals, 97))
    tissue = vals[vals > 0.15 * fat]
    split = filters.threshold_otsu(tissue)
    return float(np.median(tissue[tissue < split])), float(np.median(tissue[tissue >= split]))


#: Threshold levels (x muscle T1) tried for the dark cortex, lowest first: partial volume lifts
#: a thin (metaphyseal, child's) cortex above half the muscle level.
CORTEX_LEVELS: Final = (0.5, 0.65, 0.8)
#: Higher levels, for sections that can only continue a bone of the adjacent slice: at the
#: knee the tibial plateau's and condyles' cortex is thin and partial-volumed up to muscle.
FOLLOW_LEVELS: Final = (0.95, 1.1, 1.25)
#: A bone's marrow cavity: at least this area (mm^2) of not-dark signal inside the cortex.
#: Marrow is not required to be bright: on gradient-echo images it is near muscle.
MIN_CAVITY_MM2: Final = 6.0
#: Mean cortical thickness (dark area / outline length, mm) of a bone section found on its
#: own; fascia enclosing a muscle compartment is one voxel thick (0.8-1.3 mm with partial
#: volume). Thinner (metaphyseal) cortex is followed from the adjacent slice instead.
MIN_CORTEX_MM: Final = 1.5
#: Compactness of a bone section (area / convex hull area); a section found on its own is
#: convex (real femur, tibia, fibula: 0.92-0.98), a bundle of vessels around a pocket is not.
MIN_BONE_SOLIDITY: Final = 0.85
MIN_RING_SOLIDITY: Final = 0.9
#: A marrow cavity is at least this fraction of the section (fibula ~0.3, femur 0.3, tibia
#: 0.6); three vessels touching in a triangle enclose far less.
MIN_CAVITY_FRACTION: Final = 0.15
#: Smallest bone section (mm^2): a child's fibula is ~30 mm^2.
MIN_BONE_AREA_MM2: Final = 25.0
#: Largest bone section as a fraction of the limb's (femoral condyles reach ~45 %).
MAX_BONE_FRACTION: Final = 0.5
#: A section continues a bone of the adjacent slice when they overlap by this fraction of the
#: smaller one and it is at most this many times larger (bones change slowly along z).
MIN_CONTINUATION_OVERLAP: Final = 0.5
MAX_CONTINUATION_GROWTH: Final = 1.4


def bone_mask(t1: FloatArray, limb: BoolArray, muscle: float, pixel_mm: float) -> BoolArray:
    """Every bone (cortex and marrow) of one limb, array of shape (Z, Y, X).

    A bone section is a compact region enclosed by a dark cortex. Per slice, dark voxels (T1
    below ``level x muscle``) away from the skin are hole-filled and opened (thin septa and
    vessels touching the cortex go), and each compact component of plausible size is a
    candidate; levels rise (:data:`CORTEX_LEVELS`, then :data:`FOLLOW_LEVELS` for followed
    sections only) so that a cortex lifted by partial volume still closes, and a place keeps
    the lowest level that finds it.

    - **sections found on their own**: a marrow cavity inside a thick cortex
      (:data:`MIN_CORTEX_MM`): femur, tibia, fibula, patella, several per slice;
    - **followed sections**: other candidates (thin metaphyseal cortex, the distal fibula's
      solid cortex, a cavity filled by a T1-dark lesion) are bone only where they continue a
      bone section of an adjacent slice (overlap, similar size), followed slice by slice.
      Flow voids (dark, no cavity) and fascia loops never start a bone;
    - with three or more slices every bone section must continue into an adjacent slice:
      bones are long.

    Parameters
    ----------
    t1 : ndarray of shape (Z, Y, X)
        Bias-corrected T1-like image.
    limb : ndarray of bool, shape (Z, Y, X)
        One limb.
    muscle : float
        Muscle T1 level of that limb.
    pixel_mm : float
        In-plane pixel size (mm).
    """
    # away from the skin's dark edge, but not so far that the shin's tibia (a few mm under
    # the skin) is cut
    inner = ndimage.binary_erosion(
        limb, structure=np.ones((1, 3, 3), bool), iterations=max(1, int(round(2.0 / pixel_mm)))
    )
    found = np.zeros_like(limb)
    weak: dict[int, list[BoolArray]] = {}
    for k in range(limb.shape[0]):
        limb_px = float(limb[k].sum())
        if limb_px == 0:
            continue
        for level in CORTEX_LEVELS + FOLLOW_LEVELS:
            dark = (t1[k] < level * muscle) & inner[k]
            for comp, on_its_own in _bone_candidates(dark, pixel_mm, limb_px):
                if (comp & found[k]).any():
                    continue
                if on_its_own and level in CORTEX_LEVELS:
                    found[k] |= comp
                else:  # candidates of every level compete in the following, lowest first
                    weak.setdefault(k, []).append(comp)
    bone = _follow_along_z(found, weak)
    if bone.shape[0] >= 3:
        bone = _continued_along_z(bone)
    return bone


def _sections(mask2d: BoolArray) -> list[BoolArray]:
    lab, n = ndimage.label(mask2d)
    return [lab == i for i in range(1, n + 1)]


def _continues(section: BoolArray, neighbour: BoolArray) -> bool:
    """True when `section` is a bone section of `neighbour` one slice on: overlapping it by
    :data:`MIN_CONTINUATION_OVERLAP` of the smaller and of similar size (within a factor
    :data:`MAX_CONTINUATION_GROWTH` either way; a fragment of a cortex is not a bone)."""
    if not (section & neighbour).any():
        return False
    area = float(section.sum())
    for other in _sections(neighbour):
        inter = float((section & other).sum())
        size = float(other.sum())
        if inter >= MIN_CONTINUATION_OVERLAP * min(area, size) and (
            size / MAX_CONTINUATION_GROWTH <= area <= MAX_CONTINUATION_GROWTH * size
        ):
            return True
    return False


def _follow_along_z(found: BoolArray, weak: dict[int, list[BoolArray]]) -> BoolArray:
    """`found` plus the `weak` candidates that continue it slice by slice (both directions);
    in a slice the first candidate (lowest level) that continues a bone wins its place."""
    bone = found.copy()
    pending = {k: list(c) for k, c in weak.items() if c}
    changed = True
    while changed and pending:
        changed = False
        for k in list(pending):
            keep = []
            for section in pending[k]:
                if (section & bone[k]).any():
                    continue  # its place is taken
                neighbours = [bone[j] for j in (k - 1, k + 1) if 0 <= j < bone.shape[0]]
                if any(_continues(section, nb) for nb in neighbours):
                    bone[k] |= section
                    changed = True
                else:
                    keep.append(section)
            if keep:
                pending[k] = keep
            else:
                del pending[k]
    return bone


_SLICE_CONNECTIVITY = np.zeros((3, 3, 3), bool)
_SLICE_CONNECTIVITY[1] = ndimage.generate_binary_structure(2, 1)


def _continued_along_z(bone: BoolArray) -> BoolArray:
    """Bone sections (2-D components) that overlap bone in an adjacent slice."""
    lab, _ = ndimage.label(bone, structure=_SLICE_CONNECTIVITY)
    up = np.zeros_like(bone)
    down = np.zeros_like(bone)
    up[:-1] = bone[1:]
    down[1:] = bone[:-1]
    keep = np.unique(lab[bone & (up | down)])
    return np.isin(lab, keep[keep > 0])


def _bone_candidates(
    dark: BoolArray, pixel_mm: float, limb_px: float
) -> list[tuple[BoolArray, bool]]:
    """Compact dark-outlined regions of one slice: ``(mask, found_on_its_own)``."""
    # The opening strips thin dark lines (septa, vessels) that touch the cortex, so that the
    # bone's own outline decides its compactness.
    filled = ndimage.binary_opening(ndimage.binary_fill_holes(dark), structure=_DISK1)
    lab, _ = ndimage.label(filled)
    px_mm2 = pixel_mm**2
    out = []
    for region in measure.regionprops(lab):
        area_mm2 = region.area * px_mm2
        if not MIN_BONE_AREA_MM2 <= area_mm2 <= MAX_BONE_FRACTION * limb_px * px_mm2:
            continue
        if region.solidity < MIN_BONE_SOLIDITY:
            continue
        comp = lab == region.label
        cavity_mm2 = float((comp & ~dark).sum()) * px_mm2
        cortex_mm = (area_mm2 - cavity_mm2) / max(region.perimeter * pixel_mm, 1e-6)
        out.append((comp, cavity_mm2 >= max(MIN_CAVITY_MM2, MIN_CAVITY_FRACTION * area_mm2)
                    and cortex_mm >= MIN_CORTEX_MM and region.solidity >= MIN_RING_SOLIDITY))
    return out


def seeds_reach(seeds: BoolArray, region: BoolArray) -> BoolArray:
    """Voxels of `region` connected to a seed (everything when there is no seed in it)."""
    lab, _ = ndimage.label(region)
    keep = np.unique(lab[seeds & region])
    return np.isin(lab, keep[keep > 0])


def _hysteresis(image: FloatArray, region: BoolArray, low: float, high: float) -> BoolArray:
    img = np.where(region, image, -np.inf).astype(np.float32)
    return filters.apply_hysteresis_threshold(img, low, high)


def _remove_small(mask: BoolArray, min_mm3: float, voxel_mm3: float) -> BoolArray:
    return morphology.remove_small_objects(
        mask, max_size=max(0, int(round(min_mm3 / voxel_mm3)) - 1)
    )


def _muscle_level_fluid(values: FloatArray) -> float:
    """Muscle signal on the fluid image: the histogram mode of the brighter Otsu class of soft
    tissue (fat is the darker class on fat-suppressed images). The mode, unlike a median, is
    not pulled up by edema when the limb is its own reference."""
    if values.size < 10:
        return float(np.median(values)) if values.size else 0.0
    upper = values[values >= filters.threshold_otsu(values)]
    hist, edges = np.histogram(upper, bins=128)
    smooth = ndimage.gaussian_filter1d(hist.astype(float), 2.0)
    k = int(np.argmax(smooth))
    return float(0.5 * (edges[k] + edges[k + 1]))


def _per_slice_median(values: FloatArray, region: BoolArray) -> FloatArray:
    """Median of `values` within `region` for each slice; slices without region take the
    nearest slice's value (NaN everywhere when the region is empty)."""
    nz = values.shape[0]
    out = np.full(nz, np.nan, dtype=np.float32)
    for k in range(nz):
        if region[k].any():
            out[k] = np.median(values[k][region[k]])
    have = np.nonzero(~np.isnan(out))[0]
    if have.size:
        nearest = have[np.abs(np.arange(nz)[:, None] - have[None, :]).argmin(axis=1)]
        out = out[nearest]
    return out


def marrow_lesion(
    t1: FloatArray,
    fluid: FloatArray,
    limb: dict[str, Any],
    ref: dict[str, Any],
    muscle_fl: float,
    settings: SegmentSettings,
    voxel_mm3: float,
    own_reference: bool = False,
) -> tuple[BoolArray, dict[str, Any]]:
    """Marrow lesion of one limb: fluid-bright, T1-dark marrow, against the contralateral marrow.

    Seeds: marrow voxels above the contralateral marrow's `lesion_seed_percentile` of fluid
    signal with T1 at or below muscle (plus partial-volume slack). Growth: voxels of the bone
    that are closer to the lesion than to the contralateral marrow *of the same slice* (red
    metaphyseal or fatty diaphyseal marrow differ) on both fluid and T1, connected to a seed.

    With `own_reference` (no contralateral limb in the field of view) the limb's own marrow
    holds the lesion, so a percentile would follow the lesion: the seed level is then 1.3 x
    the muscle level alone (normal marrow, fatty or red, stays below it on STIR).
    """
    ref_marrow = fluid[ref["marrow"]] if ref["marrow"].any() else fluid[limb["marrow"]]
    if not limb["marrow"].any() or ref_marrow.size == 0:
        return np.zeros_like(limb["limb"]), {}
    seed_thr = 1.3 * muscle_fl
    if not own_reference:
        seed_thr = max(seed_thr, float(np.percentile(ref_marrow, settings.lesion_seed_percentile)))
    t1_ok = t1 <= settings.lesion_t1_max_rel_muscle * limb["t1_muscle"]
    seeds = limb["marrow"] & (fluid > seed_thr) & t1_ok
    if not seeds.any():
        return np.zeros_like(limb["limb"]), {"seed_threshold": seed_thr}
    core_fl = float(np.median(fluid[seeds]))
    core_t1 = float(np.median(t1[seeds]))
    if own_reference or not ref["marrow"].any():
        # the limb's own normal marrow: away from the seeds and their partial-volume rim
        near = ndimage.binary_dilation(seeds, structure=np.ones((3, 3, 3), bool), iterations=2)
        ref_region = limb["marrow"] & ~near
    else:
        ref_region = ref["marrow"]
    bg_fl = _per_slice_median(fluid, ref_region)[:, None, None]
    bg_t1 = _per_slice_median(t1, ref_region)[:, None, None]
    closer = (fluid > 0.5 * (core_fl + bg_fl)) & limb["bone"]
    # T1 separates lesion from marrow only where marrow is clearly brighter (fatty marrow on
    # a T1 spin echo); on gradient-echo images marrow sits near muscle, as the lesion does,
    # and half-way between them cuts the lesion in two
    t1_contrast = 1.0 - core_t1 / max(float(np.nanmedian(bg_t1)), 1e-6)
    if t1_contrast >= 0.25:
        closer &= t1 < 0.5 * (core_t1 + bg_t1)
    lab, _ = ndimage.label(closer | seeds)
    keep = np.unique(lab[seeds])
    lesion = np.isin(lab, keep[keep > 0])
    lesion = _remove_small(lesion, settings.min_lesion_component_mm3, voxel_mm3)
    return lesion, dict(
        seed_threshold=seed_thr,
        core_fluid=core_fl,
        core_t1=core_t1,
        marrow_reference_fluid=float(np.nanmedian(bg_fl)),
        marrow_reference_t1=float(np.nanmedian(bg_t1)),
        t1_contrast=t1_contrast,
    )


def edema_mask(
    t1: FloatArray,
    fluid: FloatArray,
    limb: dict[str, Any],
    ref_soft: FloatArray,
    muscle_fl: float,
    settings: SegmentSettings,
    voxel_mm3: float,
    own_reference: bool = False,
    mirror: MirroredReference | None = None,
) -> tuple[BoolArray, dict[str, Any]]:
    """Edema of one limb: soft tissue brighter on the fluid image than the contralateral soft
    tissue's `edema_seed_percentile` (seeds), grown down to half-way between muscle and
    edematous muscle. The edematous-muscle level is re-estimated from the grown region (seeds
    alone are biased upward by the seed threshold); specks are removed. With `own_reference`
    (one limb only) the seed level is `edema_seed_min_rel_muscle` x muscle alone.

    With `mirror` (the contralateral limb mirrored onto this one, :mod:`pipeline.mirror`)
    edema must also be brighter than the same place of the healthy limb: seeds by
    `edema_mirror_seed_ratio`, growth by `edema_mirror_grow_ratio` over the brightest mirrored
    value nearby, so that a muscle that is bright in both limbs is not edema."""
    if ref_soft.size == 0:
        return np.zeros_like(limb["limb"]), {}
    seed_thr = settings.edema_seed_min_rel_muscle * muscle_fl
    if not own_reference and mirror is None:
        # without a voxel-wise control, the control limb's brightest soft tissue sets the bar
        seed_thr = max(seed_thr, float(np.percentile(ref_soft, settings.edema_seed_percentile)))
    allowed = limb["soft"]
    seeds = limb["soft"] & (fluid > seed_thr)
    if mirror is not None:
        seeds &= ~mirror.valid | (fluid > settings.edema_mirror_seed_ratio * mirror.local_max)
        if settings.edema_mirror_grow_ratio > 0:
            allowed = allowed & (
                ~mirror.valid | (fluid > settings.edema_mirror_grow_ratio * mirror.local_max))
    if not seeds.any():
        return np.zeros_like(limb["limb"]), {"seed_threshold": seed_thr}
    # Edematous muscle sets the level (muscle-like T1); fluid strands in fat are brighter and
    # half-way to muscle is also close to half-way to fat for them.
    muscle_like = np.abs(t1 / limb["t1_muscle"] - 1.0) < 0.4
    region = seeds
    core = low = 0.0
    for _ in range(3):
        vals = fluid[region & muscle_like]
        core = float(np.median(vals if vals.size > 20 else fluid[region]))
        low = max(muscle_fl + settings.edema_grow_fraction * (core - muscle_fl), 1.2 * muscle_fl)
        region = _hysteresis(fluid, allowed, low, seed_thr) & seeds_reach(seeds, allowed)
    edema = _remove_small(region, settings.min_edema_component_mm3, voxel_mm3)
    return edema, dict(
        seed_threshold=seed_thr, low_threshold=low, core=core, muscle_reference=muscle_fl
    )


def _column_band(limb: BoolArray, margin_px: int) -> BoolArray:
    """The columns (x) a limb occupies in any slice, widened by `margin_px`, over every row and
    slice: where that limb's signal is looked for even on a slice where its outline failed."""
    cols = ndimage.binary_dilation(limb.any(axis=(0, 1)), iterations=margin_px)
    return np.broadcast_to(cols[None, None, :], limb.shape)


#: The anatomical image locates fat for the fluid check only when its fat ring is brighter
#: than the deep tissue by this much; a proton-density-like image (a 5-degree Dixon in-phase
#: echo: ring/deep 1.00-1.03) cannot tell fat from muscle by brightness.
T1_LOCATES_FAT: Final = 1.08


def _contrast_checks(
    t1: FloatArray,
    fluid: FloatArray,
    per_side: dict[str, dict[str, Any]],
    pixel_mm: float,
    settings: SegmentSettings,
) -> dict[str, Any]:
    """Subcutaneous fat against muscle on both images (both limbs pooled).

    Fat is located by position (1.5-5 mm inside the skin, :func:`pipeline.qc.
    subcutaneous_ring`), muscle as deep tissue away from bone; each ratio is of medians.

    - anatomical: ring / deep. T1 spin echo and Dixon in-phase 1.0-2; out-of-phase echoes
      0.82-0.88 and fat-suppressed or water images 0.1-0.5 are not T1-like.
    - fluid: where the anatomical image is clearly T1-like (ring / deep >=
      :data:`T1_LOCATES_FAT`), fat is its bright part of the ring and muscle its muscle-like
      deep tissue; otherwise the ring and the deep tissue themselves. STIR and Dixon water
      0.1-0.55, an unsuppressed echo 0.73-1.4.
    """
    if not per_side:
        return {}
    ring = np.zeros(t1.shape, bool)
    deep = np.zeros(t1.shape, bool)
    for s in per_side.values():
        ring |= qc_mod.subcutaneous_ring(s["limb"], pixel_mm)
        deep |= qc_mod.deep_tissue(s["limb"], s["bone"], pixel_mm)
    t1_ratio = qc_mod.contrast_ratio(t1, ring, deep)
    if t1_ratio is None:
        return {}
    fat_vox, muscle_vox, located = ring, deep, False
    if t1_ratio >= T1_LOCATES_FAT:
        muscle = float(np.mean([s["t1_muscle"] for s in per_side.values()]))
        fat = float(np.mean([s["t1_fat"] for s in per_side.values()]))
        fat_vox = ring & (t1 > 0.5 * (muscle + fat))
        muscle_vox = deep & (np.abs(t1 / muscle - 1.0) < 0.25)
        located = bool(fat_vox.sum() > 50 and muscle_vox.sum() > 50)
        if not located:
            fat_vox, muscle_vox = ring, deep
    fluid_ratio = qc_mod.contrast_ratio(fluid, fat_vox, muscle_vox)
    return {"t1_fat_to_muscle": t1_ratio, "fluid_fat_to_muscle": fluid_ratio,
            "fat_located_by": "T1-bright voxels of the ring" if located else "position"}


def segment_arrays(
    t1: FloatArray,
    fluid: FloatArray,
    spacing_zyx_mm: tuple[float, float, float],
    x_of_column_mm: FloatArray,
    settings: SegmentSettings,
    raw: tuple[FloatArray, FloatArray] | None = None,
) -> tuple[NDArray[np.uint8], dict[str, Any]]:
    """Label map (Z, Y, X) from bias-corrected T1 and fluid images on one axial grid.

    `raw` holds the same images before bias correction (the signal checks need the coil's
    fall-off that the correction removes); without it the corrected images stand in. QC flags
    (:mod:`pipeline.qc`) go to ``qc['qc_flags']``.
    """
    qc: dict[str, Any] = {}
    voxel_mm3 = float(np.prod(spacing_zyx_mm))
    pixel_mm = float(np.sqrt(spacing_zyx_mm[1] * spacing_zyx_mm[2]))
    limbs = limb_masks(t1, spacing_zyx_mm, x_of_column_mm, settings, qc)
    flags: list[qc_mod.QCFlag] = []
    n_slices = t1.shape[0]
    raw_t1, raw_fluid = raw if raw is not None else (t1, fluid)
    for side in ("right", "left"):
        limb = limbs[side]
        if limb.sum() * voxel_mm3 <= 10_000:
            continue
        band = _column_band(limb, margin_px=max(2, int(round(10.0 / pixel_mm))))
        levels = [qc_mod.slice_signal(raw_t1, band), qc_mod.slice_signal(raw_fluid, band)]
        void = qc_mod.void_slices(levels, settings.signal_void_fraction)
        limb[void] = False
        cut = qc_mod.border_contact_slices(limb, pixel_mm, settings.min_fov_contact_mm)
        for flag in (qc_mod.void_flag(side, void, n_slices, settings.signal_void_fraction),
                     qc_mod.fov_flag(side, cut, n_slices)):
            if flag is not None:
                flags.append(flag)
    present = [s for s in ("right", "left") if limbs[s].sum() * voxel_mm3 > 10_000]
    qc["sides_present"] = present
    labels = np.zeros(t1.shape, dtype=np.uint8)
    per_side: dict[str, dict[str, Any]] = {}
    for side in present:
        limb = limbs[side]
        muscle, fat = _muscle_level_t1(t1, limb)
        bone = bone_mask(t1, limb, muscle, pixel_mm) & limb
        cortex = bone & (t1 < 0.5 * muscle)
        marrow = bone & ~ndimage.binary_dilation(cortex, structure=np.ones((1, 3, 3), bool))
        soft = limb & ~bone
        per_side[side] = dict(
            limb=limb, bone=bone, marrow=marrow, soft=soft, t1_muscle=muscle, t1_fat=fat
        )
    contrast = _contrast_checks(t1, fluid, per_side, pixel_mm, settings)
    qc["contrast"] = contrast
    for flag in (
        qc_mod.t1_like_flag(contrast.get("t1_fat_to_muscle"), settings.t1_like_min_fat_ratio),
        qc_mod.fat_suppression_flag(
            contrast.get("fluid_fat_to_muscle"), settings.fat_suppressed_max_fat_ratio
        ),
    ):
        if flag is not None:
            flags.append(flag)
    qc["qc_flags"] = [f.to_json() for f in flags]
    fluid_usable = not any(f.code == qc_mod.FLUID_NOT_FAT_SUPPRESSED for f in flags)
    mirrors: dict[str, MirroredReference] = {}
    if fluid_usable and "left" in per_side and "right" in per_side:
        pair = mirrored_references(
            t1, fluid, (per_side["left"]["limb"], per_side["right"]["limb"]),
            (per_side["left"]["bone"], per_side["right"]["bone"]), spacing_zyx_mm)
        if pair is not None:
            mirrors = {"left": pair[0], "right": pair[1]}
    for side in present:
        s = per_side[side]
        # The contralateral limb is the patient's own control; with one limb only, the same
        # limb's robust levels stand in.
        contra = per_side.get("left" if side == "right" else "right")
        ref = contra or s
        soft_vals = fluid[ref["soft"]]
        soft_vals = soft_vals[soft_vals > 0]
        muscle_fl = _muscle_level_fluid(soft_vals)
        if fluid_usable:
            lesion, lesion_info = marrow_lesion(
                t1, fluid, s, ref, muscle_fl, settings, voxel_mm3, own_reference=contra is None
            )
            mirror = mirrors.get(side)
            usable_mirror = (mirror is not None
                             and mirror.bone_dice >= settings.edema_mirror_min_bone_dice)
            edema, edema_info = edema_mask(
                t1, fluid, s, soft_vals, muscle_fl, settings, voxel_mm3,
                own_reference=contra is None, mirror=mirror if usable_mirror else None,
            )
            edema_info["mirror_bone_dice"] = None if mirror is None else mirror.bone_dice
            edema_info["mirror_used"] = usable_mirror
        else:  # fat would read as fluid: not measured (qc flag), never a guess
            lesion = edema = np.zeros_like(s["limb"])
            lesion_info = edema_info = {"not measured": qc_mod.FLUID_NOT_FAT_SUPPRESSED}
        off = SIDE_OFFSET[side]
        labels[s["limb"]] = off + SOFT_TISSUE
        labels[edema & s["soft"]] = off + EDEMA
        labels[s["bone"]] = off + BONE
        labels[lesion & s["bone"]] = off + LESION
        qc[side] = dict(
            t1_muscle=s["t1_muscle"],
            t1_fat=s["t1_fat"],
            fluid_muscle=muscle_fl,
            lesion=lesion_info,
            edema=edema_info,
            bone_slices=int(s["bone"].any(axis=(1, 2)).sum()),
            limb_slices=int(s["limb"].any(axis=(1, 2)).sum()),
        )
    return labels, qc


def segment_session(
    t1_path: str | Path, fluid_path: str | Path, settings: SegmentSettings | None = None
) -> SegmentResult:
    """Segment one session; the label map is on the fluid-sensitive image's grid."""
    settings = settings or SegmentSettings()
    t_start = time.perf_counter()
    fluid_native = read_image(fluid_path)
    t1_native = read_image(t1_path)
    # Work on an LPS-ordered copy so that axis 0 of the array runs inferior-superior (axial
    # slices); permutations and flips only, undone at the end.
    check_overlap(t1_native, fluid_native, Path(t1_path).name, Path(fluid_path).name)
    fluid = sitk.DICOMOrient(fluid_native, "LPS")
    t1 = resample_to(t1_native, fluid)
    warnings: list[str] = []
    if t1 is not t1_native:
        warnings.append("T1-weighted series resampled onto the fluid-sensitive grid")

    t1_arr = sitk.GetArrayFromImage(t1)
    otsu = sitk.OtsuThreshold(t1, 0, 1)
    log_bias = n4_log_bias(t1, otsu, settings)
    gain = np.exp(sitk.GetArrayFromImage(log_bias)).astype(np.float32)
    t1c = (t1_arr / gain).astype(np.float32)
    fluid_c = (sitk.GetArrayFromImage(fluid) / gain).astype(np.float32)
    t_n4 = time.perf_counter()

    spacing_xyz = fluid.GetSpacing()
    spacing_zyx = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    nx, ny, nz = fluid.GetSize()
    x_of_column = np.array(
        [
            fluid.TransformContinuousIndexToPhysicalPoint((i, (ny - 1) / 2, (nz - 1) / 2))[0]
            for i in range(nx)
        ],
        dtype=np.float32,
    )
    labels_arr, qc = segment_arrays(
        t1c, fluid_c, spacing_zyx, x_of_column, settings,
        raw=(t1_arr, sitk.GetArrayFromImage(fluid)),
    )
    t_seg = time.perf_counter()

    labels = sitk.GetImageFromArray(labels_arr)
    labels.CopyInformation(fluid)
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    # Back onto the fluid series' own orientation.
    labels = sitk.Resample(
        labels, fluid_native, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    if len(qc["sides_present"]) < 2:
        warnings.append(f"only {len(qc['sides_present'])} limb(s) found in the field of view")
    qc.update(
        warnings=warnings,
        bias_gain_range=[float(gain.min()), float(gain.max())],
        seconds={"n4": round(t_n4 - t_start, 2), "segment": round(t_seg - t_n4, 2)},
        settings={
            k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()
        },
        software=f"limbtrack {__version__}",
    )
    return SegmentResult(labels, qc)


def write_labels(result: SegmentResult, out_path: str | Path, qc_path: str | Path) -> None:
    """Write the label map (uint8 NIfTI) and its QC sidecar atomically."""
    with atomic_path(out_path) as tmp:
        sitk.WriteImage(result.labels, str(tmp), useCompression=True)
    write_json_atomic(qc_path, _jsonable(result.qc))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return round(float(obj), 4)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def settings_from_json(text: str | None) -> SegmentSettings:
    """Settings from a JSON object (config 'segment' section); unknown keys are refused."""
    if not text:
        return SegmentSettings()
    values = json.loads(text)
    known = SegmentSettings.__dataclass_fields__
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown segment settings: {', '.join(unknown)}")
    if "n4_iterations" in values:
        values["n4_iterations"] = tuple(values["n4_iterations"])
    return SegmentSettings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="limbtrack segment", description=__doc__.split("\n")[0])
    p.add_argument("--t1", required=True, type=Path)
    p.add_argument("--fluid", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="label map .nii.gz")
    p.add_argument("--qc", required=True, type=Path, help="QC sidecar .json")
    p.add_argument("--settings-json", default=None, help="segment settings as a JSON object")
    args = p.parse_args(argv)
    try:
        result = segment_session(args.t1, args.fluid, settings_from_json(args.settings_json))
    except NoOverlapError as err:
        # that session only: an empty label map and an exclude flag; the others go on
        print(f"WARNING {err}", file=sys.stderr)
        result = not_segmented(args.fluid, str(err))
    write_labels(result, args.out, args.qc)
    return 0


def not_segmented(fluid_path: str | Path, reason: str) -> SegmentResult:
    """An empty label map on the fluid grid with the ``images_do_not_overlap`` exclude flag."""
    fluid = sitk.ReadImage(str(fluid_path))  # the label map is on the native fluid grid
    labels = sitk.Image(fluid.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(fluid)
    flag = qc_mod.QCFlag("", qc_mod.BOTH, qc_mod.IMAGES_DO_NOT_OVERLAP, "exclude", reason)
    return SegmentResult(labels, {"qc_flags": [flag.to_json()], "warnings": [reason]})


if __name__ == "__main__":
    raise SystemExit(main())
