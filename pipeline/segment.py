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
3. Bone (:mod:`pipeline.bone`): the dark cortical ring on T1 (below half the muscle level),
   thin septa removed by an opening, holes filled: cortex plus marrow cavity.
4. Marrow lesion: marrow voxels whose fluid signal exceeds a high percentile of the
   contralateral marrow's (``lesion_seed_percentile``; seeds), with T1 at or below
   muscle-plus-partial-volume, grown down to half-way between lesion and marrow.
5. Edema: soft tissue whose fluid signal exceeds a high percentile of the contralateral soft
   tissue's (``edema_seed_percentile``) or the same place of the mirrored contralateral limb
   (seeds), grown by hysteresis toward muscle (``edema_grow_fraction``), specks removed. One
   limb alone is its own reference: the mode of its deep muscle and that peak's lower side,
   which edema cannot reach.

The settings (``segment:`` of config/config.yaml) are :class:`SegmentSettings`; the fixed
numbers of the method are the module's constants, each with its reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage, special
from skimage import filters, morphology, segmentation

from pipeline import __version__
from pipeline import qc as qc_mod
from pipeline.bone import CORTEX_LEVELS, bone_mask
from pipeline.geometry import orient_lps, resample_onto
from pipeline.io.files import atomic_path, write_json_atomic
from pipeline.labels import BONE, EDEMA, LESION, SIDE_OFFSET, SOFT_TISSUE
from pipeline.mirror import MirroredReference, mirrored_references
from pipeline.settings import ConfigSection

BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float32]

# The fixed numbers of the method, each with its reason; the ones a user tunes are settings
# (SegmentSettings, config/config.yaml).

#: In-plane 3 x 3 neighbourhood: slices are thick, so outlines are shaped slice by slice.
_PLANE: Final = np.ones((1, 3, 3), bool)
#: 3-D 26-neighbourhood (the lesion's partial-volume rim spreads across slices too).
_CUBE: Final = np.ones((3, 3, 3), bool)

# N4 bias field
#: N4's shrunk image keeps at least this many pixels in-plane (a 96-pixel matrix is shrunk
#: by 2 at most), so the B-spline mesh keeps several pixels per span.
N4_MIN_PIXELS_PER_SHRINK: Final = 48
#: Control points along z (the fewest): more let the field bend at the end slices, where it
#: hid the thin metaphyseal cortex of the phantom's last slice.
N4_CONTROL_POINTS_Z: Final = 4
#: Slices are shrunk only when at least this many remain (as many as the control points).
N4_MIN_SHRUNK_SLICES: Final = 4

# Body outline (body_mask)
#: Air fills at least this share (%) of a limb field of view: this percentile of T1 is the
#: air level.
AIR_PERCENTILE: Final = 30.0
#: The brightest tissue (fat), short of the few hottest voxels.
BRIGHT_PERCENTILE: Final = 99.5
#: The rough outline (topology only): 12 % of the way from air to the brightest tissue, low
#: enough that dark strands crossing the fat do not cut the limb.
ROUGH_FRACTION: Final = 0.12
#: Background is measured this many voxels beyond the rough outline, clear of its edge.
BACKGROUND_GAP_PX: Final = 3
#: The skin edge is refined within this many voxels on either side of the rough outline.
EDGE_BAND_PX: Final = 2
#: The first inner voxel layer is averaged over this window (voxels, in-plane): a local level
#: that follows shading along the outline.
INNER_LAYER_WINDOW_PX: Final = 7
#: Below this fraction of the window on the layer, there is no layer nearby (the brightest
#: level stands in).
_MIN_LAYER_WEIGHT: Final = 1e-3

# Two touching limbs (limb_masks, split_touching)
#: A lone component at least this much wider (x) than tall (y) may be two limbs side by side
#: (one limb is about round; two touching are about twice as wide as tall).
TOUCHING_MIN_ASPECT: Final = 1.4
#: Components narrower than this (columns) are not split: too small to hold two limbs.
MIN_SPLIT_WIDTH_PX: Final = 10
#: The waist is looked for in the middle of the component, this fraction of its width away
#: from either end (the ends taper in every limb).
WAIST_SEARCH_END_FRACTION: Final = 0.25
#: A waist is two limbs when it is narrower than this fraction of the thinner side's widest
#: column; a shallower dip is one limb's own shape.
MAX_WAIST_RATIO: Final = 0.85
#: A limb holds at least this volume (mm^3, 10 mL) in view; less is a fragment, not a limb:
#: neither measured nor checked.
MIN_LIMB_VOLUME_MM3: Final = 10_000.0

# Tissue levels
#: On T1 fat is the brightest tissue: its level is this percentile of the limb's signal.
FAT_PERCENTILE: Final = 97.0
#: Signal below this fraction of fat is air or cortex, left out of the muscle / fat split.
TISSUE_MIN_REL_FAT: Final = 0.15
#: Fewer soft-tissue values than this have no histogram mode: their median stands in.
MIN_VALUES_FOR_MODE: Final = 10
#: The fluid-signal histogram whose mode is muscle: bins, and Gaussian smoothing (bins) so
#: that noise does not pick a spike.
MODE_HISTOGRAM_BINS: Final = 128
MODE_SMOOTHING_BINS: Final = 2.0
#: Cortex, for the marrow cavity: T1 below the lowest cortex level of the bone search.
CORTEX_MAX_REL_MUSCLE: Final = CORTEX_LEVELS[0]

