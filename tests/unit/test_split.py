"""The left and the right leg in separate series of one study (issue 18, pipeline/io/split.py):
pairing by geometry, laterality hints, composition onto one grid, and what is flagged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import qc as qc_mod
from pipeline.io import split
from pipeline.io.convert import convert_session
from pipeline.io.nifti_input import convert_session as convert_sheet_session
from pipeline.io.nifti_input import index_sheet
from pipeline.io.scan import index_folder
from pipeline.io.selection import select_sessions, split_warnings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from split_factory import split_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO_STUDY = ROOT / "sample_data" / "demo" / "dicom" / "ST0001"


# ------------------------------------------------------------------------------ pairing

def test_two_fields_of_view_apart_are_the_two_legs_left_from_geometry() -> None:
    # LPS x: + is the patient's left
    assert split.pair_sides((20.0, 170.0), (-170.0, -20.0)) == ("left", "right")
    assert split.pair_sides((-170.0, -20.0), (20.0, 170.0)) == ("right", "left")
    # a small overlap at the middle is a margin, still two legs
    assert split.pair_sides((-10.0, 150.0), (-150.0, 10.0)) == ("left", "right")


def test_overlapping_or_close_fields_of_view_are_not_a_pair() -> None:
    assert split.pair_sides((-200.0, 200.0), (10.0, 160.0)) is None  # bilateral + one leg
    assert split.pair_sides((-150.0, 150.0), (-145.0, 155.0)) is None  # two bilateral
    assert split.pair_sides((0.0, 100.0), (-30.0, 70.0)) is None  # centres 30 mm apart
    assert split.pair_sides(None, (0.0, 100.0)) is None


def test_description_and_tag_hints_and_the_warning_when_they_disagree() -> None:
    assert split.hinted_sides("T1 TSE AX LT", "L") == {"description": "left",
                                                       "Laterality tag": "left"}
    assert split.hinted_sides("STIR_cor_right", "") == {"description": "right"}
    assert split.hinted_sides("T1 L-R", "") == {}  # both named: no hint
    assert split.laterality_warnings("left", "series #5", "T1 LT", "L") == []
    [warning] = split.laterality_warnings("right", "series #5 'T1 LT'", "T1 LT", "L")
    assert "the description and the Laterality tag say left" in warning
    assert "geometry shows the right leg" in warning


# ------------------------------------------------------------------------------ composition

def _image(array_zyx: np.ndarray, spacing: tuple[float, float, float],
           origin: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _two_legs(nz: int = 6, ny: int = 60, nx: int = 120, pixel_mm: float = 2.0) -> np.ndarray:
    """A bilateral image: two discs (legs) of tissue signal with a smooth texture."""
    z, y, x = np.indices((nz, ny, nx), dtype=float)
    out = np.zeros((nz, ny, nx))
    for cx in (nx * 0.25, nx * 0.75):
        r = np.hypot(x - cx, y - ny / 2)
        out += np.where(r < ny * 0.35, 500 + 200 * np.sin(x / 5) * np.cos(y / 7), 0)
    return out + 5  # background noise floor


def _halves(array: np.ndarray, pixel_mm: float, reach: int) -> tuple[sitk.Image, sitk.Image]:
    """Left (patient's left = +x = high columns) and right halves, cropped by whole columns."""
    nx = array.shape[2]
    left = _image(array[:, :, nx // 2 - reach:], (pixel_mm, pixel_mm, 5.0),
                  ((nx // 2 - reach) * pixel_mm - 120.0, -60.0, 0.0))
    right = _image(array[:, :, :nx // 2 + reach], (pixel_mm, pixel_mm, 5.0),
                   (-120.0, -60.0, 0.0))
    return left, right


def test_halves_on_one_grid_compose_to_the_original_exactly() -> None:
    array = _two_legs()
    left, right = _halves(array, 2.0, reach=6)
    composed = split.compose([split.Part("left", left, "L"), split.Part("right", right, "R")],
                             t1_like=True, min_contact_mm=3.0)
    out = sitk.GetArrayFromImage(composed.image)
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array.astype(np.float32))
    assert composed.image.GetOrigin() == pytest.approx((-120.0, -60.0, 0.0))
    assert composed.record["other_copied_by_index"] is True
    assert composed.record["differences"] == [] and composed.flags == []


def test_a_gap_between_the_fields_of_view_is_zero_not_invented() -> None:
    array = _two_legs()
    left, right = _halves(array, 2.0, reach=-10)  # 20 columns in the middle seen by neither
    out = sitk.GetArrayFromImage(split.compose(
        [split.Part("left", left, "L"), split.Part("right", right, "R")],
        t1_like=False, min_contact_mm=3.0).image)
    assert out.shape == array.shape
    assert np.all(out[:, :, 50:70] == 0)
    np.testing.assert_array_equal(out[:, :, :50], array[:, :, :50].astype(np.float32))


def test_an_off_grid_leg_is_resampled_and_the_differences_are_flagged() -> None:
    array = _two_legs()
    left, _ = _halves(array, 2.0, reach=6)
    # the right leg on a coarser grid shifted by a third of a pixel, with 1.5 x the signal
    fine = _image(array[:, :, :66], (2.0, 2.0, 5.0), (-120.0, -60.0, 0.0))
    coarse = sitk.Resample(fine, [44, 40, 6], sitk.Transform(), sitk.sitkLinear,
                           (-119.33, -59.5, 0.0), (3.0, 3.0, 5.0), fine.GetDirection(), 0.0,
                           sitk.sitkFloat32) * 1.5
    composed = split.compose([split.Part("left", left, "L"), split.Part("right", coarse, "R")],
                             t1_like=True, min_contact_mm=3.0)
    record = composed.record
    assert record["reference_side"] == "left"  # the finer series keeps its voxels
    assert record["other_copied_by_index"] is False
    assert record["other_resampled"] == "cubic B-spline"
    [flag] = [f for f in composed.flags if f.code == qc_mod.SPLIT_SERIES_DIFFER]
    assert flag.severity == "warn" and flag.side == qc_mod.BOTH
    assert "in-plane pixels 2 x 2 mm (left) against 3 x 3 mm (right)" in flag.message
    assert "tissue signal of the left leg 0.67 x the right leg's" in flag.message
    out = sitk.GetArrayFromImage(composed.image)
    # the left leg's voxels are the left series' own, unchanged
    np.testing.assert_array_equal(out[:, :, 60:], array[:, :, 60:].astype(np.float32))


def test_different_frames_of_reference_and_coils_are_named() -> None:
    left, right = _halves(_two_legs(), 2.0, reach=6)
    composed = split.compose([split.Part("left", left, "L", "Knee L", "1.2.3"),
                              split.Part("right", right, "R", "Knee R", "1.2.4")],
                             t1_like=False, min_contact_mm=3.0)
    [flag] = composed.flags
    assert "different Frames of Reference" in flag.message
    assert "receive coils 'Knee L' (left) and 'Knee R' (right)" in flag.message


def test_slices_that_do_not_coincide_are_named() -> None:
    array = _two_legs()
    left, right = _halves(array, 2.0, reach=6)
    right.SetOrigin((-120.0, -60.0, 2.0))  # 2 mm off along the slices (spacing 5 mm)
    composed = split.compose([split.Part("left", left, "L"), split.Part("right", right, "R")],
                             t1_like=False, min_contact_mm=3.0)
    [flag] = composed.flags
    assert "the right leg's slices lie 2 mm off the left leg's" in flag.message


def test_a_leg_cut_by_its_own_field_of_view_is_flagged_for_that_side() -> None:
    array = _two_legs()
    nx = array.shape[2]
    # the left series ends 20 columns short of the leg's lateral edge
    left = _image(array[:, :, nx // 2 - 6: nx - 25], (2.0, 2.0, 5.0),
                  ((nx // 2 - 6) * 2.0 - 120.0, -60.0, 0.0))
    _, right = _halves(array, 2.0, reach=6)
    composed = split.compose([split.Part("left", left, "series #5"),
                              split.Part("right", right, "series #6")],
                             t1_like=True, min_contact_mm=3.0)
    [flag] = [f for f in composed.flags if f.code == qc_mod.LIMB_CUT_BY_FOV]
    assert flag.side == "left" and "its own series (series #5)" in flag.message
    assert flag.slices == tuple(range(array.shape[0]))


def test_compose_needs_one_series_per_side() -> None:
    left, right = _halves(_two_legs(), 2.0, reach=6)
    with pytest.raises(ValueError, match="one per side"):
        split.compose([split.Part("left", left, "a"), split.Part("left", right, "b")],
                      t1_like=True, min_contact_mm=3.0)


# ------------------------------------------------------------------------------ index + convert

@pytest.fixture(scope="module")
def split_demo_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split") / "in"
    split_study(DEMO_STUDY, out / "ST0001", wrong_tag_side="right")
    return out


def test_index_pairs_the_legs_by_geometry_and_warns_on_a_wrong_tag(
        split_demo_study: Path) -> None:
    sessions, refused = select_sessions(index_folder(split_demo_study).series)
    assert refused == [] and len(sessions) == 1
    for role in ("anatomical", "fluid"):
        entry = sessions[0][role]
        assert [p["side"] for p in entry["parts"]] == ["left", "right"]
        assert entry["files"] == [f for p in entry["parts"] for f in p["files"]]
        left, right = entry["parts"]
        assert min(left["x_range_mm"]) > max(right["x_range_mm"]) - 60  # left lies at +x
        assert "(left leg)" in entry["description"] and "(right leg)" in entry["description"]
    warnings = split_warnings(sessions)
    assert len(warnings) == 2  # the right leg's T1 and STIR carry the left leg's tag
    assert all("geometry shows the right leg" in w for w in warnings)


def test_one_leg_alone_is_not_paired(tmp_path: Path) -> None:
    split_study(DEMO_STUDY, tmp_path / "in", drop_right=True)
    [session], _ = select_sessions(index_folder(tmp_path / "in").series)
    assert "parts" not in session["anatomical"] and "parts" not in session["fluid"]


def test_converted_split_session_equals_the_bilateral_one(split_demo_study: Path,
                                                          tmp_path: Path) -> None:
    def convert(study: Path, out: Path) -> dict[str, sitk.Image]:
        sessions, _ = select_sessions(index_folder(study).series)
        sessions_json = out / "sessions.json"
        out.mkdir()
        sessions_json.write_text(json.dumps({"sessions": sessions}))
        convert_session(sessions_json, sessions[0]["session"], "x", out)
        return {role: sitk.ReadImage(str(next(out.glob(f"*_{role}.nii.gz"))))
                for role in ("T1w", "fluid")}

    composed = convert(split_demo_study, tmp_path / "split")
    original = convert(DEMO_STUDY.parent, tmp_path / "whole")  # all five studies: first one
    for role in ("T1w", "fluid"):
        a, b = composed[role], original[role]
        assert a.GetSize() == b.GetSize()
        assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    sidecar = json.loads(next((tmp_path / "split").glob("*_T1w.json")).read_text())
    assert sidecar["SplitSeries"]["series"]["left"]["SeriesNumber"] == 31
    assert sidecar["QCFlags"] == []


def test_segmentation_carries_the_converters_flags_and_fields_of_view(tmp_path: Path) -> None:
    flag = qc_mod.QCFlag("", qc_mod.BOTH, qc_mod.SPLIT_SERIES_DIFFER, "warn", "differ")
    (tmp_path / "a_T1w.json").write_text(json.dumps({"QCFlags": [flag.to_json()]}))
    grid = split.grid_record(_image(np.zeros((2, 3, 4)), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)))
    (tmp_path / "a_fluid.json").write_text(json.dumps(
        {"SplitSeries": {"series": {"right": {"grid": grid}, "left": {"grid": grid}}}}))
    flags, pieces = qc_mod.image_sidecar_facts([tmp_path / "a_T1w.nii.gz",
                                                tmp_path / "a_fluid.nii.gz"])
    assert flags == [dict(flag.to_json(), message="a_T1w.nii.gz image: differ")]
    assert pieces == [[grid, grid]]
    # the same finding on both images is one flag naming both
    (tmp_path / "a_fluid.json").write_text(json.dumps({"Role": "fluid",
                                                       "QCFlags": [flag.to_json()]}))
    (tmp_path / "a_T1w.json").write_text(json.dumps({"Role": "anatomical",
                                                     "QCFlags": [flag.to_json()]}))
    flags, _ = qc_mod.image_sidecar_facts([tmp_path / "a_T1w.nii.gz",
                                           tmp_path / "a_fluid.nii.gz"])
    assert [f["message"] for f in flags] == [
        "anatomical image: differ; fluid image: differ"]


# ------------------------------------------------------------------------------ NIfTI sheet

def test_sheet_with_one_image_per_leg_is_composed(tmp_path: Path) -> None:
    array = _two_legs()
    left, right = _halves(array, 2.0, reach=6)
    rows = ["subject\tstudy_date\trole\tpath"]
    for role, gain in (("T1w", 1.0), ("fluid", 0.5)):
        for side, image in (("right", right), ("left", left)):
            sitk.WriteImage(image * gain, str(tmp_path / f"{role}_{side}.nii.gz"))
            rows.append(f"s1\t2024-01-02\t{role}\t{role}_{side}.nii.gz")
    sheet = tmp_path / "sessions.tsv"
    sheet.write_text("\n".join(rows) + "\n")
    result = index_sheet(sheet, "s1")
    assert result["refused"] == [] and len(result["sessions"]) == 1
    entry = result["sessions"][0]["anatomical"]
    assert [(p["side"], Path(p["files"][0]).name) for p in entry["parts"]] == [
        ("left", "T1w_left.nii.gz"), ("right", "T1w_right.nii.gz")]
    (tmp_path / "sessions.json").write_text(json.dumps({"sessions": result["sessions"]}))
    out = tmp_path / "out"
    out.mkdir()
    written = convert_sheet_session(tmp_path / "sessions.json", "20240102", "s1", out)
    image = sitk.ReadImage(str(written[0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array.astype(np.float32))
    assert json.loads(written[0].with_name(written[0].name.replace(".nii.gz", ".json"))
                      .read_text())["SplitSeries"]["reference_side"] == "left"


def test_sheet_with_two_overlapping_images_of_a_role_refuses_the_second(tmp_path: Path) -> None:
    array = _two_legs()
    whole = _image(array, (2.0, 2.0, 5.0), (-120.0, -60.0, 0.0))
    rows = ["subject\tstudy_date\trole\tpath"]
    for name in ("a", "b", "f"):
        sitk.WriteImage(whole, str(tmp_path / f"{name}.nii.gz"))
    rows += ["s1\t2024-01-02\tT1w\ta.nii.gz", "s1\t2024-01-02\tT1w\tb.nii.gz",
             "s1\t2024-01-02\tfluid\tf.nii.gz"]
    (tmp_path / "s.tsv").write_text("\n".join(rows) + "\n")
    result = index_sheet(tmp_path / "s.tsv", "s1")
    [second] = [r for r in result["index_rows"] if r["series_description"] == "b.nii.gz"]
    assert second["status"] == "refused"
    assert "not the other leg of the first" in second["reason"]


def test_a_composed_session_sees_only_what_one_of_its_series_covers() -> None:
    from pipeline.extent import FieldOfView, Geometry, inside_fovs

    array = _two_legs()
    left, right = _halves(array, 2.0, reach=-10)  # a 40 mm gap in the middle
    composed = split.compose([split.Part("left", left, "L"), split.Part("right", right, "R")],
                             t1_like=False, min_contact_mm=3.0)
    grids = tuple(Geometry.of_record(composed.record["series"][side]["grid"])
                  for side in ("left", "right"))
    fov = FieldOfView(Geometry.of(composed.image), None, (grids,))
    points = np.array([[-100.0, 0.0, 5.0],   # right leg's series
                       [0.0, 0.0, 5.0],      # the gap: in the composed grid, in no series
                       [100.0, 0.0, 5.0],    # left leg's series
                       [200.0, 0.0, 5.0]])   # outside everything
    assert inside_fovs(points, [fov]).tolist() == [True, False, True, False]
    assert inside_fovs(points, [FieldOfView(Geometry.of(composed.image), None)]).tolist() == [
        True, True, True, False]


def test_a_one_leg_field_of_view_restricts_only_the_leg_it_images() -> None:
    from pipeline.extent import FieldOfView, Geometry, inside_fovs

    # a follow-up imaging the left leg alone, in a field of view over x 20..150 mm
    one_leg = _image(np.zeros((4, 60, 66)), (2.0, 2.0, 5.0), (20.0, -60.0, 0.0))
    fov = FieldOfView(Geometry.of(one_leg), None, (), ("left",))
    points = np.array([[-80.0, 0.0, 5.0], [-80.0, 0.0, 5.0], [80.0, 0.0, 5.0]])
    sides = np.array(["right", "left", "left"])
    # the right leg of another session is not narrowed by it; a left-leg point outside it is
    assert inside_fovs(points, [fov], sides).tolist() == [True, False, True]


def test_a_leg_reaching_past_the_middle_keeps_its_own_series_voxels() -> None:
    array = _two_legs()
    nx = array.shape[2]
    # each series sees only its own leg (the other leg lies outside its coil: no signal)
    left_only, right_only = array.copy(), array.copy()
    left_only[:, :, : nx // 2] = 5
    right_only[:, :, nx // 2:] = 5
    # the left leg swells past the middle: 8 columns of it inside the right series' half
    left_only[:, 20:40, nx // 2 - 8: nx // 2] = 600
    reach = 20
    left = _image(left_only[:, :, nx // 2 - reach:], (2.0, 2.0, 5.0),
                  ((nx // 2 - reach) * 2.0 - 120.0, -60.0, 0.0))
    right = _image(right_only[:, :, : nx // 2 + reach], (2.0, 2.0, 5.0), (-120.0, -60.0, 0.0))
    out = sitk.GetArrayFromImage(split.compose(
        [split.Part("left", left, "L"), split.Part("right", right, "R")],
        t1_like=False, min_contact_mm=3.0).image)
    np.testing.assert_array_equal(out[:, 20:40, nx // 2 - 8: nx // 2], 600)
    # elsewhere each half is its own leg's series
    np.testing.assert_array_equal(out[:, :, : nx // 2 - 12],
                                  right_only[:, :, : nx // 2 - 12].astype(np.float32))
    np.testing.assert_array_equal(out[:, :, nx // 2 + 4:],
                                  left_only[:, :, nx // 2 + 4:].astype(np.float32))
