"""Serial bilateral leg MRI phantom (thigh, knee or calf) with exact ground truth, as real DICOM.

The anatomy is defined analytically in DICOM patient coordinates (LPS, millimetres: +x toward
the patient's left, +y posterior, +z superior; z = 0 is the knee joint line). Every voxel of the
acquisition grid is supersampled (in-plane and through the slice thickness); the fraction of
samples falling in each tissue gives partial-volume images and the exact ground-truth volume of
every structure on that grid. Signal = sum of tissue fractions x tissue intensity, times a smooth
bias field, with Rician noise.

Tissues and relative intensities (T1-weighted TSE / STIR), from the musculoskeletal MRI
literature: fat 1.0 / 0.05, muscle 0.33 / 0.30, red marrow 0.60 / 0.35, fatty marrow 0.95 / 0.05,
leukemic lesion 0.28 / 0.65, edematous muscle 0.28 / 0.55, fluid strands in fat 0.15 / 0.90,
cortex ~0 / ~0, fascia, septa and tendon 0.08 / 0.08, skin 0.50 / 0.35, vessels (flow void on
T1 spin echo, slow flow bright on STIR) 0.05 / 0.70, growth-plate cartilage 0.35 / 0.50.

Regions (``PhantomSpec.region``): ``thigh`` (femur; the default), ``knee`` (distal femur with
condyles and trochlea, patella, tibial plateau, fibular head, patellar tendon, popliteal fossa)
and ``calf`` (triangular tibia antero-medially, small thick-walled fibula postero-laterally,
crural septa). ``bone`` in the truth is every bone of the limb (cortex, marrow, growth plates,
lesion). Options add vessels, growth plates, in-plane field-of-view clipping, coil-edge signal
loss, a fluid image without fat suppression and an anatomical image that is not T1-like; with
all of them at their defaults the output is that of the original thigh phantom, byte for byte.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, special

from pipeline import __version__
from pipeline.io.files import mm3_to_ml, write_json_atomic
from pipeline.labels import BONE, EDEMA, LESION, SIDE_OFFSET, SOFT_TISSUE, STRUCTURE_CLASSES

# Tissue codes used by the sampler (not the label map).
(
    AIR,
    SKIN,
    FAT,
    FASCIA,
    MUSCLE,
    CORTEX,
    FATTY_MARROW,
    RED_MARROW,
    TUMOUR,
    EDEMA_MUSCLE,
    EDEMA_FAT,
    VESSEL,
    PHYSIS,
) = range(13)
N_TISSUES = 13

#: Relative signal per tissue code: (T1-weighted, STIR).
TISSUE_SIGNAL: dict[int, tuple[float, float]] = {
    AIR: (0.0, 0.0),
    SKIN: (0.50, 0.35),
    FAT: (1.00, 0.05),
    FASCIA: (0.08, 0.08),
    MUSCLE: (0.33, 0.30),
    CORTEX: (0.02, 0.02),
    FATTY_MARROW: (0.95, 0.05),
    RED_MARROW: (0.60, 0.35),
    TUMOUR: (0.28, 0.65),
    EDEMA_MUSCLE: (0.28, 0.55),
    EDEMA_FAT: (0.15, 0.90),
    VESSEL: (0.05, 0.70),
    PHYSIS: (0.35, 0.50),
}

#: Tissues holding fat: on a fluid-sensitive image without fat suppression (T2 TSE) they keep
#: their T1-weighted brightness.
FAT_TISSUES: frozenset[int] = frozenset({FAT, FATTY_MARROW, RED_MARROW, SKIN})

#: Label-map tissue class (labels.py) of each tissue code; AIR is background.
TISSUE_CLASS: dict[int, int] = {
    SKIN: SOFT_TISSUE,
    FAT: SOFT_TISSUE,
    FASCIA: SOFT_TISSUE,
    MUSCLE: SOFT_TISSUE,
    CORTEX: BONE,
    FATTY_MARROW: BONE,
    RED_MARROW: BONE,
    TUMOUR: LESION,
    EDEMA_MUSCLE: EDEMA,
    EDEMA_FAT: EDEMA,
    VESSEL: SOFT_TISSUE,
    PHYSIS: BONE,
}

#: Tissues a vessel may run through (never bone).
_SOFT_CODES: tuple[int, ...] = (FAT, FASCIA, MUSCLE, EDEMA_MUSCLE, EDEMA_FAT)

REGIONS: tuple[str, ...] = ("thigh", "knee", "calf")

#: Nominal radius of a leg per region, as a fraction of `leg_radius_mm` (the thigh's at the
#: centre of the field of view); a leg's axis lies this radius + half the gap from the midline.
REGION_LEG_RADIUS: dict[str, float] = {"thigh": 1.0, "knee": 0.80, "calf": 0.70}

#: Centre of the default field of view per region, mm above the knee joint line (z = 0).
REGION_Z_CENTRE: dict[str, float] = {"thigh": 200.0, "knee": 10.0, "calf": -170.0}

#: Image orientation (row cosine, column cosine) per patient position, axial acquisitions.
POSITION_IOP: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "HFS": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "FFS": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "HFP": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "FFP": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
}

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class SessionSpec:
    """State of the affected limb at one visit.

    Attributes
    ----------
    day : int
        Days since day 0 (infusion).
    swelling : float
        Fractional increase of the affected limb's soft-tissue cross-sectional area (0.1 = +10 %).
    lesion_ml : float
        Target marrow-lesion volume in mL (the exact volume is measured on the grid, see truth).
    edema : float
        Edema extent, 0 (none) to 1 (extensive): fraction of muscle / fat becoming edematous at
        the centre of the edema envelope.
    table_shift_mm : float
        Shift of the patient along z relative to the scanner for this visit (repositioning):
        the DICOM coordinates of the anatomy move by this much, as on a real scanner, and the
        imaged part of the thigh moves the other way.
    n_slices : int
        Slices of this visit (0: the phantom's default), a different field of view.
    fov_clip_mm : float
        In-plane field of view narrowed (fewer columns) so that the image edge cuts this many mm
        off the lateral side of the limb(s) named by `fov_clip_side` (0: not clipped).
    fov_clip_side : str
        ``affected``, ``contralateral``, ``left``, ``right`` or ``both``.
    signal_void_slices : int
        Number of end slices with coil-edge signal loss (signal x 0.05-0.2, ghosting, noise).
    signal_void_end : str
        Which end has them: ``inferior`` (lowest z), ``superior`` or ``both``.
    affected_only : bool
        Only the affected limb is in the field of view at this visit (a follow-up of the
        affected leg alone); the other limb is left out of the image, not cut by its edge.
    split_series : bool
        Each leg in its own pair of series (T1 and STIR) of the study, each field of view
        centred on its leg (a dedicated extremity coil, one leg at a time; the
        ``PhantomSpec.split_*`` options shape the right leg's series). With `affected_only`,
        only the affected leg's series are written.
    """

    day: int
    swelling: float = 0.0
    lesion_ml: float = 0.0
    edema: float = 0.0
    table_shift_mm: float = 0.0
    n_slices: int = 0
    fov_clip_mm: float = 0.0
    fov_clip_side: str = "affected"
    signal_void_slices: int = 0
    signal_void_end: str = "both"
    affected_only: bool = False
    split_series: bool = False

    def __post_init__(self) -> None:
        if self.fov_clip_side not in ("affected", "contralateral", "left", "right", "both"):
            raise ValueError(f"unknown fov_clip_side {self.fov_clip_side!r}")
        if self.signal_void_end not in ("inferior", "superior", "both"):
            raise ValueError(f"unknown signal_void_end {self.signal_void_end!r}")
        if self.fov_clip_mm < 0 or self.signal_void_slices < 0:
            raise ValueError("fov_clip_mm and signal_void_slices must be >= 0")
        if self.split_series and (self.fov_clip_mm > 0 or self.signal_void_slices > 0):
            raise ValueError("split_series does not combine with fov_clip_mm or "
                             "signal_void_slices (each leg has its own field of view)")


#: Session options added after the first release, with the values that leave a phantom as it was.
_NEW_SESSION_DEFAULTS: dict[str, Any] = {
    "fov_clip_mm": 0.0, "fov_clip_side": "affected", "signal_void_slices": 0,
    "signal_void_end": "both", "affected_only": False, "split_series": False,
}


DEFAULT_SESSIONS: tuple[SessionSpec, ...] = (
    SessionSpec(day=-5, swelling=0.08, lesion_ml=6.0, edema=0.35),
    SessionSpec(day=3, swelling=0.16, lesion_ml=7.0, edema=0.70),
    SessionSpec(day=6, swelling=0.24, lesion_ml=7.5, edema=0.90),
    SessionSpec(day=14, swelling=0.0, lesion_ml=3.0, edema=0.08),
    SessionSpec(day=30, swelling=0.0, lesion_ml=0.0, edema=0.0),
)


@dataclass(frozen=True)
class PhantomSpec:
    """Patient, anatomy and acquisition of a phantom series of studies. Lengths in mm.

    Anatomy options beyond the original thigh phantom: `region` (``thigh``, ``knee``,
    ``calf``), `vessels` (None: on for knee and calf, off for the thigh), `growth_plates`
    (2 mm physes of femur and tibia near the knee, with red marrow in the metaphyses: a child),
    `stir_fat_suppressed` (False: fat bright on the fluid image, a T2 without fat saturation)
    and `t1_like` (False: the anatomical series has STIR-like contrast). `leg_radius_mm` and
    `bone_radius_mm` are the thigh's and the femoral shaft's; knee and calf scale from them.

    Sessions with ``split_series`` image each leg in its own series (extremity-coil layout):
    a square field of view `split_fov_factor` x the leg's nominal diameter, centred on the
    leg. The right leg's series may differ from the left's as two separate acquisitions do:
    `split_right_pixel_mm` (0: the same pixel size), `split_right_offset_mm` (its field of
    view's centre moved in x and y, LPS mm; a fraction of a pixel puts its grid off the left
    one's), `split_right_extra_slices` (more, or with a minus sign fewer, slices about the
    same centre; even, so that the slices of the two series line up) and `split_right_gain`
    (another receive coil: stored values x gain, signal and noise alike). The Laterality tag
    (0020,0060) and the description (``... LT`` / ``... RT``) name each series' leg;
    `split_wrong_laterality` (``SIDE`` or ``SIDE:KIND``, KIND ``T1w`` or ``STIR``) gives that
    leg's series (or only its KIND series) the other side's tag and description.
    """

    subject: str = "demo"
    seed: int = 7
    day0: str = "2024-03-01"
    affected_side: str = "left"
    sides: tuple[str, ...] = ("right", "left")
    sessions: tuple[SessionSpec, ...] = DEFAULT_SESSIONS
    # anatomy
    leg_radius_mm: float = 52.0
    gap_mm: float = 14.0
    subcutaneous_fat_fraction: float = 0.17
    bone_radius_mm: float = 9.5
    cortex_mm: float = 2.6
    lesion_z_fraction: float = 0.45
    # acquisition
    pixel_mm: float = 1.6
    slice_mm: float = 5.0
    n_slices: int = 32
    matrix: tuple[int, int] = (160, 120)  # columns (x), rows (y)
    position: str = "HFS"
    slice_order: str = "ascending"
    snr_t1: float = 25.0
    snr_stir: float = 10.0
    bias: float = 0.2
    supersample_xy: int = 3
    supersample_z: int = 5
    # anatomy and contrast options (defaults: the original thigh phantom)
    region: str = "thigh"
    vessels: bool | None = None
    growth_plates: bool = False
    stir_fat_suppressed: bool = True
    t1_like: bool = True
    # one series per leg (sessions with split_series)
    split_fov_factor: float = 1.6
    split_right_pixel_mm: float = 0.0
    split_right_offset_mm: tuple[float, float] = (0.0, 0.0)
    split_right_extra_slices: int = 0
    split_right_gain: float = 1.0
    split_wrong_laterality: str = ""

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, not {self.region!r}")
        if self.vessels is None:
            object.__setattr__(self, "vessels", self.region != "thigh")
        if self.position not in POSITION_IOP:
            raise ValueError(f"position must be one of {sorted(POSITION_IOP)}, not {self.position}")
        if self.slice_order not in ("ascending", "descending", "interleaved"):
            raise ValueError(f"unknown slice order {self.slice_order!r}")
        if not set(self.sides) <= {"left", "right"} or not self.sides:
            raise ValueError(f"sides must be left and/or right, not {self.sides}")
        if self.affected_side not in self.sides:
            raise ValueError(f"affected side {self.affected_side} is not among sides {self.sides}")
        self._check_split()

    def _check_split(self) -> None:
        if self.split_right_extra_slices % 2:
            raise ValueError(f"split_right_extra_slices {self.split_right_extra_slices}: must be "
                             "even (the two series' slices line up about one centre)")
        if self.split_fov_factor < 1.0 or self.split_right_gain <= 0:
            raise ValueError("split_fov_factor must be >= 1 and split_right_gain > 0")
        wrong = self.split_wrong_laterality.split(":")
        if self.split_wrong_laterality and (
                wrong[0] not in ("left", "right") or len(wrong) > 2
                or (len(wrong) == 2 and wrong[1] not in SEQUENCES)):
            raise ValueError(f"split_wrong_laterality {self.split_wrong_laterality!r}: want "
                             "SIDE or SIDE:KIND (left/right, T1w/STIR)")


#: Phantom options added after the first release, with the values that leave it as it was.
_NEW_SPEC_DEFAULTS: dict[str, Any] = {
    "region": "thigh", "vessels": False, "growth_plates": False, "stir_fat_suppressed": True,
    "t1_like": True,
}
#: Options of the split layout: in truth.json only when some session uses it.
_SPLIT_SPEC_KEYS: tuple[str, ...] = (
    "split_fov_factor", "split_right_pixel_mm", "split_right_offset_mm",
    "split_right_extra_slices", "split_right_gain", "split_wrong_laterality")


def is_legacy(spec: PhantomSpec) -> bool:
    """True when no option added after the first release is used (the original thigh phantom).

    Such a phantom's files and ``truth.json`` are byte-identical to the original generator's.
    """
    if any(getattr(spec, k) != v for k, v in _NEW_SPEC_DEFAULTS.items()):
        return False
    return all(
        getattr(s, k) == v for s in spec.sessions for k, v in _NEW_SESSION_DEFAULTS.items()
    )


@dataclass
class Grid:
    """Acquisition grid in LPS patient coordinates (voxel centres)."""

    origin: NDArray[np.float64]  # position of voxel (0, 0, 0)
    row_dir: NDArray[np.float64]  # direction of increasing column index (x index)
    col_dir: NDArray[np.float64]  # direction of increasing row index (y index)
    normal: NDArray[np.float64]
    pixel_mm: float
    slice_mm: float
    shape_zyx: tuple[int, int, int]

    def slice_origin(self, k: int) -> NDArray[np.float64]:
        return self.origin + k * self.slice_mm * self.normal


@dataclass
class _Fields:
    """Per-patient random textures on a fixed patient-coordinate lattice."""

    lo: NDArray[np.float64]
    step: NDArray[np.float64]
    feathery: NDArray[np.float32]
    reticular: NDArray[np.float32]
    leg_phase: dict[str, NDArray[np.float64]] = field(default_factory=dict)

    def sample(self, which: str, pts: NDArray[np.float64]) -> NDArray[np.float64]:
        arr = self.feathery if which == "feathery" else self.reticular
        idx = ((pts - self.lo) / self.step).T[::-1]  # (z, y, x) order for the array
        return ndimage.map_coordinates(arr, idx, order=1, mode="nearest")


def _standard_field(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]
) -> NDArray[np.float32]:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="wrap")
    return ((f - f.mean()) / f.std()).astype(np.float32)


def make_grid(spec: PhantomSpec, table_shift_mm: float = 0.0, n_slices: int = 0) -> Grid:
    """Acquisition grid (in anatomy coordinates) centred on the thighs, slices stacked along
    +z from the knee upward."""
    row, col = (np.asarray(v, dtype=float) for v in POSITION_IOP[spec.position])
    normal = np.cross(row, col)
    nx, ny = spec.matrix
    nz = n_slices or spec.n_slices
    centre = np.array([0.0, 0.0, _z_centre(spec) - table_shift_mm])
    origin = (
        centre
        - row * spec.pixel_mm * (nx - 1) / 2
        - col * spec.pixel_mm * (ny - 1) / 2
        - normal * spec.slice_mm * (nz - 1) / 2
    )
    return Grid(origin, row, col, normal, spec.pixel_mm, spec.slice_mm, (nz, ny, nx))


def _z_centre(spec: PhantomSpec) -> float:
    """Centre of the field of view, mm above the knee joint line (thigh: distal and mid)."""
    return REGION_Z_CENTRE[spec.region]


def _fields(spec: PhantomSpec) -> _Fields:
    rng = np.random.default_rng(spec.seed)
    half_x = 2 * spec.leg_radius_mm * 1.6 + spec.gap_mm + 20
    half_y = spec.leg_radius_mm * 1.6 + 10
    z_half = spec.n_slices * spec.slice_mm / 2 + 40
    lo = np.array([-half_x, -half_y, _z_centre(spec) - z_half])
    step = np.array([1.0, 1.0, 3.0])
    shape = tuple(
        int(np.ceil(2 * h / s)) + 2 for h, s in zip((half_x, half_y, z_half), step, strict=False)
    )
    shape_zyx = shape[::-1]
    feathery = _standard_field(rng, shape_zyx, (6.0, 1.6, 1.6))  # elongated along the fibres
    reticular = _standard_field(rng, shape_zyx, (2.0, 3.0, 3.0))
    leg_phase = {s: rng.uniform(0, 2 * np.pi, 3) for s in ("left", "right")}
    return _Fields(lo, step, feathery, reticular, leg_phase)


def _lesion_axes(spec: PhantomSpec, lesion_ml: float, cavity_mm: float | None = None
                 ) -> tuple[float, float]:
    """In-plane and cranio-caudal semi-axes (mm) of a lesion ellipsoid of about `lesion_ml`.

    `cavity_mm` is the radius of the marrow cavity holding it (default: the femoral shaft's).
    """
    if cavity_mm is None:
        a = 0.95 * (spec.bone_radius_mm - spec.cortex_mm)
    else:
        a = 0.95 * cavity_mm
    c = lesion_ml * 1000.0 / (4.0 / 3.0 * np.pi * a * a)
    return a, max(c, a * 0.6)


Claim = tuple[NDArray[np.int8], NDArray[np.float64], NDArray[np.float64]]


def _tissue_at(
    pts: NDArray[np.float64], spec: PhantomSpec, sess: SessionSpec, fields: _Fields
) -> tuple[NDArray[np.int8], NDArray[np.int8]]:
    """Tissue code and side (0 none, 1 right, 2 left) at points `pts` (N, 3) in LPS mm."""
    n = pts.shape[0]
    build = {"thigh": _thigh_claim, "knee": _knee_claim, "calf": _calf_claim}[spec.region]
    claims: dict[str, Claim] = {}
    for side in session_sides(spec, sess):
        claim = build(pts, spec, sess, fields, side)
        if claim is not None:
            claims[side] = claim
    return _resolve_contact(claims, n)


def session_sides(spec: PhantomSpec, sess: SessionSpec) -> tuple[str, ...]:
    """The limbs in the field of view of `sess`: the phantom's, or the affected one alone."""
    return (spec.affected_side,) if sess.affected_only else spec.sides


def _claim(n: int, idx: NDArray[np.intp], t: NDArray[np.int8], rr: NDArray[np.float64],
           r_skin: NDArray[np.float64]) -> Claim:
    """One leg's claim on all `n` points: tissue, depth (1 on the skin) and skin radius."""
    t_full = np.zeros(n, dtype=np.int8)
    t_full[idx] = t
    depth = np.full(n, np.inf)
    depth[idx] = rr / r_skin  # 1 on this leg's skin surface
    radius = np.zeros(n)
    radius[idx] = r_skin
    return t_full, depth, radius


def _apply_edema(t: NDArray[np.int8], pts_n: NDArray[np.float64], zz: NDArray[np.float64],
                 theta: NDArray[np.float64], zles: float, span: float, sess: SessionSpec,
                 fields: _Fields) -> None:
    """Edema of the affected leg, in place: feathery in muscle, reticular in subcutaneous fat.

    The envelope is centred on the lesion level `zles` (mm) with a sd of 0.35 x `span` (mm).
    """
    env = sess.edema * np.exp(-0.5 * ((zz - zles) / (0.35 * span)) ** 2)
    env = np.clip(env * (0.6 + 0.4 * np.cos(theta - 0.5)), 1e-6, 0.999)
    m = t == MUSCLE
    if m.any():
        thr = special.ndtri(1 - env[m])
        t_m = t[m]
        t_m[fields.sample("feathery", pts_n[m]) > thr] = EDEMA_MUSCLE
        t[m] = t_m
    f = t == FAT
    if f.any():
        t_f = t[f]
        t_f[np.abs(fields.sample("reticular", pts_n[f])) < 0.35 * env[f]] = EDEMA_FAT
        t[f] = t_f


def _apply_lesion(t: NDArray[np.int8], cav: NDArray[np.bool_], bu: NDArray[np.float64],
                  bv: NDArray[np.float64], zz: NDArray[np.float64], zles: float,
                  axes: tuple[float, float], phase: float) -> None:
    """Lobulated ellipsoidal marrow lesion (semi-axes `axes`, mm) in the cavity `cav`, in place.

    `bu`, `bv` are in-plane offsets (mm) from the bone's axis, `zles` the lesion centre (mm).
    """
    a, c = axes
    btheta = np.arctan2(bv, bu)
    lob = 1 + 0.12 * np.cos(3 * btheta + phase) * np.cos((zz - zles) / 9.0)
    q = (bu / a) ** 2 + (bv / a) ** 2 + ((zz - zles) / c) ** 2
    t[cav & (q < lob**2)] = TUMOUR


def _apply_vessels(t: NDArray[np.int8], u: NDArray[np.float64], v: NDArray[np.float64],
                   tubes: Sequence[tuple[Any, Any, float]]) -> None:
    """Vessels running along z, in place: tubes (centre u, centre v, radius; mm) in soft tissue.

    They replace muscle, fat, septa and edema (a vessel is soft tissue, never edema or bone).
    """
    soft = np.isin(t, _SOFT_CODES)
    for cu, cv, radius in tubes:
        t[soft & (np.hypot(u - cu, v - cv) < radius)] = VESSEL


def _thigh_claim(pts: NDArray[np.float64], spec: PhantomSpec, sess: SessionSpec,
                 fields: _Fields, side: str) -> Claim | None:
    """One thigh: skin, fat, fascia, muscle with septa, femur, edema, lesion, vessels."""
    n = pts.shape[0]
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    zc = _z_centre(spec)
    span = spec.n_slices * spec.slice_mm
    zrel = (z - zc) / span  # about -0.5 (distal) .. 0.5 (proximal)
    r0 = spec.leg_radius_mm * (1.0 + 0.28 * zrel)  # the thigh tapers toward the knee
    sgn = 1.0 if side == "left" else -1.0
    affected = side == spec.affected_side
    cx = sgn * (r0 + spec.gap_mm / 2) - sgn * 0.06 * (z - zc)  # thighs converge distally
    cy = 2.0 + 0.0 * z
    scale = np.sqrt(1 + sess.swelling) if affected else 1.0
    # Work in a mirrored frame so that +u points laterally for both legs.
    u, v = sgn * (x - cx), y - cy
    box = np.nonzero((np.abs(u) < 1.25 * r0 * scale) & (np.abs(v) < 1.25 * r0 * scale))[0]
    if box.size == 0:
        return None
    u, v = u[box], v[box]
    theta = np.arctan2(v, u)
    rr = np.hypot(u, v)
    ph = fields.leg_phase[side]
    shape = (
        1
        + 0.07 * np.cos(2 * theta + 0.3)
        + 0.025 * np.cos(3 * theta + ph[0])
        + 0.015 * (np.cos(5 * theta + ph[1]))
    )
    r_skin = r0[box] * shape * scale
    near = rr < r_skin + 2
    if not near.any():
        return None
    idx = box[near]
    u, v, rr, theta, r_skin_n = u[near], v[near], rr[near], theta[near], r_skin[near]
    zz, zr = z[idx], zrel[idx]
    r0n = r0[idx]
    t = np.full(idx.size, AIR, dtype=np.int8)
    inside = rr < r_skin_n
    t[inside] = SKIN
    fat_t = (
        spec.subcutaneous_fat_fraction * r0n * (1 + 0.35 * np.cos(theta - 1.2 + ph[2] * 0.2))
    )
    r_fascia = r_skin_n - 1.2 - fat_t * (scale if affected else 1.0) ** 0.5
    t[rr < r_skin_n - 1.2] = FAT
    # Deep fascia: a thin dark layer between fat and muscle.
    t[rr < r_fascia] = FASCIA
    in_muscle = rr < r_fascia - 0.7
    t[in_muscle] = MUSCLE
    # Femur: slightly lateral and posterior of the thigh's centre.
    bx, by = 0.12 * r0n, 0.08 * r0n
    bu, bv = u - bx, v - by
    br = np.hypot(bu, bv)
    meta = 1.0 / (1.0 + np.exp((zz - (zc - 0.35 * span)) / 8.0))  # 1 in the distal metaphysis
    r_bone = spec.bone_radius_mm * (1 + 0.55 * meta)
    r_cavity = r_bone - spec.cortex_mm * (1 - 0.3 * meta)
    # Intermuscular septa: thin rays from the femur to the fascia.
    btheta = np.arctan2(bv, bu)
    mi = np.nonzero(in_muscle & (br > r_bone))[0]
    for ang in (0.0, 2.1, -2.3):
        d_perp = np.abs(br[mi] * np.sin(btheta[mi] - ang))
        on_ray = (np.cos(btheta[mi] - ang) > 0) & (d_perp < 0.45)
        t[mi[on_ray]] = FASCIA
    zles = zc + (spec.lesion_z_fraction - 0.5) * span
    if affected and sess.edema > 0:
        _apply_edema(t, pts[idx], zz, theta, zles, span, sess, fields)
    if spec.vessels:
        _apply_vessels(t, bu, bv, _femoral_vessels(spec, r_bone, zr))
    in_bone = br < r_bone
    t[in_bone] = CORTEX
    cav = br < r_cavity
    red = (zz < zc - 0.3 * span + 6 * np.cos(btheta)) | (zr < -0.5)
    t[cav] = np.where(red[cav], RED_MARROW, FATTY_MARROW)
    if affected and sess.lesion_ml > 0:
        _apply_lesion(t, cav, bu, bv, zz, zles, _lesion_axes(spec, sess.lesion_ml), ph[0])
    return _claim(n, idx, t, rr, r_skin_n)


def _femoral_vessels(spec: PhantomSpec, r_bone: NDArray[np.float64], zrel: NDArray[np.float64]
                     ) -> list[tuple[Any, Any, float]]:
    """Superficial femoral artery and vein around the femur (offsets from its axis, mm).

    Antero-medial proximally (adductor canal), posterior distally (toward the popliteal fossa).
    """
    b = spec.bone_radius_mm
    alpha = np.clip(0.5 - zrel, 0.0, 1.0)  # 0 proximal .. 1 distal end of the field of view
    phi = np.pi + 0.84 - 2.08 * alpha  # mirrored frame: 0 lateral, pi/2 posterior, pi medial
    d = r_bone + 0.9 * b
    tubes: list[tuple[Any, Any, float]] = [(d * np.cos(phi), d * np.sin(phi), 0.30 * b)]
    d_v, phi_v = d + 0.1 * b, phi - 0.45
    tubes.append((d_v * np.cos(phi_v), d_v * np.sin(phi_v), 0.38 * b))
    return tubes


# -------------------------------------------------------------------------------------------
# Knee and calf: a generic leg envelope, and bones as star-shaped sections along z
# -------------------------------------------------------------------------------------------


@dataclass
class _Leg:
    """The points near one leg, in its mirrored frame (+u lateral, +v posterior), in mm."""

    idx: NDArray[np.intp]
    u: NDArray[np.float64]
    v: NDArray[np.float64]
    z: NDArray[np.float64]
    theta: NDArray[np.float64]
    rr: NDArray[np.float64]
    r_skin: NDArray[np.float64]
    t: NDArray[np.int8]
    in_muscle: NDArray[np.bool_]
    affected: bool
    phase: NDArray[np.float64]


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def _envelope(pts: NDArray[np.float64], spec: PhantomSpec, sess: SessionSpec, fields: _Fields,
              side: str, r0: NDArray[np.float64], cx: float,
              harmonics: Sequence[tuple[float, int, float]]) -> _Leg | None:
    """Skin, subcutaneous fat, deep fascia and muscle of one leg of radius `r0` (mm, per point).

    The outline is ``r0 * (1 + sum(amp * cos(k * theta + phase)))`` over `harmonics` plus the
    patient's own 3rd and 5th harmonics; `cx` is the distance of the leg's axis from x = 0.
    """
    x, y = pts[:, 0], pts[:, 1]
    sgn = 1.0 if side == "left" else -1.0
    affected = side == spec.affected_side
    scale = np.sqrt(1 + sess.swelling) if affected else 1.0
    u, v = sgn * (x - sgn * cx), y - 2.0
    box = np.nonzero((np.abs(u) < 1.3 * r0 * scale) & (np.abs(v) < 1.3 * r0 * scale))[0]
    if box.size == 0:
        return None
    u, v = u[box], v[box]
    theta = np.arctan2(v, u)
    rr = np.hypot(u, v)
    ph = fields.leg_phase[side]
    shape = 1 + 0.02 * np.cos(3 * theta + ph[0]) + 0.012 * np.cos(5 * theta + ph[1])
    for amp, k, phase in harmonics:
        shape = shape + amp * np.cos(k * theta + phase)
    r_skin = r0[box] * shape * scale
    near = rr < r_skin + 2
    if not near.any():
        return None
    idx = box[near]
    u, v, rr, theta, r_skin = u[near], v[near], rr[near], theta[near], r_skin[near]
    t = np.full(idx.size, AIR, dtype=np.int8)
    t[rr < r_skin] = SKIN
    fat_t = spec.subcutaneous_fat_fraction * r0[idx] * (1 + 0.35 * np.cos(theta - 1.2 + ph[2]))
    r_fascia = r_skin - 1.2 - fat_t * (scale if affected else 1.0) ** 0.5
    t[rr < r_skin - 1.2] = FAT
    t[rr < r_fascia] = FASCIA
    in_muscle = rr < r_fascia - 0.7
    t[in_muscle] = MUSCLE
    return _Leg(idx, u, v, pts[idx, 2], theta, rr, r_skin, t, in_muscle, affected, ph)


@dataclass
class _Bone:
    """A bone on the leg's points: its outer section, marrow cavity and axis (mm)."""

    outer: NDArray[np.bool_]
    cavity: NDArray[np.bool_]
    bu: NDArray[np.float64]  # offset from the bone's axis, lateral
    bv: NDArray[np.float64]  # offset from the bone's axis, posterior


def _section(du: NDArray[np.float64], dv: NDArray[np.float64], z: NDArray[np.float64], *,
             au: Any, av: Any, cortex: Any, tri: Any = 0.0, tri_phase: float = 0.0,
             cap: tuple[float, float, int] | None = None
             ) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Outer and cavity masks of a bone part with an elliptical (or rounded-triangular) section.

    Parameters
    ----------
    du, dv : offsets (mm) of the points from the part's axis; z : their height (mm).
    au, av : semi-axes (mm) of the section; `tri` the amplitude of its 3-fold rounding
        (``tri_phase``: direction of one corner, rad).
    cortex : cortical thickness (mm), radial.
    cap : (z_centre, half_height, direction) rounds the part off as an ellipsoid beyond
        z_centre: direction -1 below it, +1 above it, 0 both (a closed ellipsoid).
    """
    rho = np.hypot(du, dv)
    phi = np.arctan2(dv, du)
    r_out = 1.0 / np.sqrt((np.cos(phi) / au) ** 2 + (np.sin(phi) / av) ** 2)
    r_out = r_out * (1 + tri * np.cos(3 * (phi - tri_phase)))
    k_out: Any = 1.0
    k_in: Any = 1.0
    if cap is not None:
        zc, hz, direction = cap
        dz = np.abs(z - zc) if direction == 0 else np.maximum(direction * (z - zc), 0.0)
        k_out = np.sqrt(np.clip(1 - (dz / hz) ** 2, 0.0, None))
        k_in = np.sqrt(np.clip(1 - (dz / np.maximum(hz - cortex, 1e-3)) ** 2, 0.0, None))
    return rho < r_out * k_out, rho < (r_out - cortex) * k_in


def _place_bones(leg: _Leg, bones: Sequence[_Bone], marrow: Sequence[NDArray[np.int8]]) -> None:
    """Cortex where any bone's outer section is, then each bone's marrow in its cavity."""
    for bone in bones:
        leg.t[bone.outer] = CORTEX
    for bone, m in zip(bones, marrow, strict=True):
        leg.t[bone.cavity] = m[bone.cavity]


def _segment_distance(u: NDArray[np.float64], v: NDArray[np.float64], p: tuple[float, float],
                      q: tuple[float, float]) -> NDArray[np.float64]:
    """Distance (mm) of points (u, v) from the segment p-q."""
    du, dv = q[0] - p[0], q[1] - p[1]
    s = np.clip(((u - p[0]) * du + (v - p[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - p[0] - s * du, v - p[1] - s * dv)


def _ray_distance(u: NDArray[np.float64], v: NDArray[np.float64], p: tuple[float, float],
                  angle: float) -> NDArray[np.float64]:
    """Distance (mm) of points from the ray from p in direction `angle` (inf behind p)."""
    du, dv = u - p[0], v - p[1]
    along = du * np.cos(angle) + dv * np.sin(angle)
    perp = np.abs(-du * np.sin(angle) + dv * np.cos(angle))
    return np.where(along > 0, perp, np.inf)


def _lesion_level(spec: PhantomSpec, z_lo: float = -np.inf) -> float:
    """Lesion centre (mm): `lesion_z_fraction` of the covered length above max(bottom, z_lo)."""
    span = spec.n_slices * spec.slice_mm
    bottom = max(_z_centre(spec) - span / 2, z_lo)
    return bottom + spec.lesion_z_fraction * (_z_centre(spec) + span / 2 - bottom)


def _knee_claim(pts: NDArray[np.float64], spec: PhantomSpec, sess: SessionSpec,
                fields: _Fields, side: str) -> Claim | None:
    """One knee: femoral condyles and trochlea, patella and its tendon, tibial plateau,
    fibular head, popliteal fossa fat and vessels, optional growth plates."""
    b, lr = spec.bone_radius_mm, spec.leg_radius_mm
    z = pts[:, 2]
    r0 = lr * (0.80 + 0.08 * np.clip(z / 120.0, -1.0, 1.0))
    leg = _envelope(pts, spec, sess, fields, side, r0,
                    REGION_LEG_RADIUS["knee"] * lr + spec.gap_mm / 2,
                    [(0.05, 2, 0.3), (0.03, 1, -np.pi / 2)])
    if leg is None:
        return None
    u, v, zz, t = leg.u, leg.v, leg.z, leg.t
    au, av = u, v + 0.06 * lr  # offsets from the knee's axis, slightly anterior of centre
    soft = leg.in_muscle
    # popliteal fossa fat, infrapatellar (Hoffa) fat pad, patellar tendon
    fossa = ((au / (1.3 * b)) ** 2 + ((av - 2.8 * b) / (1.0 * b)) ** 2 < 1) & (
        np.abs(zz - 0.5 * b) < 4.0 * b)
    t[soft & fossa] = FAT
    hoffa = (((au / (1.3 * b)) ** 2 + ((av + 2.0 * b) / (0.6 * b)) ** 2 < 1)
             & (zz > -1.8 * b) & (zz < 1.0 * b))
    t[soft & hoffa] = FAT
    tendon = (np.abs(au) < 0.8 * b) & (np.abs(av + 2.75 * b) < 0.2 * b) & (zz > -2.6 * b) & (
        zz < 1.1 * b)
    t[soft & tendon] = FASCIA
    zles = _lesion_level(spec, z_lo=0.3 * b)
    if leg.affected and sess.edema > 0:
        span = spec.n_slices * spec.slice_mm
        _apply_edema(t, pts[leg.idx], zz, leg.theta, zles, span, sess, fields)
    if spec.vessels:  # popliteal artery deep, on the capsule; the vein behind it
        _apply_vessels(t, au, av, [(-0.1 * b, 2.45 * b, 0.28 * b),
                                   (0.25 * b, 3.05 * b, 0.34 * b)])
    femur = _knee_femur(au, av, zz, spec)
    tibia = _knee_tibia(au, av, zz, spec)
    fu, fv = au - 2.3 * b, av - 1.5 * b
    h = _sigmoid((zz + 3.0 * b) / (0.35 * b))  # 1 in the fibular head
    r_fib = b * (0.47 + 0.3 * h)
    fib = _Bone(*_section(fu, fv, zz, au=r_fib, av=r_fib, cortex=0.28 * b * (1 - 0.7 * h),
                          cap=(-2.0 * b, 0.6 * b, 1)), fu, fv)
    pu, pv = au, av + 2.65 * b
    patella = _Bone(*_section(pu, pv, zz, au=1.55 * b, av=0.65 * b, cortex=0.5 * spec.cortex_mm,
                              cap=(2.3 * b, 1.45 * b, 0)), pu, pv)
    fatty = np.full(zz.size, FATTY_MARROW, dtype=np.int8)
    # physes: discs ~2 mm thick, gently domed away from the joint (rings on axial slices)
    z_pf = 1.5 * b + 0.3 * b * np.exp(-((np.hypot(femur.bu, femur.bv) / (1.2 * b)) ** 2))
    z_pt = -1.3 * b - 0.25 * b * np.exp(-((np.hypot(tibia.bu, tibia.bv) / (1.2 * b)) ** 2))
    if spec.growth_plates:  # a child: red marrow in the metaphyses, fatty epiphyses
        m_fem = np.where((zz > z_pf) & (zz < z_pf + 3.0 * b), RED_MARROW, FATTY_MARROW)
        m_tib = np.where((zz < z_pt) & (zz > z_pt - 3.0 * b), RED_MARROW, FATTY_MARROW)
    else:
        m_fem = m_tib = fatty
    _place_bones(leg, [femur, tibia, fib, patella],
                 [m_fem.astype(np.int8), m_tib.astype(np.int8), fatty, fatty])
    if spec.growth_plates:
        t[femur.outer & (np.abs(zz - z_pf) < 1.0)] = PHYSIS
        t[tibia.outer & (np.abs(zz - z_pt) < 1.0)] = PHYSIS
    if leg.affected and sess.lesion_ml > 0:
        _apply_lesion(t, femur.cavity, femur.bu, femur.bv, zz, zles,
                      _lesion_axes(spec, sess.lesion_ml), leg.phase[0])
    return _claim(pts.shape[0], leg.idx, t, leg.rr, leg.r_skin)


def _knee_femur(au: NDArray[np.float64], av: NDArray[np.float64], zz: NDArray[np.float64],
                spec: PhantomSpec) -> _Bone:
    """Distal femur: shaft flaring into the metaphysis, two condyles and the trochlea."""
    b = spec.bone_radius_mm
    s = _sigmoid((3.0 * b - zz) / (0.5 * b))  # 1 toward the condyles
    g = _sigmoid((3.4 * b - zz) / (0.35 * b))  # condyles and trochlea fade out upward
    cortex = spec.cortex_mm * (1 - 0.65 * s)
    parts = [_section(au, av - 0.1 * b, zz, au=b * (1 + 1.1 * s), av=b * (1 + 0.6 * s),
                      cortex=cortex, cap=(1.8 * b, 1.5 * b, -1))]
    for side_u in (-1.3, 1.3):
        parts.append(_section(au - side_u * b, av - 0.35 * b, zz, au=1.1 * b * g + 1e-3,
                              av=1.75 * b * g + 1e-3, cortex=cortex, cap=(1.5 * b, 1.2 * b, -1)))
    parts.append(_section(au, av + 0.55 * b, zz, au=1.9 * b * g + 1e-3, av=1.1 * b * g + 1e-3,
                          cortex=cortex, cap=(1.9 * b, 1.0 * b, -1)))
    outer = np.logical_or.reduce([p[0] for p in parts])
    cavity = np.logical_or.reduce([p[1] for p in parts])
    return _Bone(outer, cavity, au, av - 0.1 * b)


def _knee_tibia(au: NDArray[np.float64], av: NDArray[np.float64], zz: NDArray[np.float64],
                spec: PhantomSpec) -> _Bone:
    """Proximal tibia: a flat plateau below the joint line narrowing into a triangular shaft."""
    b = spec.bone_radius_mm
    s = _sigmoid((zz + 2.2 * b) / (0.45 * b))  # 1 near the plateau
    bu, bv = au, av - 0.15 * b
    outer, cavity = _section(bu, bv, zz, au=b * (0.95 + 1.55 * s), av=b * (0.9 + 0.85 * s),
                             cortex=1.3 * spec.cortex_mm * (1 - 0.7 * s), tri=0.12 * (1 - s),
                             tri_phase=-np.pi / 2 + 0.2)
    top = zz < -0.3 * b
    return _Bone(outer & top, cavity & top, bu, bv)


def _calf_bones(leg: _Leg, spec: PhantomSpec) -> tuple[_Bone, _Bone]:
    """Tibia (antero-medial, rounded triangle, thick cortex) and fibula (postero-lateral)."""
    b = spec.bone_radius_mm
    tu0, tv0 = _calf_tibia_centre(spec)
    tu, tv = leg.u - tu0, leg.v - tv0
    tibia = _Bone(*_section(tu, tv, leg.z, au=0.95 * b, av=0.95 * b, cortex=1.6 * spec.cortex_mm,
                            tri=0.12, tri_phase=-np.pi / 2 + 0.2), tu, tv)
    fu, fv = tu - 2.3 * b, tv - 1.6 * b
    fibula = _Bone(*_section(fu, fv, leg.z, au=0.47 * b, av=0.47 * b, cortex=0.28 * b), fu, fv)
    return tibia, fibula


def _calf_tibia_centre(spec: PhantomSpec) -> tuple[float, float]:
    """Tibial axis in the leg's mirrored frame (mm): medial and anterior."""
    r_mid = 0.70 * spec.leg_radius_mm
    return -0.25 * r_mid, -0.50 * r_mid


def calf_bone_area_mm2(spec: PhantomSpec) -> dict[str, float]:
    """Analytic cross-sectional areas (mm2) of the calf's tibia and fibula (constant along z).

    The tibia's section is r(phi) = R (1 + e cos 3 phi): area pi R^2 (1 + e^2 / 2).
    """
    b = spec.bone_radius_mm
    return {"tibia": float(np.pi * (0.95 * b) ** 2 * (1 + 0.12**2 / 2)),
            "fibula": float(np.pi * (0.47 * b) ** 2)}


def _calf_claim(pts: NDArray[np.float64], spec: PhantomSpec, sess: SessionSpec,
                fields: _Fields, side: str) -> Claim | None:
    """One lower leg: tibia and fibula, interosseous membrane and crural septa, posterior
    tibial and peroneal vessels; the lesion lies in the tibia."""
    b, lr = spec.bone_radius_mm, spec.leg_radius_mm
    span = spec.n_slices * spec.slice_mm
    z = pts[:, 2]
    r0 = lr * (0.70 + 0.10 * (z - _z_centre(spec)) / span)  # the calf tapers distally
    leg = _envelope(pts, spec, sess, fields, side, r0,
                    REGION_LEG_RADIUS["calf"] * lr + spec.gap_mm / 2,
                    [(0.06, 2, 0.2), (0.07, 1, -np.pi / 2)])
    if leg is None:
        return None
    u, v, zz, t = leg.u, leg.v, leg.z, leg.t
    tib_c = _calf_tibia_centre(spec)
    fib_c = (tib_c[0] + 2.3 * b, tib_c[1] + 1.6 * b)
    septa = np.minimum.reduce([
        _segment_distance(u, v, tib_c, fib_c),  # interosseous membrane
        _ray_distance(u, v, fib_c, -1.2),  # anterior crural septum
        _ray_distance(u, v, fib_c, 0.6),  # posterior crural septum
        _segment_distance(u, v, fib_c, (tib_c[0] - 1.3 * b, tib_c[1] + 3.0 * b)),  # transverse
    ])
    t[leg.in_muscle & (septa < 0.45)] = FASCIA
    zles = _lesion_level(spec)
    if leg.affected and sess.edema > 0:
        _apply_edema(t, pts[leg.idx], zz, leg.theta, zles, span, sess, fields)
    if spec.vessels:
        _apply_vessels(t, u, v, [
            (tib_c[0] + 0.15 * b, tib_c[1] + 1.95 * b, 0.17 * b),  # posterior tibial artery
            (tib_c[0] - 0.35 * b, tib_c[1] + 2.05 * b, 0.22 * b),  # posterior tibial vein
            (fib_c[0] - 0.75 * b, fib_c[1] + 1.0 * b, 0.15 * b),  # peroneal artery
            (fib_c[0] - 0.35 * b, fib_c[1] + 1.3 * b, 0.20 * b),  # peroneal vein
        ])
    tibia, fibula = _calf_bones(leg, spec)
    fatty = np.full(zz.size, FATTY_MARROW, dtype=np.int8)
    _place_bones(leg, [tibia, fibula], [fatty, fatty])
    if leg.affected and sess.lesion_ml > 0:
        axes = _lesion_axes(spec, sess.lesion_ml, 0.95 * b - 1.6 * spec.cortex_mm)
        _apply_lesion(t, tibia.cavity, tibia.bu, tibia.bv, zz, zles, axes, leg.phase[0])
    return _claim(pts.shape[0], leg.idx, t, leg.rr, leg.r_skin)


def _resolve_contact(
    claims: dict[str, tuple[NDArray[np.int8], NDArray[np.float64], NDArray[np.float64]]], n: int
) -> tuple[NDArray[np.int8], NDArray[np.int8]]:
    """Tissue and side where each leg claims its points; touching legs flatten at the contact.

    Where both legs claim a point (their outlines would overlap), it goes to the leg it lies
    deeper in (smaller radius relative to that leg's skin radius), so the contact surface lies
    half-way; a skin layer of 1.2 mm lines each leg along it, as soft tissue pressed together
    does.
    """
    tissue = np.zeros(n, dtype=np.int8)
    side_code = np.zeros(n, dtype=np.int8)
    for side, (t, _, _) in claims.items():
        own = t != AIR
        tissue[own] = t[own]
        side_code[own] = 2 if side == "left" else 1
    if len(claims) == 2:
        (tr, qr, rr_), (tl, ql, rl) = claims["right"], claims["left"]
        both = (tr != AIR) & (tl != AIR)
        if both.any():
            left_wins = both & (ql < qr)
            right_wins = both & ~left_wins
            tissue[left_wins], side_code[left_wins] = tl[left_wins], 2
            tissue[right_wins], side_code[right_wins] = tr[right_wins], 1
            # distance to the contact surface, from the depth difference of the two legs
            b = np.nonzero(both)[0]
            dist_mm = np.abs(qr[b] - ql[b]) / (1.0 / rr_[b] + 1.0 / rl[b])
            on_skin = b[(dist_mm < 1.2) & (tissue[b] != CORTEX)]
            tissue[on_skin] = SKIN
    return tissue, side_code


def _supersample_offsets(spec: PhantomSpec) -> NDArray[np.float64]:
    nxy, nz = spec.supersample_xy, spec.supersample_z
    oxy = (np.arange(nxy) + 0.5) / nxy - 0.5
    oz = (np.arange(nz) + 0.5) / nz - 0.5
    return np.stack(np.meshgrid(oxy, oxy, oz, indexing="ij"), -1).reshape(-1, 3)


def render_session(
    spec: PhantomSpec, sess: SessionSpec, fields: _Fields | None = None
) -> dict[str, Any]:
    """Partial-volume tissue fractions of one session on its acquisition grid.

    Returns
    -------
    dict with ``grid`` (Grid), ``fractions`` : ndarray of shape (T, Z, Y, X), float32, the
    fraction of each tissue code (T = N_TISSUES) per voxel for each side stacked as
    ``fractions[side_index * N_TISSUES + tissue]`` with side_index 0 right, 1 left.
    """
    fields = fields or _fields(spec)
    grid = make_grid(spec, sess.table_shift_mm, sess.n_slices)
    rendered: dict[str, Any] = {"grid": grid,
                                "fractions": render_fractions(spec, sess, fields, grid)}
    if sess.fov_clip_mm > 0:
        rendered = _clip_fov(spec, sess, rendered)
    if sess.signal_void_slices > 0:
        rendered["void_slices"] = _void_slices(rendered["grid"], sess)
    return rendered


def render_fractions(spec: PhantomSpec, sess: SessionSpec, fields: _Fields, grid: Grid
                     ) -> NDArray[np.float32]:
    """Partial-volume fractions (2 x N_TISSUES, Z, Y, X) of the anatomy of `sess` on `grid`
    (see :func:`render_session`)."""
    nz, ny, nx = grid.shape_zyx
    offs = _supersample_offsets(spec)
    n_sub = offs.shape[0]
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    fractions = np.zeros((2 * N_TISSUES, nz, ny, nx), dtype=np.float32)
    pix_base = np.repeat(np.arange(ny * nx) * (2 * N_TISSUES), n_sub)
    for k in range(nz):
        base = grid.slice_origin(k)
        # sample points: (pixel, sub-sample) -> LPS
        fi = ii.reshape(-1, 1) + offs[None, :, 0]
        fj = jj.reshape(-1, 1) + offs[None, :, 1]
        fk = offs[None, :, 2]
        pts = (
            base[None, None, :]
            + (fi * grid.pixel_mm)[..., None] * grid.row_dir
            + (fj * grid.pixel_mm)[..., None] * grid.col_dir
            + (fk * grid.slice_mm)[..., None] * grid.normal
        ).reshape(-1, 3)
        tissue, side_code = _tissue_at(pts, spec, sess, fields)
        code = np.where(side_code > 0, (side_code.astype(np.int16) - 1) * N_TISSUES + tissue, 0)
        flat = pix_base + code
        counts = np.bincount(flat, minlength=ny * nx * 2 * N_TISSUES)
        counts = counts.reshape(ny * nx, 2 * N_TISSUES)
        fractions[:, k] = (counts / n_sub).T.reshape(2 * N_TISSUES, ny, nx)
    return fractions


def _clip_sides(spec: PhantomSpec, sess: SessionSpec) -> list[str]:
    """The sides whose lateral edge `sess` cuts off, among those in the field of view."""
    other = "right" if spec.affected_side == "left" else "left"
    wanted = {"affected": [spec.affected_side], "contralateral": [other],
              "both": ["right", "left"]}.get(sess.fov_clip_side, [sess.fov_clip_side])
    return [s for s in wanted if s in session_sides(spec, sess)]


def _side_fraction(frac: NDArray[np.float32], side: str) -> NDArray[np.float32]:
    """Fraction of each voxel (Z, Y, X) inside the limb of `side` (its tissues but AIR:
    ``fractions[AIR]`` holds the background)."""
    s_idx = 0 if side == "right" else 1
    return frac[s_idx * N_TISSUES + AIR + 1 : (s_idx + 1) * N_TISSUES].sum(axis=0)


def _clip_fov(spec: PhantomSpec, sess: SessionSpec, rendered: dict[str, Any]) -> dict[str, Any]:
    """Narrow the in-plane field of view (drop columns) so that the image edge lies
    `sess.fov_clip_mm` medial of the lateral-most point of each limb to clip.

    The returned dict holds the clipped ``grid`` and ``fractions`` (a view) and the full
    rendering as ``unclipped``. The limb's extent is known to a pixel (its outermost column).
    """
    grid, frac = rendered["grid"], rendered["fractions"]
    nz, ny, nx = grid.shape_zyx
    half = grid.pixel_mm / 2
    x_col = grid.origin[0] + np.arange(nx) * grid.pixel_mm * grid.row_dir[0]
    keep = np.ones(nx, dtype=bool)
    for side in _clip_sides(spec, sess):
        present = _side_fraction(frac, side).max(axis=(0, 1)) > 0
        if not present.any():
            continue
        if side == "left":  # lateral is +x
            edge = x_col[present].max() + half
            keep &= x_col + half <= edge - sess.fov_clip_mm + 1e-6
        else:
            edge = x_col[present].min() - half
            keep &= x_col - half >= edge + sess.fov_clip_mm - 1e-6
    cols = np.nonzero(keep)[0]
    if cols.size == 0:
        raise ValueError(f"fov_clip_mm {sess.fov_clip_mm} leaves no column in the image")
    i0, i1 = int(cols[0]), int(cols[-1]) + 1
    clipped = dataclasses.replace(grid, origin=grid.origin + i0 * grid.pixel_mm * grid.row_dir,
                                  shape_zyx=(nz, ny, i1 - i0))
    return {"grid": clipped, "fractions": frac[..., i0:i1], "unclipped": rendered}


def _void_slices(grid: Grid, sess: SessionSpec) -> dict[int, float]:
    """Coil-edge slices: grid slice index -> signal factor (0.05 at the very end, rising to
    0.2 on the innermost of the `sess.signal_void_slices` slices of each end concerned)."""
    nz = grid.shape_zyx[0]
    n = min(sess.signal_void_slices, nz)
    by_z = list(range(nz)) if grid.normal[2] > 0 else list(range(nz - 1, -1, -1))
    ends = {"inferior": [by_z], "superior": [by_z[::-1]], "both": [by_z, by_z[::-1]]}
    out: dict[int, float] = {}
    for order in ends[sess.signal_void_end]:
        for depth, k in enumerate(order[:n]):
            out[k] = min(out.get(k, 1.0), 0.05 + 0.15 * depth / max(n - 1, 1))
    return out


def void_slices_z_ascending(grid: Grid, void: dict[int, float]) -> list[int]:
    """Indices, in LPS z ascending order (0 = most inferior slice), of the void slices."""
    nz = grid.shape_zyx[0]
    return sorted(k if grid.normal[2] > 0 else nz - 1 - k for k in void)


def clipped_sides(rendered: dict[str, Any]) -> list[str]:
    """Sides whose limb reaches an in-plane edge of the image (first/last column or row)."""
    frac = rendered["fractions"]
    out = []
    for side in ("right", "left"):
        f = _side_fraction(frac, side)
        edges = (f[:, :, 0], f[:, :, -1], f[:, 0, :], f[:, -1, :])
        if any(float(e.max()) > 0 for e in edges):
            out.append(side)
    return out


def bias_field(spec: PhantomSpec, grid: Grid) -> NDArray[np.float64]:
    """Smooth multiplicative field with a left-right gradient; peak-to-peak = spec.bias."""
    nz, ny, nx = grid.shape_zyx
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    p = (
        grid.origin
        + (i * grid.pixel_mm)[..., None] * grid.row_dir
        + (j * grid.pixel_mm)[..., None] * grid.col_dir
        + (k * grid.slice_mm)[..., None] * grid.normal
    )
    x = p[..., 0] / 150.0
    y = p[..., 1] / 120.0
    zz = (p[..., 2] - _z_centre(spec)) / 150.0
    g = 0.6 * x + 0.25 * y - 0.2 * zz + 0.35 * (x**2 + 0.5 * y**2) - 0.15 * x * zz
    g = (g - g.min()) / max(float(np.ptp(g)), 1e-9)
    return 1.0 - spec.bias / 2 + spec.bias * g


def synthesize(
    spec: PhantomSpec, rendered: dict[str, Any], rng: np.random.Generator, gain: float = 1.0
) -> dict[str, NDArray[np.uint16]]:
    """T1-weighted and STIR magnitude images (stored values, 12-bit) from tissue fractions.

    `gain` scales the stored values (signal and noise alike), as another receive coil does."""
    frac = rendered["fractions"]
    b = bias_field(spec, rendered["grid"])
    void: dict[int, float] = rendered.get("void_slices", {})
    out: dict[str, NDArray[np.uint16]] = {}
    for name, snr in (("T1w", spec.snr_t1), ("STIR", spec.snr_stir)):
        table = signal_table(spec, name)
        sig = np.zeros(frac.shape[1:], dtype=np.float64)
        for s in range(2):
            for tcode, inten in table.items():
                if inten:
                    sig += frac[s * N_TISSUES + tcode] * inten
        muscle = table[MUSCLE]
        sigma = muscle / snr
        sig = sig * b
        if void:
            sig = _coil_edge(sig, void)
        noise_re = rng.normal(0, sigma, sig.shape)
        noise_im = rng.normal(0, sigma, sig.shape)
        if void:
            ks = sorted(void)
            noise_re[ks] *= 1.5
            noise_im[ks] *= 1.5
        mag = np.hypot(sig + noise_re, noise_im)
        if gain != 1.0:
            mag = mag * gain
        out[name] = np.clip(np.round(mag * 1000.0), 0, 4095).astype(np.uint16)
    return out


def signal_table(spec: PhantomSpec, series: str) -> dict[int, float]:
    """Relative signal of each tissue code on `series` (``T1w`` or ``STIR``) of `spec`.

    ``t1_like=False`` gives the anatomical series the (fat-suppressed) STIR contrast;
    ``stir_fat_suppressed=False`` keeps fat-bearing tissues as bright on the fluid series as
    on T1 (a T2-weighted image without fat saturation).
    """
    t1 = {t: v[0] for t, v in TISSUE_SIGNAL.items()}
    stir = {t: v[1] for t, v in TISSUE_SIGNAL.items()}
    if series == "T1w":
        return t1 if spec.t1_like else stir
    if not spec.stir_fat_suppressed:
        stir = {t: (t1[t] if t in FAT_TISSUES else v) for t, v in stir.items()}
    return stir


def _coil_edge(sig: NDArray[np.float64], void: dict[int, float]) -> NDArray[np.float64]:
    """Coil-edge signal loss on slices `void` (index -> factor): the signal falls to the
    factor and a ghost of the slice, shifted by a third of the field of view along the phase
    direction (rows), is added at 15 % (wrap / motion-like artefact)."""
    out = sig.copy()
    ny = sig.shape[1]
    for k, factor in void.items():
        ghost = 0.10 * np.roll(sig[k], ny // 3, axis=0) + 0.05 * np.roll(sig[k], -ny // 3, axis=0)
        out[k] = factor * sig[k] + ghost
    return out


def truth_of(spec: PhantomSpec, rendered: dict[str, Any]) -> tuple[dict[str, Any], NDArray[Any]]:
    """Exact volumes (mL) per side and structure, and the majority-vote label map (Z, Y, X)."""
    frac = rendered["fractions"]
    grid: Grid = rendered["grid"]
    voxel_mm3 = grid.pixel_mm**2 * grid.slice_mm
    nz, ny, nx = grid.shape_zyx
    class_frac = np.zeros((9, nz, ny, nx), dtype=np.float32)  # label values 0..8
    for s_idx, side in enumerate(("right", "left")):
        for tcode, cls in TISSUE_CLASS.items():
            class_frac[SIDE_OFFSET[side] + cls] += frac[s_idx * N_TISSUES + tcode]
    class_frac[0] = 1.0 - class_frac[1:].sum(axis=0)
    labels = np.argmax(class_frac, axis=0).astype(np.uint8)
    volumes: dict[str, dict[str, float]] = {}
    for side in ("right", "left"):
        volumes[side] = {
            structure: round(
                mm3_to_ml(
                    float(sum(class_frac[SIDE_OFFSET[side] + c].sum() for c in classes)) * voxel_mm3
                ),
                4,
            )
            for structure, classes in STRUCTURE_CLASSES.items()
        }
    return volumes, labels


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _instance_order(n: int, order: str) -> list[int]:
    """Acquisition order of spatial slice indices."""
    if order == "ascending":
        return list(range(n))
    if order == "descending":
        return list(range(n - 1, -1, -1))
    return list(range(0, n, 2)) + list(range(1, n, 2))


#: The two series every phantom study holds, as a scanner records them.
SEQUENCES: dict[str, dict[str, Any]] = {
    "T1w": dict(desc="T1 TSE AX", ss="SE", sv="SK\\SP", so="", tr=550.0, te=12.0, ti=None,
                etl=3, proto="t1_tse_tra"),
    "STIR": dict(desc="STIR AX", ss="SE\\IR", sv="SK\\SP\\MP", so="IR", tr=4200.0, te=45.0,
                 ti=150.0, etl=11, proto="tir_tra_stir"),
}
#: Laterality tag (0020,0060) and series-description suffix of a one-leg series.
LATERALITY_CODE: dict[str, str] = {"left": "L", "right": "R"}
LATERALITY_SUFFIX: dict[str, str] = {"left": "LT", "right": "RT"}


def series_description(kind: str, laterality: str) -> str:
    """Description of a one-leg series, e.g. ``T1 TSE AX LT``."""
    return f"{SEQUENCES[kind]['desc']} {LATERALITY_SUFFIX[laterality]}"


_STUDY_DESCRIPTIONS = {"thigh": "MR THIGHS BILATERAL", "knee": "MR KNEES BILATERAL",
                       "calf": "MR LOWER LEGS BILATERAL"}


def _series_header(spec: PhantomSpec, study: dict[str, str], grid: Grid, kind: str) -> Any:
    """The attributes every slice of a series shares: patient, study, sequence, geometry."""
    from pydicom.dataset import Dataset

    seq = SEQUENCES[kind]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.StudyDate = study["date"]
    ds.SeriesDate = study["date"]
    ds.AcquisitionDate = study["date"]
    ds.StudyTime = study["time"]
    ds.SeriesTime = study["time"]
    ds.AccessionNumber = study["accession"]
    ds.Modality = "MR"
    ds.Manufacturer = "limbtrack phantom"
    ds.InstitutionName = "Phantom Hospital"
    ds.StudyDescription = _STUDY_DESCRIPTIONS[spec.region]
    ds.SeriesDescription = seq["desc"]
    ds.ProtocolName = seq["proto"]
    ds.PatientName = f"PHANTOM^{spec.subject.upper()}"
    ds.PatientID = f"PH{spec.seed:06d}"
    ds.PatientBirthDate = "20140115"
    ds.PatientSex = "M"
    ds.PatientAge = "010Y"
    ds.BodyPartExamined = "KNEE" if spec.region == "knee" else "LEG"
    ds.ScanningSequence = seq["ss"]
    ds.SequenceVariant = seq["sv"]
    ds.ScanOptions = seq["so"]
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = f"{grid.slice_mm:.6g}"
    ds.SpacingBetweenSlices = f"{grid.slice_mm:.6g}"
    ds.RepetitionTime = seq["tr"]
    ds.EchoTime = seq["te"]
    if seq["ti"] is not None:
        ds.InversionTime = seq["ti"]
    ds.EchoNumbers = 1
    ds.EchoTrainLength = seq["etl"]
    ds.MagneticFieldStrength = 1.5
    ds.PatientPosition = spec.position
    return ds


def _slice_dataset(
    header: Any, pixels: NDArray[np.uint16], grid: Grid, kind: str, k: int,
    ids: dict[str, Any],
) -> Any:
    """Slice `k` of a series: the shared `header` plus the slice's identity, position and
    pixels (``ids``: study_uid, series_uid, frame_uid, study_id, series_number, instance)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    nz, ny, nx = grid.shape_zyx
    sop_uid = _uid(ids["series_uid"], k)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MR_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    ds = copy.deepcopy(header)
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = ids["study_uid"]
    ds.SeriesInstanceUID = ids["series_uid"]
    ds.StudyID = ids["study_id"]
    ds.SeriesNumber = ids["series_number"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = ids["instance"]
    pos = grid.slice_origin(k)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*grid.row_dir, *grid.col_dir)]
    ds.FrameOfReferenceUID = ids["frame_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{float(np.dot(pos, grid.normal)):.6f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.PixelSpacing = [f"{grid.pixel_mm:.6g}", f"{grid.pixel_mm:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 600 if kind == "T1w" else 400
    ds.WindowWidth = 1200 if kind == "T1w" else 800
    ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
    return ds


def write_series(
    out_dir: Path,
    pixels: NDArray[np.uint16],
    grid: Grid,
    *,
    spec: PhantomSpec,
    study: dict[str, str],
    series_number: int,
    kind: str,
    laterality: str = "",
    coil: str = "",
) -> list[Path]:
    """Write one axial series as MR Image Storage files, one per slice, named by instance.

    `laterality` (``left`` or ``right``; the split layout) sets the Laterality tag
    (0020,0060) and ends the series description with ``LT`` or ``RT``; `coil` the Receive Coil
    Name (0018,1250)."""
    series_uid = _uid(spec.seed, study["uid"], series_number)
    ids: dict[str, Any] = {"study_uid": study["uid"], "series_uid": series_uid,
                           "frame_uid": _uid(spec.seed, study["uid"], "frame"),
                           "study_id": study["id"], "series_number": series_number}
    out_dir.mkdir(parents=True, exist_ok=True)
    header = _series_header(spec, study, grid, kind)
    if laterality:
        header.Laterality = LATERALITY_CODE[laterality]
        header.SeriesDescription = series_description(kind, laterality)
    if coil:
        header.ReceiveCoilName = coil
    paths = []
    for inst, k in enumerate(_instance_order(grid.shape_zyx[0], spec.slice_order), start=1):
        ds = _slice_dataset(header, pixels, grid, kind, k, {**ids, "instance": inst})
        path = out_dir / f"IM{inst:05d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _study_of(spec: PhantomSpec, sess: SessionSpec, n: int, date: dt.date) -> dict[str, str]:
    """The DICOM study identity of session `n` (1-based) on `date`."""
    return {
        "uid": _uid(spec.seed, spec.subject, "study", sess.day),
        "date": date.strftime("%Y%m%d"),
        "time": f"{9 + n % 8:02d}{(13 * n) % 60:02d}00",
        "accession": f"A{spec.seed:04d}{n:03d}",
        "id": str(n),
    }


def _asymmetry_pct(spec: PhantomSpec, volumes: dict[str, dict[str, float]],
                   contralateral: dict[str, dict[str, float]] | None = None) -> float | None:
    """True soft-tissue asymmetry (%) of a bilateral phantom; None with one limb.

    `contralateral`: the volumes of another session to take the contralateral limb from
    (a session of the affected limb alone)."""
    if set(spec.sides) != {"left", "right"}:
        return None
    other = "right" if spec.affected_side == "left" else "left"
    contra = (contralateral or volumes)[other]["soft_tissue"]
    asym = 100.0 * (volumes[spec.affected_side]["soft_tissue"] / contra - 1)
    return round(asym, 3)


def _carried_truth(spec: PhantomSpec, sessions_truth: list[dict[str, Any]]) -> None:
    """True asymmetry of each session of the affected limb alone against the contralateral
    limb of the nearest session (in days; ties: the earlier) that holds both. The phantom's
    contralateral limb never changes, so on one grid any such session gives the same value."""
    both = [t for t, s in zip(sessions_truth, spec.sessions, strict=True) if not s.affected_only]
    for t, s in zip(sessions_truth, spec.sessions, strict=True):
        if not s.affected_only or not both:
            continue
        ref = min(both, key=lambda b: (abs(b["day"] - t["day"]), b["day"]))
        t["soft_tissue_asymmetry_pct"] = _asymmetry_pct(spec, t["volumes_ml"], ref["volumes_ml"])
        t["contralateral_truth_session"] = ref["session"]


# -------------------------------------------------------------------------------------------
# Split layout: each leg in its own series (extremity coil, one leg per field of view)
# -------------------------------------------------------------------------------------------

#: Receive coil of a one-leg series: the same extremity coil for both legs, another coil for
#: the right leg's series when its signal scale differs (`split_right_gain`).
EXTREMITY_COIL = "EXTREMITY 16"
OTHER_COIL = "FLEX LARGE 4"

#: Series numbers per leg of a split study, (T1w, STIR); a bilateral study uses 3 and 4.
SPLIT_SERIES_NUMBERS: dict[str, dict[str, int]] = {"left": {"T1w": 3, "STIR": 4},
                                                    "right": {"T1w": 5, "STIR": 6}}


def make_split_grid(spec: PhantomSpec, sess: SessionSpec, side: str) -> Grid:
    """One leg's field of view (anatomy coordinates): square, `split_fov_factor` x the leg's
    nominal diameter, centred on its axis (the right leg's moved by `split_right_offset_mm`),
    slices about the same centre as the bilateral grid's."""
    row, col = (np.asarray(v, dtype=float) for v in POSITION_IOP[spec.position])
    normal = np.cross(row, col)
    right = side == "right"
    pixel_mm = spec.split_right_pixel_mm if right and spec.split_right_pixel_mm > 0 \
        else spec.pixel_mm
    r_mm = REGION_LEG_RADIUS[spec.region] * spec.leg_radius_mm
    n = int(np.ceil(spec.split_fov_factor * 2 * r_mm / pixel_mm - 1e-9))
    nz = (sess.n_slices or spec.n_slices) + (spec.split_right_extra_slices if right else 0)
    if nz < 1:
        raise ValueError(f"split_right_extra_slices {spec.split_right_extra_slices} leaves "
                         "the right leg's series no slice")
    sgn = 1.0 if side == "left" else -1.0
    centre = np.array([sgn * (r_mm + spec.gap_mm / 2), 0.0, _z_centre(spec) - sess.table_shift_mm])
    if right:
        centre[:2] += np.asarray(spec.split_right_offset_mm, dtype=float)
    origin = (centre - (row + col) * pixel_mm * (n - 1) / 2
              - normal * spec.slice_mm * (nz - 1) / 2)
    return Grid(origin, row, col, normal, pixel_mm, spec.slice_mm, (nz, n, n))


def _index_of(grid: Grid, pts: NDArray[np.float64]) -> NDArray[np.float64]:
    """Continuous voxel indices (i, j, k) on `grid` of points (N, 3) (axes orthogonal)."""
    d = pts - grid.origin
    return np.stack([d @ grid.row_dir / grid.pixel_mm, d @ grid.col_dir / grid.pixel_mm,
                     d @ grid.normal / grid.slice_mm], axis=-1)


def _centres(grid: Grid) -> NDArray[np.float64]:
    """Voxel centres (Z, Y, X, 3) of `grid`."""
    nz, ny, nx = grid.shape_zyx
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return (grid.origin + (i * grid.pixel_mm)[..., None] * grid.row_dir
            + (j * grid.pixel_mm)[..., None] * grid.col_dir
            + (k * grid.slice_mm)[..., None] * grid.normal)


def union_grid(ref: Grid, grids: Sequence[Grid]) -> tuple[Grid, tuple[int, int, int]]:
    """A grid on `ref`'s lattice holding every voxel centre of `grids`, and the (k, j, i) index
    of `ref`'s first voxel in it."""
    lo, hi = np.zeros(3), np.array(ref.shape_zyx[::-1], dtype=float) - 1
    for g in grids:
        nz, ny, nx = g.shape_zyx
        corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1)
                            for k in (0, nz - 1)], dtype=float)
        pts = g.origin + corners @ np.stack([g.row_dir * g.pixel_mm, g.col_dir * g.pixel_mm,
                                             g.normal * g.slice_mm])
        idx = _index_of(ref, pts)
        lo = np.minimum(lo, np.floor(idx.min(axis=0) + 1e-6))
        hi = np.maximum(hi, np.ceil(idx.max(axis=0) - 1e-6))
    origin = ref.origin + lo @ np.stack([ref.row_dir * ref.pixel_mm, ref.col_dir * ref.pixel_mm,
                                         ref.normal * ref.slice_mm])
    size = (hi - lo + 1).astype(int)
    grid = dataclasses.replace(ref, origin=origin, shape_zyx=(int(size[2]), int(size[1]),
                                                              int(size[0])))
    return grid, (int(-lo[2]), int(-lo[1]), int(-lo[0]))


def _one_side(frac: NDArray[np.float32], side: str,
              keep: NDArray[np.bool_] | None = None) -> NDArray[np.float32]:
    """`frac` with only the tissues of `side` (the other leg is outside the coil: no signal,
    no truth), optionally only where `keep` (Z, Y, X) is True."""
    out = np.zeros_like(frac)
    s_idx = 0 if side == "right" else 1
    channels = slice(s_idx * N_TISSUES, (s_idx + 1) * N_TISSUES)
    out[channels] = frac[channels] if keep is None else frac[channels] * keep
    return out


def render_split_session(spec: PhantomSpec, sess: SessionSpec, fields: _Fields | None = None
                         ) -> dict[str, Any]:
    """Fractions of a split session: per leg imaged, its series' grid and fractions (that leg
    alone), and the truth grid holding them all (on the left series' lattice, else the right's)
    with each leg's fractions inside its own series' field of view.

    Both legs are always rendered together (touching legs flatten at their contact as in a
    bilateral image) and each series keeps its own leg: the anatomy is that of the bilateral
    phantom of the same seed."""
    fields = fields or _fields(spec)
    sides = session_sides(spec, sess)
    grids = {s: make_split_grid(spec, sess, s) for s in sides}
    ref = "left" if "left" in sides else "right"
    truth_grid, (k0, j0, i0) = union_grid(grids[ref], list(grids.values()))
    frac = render_fractions(spec, sess, fields, truth_grid)
    nz, ny, nx = grids[ref].shape_zyx
    in_ref = np.zeros(truth_grid.shape_zyx, dtype=bool)
    in_ref[k0:k0 + nz, j0:j0 + ny, i0:i0 + nx] = True
    series = {ref: _one_side(frac[:, k0:k0 + nz, j0:j0 + ny, i0:i0 + nx], ref)}
    truth_frac = _one_side(frac, ref, in_ref)
    for side in sides:
        if side == ref:
            continue
        g = grids[side]
        series[side] = _one_side(render_fractions(spec, sess, fields, g), side)
        idx = _index_of(g, _centres(truth_grid))
        inside = np.all((idx >= -0.5) & (idx <= np.array(g.shape_zyx[::-1]) - 0.5), axis=-1)
        truth_frac += _one_side(frac, side, inside)
    return {"grids": grids, "series": series,
            "truth": {"grid": truth_grid, "fractions": truth_frac}}


def _common_slices(grids: dict[str, Grid]) -> dict[str, slice]:
    """Per leg, its series' slices inside the slab every series covers (same centre, slices
    lined up: the longer series loses as many slices at each end)."""
    n_common = min(g.shape_zyx[0] for g in grids.values())
    out = {}
    for side, g in grids.items():
        trim = (g.shape_zyx[0] - n_common) // 2
        out[side] = slice(trim, trim + n_common)
    return out


def _split_volumes(spec: PhantomSpec, split: dict[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exact volumes per leg on its own series' grid: over the slab common to the session's
    series (what both legs can be compared over) and over the whole series."""
    empty = truth_of(spec, {"grid": next(iter(split["grids"].values())),
                            "fractions": np.zeros((2 * N_TISSUES, 1, 1, 1), np.float32)})[0]
    common = {s: dict(v) for s, v in empty.items()}
    whole = {s: dict(v) for s, v in empty.items()}
    slabs = _common_slices(split["grids"])
    for side, g in split["grids"].items():
        frac = split["series"][side]
        whole[side] = truth_of(spec, {"grid": g, "fractions": frac})[0][side]
        nz, ny, nx = g.shape_zyx
        n = slabs[side].stop - slabs[side].start
        sub = {"grid": dataclasses.replace(g, shape_zyx=(n, ny, nx)),
               "fractions": frac[:, slabs[side]]}
        common[side] = truth_of(spec, sub)[0][side]
    return common, whole


def _labelled_side(spec: PhantomSpec, side: str, kind: str) -> str:
    """The side a series' Laterality tag and description name (`split_wrong_laterality`)."""
    wrong = spec.split_wrong_laterality.split(":")
    if wrong[0] == side and (len(wrong) == 1 or wrong[1] == kind):
        return "left" if side == "right" else "right"
    return side


def _write_split_series(spec: PhantomSpec, n: int, sess: SessionSpec, split: dict[str, Any],
                        study: dict[str, str], study_dir: Path) -> list[dict[str, Any]]:
    """Write each leg's T1 and STIR series; their description for the truth."""
    out = []
    for side, g in split["grids"].items():
        rng = np.random.default_rng([spec.seed, n, 0 if side == "right" else 1])
        gain = spec.split_right_gain if side == "right" else 1.0
        coil = EXTREMITY_COIL if gain == 1.0 else OTHER_COIL
        images = synthesize(spec, {"grid": g, "fractions": split["series"][side]}, rng, gain)
        grid = dataclasses.replace(g, origin=g.origin + [0.0, 0.0, sess.table_shift_mm])
        x_edges = sorted(float(grid.origin[0] + e * grid.row_dir[0] * grid.pixel_mm)
                         for e in (-0.5, g.shape_zyx[2] - 0.5))
        for kind in ("T1w", "STIR"):
            number = SPLIT_SERIES_NUMBERS[side][kind]
            tag = _labelled_side(spec, side, kind)
            write_series(study_dir / f"SE{number:04d}", images[kind], grid, spec=spec,
                         study=study, series_number=number, kind=kind, laterality=tag,
                         coil=coil)
            out.append({"series_number": number, "kind": kind, "side": side,
                        "laterality_tag": LATERALITY_CODE[tag],
                        "description": series_description(kind, tag),
                        "laterality_tag_wrong": tag != side, "pixel_mm": g.pixel_mm,
                        "shape_zyx": list(g.shape_zyx), "gain": gain, "coil": coil,
                        "x_range_mm": [round(x, 4) for x in x_edges]})
    return out


def _generate_split_session(spec: PhantomSpec, fields: Any, n: int, sess: SessionSpec,
                            out_dir: Path) -> dict[str, Any]:
    """Render, write (two series per leg, the true label map on a grid holding both legs)
    and describe split session `n`."""
    import nibabel as nib

    split = render_split_session(spec, sess, fields)
    volumes, whole = _split_volumes(spec, split)
    date = dt.date.fromisoformat(spec.day0) + dt.timedelta(days=sess.day)
    study = _study_of(spec, sess, n, date)
    series = _write_split_series(spec, n, sess, split, study, out_dir / "dicom" / f"ST{n:04d}")
    tg: Grid = split["truth"]["grid"]
    tg = dataclasses.replace(tg, origin=tg.origin + [0.0, 0.0, sess.table_shift_mm])
    labels = truth_of(spec, split["truth"])[1]
    label_path = out_dir / "truth" / f"ses-{study['date']}_truth_dseg.nii.gz"
    label_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.transpose(labels, (2, 1, 0)), _affine_ras(tg)), label_path)
    clipped = sorted({s for side, f in split["series"].items()
                      for s in clipped_sides({"fractions": f})})
    return {
        "session": study["date"],
        "study_date": date.isoformat(),
        "day": sess.day,
        "params": _session_json(sess, False),
        "volumes_ml": volumes,
        "soft_tissue_asymmetry_pct": None if sess.affected_only else _asymmetry_pct(spec, volumes),
        "label_map": str(label_path.relative_to(out_dir)),
        "fov_clipped_sides": clipped,
        "volumes_ml_unclipped": volumes,
        "signal_void_slices": [],
        "volumes_ml_valid": volumes,
        "volumes_ml_series": whole,
        "series": series,
    }


def _generate_session(
    spec: PhantomSpec, fields: Any, n: int, sess: SessionSpec, out_dir: Path
) -> dict[str, Any]:
    """Render, write (two series and the true label map) and describe session `n`."""
    import nibabel as nib

    if sess.split_series:
        return _generate_split_session(spec, fields, n, sess, out_dir)
    legacy = is_legacy(spec)
    rng = np.random.default_rng([spec.seed, n])
    rendered = render_session(spec, sess, fields)
    images = synthesize(spec, rendered, rng)
    volumes, labels = truth_of(spec, rendered)
    # What the scanner records: the table moved the patient, so the anatomy's DICOM
    # coordinates move by the shift while the field of view stays at the isocentre.
    grid: Grid = dataclasses.replace(
        rendered["grid"], origin=rendered["grid"].origin + [0.0, 0.0, sess.table_shift_mm])
    date = dt.date.fromisoformat(spec.day0) + dt.timedelta(days=sess.day)
    study = _study_of(spec, sess, n, date)
    study_dir = out_dir / "dicom" / f"ST{n:04d}"
    for number, kind in ((3, "T1w"), (4, "STIR")):
        write_series(study_dir / f"SE{number:04d}", images[kind], grid, spec=spec, study=study,
                     series_number=number, kind=kind)
    label_path = out_dir / "truth" / f"ses-{study['date']}_truth_dseg.nii.gz"
    label_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.transpose(labels, (2, 1, 0)), _affine_ras(grid)), label_path)
    entry: dict[str, Any] = {
        "session": study["date"],
        "study_date": date.isoformat(),
        "day": sess.day,
        "params": _session_json(sess, legacy),
        "volumes_ml": volumes,
        "soft_tissue_asymmetry_pct": None if sess.affected_only else _asymmetry_pct(spec, volumes),
        "label_map": str(label_path.relative_to(out_dir)),
    }
    if not legacy:
        entry.update(_extra_truth(spec, rendered, volumes))
    return entry