# Marrow lesion
#: Seed level with the limb as its own reference: 1.3 x muscle on the fluid image (normal
#: marrow, fatty or red, stays below it on STIR).
LESION_SEED_MIN_REL_MUSCLE: Final = 1.3
#: The seeds' partial-volume rim (voxels, 3-D) left out of the limb's own reference marrow.
LESION_RIM_PX: Final = 2
#: T1 separates lesion from marrow only where marrow is at least this much (fraction)
#: brighter than the lesion (fatty marrow on a T1 spin echo); on gradient-echo images marrow
#: sits near muscle, as the lesion does, and half-way between them cuts the lesion in two.
MIN_MARROW_T1_CONTRAST: Final = 0.25
#: Guards the T1 contrast against a reference marrow without signal.
_MIN_MARROW_T1: Final = 1e-6

# Edema
#: Muscle-like T1: within this fraction of the muscle level (edematous muscle's T1 shifts a
#: little; fat and fluid strands are far off).
EDEMA_MUSCLE_LIKE_T1_TOLERANCE: Final = 0.4
#: Fewer muscle-like voxels than this in the region: the whole region sets the level.
MIN_MUSCLE_LIKE_VOXELS: Final = 20
#: Rounds of growing and re-estimating the edematous-muscle level (it settles in three).
EDEMA_LEVEL_ROUNDS: Final = 3
#: Edema never grows below this multiple of muscle (normal muscle's noise and shading).
EDEMA_GROW_MIN_REL_MUSCLE: Final = 1.2

# Contrast checks (_contrast_checks)
#: The anatomical image locates fat for the fluid check only when its fat ring is brighter
#: than the deep tissue by this much; a proton-density-like image (a 5-degree Dixon in-phase
#: echo: ring/deep 1.00-1.03) cannot tell fat from muscle by brightness.
T1_LOCATES_FAT: Final = 1.08
#: Muscle voxels for the fluid check: T1 within this fraction of the muscle level.
CONTRAST_MUSCLE_T1_TOLERANCE: Final = 0.25
#: Fat and muscle located by T1 need more than this many voxels each; fewer, and position
#: (ring and deep tissue) locates them instead.
MIN_LOCATED_VOXELS: Final = 50

# Signal checks (_signal_and_fov_checks)
#: A limb's signal is looked for in its columns widened by this margin (mm; at least
#: MIN_COLUMN_MARGIN_PX voxels), so a slice whose outline failed is still seen.
COLUMN_MARGIN_MM: Final = 10.0
MIN_COLUMN_MARGIN_PX: Final = 2

#: Decimals of the floating-point values of the QC sidecar (the statistics are not that
#: precise, and rounding keeps the file stable across platforms).
QC_DECIMALS: Final = 4


@dataclass(frozen=True)
class SegmentSettings(ConfigSection):
    """The tunable settings of the config section ``segment:``.

    Defaults: config/config.yaml, the one place they are written (:meth:`default` reads them);
    meanings and units: config/schema.yaml.
    """

    SECTION: ClassVar[str] = "segment"

    n4_shrink: int
    n4_iterations: tuple[int, ...]
    n4_control_points: int
    min_limb_area_mm2: float
    edge_fraction: float
    lesion_seed_percentile: float
    lesion_t1_max_rel_muscle: float
    edema_seed_percentile: float
    edema_seed_min_rel_muscle: float
    min_lesion_component_mm3: float
    min_edema_component_mm3: float
    edema_grow_fraction: float
    edema_mirror_seed_ratio: float
    edema_mirror_grow_ratio: float
    edema_mirror_min_bone_dice: float
    signal_void_fraction: float
    min_fov_contact_mm: float
    t1_like_min_fat_ratio: float
    fat_suppressed_max_fat_ratio: float


@dataclass(frozen=True)
class LimbTissues:
    """One limb's masks (Z, Y, X) and its T1 tissue levels (image signal units).

    ``marrow`` is the bone's cavity (bone away from its dark cortex); ``soft_tissue`` is the
    limb less its bones.
    """

    limb: BoolArray
    bone: BoolArray
    marrow: BoolArray
    soft_tissue: BoolArray
    t1_muscle_level: float
    t1_fat_level: float


@dataclass(frozen=True)
class SideFindings:
    """What the fluid image shows in one limb: marrow lesion and edema masks (Z, Y, X), the
    fluid muscle level they were measured against (image signal units), and each step's
    numbers for the QC sidecar."""

    lesion: BoolArray
    edema: BoolArray
    fluid_muscle_level: float
    lesion_qc: dict[str, Any]
    edema_qc: dict[str, Any]


