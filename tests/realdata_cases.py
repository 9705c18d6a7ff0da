"""Real scanner datasets of ``../shared/realdata`` and how our volumes are checked against them.

Used by ``tests/test_realdata.py`` and ``benchmarks/realdata_table.py``. Each *case* is one
series (one folder or one file) with its reference NIfTI (dcm2niix for the ``dcm_qa_*`` sets,
dicom2nifti's ground truth for ``dicom2nifti_tests``) or, under ``failing/``, the reason it
must be refused with. Comparison is in physical space: both images are reoriented with
``nibabel.as_closest_canonical``; then shape equal, affine within :data:`AFFINE_TOL_MM` and,
where the reference holds real values, voxel values equal after scaling.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from pipeline.io.convert import SeriesError, Volume, read_volumes

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
#: Largest accepted difference of any affine element (mm; rotation terms are unitless).
AFFINE_TOL_MM = 0.01
#: Relative tolerance on values: float32 output against integer x slope references.
VALUE_RTOL = 1e-5


#: Why the dcm_qa_frag references cannot match within 0.01 mm (measured, not assumed).
FRAG_REFERENCE_OFF = (
    "dcm2niix reference is 0.0100 mm off its own DICOM positions: the 96 sagittal slices lie "
    "at LPS x = -100.424 ... 89.5761 mm (steps 1.99995-2.0001, median 2.0000, first-to-last "
    "190.0001 / 95 = 2.000001 mm); the reference has a slice spacing of 2.00011 mm and puts "
    "RAS x of its first canonical slice at -89.5861 mm instead of -89.5761 mm (0.01004 mm "
    "> tolerance 0.01). Ours puts every slice centre on its ImagePositionPatient (checked) "
    "and its voxel values equal the reference exactly.")


@dataclass
class Case:
    """One series of a dataset and what it is compared with.

    Attributes
    ----------
    refs : list of (Path, int or None)
        Reference NIfTI per expected volume, with the 4th-dimension index (None for 3-D).
    values : bool
        Compare voxel values (False: geometry only).
    rescale : list of (slope, intercept), optional
        Per reference: compare with the reference's *stored* integers times the DICOM
        RescaleSlope plus RescaleIntercept. Used for Philips, whose dcm2niix references hold
        "precise" floating-point values FP = (SV * RS + RI) / (RS * SS) with a float32
        scl_slope that differs from the DICOM's RS / (RS * SS) by ~6e-6 relative; ours are
        the displayed values SV * RS + RI, so the stored integers SV are what must agree.
    refusal : str or None
        For cases that must be refused: text the reason must contain.
    xfail : str or None
        Why this case cannot match (said exactly; never a loosened tolerance).
    """

    dataset: str
    name: str
    files: list[Path]
    refs: list[tuple[Path, int | None]] = field(default_factory=list)
    values: bool = True
    rescale: list[tuple[float, float]] | None = None
    refusal: str | None = None
    xfail: str | None = None


@dataclass
class Outcome:
    """Result of one case: volumes matched / expected, refusals with reasons, mismatches."""

    case: Case
    matched: int = 0
    total: int = 0
    refusals: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    #: largest distance (mm) of our slice centres from the files' ImagePositionPatient
    position_error_mm: float | None = None

    @property
    def ok(self) -> bool:
        if self.case.refusal is not None:
            return any(self.case.refusal in r for r in self.refusals)
        return self.matched == self.total and not self.mismatches


def _dicoms(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()
                  and not p.name.endswith((".nii", ".nii.gz", ".json", ".bval", ".bvec",
                                           ".txt", ".md", ".png")) and p.name != "LICENSE")


def _ref4d(path: Path) -> list[tuple[Path, int | None]]:
    shape = nib.load(path).shape
    if len(shape) == 4 and shape[3] > 1:
        return [(path, k) for k in range(shape[3])]
    return [(path, None)]


def cases(root: Path = REALDATA) -> Iterator[Case]:
    """Every case of every dataset present under `root`."""
    ts = root / "dcm_qa_ts"
    for f in sorted((ts / "In").glob("*.dcm")):
        yield Case("dcm_qa_ts", f.name, [f], [(ts / "Ref" / f"{f.stem}.nii", None)])
    bits = root / "dcm_qa_12bit"
    names = {"12bitUnsigned.dcm": 2, "12bitUnsigned_0x0F0F.dcm": 3, "12bitSigned_0x0F0F.dcm": 4}
    for name, number in names.items():
        yield Case("dcm_qa_12bit", name, [bits / "In" / name],
                   [(bits / "Ref" / f"{number}.nii", None)])
    enh = root / "dcm_qa_enh"
    yield Case("dcm_qa_enh", "Siemens/XA10 (4 files, one volume each)",
               sorted((enh / "In" / "Siemens" / "XA10").glob("*.dcm")),
               _ref4d(enh / "Ref" / "Siemens_REST1_w_SMS_PF7-8_6.nii"))
    yield Case("dcm_qa_enh", "Philips/IM_0027_fMAP.dcm (magnitude + field map)",
               [enh / "In" / "Philips" / "IM_0027_fMAP.dcm"],
               [(enh / "Ref" / "Philips_WIP_B0_NS_801_e1.nii", None),
                (enh / "Ref" / "Philips_WIP_B0_NS_801_e2_fieldmaphz.nii", None)],
               rescale=_philips_rescale(enh / "In" / "Philips" / "IM_0027_fMAP.dcm", [0, 32]))
    frag = root / "dcm_qa_frag"
    for folder in sorted((frag / "In").glob("*_anat-T1w_acq-tfl")):
        number = folder.name.split("_")[0]
        yield Case("dcm_qa_frag", folder.name, _dicoms(folder),
                   [(frag / "Ref" / f"anat-T1w_acq-tfl_{number}.nii", None)],
                   xfail=FRAG_REFERENCE_OFF)
    d2n = root / "dicom2nifti_tests"
    failing = {
        "failing/gantrytilting/001": "gantry tilt",
        "failing/sliceincrement/001": "non-uniform slice spacing",
        "failing/sliceincrement/002": "non-uniform slice spacing",
        "failing/slicecount/001": "at least 3",
        "failing/sliceorientation/001": "mixes orientations",
        "failing/notavolume/001": "same slice position",
        "generic/rgb/001": "colour image",
        "ge/anatomical/001_single_slice": "at least 3",
    }
    for truth in sorted(d2n.rglob("*_ground_truth.nii.gz")):
        name = truth.name[: -len("_ground_truth.nii.gz")]
        folder = truth.parent / name
        rel = folder.relative_to(d2n).as_posix()
        if not folder.is_dir() or rel in failing:
            continue
        yield Case("dicom2nifti_tests", rel, _dicoms(folder), _ref4d(truth),
                   values=rel.startswith("hitachi/"))
    for rel, reason in failing.items():
        if (d2n / rel).is_dir():
            yield Case("dicom2nifti_tests", rel, _dicoms(d2n / rel), refusal=reason)


def _philips_rescale(path: Path, frames: list[int]) -> list[tuple[float, float]]:
    """RescaleSlope / RescaleIntercept of the given frames, read straight from the file."""
    if not path.is_file():
        return []
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    result = []
    for i in frames:
        item = ds.PerFrameFunctionalGroupsSequence[i].PixelValueTransformationSequence[0]
        result.append((float(item.RescaleSlope), float(item.RescaleIntercept)))
    return result


def _canonical_ref(path: Path, index: int | None,
                   rescale: tuple[float, float] | None) -> nib.Nifti1Image:
    ref = nib.load(path)
    if rescale is not None:
        data = np.asarray(ref.dataobj.get_unscaled(), dtype=np.float64) * rescale[0] \
            + rescale[1]
    else:
        data = np.asarray(ref.dataobj, dtype=np.float64)
    if index is not None:
        data = data[..., index]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return nib.as_closest_canonical(nib.Nifti1Image(data, ref.affine))


def _canonical_ours(volume: Volume, tmp_dir: Path) -> nib.Nifti1Image:
    import SimpleITK as sitk

    assert volume.image is not None
    path = tmp_dir / f"vol_{abs(hash(volume.label))}.nii"
    sitk.WriteImage(volume.image, str(path))
    image = nib.load(path)
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(image.dataobj), image.affine))


def compare(ours: nib.Nifti1Image, ref: nib.Nifti1Image, values: bool) -> list[str]:
    """Differences between two canonical images (empty when they match)."""
    if ours.shape != ref.shape:
        return [f"shape {ours.shape} != reference {ref.shape}"]
    problems = []
    worst = float(np.max(np.abs(ours.affine - ref.affine)))
    if worst > AFFINE_TOL_MM:
        problems.append(f"affine differs by up to {worst:.4f} (tolerance {AFFINE_TOL_MM})")
    if values:
        a = np.asarray(ours.dataobj, dtype=np.float64)
        b = np.asarray(ref.dataobj, dtype=np.float64)
        scale = max(1.0, float(np.max(np.abs(b))))
        diff = np.abs(a - b)
        if float(np.max(diff)) > VALUE_RTOL * scale:
            problems.append(f"values differ: max |ours - ref| = {float(np.max(diff)):.6g} "
                            f"({int(np.sum(diff > VALUE_RTOL * scale))} voxels; tolerance "
                            f"{VALUE_RTOL * scale:.3g})")
    return problems


def slice_position_error_mm(volume: Volume, files: list[Path]) -> float | None:
    """Largest distance of our slice origins from the nearest ImagePositionPatient (classic
    single-frame series only; None otherwise)."""
    assert volume.image is not None
    positions = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "ImagePositionPatient" not in ds or "NumberOfFrames" in ds and \
                int(ds.NumberOfFrames or 1) > 1:
            return None
        positions.append([float(v) for v in ds.ImagePositionPatient])
    known = np.array(positions)
    n = volume.image.GetSize()[2]
    worst = 0.0
    for k in range(n):
        point = np.array(volume.image.TransformIndexToPhysicalPoint((0, 0, k)))
        worst = max(worst, float(np.min(np.linalg.norm(known - point, axis=1))))
    return worst


def run_case(case: Case, tmp_dir: Path) -> Outcome:
    """Convert the case's series and compare every volume with its reference."""
    outcome = Outcome(case, total=len(case.refs))
    try:
        volumes = read_volumes(case.files)
    except SeriesError as err:
        outcome.refusals.append(f"{err.path.name}: {err.message}")
        return outcome
    outcome.refusals += [f"{v.label or 'volume'}: {v.error.message}" for v in volumes
                         if v.error is not None]
    built = [v for v in volumes if v.image is not None]
    if case.refusal is not None:
        outcome.total = 0
        return outcome
    if len(built) != len(case.refs):
        outcome.mismatches.append(f"{len(built)} volumes built ({len(volumes)} found: "
                                  f"{', '.join(v.label or '-' for v in volumes)}), "
                                  f"{len(case.refs)} in the reference")
    if built and all(v.sidecar.get("SourceLayout") == "classic single-frame" for v in built):
        errors = [slice_position_error_mm(v, case.files) for v in built]
        outcome.position_error_mm = max((e for e in errors if e is not None), default=None)
    for k, (volume, (ref_path, index)) in enumerate(zip(built, case.refs, strict=False)):
        rescale = case.rescale[k] if case.rescale else None
        problems = compare(_canonical_ours(volume, tmp_dir),
                           _canonical_ref(ref_path, index, rescale), case.values)
        if problems:
            outcome.mismatches.append(f"{volume.label or 'volume'} vs {ref_path.name}"
                                      f"{'' if index is None else f'[{index}]'}: "
                                      + "; ".join(problems))
        else:
            outcome.matched += 1
    return outcome
