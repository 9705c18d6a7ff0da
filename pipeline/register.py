"""Rigid registration of a session to the baseline, initialised from the bones, with QC.

Method
------
1. **Initialisation from the bones** (label maps of both sessions, labels 3/4 and 7/8):

   - cranio-caudal offset: the femoral cross-sectional-area profile along z (both sides summed,
     resampled to 0.5 mm) of the session is slid over the baseline's; the offset minimising the
     squared difference normalised by the profiles' variance over the overlap wins (at least
     ``min_overlap_mm`` of overlap, and the overlap must show the metaphyseal flare, i.e. the
     profile must vary). Bone centroids alone would be biased by half the difference in
     coverage when the fields of view differ; the profile is not. When the profile is flat (a
     diaphysis-only field of view) the bone-centroid z difference is used instead.
   - in-plane translation: the mid-point of the two femoral centroids (over the overlapping
     range), session minus baseline;
   - in-plane rotation: the angle of the right-to-left femur vector, session minus baseline
     (not with one limb).

   Without bone labels the image centres are aligned (``sitk.CenteredTransformInitializer``).
2. **Metric region: one limb.** The baseline image is cropped to one limb's box (all slices);
   each limb is tried and the better result kept (:func:`register_session`), because the
   outline of a swelling limb is matched by sliding along the thigh's taper.
3. **Mattes mutual information**, 32 bins, random sampling (5 %, at least 5 000 points per
   level, fixed seed), linear interpolation, **regular-step gradient descent** with scales from
   physical shift, Euler 3-D transform (rotation about the baseline femoral mid-point).
4. **Multi-resolution** 4-2-1 built here rather than by ``SetShrinkFactorsPerLevel``, whose one
   factor for all axes would leave a 12-slice, 5 mm study with 3 slices: each axis is shrunk
   toward ``level x finest spacing`` (so 1.6 x 1.6 x 5 mm voxels become 6.4 x 6.4 x 5 mm at the
   coarsest level), after Gaussian smoothing of half that spacing. No axis is shrunk below 4
   voxels (ITK's recursive Gaussian filters need 4): a follow-up of six 2 mm slices keeps its
   six slices at every level. A volume thinner than 4 voxels along an axis is registered at
   full resolution only, with central-difference gradients and the rotation about the
   in-plane axes frozen (in-plane rotation and 3-D translation); ITK failing anyway gives
   ``poor`` with the reason (:func:`not_registered`), so the session is flagged
   ``registration_failed`` instead of stopping the patient.

Which image: the **T1-weighted** one by default. Its contrast (fat, muscle, marrow, cortex) is
stable across visits, while the fluid-sensitive image changes with exactly what is measured
(edema, lesion) and has a lower SNR. The transform lives in physical space, so a transform
found on the T1 images applies to the label map on the fluid grid when T1 and fluid of each
session are aligned (:func:`align_within_session` checks and fixes that).

Transform convention: the result maps **baseline (fixed) physical LPS points to session
(moving) points**, as ITK estimates it; ``sitk.Resample(session_image, baseline_image, T)``
brings the session into baseline space and ``T.GetInverse()`` maps session points to baseline.

Quality: the session's label map resampled into baseline space (nearest neighbour) is compared
with the baseline's over the voxels both cover: Dice of bone and of limb per side, distance
between femoral centroids (mm), and the cranio-caudal overlap (mm). ``poor`` is set, with the
reasons, when bone Dice < 0.7, centroid distance > 3 mm, overlap < 30 mm, or the
registered cranio-caudal shift differs from the femoral-profile one by > 3 mm. Bone Dice and
centroids constrain the in-plane alignment well but the cranio-caudal one only through the
metaphyseal flare (the diaphysis is a cylinder).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipeline.extent import (
    Geometry,
    LabelMapLike,
    affine_of,
    layer_stats,
    read_label_map,
    side_mask,
    sides_present,
)
from pipeline.geometry import same_grid
from pipeline.io.files import atomic_path, write_json_atomic
from pipeline.labels import SIDES


@dataclass(frozen=True)
class RegistrationSettings:
    """Registration parameters; thresholds for the ``poor`` flag at the end."""

    histogram_bins: int = 32
    sampling_fraction: float = 0.05
    min_samples: int = 5000
    seed: int = 20240301
    levels: tuple[int, ...] = (4, 2, 1)
    iterations: int = 200
    min_step_mm: float = 0.01
    relaxation: float = 0.5
    max_init_shift_mm: float = 120.0
    min_overlap_mm: float = 30.0
    max_init_rotation_deg: float = 30.0
    # metric region: "auto" (each limb in turn, the better kept), "left", "right" or "whole"
    reference: str = "auto"
    limb_margin_mm: float = 10.0
    # a session without the reference limb (the affected leg alone): the metric over that
    # leg's bone box plus this margin; its swollen outline would slide along the taper
    bone_margin_mm: float = 10.0
    max_z_disagreement_mm: float = 3.0
    # quality thresholds
    min_bone_dice: float = 0.7
    max_centroid_distance_mm: float = 3.0
    # within a session (T1 vs fluid): patient motion beyond these is suspicious
    max_within_session_shift_mm: float = 10.0
    max_within_session_rotation_deg: float = 5.0
    # below this the scanner's shared frame of reference beats the estimate (T1 vs fluid MI on
    # 4-5 mm slices was biased by ~1 mm along z on the phantom with no motion at all)
    min_within_session_shift_mm: float = 1.5


@dataclass(frozen=True)
class RegistrationQuality:
    """Agreement of the session's labels with the baseline's after registration.

    ``bone_dice`` and ``limb_dice`` are means over the sides present, the ``*_by_side`` maps
    hold each side; ``centroid_distance_mm`` is the mean distance between femoral centroids
    (baseline vs registered session, over the common voxels); ``overlap_mm`` is the
    cranio-caudal length both cover; ``z_vs_bone_profile_mm`` is the registered cranio-caudal
    displacement at the femora minus the one the femoral area profiles give (large when the
    fit slid along the limb).
    """

    bone_dice: float | None
    limb_dice: float | None
    centroid_distance_mm: float | None
    overlap_mm: float
    z_vs_bone_profile_mm: float | None = None
    bone_dice_by_side: Mapping[str, float] = field(default_factory=dict)
    limb_dice_by_side: Mapping[str, float] = field(default_factory=dict)
    centroid_distance_by_side_mm: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RegistrationResult:
    """A rigid transform and how it was found.

    ``parameters`` are the Euler 3-D ones: rotations about x, y, z (radians) then the
    translation (mm); ``center_mm`` is the fixed centre of rotation. The transform maps
    baseline (fixed) physical points to session (moving) points.
    """

    parameters: tuple[float, float, float, float, float, float]
    center_mm: tuple[float, float, float]
    metric_value: float | None
    initial_parameters: tuple[float, float, float, float, float, float]
    initialisation: str
    iterations: int
    stop_condition: str
    seconds: float
    quality: RegistrationQuality | None
    poor: bool
    poor_reasons: tuple[str, ...]

    def transform(self) -> sitk.Euler3DTransform:
        """The SimpleITK transform (a new object each call)."""
        tr = sitk.Euler3DTransform()
        tr.SetCenter(self.center_mm)
        tr.SetParameters(self.parameters)
        return tr

    @property
    def translation_mm(self) -> tuple[float, float, float]:
        return (self.parameters[3], self.parameters[4], self.parameters[5])

    @property
    def rotation_deg(self) -> tuple[float, float, float]:
        return tuple(math.degrees(a) for a in self.parameters[:3])  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: parameters, matrix form, metric, quality and the poor flag."""
        a, b = affine_of(self.transform())
        d = asdict(self)
        d["quality"] = None if self.quality is None else _quality_json(self.quality)
        d.update(
            transform_type="Euler3DTransform",
            convention="maps baseline (fixed) physical LPS mm points to session (moving) "
            "points; sitk.Resample(session, baseline, T) brings the session into "
            "baseline space",
            rotation_deg=list(self.rotation_deg),
            translation_mm=list(self.translation_mm),
            matrix=a.tolist(),
            offset_mm=b.tolist(),
            simpleitk_version=sitk.Version.VersionString(),
        )
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RegistrationResult:
        q = d.get("quality")
        return cls(
            parameters=tuple(float(v) for v in d["parameters"]),  # type: ignore[arg-type]
            center_mm=tuple(float(v) for v in d["center_mm"]),  # type: ignore[arg-type]
            metric_value=d.get("metric_value"),
            initial_parameters=tuple(float(v) for v in d["initial_parameters"]),  # type: ignore[arg-type]
            initialisation=str(d["initialisation"]),
            iterations=int(d["iterations"]),
            stop_condition=str(d["stop_condition"]),
            seconds=float(d["seconds"]),
            quality=None if q is None else RegistrationQuality(**q),
            poor=bool(d["poor"]),
            poor_reasons=tuple(d["poor_reasons"]),
        )

    def write(self, tfm_path: str | Path, json_path: str | Path) -> None:
        """Write the transform as ITK ``.tfm`` and everything as JSON, atomically."""
        with atomic_path(tfm_path) as tmp:
            sitk.WriteTransform(self.transform(), str(tmp))
        write_json_atomic(json_path, self.to_json())


