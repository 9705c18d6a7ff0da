"""Hybrid test cases: real leg anatomy with inserted changes of exactly known size.

The anatomy is real 3 T Dixon MRI of both legs of a healthy adult (``shared/realdata/legs``,
see its README): a 3-point Dixon of both thighs (magnitude and phase, 512 x 256 x 10,
0.8 x 0.8 mm, slices 20 mm apart) and a 3-D Dixon of both lower legs (magnitude only,
448 x 210 x 96, 0.915 x 0.915 mm, slices 5 mm apart). From it this module makes, per session,

* a **T1-weighted** image: the in-phase magnitude (TE 4.60 ms), fat bright;
* a **fluid-sensitive** image: the water image of a Dixon separation (fat dark, muscle
  intermediate; :func:`dixon_three_point` for the thigh, :func:`dixon_magnitude` for the calf),
  scaled so that muscle is at :data:`FLUID_MUSCLE_LEVEL`; or, for the quality-control case,
  an image that is *not* fat-suppressed (the in-phase or an out-of-phase echo);

and inserts, in the affected leg only:

* a **marrow lesion** of a target volume in the marrow cavity of the femur (thigh) or tibia
  (calf): T1 about 0.9 x muscle, fluid about 2 x muscle;
* **edema** of a target volume: feathery in muscle (fluid about 1.9 x muscle, T1 0.9 x
  muscle) and reticular strands in subcutaneous fat (fluid bright, T1 dark);
* **swelling**: a smooth outward radial warp of the soft tissue (zero in bone, growing to the
  skin) that makes the limb's soft tissue grow by a given percentage;
* **repositioning**: the session's images resampled onto another axial grid, the anatomy moved
  by a table shift along z and rotated about z, optionally with another voxel size.

A session may also image the legs one at a time (``HybridSession.layout``, issue 18): each leg
in its own anatomical and fluid image (``split``: two rows per role in the sheet, one of the
legs resampled off the source grid, :class:`SplitLayout`), or the affected leg alone
(``affected_only``), each image cropped from the bilateral one with a margin, the other leg
outside the coil (0). The truth does not depend on the layout: the same case imaged
bilaterally (its ``twin`` in :data:`LAYOUT_SUITE`) has the same truth.json values and masks.

Everything is written as a NIfTI sessions sheet (:mod:`pipeline.io.nifti_input`) with the exact
truth in ``truth.json`` and truth masks in ``truth/``. Run
``python -m pipeline.validation.hybrid OUT_DIR --all`` (or ``--case NAME``).

How exact the truth is
----------------------
* Lesion and edema volumes are exact on the source grid: each is a whole number of voxels
  (the top-N voxels of a fixed smooth score, N = round(target / voxel volume)), so
  ``lesion_ml`` and ``edema_ml`` are within half a voxel of the target (thigh 0.0064 mL,
  calf 0.0021 mL) and are the count of changed voxels times the voxel volume, exactly. They
  are physical volumes: a repositioned session shows the same lesion, so they do not change
  with the session's grid. The masks on a session's grid (``*_mask_ml``) are the source masks
  resampled (linear interpolation of the 0/1 mask, >= 0.5), identical to the source when the
  session keeps the source grid.
* The swelling volume ``swelling_ml`` is computed from the warp that made the image: the
  affected limb = T1 at or above half the median tissue signal (``swelling_outline_threshold``,
  holes filled), counted at the voxel centres of the swollen and of the unswollen T1; the
  difference times the voxel volume. It is what a voxel-counting half-maximum segmentation of
  the written images finds (the tests measure it within 2 %). ``swelling_continuous_ml`` is
  the same outline as a continuous iso-contour (4 x 4 supersampled in plane); the two differ
  by the outline's voxel discretisation, 1-3 % of the change. A segmentation whose outline
  lies delta_r mm further out finds about 2 delta_r / r more (r: limb radius; 0.5 mm on a
  45 mm calf: ~2 %). Bone has zero displacement, so the change is all soft tissue; the other
  limb is untouched (its voxels are bit-identical).
* ``true_asymmetry_change_pp`` = 100 x swelling_ml / contralateral soft tissue, with the
  contralateral soft tissue from this module's own limb and bone masks; ``swelling_ml`` is
  stored as well so a scorer can divide by its own contralateral volume.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.restoration import unwrap_phase
from skimage.segmentation import watershed

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]
Region = Literal["thigh", "calf"]
FluidKind = Literal["water", "in_phase", "out_of_phase"]

#: Environment variable naming the ``legs`` folder of the real data.
REALDATA_ENV: Final = "LIMBTRACK_REALDATA"
#: Default location: ``<workspace>/shared/realdata/legs`` next to the project folder.
DEFAULT_REALDATA: Final = Path(__file__).resolve().parents[3] / "shared" / "realdata" / "legs"

THIGH_DIR: Final = "thigh_siemens_dixon"
CALF_DIR: Final = "calf_siemens_dixon3d"
#: Thigh magnitude files at TE 3.45 (out of phase), 4.60 (in phase), 5.75 ms (out of phase).
THIGH_MAGNITUDE: Final = ("0006-Dixon_TE_345_th.nii.gz", "0008-Dixon_TE_460_th.nii.gz",
                          "0010-Dixon_TE_575_th.nii.gz")
#: Thigh phase files (values 0..4095) at the same echo times.
THIGH_PHASE: Final = ("0007-Dixon_TE_345_th.nii.gz", "0009-Dixon_TE_460_th.nii.gz",
                      "0011-Dixon_TE_575_th.nii.gz")
#: Calf magnitude files at TE 3.45, 4.60, 5.75 ms (no phase).
CALF_MAGNITUDE: Final = ("0026-dix3d_TR23_448m_fa05_345.nii.gz",
                         "0028-dix3d_TR23_448m_fa05_460.nii.gz",
                         "0030-dix3d_TR23_448m_fa05_575.nii.gz")

#: Muscle level of the written fluid image (arbitrary units).
FLUID_MUSCLE_LEVEL: Final = 100.0
#: Inserted signal relative to the local muscle level: (T1, fluid).
LESION_REL_MUSCLE: Final = (0.9, 2.0)
EDEMA_MUSCLE_REL_MUSCLE: Final = (0.9, 1.9)
EDEMA_FAT_REL_MUSCLE: Final = (0.9, 1.8)
#: Share of the edema volume put in subcutaneous fat (the rest is in muscle).
EDEMA_FAT_SHARE: Final = 0.3
#: Supersampling factor (per in-plane axis) of the swelling volume truth.
SWELLING_SUPERSAMPLE: Final = 4

#: Smallest median cross-section (mm^2) of a main marrow cavity (femur, tibia; not fibula).
MAIN_MARROW_MM2: Final = 45.0

# tissue codes of the source anatomy
BACKGROUND, MUSCLE, FAT, BONE, MARROW = 0, 1, 2, 3, 4
# limb codes (patient's side)
NO_LIMB, RIGHT, LEFT = 0, 1, 2
SIDE_CODE: Final = {"right": RIGHT, "left": LEFT}


#: How a session images the legs (:class:`HybridSession`).
LAYOUTS: Final = ("bilateral", "split", "affected_only")
#: A one-leg image reaches this fraction of the leg's left-right width beyond it on each side
#: (a field of view 1.3 x the leg, as an extremity coil's), within the source image.
LEG_MARGIN_FRACTION: Final = 0.15
#: The other leg is outside a one-leg image's coil: its voxels (and this far around them, mm,
#: its partial-volume edge) are set to 0 where they fall inside the crop.
OTHER_LEG_CLEARANCE_MM: Final = 4.0


class RealDataMissing(FileNotFoundError):
    """The real leg data folder (``shared/realdata/legs``) is not there."""


# --------------------------------------------------------------------------------------------
# geometry helpers: arrays are (x, y, z) voxel order with a 4 x 4 RAS affine, as nibabel reads
# --------------------------------------------------------------------------------------------


def voxel_volume_ml(affine: NDArray[np.float64]) -> float:
    """Volume of one voxel in mL (|det| of the 3 x 3 part, mm^3 / 1000)."""
    return abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def _spacing_mm(affine: NDArray[np.float64]) -> tuple[float, float, float]:
    s = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return float(s[0]), float(s[1]), float(s[2])


def to_sitk(array_xyz: NDArray[Any], affine_ras: NDArray[np.float64]) -> sitk.Image:
    """SimpleITK image (LPS geometry) of an (x, y, z) array with a RAS affine."""
    aff = np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    lps = np.diag([-1.0, -1.0, 1.0])
    direction = lps @ (aff[:3, :3] / spacing)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in lps @ aff[:3, 3]])
    img.SetDirection([float(v) for v in direction.ravel()])
    return img


def from_sitk(img: sitk.Image) -> tuple[NDArray[Any], NDArray[np.float64]]:
    """(x, y, z) array and RAS affine of a SimpleITK image (inverse of :func:`to_sitk`)."""
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    lps = np.diag([-1.0, -1.0, 1.0])
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = lps @ direction @ np.diag(np.asarray(img.GetSpacing(), dtype=np.float64))
    aff[:3, 3] = lps @ np.asarray(img.GetOrigin(), dtype=np.float64)
    return arr, aff


def write_nifti(path: Path, array_xyz: NDArray[Any], affine_ras: NDArray[np.float64]) -> None:
    """Write an (x, y, z) array as NIfTI with the RAS affine as sform and qform (code 1)."""
    img = nib.Nifti1Image(array_xyz, np.asarray(affine_ras, dtype=np.float64))
    img.set_sform(affine_ras, code=1)
    img.set_qform(affine_ras, code=1)
    img.header["xyzt_units"] = 10  # mm, s
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _smoothstep(t: NDArray[np.float64]) -> NDArray[np.float64]:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _normalized_convolution(values: NDArray[Any], weight: BoolArray,
                            sigma_px: Sequence[float]) -> tuple[FloatArray, FloatArray]:
    """Weighted Gaussian mean of `values` over `weight` (2-D), and the smoothed weight."""
    w = ndimage.gaussian_filter(weight.astype(np.float32), sigma_px, mode="constant")
    v = ndimage.gaussian_filter(np.where(weight, values, 0).astype(np.float32), sigma_px,
                                mode="constant")
    return (v / np.maximum(w, 1e-6)).astype(np.float32), w.astype(np.float32)


def _smooth_field(shape: tuple[int, ...], sigma_px: Sequence[float],
                  rng: np.random.Generator) -> FloatArray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px,
                                mode="wrap")
    f -= f.mean()
    return (f / max(float(f.std()), 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# 1. water / fat separation
# --------------------------------------------------------------------------------------------


def siemens_phase_to_rad(values: NDArray[Any]) -> NDArray[np.float64]:
    """Siemens phase image values 0..4095 to radians in [-pi, pi): (v - 2048) / 2048 * pi."""
    return (np.asarray(values, dtype=np.float64) - 2048.0) / 2048.0 * np.pi


def _signal_mask(magnitude: NDArray[Any]) -> BoolArray:
    """Voxels with signal: above 0.4 x the Otsu threshold of the magnitude."""
    m = np.asarray(magnitude, dtype=np.float32)
    thr = 0.4 * float(threshold_otsu(m[m > 0])) if np.any(m > 0) else 0.0
    return np.asarray(m > thr)


def dixon_three_point(
    magnitude: Sequence[NDArray[Any]], phase_rad: Sequence[NDArray[Any]],
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0), mask: BoolArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Water and fat from a 3-point Dixon with echoes out / in / out of phase.

    Glover and Schneider (MRM 1991): with S_n = (W + (-1)^(n+1) F) e^{i phi0} e^{i n phi},
    e^{2 i phi} = S2 conj(S0) / |.|. Its angle is unwrapped per slice (2-D; slices may be far
    apart) within the signal mask and halved, which leaves phi known modulo pi in each
    connected region. Then W + F = |S1|, |W - F| = sqrt(|S0| |S2|) (the geometric mean puts
    the T2* decay at the middle echo time) and the sign of W - F is the sign of
    Re(S1 conj(S0) e^{-i phi}) (lightly smoothed). The pi ambiguity is resolved per region:
    large regions (a leg in a slice) so that the rim 1.5-6 mm under the skin (subcutaneous fat)
    comes out fat-dominant; small regions (e.g. marrow inside the signal-free cortex) by
    continuity of e^{i phi} with the resolved regions around them.

    Parameters
    ----------
    magnitude : three arrays, shape (nx, ny, nz)
        |S0|, |S1|, |S2| at the out-, in-, out-of-phase echo times.
    phase_rad : three arrays, shape (nx, ny, nz)
        Phase of each echo in radians (see :func:`siemens_phase_to_rad`).
    spacing_mm : (sx, sy, sz)
        Voxel size in mm (for the rim depth and smoothing).
    mask : bool array, shape (nx, ny, nz), optional
        Voxels with signal; default :func:`_signal_mask` of |S1|.

    Returns
    -------
    water, fat : float32 arrays, shape (nx, ny, nz)
        Non-negative, W + F = |S1| in the mask; outside the mask both are |S1| / 2.
    """
    m0, m1, m2 = (np.asarray(m, dtype=np.float64) for m in magnitude)
    s0, s1, s2 = (np.asarray(m, dtype=np.float64) * np.exp(1j * np.asarray(p, dtype=np.float64))
                  for m, p in zip((m0, m1, m2), phase_rad, strict=True))
    if mask is None:
        mask = _signal_mask(m1)
    sx, sy = float(spacing_mm[0]), float(spacing_mm[1])
    sign = np.ones(m1.shape, dtype=np.float64)
    for k in range(m1.shape[2]):
        msk = np.asarray(mask[:, :, k], dtype=bool)
        if msk.sum() < 10:
            continue
        two_phi = np.angle(s2[:, :, k] * np.conj(s0[:, :, k]))
        unwrapped = unwrap_phase(np.ma.masked_array(two_phi, mask=~msk))
        phi = np.ma.getdata(unwrapped) / 2.0
        prod = s1[:, :, k] * np.conj(s0[:, :, k]) * np.exp(-1j * phi)
        real = ndimage.gaussian_filter(np.where(msk, prod.real, 0.0), 1.0)
        labels, n = ndimage.label(msk)
        areas = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, n + 1)) * sx * sy
        flip = np.zeros(n + 1, dtype=bool)
        resolved = np.zeros(msk.shape, dtype=bool)
        # large regions: subcutaneous rim must be fat (W - F < 0)
        for lab in np.flatnonzero(areas >= 2000.0) + 1:
            comp = labels == lab
            depth = ndimage.distance_transform_edt(comp, sampling=(sx, sy))
            rim = comp & (depth >= 1.5) & (depth <= 6.0)
            flip[lab] = float(real[rim].sum()) > 0.0
            resolved |= comp
        # small regions: continuity of e^{i phi} with resolved regions nearby
        e_phi = np.exp(1j * phi) * np.where(flip[labels], -1.0, 1.0)
        sig = (6.0 / sx, 6.0 / sy)
        ref_re, w = _normalized_convolution(e_phi.real, resolved, sig)
        ref_im, _ = _normalized_convolution(e_phi.imag, resolved, sig)
        for lab in np.flatnonzero(areas < 2000.0) + 1:
            comp = labels == lab
            if float(w[comp].max()) < 1e-3:
                depth = ndimage.distance_transform_edt(comp, sampling=(sx, sy))
                flip[lab] = float(real[comp & (depth <= 6.0)].sum()) > 0.0
                continue
            z = np.sum(e_phi[comp] * (ref_re[comp] - 1j * ref_im[comp]))
            flip[lab] = float(z.real) < 0.0
        sign[:, :, k] = np.where(real >= 0, 1.0, -1.0) * np.where(flip[labels], -1.0, 1.0)
    diff = sign * np.minimum(np.sqrt(m0 * m2), m1)
    water = np.where(mask, (m1 + diff) / 2.0, m1 / 2.0)
    fat = np.where(mask, (m1 - diff) / 2.0, m1 / 2.0)
    return (np.clip(water, 0, None).astype(np.float32), np.clip(fat, 0, None).astype(np.float32))