@dataclass(frozen=True)
class OwnMuscleReference:
    """One limb as its own reference: its normal muscle on the fluid image (signal units).

    ``level`` is the mode, ``sd`` the spread of normal muscle about it, read on the lower side
    of its histogram peak only (edema is brighter than muscle: it cannot widen that side).
    """

    level: float
    sd: float


@dataclass
class SegmentResult:
    """Label map (SimpleITK image on the fluid grid) and QC statistics."""

    labels: sitk.Image
    qc: dict[str, Any] = field(default_factory=dict)


def read_image(path: str | Path) -> sitk.Image:
    """Read an image as float32 with its geometry."""
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


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
    mesh keeps :data:`N4_CONTROL_POINTS_Z`.
    """
    size = image.GetSize()
    shrink = max(1, min(settings.n4_shrink, min(size[0], size[1]) // N4_MIN_PIXELS_PER_SHRINK))
    shrink_z = 1 if size[2] < N4_MIN_SHRUNK_SLICES * shrink else shrink
    factors = [shrink, shrink, shrink_z]
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask, factors)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(settings.n4_iterations))
    cp = settings.n4_control_points
    corrector.SetNumberOfControlPoints([cp, cp, N4_CONTROL_POINTS_Z])
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


def body_mask(t1: FloatArray, edge_fraction: float) -> tuple[BoolArray, dict[str, float]]:
    """Everything that is not air (Z, Y, X), with the skin edge placed at half maximum.

    A low threshold (:data:`ROUGH_FRACTION` of the way from air to the brightest tissue) with
    holes filled per
    slice gives the topology, robust to dark strands crossing the fat. The outer edge is then
    refined voxel by voxel: a voxel in the boundary band belongs to the limb when its signal is
    at least `edge_fraction` of the way from air to the tissue just inside it (mean of the first
    inner voxel layer within 7 x 7 voxels). That layer mixes skin with the brighter
    subcutaneous fat, while a voxel on the edge holds mostly skin (on T1 about half as bright
    as fat), so the edge at 50 % partial volume is at about half the *skin* level, a quarter
    of the way to the layer: 0.25 keeps the limb volume within 0.15 % for pixels of 0.9 to
    1.8 mm and slices of 4 to 6 mm on the phantom (skin 1.2 mm at half the fat signal).
    """
    air = float(np.percentile(t1, AIR_PERCENTILE))
    hi = float(np.percentile(t1, BRIGHT_PERCENTILE))
    rough_threshold = air + ROUGH_FRACTION * (hi - air)
    rough = _fill_per_slice(t1 > rough_threshold)
    rough = ndimage.binary_opening(rough, structure=_PLANE)
    outside = ~ndimage.binary_dilation(rough, structure=_PLANE, iterations=BACKGROUND_GAP_PX)
    bg = float(np.mean(t1[outside])) if outside.any() else air
    core = ndimage.binary_erosion(rough, structure=_PLANE, iterations=EDGE_BAND_PX)
    # The reference is the first voxel layer fully inside the skin edge: thin, dimmer skin
    # dominates it, as it dominates the partial-volume voxels on the edge.
    layer = ndimage.binary_erosion(rough, structure=_PLANE) & ~core
    window = (1, INNER_LAYER_WINDOW_PX, INNER_LAYER_WINDOW_PX)
    weight = ndimage.uniform_filter(layer.astype(np.float32), size=window)
    local = ndimage.uniform_filter(np.where(layer, t1, 0).astype(np.float32), size=window)
    inside_level = np.divide(
        local, weight, out=np.full_like(local, hi), where=weight > _MIN_LAYER_WEIGHT
    )
    band = ndimage.binary_dilation(rough, structure=_PLANE, iterations=EDGE_BAND_PX) & ~core
    edge = band & (t1 >= bg + edge_fraction * (inside_level - bg))
    body = _fill_per_slice(core | edge)
    body = ndimage.binary_opening(body, structure=_PLANE)
    return body, {"background_level": bg, "rough_threshold": rough_threshold}


def _wide(mask2d: BoolArray, min_aspect: float = TOUCHING_MIN_ASPECT) -> bool:
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
    if width < MIN_SPLIT_WIDTH_PX:
        return None
    end = int(width * WAIST_SEARCH_END_FRACTION)
    lo, hi = c0 + end, c1 - end
    waist = lo + int(np.argmin(profile[lo : hi + 1]))
    widest = min(profile[c0:waist].max(), profile[waist : c1 + 1].max())
    if profile[waist] > MAX_WAIST_RATIO * widest:
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
    fat = float(np.percentile(vals, FAT_PERCENTILE))
    tissue = vals[vals > TISSUE_MIN_REL_FAT * fat]
    split = filters.threshold_otsu(tissue)
    return float(np.median(tissue[tissue < split])), float(np.median(tissue[tissue >= split]))


def _half_way(a: Any, b: Any) -> Any:
    """The level half-way between `a` and `b` (scalars or arrays): a signal above it is
    closer to the brighter of the two."""
    return 0.5 * (a + b)


def _within(image: FloatArray, level: float, tolerance: float) -> BoolArray:
    """Voxels of `image` within `tolerance` (a fraction) of `level`."""
    return np.asarray(np.abs(image / level - 1.0) < tolerance)


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


def _smoothed_histogram(values: FloatArray) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Counts of `values` (not empty) smoothed over :data:`MODE_SMOOTHING_BINS`, and the bin
    centres."""
    hist, edges = np.histogram(values, bins=MODE_HISTOGRAM_BINS)
    smooth = ndimage.gaussian_filter1d(hist.astype(float), MODE_SMOOTHING_BINS)
    return smooth, _half_way(edges[:-1], edges[1:])