def _quality_json(q: RegistrationQuality) -> dict[str, Any]:
    d = asdict(q)
    for k, v in d.items():
        if isinstance(v, Mapping):
            d[k] = dict(v)
    return d


def read_result(json_path: str | Path) -> RegistrationResult:
    """A result written by :meth:`RegistrationResult.write`."""
    return RegistrationResult.from_json(json.loads(Path(json_path).read_text(encoding="utf-8")))


def read_transform(tfm_path: str | Path) -> sitk.Transform:
    """The transform of a ``.tfm`` file."""
    return sitk.ReadTransform(str(tfm_path))


# --------------------------------------------------------------------------- initialisation


@dataclass(frozen=True)
class Initialisation:
    """Where the optimiser starts: a rigid transform (baseline -> session), how it was found,
    and the cranio-caudal offset of the femoral area profiles (mm; None when not usable)."""

    transform: sitk.Euler3DTransform
    how: str
    z_offset_mm: float | None


@dataclass(frozen=True)
class OptimisedFit:
    """What the optimiser returned: the transform, the final metric value (None when no
    optimisation ran), the iterations over all levels and the last stop condition."""

    transform: sitk.Euler3DTransform
    metric_value: float | None
    iterations: int
    stop_condition: str


@dataclass(frozen=True)
class _BoneSummary:
    z_mm: NDArray[np.float64]  # layer centre z, ascending
    area_mm2: NDArray[np.float64]  # bone area, both sides summed, same order
    centroids: dict[str, NDArray[np.float64]]  # side -> (n_layers, 3) physical, NaN if none
    counts: dict[str, NDArray[np.int64]]


