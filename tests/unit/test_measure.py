"""Unit tests of pipeline.measure: volumes from label maps, affected side, volumes.tsv rows.

Ground truth by construction: label maps are filled with known voxel counts, so every volume is
``count * voxel_mm3 / 1000`` mL.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.measure import (
    Session,
    SessionVolumes,
    as_session,
    collect_flags,
    default_baseline,
    infer_affected_side,
    main,
    measure_label_map,
    measure_subject,
    read_session,
    session_day,
    volume_rows,
    volumes_from_labels,
)

# docs/design.md output contract, written out here on purpose (not imported from the module).
DESIGN_VOLUME_COLUMNS = ["subject", "study_date", "day", "side", "role", "structure",
                         "volume_ml"]
DESIGN_STRUCTURES = ["limb", "soft_tissue", "bone", "marrow_lesion", "edema"]

# voxels per label value (0 = background); right uses 1..4, left 5..8
COUNTS = {0: 100, 1: 40, 2: 10, 3: 20, 4: 0, 5: 30, 6: 25, 7: 20, 8: 5}


def expected_counts(counts: dict[int, int]) -> dict[str, dict[str, int]]:
    def side(o: int) -> dict[str, int]:
        st, ed, bo, le = (counts.get(o + c, 0) for c in (1, 2, 3, 4))
        return {"limb": st + ed + bo + le, "soft_tissue": st + ed, "bone": bo + le,
                "marrow_lesion": le, "edema": ed}

    return {"right": side(0), "left": side(4)}


def label_array(counts: dict[int, int], shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A label array of `shape` holding exactly counts[v] voxels of value v, shuffled."""
    values = np.concatenate([np.full(n, v, dtype=np.uint8) for v, n in counts.items()])
    assert values.size == int(np.prod(shape)), "counts must fill the shape"
    np.random.default_rng(seed).shuffle(values)
    return values.reshape(shape)


def write_dseg(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def sv(left: dict[str, float], right: dict[str, float], date: str = "2024-03-01",
       day: int = 0) -> SessionVolumes:
    def full(d: dict[str, float]) -> dict[str, float]:
        return {s: float(d.get(s, 0.0)) for s in DESIGN_STRUCTURES}

    return SessionVolumes(date.replace("-", ""), date, day,
                          {"left": full(left), "right": full(right)}, (0.0, 1.0), 1)


# ------------------------------------------------------------------ volumes_from_labels


def test_volumes_from_labels_counts_times_voxel_volume_anisotropic():
    labels = label_array(COUNTS, (10, 5, 5))  # 250 voxels
    voxel_mm3 = 0.5 * 0.8 * 3.0  # anisotropic spacing (mm)
    vols = volumes_from_labels(labels, voxel_mm3)
    truth = expected_counts(COUNTS)
    assert set(vols) == {"left", "right"}
    for side in ("left", "right"):
        assert list(vols[side]) == DESIGN_STRUCTURES
        for structure, n in truth[side].items():
            assert vols[side][structure] == pytest.approx(n * voxel_mm3 / 1000.0, rel=1e-12)


def test_volumes_from_labels_mm3_to_ml_exact():
    # 10 x 10 x 10 mm voxels: one voxel is exactly 1 mL, so volume_ml == voxel count.
    labels = label_array(COUNTS, (5, 5, 10))
    vols = volumes_from_labels(labels, 1000.0)
    truth = expected_counts(COUNTS)
    for side in ("left", "right"):
        for structure, n in truth[side].items():
            assert vols[side][structure] == float(n)
    assert vols["left"]["limb"] == 80.0
    assert vols["right"]["marrow_lesion"] == 0.0


def test_volumes_from_labels_empty_and_any_dtype():
    zeros = np.zeros((3, 4, 5), dtype=np.int16)
    vols = volumes_from_labels(zeros, 1.0)
    assert all(v == 0.0 for side in vols.values() for v in side.values())
    # float storage of integer labels, any shape (here 2-D), input not modified
    labels = np.array([[5.0, 6.0], [8.0, 1.0]], dtype=np.float32)
    before = labels.copy()
    vols = volumes_from_labels(labels, 1000.0)
    assert vols["left"] == {"limb": 3.0, "soft_tissue": 2.0, "bone": 1.0,
                            "marrow_lesion": 1.0, "edema": 1.0}
    assert vols["right"]["soft_tissue"] == 1.0
    np.testing.assert_array_equal(labels, before)


def test_soft_tissue_is_limb_minus_bone():
    vols = volumes_from_labels(label_array(COUNTS, (10, 25)), 2.0)
    for side in vols.values():
        assert side["soft_tissue"] == pytest.approx(side["limb"] - side["bone"])
        assert side["bone"] >= side["marrow_lesion"]


# ------------------------------------------------------------------ measure_label_map


def test_measure_label_map_uses_zooms_and_affine_z(tmp_path):
    shape = (10, 5, 6)  # i, j, k; k is superior-inferior
    counts = {0: 150, 1: 60, 5: 60, 8: 30}
    zooms = (0.5, 0.75, 3.0)  # binary-exact: NIfTI stores pixdim as float32
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-20.0, 10.0, -100.0)
    path = write_dseg(tmp_path / "d.nii.gz", label_array(counts, shape), affine)
    vols, z_range, n_slices = measure_label_map(path)
    voxel_mm3 = 0.5 * 0.75 * 3.0
    assert vols["left"]["limb"] == pytest.approx(90 * voxel_mm3 / 1000.0, rel=1e-12)
    assert vols["left"]["marrow_lesion"] == pytest.approx(30 * voxel_mm3 / 1000.0, rel=1e-12)
    assert vols["right"]["soft_tissue"] == pytest.approx(60 * voxel_mm3 / 1000.0, rel=1e-12)
    # voxel centres of slices k = 0 .. 5 at z = -100 + 3 k
    assert z_range == pytest.approx((-100.0, -85.0))
    assert n_slices == 6