def _peak(values: FloatArray) -> float:
    """The peak of the smoothed histogram of `values` (not empty)."""
    smooth, centres = _smoothed_histogram(values)
    return float(centres[int(np.argmax(smooth))])


def _too_few_for_mode(values: FloatArray) -> float | None:
    """The median of `values` (0 when empty) when they are too few for a histogram mode."""
    if values.size >= MIN_VALUES_FOR_MODE:
        return None
    return float(np.median(values)) if values.size else 0.0


def _muscle_level_fluid(values: FloatArray) -> float:
    """Muscle signal on the fluid image of a healthy (contralateral) limb: the histogram mode
    of the brighter Otsu class of its soft tissue (fat is the darker class on fat-suppressed
    images)."""
    few = _too_few_for_mode(values)
    if few is not None:
        return few
    return _peak(values[values >= filters.threshold_otsu(values)])


def _peak_and_lower_sd(values: FloatArray) -> OwnMuscleReference:
    """The peak of the smoothed histogram of `values` (not empty) and the sd of a normal peak
    as wide on its lower side: half-width at half-maximum below the peak / 1.177, the
    smoothing taken out (0 when the histogram does not fall to half below the peak)."""
    smooth, centres = _smoothed_histogram(values)
    k = int(np.argmax(smooth))
    half = 0.5 * smooth[k]
    under = np.nonzero(smooth[:k] < half)[0]
    if under.size == 0:
        return OwnMuscleReference(float(centres[k]), 0.0)
    j = int(under[-1])  # smooth[j] < half <= smooth[j + 1]
    width = float(centres[1] - centres[0])
    at_half = centres[j] + (half - smooth[j]) / (smooth[j + 1] - smooth[j]) * width
    sd_smoothed = (centres[k] - at_half) / np.sqrt(2.0 * np.log(2.0))
    sd = np.sqrt(max(0.0, sd_smoothed**2 - (MODE_SMOOTHING_BINS * width) ** 2))
    return OwnMuscleReference(float(centres[k]), float(sd))


