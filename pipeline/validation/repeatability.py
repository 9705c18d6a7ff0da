"""Scan-rescan repeatability study: the data behind :mod:`pipeline.uncertainty`.

Every case is one subject imaged in several sessions of the **same anatomy with no true
change** (a marrow lesion, edema or a swelling may be there, but the same at every session),
run through the whole workflow by its command-line contract (Snakemake on the case's input,
as an outside user would). Each later session against the baseline (the first) gives one
:class:`~pipeline.uncertainty.Pair` per side and structure: the two volumes of ``volumes.tsv``
and their drivers (pixel and slice size, residual misregistration) from ``side.json``
``sessions[]``. Volumes the workflow leaves ``n/a`` (QC exclusion) give no pair.

Sources
-------
* **phantom** (:data:`PHANTOM_CASES`): :mod:`pipeline.validation.phantom`
  subjects (thigh, calf, knee;
  1.0-2.2 mm pixels, 3-7 mm slices). Sessions differ by the noise (the phantom draws it per
  session), by a table shift along z that is not a multiple of the slice thickness (other
  slice positions: the anatomy is cut elsewhere), and by an in-plane bias ramp of random
  direction added to each session's DICOM pixel data (:func:`add_session_bias`; the phantom's
  own bias field, ``PhantomSpec.bias``, is one per subject and varies between subjects).
* **hybrid** (:data:`HYBRID_CASES`): real leg anatomy (:mod:`pipeline.validation.hybrid`)
  with the same
  inserted lesion and edema at every session; sessions repositioned (table shift, rotation
  about z, other voxel size and slice thickness), with new Rician noise and a bias ramp added
  per session (the source images are one acquisition, so without it only the resampling
  would differ).
* **real** (:data:`REAL_CASES`): the same-day rescans of healthy legs of
  :data:`pipeline.validation.realdata_eval.INVARIANT_CASES` whose follow-up is a usable image (no
  ``expect_flags``, and no contrast flag raised when run: :data:`EXCLUDING_FLAGS`) and not a
  bit-identical copy of the baseline.

``benchmarks/repeatability.py`` runs the study, fits the model and reports it; the pair table
(:data:`PAIR_COLUMNS`) is written so that fitting can be redone without running the workflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, Protocol

import numpy as np

from pipeline import uncertainty as unc
from pipeline.io.files import finite_float, read_tsv, write_tsv_atomic
from pipeline.labels import STRUCTURES
from pipeline.longitudinal import Thresholds, Visit, assess, swelling_change
from pipeline.validation.phantom import PhantomSpec, SessionSpec, generate

#: QC codes that leave a real same-day rescan out of the study (its follow-up is not an image
#: the method is meant for); phantom and hybrid cases only lose the values the workflow
#: leaves n/a.
EXCLUDING_FLAGS: Final = frozenset({"anatomical_not_t1_like", "fluid_not_fat_suppressed"})
#: Structures whose repeatability is also reported in percent of the volume.
BULK: Final = ("limb", "soft_tissue", "bone")
ROLES: Final = ("affected", "contralateral")

PAIR_COLUMNS: Final = (
    "case", "source", "region", "side", "role", "structure", "session1", "session2",
    "volume1_ml", "pixel1_mm", "slice1_mm", "misregistration1_mm",
    "volume2_ml", "pixel2_mm", "slice2_mm", "misregistration2_mm",
)


# --------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRecord:
    """One scan-rescan pair with where it came from."""

    case: str
    source: str
    region: str
    side: str
    role: str
    structure: str
    session1: str
    session2: str
    first: unc.Drivers
    second: unc.Drivers

    @property
    def pair(self) -> unc.Pair:
        return unc.Pair(self.structure, self.first, self.second)

    @property
    def difference_ml(self) -> float:
        return self.second.volume_ml - self.first.volume_ml

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in PAIR_COLUMNS[:8]}
        for n, d in (("1", self.first), ("2", self.second)):
            out[f"volume{n}_ml"] = d.volume_ml
            out[f"pixel{n}_mm"] = d.pixel_mm
            out[f"slice{n}_mm"] = d.slice_mm
            out[f"misregistration{n}_mm"] = d.misregistration_mm
        return out

    @classmethod
    def from_row(cls, row: Mapping[str, str]) -> PairRecord:
        def drivers(n: str) -> unc.Drivers:
            return unc.Drivers(float(row[f"volume{n}_ml"]), float(row[f"pixel{n}_mm"]),
                               float(row[f"slice{n}_mm"]), float(row[f"misregistration{n}_mm"]))

        return cls(row["case"], row["source"], row["region"], row["side"], row["role"],
                   row["structure"], row["session1"], row["session2"], drivers("1"),
                   drivers("2"))


def write_pairs(path: str | Path, records: Iterable[PairRecord]) -> None:
    write_tsv_atomic(path, (r.row() for r in records), PAIR_COLUMNS)


def read_pairs(path: str | Path) -> list[PairRecord]:
    return [PairRecord.from_row(r) for r in read_tsv(path)]


def pairs_from_results(subject_dir: str | Path, case: str, source: str, region: str = ""
                       ) -> list[PairRecord]:
    """The pairs of a workflow result: every later session against the baseline, per side
    and structure, where both volumes were measured.

    Parameters
    ----------
    subject_dir : path
        ``<results_dir>/<subject>`` holding ``volumes.tsv`` and ``side.json``.
    case, source, region : str
        Recorded with each pair.
    """
    subject_dir = Path(subject_dir)
    side_json = json.loads((subject_dir / "side.json").read_text(encoding="utf-8"))
    sessions = side_json["sessions"]
    if not sessions:
        return []
    by_label = {s["session"]: s for s in sessions}
    base = by_label.get(side_json.get("baseline_session") or "") or min(
        sessions, key=lambda s: (s["study_date"], s["session"]))
    volumes: dict[tuple[str, str, str], float | None] = {}
    roles: dict[str, str] = {}
    for r in read_tsv(subject_dir / "volumes.tsv"):
        volumes[(r["study_date"], r["side"], r["structure"])] = finite_float(r["volume_ml"])
        roles[r["side"]] = r["role"]

    def drivers(s: Mapping[str, Any], side: str, structure: str) -> unc.Drivers | None:
        v = volumes.get((s["study_date"], side, structure))
        if v is None:
            return None
        return unc.Drivers(v, float(s["pixel_mm"]), float(s["slice_mm"]),
                           float(s.get("misregistration_mm") or 0.0))

    out = []
    for s in sorted(sessions, key=lambda s: (s["study_date"], s["session"])):
        if s is base:
            continue
        for side in sorted(roles, key=lambda sd: ROLES.index(roles[sd])):
            for structure in STRUCTURES:
                d1, d2 = drivers(base, side, structure), drivers(s, side, structure)
                if d1 is None or d2 is None:
                    continue
                out.append(PairRecord(case, source, region, side, roles[side], structure,
                                      base["session"], s["session"], d1, d2))
    return out


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInput:
    """What the workflow is run on: the input folder or sessions sheet and its settings."""

    input_dir: Path
    subject: str
    day0: str
    affected_side: str


class StudyCase(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def region(self) -> str: ...

    def geometry(self) -> dict[str, Any]: ...

    def write(self, case_dir: Path, realdata: str | Path | None = None) -> RunInput: ...


def subject_id(name: str) -> str:
    """A workflow subject id (letters and digits) from a case name."""
    return re.sub(r"[^A-Za-z0-9]", "", name)[:32] or "case"


def _ramp(shape: tuple[int, int], angle_rad: float, peak_to_peak: float) -> np.ndarray:
    """Multiplicative in-plane ramp over a (rows, columns) image: 1 +- peak_to_peak / 2."""
    rows, cols = shape
    j, i = np.meshgrid(np.linspace(-0.5, 0.5, rows), np.linspace(-0.5, 0.5, cols),
                       indexing="ij")
    g = math.cos(angle_rad) * i + math.sin(angle_rad) * j
    g = g / max(float(np.ptp(g)), 1e-9)
    return 1.0 + peak_to_peak * g


def add_session_bias(study_dir: Path, peak_to_peak: float, seed: Sequence[int]) -> float:
    """Multiply every image of a phantom study folder (``STnnnn``) by one in-plane ramp of
    random direction (the same for all its series, as one coil would); returns the angle (deg).
    """
    import pydicom

    angle = float(np.random.default_rng(list(seed)).uniform(0.0, 2.0 * math.pi))
    if peak_to_peak <= 0:
        return 0.0
    for path in sorted(p for p in study_dir.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float64)
        top = (1 << int(ds.BitsStored)) - 1
        out = np.clip(np.round(arr * _ramp(arr.shape, angle, peak_to_peak)), 0, top)
        ds.PixelData = np.ascontiguousarray(out.astype(np.uint16)).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return math.degrees(angle)


@dataclass(frozen=True)
class PhantomCase:
    """A phantom subject scanned repeatedly without change (see the module docstring).

    ``shifts_mm`` holds one table shift per session (the first is the baseline); lesion,
    edema and swelling are the same at every session.
    """

    name: str
    region: str
    pixel_mm: float
    slice_mm: float
    n_slices: int
    matrix: tuple[int, int]
    shifts_mm: tuple[float, ...]
    lesion_ml: float = 0.0
    edema: float = 0.0
    swelling: float = 0.0
    bias: float = 0.2
    session_bias: float = 0.1
    leg_radius_mm: float = 52.0
    bone_radius_mm: float = 9.5
    cortex_mm: float = 2.6
    gap_mm: float = 14.0
    snr_t1: float = 25.0
    snr_stir: float = 10.0
    affected_side: str = "left"
    position: str = "HFS"
    growth_plates: bool = False
    seed: int = 0
    supersample: tuple[int, int] = (3, 3)

    source: ClassVar[str] = "phantom"

    def spec(self) -> PhantomSpec:
        return PhantomSpec(
            subject=subject_id(self.name), seed=self.seed, affected_side=self.affected_side,
            sessions=tuple(SessionSpec(day=n, swelling=self.swelling, lesion_ml=self.lesion_ml,
                                       edema=self.edema, table_shift_mm=shift)
                           for n, shift in enumerate(self.shifts_mm)),
            leg_radius_mm=self.leg_radius_mm, gap_mm=self.gap_mm,
            bone_radius_mm=self.bone_radius_mm, cortex_mm=self.cortex_mm,
            pixel_mm=self.pixel_mm, slice_mm=self.slice_mm, n_slices=self.n_slices,
            matrix=self.matrix, position=self.position, snr_t1=self.snr_t1,
            snr_stir=self.snr_stir, bias=self.bias, supersample_xy=self.supersample[0],
            supersample_z=self.supersample[1], region=self.region,
            growth_plates=self.growth_plates)

    def geometry(self) -> dict[str, Any]:
        return {"region": self.region, "pixel_mm": self.pixel_mm, "slice_mm": self.slice_mm,
                "n_slices": self.n_slices, "matrix": list(self.matrix),
                "sessions": len(self.shifts_mm), "table_shifts_mm": list(self.shifts_mm),
                "lesion_ml": self.lesion_ml, "edema": self.edema, "swelling": self.swelling,
                "bias": self.bias, "session_bias": self.session_bias,
                "leg_radius_mm": self.leg_radius_mm, "snr": [self.snr_t1, self.snr_stir],
                "position": self.position, "seed": self.seed}

    def write(self, case_dir: Path, realdata: str | Path | None = None) -> RunInput:
        spec = self.spec()
        truth = generate(spec, case_dir)
        angles = [add_session_bias(case_dir / "dicom" / f"ST{n:04d}", self.session_bias,
                                   (self.seed, n, 1))
                  for n in range(1, len(self.shifts_mm) + 1)]
        (case_dir / "session_bias.json").write_text(json.dumps(
            {"peak_to_peak": self.session_bias, "angle_deg": angles}), encoding="utf-8")
        return RunInput(case_dir / "dicom", spec.subject, truth["day0"], self.affected_side)



def _noise_sd(image: np.ndarray) -> float:
    """Noise sd from neighbour differences along the first axis inside the signal (robust)."""
    fg = image > 0.25 * float(np.percentile(image[image > 0], 75)) if (image > 0).any() else \
        np.zeros(image.shape, dtype=bool)
    d = (image[1:] - image[:-1])[fg[1:] & fg[:-1]]
    if d.size < 10:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def add_session_noise(path: Path, gain: float, bias_pp: float, seed: Sequence[int]) -> None:
    """Re-acquire a written NIfTI image: multiply by an in-plane bias ramp of random direction
    and add Rician noise of ``gain`` times the image's own noise sd (voxels outside the
    source's field of view, exactly zero, stay zero)."""
    import nibabel as nib

    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image):
        raise ValueError(f"{path}: not a NIfTI-1 image")
    arr = np.asarray(img.dataobj, dtype=np.float64)  # (x, y, z)
    rng = np.random.default_rng(list(seed))
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    inside = arr != 0
    ramp = _ramp((arr.shape[1], arr.shape[0]), angle, bias_pp).T[:, :, None]
    sd = gain * _noise_sd(arr)
    noisy = np.hypot(arr * ramp + rng.normal(0.0, sd, arr.shape), rng.normal(0.0, sd, arr.shape))
    out = np.where(inside, noisy, 0.0).astype(np.float32)
    new = nib.Nifti1Image(out, img.affine, img.header)
    nib.save(new, str(path))