def test_measure_label_map_z_from_permuted_flipped_affine(tmp_path):
    # voxel axis 1 runs inferior (z decreasing), axis 2 runs anterior-posterior
    shape = (4, 7, 3)
    affine = np.array([[2.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 1.5, 5.0],
                       [0.0, -4.0, 0.0, 50.0],
                       [0.0, 0.0, 0.0, 1.0]])
    path = write_dseg(tmp_path / "d.nii.gz", np.full(shape, 5, dtype=np.uint8), affine)
    vols, z_range, n_slices = measure_label_map(path)
    assert n_slices == 7
    assert z_range == pytest.approx((50.0 - 4.0 * 6, 50.0))
    assert vols["left"]["limb"] == pytest.approx(4 * 7 * 3 * (2.0 * 4.0 * 1.5) / 1000.0)
    assert vols["right"]["limb"] == 0.0


# ------------------------------------------------------------------ infer_affected_side


def test_side_from_lesion_first():
    # more lesion on the left (>= 1 mL), although the right has more edema and soft tissue
    s = [sv(left={"marrow_lesion": 3.0, "soft_tissue": 900, "edema": 0},
            right={"marrow_lesion": 1.0, "soft_tissue": 1000, "edema": 50})]
    side, why = infer_affected_side(s)
    assert side == "left"
    assert "marrow lesion" in why and "3.0" in why and "1.0" in why


def test_side_lesion_summed_over_sessions():
    # 0.6 mL more per session, 1.2 mL over two sessions
    s = [sv(left={"marrow_lesion": 0.6}, right={}, date="2024-03-01"),
         sv(left={"marrow_lesion": 0.6}, right={}, date="2024-03-10")]
    side, why = infer_affected_side(s)
    assert side == "left"
    assert "2 session(s)" in why


def test_side_from_edema_when_lesion_does_not_decide():
    s = [sv(left={"marrow_lesion": 0.5, "edema": 5.0, "soft_tissue": 1000},
            right={"marrow_lesion": 0.0, "edema": 15.0, "soft_tissue": 1000})]
    side, why = infer_affected_side(s)
    assert side == "right"
    assert why.startswith("edema")


def test_side_edema_margin_10_ml():
    s = [sv(left={"edema": 9.9, "soft_tissue": 1000}, right={"soft_tissue": 1000})]
    assert infer_affected_side(s)[0] is None
    s = [sv(left={"edema": 10.0, "soft_tissue": 1000}, right={"soft_tissue": 1000})]
    assert infer_affected_side(s)[0] == "left"


def test_side_from_soft_tissue_when_lesion_and_edema_do_not_decide():
    s = [sv(left={"soft_tissue": 1000.0}, right={"soft_tissue": 1030.0})]
    side, why = infer_affected_side(s)
    assert side == "right"
    assert why.startswith("soft tissue")


def test_side_none_when_symmetric():
    s = [sv(left={"soft_tissue": 1000.0, "edema": 3.0, "marrow_lesion": 0.2},
            right={"soft_tissue": 1005.0, "edema": 1.0, "marrow_lesion": 0.0})]
    side, why = infer_affected_side(s)
    assert side is None
    assert "no side" in why
    empty = [sv(left={}, right={})]
    assert infer_affected_side(empty)[0] is None