def own_muscle_reference(
    fluid: FloatArray, limb: LimbTissues, pixel_mm: float
) -> OwnMuscleReference:
    """The normal muscle of a limb that is its own reference (no contralateral limb).

    Muscle is located by position, deep in the limb (:func:`pipeline.qc.deep_tissue`), and
    the mode of its fluid signal is the level: normal muscle stays the larger peak in a flare
    (phantom affonly day 6: 31 % of the deep tissue edematous, mode 366 for a muscle at 371).
    The spread is read on the peak's lower side, which edema (brighter) cannot widen.
    The brighter Otsu class of the soft tissue, the reference of a healthy limb, is edematous
    muscle itself in such a flare (its mode read 680; 7 of 303 mL of edema were found). T1
    does not locate muscle reliably enough for this: on real thighs with little fat, its Otsu
    split put the muscle level at two thirds of the muscle's T1 (hybrid thigh cases).
    """
    soft = limb.soft_tissue & (fluid > 0)
    deep = qc_mod.deep_tissue(limb.limb, limb.bone, pixel_mm) & soft
    values = fluid[deep] if deep.sum() >= MIN_VALUES_FOR_MODE else fluid[soft]
    ring = qc_mod.subcutaneous_ring(limb.limb, pixel_mm) & soft
    if values.size and ring.any():
        # fat is dark on a fat-suppressed image: deep voxels nearer the subcutaneous fat's
        # level than the deep tissue's median are fat (intermuscular, or fatty marrow the
        # bone outline missed: 25 % of a real calf's deep tissue)
        fat_level = float(np.median(fluid[ring]))
        values = values[values > _half_way(fat_level, float(np.median(values)))]
    few = _too_few_for_mode(values)
    if few is not None:
        return OwnMuscleReference(few, 0.0)
    return _peak_and_lower_sd(values)


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
    limb: LimbTissues,
    ref: LimbTissues,
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
    holds the lesion, so a percentile would follow the lesion: the seed level is then
    :data:`LESION_SEED_MIN_REL_MUSCLE` x the muscle level alone (normal marrow, fatty or red,
    stays below it on STIR).
    """
    ref_marrow = fluid[ref.marrow] if ref.marrow.any() else fluid[limb.marrow]
    if not limb.marrow.any() or ref_marrow.size == 0:
        return np.zeros_like(limb.limb), {}
    seed_thr = LESION_SEED_MIN_REL_MUSCLE * muscle_fl
    if not own_reference:
        seed_thr = max(seed_thr, float(np.percentile(ref_marrow, settings.lesion_seed_percentile)))
    t1_ok = t1 <= settings.lesion_t1_max_rel_muscle * limb.t1_muscle_level
    seeds = limb.marrow & (fluid > seed_thr) & t1_ok
    if not seeds.any():
        return np.zeros_like(limb.limb), {"seed_threshold": seed_thr}
    if own_reference or not ref.marrow.any():
        # the limb's own normal marrow: away from the seeds and their partial-volume rim
        near = ndimage.binary_dilation(seeds, structure=_CUBE, iterations=LESION_RIM_PX)
        ref_region = limb.marrow & ~near
    else:
        ref_region = ref.marrow
    lesion, info = _grow_lesion(t1, fluid, seeds, limb.bone, ref_region)
    lesion = _remove_small(lesion, settings.min_lesion_component_mm3, voxel_mm3)
    return lesion, {"seed_threshold": seed_thr, **info}


def _grow_lesion(
    t1: FloatArray, fluid: FloatArray, seeds: BoolArray, bone: BoolArray, ref_region: BoolArray
) -> tuple[BoolArray, dict[str, Any]]:
    """The voxels of `bone` connected to `seeds` that are closer to the lesion's level than to
    the reference marrow's of the same slice: on the fluid image always, on T1 where marrow
    is clearly brighter than the lesion (:data:`MIN_MARROW_T1_CONTRAST`)."""
    core_fl = float(np.median(fluid[seeds]))
    core_t1 = float(np.median(t1[seeds]))
    bg_fl = _per_slice_median(fluid, ref_region)[:, None, None]
    bg_t1 = _per_slice_median(t1, ref_region)[:, None, None]
    closer = (fluid > _half_way(core_fl, bg_fl)) & bone
    t1_contrast = 1.0 - core_t1 / max(float(np.nanmedian(bg_t1)), _MIN_MARROW_T1)
    if t1_contrast >= MIN_MARROW_T1_CONTRAST:
        closer &= t1 < _half_way(core_t1, bg_t1)
    lesion = seeds_reach(seeds, closer | seeds)
    return lesion, dict(
        core_fluid=core_fl,
        core_t1=core_t1,
        marrow_reference_fluid=float(np.nanmedian(bg_fl)),
        marrow_reference_t1=float(np.nanmedian(bg_t1)),
        t1_contrast=t1_contrast,
    )


def edema_mask(
    t1: FloatArray,
    fluid: FloatArray,
    limb: LimbTissues,
    ref_soft: FloatArray,
    muscle_fl: float,
    settings: SegmentSettings,
    voxel_mm3: float,
    own_muscle_sd: float | None = None,
    mirror: MirroredReference | None = None,
) -> tuple[BoolArray, dict[str, Any]]:
    """Edema of one limb: soft tissue brighter on the fluid image than the contralateral soft
    tissue's `edema_seed_percentile` (seeds), grown down to half-way between muscle and
    edematous muscle. The edematous-muscle level is re-estimated from the grown region (seeds
    alone are biased upward by the seed threshold); specks are removed.

    With `own_muscle_sd` (one limb only, its own reference: `muscle_fl` and this spread are
    its normal muscle's, :func:`own_muscle_reference`) edema must be brighter than the same
    `edema_seed_percentile` of normal muscle (level + z sd), seeds and growth alike: with no
    voxel-wise control this bound does what the mirrored limb's does with two limbs (with
    1.2 x muscle alone, growth took in the noisy rim of sparse edema: phantom affonlyold day
    20, +17 %, Dice 0.75).

    With `mirror` (the contralateral limb mirrored onto this one, :mod:`pipeline.mirror`)
    edema must also be brighter than the same place of the healthy limb: seeds by
    `edema_mirror_seed_ratio`, growth by `edema_mirror_grow_ratio` over the brightest mirrored
    value nearby, so that a muscle that is bright in both limbs is not edema."""
    if ref_soft.size == 0:
        return np.zeros_like(limb.limb), {}
    seed_thr = settings.edema_seed_min_rel_muscle * muscle_fl
    grow_min = EDEMA_GROW_MIN_REL_MUSCLE * muscle_fl
    if own_muscle_sd is not None:
        # the brightest normal muscle: its edema_seed_percentile, as if normally distributed
        z = float(special.ndtri(settings.edema_seed_percentile / 100.0))
        normal_max = muscle_fl + z * own_muscle_sd
        seed_thr = max(seed_thr, normal_max)
        grow_min = max(grow_min, normal_max)
    elif mirror is None:
        # without a voxel-wise control, the control limb's brightest soft tissue sets the bar
        seed_thr = max(seed_thr, float(np.percentile(ref_soft, settings.edema_seed_percentile)))
    allowed = limb.soft_tissue
    seeds = limb.soft_tissue & (fluid > seed_thr)
    if mirror is not None:
        seeds &= ~mirror.valid | (fluid > settings.edema_mirror_seed_ratio * mirror.local_max)
        if settings.edema_mirror_grow_ratio > 0:
            allowed = allowed & (
                ~mirror.valid | (fluid > settings.edema_mirror_grow_ratio * mirror.local_max))
    if not seeds.any():
        return np.zeros_like(limb.limb), {"seed_threshold": seed_thr}
    # Edematous muscle sets the level (muscle-like T1); fluid strands in fat are brighter and
    # half-way to muscle is also close to half-way to fat for them.
    muscle_like = _within(t1, limb.t1_muscle_level, EDEMA_MUSCLE_LIKE_T1_TOLERANCE)
    region = seeds
    core = low = 0.0
    for _ in range(EDEMA_LEVEL_ROUNDS):
        vals = fluid[region & muscle_like]
        core = float(np.median(vals if vals.size > MIN_MUSCLE_LIKE_VOXELS else fluid[region]))
        low = max(muscle_fl + settings.edema_grow_fraction * (core - muscle_fl), grow_min)
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


def _contrast_checks(
    t1: FloatArray, fluid: FloatArray, tissues: Mapping[str, LimbTissues], pixel_mm: float
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
    if not tissues:
        return {}
    ring = np.zeros(t1.shape, bool)
    deep = np.zeros(t1.shape, bool)
    for s in tissues.values():
        ring |= qc_mod.subcutaneous_ring(s.limb, pixel_mm)
        deep |= qc_mod.deep_tissue(s.limb, s.bone, pixel_mm)
    t1_ratio = qc_mod.contrast_ratio(t1, ring, deep)
    if t1_ratio is None:
        return {}
    fat_vox, muscle_vox, located = ring, deep, False
    if t1_ratio >= T1_LOCATES_FAT:
        muscle = float(np.mean([s.t1_muscle_level for s in tissues.values()]))
        fat = float(np.mean([s.t1_fat_level for s in tissues.values()]))
        fat_vox = ring & (t1 > _half_way(muscle, fat))
        muscle_vox = deep & _within(t1, muscle, CONTRAST_MUSCLE_T1_TOLERANCE)
        located = bool(fat_vox.sum() > MIN_LOCATED_VOXELS
                       and muscle_vox.sum() > MIN_LOCATED_VOXELS)
        if not located:
            fat_vox, muscle_vox = ring, deep
    fluid_ratio = qc_mod.contrast_ratio(fluid, fat_vox, muscle_vox)
    return {"t1_fat_to_muscle": t1_ratio, "fluid_fat_to_muscle": fluid_ratio,
            "fat_located_by": "T1-bright voxels of the ring" if located else "position"}


def _contrast_flags(contrast: Mapping[str, Any], settings: SegmentSettings) -> list[qc_mod.QCFlag]:
    """The flags of :func:`_contrast_checks`' ratios: anatomical image not T1-like, fluid image
    not fat-suppressed."""
    found = (
        qc_mod.t1_like_flag(contrast.get("t1_fat_to_muscle"), settings.t1_like_min_fat_ratio),
        qc_mod.fat_suppression_flag(
            contrast.get("fluid_fat_to_muscle"), settings.fat_suppressed_max_fat_ratio
        ),
    )
    return [f for f in found if f is not None]


def _is_limb(mask: BoolArray, voxel_mm3: float) -> bool:
    """A limb in view, not a fragment (:data:`MIN_LIMB_VOLUME_MM3`)."""
    return bool(mask.sum() * voxel_mm3 > MIN_LIMB_VOLUME_MM3)


def _signal_and_fov_checks(
    limbs: Mapping[str, BoolArray],
    raw_t1: FloatArray,
    raw_fluid: FloatArray,
    voxel_mm3: float,
    pixel_mm: float,
    settings: SegmentSettings,
) -> tuple[dict[str, BoolArray], list[qc_mod.QCFlag]]:
    """Each limb without its void slices (signal below ``signal_void_fraction`` of the typical
    level on either image, :func:`pipeline.qc.void_slices`), and the flags: void slices, limb
    cut by the in-plane edge of the field of view."""
    out = dict(limbs)
    flags: list[qc_mod.QCFlag] = []
    margin_px = max(MIN_COLUMN_MARGIN_PX, int(round(COLUMN_MARGIN_MM / pixel_mm)))
    for side in ("right", "left"):
        if not _is_limb(limbs[side], voxel_mm3):
            continue
        band = _column_band(limbs[side], margin_px)
        levels = [qc_mod.slice_signal(raw_t1, band), qc_mod.slice_signal(raw_fluid, band)]
        void = qc_mod.void_slices(levels, settings.signal_void_fraction)
        limb = limbs[side].copy()
        limb[void] = False
        out[side] = limb
        n_slices = limb.shape[0]
        cut = qc_mod.border_contact_slices(limb, pixel_mm, settings.min_fov_contact_mm)
        # no signal at all: slices the leg's own series does not reach (pipeline/io/split.py
        # leaves them 0), not signal loss
        uncovered = [k for k in void if not np.any(raw_fluid[k][band[k]])]
        lost = [k for k in void if k not in uncovered]
        for flag in (qc_mod.void_flag(side, lost, n_slices, settings.signal_void_fraction),
                     qc_mod.void_flag(side, uncovered, n_slices,
                                      settings.signal_void_fraction, uncovered=True),
                     qc_mod.fov_flag(side, cut, n_slices)):
            if flag is not None:
                flags.append(flag)
    return out, flags


def limb_tissues(t1: FloatArray, limb: BoolArray, pixel_mm: float) -> LimbTissues:
    """One limb's bone, marrow cavity and soft tissue, and its T1 muscle and fat levels."""
    muscle, fat = _muscle_level_t1(t1, limb)
    bone = bone_mask(t1, limb, muscle, pixel_mm) & limb
    cortex = bone & (t1 < CORTEX_MAX_REL_MUSCLE * muscle)
    marrow = bone & ~ndimage.binary_dilation(cortex, structure=_PLANE)
    return LimbTissues(limb=limb, bone=bone, marrow=marrow, soft_tissue=limb & ~bone,
                       t1_muscle_level=muscle, t1_fat_level=fat)