@dataclass(frozen=True)
class HybridRescan:
    """Real anatomy with the same inserted lesion and edema, repositioned per session."""

    name: str
    region: Literal["thigh", "calf"]
    sessions: tuple[Any, ...]  # pipeline.validation.hybrid.HybridSession, the first is the baseline
    affected_side: str
    seed: int = 0
    crop_slices: tuple[int, int] | None = None
    noise_gain: float = 0.7
    session_bias: float = 0.1
    t1_fat_gain: float = 1.8

    source: ClassVar[str] = "hybrid"

    def geometry(self) -> dict[str, Any]:
        return {"region": self.region, "crop_slices": self.crop_slices,
                "sessions": [dataclasses.asdict(s) for s in self.sessions],
                "noise_gain": self.noise_gain, "session_bias": self.session_bias,
                "seed": self.seed}

    def write(self, case_dir: Path, realdata: str | Path | None = None) -> RunInput:
        from pipeline.validation import hybrid

        subject = subject_id(self.name)
        truth = hybrid.make_case(self.region, case_dir, self.sessions, self.affected_side,
                                 subject=subject, seed=self.seed, t1_fat_gain=self.t1_fat_gain,
                                 crop_slices=self.crop_slices, realdata=realdata,
                                 name=self.name)
        for n, s in enumerate(truth["sessions"]):
            for k, role in enumerate(("t1", "fluid")):
                add_session_noise(case_dir / s[role], self.noise_gain, self.session_bias,
                                  (self.seed, n, k))
        return RunInput(case_dir / "sessions.tsv", subject, truth["day0"], self.affected_side)