# ------------------------------------------------------------------ rows


def test_session_day():
    assert session_day("2024-03-01", "2024-03-01") == 0
    assert session_day("2024-02-25", "2024-03-01") == -5  # 2024 is a leap year
    assert session_day("2024-03-15", "2024-03-01") == 14


@pytest.mark.parametrize("affected", ["left", "right"])
def test_volume_rows_roles_follow_affected_side(affected):
    contra = "right" if affected == "left" else "left"
    sessions = [sv(left={"limb": 2000.1234, "soft_tissue": 1500, "marrow_lesion": 4.0},
                   right={"limb": 1900, "soft_tissue": 1400}, date="2024-02-28", day=-2),
                sv(left={"limb": 2100}, right={"limb": 1950}, date="2024-03-04", day=3)]
    rows = volume_rows("P1", sessions, affected)
    assert len(rows) == 2 * 2 * 5  # sessions x sides x structures
    for row in rows:
        assert list(row) == [*DESIGN_VOLUME_COLUMNS, "qc", "volume_ml_ci95", "session"]
        assert row["subject"] == "P1"
        assert row["role"] == ("affected" if row["side"] == affected else "contralateral")
    per_session = [r for r in rows if r["study_date"] == "2024-02-28"]
    assert [r["side"] for r in per_session] == [affected] * 5 + [contra] * 5
    assert [r["structure"] for r in per_session] == DESIGN_STRUCTURES * 2
    assert {r["day"] for r in per_session} == {-2}
    left_limb = next(r for r in per_session if r["side"] == "left" and r["structure"] == "limb")
    assert left_limb["volume_ml"] == 2000.123  # rounded to 0.001 mL
    lesion = next(r for r in per_session
                  if r["side"] == "left" and r["structure"] == "marrow_lesion")
    assert lesion["volume_ml"] == 4.0


# ------------------------------------------------------------------ measure_subject / main

AFFINE = np.diag([10.0, 10.0, 10.0, 1.0])  # 1 mL voxels


def _subject_files(tmp_path: Path, left_lesion: int = 5) -> list[dict[str, str]]:
    """Two sessions (given out of date order); counts in mL since voxels are 1 mL."""
    out = []
    for date, extra in (("2024-03-15", 0), ("2024-02-25", 3)):
        counts = {0: 20, 1: 30, 5: 30 + extra, 6: 2, 7: 10, 8: left_lesion, 3: 15 - left_lesion}
        counts[0] = 120 - sum(v for k, v in counts.items() if k)
        label = date.replace("-", "")
        path = write_dseg(tmp_path / f"sub-P1_ses-{label}_dseg.nii.gz",
                          label_array(counts, (4, 5, 6)), AFFINE)
        out.append({"session": label, "study_date": date, "dseg": str(path)})
    return out


def test_measure_subject_sorted_with_days_and_auto_side(tmp_path):
    measured, side, how, extent = measure_subject(
        "P1", "2024-03-01", _subject_files(tmp_path), "auto"
    )
    assert extent["method"] == "common extent after registration"
    assert [m.study_date for m in measured] == ["2024-02-25", "2024-03-15"]
    assert [m.session for m in measured] == ["20240225", "20240315"]
    assert [m.day for m in measured] == [-5, 14]
    assert side == "left"
    assert how.startswith("automatic") and "marrow lesion" in how
    assert measured[0].volumes_ml["left"]["soft_tissue"] == 35.0  # 33 + 2 edema voxels
    assert measured[1].volumes_ml["left"]["marrow_lesion"] == 5.0
    assert measured[0].n_slices == 6
    assert measured[0].z_range_mm == (0.0, 50.0)


@pytest.mark.parametrize("given", ["left", "right"])
def test_measure_subject_configured_side_wins(tmp_path, given):
    _, side, how, _ = measure_subject("P1", "2024-03-01", _subject_files(tmp_path), given)
    assert side == given
    assert how == "configuration"


def test_measure_subject_bad_side(tmp_path):
    with pytest.raises(ValueError, match="left, right or auto.*'both'"):
        measure_subject("P1", "2024-03-01", _subject_files(tmp_path), "both")


def test_measure_subject_auto_undecidable(tmp_path):
    # mirror-image sides: no lesion, no edema, the same soft tissue and bone
    sym = {0: 60, 1: 30, 3: 10, 5: 30, 7: 10, 4: 0, 8: 0}
    path = write_dseg(tmp_path / "sub-P1_ses-20240301_dseg.nii.gz",
                      label_array(sym, (4, 5, 7)), AFFINE)
    sessions = [{"session": "20240301", "study_date": "2024-03-01", "dseg": str(path)}]
    with pytest.raises(ValueError, match="affected_side=left or right"):
        measure_subject("P1", "2024-03-01", sessions, "auto")