def _mirrored(
    t1: FloatArray,
    fluid: FloatArray,
    tissues: Mapping[str, LimbTissues],
    spacing_zyx_mm: tuple[float, float, float],
) -> dict[str, MirroredReference]:
    """Each limb's mirrored contralateral reference (:mod:`pipeline.mirror`); empty unless
    both limbs are in view."""
    if "left" not in tissues or "right" not in tissues:
        return {}
    left, right = tissues["left"], tissues["right"]
    pair = mirrored_references(
        t1, fluid, (left.limb, right.limb), (left.bone, right.bone), spacing_zyx_mm)
    return {} if pair is None else {"left": pair[0], "right": pair[1]}


def side_findings(
    t1: FloatArray,
    fluid: FloatArray,
    side: str,
    tissues: Mapping[str, LimbTissues],
    mirror: MirroredReference | None,
    fluid_usable: bool,
    settings: SegmentSettings,
    voxel_mm3: float,
    pixel_mm: float,
) -> SideFindings:
    """Marrow lesion and edema of one limb against the contralateral one.

    The contralateral limb is the patient's own control; with one limb only, the same limb's
    robust levels stand in: its deep muscle's mode (:func:`own_muscle_reference`, which edema
    cannot pull up) and its marrow away from the lesion. A fluid image that is not
    fat-suppressed is not measured (its QC flag says so): fat would read as fluid, and a guess
    is never made.
    """
    own = tissues[side]
    contra = tissues.get("left" if side == "right" else "right")
    ref = own if contra is None else contra
    soft_vals = fluid[ref.soft_tissue]
    soft_vals = soft_vals[soft_vals > 0]
    own_muscle = own_muscle_reference(fluid, own, pixel_mm) if contra is None else None
    muscle_fl = _muscle_level_fluid(soft_vals) if own_muscle is None else own_muscle.level
    if not fluid_usable:
        nothing = np.zeros_like(own.limb)
        not_measured = {"not measured": qc_mod.FLUID_NOT_FAT_SUPPRESSED}
        return SideFindings(nothing, nothing, muscle_fl, not_measured, not_measured)
    lesion, lesion_qc = marrow_lesion(
        t1, fluid, own, ref, muscle_fl, settings, voxel_mm3, own_reference=contra is None
    )
    usable_mirror = mirror is not None and mirror.bone_dice >= settings.edema_mirror_min_bone_dice
    edema, edema_qc = edema_mask(
        t1, fluid, own, soft_vals, muscle_fl, settings, voxel_mm3,
        own_muscle_sd=None if own_muscle is None else own_muscle.sd,
        mirror=mirror if usable_mirror else None,
    )
    if own_muscle is not None:
        edema_qc["own_muscle_sd"] = own_muscle.sd
    edema_qc["mirror_bone_dice"] = None if mirror is None else mirror.bone_dice
    edema_qc["mirror_used"] = usable_mirror
    return SideFindings(lesion, edema, muscle_fl, lesion_qc, edema_qc)