@dataclass(frozen=True)
class RealPairCase:
    """A same-day rescan of healthy legs
    (:data:`pipeline.validation.realdata_eval.INVARIANT_CASES`)."""

    name: str

    source: ClassVar[str] = "real"

    @property
    def invariant(self) -> Any:
        from pipeline.validation.realdata_eval import INVARIANT_CASES

        return next(c for c in INVARIANT_CASES if c.name == self.name)

    @property
    def region(self) -> str:
        return str(self.invariant.region)

    def geometry(self) -> dict[str, Any]:
        c = self.invariant
        return {"region": c.region, "follow_up_t1": c.follow_up_t1, "moved": c.moved}

    def write(self, case_dir: Path, realdata: str | Path | None = None) -> RunInput:
        from pipeline.validation.realdata_eval import write_invariant_case

        info = write_invariant_case(self.invariant, case_dir, realdata)
        # "left" as in benchmarks/realdata_legs.py: healthy legs have no affected side
        return RunInput(case_dir / "sessions.tsv", info["subject"], info["day0"], "left")


def usable_real_cases() -> tuple[RealPairCase, ...]:
    """Invariant cases that are rescans: a usable follow-up image (no expected exclusion
    flag) that is not the baseline's images again (those give differences of exactly 0)."""
    from pipeline.validation.realdata_eval import INVARIANT_CASES

    return tuple(RealPairCase(c.name) for c in INVARIANT_CASES
                 if not c.expect_flags and (c.follow_up_t1 != "in_phase" or c.moved))