def _shared_sides(fixed_zyx: NDArray[Any], moving_zyx: NDArray[Any]) -> list[str]:
    """The limbs both label maps show: only these can be matched (a session may hold the
    affected leg alone while the baseline holds both)."""
    moving = set(sides_present(moving_zyx))
    return [s for s in sides_present(fixed_zyx) if s in moving]


def _bone_summary(labels_img: sitk.Image, sides: Sequence[str] | None = None) -> _BoneSummary:
    """Bone area per layer and per-side bone centroids of `sides` (default: every limb)."""
    geo = Geometry.of(labels_img)
    labels = sitk.GetArrayViewFromImage(labels_img)
    axis = geo.layer_axis_xyz
    n_layers = geo.size_xyz[axis]
    pixel_mm2 = float(np.prod([s for i, s in enumerate(geo.spacing_xyz_mm) if i != axis]))
    centre_idx = (np.array(geo.size_xyz, dtype=float) - 1) / 2
    idx = np.tile(centre_idx, (n_layers, 1))
    idx[:, axis] = np.arange(n_layers)
    z = (geo.origin[None, :] + idx @ geo.matrix.T)[:, 2]
    area = np.zeros(n_layers)
    centroids, counts = {}, {}
    for side in sides_present(labels) if sides is None else sides:
        st = layer_stats(side_mask(labels, side, "bone"), axis)
        if st.counts.sum() == 0:
            continue
        area += st.counts * pixel_mm2
        centroids[side] = geo.origin[None, :] + st.mean_index_xyz @ geo.matrix.T
        counts[side] = st.counts
    order = np.argsort(z)
    return _BoneSummary(
        z[order],
        area[order],
        {s: c[order] for s, c in centroids.items()},
        {s: c[order] for s, c in counts.items()},
    )


def _z_offset_from_profiles(
    fixed: _BoneSummary, moving: _BoneSummary, settings: RegistrationSettings, step_mm: float = 0.5
) -> float | None:
    """Offset dz (moving z = fixed z + dz) matching the femoral area profiles, or None."""
    f_ok, m_ok = fixed.area_mm2 > 0, moving.area_mm2 > 0
    if f_ok.sum() < 3 or m_ok.sum() < 3:
        return None
    fz, fa = fixed.z_mm[f_ok], fixed.area_mm2[f_ok]
    mz, ma = moving.z_mm[m_ok], moving.area_mm2[m_ok]
    ref = float(np.median(fa))
    grid = np.arange(fz[0], fz[-1] + 1e-9, step_mm)
    f_prof = np.interp(grid, fz, fa) / ref
    min_var = 0.03**2  # a flat (diaphysis-only) overlap says nothing about z
    n_min = int(settings.min_overlap_mm / step_mm)
    shifts = np.arange(-settings.max_init_shift_mm, settings.max_init_shift_mm + 1e-9, step_mm)
    scores = np.full(shifts.size, np.inf)
    for n, dz in enumerate(shifts):
        inside = (grid + dz >= mz[0]) & (grid + dz <= mz[-1])
        if inside.sum() < n_min:
            continue
        f = f_prof[inside]
        m = np.interp(grid[inside] + dz, mz, ma) / ref
        var = float(f.var() + m.var())
        if f.var() < min_var:
            continue
        scores[n] = float(np.mean((f - m) ** 2)) / var
    if not np.isfinite(scores).any():
        return None
    best = int(np.argmin(scores))
    dz = float(shifts[best])
    if 0 < best < shifts.size - 1 and np.isfinite(scores[best - 1 : best + 2]).all():
        s0, s1, s2 = scores[best - 1 : best + 2]
        denom = s0 - 2 * s1 + s2
        if denom > 0:
            dz += step_mm * 0.5 * (s0 - s2) / denom
    return dz


def _weighted_centroid(
    summary: _BoneSummary, side: str, z_lo: float, z_hi: float
) -> NDArray[np.float64] | None:
    sel = (summary.z_mm >= z_lo) & (summary.z_mm <= z_hi) & (summary.counts[side] > 0)
    if not sel.any():
        return None
    w = summary.counts[side][sel].astype(float)
    return np.asarray((summary.centroids[side][sel] * w[:, None]).sum(axis=0) / w.sum())


def bone_initial_transform(
    fixed_labels: LabelMapLike,
    moving_labels: LabelMapLike,
    settings: RegistrationSettings | None = None,
) -> Initialisation | None:
    """Rigid transform (baseline -> session) from the bones of both label maps.

    Returns the initialisation, whose ``z_offset_mm`` is the cranio-caudal offset from the
    femoral area profiles (None when they were not usable), or None when either map has no
    bone label. See the module docstring for the method.
    """
    settings = settings or RegistrationSettings()
    fixed_img, moving_img = read_label_map(fixed_labels), read_label_map(moving_labels)
    shared = _shared_sides(sitk.GetArrayViewFromImage(fixed_img),
                           sitk.GetArrayViewFromImage(moving_img))
    fixed = _bone_summary(fixed_img, shared)
    moving = _bone_summary(moving_img, shared)
    sides = [s for s in SIDES if s in fixed.centroids and s in moving.centroids]
    if not sides:
        return None
    dz = _z_offset_from_profiles(fixed, moving, settings)
    how = []
    if dz is None:
        lo, hi = -np.inf, np.inf
        how.append("z from bone centroids (femoral profile flat or too short)")
    else:
        lo = max(fixed.z_mm[0], moving.z_mm[0] - dz)
        hi = min(fixed.z_mm[-1], moving.z_mm[-1] - dz)
        how.append(f"z from femoral area profiles ({dz:+.1f} mm)")
    cf, cm = {}, {}
    for s in sides:
        a = _weighted_centroid(fixed, s, lo, hi)
        b = _weighted_centroid(moving, s, lo + (dz or 0.0), hi + (dz or 0.0))
        if a is not None and b is not None:
            cf[s], cm[s] = a, b
    if not cf:
        return None
    centre = np.mean(list(cf.values()), axis=0)
    t = np.mean(list(cm.values()), axis=0) - centre
    if dz is not None:
        t[2] = dz
    angle = 0.0
    if len(cf) == 2:
        vf = cf["left"] - cf["right"]
        vm = cm["left"] - cm["right"]
        angle = math.atan2(vm[1], vm[0]) - math.atan2(vf[1], vf[0])
        angle = (angle + math.pi) % (2 * math.pi) - math.pi
        if abs(math.degrees(angle)) > settings.max_init_rotation_deg:
            how.append(f"femur-vector rotation {math.degrees(angle):.0f} deg ignored (too large)")
            angle = 0.0
        else:
            how.append(f"in-plane rotation {math.degrees(angle):+.1f} deg from the two femora")
    how.insert(0, f"bones ({', '.join(cf)})")
    tr = sitk.Euler3DTransform()
    tr.SetCenter(tuple(float(v) for v in centre))
    tr.SetRotation(0.0, 0.0, angle)
    tr.SetTranslation(tuple(float(v) for v in t))
    return Initialisation(tr, "; ".join(how), dz)