def _paint_side(
    labels: NDArray[np.uint8], side: str, tissues: LimbTissues, findings: SideFindings
) -> None:
    """Write one limb's structures into `labels` (in place), inner structures last."""
    offset = SIDE_OFFSET[side]
    labels[tissues.limb] = offset + SOFT_TISSUE
    labels[findings.edema & tissues.soft_tissue] = offset + EDEMA
    labels[tissues.bone] = offset + BONE
    labels[findings.lesion & tissues.bone] = offset + LESION


def _side_qc(tissues: LimbTissues, findings: SideFindings) -> dict[str, Any]:
    """One limb's numbers for the QC sidecar."""
    return dict(
        t1_muscle=tissues.t1_muscle_level,
        t1_fat=tissues.t1_fat_level,
        fluid_muscle=findings.fluid_muscle_level,
        lesion=findings.lesion_qc,
        edema=findings.edema_qc,
        bone_slices=int(tissues.bone.any(axis=(1, 2)).sum()),
        limb_slices=int(tissues.limb.any(axis=(1, 2)).sum()),
    )


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
    raw_t1, raw_fluid = raw if raw is not None else (t1, fluid)
    limbs, flags = _signal_and_fov_checks(
        limb_masks(t1, spacing_zyx_mm, x_of_column_mm, settings, qc),
        raw_t1, raw_fluid, voxel_mm3, pixel_mm, settings,
    )
    present = [s for s in ("right", "left") if _is_limb(limbs[s], voxel_mm3)]
    qc["sides_present"] = present
    tissues = {side: limb_tissues(t1, limbs[side], pixel_mm) for side in present}
    qc["contrast"] = contrast = _contrast_checks(t1, fluid, tissues, pixel_mm)
    flags += _contrast_flags(contrast, settings)
    qc["qc_flags"] = [f.to_json() for f in flags]
    fluid_usable = not any(f.code == qc_mod.FLUID_NOT_FAT_SUPPRESSED for f in flags)
    mirrors = _mirrored(t1, fluid, tissues, spacing_zyx_mm) if fluid_usable else {}
    labels = np.zeros(t1.shape, dtype=np.uint8)
    for side in present:
        findings = side_findings(t1, fluid, side, tissues, mirrors.get(side), fluid_usable,
                                 settings, voxel_mm3, pixel_mm)
        _paint_side(labels, side, tissues[side], findings)
        qc[side] = _side_qc(tissues[side], findings)
    return labels, qc