#: The phantom subjects: regions, pixel 1.0-2.2 mm, slice 3-7 mm, 4-5 sessions each, lesion
#: 2-8 mL with edema in some, nothing in others; images <= 160 x 120 x 30.
PHANTOM_CASES: Final[tuple[PhantomCase, ...]] = (
    PhantomCase("ph_thigh_fine", "thigh", 1.0, 3.0, 30, (160, 112), (0.0, 4.2, -7.1, 1.3, -3.6),
                lesion_ml=2.0, edema=0.3, leg_radius_mm=32.0, bone_radius_mm=7.0,
                cortex_mm=2.0, gap_mm=8.0, bias=0.15, seed=101),
    PhantomCase("ph_thigh_mid", "thigh", 1.4, 5.0, 22, (160, 112), (0.0, 5.4, -8.7, 2.7, -6.2),
                lesion_ml=5.0, edema=0.5, leg_radius_mm=42.0, bone_radius_mm=9.0, gap_mm=12.0,
                bias=0.3, seed=102),
    PhantomCase("ph_thigh_coarse", "thigh", 2.2, 7.0, 16, (128, 96), (0.0, 5.6, -8.1, 2.3),
                lesion_ml=8.0, edema=0.7, leg_radius_mm=55.0, bone_radius_mm=11.0,
                snr_t1=15.0, snr_stir=7.0, bias=0.2, seed=103),
    PhantomCase("ph_thigh_control", "thigh", 1.8, 6.0, 18, (144, 108), (0.0, 3.8, -6.9, 8.6, -2.2),
                leg_radius_mm=50.0, bias=0.35, affected_side="right", seed=104),
    PhantomCase("ph_thigh_swollen", "thigh", 1.6, 4.5, 22, (160, 120), (0.0, 5.3, -8.0, 1.4),
                lesion_ml=4.0, edema=0.6, swelling=0.1, leg_radius_mm=48.0, position="FFS",
                bias=0.25, affected_side="right", seed=105),
    PhantomCase("ph_calf_fine", "calf", 1.2, 4.0, 26, (160, 120), (0.0, 5.6, -2.3, 3.7, -7.4),
                lesion_ml=3.0, edema=0.4, leg_radius_mm=52.0, bias=0.2, seed=106),
    PhantomCase("ph_calf_coarse", "calf", 2.0, 6.0, 18, (128, 96), (0.0, 5.3, -8.2, 1.8),
                leg_radius_mm=56.0, bias=0.3, snr_t1=18.0, snr_stir=8.0, seed=107),
    PhantomCase("ph_calf_lesion", "calf", 1.6, 5.0, 20, (144, 108), (0.0, 6.7, -1.6, 4.1),
                lesion_ml=6.0, edema=0.8, leg_radius_mm=54.0, position="HFP", bias=0.1,
                affected_side="right", seed=108),
    PhantomCase("ph_knee_mid", "knee", 1.6, 4.0, 26, (144, 108), (0.0, 3.3, -6.7, 1.7, -3.0),
                lesion_ml=2.5, edema=0.3, leg_radius_mm=44.0, bias=0.2, seed=109),
    PhantomCase("ph_knee_child", "knee", 1.0, 3.0, 30, (160, 120), (0.0, 5.6, -8.6, 2.2),
                leg_radius_mm=34.0, bone_radius_mm=7.0, cortex_mm=2.0, gap_mm=10.0,
                growth_plates=True, bias=0.25, seed=110),
)


