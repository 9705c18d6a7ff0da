"""Phantom split layout (issue 18): each leg in its own T1 and STIR series of the study."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from phantom_cases import small_spec

from pipeline.labels import SIDE_OFFSET
from pipeline.validation import phantom

LESION = phantom.SessionSpec(day=0, swelling=0.1, lesion_ml=2.0, edema=0.4, split_series=True)


def _series(folder: Path) -> dict[int, list[pydicom.Dataset]]:
    """Series number -> its slices (pixels read), ordered by position along z."""
    out: dict[int, list[pydicom.Dataset]] = {}
    for f in folder.rglob("IM*"):
        ds = pydicom.dcmread(f)
        out.setdefault(int(ds.SeriesNumber), []).append(ds)
    for dss in out.values():
        dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return out


def _x_of_columns(ds: pydicom.Dataset) -> np.ndarray:
    """LPS x (mm) of each column of a slice (axial: the row direction is +-x)."""
    row_x = float(ds.ImageOrientationPatient[0])
    return float(ds.ImagePositionPatient[0]) + row_x * float(ds.PixelSpacing[1]) * np.arange(
        int(ds.Columns))


@pytest.fixture(scope="module")
def split_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Right series: 1.4 mm pixels, field of view moved by a fraction of a pixel, 2 slices
    fewer, gain 0.8, its STIR tagged as the left leg's."""
    spec = small_spec(n_slices=4, sessions=(LESION,), split_right_pixel_mm=1.4,
                      split_right_offset_mm=(0.53, -0.31), split_right_extra_slices=-2,
                      split_right_gain=0.8, split_wrong_laterality="right:STIR")
    out = tmp_path_factory.mktemp("split")
    return out, phantom.generate(spec, out)


def test_each_series_holds_one_leg_centred_in_its_field_of_view(
        split_case: tuple[Path, dict[str, Any]]) -> None:
    out, truth = split_case
    series = _series(out / "dicom" / "ST0001")
    assert sorted(series) == [3, 4, 5, 6]
    lab = nib.load(out / truth["sessions"][0]["label_map"])
    labels = np.asarray(lab.dataobj)  # [x, y, z], RAS affine
    lps_x = -nib.affines.apply_affine(lab.affine, np.c_[np.arange(labels.shape[0]),
                                                        np.zeros((labels.shape[0], 2))])[:, 0]
    for entry in truth["sessions"][0]["series"]:
        dss = series[entry["series_number"]]
        x = _x_of_columns(dss[0])
        sign = 1.0 if entry["side"] == "left" else -1.0  # LPS: +x is the patient's left
        assert sign * x.mean() > 40.0  # the field of view is centred on its leg's side
        # it holds the whole leg (per the truth label map, with a pixel to spare)
        leg = np.isin(labels, [SIDE_OFFSET[entry["side"]] + c for c in (1, 2, 3, 4)])
        leg_x = lps_x[leg.any(axis=(1, 2))]
        assert x.min() < leg_x.min() - 1.0 and x.max() > leg_x.max() + 1.0
        # and that leg alone: beyond the midline there is noise only, as in the anterior air
        img = np.stack([d.pixel_array.T for d in dss]).astype(float)  # [z, x, y]
        noise = float(img[:, :, :3].mean())
        assert img[:, sign * x < 0].mean() < 1.2 * noise < 0.6 * img[:, sign * x > 20].mean()
        assert [d.Rows for d in dss[:1]] == [entry["shape_zyx"][1]]
        assert len(dss) == entry["shape_zyx"][0]


def test_tags_descriptions_and_the_right_series_variations(
        split_case: tuple[Path, dict[str, Any]]) -> None:
    out, truth = split_case
    series = _series(out / "dicom" / "ST0001")
    tags = {n: (d[0].Laterality, d[0].SeriesDescription) for n, d in series.items()}
    assert tags == {3: ("L", "T1 TSE AX LT"), 4: ("L", "STIR AX LT"),
                    5: ("R", "T1 TSE AX RT"), 6: ("L", "STIR AX LT")}  # 6 is wrong on purpose
    wrong = [e["series_number"] for e in truth["sessions"][0]["series"]
             if e["laterality_tag_wrong"]]
    assert wrong == [6]
    left, right = series[3][0], series[5][0]
    assert float(left.PixelSpacing[0]) == 1.6 and float(right.PixelSpacing[0]) == 1.4
    assert (len(series[3]), len(series[5])) == (4, 2)
    assert {left.StudyInstanceUID, left.FrameOfReferenceUID} == {
        right.StudyInstanceUID, right.FrameOfReferenceUID}
    assert left.SeriesInstanceUID != right.SeriesInstanceUID
    assert (left.ReceiveCoilName, right.ReceiveCoilName) == (phantom.EXTREMITY_COIL,
                                                             phantom.OTHER_COIL)
    # the right grid is off the left one by a fraction of a pixel in x and y
    off = (np.array(right.ImagePositionPatient[:2], float)
           - np.array(left.ImagePositionPatient[:2], float)) / 1.6
    assert np.all(np.abs(off - np.round(off)) > 0.05)
    # the right slices lie on left slices (2 fewer, one dropped at each end)
    z_left = [float(d.ImagePositionPatient[2]) for d in series[3]]
    assert [float(d.ImagePositionPatient[2]) for d in series[5]] == pytest.approx(z_left[1:3])