def _run_main(tmp_path: Path, side: str, files: list[dict[str, str]] | None = None) -> Path:
    files = files if files is not None else _subject_files(tmp_path)
    sessions_json = tmp_path / "sessions.json"
    sessions_json.write_text(json.dumps({"sessions": [
        {"session": f["session"], "study_date": f["study_date"]} for f in files]}))
    out = tmp_path / "out" / "volumes.tsv"
    rc = main(["--subject", "P1", "--day0", "2024-03-01", "--affected-side", side,
               "--sessions-json", str(sessions_json), "--dseg", *[f["dseg"] for f in files],
               "--out", str(out), "--side-json", str(tmp_path / "out" / "side.json")])
    assert rc == 0
    return out


def test_main_end_to_end(tmp_path, capsys):
    out = _run_main(tmp_path, "auto")
    with open(out, newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        rows = [dict(zip(header, r, strict=True)) for r in reader]
    assert header == [*DESIGN_VOLUME_COLUMNS, "qc", "volume_ml_ci95", "session"]
    assert len(rows) == 2 * 10
    assert [r["study_date"] for r in rows[::10]] == ["2024-02-25", "2024-03-15"]
    assert {r["day"] for r in rows} == {"-5", "14"}
    lesion = {(r["study_date"], r["side"]): r["volume_ml"] for r in rows
              if r["structure"] == "marrow_lesion"}
    assert lesion == {("2024-02-25", "left"): "5", ("2024-02-25", "right"): "0",
                      ("2024-03-15", "left"): "5", ("2024-03-15", "right"): "0"}
    assert all(r["role"] == "affected" for r in rows if r["side"] == "left")
    side = json.loads((tmp_path / "out" / "side.json").read_text())
    assert side["affected_side"] == "left"
    assert side["affected_side_source"].startswith("automatic")
    assert [s["session"] for s in side["sessions"]] == ["20240225", "20240315"]
    assert side["sessions"][0] == {"session": "20240225", "study_date": "2024-02-25",
                                   "day": -5, "z_range_mm": [0.0, 50.0], "n_slices": 6,
                                   "pixel_mm": 10.0, "slice_mm": 10.0,
                                   "misregistration_mm": 0.0}
    assert "affected side left" in capsys.readouterr().out


def test_main_configured_right_side(tmp_path):
    out = _run_main(tmp_path, "right")
    text = out.read_text().splitlines()
    assert text[1].split("\t")[3:6] == ["right", "affected", "limb"]
    assert text[6].split("\t")[3:5] == ["left", "contralateral"]


def test_main_dseg_not_in_sessions_json(tmp_path, capsys):
    files = _subject_files(tmp_path)
    sessions_json = tmp_path / "sessions.json"
    sessions_json.write_text(json.dumps({"sessions": [
        {"session": files[0]["session"], "study_date": files[0]["study_date"]}]}))
    with pytest.raises(SystemExit) as exc:
        main(["--subject", "P1", "--day0", "2024-03-01", "--affected-side", "left",
              "--sessions-json", str(sessions_json), "--dseg", *[f["dseg"] for f in files],
              "--out", str(tmp_path / "v.tsv"), "--side-json", str(tmp_path / "s.json")])
    assert exc.value.code == 2
    assert "20240225 is not listed" in capsys.readouterr().err
    assert not (tmp_path / "v.tsv").exists()


# ------------------------------------------------------------------ sessions, baseline


def test_default_baseline_is_the_last_session_on_or_before_day_0(tmp_path):
    files = _subject_files(tmp_path)  # 2024-03-15 and 2024-02-25
    sessions = [as_session(f, "2024-03-20") for f in files]
    assert default_baseline(sessions) == "20240315"  # both before day 0: the last
    sessions = [as_session(f, "2024-03-01") for f in files]
    assert default_baseline(sessions) == "20240225"
    sessions = [as_session(f, "2024-02-01") for f in files]
    assert default_baseline(sessions) == "20240225"  # none before day 0: the first
    with pytest.raises(ValueError, match="no sessions"):
        default_baseline([])


def test_main_without_baseline_uses_the_baseline_rule(tmp_path):
    files = _subject_files(tmp_path)
    sessions_json = tmp_path / "sessions.json"
    sessions_json.write_text(json.dumps({"sessions": [
        {"session": f["session"], "study_date": f["study_date"]} for f in files]}))
    side_json = tmp_path / "side.json"
    assert main(["--subject", "P1", "--day0", "2024-03-20", "--affected-side", "left",
                 "--sessions-json", str(sessions_json), "--dseg", *[f["dseg"] for f in files],
                 "--out", str(tmp_path / "v.tsv"), "--side-json", str(side_json)]) == 0
    side = json.loads(side_json.read_text())
    assert side["baseline_session"] == "20240315"
    assert [s["day"] for s in side["sessions"]] == [-24, -5]


def _registration(tmp_path: Path, session: str, record: dict) -> Path:
    xfm_json = tmp_path / f"sub-P1_ses-{session}_xfm.json"
    xfm_json.write_text(json.dumps(record))
    sitk.WriteTransform(sitk.Euler3DTransform(), str(xfm_json.with_suffix(".tfm")))
    return xfm_json


def test_registration_record_read_once_and_used_everywhere(tmp_path, monkeypatch):
    files = _subject_files(tmp_path)
    record = {"quality": {"centroid_distance_mm": 0.75}, "poor": True,
              "poor_reasons": ["bone Dice 0.41 < 0.70"]}
    xfm_json = _registration(tmp_path, "20240315", record)
    sessions_json = tmp_path / "sessions.json"
    sessions_json.write_text(json.dumps({"sessions": [
        {"session": f["session"], "study_date": f["study_date"]} for f in files]}))
    reads: list[str] = []
    read_text = Path.read_text

    def counting(self, *args, **kwargs):
        reads.append(self.name)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    side_json = tmp_path / "side.json"
    assert main(["--subject", "P1", "--day0", "2024-03-01", "--affected-side", "left",
                 "--sessions-json", str(sessions_json), "--dseg", *[f["dseg"] for f in files],
                 "--xfm", str(xfm_json), "--baseline", "20240225",
                 "--out", str(tmp_path / "v.tsv"), "--side-json", str(side_json)]) == 0
    assert reads.count(xfm_json.name) == 1
    side = json.loads(read_text(side_json))
    assert side["registration"] == {"20240315": record}
    assert [(f["session"], f["code"]) for f in side["qc_flags"]] == [
        ("20240315", "registration_failed")]
    assert [s["misregistration_mm"] for s in side["sessions"]] == [0.0, 0.75]


def test_session_records(tmp_path):
    files = _subject_files(tmp_path)
    xfm_json = _registration(tmp_path, "20240315", {"poor": False})
    # a mapping names the transform itself (``xfm``); the record's .tfm is not assumed
    s = as_session({**files[0], "xfm_json": str(xfm_json)}, "2024-03-01")
    assert isinstance(s, Session) and (s.label, s.day) == ("20240315", 14)
    assert s.xfm == {"poor": False} and s.tfm is None
    s = read_session("20240315", "2024-03-15", 14, files[0]["dseg"], xfm_json=xfm_json)
    assert s.xfm == {"poor": False} and s.tfm == xfm_json.with_suffix(".tfm")
    assert as_session(s) is s
    loaded = s.loaded()
    assert loaded.label_map is not None and loaded.transform is not None
    assert loaded.loaded() is loaded and loaded == s  # the images do not count as identity
    assert collect_flags([s]) == []


def test_a_side_the_session_does_not_image_is_empty_with_its_reason(tmp_path):
    from pipeline.measure import measure_session

    counts = {0: 200, 5: 30, 6: 25, 7: 20, 8: 5}  # the left limb only
    data = label_array(counts, (5, 8, 7))
    path = write_dseg(tmp_path / "one_leg_dseg.nii.gz", data, np.diag([2.0, 2.0, 5.0, 1.0]))
    s = read_session("20240307", "2024-03-07", 6, path).loaded()
    m = measure_session(s, None, (-np.inf, np.inf), [], [])
    assert m.volumes_ml["right"] == dict.fromkeys(DESIGN_STRUCTURES)  # never 0
    assert m.qc["right"] == ["limb_not_in_view"] and m.qc["left"] == []
    assert m.volumes_ml["left"]["limb"] == pytest.approx(80 * 20 / 1000)
    [row] = [r for r in volume_rows("s", [m], "left")
             if r["side"] == "right" and r["structure"] == "limb"]
    assert row["volume_ml"] is None and row["qc"] == "limb_not_in_view"


def test_side_is_the_only_limb_imaged():
    s = [sv(left={"limb": 1000, "soft_tissue": 950}, right={"limb": 0})]
    s[0].volumes_ml["right"] = dict.fromkeys(DESIGN_STRUCTURES)
    side, why = infer_affected_side(s)
    assert side == "left" and "the only limb" in why