def _hybrid_cases() -> tuple[HybridRescan, ...]:
    """Every session, the baseline too, is resampled onto a moved grid: the interpolation
    smooths the source's noise, and a baseline left on the source grid would be the one
    session with the source's noise texture."""
    from pipeline.validation.hybrid import HybridSession as S

    return (
        HybridRescan("hy_thigh", "thigh", (
            S(0, lesion_ml=3.0, edema_ml=20.0, table_shift_mm=1.2, rotation_deg=0.5),
            S(1, lesion_ml=3.0, edema_ml=20.0, table_shift_mm=3.0, rotation_deg=1.5),
            S(2, lesion_ml=3.0, edema_ml=20.0, table_shift_mm=-2.0, rotation_deg=-2.5,
              grid_spacing_mm=(1.0, 1.0, 20.0)),
            S(3, lesion_ml=3.0, edema_ml=20.0, table_shift_mm=4.5, rotation_deg=2.0,
              grid_spacing_mm=(0.9, 0.9, 20.0)),
        ), "left", seed=21),
        HybridRescan("hy_calf", "calf", (
            S(0, lesion_ml=2.5, edema_ml=15.0, table_shift_mm=1.3, rotation_deg=-0.5),
            S(1, lesion_ml=2.5, edema_ml=15.0, table_shift_mm=3.7, rotation_deg=1.5),
            S(2, lesion_ml=2.5, edema_ml=15.0, table_shift_mm=-6.2, rotation_deg=-2.0,
              grid_spacing_mm=(1.0, 1.0, 4.0)),
            S(3, lesion_ml=2.5, edema_ml=15.0, table_shift_mm=8.1, rotation_deg=3.0,
              grid_spacing_mm=(1.1, 1.1, 6.0)),
        ), "right", seed=22, crop_slices=(16, 64), t1_fat_gain=2.5),
        HybridRescan("hy_calf_control", "calf", (
            S(0, table_shift_mm=-1.1, rotation_deg=0.5),
            S(1, table_shift_mm=-4.4, rotation_deg=-1.0, grid_spacing_mm=(0.9, 0.9, 5.0)),
            S(2, table_shift_mm=6.6, rotation_deg=2.5, grid_spacing_mm=(1.2, 1.2, 3.0)),
        ), "left", seed=23, crop_slices=(20, 60), t1_fat_gain=2.5),
    )


def hybrid_cases() -> tuple[HybridRescan, ...]:
    """The hybrid subjects: thigh (2 cm slices of the source) and calf, 3-4 sessions each."""
    return _hybrid_cases()


#: Names of the cases of ``--quick`` (one of each kind, small).
QUICK: Final = ("ph_thigh_mid", "ph_calf_coarse", "ph_knee_mid", "hy_calf_control",
                "calf_t1like_moved")