def test_gain_scales_the_right_series() -> None:
    """Same anatomy mirrored: the right leg's tissue signal is 0.8 x the left's."""
    base = small_spec(n_slices=2, bias=0.0, sessions=(phantom.SessionSpec(day=0,
                                                                          split_series=True),))
    spec = dataclasses.replace(base, split_right_gain=0.8)
    split = phantom.render_split_session(spec, spec.sessions[0])
    levels = {}
    for side, g in split["grids"].items():
        gain = spec.split_right_gain if side == "right" else 1.0
        img = phantom.synthesize(spec, {"grid": g, "fractions": split["series"][side]},
                                 np.random.default_rng(0), gain)["T1w"].astype(float)
        s_idx = 0 if side == "right" else 1
        muscle = split["series"][side][s_idx * phantom.N_TISSUES + phantom.MUSCLE] > 0.999
        levels[side] = float(np.median(img[muscle]))
    assert levels["right"] / levels["left"] == pytest.approx(0.8, abs=0.02)


def test_truth_is_the_unsplit_twins_and_the_label_map_holds_both_legs(tmp_path: Path) -> None:
    spec = small_spec(n_slices=4, sessions=(LESION,), split_right_pixel_mm=1.4,
                      split_right_offset_mm=(0.53, -0.31))
    twin = dataclasses.replace(spec, sessions=(dataclasses.replace(LESION, split_series=False),))
    split = phantom.generate(spec, tmp_path / "split")["sessions"][0]
    unsplit = phantom.generate(twin, tmp_path / "twin")["sessions"][0]
    for side in ("left", "right"):
        for structure, rel in (("limb", 0.003), ("soft_tissue", 0.003), ("bone", 0.01),
                               ("marrow_lesion", 0.02), ("edema", 0.03)):
            want = unsplit["volumes_ml"][side][structure]
            assert split["volumes_ml"][side][structure] == pytest.approx(want, rel=rel, abs=1e-9)
    assert split["soft_tissue_asymmetry_pct"] == pytest.approx(
        unsplit["soft_tissue_asymmetry_pct"], abs=0.3)
    assert split["volumes_ml_series"] == split["volumes_ml"]  # same slices: one slab
    assert split["fov_clipped_sides"] == []
    lab = nib.load(tmp_path / "split" / split["label_map"])
    labels = np.asarray(lab.dataobj)
    voxel_ml = abs(np.linalg.det(lab.affine[:3, :3])) / 1000.0
    for side in ("left", "right"):
        limb = np.isin(labels, [SIDE_OFFSET[side] + c for c in (1, 2, 3, 4)]).sum() * voxel_ml
        assert limb == pytest.approx(split["volumes_ml"][side]["limb"], rel=0.02)


def test_common_slab_volumes_when_the_right_series_is_shorter(
        split_case: tuple[Path, dict[str, Any]]) -> None:
    s = split_case[1]["sessions"][0]
    for side in ("left", "right"):
        whole, common = s["volumes_ml_series"][side], s["volumes_ml"][side]
        if side == "right":
            assert whole == common
        else:  # 4 slices against the right's 2 central ones: about half (the thigh tapers)
            assert 0.4 < common["limb"] / whole["limb"] < 0.6


def test_affected_leg_alone_in_its_own_series(tmp_path: Path) -> None:
    spec = small_spec(n_slices=2, affected_side="right", sessions=(
        phantom.SessionSpec(day=0, split_series=True),
        phantom.SessionSpec(day=7, lesion_ml=1.0, split_series=True, affected_only=True)))
    truth = phantom.generate(spec, tmp_path)
    assert sorted(p.name for p in (tmp_path / "dicom" / "ST0002").iterdir()) == [
        "SE0005", "SE0006"]
    s0, s1 = truth["sessions"]
    assert {e["side"] for e in s1["series"]} == {"right"}
    assert s1["volumes_ml"]["left"]["limb"] == 0.0
    assert s1["contralateral_truth_session"] == s0["session"]
    assert s1["volumes_ml"]["right"]["bone"] == pytest.approx(s0["volumes_ml"]["right"]["bone"])