def bias_gain(t1: sitk.Image, settings: SegmentSettings) -> NDArray[np.float32]:
    """The receive field (Z, Y, X) that N4 finds on the T1 image (foreground: Otsu); dividing
    by it corrects the T1 image and the fluid image of the same coil."""
    foreground = sitk.OtsuThreshold(t1, 0, 1)
    log_bias = n4_log_bias(t1, foreground, settings)
    return np.exp(sitk.GetArrayFromImage(log_bias)).astype(np.float32)


def _x_of_column_mm(image: sitk.Image) -> FloatArray:
    """LPS x (mm) of each column at the image centre (larger is the patient's left)."""
    nx, ny, nz = image.GetSize()
    centre_y, centre_z = (ny - 1) / 2, (nz - 1) / 2
    return np.array(
        [image.TransformContinuousIndexToPhysicalPoint((i, centre_y, centre_z))[0]
         for i in range(nx)],
        dtype=np.float32,
    )


def segment_session(
    t1_path: str | Path, fluid_path: str | Path, settings: SegmentSettings | None = None
) -> SegmentResult:
    """Segment one session; the label map is on the fluid-sensitive image's grid."""
    settings = settings or SegmentSettings.default()
    t_start = time.perf_counter()
    fluid_native = read_image(fluid_path)
    t1_native = read_image(t1_path)
    # Work on an LPS-ordered copy so that axis 0 of the array runs inferior-superior (axial
    # slices); permutations and flips only, undone at the end.
    check_overlap(t1_native, fluid_native, Path(t1_path).name, Path(fluid_path).name)
    fluid = orient_lps(fluid_native)
    t1 = resample_onto(t1_native, fluid, is_label=False)
    warnings: list[str] = []
    if t1 is not t1_native:
        warnings.append("T1-weighted series resampled onto the fluid-sensitive grid")

    t1_arr = sitk.GetArrayFromImage(t1)
    fluid_arr = sitk.GetArrayFromImage(fluid)
    gain = bias_gain(t1, settings)
    t1c = (t1_arr / gain).astype(np.float32)
    fluid_c = (fluid_arr / gain).astype(np.float32)
    t_n4 = time.perf_counter()

    spacing_xyz = fluid.GetSpacing()
    spacing_zyx = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    labels_arr, qc = segment_arrays(
        t1c, fluid_c, spacing_zyx, _x_of_column_mm(fluid), settings, raw=(t1_arr, fluid_arr)
    )
    t_seg = time.perf_counter()

    labels = sitk.GetImageFromArray(labels_arr)
    labels.CopyInformation(fluid)
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    # Back onto the fluid series' own orientation.
    labels = resample_onto(labels, fluid_native, is_label=True)
    if len(qc["sides_present"]) < 2:
        warnings.append(f"only {len(qc['sides_present'])} limb(s) found in the field of view")
    # the converter's findings on a session composed of one-leg series (pipeline/io/split.py;
    # the sidecars are written by the same convert job as the images)
    converter_flags, qc["fields_of_view"] = qc_mod.image_sidecar_facts([t1_path, fluid_path])
    qc["qc_flags"] += converter_flags
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
        return round(float(obj), QC_DECIMALS)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def settings_from_json(text: str | None) -> SegmentSettings:
    """Settings from a JSON object of ``segment:`` values over the defaults of
    config/config.yaml (the workflow passes the whole section); unknown keys are refused."""
    return SegmentSettings.default(**json.loads(text)) if text else SegmentSettings.default()


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