def all_cases(realdata_ok: bool = True) -> list[StudyCase]:
    """Every case of the study (hybrid and real ones only when the real data is there)."""
    cases: list[StudyCase] = list(PHANTOM_CASES)
    if realdata_ok:
        cases += list(hybrid_cases()) + list(usable_real_cases())
    return cases


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """What running one case gave."""

    name: str
    source: str
    region: str
    geometry: dict[str, Any]
    records: list[PairRecord] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    qc_codes: list[str] = field(default_factory=list)
    excluded: str = ""
    missing: int = 0  # side-structure-session values left n/a by the workflow
    reused: bool = False  # pairs read from an earlier run of the same case

    def provenance(self) -> dict[str, Any]:
        return {"case": self.name, "source": self.source, "region": self.region,
                "geometry": self.geometry, "n_pairs": len(self.records),
                "qc_codes": self.qc_codes, "excluded": self.excluded or None,
                "error": self.error or None}


def run_workflow(run: RunInput, results: Path, root: Path, python: str = sys.executable,
                 cores: int = 2, timeout_s: float | None = None) -> tuple[Path, float, str]:
    """Run the command-line contract up to ``volumes.tsv`` and ``side.json`` (the report
    is not needed here): (subject folder, seconds, error log tail or '')."""
    subject_dir = results / run.subject
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [python, "-m", "snakemake", "--cores", str(cores), "--quiet", "--forceall",
             "--config", f"input_dir={run.input_dir}", f"subject={run.subject}",
             f"day0={run.day0}", f"affected_side={run.affected_side}",
             f"results_dir={results}", "--", str(subject_dir / "volumes.tsv"),
             str(subject_dir / "side.json")],
            cwd=root, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return subject_dir, time.perf_counter() - start, f"timed out after {timeout_s} s"
    tail = "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:]
    return subject_dir, time.perf_counter() - start, tail


def run_case(case: StudyCase, work: Path, root: Path, python: str = sys.executable,
             realdata: str | Path | None = None, reuse: bool = True,
             log: Callable[[str], None] | None = None) -> CaseResult:
    """Write a case, run the workflow on it and collect its pairs.

    With ``reuse``, a case whose pairs were collected before (``work/cases/<case>/pairs.tsv``,
    with the same definition) is not run again.
    """
    case_dir = work / "cases" / case.name
    res = CaseResult(case.name, case.source, case.region, case.geometry())
    done = case_dir / "pairs.tsv"
    meta_path = case_dir / "result.json"
    geometry = json.loads(json.dumps(res.geometry))  # as stored: tuples become lists
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if reuse and done.is_file() and meta.get("geometry") == geometry:
        res.records, res.seconds = read_pairs(done), float(meta["seconds"])
        res.qc_codes, res.excluded = list(meta["qc_codes"]), str(meta["excluded"])
        res.missing = int(meta.get("missing", 0))
        res.reused = True
        return res
    if case_dir.exists():
        import shutil

        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    run = case.write(case_dir / "input", realdata)
    made = time.perf_counter() - t0
    subject_dir, seconds, err = run_workflow(run, work / "results", root, python)
    res.seconds = made + seconds
    if err:
        res.error = err
        return res
    side = json.loads((subject_dir / "side.json").read_text(encoding="utf-8"))
    res.qc_codes = sorted({f["code"] for f in side.get("qc_flags", [])})
    # a real rescan raising a contrast flag is not a rescan under the method's conditions and
    # is left out whole; elsewhere the workflow's own exclusions (n/a values) are skipped
    excluding = sorted(EXCLUDING_FLAGS & set(res.qc_codes)) if case.source == "real" else []
    if excluding:
        res.excluded = "QC flags " + ", ".join(excluding)
    else:
        res.records = pairs_from_results(subject_dir, case.name, case.source, case.region)
    n_sessions = len(side["sessions"])
    res.missing = max(0, 2 * len(STRUCTURES) * (n_sessions - 1) - len(res.records)) if (
        not excluding) else 0
    write_pairs(done, res.records)
    meta_path.write_text(json.dumps({"seconds": res.seconds, "qc_codes": res.qc_codes,
                                     "excluded": res.excluded, "missing": res.missing,
                                     "geometry": geometry}), encoding="utf-8")
    if log:
        log(f"{case.name}: {len(res.records)} pairs, {res.seconds:.0f} s"
            + (f" ({res.excluded})" if res.excluded else ""))
    return res


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------

SdFunction = Callable[[PairRecord], tuple[float | None, float | None]]


def within_sd(diffs: Sequence[float]) -> float | None:
    """Within-subject sd of paired differences: sqrt(mean(d**2) / 2)."""
    return math.sqrt(sum(d * d for d in diffs) / (2 * len(diffs))) if diffs else None


def model_sd(model: unc.RepeatabilityModel) -> SdFunction:
    """(sd of the first, sd of the second measurement) of a pair under `model`."""
    def sd(r: PairRecord) -> tuple[float | None, float | None]:
        return model.sd_ml(r.structure, r.first), model.sd_ml(r.structure, r.second)
    return sd