def dixon_magnitude(
    in_phase: NDArray[Any], out_of_phase: NDArray[Any],
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0), mask: BoolArray | None = None,
    fat_ratio_threshold: float = 0.9, subcutaneous_mm: float = 5.0,
) -> tuple[FloatArray, FloatArray]:
    """Water and fat from magnitude-only in-phase and out-of-phase images (2-point Dixon).

    |W - F| = OP and W + F = IP leave which of W and F dominates undecided. Intensity does not
    decide it in these data (the low-flip-angle in-phase echo is nearly proton-density
    weighted: fat and muscle are about equally bright), so the decision uses the ratio
    q = OP / IP, smoothed (Gaussian, 1 voxel in plane), per slice:

    * cores: fat-dominant where q > `fat_ratio_threshold`; water-dominant where
      0.5 < q < `fat_ratio_threshold` - 0.08. In the calf 3-D Dixon (OP = geometric mean of the
      TE 3.45 and 5.75 ms echoes) pure fat has q = 1.05-1.10 (its multi-peak spectrum is
      partly dephased at the TE 4.60 ms "in-phase" echo; tibial marrow), muscle about 0.7;
    * the rest of the signal mask goes to the core it reaches first in a watershed of -q, so
      the fat / water boundary falls on the dark line of minimal q where the fat fraction
      crosses 50 %.

    Water-dominant: W = (IP + OP) / 2; fat-dominant: W = (IP - OP) / 2 (OP clipped to IP).

    Limits: the threshold is empirical for this sequence (in the thigh 2-D Dixon, fat has
    q ~ 0.88 and muscle ~ 0.95: the cue does not carry over; use :func:`dixon_three_point`
    there). A thin fat layer whose every voxel is partial-volumed with muscle has no core and
    comes out water-dominant (bright on the water image); noisy coil-edge slices are
    unreliable. Voxels near 50 % fat are insensitive to the decision (W and F both ~ IP / 2).

    Parameters
    ----------
    in_phase, out_of_phase : arrays, shape (nx, ny, nz)
        Magnitudes; for two out-of-phase echoes around the in-phase one, pass their geometric
        mean (it refers the T2* decay to the in-phase echo time).
    spacing_mm : (sx, sy, sz)
        Voxel size in mm (unused but for the record: the smoothing is 1 voxel).
    mask : bool array, shape (nx, ny, nz), optional
        Voxels with signal; default :func:`_signal_mask` of the in-phase image.
    fat_ratio_threshold : float
        q above which a voxel is a fat core.

    Returns
    -------
    water, fat : float32 arrays, shape (nx, ny, nz)
        Non-negative, W + F = IP; outside the mask both are IP / 2.
    """
    sx, sy = float(spacing_mm[0]), float(spacing_mm[1])
    ip = np.asarray(in_phase, dtype=np.float32)
    op = np.minimum(np.asarray(out_of_phase, dtype=np.float32), ip)
    if mask is None:
        mask = _signal_mask(ip)
    q_raw = np.asarray(out_of_phase, dtype=np.float32) / np.maximum(ip, 1e-6)
    fat_dom = np.zeros(ip.shape, dtype=bool)
    for k in range(ip.shape[2]):
        msk = np.asarray(mask[:, :, k], dtype=bool)
        if msk.sum() < 50:
            continue
        q, _ = _normalized_convolution(q_raw[:, :, k], msk, (1.0, 1.0))
        q = np.where(msk, q, 0.0)
        filled = ndimage.binary_fill_holes(msk)
        depth_mm = ndimage.distance_transform_edt(filled, sampling=(sx, sy))
        markers = np.zeros(msk.shape, dtype=np.int32)
        markers[msk & (q > 0.5) & (q < fat_ratio_threshold - 0.08)
                & (depth_mm > subcutaneous_mm)] = 1
        markers[msk & ((q > fat_ratio_threshold) | (depth_mm <= 1.0 * max(sx, sy)))] = 2
        if not (markers == 2).any():
            continue
        ws = watershed(-q, markers, mask=msk)
        fat_dom[:, :, k] = ws == 2
    water = np.where(fat_dom, (ip - op) / 2.0, (ip + op) / 2.0)
    fat = np.where(fat_dom, (ip + op) / 2.0, (ip - op) / 2.0)
    water = np.where(mask, water, ip / 2.0)
    fat = np.where(mask, fat, ip / 2.0)
    return np.clip(water, 0, None).astype(np.float32), np.clip(fat, 0, None).astype(np.float32)


# --------------------------------------------------------------------------------------------
# source data and anatomy
# --------------------------------------------------------------------------------------------