def generate(spec: PhantomSpec, out_dir: Path) -> dict[str, Any]:
    """Write the DICOM studies, true label maps and ``truth.json`` of `spec` under `out_dir`.

    Layout: ``out_dir/dicom/STnnnn/SEnnnn/IMnnnnn`` (a PACS-like export without extensions),
    ``out_dir/truth/ses-YYYYMMDD_truth_dseg.nii.gz`` and ``out_dir/truth.json``.
    """
    out_dir = Path(out_dir)
    fields = _fields(spec)
    sessions_truth = [_generate_session(spec, fields, n, sess, out_dir)
                      for n, sess in enumerate(spec.sessions, start=1)]
    _carried_truth(spec, sessions_truth)
    truth: dict[str, Any] = {
        "subject": spec.subject,
        "day0": spec.day0,
        "affected_side": spec.affected_side,
        "sides": list(spec.sides),
        "sessions": sessions_truth,
        "spec": _spec_json(spec),
        "generator": f"limbtrack {__version__} pipeline.validation.phantom",
        "note": "Volumes are exact on the acquisition grid: sums of supersampled partial-volume "
        f"fractions ({spec.supersample_xy}x{spec.supersample_xy}x{spec.supersample_z} samples "
        "per voxel). Label maps are the majority tissue class per voxel.",
    }
    if not is_legacy(spec):
        truth["note"] += (
            " Per session: fov_clipped_sides (limbs reaching an in-plane image edge), "
            "volumes_ml_unclipped (before in-plane clipping of the field of view), "
            "signal_void_slices (coil-edge slices, indices in LPS z ascending order, 0 = most "
            "inferior) and volumes_ml_valid (over the other slices). A session of the "
            "affected limb alone (params.affected_only) has its soft_tissue_asymmetry_pct "
            "against the contralateral limb of contralateral_truth_session, the nearest session "
            "holding both limbs (the phantom's contralateral limb does not change)."
        )
    if any(s.split_series for s in spec.sessions):
        truth["note"] += (
            " A split session (params.split_series) holds each leg in its own series "
            "(``series``: number, kind, side imaged, Laterality tag and description written, "
            "grid, gain, x range in mm): its volumes_ml are exact on each leg's own series "
            "grid over the slab common to the session's series, volumes_ml_series over each "
            "whole series; its label map lies on a grid holding both legs (the left series' "
            "lattice, else the right's), each leg inside its own series' field of view."
        )
    write_json_atomic(out_dir / "truth.json", truth)
    return truth