def leave_one_case_out(records: Sequence[PairRecord]) -> SdFunction:
    """sd of each pair's measurements from a model fitted on every other case."""
    cases = sorted({r.case for r in records})
    models = {c: unc.fit([r.pair for r in records if r.case != c]) for c in cases}

    def sd(r: PairRecord) -> tuple[float | None, float | None]:
        m = models[r.case]
        return m.sd_ml(r.structure, r.first), m.sd_ml(r.structure, r.second)
    return sd


def _median(values: Iterable[float]) -> float | None:
    v = list(values)
    return statistics.median(v) if v else None


def typical_drivers(records: Sequence[PairRecord], structure: str
                    ) -> tuple[unc.Drivers, unc.Drivers] | None:
    """A typical pair of a structure: median volume (of the non-empty ones), pixel, slice
    size and follow-up misregistration of its pairs; the baseline has no misregistration."""
    rs = [r for r in records if r.structure == structure]
    nonzero = [r for r in rs if r.first.volume_ml > 0]
    if not nonzero:
        return None
    v = _median(r.first.volume_ml for r in nonzero)
    px = _median(r.first.pixel_mm for r in rs)
    sl = _median(r.first.slice_mm for r in rs)
    mis = _median(r.second.misregistration_mm for r in rs)
    assert v is not None and px is not None and sl is not None and mis is not None
    return unc.Drivers(v, px, sl, 0.0), unc.Drivers(v, px, sl, mis)


def mdc95_of(model: unc.RepeatabilityModel, structure: str, first: unc.Drivers,
             second: unc.Drivers) -> float | None:
    """MDC95 (mL) of a change between two measurements of a structure."""
    return unc.mdc95(unc.difference_sd(model.sd_ml(structure, first),
                                       model.sd_ml(structure, second)))


def repeatability_rows(records: Sequence[PairRecord], model: unc.RepeatabilityModel,
                       group: Callable[[PairRecord], str] | None = None) -> list[dict[str, Any]]:
    """Per structure (and group): n pairs, mean volume, mean difference (follow-up minus
    baseline: a systematic offset, which the model counts as error), wSD, RC (mL; % for
    bulk structures), and the model's MDC95 at the group's typical geometry."""
    keyed: dict[tuple[str, str], list[PairRecord]] = defaultdict(list)
    for r in records:
        keyed[(r.structure, group(r) if group else "all")].append(r)
    rows = []
    for (structure, g), rs in sorted(keyed.items(), key=lambda kv: (
            STRUCTURES.index(kv[0][0]) if kv[0][0] in STRUCTURES else 99, kv[0][1])):
        mean_v = statistics.fmean(0.5 * (r.first.volume_ml + r.second.volume_ml) for r in rs)
        bulk = structure in BULK and mean_v > 0
        diffs = [r.difference_ml for r in rs]
        mean_d = statistics.fmean(diffs)
        wsd = within_sd(diffs)
        rc = None if wsd is None else unc.repeatability_coefficient(wsd)
        typ = typical_drivers(rs, structure)
        mdc = None if typ is None else mdc95_of(model, structure, *typ)
        rows.append({
            "structure": structure, "group": g, "n_pairs": len(rs), "mean_ml": mean_v,
            "mean_d_ml": mean_d,
            "mean_d_pct": 100.0 * mean_d / mean_v if bulk else None,
            "wsd_ml": wsd, "rc_ml": rc,
            "rc_pct": 100.0 * rc / mean_v if bulk and rc is not None else None,
            "typical_ml": None if typ is None else typ[0].volume_ml,
            "mdc95_ml": mdc,
            "mdc95_pct": 100.0 * mdc / typ[0].volume_ml
            if bulk and mdc is not None and typ is not None and typ[0].volume_ml > 0 else None,
        })
    return rows


def _beyond(d: float, sd1: float | None, sd2: float | None) -> bool:
    return unc.beyond(d, unc.mdc95(unc.difference_sd(sd1, sd2)))


def calibration_rows(records: Sequence[PairRecord], sd: SdFunction) -> list[dict[str, Any]]:
    """Per structure: the fraction of pairs whose difference lies beyond its MDC95 (about
    5 % when the model is right: the false-change rate) and mean (d / sd_pred)**2 (about 1)."""
    rows = []
    for structure in STRUCTURES:
        rs = [r for r in records if r.structure == structure]
        if not rs:
            continue
        beyond, z2 = 0, []
        for r in rs:
            s1, s2 = sd(r)
            if _beyond(r.difference_ml, s1, s2):
                beyond += 1
            s = unc.difference_sd(s1, s2)
            if s:
                z2.append((r.difference_ml / s) ** 2)
        rows.append({"structure": structure, "n_pairs": len(rs), "beyond_mdc95": beyond,
                     "false_change_pct": 100.0 * beyond / len(rs),
                     "mean_z2": statistics.fmean(z2) if z2 else None})
    return rows