def realdata_dir(path: str | Path | None = None) -> Path:
    """The ``legs`` folder: `path`, else $LIMBTRACK_REALDATA, else :data:`DEFAULT_REALDATA`.

    Raises
    ------
    RealDataMissing
        When the folder or one of the files used is not there.
    """
    root = Path(path) if path else Path(os.environ.get(REALDATA_ENV) or DEFAULT_REALDATA)
    need = ([root / THIGH_DIR / f for f in THIGH_MAGNITUDE + THIGH_PHASE]
            + [root / CALF_DIR / f for f in CALF_MAGNITUDE])
    missing = [p for p in need if not p.is_file()]
    if missing:
        raise RealDataMissing(
            f"real leg data not found: {missing[0]} (and {len(missing) - 1} more) is missing; "
            f"put the data at {DEFAULT_REALDATA} or name its folder with --realdata or "
            f"${REALDATA_ENV}")
    return root


@dataclass(frozen=True, eq=False)
class Source:
    """Real images of one region on their own grid, with water and fat.

    Attributes
    ----------
    region : 'thigh' or 'calf'
    affine : (4, 4) float64
        RAS voxel-to-world matrix (mm) of every array.
    in_phase, out_of_phase, water, fat : float32 arrays, shape (nx, ny, nz)
        In-phase magnitude (TE 4.60 ms), out-of-phase magnitude (TE 3.45 ms), Dixon water and
        fat (same units as the magnitudes).
    files : tuple of str
        Source file names, relative to the ``legs`` folder.
    """

    region: str
    affine: NDArray[np.float64]
    in_phase: FloatArray
    out_of_phase: FloatArray
    water: FloatArray
    fat: FloatArray
    files: tuple[str, ...]


