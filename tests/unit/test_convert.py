"""Tests of pipeline.io.convert against synthetic series with known geometry and values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import PATIENT_TAGS, edit_file, ramp_pixels, rotation, write_series
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from pipeline.io import convert, dicom_index, scan
from pipeline.io.convert import SeriesError, read_series, write_volume

REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata"
D2N = REALDATA / "dicom2nifti_tests"
needs_realdata = pytest.mark.skipif(
    not D2N.is_dir(), reason=f"real scanner data not found at {D2N} (see its README)")

MARK = 60000


def _marked(n: int = 5, rows: int = 6, cols: int = 7, at: tuple[int, int, int] = (3, 4, 5)):
    pixels = ramp_pixels(n, rows, cols)
    pixels[at] = MARK
    return pixels


def _marked_index_xyz(image: sitk.Image) -> tuple[int, int, int]:
    z, y, x = np.argwhere(sitk.GetArrayViewFromImage(image) == MARK)[0]
    return int(x), int(y), int(z)


def test_order_from_positions_not_names_or_instance_numbers(tmp_path: Path) -> None:
    # names in reverse slice order, instance numbers shuffled
    info = write_series(tmp_path, names=[f"IM{9 - k}" for k in range(5)],
                        instance_numbers=[3, 5, 1, 2, 4])
    image, sidecar = read_series(list(reversed(info.files)))
    array = sitk.GetArrayFromImage(image)
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(array, info.pixels.astype(np.float32))
    np.testing.assert_allclose(image.GetOrigin(), info.positions[0])
    np.testing.assert_allclose(image.GetSpacing(), (0.6, 0.8, 2.0))
    assert sidecar["NumberOfSlices"] == 5
    assert sidecar["SpacingBetweenSlicesFromPositions_mm"] == pytest.approx(2.0)


GEOMETRIES = {
    "axial head-first": ((1, 0, 0), (0, 1, 0), 2.0),
    "axial feet-first": ((-1, 0, 0), (0, 1, 0), 2.0),
    "axial, files listed downwards": ((1, 0, 0), (0, 1, 0), -2.0),
    "coronal": ((1, 0, 0), (0, 0, -1), 3.0),
    "sagittal": ((0, 1, 0), (0, 0, -1), 1.5),
    "oblique": (tuple(rotation(20, -15, 30)[:, 0]), tuple(rotation(20, -15, 30)[:, 1]), 2.5),
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_marked_voxel_lands_at_its_dicom_position(tmp_path: Path, name: str) -> None:
    row, col, step = GEOMETRIES[name]
    at = (3, 4, 5)
    info = write_series(tmp_path, _marked(at=at), row_cosine=row, col_cosine=col,
                        slice_step=step, origin=(12.0, -7.0, 30.0))
    image, _ = read_series(info.files)
    point = image.TransformIndexToPhysicalPoint(_marked_index_xyz(image))
    np.testing.assert_allclose(point, info.pixel_lps(*at), atol=1e-4)
    # every slice origin is one of the written positions, and the spacing is positive
    assert image.GetSpacing()[2] == pytest.approx(abs(step))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 0], row, atol=1e-6)
    np.testing.assert_allclose(direction[:, 1], col, atol=1e-6)


@pytest.mark.parametrize("row", [(1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)])
def test_left_stays_left_in_nifti(tmp_path: Path, row: tuple[float, float, float]) -> None:
    # LPS +x is the patient's left; pick the column whose x is +4 mm
    cols, spacing = 12, 1.0
    origin_x = -5.0 if row[0] > 0 else 6.0
    c = int(round((4.0 - origin_x) / (spacing * row[0])))
    info = write_series(tmp_path / "dcm", _marked(5, 6, cols, at=(2, 3, c)), row_cosine=row,
                        origin=(origin_x, -2.0, 0.0), pixel_spacing=(1.0, spacing))
    assert info.pixel_lps(2, 3, c)[0] == pytest.approx(4.0)
    image, sidecar = read_series(info.files)
    out = tmp_path / "out" / "vol.nii.gz"
    write_volume(image, sidecar, out)
    nii = nib.load(out)
    ijk = np.argwhere(np.asarray(nii.dataobj) == MARK)[0]
    ras = nii.affine @ np.append(ijk, 1.0)
    lps = info.pixel_lps(2, 3, c)
    assert ras[0] < 0, "a voxel on the patient's left must have RAS x < 0"
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-3)
    assert nib.aff2axcodes(nii.affine)[2] in ("S", "I")


def test_rescale_slope_intercept_applied_per_slice(tmp_path: Path) -> None:
    info = write_series(tmp_path, rescale=(2.5, -100.0))
    edit_file(info.files[1], RescaleSlope=0.5, RescaleIntercept=10.0)
    image, _ = read_series(info.files)
    array = sitk.GetArrayFromImage(image)
    expected = info.pixels * 2.5 - 100.0
    expected[1] = info.pixels[1] * 0.5 + 10.0
    np.testing.assert_allclose(array, expected, rtol=1e-6)


def test_identical_duplicate_dropped_with_warning(tmp_path: Path) -> None:
    info = write_series(tmp_path)
    copy = tmp_path / "copy_of_slice2"
    shutil.copy(info.files[2], copy)
    edit_file(copy, SOPInstanceUID=pydicom.uid.generate_uid())
    image, sidecar = read_series([*info.files, copy])
    assert image.GetSize()[2] == 5
    assert sidecar["SourceFiles"] == 6
    assert any("duplicate" in w for w in sidecar["warnings"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), info.pixels)


def test_conflicting_duplicate_refused(tmp_path: Path) -> None:
    info = write_series(tmp_path / "a")
    other = write_series(tmp_path / "b", ramp_pixels() + 7, series_uid=info.series_uid,
                         study_uid=info.study_uid, names=[f"echo2_{k}" for k in range(5)])
    with pytest.raises(SeriesError, match="same slice position"):
        read_series([*info.files, other.files[3]])


def test_missing_slice_refused_with_deviation(tmp_path: Path) -> None:
    info = write_series(tmp_path, ramp_pixels(6), slice_step=2.0)
    files = [f for k, f in enumerate(info.files) if k != 3]
    with pytest.raises(SeriesError, match=r"deviation of 2\.0000 mm") as err:
        read_series(files)
    assert "missing slice" in err.value.message
    assert err.value.path == info.files[4]


def test_uneven_spacing_refused_with_largest_deviation(tmp_path: Path) -> None:
    steps = np.array([0.0, 2.0, 4.0, 6.1, 8.1, 10.1])
    positions = np.column_stack([np.zeros(6), np.zeros(6), steps])
    info = write_series(tmp_path, ramp_pixels(6), positions=positions)
    with pytest.raises(SeriesError, match=r"deviation of 0\.1000 mm"):
        read_series(info.files)


def test_position_jitter_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 8
    positions = np.column_stack([np.full(n, -3.0), np.full(n, 2.0), np.arange(n) * 2.0])
    positions[:, 2] += rng.uniform(-1e-4, 1e-4, n)
    info = write_series(tmp_path, ramp_pixels(n), positions=positions)
    image, sidecar = read_series(info.files)
    assert image.GetSize()[2] == n
    assert image.GetSpacing()[2] == pytest.approx(2.0, abs=1e-3)
    assert sidecar["warnings"] == []


@pytest.mark.parametrize("tag", ["ImageOrientationPatient", "ImagePositionPatient",
                                 "PixelSpacing"])
def test_missing_geometry_refused(tmp_path: Path, tag: str) -> None:
    info = write_series(tmp_path)
    edit_file(info.files[2], **{tag: None})
    with pytest.raises(SeriesError, match=tag) as err:
        read_series(info.files)
    assert err.value.path == info.files[2]


def test_gantry_tilt_refused(tmp_path: Path) -> None:
    # positions move 0.5 mm posterior per 2 mm slice: about 14 degrees of tilt
    positions = np.array([[0.0, 0.5 * k, 2.0 * k] for k in range(5)])
    info = write_series(tmp_path, positions=positions)
    with pytest.raises(SeriesError, match="gantry tilt"):
        read_series(info.files)


def test_fewer_than_three_slices_refused(tmp_path: Path) -> None:
    info = write_series(tmp_path, ramp_pixels(2))
    with pytest.raises(SeriesError, match="at least 3"):
        read_series(info.files)


def test_mixed_orientation_and_matrix_refused(tmp_path: Path) -> None:
    info = write_series(tmp_path / "a")
    edit_file(info.files[1], ImageOrientationPatient=[1, 0, 0, 0, 0.8, -0.6])
    with pytest.raises(SeriesError, match="mixes orientations"):
        read_series(info.files)
    info = write_series(tmp_path / "b")
    other = write_series(tmp_path / "c", ramp_pixels(5, 8, 7), series_uid=info.series_uid)
    with pytest.raises(SeriesError, match="matrix"):
        read_series([*info.files[:3], other.files[4]])


def test_undecodable_compressed_pixels_name_the_decoders(tmp_path: Path) -> None:
    info = write_series(tmp_path, ramp_pixels(3))
    ds = pydicom.dcmread(info.files[0])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(info.files[0], enforce_file_format=True)
    with pytest.raises(SeriesError, match="pylibjpeg") as err:
        read_series(info.files)
    assert err.value.path == info.files[0]


def test_write_volume_sidecar_and_no_patient_data(tmp_path: Path) -> None:
    info = write_series(tmp_path / "dcm", sequence="STIR")
    image, sidecar = read_series(info.files)
    out = tmp_path / "out" / "sub-x_ses-1_fluid.nii.gz"
    write_volume(image, sidecar, out)
    meta = json.loads((tmp_path / "out" / "sub-x_ses-1_fluid.json").read_text())
    for key in ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "StudyInstanceUID",
                "StudyDate", "SequenceClass", "EchoTime", "RepetitionTime", "InversionTime",
                "MagneticFieldStrength", "Manufacturer", "PatientPosition",
                "ImageOrientationPatient", "SpacingBetweenSlicesFromPositions_mm",
                "PixelSpacing_mm", "NumberOfSlices", "warnings", "SourceFiles"):
        assert key in meta, key
    assert meta["StudyDate"] == "2024-02-25"
    assert meta["SequenceClass"] == "STIR"
    assert meta["InversionTime"] == 160.0
    assert meta["PixelSpacing_mm"] == [0.8, 0.6]
    text = (tmp_path / "out" / "sub-x_ses-1_fluid.json").read_text()
    for value in PATIENT_TAGS.values():
        assert value not in text
    assert not [k for k in meta if k.startswith("Patient") and k != "PatientPosition"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub-x_ses-1_fluid.json",
                                                           "sub-x_ses-1_fluid.nii.gz"]
    assert nib.load(out).shape == (7, 6, 5)


def _session_folder(root: Path, fluid_positions: np.ndarray | None = None) -> Path:
    study = pydicom.uid.generate_uid()
    write_series(root / "in" / "t1", sequence="T1w", study_uid=study, series_number=3)
    write_series(root / "in" / "stir", ramp_pixels(len(fluid_positions))
                 if fluid_positions is not None else None, sequence="STIR", study_uid=study,
                 series_number=5, positions=fluid_positions, seed=3)
    assert dicom_index.main(["--input-dir", str(root / "in"), "--out-dir",
                             str(root / "index")]) == 0
    return root / "index" / "sessions.json"


def test_main_converts_a_session(tmp_path: Path) -> None:
    sessions_json = _session_folder(tmp_path)
    out = tmp_path / "nifti"
    code = convert.main(["--sessions-json", str(sessions_json), "--session", "20240225",
                         "--subject", "demo", "--out-dir", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "sub-demo_ses-20240225_T1w.json", "sub-demo_ses-20240225_T1w.nii.gz",
        "sub-demo_ses-20240225_fluid.json", "sub-demo_ses-20240225_fluid.nii.gz"]
    meta = json.loads((out / "sub-demo_ses-20240225_fluid.json").read_text())
    assert meta["SequenceClass"] == "STIR"


def test_main_refusal_leaves_no_partial_outputs(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # fluid series with a missing slice (steps 2, 2, 4, 2): the index refuses it (a study
    # refusal, not a failed run); a sessions.json naming it anyway is refused by convert
    positions = np.array([[0.0, 0.0, z] for z in (0.0, 2.0, 4.0, 8.0, 10.0)])
    gap = write_series(tmp_path / "gap", ramp_pixels(5), sequence="STIR", positions=positions,
                       seed=3)
    result = scan.index_folder(tmp_path / "gap")
    assert result.series[0].status == "refused"
    assert "non-uniform slice spacing" in result.series[0].reason
    assert "a missing slice?" in result.series[0].reason
    sessions_json = _session_folder(tmp_path)
    data = json.loads(sessions_json.read_text())
    data["sessions"][0]["fluid"]["files"] = [str(f) for f in gap.files]
    sessions_json.write_text(json.dumps(data))
    out = tmp_path / "nifti"
    code = convert.main(["--sessions-json", str(sessions_json), "--session", "20240225",
                         "--subject", "demo", "--out-dir", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR ") and "non-uniform slice spacing" in err
    assert not out.exists() or not any(out.iterdir())
    assert convert.main(["--sessions-json", str(sessions_json), "--session", "19990101",
                         "--subject", "demo", "--out-dir", str(out)]) == 2
    assert "20240225" in capsys.readouterr().err


@needs_realdata
@pytest.mark.parametrize("case", ["anatomical/001", "generic/anatomical/001",
                                  "hitachi/anatomical/001"])
def test_real_series_matches_reference_geometry(tmp_path: Path, case: str) -> None:
    folder = D2N / case
    index = scan.index_folder(folder)
    assert len(index.series) == 1 and index.series[0].status != "refused"
    image, sidecar = read_series(list(index.series[0].files))
    out = tmp_path / "vol.nii.gz"
    write_volume(image, sidecar, out)
    ours = nib.as_closest_canonical(nib.load(out))
    reference = nib.as_closest_canonical(nib.load(D2N / f"{case}_ground_truth.nii.gz"))
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours.affine, reference.affine, atol=1e-3)
    np.testing.assert_allclose(ours.get_fdata(), reference.get_fdata(), atol=1e-3)


@needs_realdata
@pytest.mark.parametrize(("case", "message"), [
    ("failing/gantrytilting/001", "gantry tilt"),
    ("failing/sliceincrement/001", "non-uniform slice spacing"),
    ("failing/sliceincrement/002", "non-uniform slice spacing"),
    ("failing/slicecount/001", "at least 3"),
    ("failing/sliceorientation/001", "mixes orientations"),
    ("failing/notavolume/001", "same slice position"),
])
def test_real_failing_series_refused(case: str, message: str) -> None:
    with pytest.raises(SeriesError, match=message):
        read_series(sorted((D2N / case).iterdir()))