def _visit(recs: Mapping[tuple[str, str], PairRecord], which: int, sd: SdFunction) -> Visit:
    aff: dict[str, float | None] = {}
    con: dict[str, float | None] = {}
    aff_sd: dict[str, float | None] = {}
    con_sd: dict[str, float | None] = {}
    for (role, structure), r in recs.items():
        drivers = r.first if which == 1 else r.second
        sds = sd(r)
        vol, vsd = (aff, aff_sd) if role == "affected" else (con, con_sd)
        vol[structure] = drivers.volume_ml
        vsd[structure] = sds[0] if which == 1 else sds[1]
    label = next(iter(recs.values()))
    date = label.session1 if which == 1 else label.session2
    return Visit(date, 0, aff, con, [], aff_sd, con_sd)


def session_rows(records: Sequence[PairRecord], sd: SdFunction) -> list[dict[str, Any]]:
    """Per follow-up session: the soft-tissue asymmetry change since baseline (pp) with its
    MDC95, and the flare criteria of :func:`pipeline.longitudinal.assess` that it meets (none
    should: nothing changed)."""
    grouped: dict[tuple[str, str], dict[tuple[str, str], PairRecord]] = defaultdict(dict)
    for r in records:
        grouped[(r.case, r.session2)][(r.role, r.structure)] = r
    out = []
    thresholds = Thresholds.default()
    for (case, session), recs in sorted(grouped.items()):
        base, v = _visit(recs, 1, sd), _visit(recs, 2, sd)
        change = swelling_change(v, base)
        first = next(iter(recs.values()))
        assessed = assess(v, base, thresholds)
        out.append({
            "case": case, "source": first.source, "session": session,
            "asymmetry_change_pp": None if change is None else change.value,
            "asymmetry_mdc95_pp": None if change is None else change.mdc95,
            "asymmetry_beyond": None if change is None else unc.beyond(change.value,
                                                                       change.mdc95),
            "flares": "; ".join(assessed.flares),
            "within_error": "; ".join(assessed.within_error),
        })
    return out


def asymmetry_calibration(sessions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Fraction of sessions whose asymmetry change lies beyond its MDC95, and of sessions
    with a (false) flare."""
    asym = [s for s in sessions if s["asymmetry_change_pp"] is not None]
    beyond = sum(1 for s in asym if s["asymmetry_beyond"])
    flares = sum(1 for s in sessions if s["flares"])
    return {"n_sessions": len(sessions), "n_asymmetry": len(asym),
            "asymmetry_beyond_mdc95": beyond,
            "asymmetry_false_change_pct": 100.0 * beyond / len(asym) if asym else None,
            "asymmetry_wsd_pp": within_sd([s["asymmetry_change_pp"] for s in asym]),
            "false_flares": flares,
            "false_flare_pct": 100.0 * flares / len(sessions) if sessions else None}


def limb_mdc_rows(records: Sequence[PairRecord], model: unc.RepeatabilityModel,
                  target_pct: float = 2.0) -> list[dict[str, Any]]:
    """Per case and role: limb-volume MDC95 (mL and % of the volume) at the case's own
    geometry (baseline drivers, median follow-up misregistration)."""
    keyed: dict[tuple[str, str], list[PairRecord]] = defaultdict(list)
    for r in records:
        if r.structure == "limb":
            keyed[(r.case, r.role)].append(r)
    rows = []
    for (case, role), rs in sorted(keyed.items()):
        first = rs[0].first
        mis = _median(r.second.misregistration_mm for r in rs) or 0.0
        second = dataclasses.replace(first, misregistration_mm=mis)
        mdc = mdc95_of(model, "limb", first, second)
        pct = None if mdc is None or first.volume_ml <= 0 else 100.0 * mdc / first.volume_ml
        rows.append({"case": case, "source": rs[0].source, "role": role,
                     "pixel_mm": first.pixel_mm, "slice_mm": first.slice_mm,
                     "misregistration_mm": mis, "limb_ml": first.volume_ml,
                     "mdc95_ml": mdc, "mdc95_pct": pct,
                     "observed_max_pct": max(abs(100.0 * r.difference_ml / r.first.volume_ml)
                                             for r in rs if r.first.volume_ml > 0),
                     "target_ok": None if pct is None else pct <= target_pct})
    return rows


def pairs_per_structure(records: Sequence[PairRecord]) -> dict[str, int]:
    return {s: sum(1 for r in records if r.structure == s) for s in STRUCTURES}