def _load(path: Path) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: not a NIfTI image")
    return np.asarray(img.dataobj, dtype=np.float64), np.asarray(img.affine, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def load_source(region: Region, realdata: str | None = None,
                crop_slices: tuple[int, int] | None = None) -> Source:
    """Read a region's real images (optionally slices ``crop_slices[0]:crop_slices[1]``) and
    separate water and fat. Cached; the arrays are read-only.

    Parameters
    ----------
    region : 'thigh' or 'calf'
    realdata : str, optional
        The ``legs`` folder (see :func:`realdata_dir`).
    crop_slices : (k0, k1), optional
        Keep slices k0 <= k < k1 (the affine is moved accordingly).
    """
    root = realdata_dir(realdata)
    if region == "thigh":
        files = tuple(f"{THIGH_DIR}/{f}" for f in THIGH_MAGNITUDE + THIGH_PHASE)
        loaded = [_load(root / f) for f in files]
        mags = [a for a, _ in loaded[:3]]
        phases = [siemens_phase_to_rad(a) for a, _ in loaded[3:]]
        affine = loaded[1][1]
    elif region == "calf":
        files = tuple(f"{CALF_DIR}/{f}" for f in CALF_MAGNITUDE)
        loaded = [_load(root / f) for f in files]
        mags = [a for a, _ in loaded]
        phases = []
        affine = loaded[1][1]
    else:
        raise ValueError(f"region must be 'thigh' or 'calf', not {region!r}")
    for _, aff in loaded:
        if not np.allclose(aff, affine, atol=1e-4):
            raise ValueError(f"{region}: the echoes do not share one grid")
    if crop_slices is not None:
        k0, k1 = crop_slices
        mags = [m[:, :, k0:k1] for m in mags]
        phases = [p[:, :, k0:k1] for p in phases]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, float(k0)]) + affine[:3, 3]
    spacing = _spacing_mm(affine)
    if region == "thigh":
        water, fat = dixon_three_point(mags, phases, spacing)
    else:
        water, fat = dixon_magnitude(mags[1], np.sqrt(mags[0] * mags[2]), spacing)
    arrays = [m.astype(np.float32) for m in (mags[1], mags[0])] + [water, fat]
    for a in arrays:
        a.flags.writeable = False
    affine.flags.writeable = False
    return Source(region, affine, arrays[0], arrays[1], arrays[2], arrays[3], files)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Masks of a source found from its images.

    Attributes
    ----------
    limb : uint8 array, shape (nx, ny, nz)
        :data:`RIGHT` (1), :data:`LEFT` (2) or 0, from the world x of each slice's components
        (RAS: the patient's right is +x).
    tissue : uint8 array, shape (nx, ny, nz)
        :data:`MUSCLE`, :data:`FAT` (fat-dominant soft tissue), :data:`BONE` (cortex and
        other marrow), :data:`MARROW` (marrow cavity of the biggest bone: femur or tibia) or 0.
    t1_muscle : float32 array, shape (nx, ny, nz)
        Smooth local muscle level of the in-phase image (per slice, 15 mm Gaussian).
    """

    limb: NDArray[np.uint8]
    tissue: NDArray[np.uint8]
    t1_muscle: FloatArray


def _limb_labels(ip: FloatArray, affine: NDArray[np.float64]) -> NDArray[np.uint8]:
    """Right / left limb per slice: in-phase above half the tissue median, holes filled,
    components >= 400 mm^2, side from the sign of world x relative to the midline."""
    spacing = _spacing_mm(affine)
    fg = ip[ip > threshold_otsu(ip[ip > 0])]
    thr = 0.5 * float(np.median(fg))
    body = ip > thr
    out = np.zeros(ip.shape, dtype=np.uint8)
    # midline: world x halfway between the two largest blobs of the whole volume
    xs = np.arange(ip.shape[0])
    world_x = affine[0, 0] * xs + affine[0, 3]
    prof = body.sum(axis=(1, 2)).astype(np.float64)
    mid_x = float(np.sum(world_x * prof) / max(prof.sum(), 1.0))
    area_px = 400.0 / (spacing[0] * spacing[1])
    for k in range(ip.shape[2]):
        sl = ndimage.binary_closing(body[:, :, k], iterations=2)
        sl = ndimage.binary_opening(sl, iterations=2)
        sl = ndimage.binary_fill_holes(sl)
        lab, n = ndimage.label(sl)
        if n == 0:
            continue
        areas = ndimage.sum_labels(np.ones_like(lab), lab, np.arange(1, n + 1))
        coms = ndimage.center_of_mass(sl, lab, np.arange(1, n + 1))
        for i in range(n):
            if areas[i] < area_px:
                continue
            cx = float(affine[0, 0] * coms[i][0] + affine[0, 3])
            out[:, :, k][lab == i + 1] = RIGHT if cx > mid_x else LEFT
    return out


def _keep_main_marrow(tissue: NDArray[np.uint8], limb: NDArray[np.uint8],
                      aff: NDArray[np.float64], px_mm2: float) -> None:
    """Main marrow, in place: per limb, the largest 3-D connected sets of cavities (femur,
    tibia; gaps along z bridged) stay marrow, the other cavities become bone."""
    for side in (RIGHT, LEFT):
        cav = (tissue == MARROW) & (limb == side)
        if not cav.any():
            continue
        # bridge gaps of up to ~40 mm along z where a cortex was not closed
        gap = max(1, round(20.0 / _spacing_mm(aff)[2]))
        wide = ndimage.binary_dilation(cav, np.ones((3, 3, 1), bool), iterations=2)
        bridged = ndimage.binary_closing(wide, np.ones((1, 1, 2 * gap + 1), bool)) | wide
        lab3, n3 = ndimage.label(bridged)
        keep = np.zeros(n3 + 1, dtype=bool)
        for i in range(1, n3 + 1):
            per_slice = (cav & (lab3 == i)).sum(axis=(0, 1))
            keep[i] = float(np.median(per_slice[per_slice > 0])) * px_mm2 >= MAIN_MARROW_MM2
        if not keep.any():
            sizes = ndimage.sum_labels(cav, lab3, np.arange(1, n3 + 1))
            keep[int(np.argmax(sizes)) + 1] = True
        tissue[cav & ~keep[lab3]] = BONE


def find_anatomy(source: Source) -> Anatomy:
    """Limbs, bone, marrow cavity of the biggest bone, muscle and fat of a source.

    Per slice and limb: muscle level M = normalized convolution (15 mm) of the in-phase image
    over water-dominant voxels; cortex = in-phase < 0.4 M (closed by one voxel); each region
    enclosed by cortex (a hole of it), 8 mm^2 to a quarter of the limb, not touching the skin,
    with >= 70 % of the voxels 1-2 voxels around it dark and >= 50 % of it fat-dominant, is a
    marrow cavity (the cortex closed by 1, 2 or 3 voxels: thin cortices have gaps); bone = the
    cavities with the cortex touching them (within 10 mm), holes filled. Per limb, the largest
    3-D connected sets of cavities (gaps up to 40 mm along z bridged) whose median cross-section
    is at least :data:`MAIN_MARROW_MM2` are the main marrow (femur, tibia: the fibula's cavity
    is smaller); the other cavities are bone.
    """
    ip = np.asarray(source.in_phase)
    aff = source.affine
    sx, sy, _ = _spacing_mm(aff)
    limb = _limb_labels(ip, aff)
    fat_dom = np.asarray(source.fat > source.water)
    tissue = np.zeros(ip.shape, dtype=np.uint8)
    t1_muscle = np.zeros(ip.shape, dtype=np.float32)
    sig = (15.0 / sx, 15.0 / sy)
    px_mm2 = sx * sy
    ring_r = max(1, round(10.0 / sx))
    for k in range(ip.shape[2]):
        sl = ip[:, :, k]
        limbs = limb[:, :, k] > 0
        if not limbs.any():
            continue
        water_dom = limbs & ~fat_dom[:, :, k]
        med = float(np.median(sl[water_dom])) if water_dom.any() else float(np.median(sl[limbs]))
        muscle0 = water_dom & (sl > 0.5 * med)
        level, w = _normalized_convolution(sl, muscle0 if muscle0.any() else limbs, sig)
        level = np.where(w > 0.02, level, med).astype(np.float32)
        t1_muscle[:, :, k] = level
        dark0 = limbs & (sl < 0.4 * level)
        bone = np.zeros(limbs.shape, dtype=bool)
        cavities = np.zeros(limbs.shape, dtype=bool)
        for closing in (1, 2, 3):  # a gap in a thin cortex closes at 2 or 3
            dark = ndimage.binary_closing(dark0, iterations=closing) & limbs
            for side in (RIGHT, LEFT):
                this = limb[:, :, k] == side
                if not this.any():
                    continue
                skin = this & ~ndimage.binary_erosion(this, iterations=2)
                holes = ndimage.binary_fill_holes(dark & this) & ~dark & this
                lab, n = ndimage.label(holes)
                for i in range(1, n + 1):
                    h = lab == i
                    area = float(h.sum()) * px_mm2
                    if (area < 8.0 or area > 0.25 * float(this.sum()) * px_mm2
                            or (h & skin).any()):
                        continue
                    ring = ndimage.binary_dilation(h, iterations=2) & ~h
                    if dark[ring].mean() < 0.7 or fat_dom[:, :, k][h].mean() < 0.5:
                        continue
                    near = ndimage.binary_dilation(h, iterations=ring_r)
                    dlab, _ = ndimage.label(dark & near)
                    touching = np.unique(dlab[ndimage.binary_dilation(h, iterations=1) & dark])
                    cortex = np.isin(dlab, touching[touching > 0])
                    bone |= ndimage.binary_fill_holes(h | cortex)
                    cavities |= h
        t = np.where(limbs, np.where(fat_dom[:, :, k], FAT, MUSCLE), BACKGROUND)
        t = np.where(bone, BONE, t)
        t = np.where(cavities, MARROW, t)
        tissue[:, :, k] = t.astype(np.uint8)
    _keep_main_marrow(tissue, limb, aff, px_mm2)
    return Anatomy(limb, tissue, t1_muscle)


@functools.lru_cache(maxsize=4)
def _source_and_anatomy(region: Region, realdata: str | None,
                        crop_slices: tuple[int, int] | None) -> tuple[Source, Anatomy]:
    src = load_source(region, realdata, crop_slices)
    return src, find_anatomy(src)


# --------------------------------------------------------------------------------------------
# 2. inserted changes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HybridSession:
    """What one session of a hybrid case holds.

    Attributes
    ----------
    day : int
        Days from day 0 (study date = day0 + day).
    lesion_ml, edema_ml : float
        Target marrow lesion and edema volumes (mL) in the affected limb.
    swelling_pct : float
        Target growth of the affected limb's soft-tissue volume, percent of the source's.
    table_shift_mm : float
        The anatomy moved along world z (superior positive) by this much.
    rotation_deg : float
        The anatomy rotated about the world z axis through the field-of-view centre
        (right-handed in RAS: +x towards +y).
    grid_spacing_mm : (sx, sy, sz), optional
        Voxel size of the session's grid (same field of view); None keeps the source's.
    layout : 'bilateral', 'split' or 'affected_only'
        How the session's legs are imaged: both in one image per role; each leg in its own
        image per role (two anatomical and two fluid rows in the sheet, see
        :class:`SplitLayout`); or the affected leg alone, cropped from the source (the
        contralateral reference must come from another session). The last two keep the
        source grid (no repositioning).
    """

    day: int
    lesion_ml: float = 0.0
    edema_ml: float = 0.0
    swelling_pct: float = 0.0
    table_shift_mm: float = 0.0
    rotation_deg: float = 0.0
    grid_spacing_mm: tuple[float, float, float] | None = None
    layout: str = "bilateral"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.layout != "bilateral" and self.moved:
            raise ValueError(f"a {self.layout} session keeps the source grid: no table shift, "
                             "rotation or grid spacing")

    @property
    def moved(self) -> bool:
        """True when the session is resampled onto another grid."""
        return bool(self.table_shift_mm or self.rotation_deg or self.grid_spacing_mm)


@dataclass(frozen=True)
class _Fields:
    """Fixed random fields of a case (same for every session, so changes nest)."""

    lesion_score: FloatArray
    edema_muscle_score: FloatArray
    edema_fat_score: FloatArray
    texture: FloatArray


def _noise_sd(image: FloatArray, region: BoolArray) -> float:
    """Noise standard deviation from neighbour differences along x in `region` (robust)."""
    d = (image[1:] - image[:-1])[region[1:] & region[:-1]]
    if d.size < 10:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def _case_fields(src: Source, anat: Anatomy, side: int, seed: int) -> _Fields:
    """Scores whose top-N voxels make the lesion and edema (world-mm geometry)."""
    rng = np.random.default_rng(seed)
    sx, sy, sz = _spacing_mm(src.affine)
    shape = src.in_phase.shape
    marrow = (anat.tissue == MARROW) & (anat.limb == side)
    if not marrow.any():
        raise ValueError("no marrow cavity found in the affected limb")
    ks = np.flatnonzero(marrow.any(axis=(0, 1)))
    areas = marrow.sum(axis=(0, 1))[ks]
    # lesion centre: a mid-shaft slice (among the slices with the smallest cavities) chosen by
    # the seed, at the cavity's centroid
    shaft = ks[areas <= np.percentile(areas, 60)] if ks.size > 2 else ks
    kc = int(shaft[len(shaft) // 2 + int(rng.integers(-1, 2)) * (len(shaft) > 4)])
    cx, cy = ndimage.center_of_mass(marrow[:, :, kc])
    r_mm = math.sqrt(float(marrow[:, :, kc].sum()) * sx * sy / math.pi)
    i, j, k = np.meshgrid(np.arange(shape[0]) * sx, np.arange(shape[1]) * sy,
                          np.arange(shape[2]) * sz, indexing="ij", sparse=True)
    rho = np.sqrt(((i - cx * sx) / r_mm) ** 2 + ((j - cy * sy) / r_mm) ** 2
                  + ((k - kc * sz) / (4.0 * r_mm)) ** 2)
    lobes = _smooth_field(shape, (3.0 / sx, 3.0 / sy, max(6.0 / sz, 0.5)), rng)
    lesion_score = (-rho + 0.25 * lobes).astype(np.float32)
    # edema envelope: centred in the limb's soft tissue at the lesion level
    soft = (anat.limb[:, :, kc] == side) & (anat.tissue[:, :, kc] <= FAT)
    ex, ey = ndimage.center_of_mass(soft)
    ex, ey = 0.5 * (ex + cx), 0.5 * (ey + cy)
    r_limb = math.sqrt(float(soft.sum()) * sx * sy / math.pi)
    env = (((i - ex * sx) / (0.6 * r_limb)) ** 2 + ((j - ey * sy) / (0.6 * r_limb)) ** 2
           + ((k - kc * sz) / 60.0) ** 2)
    feather = _smooth_field(shape, (1.5 / sx, 1.5 / sy, max(10.0 / sz, 0.5)), rng)
    strands = _smooth_field(shape, (2.5 / sx, 2.5 / sy, max(8.0 / sz, 0.5)), rng)
    texture = _smooth_field(shape, (2.0 / sx, 2.0 / sy, max(4.0 / sz, 0.5)), rng)
    return _Fields(lesion_score, (-env + 0.35 * feather).astype(np.float32),
                   (-env - 3.0 * np.abs(strands)).astype(np.float32), texture)


def _top_n(score: FloatArray, candidates: BoolArray, n: int) -> BoolArray:
    """The `n` candidate voxels of highest score (ties broken by index)."""
    out = np.zeros(score.shape, dtype=bool)
    idx = np.flatnonzero(candidates)
    if n > idx.size:
        raise ValueError(f"asked for {n} voxels, only {idx.size} candidates")
    if n <= 0:
        return out
    order = np.argsort(-score.ravel()[idx], kind="stable")[:n]
    out.ravel()[idx[order]] = True
    return out


def _swelling_displacement(limb: NDArray[np.uint8], tissue: NDArray[np.uint8], side: int,
                           spacing: tuple[float, float, float]) -> NDArray[np.float64]:
    """Unit radial displacement field (mm per unit strength), shape (2, nx, ny, nz).

    Per slice, u(y) = g(y) (y - c): c the centroid of the limb's bone (else of the limb),
    g = smoothstep of the normalised depth d_bone / (d_bone + d_skin) inside the limb (0 in
    bone, 1 at the skin), 1 up to 4 mm outside the skin then down to 0 at 14 mm, and 0 within
    3 mm of the other limb. Multiplied by a strength alpha, y - alpha u(y) is where the
    swollen image at y takes its signal from.
    """
    sx, sy, _ = spacing
    nx, ny, nz = limb.shape
    u = np.zeros((2, nx, ny, nz), dtype=np.float64)
    gx, gy = np.meshgrid(np.arange(nx) * sx, np.arange(ny) * sy, indexing="ij")
    for k in range(nz):
        this = limb[:, :, k] == side
        if this.sum() < 20:
            continue
        bone = this & (tissue[:, :, k] >= BONE)
        if bone.sum() < 5:
            cx, cy = ndimage.center_of_mass(this)
            bone = ((gx - cx * sx) ** 2 + (gy - cy * sy) ** 2) <= 25.0
        else:
            cx, cy = ndimage.center_of_mass(bone)
        d_bone = ndimage.distance_transform_edt(~bone, sampling=(sx, sy))
        d_skin = ndimage.distance_transform_edt(this, sampling=(sx, sy))
        d_out = ndimage.distance_transform_edt(~this, sampling=(sx, sy))
        t = d_bone / np.maximum(d_bone + d_skin, 1e-6)
        g = np.where(this, _smoothstep(t), 1.0 - _smoothstep((d_out - 4.0) / 10.0))
        other = (limb[:, :, k] > 0) & ~this
        if other.any():
            d_other = ndimage.distance_transform_edt(~other, sampling=(sx, sy))
            g = g * _smoothstep((d_other - 3.0) / 6.0)
        g = ndimage.gaussian_filter(g, (1.0 / sx, 1.0 / sy))
        g[ndimage.binary_dilation(bone, iterations=1)] = 0.0
        u[0, :, :, k] = g * (gx - cx * sx)
        u[1, :, :, k] = g * (gy - cy * sy)
    return u


def _warp_slices(arr: NDArray[Any], u_mm: NDArray[np.float64],
                 spacing: tuple[float, float, float], order: int,
                 supersample: int = 1) -> NDArray[Any]:
    """Sample `arr` at y - u(y) per slice (2-D), optionally on a grid `supersample` x finer
    in plane (the output then has shape (nx * s, ny * s, nz))."""
    sx, sy, _ = spacing
    nx, ny, nz = arr.shape
    s = supersample
    off = (np.arange(s) + 0.5) / s - 0.5
    fi = (np.arange(nx)[:, None] + off[None, :]).ravel()
    fj = (np.arange(ny)[:, None] + off[None, :]).ravel()
    gi, gj = np.meshgrid(fi, fj, indexing="ij")
    out = np.zeros((nx * s, ny * s, nz), dtype=arr.dtype)
    for k in range(nz):
        ux, uy = u_mm[0, :, :, k], u_mm[1, :, :, k]
        if s > 1:
            ux = ndimage.map_coordinates(ux, [gi, gj], order=1, mode="nearest")
            uy = ndimage.map_coordinates(uy, [gi, gj], order=1, mode="nearest")
        out[:, :, k] = ndimage.map_coordinates(arr[:, :, k], [gi - ux / sx, gj - uy / sy],
                                               order=order, mode="constant", cval=0)
    return out


def _limb_ml_fine(limb_mask: BoolArray, u_mm: NDArray[np.float64] | None,
                  spacing: tuple[float, float, float], supersample: int,
                  image: FloatArray, threshold: float) -> NDArray[np.float64]:
    """Per-slice volume (mL) of the limb at the warped positions y - u(y) (u None: unwarped).

    The limb is where `image` (linearly interpolated) is at or above `threshold`, near the
    limb mask (within 10 voxels), holes filled: what thresholding the warped image finds.
    Pixels within 2 pixels of its outline at the pixel centres are sampled `supersample` x
    `supersample` times; the others count whole (inside) or not at all."""
    sx, sy, sz = spacing
    nx, ny, nz = limb_mask.shape
    s = supersample
    off = (np.arange(s) + 0.5) / s - 0.5
    oi, oj = (a.ravel() for a in np.meshgrid(off, off, indexing="ij"))
    gi, gj = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64),
                         indexing="ij")
    near_f = ndimage.binary_dilation(limb_mask, np.ones((3, 3, 1), bool),
                                     iterations=10).astype(np.float32)
    out = np.zeros(nz, dtype=np.float64)
    for k in range(nz):
        if not limb_mask[:, :, k].any():
            continue
        ux = np.zeros((nx, ny)) if u_mm is None else u_mm[0, :, :, k]
        uy = np.zeros((nx, ny)) if u_mm is None else u_mm[1, :, :, k]
        at_c = [gi - ux / sx, gj - uy / sy]
        coarse = ndimage.binary_fill_holes(
            (ndimage.map_coordinates(image[:, :, k], at_c, order=1, mode="constant",
                                     cval=0) >= threshold)
            & (ndimage.map_coordinates(near_f[:, :, k], at_c, order=1, mode="constant",
                                       cval=0) >= 0.5))
        band = (ndimage.binary_dilation(coarse, iterations=2)
                & ~ndimage.binary_erosion(coarse, iterations=2, border_value=1))
        n_inside = float((coarse & ~band).sum()) * s * s
        bi, bj = np.nonzero(band)
        fi = (bi[:, None] + oi[None, :]).ravel()
        fj = (bj[:, None] + oj[None, :]).ravel()
        fux = ndimage.map_coordinates(ux, [fi, fj], order=1, mode="nearest")
        fuy = ndimage.map_coordinates(uy, [fi, fj], order=1, mode="nearest")
        at = [fi - fux / sx, fj - fuy / sy]
        inside = ((ndimage.map_coordinates(image[:, :, k], at, order=1, mode="constant",
                                           cval=0) >= threshold)
                  & (ndimage.map_coordinates(near_f[:, :, k], at, order=1, mode="constant",
                                             cval=0) >= 0.5))
        # fine points outside the array hold no limb (the image has no signal there)
        inside[(fi < -0.5) | (fi > nx - 0.5) | (fj < -0.5) | (fj > ny - 0.5)] = False
        out[k] = (n_inside + float(inside.sum())) * sx * sy * sz / (s * s) / 1000.0
    return out


def _limb_bbox(mask: BoolArray, margin: int) -> tuple[slice, slice]:
    ii = np.flatnonzero(mask.any(axis=(1, 2)))
    jj = np.flatnonzero(mask.any(axis=(0, 2)))
    return (slice(max(int(ii[0]) - margin, 0), int(ii[-1]) + margin + 1),
            slice(max(int(jj[0]) - margin, 0), int(jj[-1]) + margin + 1))


@dataclass
class _State:
    """A session's images and masks on the source grid while changes are inserted."""

    t1: FloatArray
    fluid: FloatArray
    limb: NDArray[np.uint8]
    tissue: NDArray[np.uint8]
    t1_muscle: FloatArray
    fluid_muscle: FloatArray
    fields: _Fields
    swelling_ml_by_slice: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    alpha: float = 0.0
    outline_threshold: float = 0.0
    swelling_continuous_ml: float = 0.0


def _fluid_muscle_level(fluid: FloatArray, anat_limb: NDArray[np.uint8],
                        tissue: NDArray[np.uint8], t1: FloatArray, t1_muscle: FloatArray,
                        spacing: tuple[float, float, float]) -> FloatArray:
    """Smooth local muscle level of the fluid image (per slice, 15 mm Gaussian)."""
    sx, sy, _ = spacing
    out = np.zeros(fluid.shape, dtype=np.float32)
    for k in range(fluid.shape[2]):
        m = (tissue[:, :, k] == MUSCLE) & (t1[:, :, k] > 0.5 * t1_muscle[:, :, k])
        if m.sum() < 20:
            continue
        lev, w = _normalized_convolution(fluid[:, :, k], m, (15.0 / sx, 15.0 / sy))
        out[:, :, k] = np.where(w > 0.02, lev, float(np.median(fluid[:, :, k][m])))
    return out


def _apply_swelling(state: _State, side: int, swelling_pct: float,
                    spacing: tuple[float, float, float]) -> None:
    """Warp the affected limb so its soft tissue grows by `swelling_pct` percent (in place);
    record the exact per-slice volume change (mL)."""
    affected = state.limb == side
    soft_ml = float((affected & (state.tissue <= FAT)).sum()) * float(np.prod(spacing)) / 1000.0
    target_ml = soft_ml * swelling_pct / 100.0
    bx, by = _limb_bbox(affected, margin=round(20.0 / spacing[0]))
    sub = affected[bx, by]
    unit = _swelling_displacement(state.limb[bx, by], state.tissue[bx, by], side, spacing)
    img = state.t1[bx, by]
    fg = state.t1[state.t1 > threshold_otsu(state.t1[state.t1 > 0])]
    thr = 0.5 * float(np.median(fg))
    base = _limb_ml_fine(sub, None, spacing, 1, img, thr)
    alpha = 0.5 * swelling_pct / 100.0
    for _ in range(4):  # fixed point: the volume change is nearly linear in alpha
        got = float((_limb_ml_fine(sub, alpha * unit, spacing, 1, img, thr) - base).sum())
        if abs(got - target_ml) <= 0.002 * abs(target_ml) or got == 0.0:
            break
        alpha *= target_ml / got
    u = alpha * unit
    jac = ((1 - np.gradient(u[0], spacing[0], axis=0)) * (1 - np.gradient(u[1], spacing[1], axis=1))
           - np.gradient(u[0], spacing[1], axis=1) * np.gradient(u[1], spacing[0], axis=0))
    if float(jac.min()) <= 0.2:
        raise ValueError(f"swelling of {swelling_pct} % folds the warp (min Jacobian "
                         f"{float(jac.min()):.2f}); use a smaller swelling")
    s = SWELLING_SUPERSAMPLE
    state.swelling_ml_by_slice = (_limb_ml_fine(sub, u, spacing, 1, img, thr)
                                  - _limb_ml_fine(sub, None, spacing, 1, img, thr))
    state.swelling_continuous_ml = float((_limb_ml_fine(sub, u, spacing, s, img, thr)
                                          - _limb_ml_fine(sub, None, spacing, s, img, thr)).sum())
    state.alpha = alpha
    state.outline_threshold = thr

    def warp(a: NDArray[Any], order: int) -> NDArray[Any]:
        out = a.copy()
        out[bx, by] = _warp_slices(a[bx, by], u, spacing, order)
        return out

    # labels: the affected limb and its tissue follow the warp; the other limb is untouched
    limb_w = warp(state.limb, 0)
    tissue_w = warp(state.tissue, 0)
    other = (state.limb > 0) & (state.limb != side)
    state.limb = np.where(other, state.limb, np.where(limb_w == side, side, 0)).astype(np.uint8)
    state.tissue = np.where(other, state.tissue,
                            np.where(limb_w == side, tissue_w, BACKGROUND)).astype(np.uint8)
    for name in ("t1", "fluid", "t1_muscle", "fluid_muscle"):
        setattr(state, name, warp(getattr(state, name), 1).astype(np.float32))
    f = state.fields
    state.fields = _Fields(f.lesion_score, warp(f.edema_muscle_score, 1),
                           warp(f.edema_fat_score, 1), warp(f.texture, 1))


def _insert_lesion(state: _State, side: int, n_vox: int, noise: tuple[float, float]) -> BoolArray:
    """Replace the top-`n_vox` marrow voxels of the lesion score (in place); the mask."""
    cand = (state.tissue == MARROW) & (state.limb == side)
    mask = _top_n(state.fields.lesion_score, cand, n_vox)
    if mask.any():
        rng = np.random.default_rng(n_vox)
        tex = 1.0 + 0.05 * state.fields.texture[mask]
        t1_rel, fl_rel = LESION_REL_MUSCLE
        state.t1[mask] = (t1_rel * state.t1_muscle[mask] * tex
                          + noise[0] * rng.standard_normal(int(mask.sum())))
        state.fluid[mask] = (fl_rel * state.fluid_muscle[mask] * tex
                             + noise[1] * rng.standard_normal(int(mask.sum())))
    return mask


def _insert_edema(state: _State, side: int, n_vox: int, noise: tuple[float, float],
                  exclude: BoolArray) -> BoolArray:
    """Edema in muscle (feathery) and fat (strands) of the affected limb (in place)."""
    limb = (state.limb == side) & ~exclude
    muscle = limb & (state.tissue == MUSCLE) & (state.t1 > 0.5 * state.t1_muscle)
    fat = limb & (state.tissue == FAT)
    n_fat = min(round(EDEMA_FAT_SHARE * n_vox), int(fat.sum()))
    mask_m = _top_n(state.fields.edema_muscle_score, muscle, n_vox - n_fat)
    mask_f = _top_n(state.fields.edema_fat_score, fat, n_fat)
    rng = np.random.default_rng(n_vox + 1)
    for mask, (t1_rel, fl_rel) in ((mask_m, EDEMA_MUSCLE_REL_MUSCLE),
                                   (mask_f, EDEMA_FAT_REL_MUSCLE)):
        if not mask.any():
            continue
        tex = 1.0 + 0.08 * state.fields.texture[mask]
        n = int(mask.sum())
        state.t1[mask] = t1_rel * state.t1_muscle[mask] * tex + noise[0] * rng.standard_normal(n)
        state.fluid[mask] = (fl_rel * state.fluid_muscle[mask] * tex
                             + noise[1] * rng.standard_normal(n))
    return mask_m | mask_f


# --------------------------------------------------------------------------------------------
# session grid
# --------------------------------------------------------------------------------------------


def _session_reference(affine: NDArray[np.float64], shape: tuple[int, int, int],
                       ses: HybridSession) -> sitk.Image:
    """The session's axial grid: source field of view in plane, z limited to where the moved
    anatomy still has source data, voxel size from the session (else the source's)."""
    sp = np.asarray(_spacing_mm(affine))
    new_sp = np.asarray(ses.grid_spacing_mm or sp, dtype=np.float64)
    direction = affine[:3, :3] / sp
    lo = affine[:3, 3] - 0.5 * direction @ sp  # corner of the first voxel (RAS)
    extent = np.asarray(shape) * sp
    z_lo = max(0.0, ses.table_shift_mm)
    z_hi = min(extent[2], extent[2] + ses.table_shift_mm)
    size = np.floor(np.array([extent[0], extent[1], z_hi - z_lo]) / new_sp + 1e-6).astype(int)
    if size.min() < 1:
        raise ValueError("the table shift leaves no slice with source data")
    start = np.array([(extent[0] - size[0] * new_sp[0]) / 2,
                      (extent[1] - size[1] * new_sp[1]) / 2, z_lo])
    origin_ras = lo + direction @ (start + 0.5 * new_sp)
    aff = np.eye(4)
    aff[:3, :3] = direction * new_sp
    aff[:3, 3] = origin_ras
    return to_sitk(np.zeros(tuple(size), dtype=np.float32), aff)


def _session_transform(affine: NDArray[np.float64], shape: tuple[int, int, int],
                       ses: HybridSession) -> sitk.Transform:
    """Output (session) physical point -> source physical point, LPS (SimpleITK)."""
    centre_ras = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    centre_lps = np.diag([-1.0, -1.0, 1.0]) @ centre_ras
    tr = sitk.Euler3DTransform()
    tr.SetCenter([float(v) for v in centre_lps])
    # anatomy moved by T(p) = R (p - c) + c + t; resampling needs T^-1 (R about z, t along z)
    tr.SetRotation(0.0, 0.0, -math.radians(ses.rotation_deg))
    tr.SetTranslation((0.0, 0.0, -float(ses.table_shift_mm)))
    return tr


def _to_session(arr: NDArray[Any], affine: NDArray[np.float64], ses: HybridSession,
                label: bool) -> tuple[NDArray[Any], NDArray[np.float64]]:
    """Resample a source-grid array onto the session's grid (linear; masks: linear >= 0.5)."""
    if not ses.moved:
        return arr, affine
    ref = _session_reference(affine, arr.shape, ses)
    tr = _session_transform(affine, arr.shape, ses)
    img = to_sitk(arr.astype(np.float32), affine)
    out = sitk.Resample(img, ref, tr, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    res, aff = from_sitk(out)
    if label:
        return (res >= 0.5).astype(np.uint8), aff
    return res.astype(np.float32), aff


# --------------------------------------------------------------------------------------------
# one-leg images: split sessions and the affected leg alone
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitLayout:
    """How the one-leg images of a split session are made from the session's bilateral images.

    Each leg's image is the source grid cropped in plane to the leg (its box over all slices,
    widened on each side by :data:`LEG_MARGIN_FRACTION` of its left-right width, within the
    source image), the other leg's voxels in the crop set to 0 (outside the coil; see
    :data:`OTHER_LEG_CLEARANCE_MM`). The leg `resampled_side` is then resampled (linear) onto
    a grid whose first voxel lies `shift_px` source pixels (x, y) from the crop's and whose
    in-plane pixel is `pixel_mm` (None: the source's); its slices stay the source's, so the
    other leg stays on the source grid itself.
    """

    resampled_side: str = "right"
    shift_px: tuple[float, float] = (0.43, 0.27)
    pixel_mm: float | None = None

    def __post_init__(self) -> None:
        if self.resampled_side not in SIDE_CODE:
            raise ValueError(f"resampled_side must be left or right, not {self.resampled_side}")


def _leg_box(limb: NDArray[np.uint8], code: int, spacing: tuple[float, float, float]
             ) -> tuple[slice, slice]:
    """In-plane box (x, y index slices) of one leg over all slices, with its margin."""
    this = limb == code
    ii = np.flatnonzero(this.any(axis=(1, 2)))
    jj = np.flatnonzero(this.any(axis=(0, 2)))
    margin_mm = LEG_MARGIN_FRACTION * (ii[-1] - ii[0] + 1) * spacing[0]
    mx, my = round(margin_mm / spacing[0]), round(margin_mm / spacing[1])
    return (slice(max(int(ii[0]) - mx, 0), min(int(ii[-1]) + mx + 1, limb.shape[0])),
            slice(max(int(jj[0]) - my, 0), min(int(jj[-1]) + my + 1, limb.shape[1])))


def _outside_coil(limb: NDArray[np.uint8], code: int, spacing: tuple[float, float, float]
                  ) -> BoolArray:
    """Voxels of the other leg, and up to :data:`OTHER_LEG_CLEARANCE_MM` around it, that are
    not next to this leg: what a one-leg coil does not receive."""
    reach = max(1, round(OTHER_LEG_CLEARANCE_MM / spacing[0]))
    in_plane = np.ones((3, 3, 1), dtype=bool)
    other = ndimage.binary_dilation((limb > 0) & (limb != code), in_plane, iterations=reach)
    return np.asarray(other & ~ndimage.binary_dilation(limb == code, in_plane, iterations=1))


def _crop_affine(affine: NDArray[np.float64], box: tuple[slice, slice]) -> NDArray[np.float64]:
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ np.array([box[0].start, box[1].start, 0.0]) + affine[:3, 3]
    return out


def _off_grid(arr: FloatArray, affine: NDArray[np.float64], split: SplitLayout
              ) -> tuple[FloatArray, NDArray[np.float64]]:
    """`arr` resampled (linear, 0 outside) onto `split`'s shifted grid (see SplitLayout)."""
    sp = np.asarray(_spacing_mm(affine))
    new_sp = sp.copy()
    if split.pixel_mm:
        new_sp[:2] = split.pixel_mm
    shift = np.array([split.shift_px[0], split.shift_px[1], 0.0])
    extent = np.asarray(arr.shape) * sp - shift * sp
    size = np.floor(extent / new_sp + 1e-6).astype(int)
    size[2] = arr.shape[2]
    # the new grid's first voxel starts `shift` source pixels in from the crop's first one;
    # its centre, in source voxel indices (the slices are the source's):
    first = np.array([shift[0] - 0.5 + 0.5 * new_sp[0] / sp[0],
                      shift[1] - 0.5 + 0.5 * new_sp[1] / sp[1], 0.0])
    aff = np.eye(4)
    aff[:3, :3] = affine[:3, :3] / sp * new_sp
    aff[:3, 3] = affine[:3, :3] @ first + affine[:3, 3]
    ref = to_sitk(np.zeros(tuple(size), dtype=np.float32), aff)
    out = sitk.Resample(to_sitk(arr.astype(np.float32), affine), ref, sitk.Transform(),
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    res, res_aff = from_sitk(out)
    return res.astype(np.float32), res_aff


def _write_layout(ses: HybridSession, split: SplitLayout, images: Mapping[str, FloatArray],
                  affine: NDArray[np.float64], limb: NDArray[np.uint8], affected: int,
                  ses_name: str, out_dir: Path) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Write a session's images as its layout says: the truth's record of them and the
    sessions-sheet rows (role, path). `images` holds ``anatomical`` and ``fluid`` on the
    source (or session) grid; `limb` the limb codes on that grid."""
    if ses.layout == "bilateral":
        rel = {"t1": f"{ses_name}/t1.nii.gz", "fluid": f"{ses_name}/fluid.nii.gz"}
        write_nifti(out_dir / rel["t1"], images["anatomical"].astype(np.float32), affine)
        write_nifti(out_dir / rel["fluid"], images["fluid"].astype(np.float32), affine)
        return rel, [("anatomical", rel["t1"]), ("fluid", rel["fluid"])]
    spacing = _spacing_mm(affine)
    codes = [affected] if ses.layout == "affected_only" else [RIGHT, LEFT]
    record: list[dict[str, Any]] = []
    rows: list[tuple[str, str]] = []
    for code in codes:
        side = "right" if code == RIGHT else "left"
        box = _leg_box(limb, code, spacing)
        outside = _outside_coil(limb, code, spacing)[box]
        resampled = ses.layout == "split" and side == split.resampled_side
        for role, stem in (("anatomical", "t1"), ("fluid", "fluid")):
            arr = np.where(outside, 0.0, images[role][box]).astype(np.float32)
            aff = _crop_affine(affine, box)
            if resampled:
                arr, aff = _off_grid(arr, aff, split)
            path = f"{ses_name}/{stem}_{side}.nii.gz"
            write_nifti(out_dir / path, arr, aff)
            rows.append((role, path))
            record.append({"role": role, "side": side, "path": path, "resampled": resampled,
                           "grid": {"shape": list(arr.shape),
                                    "affine": np.round(aff, 6).tolist()}})
    return {"images": record}, rows


# --------------------------------------------------------------------------------------------
# 3. cases
# --------------------------------------------------------------------------------------------


def expected_pattern(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Response pattern of docs/design.md from the true per-session values.

    Parameters
    ----------
    rows : sequence of mappings, in day order
        Each with ``day``, ``true_asymmetry_change_pp`` (against the source, so differences
        between sessions are asymmetry changes), ``lesion_ml`` and ``edema_ml``.

    Returns
    -------
    dict
        ``pattern`` (pseudo-progression / progression / response / stable / indeterminate),
        ``baseline_day`` and per later session ``flare`` and ``resolved``.
    """
    if len(rows) < 2:
        return {"pattern": "indeterminate", "baseline_day": None, "sessions": []}
    before = [i for i, r in enumerate(rows) if r["day"] <= 0]
    b = before[-1] if before else 0
    base = rows[b]
    later = rows[b + 1:]
    if not later:
        return {"pattern": "indeterminate", "baseline_day": base["day"], "sessions": []}
    eps = 1e-9

    def flare(r: Mapping[str, Any]) -> bool:
        d_asym = r["true_asymmetry_change_pp"] - base["true_asymmetry_change_pp"]
        les, les0 = r["lesion_ml"], base["lesion_ml"]
        ede, ede0 = r["edema_ml"], base["edema_ml"]
        return bool(d_asym >= 5.0 - eps or (les >= 1.2 * les0 - eps and les - les0 >= 1.0 - eps)
                    or (ede >= 1.2 * ede0 - eps and ede - ede0 >= 10.0 - eps))

    def resolved(r: Mapping[str, Any]) -> bool:
        d_asym = r["true_asymmetry_change_pp"] - base["true_asymmetry_change_pp"]
        return bool(d_asym <= 2.0 + eps and r["lesion_ml"] <= base["lesion_ml"] + eps
                    and r["edema_ml"] <= base["edema_ml"] + eps)

    flags = [{"day": r["day"], "flare": flare(r), "resolved": resolved(r)} for r in later]
    last = later[-1]
    if flare(last):
        pattern = "progression"
    elif any(f["flare"] for f in flags):
        pattern = "pseudo-progression" if resolved(last) else "stable"
    else:
        les0, les = base["lesion_ml"], last["lesion_ml"]
        d_asym = last["true_asymmetry_change_pp"] - base["true_asymmetry_change_pp"]
        if (les0 >= 1.0 - eps and les <= 0.7 * les0 + eps) or -d_asym >= 5.0 - eps:
            pattern = "response"
        else:
            pattern = "stable"
    return {"pattern": pattern, "baseline_day": base["day"], "sessions": flags}


def _fluid_source(src: Source, fluid: FluidKind) -> FloatArray:
    if fluid == "water":
        return np.asarray(src.water, dtype=np.float32)
    if fluid == "in_phase":
        return np.asarray(src.in_phase, dtype=np.float32)
    if fluid == "out_of_phase":
        return np.asarray(src.out_of_phase, dtype=np.float32)
    raise ValueError(f"fluid must be water, in_phase or out_of_phase, not {fluid!r}")


def _session_name(day0: dt.date, day: int) -> tuple[str, str]:
    date = day0 + dt.timedelta(days=int(day))
    return f"ses-{date:%Y%m%d}", date.isoformat()


def make_case(
    region: Region, out_dir: Path, sessions: Sequence[HybridSession], affected_side: str,
    subject: str = "HYB", day0: str = "2024-01-15", seed: int = 0,
    fluid: FluidKind = "water", t1_fat_gain: float = 1.0,
    crop_slices: tuple[int, int] | None = None, realdata: str | Path | None = None,
    name: str = "", split: SplitLayout | None = None,
) -> dict[str, Any]:
    """Write one hybrid case: sessions sheet, images, truth masks and ``truth.json``.

    Parameters
    ----------
    region : 'thigh' or 'calf'
    out_dir : Path
        Case folder (created): ``sessions.tsv``, ``ses-YYYYMMDD/{t1,fluid}.nii.gz``,
        ``truth/ses-YYYYMMDD_{lesion,edema}.nii.gz`` and ``truth.json``.
    sessions : sequence of HybridSession
        In any order; one study date each.
    affected_side : 'left' or 'right'
        The patient's side that gets the changes (RAS: the patient's right is +x).
    subject, day0 : str
        Subject id and day 0 (YYYY-MM-DD).
    seed : int
        Seed of the lesion / edema shapes and inserted noise.
    fluid : 'water', 'in_phase' or 'out_of_phase'
        The fluid-sensitive image: Dixon water (fat-suppressed) or an echo that is not.
    t1_fat_gain : float
        The anatomical image is W + gain x F (in the signal mask); 1.0 is the in-phase
        magnitude itself. Above 1 makes fat brighter than muscle (T1-like) where the
        low-flip-angle in-phase echo is nearly proton-density weighted.
    crop_slices : (k0, k1), optional
        Use source slices k0 <= k < k1 only (faster cases).
    realdata : path, optional
        The ``legs`` folder (see :func:`realdata_dir`).
    name : str
        Case name, for the record.
    split : SplitLayout, optional
        How the one-leg images of ``split`` sessions are made (default: the right leg
        resampled 0.43 x 0.27 pixels off the source grid).

    Returns
    -------
    dict
        The content of ``truth.json``.
    """
    if affected_side not in SIDE_CODE:
        raise ValueError(f"affected_side must be 'left' or 'right', not {affected_side!r}")
    if len({s.day for s in sessions}) != len(sessions):
        raise ValueError("two sessions on one day")
    side = SIDE_CODE[affected_side]
    split = split or SplitLayout()
    src, anat = _source_and_anatomy(region, str(realdata_dir(realdata)), crop_slices)
    base = _case_base(src, anat, side, seed, fluid, t1_fat_gain)
    start = dt.date.fromisoformat(day0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet_rows: list[tuple[str, str, str, str]] = []
    truth_sessions: list[dict[str, Any]] = []
    for ses in sorted(sessions, key=lambda s: s.day):
        entry = _write_hybrid_session(ses, base, src, anat, side, start, out_dir, split)
        sheet_rows += [(subject, entry["study_date"], role, path)
                       for role, path in entry.pop("_sheet")]
        truth_sessions.append(entry)
    with open(out_dir / "sessions.tsv", "w", encoding="utf-8") as fh:
        fh.write("subject\tstudy_date\trole\tpath\n")
        fh.writelines("\t".join(r) + "\n" for r in sheet_rows)
    truth: dict[str, Any] = {
        "case": name, "subject": subject, "day0": day0, "region": region,
        "affected_side": affected_side, "fluid": fluid, "t1_fat_gain": t1_fat_gain,
        "seed": seed, "crop_slices": list(crop_slices) if crop_slices else None,
        "source_files": list(src.files),
        "source_grid": {"shape": list(src.in_phase.shape),
                        "affine": np.round(src.affine, 6).tolist()},
        "affected_soft_tissue_ml": round(base.affected_ml, 3),
        "contralateral_soft_tissue_ml": round(base.contra_ml, 3),
        "sessions": truth_sessions,
        "expected_pattern": expected_pattern(truth_sessions),
        "expected_flags": [] if fluid == "water" else ["fluid_not_fat_suppressed"],
        "exactness": TRUTH_EXACTNESS,
    }
    with open(out_dir / "truth.json", "w", encoding="utf-8") as fh:
        json.dump(truth, fh, indent=1)
    return truth


#: How exact each truth value of a hybrid session is (written into ``truth.json``).
TRUTH_EXACTNESS: Final = {
    "lesion_ml, edema_ml": "exact: changed voxels x voxel volume on the source grid "
    "(physical volume; unchanged by a session's repositioning)",
    "lesion_mask_ml, edema_mask_ml": "the masks on the session's grid (linear "
    "resampling of the 0/1 mask, >= 0.5); equal to the exact values when the session "
    "keeps the source grid",
    "swelling_ml": "voxels of the written swollen T1 at or above "
    "swelling_outline_threshold (half the median tissue signal; holes filled, near "
    "the affected limb) minus the same count on the unswollen T1, x voxel volume: "
    "what a voxel-counting half-maximum segmentation finds; bone does not move",
    "swelling_continuous_ml": "the same outline as a continuous iso-contour (linear "
    f"interpolation, {SWELLING_SUPERSAMPLE}x{SWELLING_SUPERSAMPLE} supersampled in "
    "plane): differs from swelling_ml by the voxel discretisation of the outline, "
    "~1-3 % of the change. An outline delta_r mm further out gives ~2 delta_r / r "
    "more (r: limb radius)",
    "true_asymmetry_change_pp": "100 x swelling_ml / contralateral_soft_tissue_ml "
    "(this module's limb minus bone masks of the source)",
}


@dataclass(frozen=True, eq=False)
class _CaseBase:
    """What every session of a case starts from: the unchanged images on the source grid, their
    muscle levels and noise, the change fields and the true soft-tissue volumes."""

    t1: FloatArray
    fluid: FloatArray
    t1_muscle: FloatArray
    fluid_muscle: FloatArray
    noise: tuple[float, float]
    fields: _Fields
    spacing_mm: Any
    voxel_ml: float
    affected_ml: float
    contra_ml: float


def _case_base(src: Source, anat: Anatomy, side: int, seed: int, fluid: FluidKind,
               t1_fat_gain: float) -> _CaseBase:
    aff = src.affine
    spacing = _spacing_mm(aff)
    vox_ml = voxel_volume_ml(aff)
    fields = _case_fields(src, anat, side, seed)
    t1_base = np.where(src.in_phase > 0, src.water + t1_fat_gain * src.fat, src.in_phase)
    t1_base = np.asarray(t1_base, dtype=np.float32)
    muscle_ok = (anat.tissue == MUSCLE) & (src.in_phase > 0.5 * anat.t1_muscle)
    fluid_raw = _fluid_source(src, fluid)
    scale = FLUID_MUSCLE_LEVEL / float(np.median(fluid_raw[muscle_ok]))
    fluid_base = (fluid_raw * scale).astype(np.float32)
    t1_muscle = _fluid_muscle_level(t1_base, anat.limb, anat.tissue, src.in_phase,
                                    anat.t1_muscle, spacing)
    fluid_muscle = _fluid_muscle_level(fluid_base, anat.limb, anat.tissue, src.in_phase,
                                       anat.t1_muscle, spacing)
    noise = (_noise_sd(t1_base, muscle_ok), _noise_sd(fluid_base, muscle_ok))
    other_side = RIGHT if side == LEFT else LEFT
    contra_ml = float(((anat.limb == other_side) & (anat.tissue <= FAT)).sum()) * vox_ml
    affected_ml = float(((anat.limb == side) & (anat.tissue <= FAT)).sum()) * vox_ml
    return _CaseBase(t1_base, fluid_base, t1_muscle, fluid_muscle, noise, fields, spacing,
                     vox_ml, affected_ml, contra_ml)


def _session_params(ses: HybridSession) -> dict[str, Any]:
    """A session's parameters for the truth; the layout only where it is not bilateral (a
    case made before layouts existed keeps its truth.json)."""
    d = asdict(ses)
    if ses.layout == "bilateral":
        d.pop("layout")
    return d


def _write_hybrid_session(ses: HybridSession, base: _CaseBase, src: Source, anat: Anatomy,
                          side: int, start: dt.date, out_dir: Path,
                          split: SplitLayout) -> dict[str, Any]:
    """Insert session `ses`'s changes, write its images (as its layout says) and truth masks;
    its truth entry (with the sheet rows under ``_sheet``)."""
    aff, vox_ml = src.affine, base.voxel_ml
    ses_name, date = _session_name(start, ses.day)
    state = _State(base.t1.copy(), base.fluid.copy(), anat.limb.copy(), anat.tissue.copy(),
                   base.t1_muscle.copy(), base.fluid_muscle.copy(), base.fields)
    swelling_ml = 0.0
    by_slice = np.zeros(src.in_phase.shape[2])
    if ses.swelling_pct:
        _apply_swelling(state, side, ses.swelling_pct, base.spacing_mm)
        by_slice = state.swelling_ml_by_slice
        swelling_ml = float(by_slice.sum())
    lesion = _insert_lesion(state, side, round(ses.lesion_ml / vox_ml), base.noise)
    edema = _insert_edema(state, side, round(ses.edema_ml / vox_ml), base.noise, exclude=lesion)
    t1_s, aff_s = _to_session(state.t1, aff, ses, label=False)
    fl_s, _ = _to_session(state.fluid, aff, ses, label=False)
    les_s, _ = _to_session(lesion.astype(np.uint8), aff, ses, label=True)
    ede_s, _ = _to_session(edema.astype(np.uint8), aff, ses, label=True)
    written, sheet = _write_layout(ses, split, {"anatomical": t1_s, "fluid": fl_s}, aff_s,
                                   state.limb, side, ses_name, out_dir)
    rel = {**written, "lesion_mask": f"truth/{ses_name}_lesion.nii.gz",
           "edema_mask": f"truth/{ses_name}_edema.nii.gz"}
    write_nifti(out_dir / rel["lesion_mask"], les_s.astype(np.uint8), aff_s)
    write_nifti(out_dir / rel["edema_mask"], ede_s.astype(np.uint8), aff_s)
    ses_vox_ml = voxel_volume_ml(aff_s)
    z_world = aff[2, 2] * np.arange(by_slice.size) + aff[2, 3] + ses.table_shift_mm
    return {
        "session": ses_name, "study_date": date, "day": ses.day,
        "params": _session_params(ses), "_sheet": sheet,
        "lesion_ml": round(float(lesion.sum()) * vox_ml, 6),
        "edema_ml": round(float(edema.sum()) * vox_ml, 6),
        "edema_in_fat_ml": round(float((edema & (state.tissue == FAT)).sum()) * vox_ml, 6),
        "lesion_mask_ml": round(float(les_s.sum()) * ses_vox_ml, 6),
        "edema_mask_ml": round(float(ede_s.sum()) * ses_vox_ml, 6),
        "swelling_ml": round(swelling_ml, 6),
        "swelling_continuous_ml": round(state.swelling_continuous_ml, 6),
        "swelling_pct": round(100.0 * swelling_ml / base.affected_ml, 4),
        "swelling_strength": round(float(state.alpha), 6),
        "swelling_outline_threshold": round(float(state.outline_threshold), 4),
        "swelling_ml_by_slice": [[round(float(z), 3), round(float(v), 6)]
                                 for z, v in zip(z_world, by_slice, strict=True) if v],
        "true_asymmetry_change_pp": round(100.0 * swelling_ml / base.contra_ml, 6),
        "grid": {"shape": list(t1_s.shape), "affine": np.round(aff_s, 6).tolist()},
        **rel,
    }


@dataclass(frozen=True)
class HybridCase:
    """A named case definition of :data:`HYBRID_SUITE` (arguments of :func:`make_case`)."""

    name: str
    region: Region
    sessions: tuple[HybridSession, ...]
    affected_side: str
    description: str
    fluid: FluidKind = "water"
    t1_fat_gain: float = 1.8
    seed: int = 0
    crop_slices: tuple[int, int] | None = None
    split: SplitLayout | None = None
    #: the bilateral case this one images otherwise (same anatomy, changes and seed)
    twin: str = ""

    def write(self, out_dir: Path, realdata: str | Path | None = None) -> dict[str, Any]:
        """Write the case into ``out_dir`` (see :func:`make_case`)."""
        return make_case(self.region, out_dir, self.sessions, self.affected_side,
                         subject=self.name.replace("_", "").replace("-", "")[:24],
                         day0="2024-01-15", seed=self.seed, fluid=self.fluid,
                         t1_fat_gain=self.t1_fat_gain, crop_slices=self.crop_slices,
                         realdata=realdata, name=self.name, split=self.split)


S = HybridSession
#: The hybrid cases; the expected pattern of each is in its truth.json (and its description).
HYBRID_SUITE: Final[tuple[HybridCase, ...]] = (
    HybridCase("thigh_lesion", "thigh", (S(-2, lesion_ml=3.0), S(14, lesion_ml=6.0),
                                         S(45, lesion_ml=2.5)), "left",
               "femoral marrow lesion 3 -> 6 -> 2.5 mL: pseudo-progression", seed=1),
    HybridCase("calf_lesion", "calf", (S(-1, lesion_ml=2.5), S(10, lesion_ml=5.0),
                                       S(40, lesion_ml=2.0)), "right",
               "tibial marrow lesion 2.5 -> 5 -> 2 mL: pseudo-progression", seed=2),
    HybridCase("thigh_edema", "thigh", (S(0), S(12, edema_ml=30.0), S(30, edema_ml=60.0)),
               "right", "edema only, 0 -> 30 -> 60 mL: progression", seed=3),
    HybridCase("thigh_swelling_flare", "thigh",
               (S(-3), S(10, swelling_pct=8.0, edema_ml=60.0), S(35)), "left",
               "swelling 8 % with 60 mL edema, then back to baseline: pseudo-progression",
               seed=4),
    HybridCase("calf_progression", "calf",
               (S(0, lesion_ml=2.0), S(21, lesion_ml=4.0, edema_ml=25.0, swelling_pct=8.0)),
               "left", "lesion 2 -> 4 mL, edema 25 mL, swelling 8 %: progression", seed=5),
    HybridCase("calf_response", "calf",
               (S(-1, lesion_ml=5.0), S(20, lesion_ml=4.5), S(50, lesion_ml=2.5)), "right",
               "lesion 5 -> 4.5 -> 2.5 mL without flare: response", seed=6),
    HybridCase("calf_control_moved", "calf",
               (S(0), S(28, table_shift_mm=15.0, rotation_deg=4.0,
                        grid_spacing_mm=(0.8, 0.8, 4.0))), "left",
               "nothing inserted; follow-up moved 15 mm along z, rotated 4 deg, on a "
               "0.8 x 0.8 x 4 mm grid: stable", seed=7),
    HybridCase("calf_not_fat_suppressed", "calf",
               (S(0, lesion_ml=3.0), S(30, lesion_ml=3.0)), "left",
               "fluid image = in-phase echo (not fat-suppressed), lesion 3 mL: stable, "
               "flag fluid_not_fat_suppressed", fluid="in_phase", seed=8),
)

#: Issue 18: the same changes with the legs imaged otherwise: each leg in its own image (one
#: of them off the source grid), or follow-ups of the affected leg alone. Each names its
#: bilateral `twin` in :data:`HYBRID_SUITE`.
LAYOUT_SUITE: Final[tuple[HybridCase, ...]] = (
    HybridCase("calf_split", "calf", (S(-1, lesion_ml=2.5, layout="split"),
                                      S(10, lesion_ml=5.0, layout="split"),
                                      S(40, lesion_ml=2.0, layout="split")), "right",
               "calf_lesion with each leg in its own images (the right leg's 0.43 x 0.27 "
               "pixels off the source grid, 1.0 mm pixels): pseudo-progression", seed=2,
               split=SplitLayout("right", (0.43, 0.27), 1.0), twin="calf_lesion"),
    HybridCase("thigh_affonly", "thigh",
               (S(-3), S(10, swelling_pct=8.0, edema_ml=60.0, layout="affected_only"),
                S(35, layout="affected_only")), "left",
               "thigh_swelling_flare with follow-ups of the left leg alone (contralateral "
               "from the baseline): pseudo-progression", seed=4, twin="thigh_swelling_flare"),
)
del S


def suite_case(name: str) -> HybridCase:
    """The :data:`HYBRID_SUITE` or :data:`LAYOUT_SUITE` case called `name` (KeyError naming
    the known ones)."""
    for c in (*HYBRID_SUITE, *LAYOUT_SUITE):
        if c.name == name:
            return c
    known = ", ".join(c.name for c in (*HYBRID_SUITE, *LAYOUT_SUITE))
    raise KeyError(f"no hybrid case {name!r}; known: {known}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.validation.hybrid OUT_DIR (--case NAME ... | --all)
    [--realdata DIR]``."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.validation.hybrid",
                                 description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="folder to write the cases into (one sub-folder "
                    "per case)")
    grp = ap.add_mutually_exclusive_group(required=True)
    grp.add_argument("--case", action="append",
                     choices=[c.name for c in (*HYBRID_SUITE, *LAYOUT_SUITE)],
                     help="case to write (repeatable)")
    grp.add_argument("--all", action="store_true", help="write every case of the suite")
    grp.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--realdata", default=None, help="the real 'legs' folder (default: "
                    f"${REALDATA_ENV}, else {DEFAULT_REALDATA})")
    args = ap.parse_args(argv)
    if args.list:
        for c in (*HYBRID_SUITE, *LAYOUT_SUITE):
            print(f"{c.name}\t{c.region}\t{c.description}")
        return 0
    try:
        realdata_dir(args.realdata)
    except RealDataMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cases = (*HYBRID_SUITE, *LAYOUT_SUITE) if args.all else tuple(
        suite_case(n) for n in args.case)
    for c in cases:
        truth = c.write(args.out_dir / c.name, args.realdata)
        print(f"{c.name}: {args.out_dir / c.name}  expected "
              f"{truth['expected_pattern']['pattern']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