def test_cli_and_truth_json_of_the_split_options(tmp_path: Path) -> None:
    args = phantom.build_parser().parse_args([
        "out", "--sessions=0:0:2:0,7:0:2:0", "--split-series", "--split-right-pixel-mm", "1.4",
        "--split-right-offset-mm", "0.5,-0.3", "--split-right-extra-slices=-2",
        "--split-right-gain", "0.8", "--split-wrong-laterality", "right:STIR"])
    spec = phantom.spec_from_args(args)
    assert [s.split_series for s in spec.sessions] == [True, True]
    assert (spec.split_right_pixel_mm, spec.split_right_offset_mm) == (1.4, (0.5, -0.3))
    assert (spec.split_right_extra_slices, spec.split_right_gain) == (-2, 0.8)
    some = phantom.build_parser().parse_args(["out", "--sessions=0:0:2:0,7:0:2:0",
                                              "--split-series", "2"])
    assert [s.split_series for s in phantom.spec_from_args(some).sessions] == [False, True]
    for bad in ({"split_right_extra_slices": 1}, {"split_wrong_laterality": "up"}):
        with pytest.raises(ValueError):
            small_spec(**bad)
    with pytest.raises(ValueError):
        phantom.SessionSpec(day=0, split_series=True, fov_clip_mm=5.0)
    # the split options appear in truth.json only when a session uses them
    assert "split_right_gain" in phantom._spec_json(spec)
    plain = phantom._spec_json(small_spec(region="calf"))
    assert "split_right_gain" not in plain and "split_series" not in plain["sessions"][0]
    assert json.dumps(plain)  # serialisable


def test_accuracy_split_cases_and_their_bilateral_twins() -> None:
    from pipeline.validation import evaluation as ev

    by_name = {c.name: c for c in (*ev.SPLIT_TWINS, *ev.CONTRALATERAL_SUITE)}
    defaults = {k: getattr(phantom.PhantomSpec(), k) for k in phantom._SPLIT_SPEC_KEYS}

    def spec(case: ev.Case) -> phantom.PhantomSpec:
        return phantom.spec_from_args(phantom.build_parser().parse_args(["out", *case.options]))

    for case in ev.SPLIT_SUITE:
        s = spec(case)
        assert all(x.split_series for x in s.sessions), case.name
        if case.twin:  # the twin: the same patient and visits, imaged bilaterally
            unsplit = dataclasses.replace(s, **defaults, sessions=tuple(
                dataclasses.replace(x, split_series=False) for x in s.sessions))
            assert unsplit == spec(by_name[case.twin]), case.name
            assert case.expect_label == by_name[case.twin].expect_label


def test_twin_differences_and_summary() -> None:
    from pipeline.validation import evaluation as ev

    case = {("2024-01-01", "left", "limb"): 101.0, ("2024-01-01", "left", "edema"): 5.5,
            ("2024-01-01", "right", "limb"): None}
    twin = {("2024-01-01", "left", "limb"): 100.0, ("2024-01-01", "left", "edema"): 5.0,
            ("2024-01-01", "right", "limb"): 99.0}
    rows = ev.twin_differences(case, twin, {("2024-01-01", "left", "limb"): 100.5},
                               {("2024-01-01", "left", "limb"): 100.0})
    by = {(r["side"], r["structure"]): r for r in rows}
    assert by[("left", "limb")]["diff_pct"] == pytest.approx(1.0)
    assert by[("left", "limb")]["true_diff_pct"] == pytest.approx(0.5)
    assert by[("right", "limb")]["diff_pct"] is None
    assert by[("right", "limb")]["imaged"] is False  # no limb measured: not imaged
    summary = ev.summarise_twin("a", "b", rows)
    assert summary["limb_worst_pct"] == pytest.approx(1.0)
    assert summary["edema_worst_pct"] is None  # 5 mL edema: below the 10 mL that is scored


def test_the_index_pairs_the_phantoms_series_by_geometry(tmp_path: Path) -> None:
    """The workflow's index (pipeline.io) reads a split phantom as intended: one session whose
    roles each have a left and a right part (left = series 3/4), the wrong tag warned; a
    follow-up of the affected leg alone is a one-part session."""
    from pipeline.io.scan import index_folder
    from pipeline.io.selection import select_sessions, split_warnings

    spec = small_spec(n_slices=3, supersample_xy=1, supersample_z=1, sessions=(
        phantom.SessionSpec(day=0, split_series=True),
        phantom.SessionSpec(day=7, split_series=True, affected_only=True)),
        split_right_offset_mm=(0.5, 0.3), split_wrong_laterality="right")
    phantom.generate(spec, tmp_path)
    sessions, refused = select_sessions(index_folder(tmp_path / "dicom").series)
    assert refused == [] and len(sessions) == 2
    first, follow_up = sorted(sessions, key=lambda s: s["session"])
    for role in ("anatomical", "fluid"):
        parts = first[role]["parts"]
        assert [p["side"] for p in parts] == ["left", "right"]
        assert [p["series_number"] for p in parts] == (
            [3, 5] if role == "anatomical" else [4, 6])
        assert "parts" not in follow_up[role]
    warnings = split_warnings([first])
    assert len(warnings) == 2 and all("geometry shows the right leg" in w for w in warnings)
