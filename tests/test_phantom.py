"""Phantom generator: exact truth, real DICOM geometry, determinism, MRI-like contrast."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from phantom_cases import small_spec

from pipeline import phantom
from pipeline.convert import read_series


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    spec = small_spec(n_slices=4, sessions=(phantom.SessionSpec(day=0, lesion_ml=1.0),))
    phantom.generate(spec, tmp_path / "a")
    phantom.generate(spec, tmp_path / "b")
    assert _digest(tmp_path / "a" / "dicom") == _digest(tmp_path / "b" / "dicom")
    ta = json.loads((tmp_path / "a" / "truth.json").read_text())
    tb = json.loads((tmp_path / "b" / "truth.json").read_text())
    assert ta["sessions"] == tb["sessions"]
    other = phantom.PhantomSpec(**{**spec.__dict__, "seed": spec.seed + 1})
    phantom.generate(other, tmp_path / "c")
    assert _digest(tmp_path / "a" / "dicom") != _digest(tmp_path / "c" / "dicom")


def test_truth_volumes_converge_with_supersampling() -> None:
    """Truth at 3x3x3 samples per voxel agrees with a 6x6x9 integration within 0.5 %."""
    sess = phantom.SessionSpec(day=0, swelling=0.1, lesion_ml=4.0, edema=0.5)
    coarse = small_spec(n_slices=6, sessions=(sess,))
    fine = phantom.PhantomSpec(**{**coarse.__dict__, "supersample_xy": 6, "supersample_z": 9})
    vc, _ = phantom.truth_of(coarse, phantom.render_session(coarse, sess))
    vf, _ = phantom.truth_of(fine, phantom.render_session(fine, sess))
    for side in ("left", "right"):
        for structure in ("limb", "soft_tissue", "bone", "marrow_lesion"):
            if vf[side][structure] > 0:
                assert vc[side][structure] == pytest.approx(vf[side][structure], rel=0.005)
    # feathery edema is a fine texture: its integral converges more slowly
    assert vc["left"]["edema"] == pytest.approx(vf["left"]["edema"], rel=0.03)


def test_truth_matches_session_parameters(small_phantom: Path) -> None:
    truth = json.loads((small_phantom / "truth.json").read_text())
    first, last = truth["sessions"]
    left0, right0 = first["volumes_ml"]["left"], first["volumes_ml"]["right"]
    # structures add up
    for v in (left0, right0):
        assert v["limb"] == pytest.approx(v["soft_tissue"] + v["bone"], abs=0.01)
    # the affected (left) leg is swollen, has a lesion near the requested size and edema
    assert first["soft_tissue_asymmetry_pct"] > 3.0
    assert 2.0 < left0["marrow_lesion"] < 4.0
    assert left0["edema"] > 5.0
    assert right0["marrow_lesion"] == 0 and right0["edema"] == 0
    # last session: nothing to find, legs alike (natural asymmetry of a few percent at most)
    assert last["volumes_ml"]["left"]["marrow_lesion"] == 0
    assert abs(last["soft_tissue_asymmetry_pct"]) < 3.0
    # the majority-vote label map agrees with the fractional volumes for large structures
    lab = np.asarray(nib.load(small_phantom / first["label_map"]).dataobj)
    zooms = nib.load(small_phantom / first["label_map"]).header.get_zooms()
    voxel_ml = float(np.prod(zooms)) / 1000
    assert np.isin(lab, [5, 6, 7, 8]).sum() * voxel_ml == pytest.approx(left0["limb"], rel=0.02)
    assert np.isin(lab, [7, 8]).sum() * voxel_ml == pytest.approx(left0["bone"], rel=0.05)


def test_dicom_files_are_real_mr_images(small_phantom: Path) -> None:
    files = sorted((small_phantom / "dicom").rglob("IM*"))
    assert len(files) == 2 * 2 * 12  # sessions x series x slices
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == phantom.MR_IMAGE_STORAGE
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "SliceThickness", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate",
                "ScanningSequence", "SequenceVariant", "RepetitionTime", "EchoTime",
                "PatientPosition", "FrameOfReferenceUID"):
        assert tag in ds, tag
    assert ds.pixel_array.shape == (96, 128)
    stir = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {d.SeriesDescription for d in stir} == {"T1 TSE AX", "STIR AX"}
    assert all("IR" in d.ScanningSequence for d in stir if d.SeriesDescription == "STIR AX")


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_left_leg_is_at_positive_lps_x_for_every_patient_position(
    tmp_path: Path, position: str
) -> None:
    spec = small_spec(position=position, n_slices=4, slice_order="interleaved",
                      sessions=(phantom.SessionSpec(day=0, lesion_ml=1.5),))
    phantom.generate(spec, tmp_path)
    series = sorted((tmp_path / "dicom" / "ST0001" / "SE0003").iterdir())
    image, _ = read_series(series)
    truth = json.loads((tmp_path / "truth.json").read_text())
    lab = nib.load(tmp_path / truth["sessions"][0]["label_map"])
    data = np.asarray(lab.dataobj)
    ras = nib.affines.apply_affine(lab.affine, np.argwhere(np.isin(data, [5, 6, 7, 8])))
    assert ras[:, 0].mean() < -20  # RAS x < 0 is the patient's left (LPS x > 0)
    # The DICOM geometry and the truth map describe the same grid: the T1 image is bright
    # (fat/muscle) where the truth says limb, dark where it says background.
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    idx = np.argwhere(np.isin(data, [1, 5]))[:200]
    pts_lps = nib.affines.apply_affine(lab.affine, idx) * np.array([-1, -1, 1])
    vals = [arr[tuple(reversed(image.TransformPhysicalPointToIndex(tuple(p))))] for p in pts_lps]
    assert np.median(vals) > 200
    instance_positions = [float(pydicom.dcmread(f).SliceLocation) for f in series]
    assert instance_positions != sorted(instance_positions)  # interleaved acquisition order


def test_contrast_follows_the_literature() -> None:
    spec = small_spec(n_slices=3, bias=0.0, sessions=(phantom.SessionSpec(day=0),))
    rendered = phantom.render_session(spec, spec.sessions[0])
    images = phantom.synthesize(spec, rendered, np.random.default_rng(0))
    frac = rendered["fractions"]
    pure_muscle = frac[phantom.MUSCLE] > 0.999
    pure_fat = frac[phantom.FAT] > 0.999
    t1, stir = images["T1w"].astype(float), images["STIR"].astype(float)
    assert t1[pure_muscle].mean() / t1[pure_fat].mean() == pytest.approx(0.33, abs=0.03)
    assert stir[pure_fat].mean() < 0.3 * stir[pure_muscle].mean()  # fat suppressed
    snr_t1 = t1[pure_muscle].mean() / t1[pure_muscle].std()
    snr_stir = stir[pure_muscle].mean() / stir[pure_muscle].std()
    assert 18 < snr_t1 < 32 and 7 < snr_stir < 13


def test_bias_field_has_requested_peak_to_peak() -> None:
    spec = small_spec(n_slices=3, bias=0.3)
    grid = phantom.make_grid(spec)
    field = phantom.bias_field(spec, grid)
    assert float(np.ptp(field)) == pytest.approx(0.3, abs=1e-6)
    assert field.mean() == pytest.approx(1.0, abs=0.1)


def test_parse_sessions_and_cli(tmp_path: Path) -> None:
    specs = phantom.parse_sessions("-5:0.1:6:0.3,14:0:0:0:12.5")
    assert specs[0] == phantom.SessionSpec(-5, 0.1, 6.0, 0.3)
    assert specs[1].table_shift_mm == 12.5
    with pytest.raises(ValueError):
        phantom.parse_sessions("1:2:3:4:5:6:7")
    assert phantom.parse_sessions("3:0:0:0:-20:24")[0].n_slices == 24
    rc = phantom.main([str(tmp_path), "--slices", "3", "--matrix", "96x72",
                       "--leg-radius-mm", "30", "--sessions", "0:0:0:0", "--sides", "right",
                       "--affected-side", "right"])
    assert rc == 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["sides"] == ["right"]
    assert truth["sessions"][0]["volumes_ml"]["left"]["limb"] == 0