# --------------------------------------------------------------------------- registration


#: ITK's recursive Gaussian filters (level smoothing, the metric's image gradients) need at
#: least this many voxels along every axis.
MIN_AXIS_VOXELS = 4


def _thin(image: sitk.Image) -> bool:
    """Fewer than MIN_AXIS_VOXELS voxels along some axis (e.g. a follow-up of 3 slices)."""
    return min(image.GetSize()) < MIN_AXIS_VOXELS


def _level_images(image: sitk.Image, level: int, finest_mm: float) -> sitk.Image:
    """`image` smoothed and shrunk toward ``level x finest_mm`` voxels; no axis is shrunk
    below MIN_AXIS_VOXELS voxels (a thin volume, e.g. six 2 mm slices, keeps its slices at
    the coarse levels), and an image already thinner than that is used as it is."""
    if level <= 1 or _thin(image):
        return image
    target = level * finest_mm
    spacing = image.GetSpacing()
    factors = [
        max(1, min(int(round(target / s)), n // MIN_AXIS_VOXELS))
        for s, n in zip(spacing, image.GetSize(), strict=True)
    ]
    sigmas = [0.5 * max(target, s) for s in spacing]
    smoothed = sitk.SmoothingRecursiveGaussian(image, sigmas)
    return sitk.Shrink(smoothed, factors)


def _as_float(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image, sitk.sitkFloat32)


@contextmanager
def single_threaded_itk() -> Iterator[None]:
    """ITK on one thread for the duration: a multi-threaded Mattes metric and scales estimator
    sum in completion order, so two runs of the same registration differ in the last digits
    and the optimiser carries that to 1e-7 mm (measured). A resumed run must reproduce the
    transform exactly, so every registration runs inside this."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _optimise(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: sitk.Euler3DTransform,
    settings: RegistrationSettings,
    translation_only: bool = False,
) -> OptimisedFit:
    """Multi-resolution Mattes-MI rigid registration starting from `initial` (not modified).

    ``translation_only`` freezes the rotation (optimizer weights 0) at its initial value.
    """
    fixed, moving = _as_float(fixed), _as_float(moving)
    tr = sitk.Euler3DTransform(initial)
    finest = min(min(fixed.GetSpacing()), min(moving.GetSpacing()))
    metric, iterations, stop = float("nan"), 0, ""
    for level in settings.levels:
        f = _level_images(fixed, level, finest)
        m = _level_images(moving, level, finest)
        n_vox = float(np.prod(f.GetSize()))
        fraction = min(1.0, max(settings.sampling_fraction, settings.min_samples / n_vox))
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
        reg.SetNumberOfThreads(1)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(fraction, settings.seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=max(level * finest, 1.0),
            minStep=settings.min_step_mm,
            numberOfIterations=settings.iterations,
            relaxationFactor=settings.relaxation,
            gradientMagnitudeTolerance=1e-8,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        thin = _thin(f) or _thin(m)
        if thin:
            # the metric's recursive-Gaussian gradient filters need 4 voxels along each axis;
            # central differences instead, and no out-of-plane rotation (not determined by
            # a slab of fewer than 4 slices)
            reg.SetMetricUseFixedImageGradientFilter(False)
            reg.SetMetricUseMovingImageGradientFilter(False)
        if translation_only:
            reg.SetOptimizerWeights([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
        elif thin:
            reg.SetOptimizerWeights([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
        reg.SetInitialTransform(tr, inPlace=True)
        with single_threaded_itk():
            reg.Execute(f, m)
        metric = float(reg.GetMetricValue())
        iterations += int(reg.GetOptimizerIteration())
        stop = reg.GetOptimizerStopConditionDescription()
    return OptimisedFit(tr, metric, iterations, stop)


def limb_region(
    image: sitk.Image, labels: LabelMapLike, side: str, margin_mm: float,
    structure: str = "limb",
) -> sitk.Image | None:
    """`image` cropped to the bounding box of one limb's `structure` (in-plane, + `margin_mm`),
    or None.

    The box is found in physical space from the label map, which may lie on another grid.
    """
    lab_img = read_label_map(labels)
    arr = sitk.GetArrayViewFromImage(lab_img)
    mask = side_mask(arr, side, structure)
    if not mask.any():
        return None
    geo = Geometry.of(lab_img)
    idx = np.argwhere(mask)[:, ::-1]  # (x, y, z) voxel indices
    lo, hi = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5
    corners = np.array(
        [[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    phys = geo.origin[None, :] + corners @ geo.matrix.T
    phys_lo = phys.min(axis=0) - [margin_mm, margin_mm, 0.0]
    phys_hi = phys.max(axis=0) + [margin_mm, margin_mm, 0.0]
    box = np.array(
        [
            [a, b, c]
            for a in (phys_lo[0], phys_hi[0])
            for b in (phys_lo[1], phys_hi[1])
            for c in (phys_lo[2], phys_hi[2])
        ]
    )
    cidx = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in box])
    size = np.array(image.GetSize())
    i_lo = np.clip(np.floor(cidx.min(axis=0)).astype(int), 0, size - 1)
    i_hi = np.clip(np.ceil(cidx.max(axis=0)).astype(int), 0, size - 1)
    # keep every slice: the cranio-caudal extent is what the registration must find
    layer = int(np.argmax(np.abs(np.array(image.GetDirection()).reshape(3, 3)[2, :])))
    i_lo[layer], i_hi[layer] = 0, size[layer] - 1
    extent = i_hi - i_lo + 1
    if (extent < 4).any():
        return None
    return sitk.RegionOfInterest(image, [int(v) for v in extent], [int(v) for v in i_lo])


def _result(
    fit: OptimisedFit,
    initial: sitk.Transform,
    how: str,
    t0: float,
    quality: RegistrationQuality | None,
    reasons: Sequence[str],
) -> RegistrationResult:
    tr = fit.transform
    return RegistrationResult(
        parameters=tuple(float(v) for v in tr.GetParameters()),  # type: ignore[arg-type]
        center_mm=tuple(float(v) for v in tr.GetCenter()),  # type: ignore[arg-type]
        metric_value=fit.metric_value,
        initial_parameters=tuple(float(v) for v in initial.GetParameters()),  # type: ignore[arg-type]
        initialisation=how,
        iterations=fit.iterations,
        stop_condition=fit.stop_condition,
        seconds=round(time.perf_counter() - t0, 3),
        quality=quality,
        poor=bool(reasons),
        poor_reasons=tuple(reasons),
    )


@dataclass(frozen=True)
class RegistrationCandidate:
    """One metric region tried by :func:`register_session`, and how its fit scored.

    ``worst_bone_dice`` is the worst side's bone Dice (-1 when no side has bone, 0 without
    label maps); candidates rank by :attr:`rank`.
    """

    region: str
    fit: OptimisedFit
    quality: RegistrationQuality | None
    poor_reasons: tuple[str, ...]
    worst_bone_dice: float

    @property
    def rank(self) -> tuple[int, float]:
        """Sort key: fewest quality problems first, then the best worst-side bone Dice."""
        return (len(self.poor_reasons), -self.worst_bone_dice)


def _initialisation(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_labels: LabelMapLike | None,
    moving_labels: LabelMapLike | None,
    settings: RegistrationSettings,
) -> Initialisation:
    """From the bones of both label maps, else the image centres aligned."""
    init = (
        bone_initial_transform(fixed_labels, moving_labels, settings)
        if (fixed_labels is not None and moving_labels is not None)
        else None
    )
    if init is not None:
        return init
    centred = sitk.CenteredTransformInitializer(
        _as_float(fixed),
        _as_float(moving),
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.GEOMETRY,
    )
    return Initialisation(sitk.Euler3DTransform(centred), "image centres (no bone labels)", None)


def _metric_regions(
    fixed: sitk.Image,
    fixed_labels: LabelMapLike | None,
    settings: RegistrationSettings,
    moving_labels: LabelMapLike | None = None,
) -> dict[str, sitk.Image]:
    """The baseline image cropped to each limb to try (``settings.reference``), by name; the
    whole image when there is none. Only limbs the session shows as well: when the reference
    limb is missing from the session (the affected leg imaged alone), the limbs both show."""
    regions: dict[str, sitk.Image] = {}
    if fixed_labels is not None and settings.reference != "whole":
        wanted = list(SIDES) if settings.reference == "auto" else [settings.reference]
        if moving_labels is not None:
            shared = _shared_sides(sitk.GetArrayViewFromImage(read_label_map(fixed_labels)),
                                   sitk.GetArrayViewFromImage(read_label_map(moving_labels)))
            if set(wanted) - set(shared):
                return _bone_regions(fixed, fixed_labels, shared, settings) or {
                    "whole image": fixed}
        for side in wanted:
            roi = limb_region(fixed, fixed_labels, side, settings.limb_margin_mm)
            if roi is not None:
                regions[f"{side} limb"] = roi
    return regions or {"whole image": fixed}


def _bone_regions(
    fixed: sitk.Image, fixed_labels: LabelMapLike, sides: Sequence[str],
    settings: RegistrationSettings,
) -> dict[str, sitk.Image]:
    """The baseline image cropped to the bone box of each limb in `sides`: the metric region
    when the session lacks the reference limb (the affected leg imaged alone), where the
    limb's swollen outline would slide along its taper but its bones do not change."""
    regions: dict[str, sitk.Image] = {}
    for side in sides:
        roi = limb_region(fixed, fixed_labels, side, settings.bone_margin_mm, structure="bone")
        if roi is not None:
            regions[f"{side} bone"] = roi
    return regions


def _candidate(
    name: str,
    region: sitk.Image,
    moving: sitk.Image,
    init: Initialisation,
    label_maps: tuple[LabelMapLike, LabelMapLike] | None,
    settings: RegistrationSettings,
) -> RegistrationCandidate:
    """The fit with the metric over `region`, and its quality against the label maps
    (baseline, session) when there are some."""
    return _judged(name, _optimise(region, moving, init.transform, settings), init, label_maps,
                   settings)


def _judged(
    name: str,
    fit: OptimisedFit,
    init: Initialisation,
    label_maps: tuple[LabelMapLike, LabelMapLike] | None,
    settings: RegistrationSettings,
) -> RegistrationCandidate:
    """A candidate: `fit` with its quality against the label maps (baseline, session)."""
    quality, reasons = None, []
    if label_maps is not None:
        fixed_labels, moving_labels = label_maps
        quality = registration_quality(fixed_labels, moving_labels, fit.transform)
        if init.z_offset_mm is not None:
            c = np.array(init.transform.GetCenter())
            dz = float(fit.transform.TransformPoint(tuple(c))[2] - c[2])
            quality = replace(quality, z_vs_bone_profile_mm=round(dz - init.z_offset_mm, 3))
        reasons = poor_reasons(quality, settings, _slice_mm(fixed_labels, moving_labels))
    worst = min((quality.bone_dice_by_side or {"-": -1.0}).values()) if quality else 0.0
    return RegistrationCandidate(name, fit, quality, tuple(reasons), worst)


def _choice(ranked: Sequence[RegistrationCandidate]) -> str:
    """Which metric region was kept, and over which others (best first in `ranked`)."""
    text = f"metric over the {ranked[0].region}"
    if len(ranked) > 1:
        text += (
            " (chosen over "
            + ", ".join(
                f"the {c.region}: worst-side bone Dice {c.worst_bone_dice:.3f}, "
                f"{len(c.poor_reasons)} problem(s)"
                for c in ranked[1:]
            )
            + ")"
        )
    return text


def register_session(
    fixed_image: LabelMapLike,
    moving_image: LabelMapLike,
    fixed_labels: LabelMapLike | None = None,
    moving_labels: LabelMapLike | None = None,
    settings: RegistrationSettings | None = None,
) -> RegistrationResult:
    """Register a session's image (moving) to the baseline's (fixed), rigidly.

    The metric is computed over one limb at a time (the baseline image cropped to that limb's
    box): a swollen limb's outline is matched by sliding along the thigh's taper, which cost
    13-16 mm of cranio-caudal error on the phantom with +20 % swelling when the affected limb or
    the whole image drove the fit, against < 0.5 mm from the contralateral limb. With
    ``settings.reference='auto'`` each limb is tried and the result with the fewest quality
    problems and then the best worst-side bone Dice is kept (a fit driven by the swollen limb
    misplaces the other femur); pass the contralateral side when it is known.

    Parameters
    ----------
    fixed_image, moving_image : SimpleITK images or paths; the T1-weighted images are
        recommended (module docstring).
    fixed_labels, moving_labels : label maps of both sessions (paths or images), for the bone
        initialisation, the per-limb metric region and the quality figures; without them the
        image centres initialise, the whole image drives the fit and no quality is computed.
    settings : RegistrationSettings

    Returns
    -------
    RegistrationResult; ``result.transform()`` maps baseline points to session points.
    """
    settings = settings or RegistrationSettings()
    if settings.reference not in ("auto", "whole", *SIDES):
        raise ValueError(
            f"reference must be auto, whole, left or right, not {settings.reference!r}"
        )
    t0 = time.perf_counter()
    fixed = read_label_map(fixed_image)
    moving = read_label_map(moving_image)
    init = _initialisation(fixed, moving, fixed_labels, moving_labels, settings)
    label_maps = (
        (fixed_labels, moving_labels)
        if fixed_labels is not None and moving_labels is not None
        else None
    )
    regions = _metric_regions(fixed, fixed_labels, settings, moving_labels)
    candidates = [
        _candidate(name, region, moving, init, label_maps, settings)
        for name, region in regions.items()
    ]
    if label_maps is not None and any(name.endswith(" bone") for name in regions):
        # the session lacks the reference limb: a small bone-box metric can wander, the bone
        # initialisation (centroids + area profiles of the limbs both show) may be better
        kept = OptimisedFit(sitk.Euler3DTransform(init.transform), None, 0,
                            "not optimised: the bone initialisation")
        candidates.append(_judged("bone initialisation", kept, init, label_maps, settings))
    ranked = sorted(candidates, key=lambda c: c.rank)
    best = ranked[0]
    how = f"{init.how}; {_choice(ranked)}"
    return _result(best.fit, init.transform, how, t0, best.quality, best.poor_reasons)


def poor_reasons(
    quality: RegistrationQuality, settings: RegistrationSettings, slice_mm: float = 0.0
) -> list[str]:
    """Why a registration's quality is below the thresholds (empty when it is fine);
    `slice_mm` is the thicker of the two sessions' slice spacings."""
    out = []
    if quality.overlap_mm < settings.min_overlap_mm:
        out.append(
            f"cranio-caudal overlap {quality.overlap_mm:.0f} mm < {settings.min_overlap_mm:.0f} mm"
        )
    if quality.bone_dice is None:
        out.append("no bone in the common region: bone Dice not available")
    elif quality.bone_dice < settings.min_bone_dice:
        out.append(f"bone Dice {quality.bone_dice:.2f} < {settings.min_bone_dice:.2f}")
    z_gap = quality.z_vs_bone_profile_mm
    # the bone-area profiles are sampled once per slice and move with whatever part of an
    # epiphysis each session outlined: they cannot place z to better than a slice or so (a
    # 10-slice thigh 20 mm apart, registered exactly, disagreed by 3.3 mm; a real calf on 4 mm
    # vs 5 mm slices, registered to 0.5 mm against the known shift, by 3.9-5.9 mm). Only a
    # slide beyond 1.5 slices is called a failure.
    z_max = max(settings.max_z_disagreement_mm, 1.5 * slice_mm)
    if z_gap is not None and abs(z_gap) > z_max:
        out.append(
            f"cranio-caudal shift disagrees with the bone-area profiles by {z_gap:+.1f} mm "
            f"(> {z_max:.1f} mm)"
        )
    if (
        quality.centroid_distance_mm is not None
        and quality.centroid_distance_mm > settings.max_centroid_distance_mm
    ):
        out.append(
            f"bone centroid distance {quality.centroid_distance_mm:.1f} mm > "
            f"{settings.max_centroid_distance_mm:.1f} mm"
        )
    return out


def _slice_mm(*label_maps: LabelMapLike) -> float:
    """The thickest slice spacing (mm, along the layer axis) of the label maps."""
    out = 0.0
    for m in label_maps:
        geo = Geometry.of(read_label_map(m))
        out = max(out, geo.spacing_xyz_mm[geo.layer_axis_xyz])
    return out


def _dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float | None:
    n = int(a.sum()) + int(b.sum())
    return None if n == 0 else 2.0 * int((a & b).sum()) / n


def registration_quality(
    fixed_labels: LabelMapLike, moving_labels: LabelMapLike, transform: sitk.Transform
) -> RegistrationQuality:
    """Dice and centroid distance of the session's labels resampled into baseline space.

    The session's label map is resampled onto the baseline's grid with nearest neighbour
    through `transform` (baseline -> session); only voxels the session covers count.
    """
    fixed_img = read_label_map(fixed_labels)
    moving_img = read_label_map(moving_labels)
    outside = 255
    res = sitk.Resample(
        sitk.Cast(moving_img, sitk.sitkUInt8),
        fixed_img,
        transform,
        sitk.sitkNearestNeighbor,
        outside,
        sitk.sitkUInt8,
    )
    mov = sitk.GetArrayViewFromImage(res)
    fix = sitk.GetArrayViewFromImage(fixed_img)
    valid = mov != outside
    geo = Geometry.of(fixed_img)
    axis = geo.layer_axis_xyz
    covered = layer_stats(valid, axis).counts > 0
    d = geo.matrix / np.array(geo.spacing_xyz_mm)[None, :]
    overlap_mm = float(covered.sum() * geo.spacing_xyz_mm[axis] * abs(d[2, axis]))
    bone_d: dict[str, float] = {}
    limb_d: dict[str, float] = {}
    dist: dict[str, float] = {}
    # a limb only one session shows (a follow-up of the affected leg alone) has no counterpart
    for side in _shared_sides(fix, mov):
        fb = side_mask(fix, side, "bone") & valid
        mb = side_mask(mov, side, "bone") & valid
        fl = side_mask(fix, side, "limb") & valid
        ml = side_mask(mov, side, "limb") & valid
        if (bd := _dice(fb, mb)) is not None:
            bone_d[side] = round(bd, 4)
        if (ld := _dice(fl, ml)) is not None:
            limb_d[side] = round(ld, 4)
        if fb.any() and mb.any():
            dist[side] = round(_in_plane_centroid_distance(fb, mb, geo), 3)
    return RegistrationQuality(
        bone_dice=round(float(np.mean(list(bone_d.values()))), 4) if bone_d else None,
        limb_dice=round(float(np.mean(list(limb_d.values()))), 4) if limb_d else None,
        centroid_distance_mm=round(float(np.mean(list(dist.values()))), 3) if dist else None,
        overlap_mm=round(overlap_mm, 2),
        bone_dice_by_side=bone_d,
        limb_dice_by_side=limb_d,
        centroid_distance_by_side_mm=dist,
    )


def _in_plane_centroid_distance(
    a: NDArray[np.bool_], b: NDArray[np.bool_], geo: Geometry
) -> float:
    """Median over cross-sections holding both masks of the in-plane (x, y) distance between
    their centroids, mm. Per section and in-plane: where one session's bone reaches further
    along the limb (an epiphysis outlined in one and not the other), a 3-D centroid moves
    along z by centimetres although the sessions are aligned."""
    axis = geo.layer_axis_xyz
    sa, sb = layer_stats(a, axis), layer_stats(b, axis)
    both = (sa.counts > 0) & (sb.counts > 0)
    if not both.any():
        return float("nan")
    pa = geo.origin[None, :] + sa.mean_index_xyz[both] @ geo.matrix.T
    pb = geo.origin[None, :] + sb.mean_index_xyz[both] @ geo.matrix.T
    return float(np.median(np.linalg.norm((pa - pb)[:, :2], axis=1)))


def align_within_session(
    fixed_image: LabelMapLike,
    moving_image: LabelMapLike,
    settings: RegistrationSettings | None = None,
    force: bool = False,
    rotation: bool = False,
) -> RegistrationResult:
    """Align two series of one session (e.g. T1 moving onto the fluid grid, fixed).

    Series of one session share the scanner frame of reference, so identity is the starting
    point. When both are on the same grid (size, spacing, origin, direction) the identity is
    returned without registering (``initialisation='same grid'``) unless ``force``. Otherwise
    Mattes MI (T1 and fluid contrasts differ; MI handles that) estimates a translation only,
    unless ``rotation``: the patient lies on the same table, and a tilt estimated from
    thick-slice T1-vs-fluid data cost 1.3 mm at the thigh's edge on the phantom where there was
    none. An estimated motion below ``settings.min_within_session_shift_mm`` is not applied
    (identity kept, and said so in ``initialisation``): that small, it is within the estimate's
    own error. ``poor`` is set when the patient apparently moved more than the settings allow
    between the two series.

    Returns
    -------
    RegistrationResult whose transform maps fixed-series points to moving-series points
    (``sitk.Resample(moving, fixed, T)`` puts the moving series on the fixed grid).
    """
    settings = settings or RegistrationSettings()
    t0 = time.perf_counter()
    fixed = read_label_map(fixed_image)
    moving = read_label_map(moving_image)
    size = np.array(fixed.GetSize(), dtype=float)
    centre = fixed.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2))
    tr0 = sitk.Euler3DTransform()
    tr0.SetCenter(centre)
    if same_grid(fixed, moving) and not force:
        fit, how = OptimisedFit(tr0, None, 0, "not registered"), "same grid"
    else:
        fit = _optimise(fixed, moving, tr0, settings, translation_only=not rotation)
        how = "identity (same session, scanner frame of reference); " + (
            "rigid" if rotation else "translation only"
        )
    shift = float(np.linalg.norm(fit.transform.GetTranslation()))
    rot = max(abs(math.degrees(a)) for a in fit.transform.GetParameters()[:3])
    if fit.metric_value is not None and shift < settings.min_within_session_shift_mm and rot < 0.5:
        how += (
            f"; estimated motion {shift:.2f} mm is below "
            f"{settings.min_within_session_shift_mm:g} mm: identity kept"
        )
        fit = replace(fit, transform=tr0)
    reasons = []
    if shift > settings.max_within_session_shift_mm:
        reasons.append(f"series moved {shift:.1f} mm apart within the session")
    if rot > settings.max_within_session_rotation_deg:
        reasons.append(f"series rotated {rot:.1f} deg apart within the session")
    return _result(fit, tr0, how, t0, None, reasons)


