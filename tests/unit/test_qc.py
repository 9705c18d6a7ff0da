"""QC flags: the checks on arrays with known answers, and what a flag does to the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from phantom_cases import small_spec

from pipeline import qc, segment
from pipeline.longitudinal import Visit, classify, longitudinal_rows
from pipeline.measure import collect_flags, measure_subject, volume_rows
from pipeline.validation import phantom

STRUCTURES = ("limb", "soft_tissue", "bone", "marrow_lesion", "edema")


def test_flag_contract_and_unavailable_structures() -> None:
    flags = [
        qc.QCFlag("20240101", "both", qc.FLUID_NOT_FAT_SUPPRESSED, "exclude", "fat bright"),
        qc.QCFlag("20240101", "left", qc.LIMB_CUT_BY_FOV, "warn", "cut", (3, 4)),
        qc.QCFlag("20240201", "both", qc.REGISTRATION_FAILED, "exclude", "Dice 0.4"),
    ]
    gone = qc.unavailable(flags)
    assert gone[("20240101", "left", "edema")] == [qc.FLUID_NOT_FAT_SUPPRESSED]
    assert ("20240101", "left", "limb") not in gone  # a warn flag removes nothing
    assert not qc.session_excluded(flags, "20240101")
    assert qc.session_excluded(flags, "20240201")
    assert qc.codes_for(flags, "20240101", "left") == [qc.FLUID_NOT_FAT_SUPPRESSED,
                                                      qc.LIMB_CUT_BY_FOV]
    assert qc.codes_for(flags, "20240101", "right") == [qc.FLUID_NOT_FAT_SUPPRESSED]
    again = qc.flags_from_json(json.loads(json.dumps([f.to_json() for f in flags])))
    assert again == flags
    with pytest.raises(ValueError, match="unknown QC code"):
        qc.QCFlag("x", "left", "nope", "warn", "")
    with pytest.raises(ValueError, match="severity"):
        qc.QCFlag("x", "left", qc.LIMB_CUT_BY_FOV, "fatal", "")  # type: ignore[arg-type]


def test_void_slices_at_the_ends_warn_and_between_good_ones_exclude() -> None:
    levels = np.array([0.1, 0.3, 0.9, 1.0, 1.0, 1.1, 0.2, 1.0, 0.05])
    void = qc.void_slices([levels], fraction=0.4)
    assert void == [0, 1, 6, 8]
    flag = qc.void_flag("left", void, 9, 0.4)
    assert flag is not None and flag.severity == "exclude"  # slice 6 lies between good ones
    end_only = qc.void_flag("left", [0, 1, 8], 9, 0.4)
    assert end_only is not None and end_only.severity == "warn"
    assert "0-1, 8" in end_only.message
    assert qc.void_flag("left", [], 9, 0.4) is None


def test_slices_a_legs_own_series_does_not_reach_are_named_as_such() -> None:
    flag = qc.void_flag("right", [0, 1, 22, 23], 24, 0.4, uncovered=True)
    assert flag is not None and flag.severity == "warn"
    assert "are not covered by this leg's own series" in flag.message
    assert "coil edge" not in flag.message and "left out of the extent" in flag.message


def test_segmentation_tells_uncovered_slices_from_signal_loss() -> None:
    from pipeline.segment import SegmentSettings, _signal_and_fov_checks

    t1 = np.full((10, 40, 80), 100.0)
    fluid = np.full((10, 40, 80), 50.0)
    t1[:, :, 40:][[0, 1]] = 0.0  # the right leg's series does not reach slices 0-1
    fluid[:, :, 40:][[0, 1]] = 0.0
    fluid[:, :, 40:][9] = 5.0  # slice 9: signal loss (coil edge)
    limbs = {"right": np.zeros((10, 40, 80), bool), "left": np.zeros((10, 40, 80), bool)}
    limbs["right"][:, 10:30, 50:70] = True
    limbs["left"][:, 10:30, 10:30] = True
    _, flags = _signal_and_fov_checks(limbs, t1, fluid, 100.0, 5.0,
                                      SegmentSettings.default())
    messages = sorted(f.message for f in flags if f.side == "right")
    assert len(messages) == 2
    assert messages[0].startswith("slices 0-1 of 10 are not covered by this leg's own series")
    assert messages[1].startswith("slices 9 of 10 have signal below")
    assert not [f for f in flags if f.side == "left"]


def test_border_contact_counts_millimetres_along_the_edge() -> None:
    limb = np.zeros((3, 40, 40), bool)
    limb[0, 10:30, 10:30] = True  # well inside
    limb[1, 10:30, 0:20] = True  # cut: 20 voxels along the left edge
    limb[2, 39:40, 10:12] = True  # touches for 2 voxels only
    assert qc.border_contact_slices(limb, pixel_mm=1.0, min_contact_mm=3.0) == [1]


def test_contrast_ratio_and_flags() -> None:
    img = np.ones((1, 10, 10))
    img[0, :5] = 3.0
    region = np.zeros_like(img, bool)
    region[0, :5] = True
    assert qc.contrast_ratio(img, region, ~region) == pytest.approx(3.0)
    assert qc.contrast_ratio(img, region & False, ~region) is None
    assert qc.t1_like_flag(1.3, 1.0) is None
    assert qc.t1_like_flag(0.4, 1.0).code == qc.ANATOMICAL_NOT_T1_LIKE  # type: ignore[union-attr]
    assert qc.fat_suppression_flag(0.2, 0.7) is None
    flag = qc.fat_suppression_flag(1.1, 0.7)
    assert flag is not None and flag.excluded_structures == ("marrow_lesion", "edema")


def _phantom_images(tmp_path: Path, **kw: object) -> tuple[Path, Path, dict]:
    spec = small_spec(n_slices=8, matrix=(144, 96), sessions=(phantom.SessionSpec(
        day=0, lesion_ml=2.0, edema=0.4),), **kw)
    rendered = phantom.render_session(spec, spec.sessions[0])
    images = phantom.synthesize(spec, rendered, np.random.default_rng(1))
    volumes, _ = phantom.truth_of(spec, rendered)
    for name, key in (("t1", "T1w"), ("fluid", "STIR")):
        sitk.WriteImage(phantom.to_sitk(images[key].astype(np.float32), rendered["grid"]),
                        str(tmp_path / f"{name}.nii.gz"))
    return tmp_path / "t1.nii.gz", tmp_path / "fluid.nii.gz", volumes


def _codes(result: segment.SegmentResult) -> set[str]:
    return {f["code"] for f in result.qc["qc_flags"]}


def test_segmentation_raises_no_flag_on_a_clean_phantom(tmp_path: Path) -> None:
    t1, fluid, _ = _phantom_images(tmp_path)
    result = segment.segment_session(t1, fluid)
    assert _codes(result) == set()
    assert result.qc["contrast"]["fluid_fat_to_muscle"] < 0.7
    assert result.qc["contrast"]["t1_fat_to_muscle"] > 1.0


def test_fluid_without_fat_suppression_is_flagged_and_not_measured(tmp_path: Path) -> None:
    t1, fluid, truth = _phantom_images(tmp_path, stir_fat_suppressed=False)
    result = segment.segment_session(t1, fluid)
    assert qc.FLUID_NOT_FAT_SUPPRESSED in _codes(result)
    labels = sitk.GetArrayFromImage(result.labels)
    assert not np.isin(labels, [2, 4, 6, 8]).any()  # no edema or lesion guessed from fat
    assert truth["left"]["edema"] > 10  # there was edema to find: it is said, not measured


def test_anatomical_image_that_is_not_t1_like_is_flagged(tmp_path: Path) -> None:
    t1, fluid, _ = _phantom_images(tmp_path, t1_like=False)
    result = segment.segment_session(t1, fluid)
    assert qc.ANATOMICAL_NOT_T1_LIKE in _codes(result)


def test_clipped_limb_and_void_slices_are_flagged(tmp_path: Path) -> None:
    spec = small_spec(n_slices=10, sessions=(phantom.SessionSpec(
        day=0, fov_clip_mm=12.0, signal_void_slices=2),))
    rendered = phantom.render_session(spec, spec.sessions[0])
    images = phantom.synthesize(spec, rendered, np.random.default_rng(1))
    for name, key in (("t1", "T1w"), ("fluid", "STIR")):
        sitk.WriteImage(phantom.to_sitk(images[key].astype(np.float32), rendered["grid"]),
                        str(tmp_path / f"{name}.nii.gz"))
    result = segment.segment_session(tmp_path / "t1.nii.gz", tmp_path / "fluid.nii.gz")
    flags = {(f["code"], f["side"]): f for f in result.qc["qc_flags"]}
    assert (qc.LIMB_CUT_BY_FOV, spec.affected_side) in flags
    void = flags[(qc.SIGNAL_VOID_SLICES, spec.affected_side)]
    truth_void = [0, 1, 8, 9]  # two at each end (LPS z ascending)
    assert set(void["slices"]) == set(truth_void)
    assert void["severity"] == "warn"
    labels = sitk.GetArrayFromImage(sitk.DICOMOrient(result.labels, "LPS"))
    assert not labels[truth_void].any()  # void slices are not outlined as limb


def _visit(day: int, soft: float | None, lesion: float | None, edema: float | None,
           qc_codes: tuple[str, ...] = ()) -> Visit:
    aff = {"limb": None if soft is None else soft + 50, "soft_tissue": soft, "bone": 50.0,
           "marrow_lesion": lesion, "edema": edema}
    contra = {"limb": 1050.0, "soft_tissue": 1000.0, "bone": 50.0, "marrow_lesion": 0.0,
              "edema": 0.0}
    return Visit(f"2024-03-{day + 10:02d}", day, aff, contra, list(qc_codes))


def test_label_never_rests_on_an_excluded_session() -> None:
    # the day-5 session would be a flare (+20 pp) but its registration failed
    visits = [_visit(-1, 1000, 5, 50), _visit(5, None, None, None, ("registration_failed",)),
              _visit(20, 1005, 5, 50)]
    p = classify(visits)
    assert p.classification == "stable"
    assert not p.flares
    assert any("left out of the pattern" in r and "registration_failed" in r for r in p.reasons)
    # the last session excluded: what is left decides from the sessions before it
    visits = [_visit(-1, 1000, 5, 50), _visit(5, 1200, 9, 200),
              _visit(20, None, None, None, ("anatomical_not_t1_like",))]
    p = classify(visits)
    assert p.classification == "progression"
    assert p.flares and p.flares[0]["day"] == 5


def test_unavailable_structures_make_resolution_indeterminate() -> None:
    # edema and lesion not available at the last session: resolution cannot be stated
    visits = [_visit(-1, 1000, 5, 50), _visit(5, 1200, 9, 200),
              _visit(20, 1000, None, None, ("fluid_not_fat_suppressed",))]
    p = classify(visits)
    assert p.classification == "indeterminate"
    assert any("fluid_not_fat_suppressed" in r for r in p.reasons)
    # nothing after the baseline passed QC
    visits = [_visit(-1, 1000, 5, 50), _visit(5, None, None, None, ("registration_failed",))]
    assert classify(visits).classification == "indeterminate"
    # the baseline itself failed
    visits = [_visit(-1, None, None, None, ("anatomical_not_t1_like",)), _visit(5, 1000, 5, 50)]
    assert classify(visits).classification == "indeterminate"


def test_unavailable_values_are_empty_in_the_tables_never_zero() -> None:
    visits = [_visit(-1, 1000, 5, 50), _visit(5, 1100, None, None, ("fluid_not_fat_suppressed",))]
    rows = {(r["day"], r["structure"]): r for r in longitudinal_rows("s", visits)}
    assert rows[(5, "edema")]["affected_ml"] is None
    assert rows[(5, "edema")]["change_from_baseline_pct"] is None
    assert rows[(5, "edema")]["qc"] == "fluid_not_fat_suppressed"
    assert rows[(5, "soft_tissue")]["affected_ml"] == 1100.0


def _write_map(path: Path, arr: np.ndarray, spacing: float = 2.0) -> Path:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing((spacing, spacing, 5.0))
    sitk.WriteImage(img, str(path))
    return path


def test_measure_applies_flags_and_the_common_field_of_view(tmp_path: Path) -> None:
    """Session 2's left limb is cut by its image edge: both sessions count only what both
    fields of view hold; session 3 failed registration: n/a and no effect on the extent."""
    arr = np.zeros((6, 40, 60), np.uint8)
    arr[:, 10:30, 2:22] = 1  # right limb
    arr[:, 10:30, 30:58] = 5  # left limb, 28 columns wide
    arr[:, 15:20, 8:12] = 3
    arr[:, 15:20, 40:44] = 7
    base = _write_map(tmp_path / "sub-P_ses-20240101_dseg.nii.gz", arr)
    clipped = _write_map(tmp_path / "sub-P_ses-20240110_dseg.nii.gz", arr[:, :, :52])
    failed = _write_map(tmp_path / "sub-P_ses-20240120_dseg.nii.gz", arr[:, :, :])
    sidecar = tmp_path / "qc2.json"
    sidecar.write_text(json.dumps({"qc_flags": [qc.QCFlag(
        "", "left", qc.LIMB_CUT_BY_FOV, "warn", "cut").to_json()]}))
    xfm_json = tmp_path / "xfm3.json"
    xfm_json.write_text(json.dumps({"poor": True, "poor_reasons": ["bone Dice 0.41 < 0.70"]}))
    sessions = [
        {"session": "20240101", "study_date": "2024-01-01", "dseg": str(base)},
        {"session": "20240110", "study_date": "2024-01-10", "dseg": str(clipped),
         "qc": str(sidecar)},
        {"session": "20240120", "study_date": "2024-01-20", "dseg": str(failed),
         "xfm_json": str(xfm_json)},
    ]
    flags = collect_flags(sessions)
    assert [(f.session, f.code) for f in flags] == [("20240110", qc.LIMB_CUT_BY_FOV),
                                                    ("20240120", qc.REGISTRATION_FAILED)]
    measured, side, _, extent = measure_subject("P", "2024-01-05", sessions, "left",
                                                "20240101", flags)
    voxel_ml = 2.0 * 2.0 * 5.0 / 1000
    left_in_view = 6 * 20 * (52 - 30) * voxel_ml  # columns 30..51 only
    assert measured[0].volumes_ml["left"]["limb"] == pytest.approx(left_in_view)
    assert measured[1].volumes_ml["left"]["limb"] == pytest.approx(left_in_view)
    assert measured[0].volumes_ml["right"]["limb"] == pytest.approx(6 * 20 * 20 * voxel_ml)
    assert all(v is None for v in measured[2].volumes_ml["left"].values())
    rows = volume_rows("P", measured, side)
    third = [r for r in rows if r["study_date"] == "2024-01-20"]
    assert all(r["volume_ml"] is None and r["qc"] == qc.REGISTRATION_FAILED for r in third)
    assert "in_plane" in extent
