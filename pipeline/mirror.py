"""The contralateral limb, mirrored onto the other one: a voxel-wise healthy reference.

The patient's healthy limb is the control of the whole method. Compared as a distribution
(one percentile for the whole limb), it cannot tell edema from a muscle that is simply brighter
than others: real muscles differ by 20-30 % on fluid-sensitive images (coil proximity, fibre
type, residual bias), and a healthy thigh then reads as hundreds of millilitres of "edema". So
the contralateral limb is mirrored across the sagittal plane and registered rigidly onto the
limb under study (mutual information on the anatomical image, which both limbs share), and
its fluid signal is carried over voxel by voxel: edema must be brighter than the *same place*
of the healthy limb, not only brighter than the healthy limb overall.

Arrays are (Z, Y, X) in the segmentation's LPS-ordered frame, so mirroring is a flip of the
last axis (x is left-right); the geometry is the array's own (spacing only), which is all a
rigid fit between two limbs of one image needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.register import single_threaded_itk

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]

#: In-plane radius (mm) of the neighbourhood whose brightest mirrored value a voxel must
#: exceed: registration of two different limbs is good to a few millimetres, and at a
#: muscle-fat boundary a misplaced fat voxel must not make muscle look bright.
NEIGHBOURHOOD_MM: Final = 4.0
#: In-plane Gaussian smoothing (mm) of the mirrored signal before the neighbourhood maximum.
SMOOTHING_MM: Final = 1.5
#: Margin (mm) around the limb that the metric sees (the skin outline helps the fit).
MARGIN_MM: Final = 10.0

# The rigid fit of the mirrored limb (Mattes mutual information on the anatomical image, the
# same method as the registration to baseline, :mod:`pipeline.register`, on one image).
#: Joint-histogram bins of the metric.
HISTOGRAM_BINS: Final = 32
#: Fraction of the voxels the metric samples (at random, with a fixed seed: reproducible).
SAMPLING_FRACTION: Final = 0.05
SEED: Final = 20240301
#: Regular-step gradient descent: first step (mm), smallest step (mm: far below a voxel),
#: iteration cap per level and step relaxation.
LEARNING_RATE_MM: Final = 2.0
MIN_STEP_MM: Final = 0.05
MAX_ITERATIONS: Final = 150
RELAXATION: Final = 0.5
#: Two levels: shrunk by 2 (smoothed by one pixel) then full resolution.
SHRINK_FACTORS: Final = (2, 1)
#: Fewer slices than this, or slices thicker than this many pixels, do not determine a tilt
#: out of the axial plane: the fit is then a rotation about z and an in-plane shift.
MIN_SLICES_FOR_3D: Final = 3
MAX_SLICE_TO_PIXEL_FOR_3D: Final = 4.0
#: Optimizer weights of the Euler parameters (rotations x, y, z; shifts x, y, z) for that
#: in-plane fit.
IN_PLANE_WEIGHTS: Final = (0.0, 0.0, 1.0, 1.0, 1.0, 0.0)
#: The margin grows in-plane only (3 x 3 per slice): the limbs' cranio-caudal extent is the
#: image's.
_PLANE: Final = np.ones((1, 3, 3), bool)
#: Resampled masks (0 or 1, nearest neighbour) are read back above this.
_MASK_LEVEL: Final = 0.5
#: Value of a resampled voxel outside the contralateral image (below any signal).
_OUTSIDE: Final = -1.0


@dataclass(frozen=True)
class MirroredReference:
    """The contralateral limb's fluid signal at each voxel of the limb under study.

    ``local_max`` is the brightest mirrored value within :data:`NEIGHBOURHOOD_MM` in-plane;
    ``valid`` marks voxels the mirrored limb covers; ``bone_dice`` says how well the two
    limbs' bones overlap after the fit (a check of the fit, 0 when unknown).
    """

    local_max: FloatArray
    valid: BoolArray
    bone_dice: float


def _image(array: NDArray[np.floating], spacing_zyx_mm: tuple[float, float, float]) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing((spacing_zyx_mm[2], spacing_zyx_mm[1], spacing_zyx_mm[0]))
    return img


def _centroid_mm(
    mask: BoolArray, spacing_zyx_mm: tuple[float, float, float]
) -> NDArray[np.float64]:
    idx = np.argwhere(mask).mean(axis=0)  # (z, y, x)
    return np.array([idx[2] * spacing_zyx_mm[2], idx[1] * spacing_zyx_mm[1],
                     idx[0] * spacing_zyx_mm[0]])


def _fit(t1: FloatArray, limb: BoolArray, contra_limb: BoolArray,
         spacing_zyx_mm: tuple[float, float, float], seed: int) -> sitk.Euler3DTransform:
    """Rigid fit of the mirrored contralateral limb onto `limb`: maps a point of `limb` to the
    matching point of the flipped image."""
    pixel_mm = float(np.sqrt(spacing_zyx_mm[1] * spacing_zyx_mm[2]))
    margin = max(1, int(round(MARGIN_MM / pixel_mm)))
    fixed_mask = ndimage.binary_dilation(limb, _PLANE, iterations=margin)
    flip_limb = contra_limb[:, :, ::-1]
    moving_mask = ndimage.binary_dilation(flip_limb, _PLANE, iterations=margin)
    fixed = _image(np.where(fixed_mask, t1, 0.0), spacing_zyx_mm)
    moving = _image(np.where(moving_mask, t1[:, :, ::-1], 0.0), spacing_zyx_mm)
    # start from the limbs' centroids: fixed point p maps to moving point p + shift
    tr = sitk.Euler3DTransform()
    c_fixed = _centroid_mm(limb, spacing_zyx_mm)
    tr.SetCenter(tuple(c_fixed))
    tr.SetTranslation(tuple(_centroid_mm(flip_limb, spacing_zyx_mm) - c_fixed))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)
    reg.SetNumberOfThreads(1)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING_FRACTION, seed)
    mask_img = sitk.Cast(_image(fixed_mask.astype(np.float32), spacing_zyx_mm), sitk.sitkUInt8)
    reg.SetMetricFixedMask(mask_img)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=LEARNING_RATE_MM, minStep=MIN_STEP_MM, numberOfIterations=MAX_ITERATIONS,
        relaxationFactor=RELAXATION)
    reg.SetOptimizerScalesFromPhysicalShift()
    in_plane = (len(t1) < MIN_SLICES_FOR_3D
                or spacing_zyx_mm[0] > MAX_SLICE_TO_PIXEL_FOR_3D * pixel_mm)
    if in_plane:  # few or thick slices: rotation about z and in-plane shift only
        reg.SetOptimizerWeights(list(IN_PLANE_WEIGHTS))
    reg.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    reg.SetSmoothingSigmasPerLevel([pixel_mm, 0.0])
    reg.SetInitialTransform(tr, inPlace=True)
    with single_threaded_itk():  # reproducible to the last digit
        reg.Execute(fixed, moving)
    return tr


def reversed_fit(tr: sitk.Euler3DTransform, width_x: int, spacing_x_mm: float
                 ) -> sitk.AffineTransform:
    """The fit the other way round, without a second registration.

    With F the flip (x -> c - x, c = (width - 1) * spacing), `tr` matches a point p of the
    first limb with the point F(tr(p)) of the second. For a point q of the second limb the
    match in the first is tr^-1(F(q)), which sits at F(tr^-1(F(q))) in the flipped image:
    the reversed fit is F o tr^-1 o F, rigid again (a reflection conjugates a rotation).
    """
    flip = np.diag([-1.0, 1.0, 1.0])
    f = np.array([(width_x - 1) * spacing_x_mm, 0.0, 0.0])
    m = np.array(tr.GetMatrix()).reshape(3, 3)
    centre = np.array(tr.GetCenter())
    t = np.array(tr.GetTranslation())
    # tr(p) = m (p - centre) + centre + t; tr^-1(y) = m.T (y - centre - t) + centre
    matrix = flip @ m.T @ flip
    offset = flip @ (m.T @ (f - centre - t) + centre) + f
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple(matrix.ravel()))
    out.SetTranslation(tuple(offset))
    return out


def _carry(tr: sitk.Transform, fluid: FloatArray, limb: BoolArray, bone: BoolArray,
           contra_limb: BoolArray, contra_bone: BoolArray,
           spacing_zyx_mm: tuple[float, float, float]) -> MirroredReference:
    """The mirrored contralateral fluid signal at each voxel of `limb`, through `tr`."""
    pixel_mm = float(np.sqrt(spacing_zyx_mm[1] * spacing_zyx_mm[2]))
    reference = _image(np.zeros(limb.shape, np.float32), spacing_zyx_mm)

    def carry(array: NDArray[np.floating], interp: int) -> NDArray[np.float32]:
        img = _image(array, spacing_zyx_mm)
        out = sitk.Resample(img, reference, tr, interp, _OUTSIDE, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)

    ref = carry(fluid[:, :, ::-1], sitk.sitkLinear)
    nearest = sitk.sitkNearestNeighbor
    covered = carry(contra_limb[:, :, ::-1].astype(np.float32), nearest) > _MASK_LEVEL
    moved_bone = carry(contra_bone[:, :, ::-1].astype(np.float32), nearest) > _MASK_LEVEL
    n = int(bone.sum()) + int(moved_bone.sum())
    bone_dice = 0.0 if n == 0 else 2.0 * float((bone & moved_bone).sum()) / n
    radius = max(1, int(round(NEIGHBOURHOOD_MM / pixel_mm)))
    disk = np.zeros((1, 2 * radius + 1, 2 * radius + 1), bool)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk[0] = yy**2 + xx**2 <= radius**2
    # smoothed first: the brightest of a few dozen noisy voxels would sit well above the
    # tissue's level on a noisy image
    smooth = ndimage.gaussian_filter(np.where(covered, ref, 0.0).astype(np.float32),
                                     (0.0, SMOOTHING_MM / spacing_zyx_mm[1],
                                      SMOOTHING_MM / spacing_zyx_mm[2]))
    local_max = ndimage.grey_dilation(smooth, footprint=disk)
    return MirroredReference(local_max.astype(np.float32), covered & limb, bone_dice)


def mirrored_references(
    t1: FloatArray,
    fluid: FloatArray,
    limbs: tuple[BoolArray, BoolArray],
    bones: tuple[BoolArray, BoolArray],
    spacing_zyx_mm: tuple[float, float, float],
    seed: int = SEED,
) -> tuple[MirroredReference, MirroredReference] | None:
    """Each of two limbs' mirrored reference from the other, from one rigid fit.

    Parameters
    ----------
    t1, fluid : ndarray of shape (Z, Y, X)
        Bias-corrected images on one grid (axis 2 is left-right).
    limbs, bones : the two limbs and their bones, ndarray of bool, shape (Z, Y, X).
    spacing_zyx_mm : voxel spacing.

    Returns
    -------
    (reference for limbs[0], reference for limbs[1]), or None when a limb is missing.
    """
    (a, b), (bone_a, bone_b) = limbs, bones
    if not a.any() or not b.any():
        return None
    tr = _fit(t1, a, b, spacing_zyx_mm, seed)
    back = reversed_fit(tr, t1.shape[2], spacing_zyx_mm[2])
    return (_carry(tr, fluid, a, bone_a, b, bone_b, spacing_zyx_mm),
            _carry(back, fluid, b, bone_b, a, bone_a, spacing_zyx_mm))