def _itk_reason(err: BaseException) -> str:
    """The one informative line of an ITK exception (its last non-empty line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text.split("): ", 1)[-1] if text.startswith("ITK ERROR") else text


def not_registered(reason: str) -> RegistrationResult:
    """A result for a session that could not be registered: identity transform, ``poor``
    with `reason` (it becomes the QC flag ``registration_failed``, nothing of the session is
    measured)."""
    identity = sitk.Euler3DTransform()
    return _result(OptimisedFit(identity, None, 0, ""), identity, "not registered",
                   time.perf_counter(), None, [reason])


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="limbtrack register",
        description="Rigid registration of a session (moving) to the baseline (fixed).",
    )
    p.add_argument("--fixed-labels", type=Path, required=True, help="baseline label map")
    p.add_argument("--fixed-image", type=Path, required=True, help="baseline T1w (or fluid)")
    p.add_argument("--moving-labels", type=Path, required=True, help="session label map")
    p.add_argument("--moving-image", type=Path, required=True, help="session T1w (or fluid)")
    p.add_argument("--out-tfm", type=Path, required=True, help="ITK transform (.tfm)")
    p.add_argument("--out-json", type=Path, required=True, help="parameters and quality")
    p.add_argument("--seed", type=int, default=RegistrationSettings.seed)
    p.add_argument("--sampling", type=float, default=RegistrationSettings.sampling_fraction)
    p.add_argument(
        "--reference",
        choices=["auto", "left", "right", "whole"],
        default="auto",
        help="limb driving the metric: the contralateral one when known (default: try both)",
    )
    args = p.parse_args(argv)
    for path in (args.fixed_labels, args.fixed_image, args.moving_labels, args.moving_image):
        if not path.exists():
            p.error(f"{path}: no such file")
    settings = RegistrationSettings(
        seed=args.seed, sampling_fraction=args.sampling, reference=args.reference
    )
    # each label map read once, here: checked for content, then registered from memory
    labels = {p: read_label_map(p) for p in (args.fixed_labels, args.moving_labels)}
    empty = [p for p, img in labels.items() if not sitk.GetArrayViewFromImage(img).any()]
    try:
        if empty:  # nothing was segmented there (its QC flags say why): nothing to align
            result = not_registered(f"no limb segmented in {empty[0].name}: nothing to align")
        else:
            result = register_session(args.fixed_image, args.moving_image,
                                      labels[args.fixed_labels], labels[args.moving_labels],
                                      settings)
    except RuntimeError as err:  # ITK refused the images: the session is flagged, not lost
        result = not_registered(f"registration could not run: {_itk_reason(err)}")
    result.write(args.out_tfm, args.out_json)
    tx, ty, tz = result.translation_mm
    q = result.quality
    qtext = (
        ""
        if q is None
        else f"; bone Dice {q.bone_dice}, centroid distance {q.centroid_distance_mm} mm"
    )
    print(
        f"{args.moving_image.name} -> {args.fixed_image.name}: translation "
        f"({tx:+.1f}, {ty:+.1f}, {tz:+.1f}) mm, rotation "
        f"{', '.join(f'{a:+.1f}' for a in result.rotation_deg)} deg{qtext} "
        f"({result.seconds:.1f} s)"
    )
    if result.poor:
        print(f"WARNING: poor registration: {'; '.join(result.poor_reasons)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