def _affine_ras(grid: Grid) -> NDArray[np.float64]:
    """NIfTI (RAS) affine of an array stored as [x, y, z] on `grid`."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    aff = np.eye(4)
    aff[:3, 0] = lps_to_ras @ grid.row_dir * grid.pixel_mm
    aff[:3, 1] = lps_to_ras @ grid.col_dir * grid.pixel_mm
    aff[:3, 2] = lps_to_ras @ grid.normal * grid.slice_mm
    aff[:3, 3] = lps_to_ras @ grid.origin
    return aff


def _spec_json(spec: PhantomSpec) -> dict[str, Any]:
    """The spec as JSON; options added later are left out of a legacy spec (byte identity)."""
    legacy = is_legacy(spec)
    d = dataclasses.asdict(spec)
    if legacy:
        for k in _NEW_SPEC_DEFAULTS:
            d.pop(k)
    if not any(s.split_series for s in spec.sessions):
        for k in _SPLIT_SPEC_KEYS:
            d.pop(k)
    d["sessions"] = [_session_json(s, legacy) for s in spec.sessions]
    return d


def _session_json(sess: SessionSpec, legacy: bool) -> dict[str, Any]:
    """A session's parameters as JSON; `split_series` only where it is set (a phantom made
    before the split layout keeps its truth.json)."""
    d = dataclasses.asdict(sess)
    if legacy:
        for k in _NEW_SESSION_DEFAULTS:
            d.pop(k)
    elif not sess.split_series:
        d.pop("split_series")
    return d


def _extra_truth(spec: PhantomSpec, rendered: dict[str, Any], volumes: dict[str, Any]
                 ) -> dict[str, Any]:
    """Truth of the newer options for one session: clipped sides, volumes before clipping,
    void slices (LPS z ascending indices) and volumes over the valid slices (mL)."""
    grid: Grid = rendered["grid"]
    unclipped = volumes
    if "unclipped" in rendered:
        unclipped = truth_of(spec, rendered["unclipped"])[0]
    void: dict[int, float] = rendered.get("void_slices", {})
    valid_volumes = volumes
    if void:
        keep = [k for k in range(grid.shape_zyx[0]) if k not in void]
        nz, ny, nx = grid.shape_zyx
        valid = {"grid": dataclasses.replace(grid, shape_zyx=(len(keep), ny, nx)),
                 "fractions": rendered["fractions"][:, keep]}
        valid_volumes = truth_of(spec, valid)[0]
    return {
        "fov_clipped_sides": clipped_sides(rendered),
        "volumes_ml_unclipped": unclipped,
        "signal_void_slices": void_slices_z_ascending(grid, void),
        "volumes_ml_valid": valid_volumes,
    }


def parse_sessions(text: str) -> tuple[SessionSpec, ...]:
    """Parse ``DAY:SWELLING:LESION_ML:EDEMA[:SHIFT_MM[:SLICES]],...`` into session specs."""
    out = []
    for item in text.split(","):
        parts = [p for p in item.strip().split(":")]
        if not 1 <= len(parts) <= 6:
            raise ValueError(f"cannot parse session {item!r}: want DAY:SWELLING:LESION_ML:EDEMA")
        vals = [float(p) for p in parts] + [0.0] * (6 - len(parts))
        out.append(SessionSpec(day=int(vals[0]), swelling=vals[1], lesion_ml=vals[2],
                               edema=vals[3], table_shift_mm=vals[4], n_slices=int(vals[5])))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="limbtrack phantom",
        description="Write a serial bilateral leg MRI phantom (DICOM; thigh, knee or calf) "
        "with exact ground truth.",
    )
    d = PhantomSpec()
    p.add_argument("out_dir", type=Path)
    p.add_argument("--subject", default=d.subject)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--day0", default=d.day0, help="infusion date YYYY-MM-DD")
    p.add_argument("--affected-side", choices=["left", "right"], default=d.affected_side)
    p.add_argument(
        "--sides",
        default="both",
        choices=["both", "left", "right"],
        help="limbs in the field of view",
    )
    p.add_argument(
        "--sessions",
        default=None,
        help="DAY:SWELLING:LESION_ML:EDEMA[:TABLE_SHIFT_MM[:SLICES]],... "
        "(default: the demo patient's five visits)",
    )
    p.add_argument("--leg-radius-mm", type=float, default=d.leg_radius_mm)
    p.add_argument("--bone-radius-mm", type=float, default=d.bone_radius_mm,
                   help="femur outer radius in the diaphysis")
    p.add_argument("--cortex-mm", type=float, default=d.cortex_mm)
    p.add_argument("--supersample", default=f"{d.supersample_xy}x{d.supersample_z}",
                   help="samples per voxel: IN_PLANExTHROUGH_PLANE (truth accuracy vs time)")
    p.add_argument(
        "--gap-mm",
        type=float,
        default=d.gap_mm,
        help="gap between the thighs; 0 or negative: touching",
    )
    p.add_argument(
        "--lesion-z",
        type=float,
        default=d.lesion_z_fraction,
        help="lesion centre as a fraction of the covered length, 0 distal - 1 proximal",
    )
    p.add_argument("--pixel-mm", type=float, default=d.pixel_mm)
    p.add_argument("--slice-mm", type=float, default=d.slice_mm)
    p.add_argument("--slices", type=int, default=d.n_slices)
    p.add_argument("--matrix", default=f"{d.matrix[0]}x{d.matrix[1]}", help="COLUMNSxROWS")
    p.add_argument("--position", choices=sorted(POSITION_IOP), default=d.position)
    p.add_argument(
        "--slice-order", choices=["ascending", "descending", "interleaved"], default=d.slice_order
    )
    p.add_argument("--snr-t1", type=float, default=d.snr_t1)
    p.add_argument("--snr-stir", type=float, default=d.snr_stir)
    p.add_argument("--bias", type=float, default=d.bias, help="peak-to-peak bias, 0.2 = 20 %%")
    p.add_argument("--region", choices=list(REGIONS), default=d.region,
                   help="thigh (femur), knee (femur, patella, tibia, fibular head) or calf "
                   "(tibia and fibula); the lesion lies in the femur, or the tibia for the calf")
    p.add_argument("--vessels", action=argparse.BooleanOptionalAction, default=None,
                   help="deep artery and vein of each leg (default: on for knee and calf)")
    p.add_argument("--growth-plates", action="store_true",
                   help="a child's physes (2 mm) in femur and tibia near the knee, red marrow "
                   "in the metaphyses")
    p.add_argument("--stir-fat-suppressed", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-stir-fat-suppressed: fat bright on the fluid series (T2 without "
                   "fat saturation)")
    p.add_argument("--t1-like", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-t1-like: the anatomical series gets STIR-like contrast")
    p.add_argument("--fov-clip", action="append", default=[], metavar="SESSION:MM[:SIDE]",
                   help="narrow the in-plane field of view of session SESSION (1-based, or "
                   "'all') so that MM mm of the lateral side of SIDE (affected, contralateral, "
                   "left, right, both; default affected) are cut off; repeatable")
    p.add_argument("--affected-only", default="", metavar="N[,N...]",
                   help="sessions (1-based) that hold the affected limb alone: a follow-up "
                   "of the affected leg in its own field of view")
    p.add_argument("--void-slices", action="append", default=[], metavar="SESSION:N[:END]",
                   help="coil-edge signal loss on N end slices of session SESSION (1-based, or "
                   "'all'); END inferior, superior or both (default); repeatable")
    _add_split_arguments(p, d)
    return p


def _add_split_arguments(p: argparse.ArgumentParser, d: PhantomSpec) -> None:
    """Options of the split layout (one series per leg)."""
    p.add_argument("--split-series", nargs="?", const="all", default="", metavar="N[,N...]",
                   help="sessions (1-based; no value: all) whose study holds each leg in its "
                   "own T1 and STIR series, each field of view centred on its leg")
    p.add_argument("--split-fov-factor", type=float, default=d.split_fov_factor,
                   help="one-leg field of view / the leg's nominal diameter")
    p.add_argument("--split-right-pixel-mm", type=float, default=d.split_right_pixel_mm,
                   help="pixel size of the right leg's series (0: as --pixel-mm)")
    p.add_argument("--split-right-offset-mm", default="0,0", metavar="X[,Y]",
                   help="move the right leg's field of view (LPS mm; a fraction of a pixel "
                   "puts its grid off the left one's)")
    p.add_argument("--split-right-extra-slices", type=int, default=d.split_right_extra_slices,
                   help="more (negative: fewer) slices in the right leg's series; even")
    p.add_argument("--split-right-gain", type=float, default=d.split_right_gain,
                   help="receive-coil scale of the right leg's series (stored values x gain)")
    p.add_argument("--split-wrong-laterality", default="", metavar="SIDE[:KIND]",
                   help="give that leg's series (or only its T1w / STIR one) the other side's "
                   "Laterality tag and description")


def _session_overrides(sessions: tuple[SessionSpec, ...], items: Sequence[str],
                       fields_: tuple[str, str], convert: Any) -> tuple[SessionSpec, ...]:
    """Apply ``SESSION:VALUE[:WHICH]`` items to the named pair of SessionSpec fields."""
    out = list(sessions)
    for item in items:
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"cannot parse {item!r}: want SESSION:VALUE[:WHICH]")
        if parts[0] == "all":
            targets = range(len(out))
        else:
            i = int(parts[0]) - 1
            if not 0 <= i < len(out):
                raise ValueError(f"{item!r}: there is no session {parts[0]} (1..{len(out)})")
            targets = range(i, i + 1)
        for i in targets:
            kw: dict[str, Any] = {fields_[0]: convert(parts[1])}
            if len(parts) == 3:
                kw[fields_[1]] = parts[2]
            out[i] = dataclasses.replace(out[i], **kw)
    return tuple(out)


def _session_numbers(text: str, n_sessions: int, option: str) -> set[int]:
    """Session numbers (1-based) of ``N[,N...]`` or ``all``."""
    if text.strip() == "all":
        return set(range(1, n_sessions + 1))
    chosen = {int(n) for n in text.split(",") if n.strip()}
    if chosen - set(range(1, n_sessions + 1)):
        raise ValueError(f"{option} {text}: sessions are 1..{n_sessions}")
    return chosen


def _offset_mm(text: str) -> tuple[float, float]:
    """``X[,Y]`` in mm (Y defaults to 0)."""
    vals = [float(v) for v in text.split(",")]
    if not 1 <= len(vals) <= 2:
        raise ValueError(f"cannot parse offset {text!r}: want X[,Y] in mm")
    return (vals[0], vals[1] if len(vals) == 2 else 0.0)


def spec_from_args(args: argparse.Namespace) -> PhantomSpec:
    nx, ny = (int(v) for v in args.matrix.lower().split("x"))
    sides = ("right", "left") if args.sides == "both" else (args.sides,)
    kwargs: dict[str, Any] = dict(
        subject=args.subject,
        seed=args.seed,
        day0=args.day0,
        affected_side=args.affected_side,
        sides=sides,
        leg_radius_mm=args.leg_radius_mm,
        bone_radius_mm=args.bone_radius_mm,
        cortex_mm=args.cortex_mm,
        supersample_xy=int(args.supersample.lower().split("x")[0]),
        supersample_z=int(args.supersample.lower().split("x")[1]),
        gap_mm=args.gap_mm,
        lesion_z_fraction=args.lesion_z,
        pixel_mm=args.pixel_mm,
        slice_mm=args.slice_mm,
        n_slices=args.slices,
        matrix=(nx, ny),
        position=args.position,
        slice_order=args.slice_order,
        snr_t1=args.snr_t1,
        snr_stir=args.snr_stir,
        bias=args.bias,
        region=args.region,
        vessels=args.vessels,
        growth_plates=args.growth_plates,
        stir_fat_suppressed=args.stir_fat_suppressed,
        t1_like=args.t1_like,
        split_fov_factor=args.split_fov_factor,
        split_right_pixel_mm=args.split_right_pixel_mm,
        split_right_offset_mm=_offset_mm(args.split_right_offset_mm),
        split_right_extra_slices=args.split_right_extra_slices,
        split_right_gain=args.split_right_gain,
        split_wrong_laterality=args.split_wrong_laterality,
    )
    sessions = parse_sessions(args.sessions) if args.sessions else DEFAULT_SESSIONS
    sessions = _session_overrides(sessions, args.fov_clip, ("fov_clip_mm", "fov_clip_side"),
                                  float)
    sessions = _session_overrides(sessions, args.void_slices,
                                  ("signal_void_slices", "signal_void_end"), int)
    for flag, text in (("affected_only", args.affected_only), ("split_series", args.split_series)):
        chosen = _session_numbers(text, len(sessions), "--" + flag.replace("_", "-"))
        set_flag: dict[str, Any] = {flag: True}
        sessions = tuple(dataclasses.replace(s, **set_flag) if n in chosen else s
                         for n, s in enumerate(sessions, start=1))
    kwargs["sessions"] = sessions
    return PhantomSpec(**kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = spec_from_args(args)
    truth = generate(spec, args.out_dir)
    for s in truth["sessions"]:
        v = s["volumes_ml"][spec.affected_side]
        print(
            f"{s['study_date']} day {s['day']:>4}: {spec.affected_side} limb {v['limb']:.1f} mL, "
            f"lesion {v['marrow_lesion']:.2f} mL, edema {v['edema']:.1f} mL, "
            f"asymmetry {s['soft_tissue_asymmetry_pct']} %"
        )
    digest = hashlib.sha256(json.dumps(truth, sort_keys=True).encode()).hexdigest()[:12]
    print(f"wrote {args.out_dir} (truth digest {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def to_sitk(array_zyx: NDArray[Any], grid: Grid) -> Any:
    """A SimpleITK image of `array_zyx` carrying `grid`'s LPS geometry (for tests and tools)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.SetOrigin(tuple(float(v) for v in grid.origin))
    img.SetSpacing((grid.pixel_mm, grid.pixel_mm, grid.slice_mm))
    img.SetDirection(
        tuple(float(v) for v in np.column_stack([grid.row_dir, grid.col_dir, grid.normal]).ravel())
    )
    return img
