"""Tests of pipeline.io.dicom_index: indexing, classification, session selection, outputs."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from dicom_factory import (
    PATIENT_TAGS,
    SEQUENCE_TAGS,
    edit_file,
    ramp_pixels,
    write_dicomdir,
    write_series,
    write_structured_report,
)
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from pipeline.io import dicom_frames, dicom_index, headers, scan
from pipeline.io.classify import classify_sequence, orientation_label
from pipeline.io.dicom_values import (
    floats_or_none,
    int_or_none,
    parse_dicom_date,
    parse_dicom_time,
)
from pipeline.io.files import finite_float, read_tsv, sha256_file
from pipeline.io.records import INDEX_COLUMNS, SeriesRecord
from pipeline.io.scan import index_folder
from pipeline.io.selection import select_sessions

REALDATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata"


# --------------------------------------------------------------------------------------------
# small parsers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("20240225", "2024-02-25"),
    ("2024.02.25", "2024-02-25"),
    (" 20240225 ", "2024-02-25"),
    ("", None),
    (None, None),
    ("00000000", None),
    ("20241340", None),
    ("20230229", None),
    ("2024022", None),
    ("abcdefgh", None),
    ("18000101", None),
])
def test_parse_dicom_date(value: Any, expected: str | None) -> None:
    result = parse_dicom_date(value)
    assert result == expected
    if value in ("", None, "00000000"):
        assert result != dt.date.today().isoformat()


@pytest.mark.parametrize(("value", "expected"), [
    ("101500", "10:15:00"), ("101500.123456", "10:15:00"), ("1015", "10:15:00"),
    ("10:15:00", "10:15:00"), ("", None), ("256100", None), ("abc", None),
])
def test_parse_dicom_time(value: str, expected: str | None) -> None:
    assert parse_dicom_time(value) == expected


@pytest.mark.parametrize(("value", "n", "expected"), [
    (MultiValue(float, ["1", "0", "0"]), 3, (1.0, 0.0, 0.0)), ([0.5, 2], 2, (0.5, 2.0)),
    ("2.5", 1, (2.5,)), (b"2.5", 1, (2.5,)),  # one value, not its characters or bytes
    ([1, 2], 3, None), ([1, "x", 3], 3, None), ([1, float("nan")], 2, None),
    ([1, "inf"], 2, None), (None, 2, None), ([], 0, ()),
])
def test_floats_or_none(value: Any, n: int, expected: tuple[float, ...] | None) -> None:
    assert floats_or_none(value, n) == expected


def test_frame_number_readers_take_the_first_value() -> None:
    """dicom_frames reads a multi-valued number by its first value (finite_float, int_or_none
    underneath); a plain number reader (finite_float) refuses a multi-valued one."""
    assert dicom_frames._float(MultiValue(float, ["12.5", "30"])) == 12.5
    assert dicom_frames._float([]) is None and dicom_frames._float("nan") is None
    assert dicom_frames._int(MultiValue(int, ["2", "3"])) == 2 and dicom_frames._int("x") is None
    assert finite_float(MultiValue(float, ["12.5", "30"])) is None
    assert int_or_none("7") == 7 and int_or_none(None) is None


@pytest.mark.parametrize(("iop", "expected"), [
    ((1, 0, 0, 0, 1, 0), "axial"),
    ((-1, 0, 0, 0, 1, 0), "axial"),
    ((1, 0, 0, 0, 0, -1), "coronal"),
    ((0, 1, 0, 0, 0, -1), "sagittal"),
    ((1, 0, 0, 0, np.cos(0.3), -np.sin(0.3)), "axial"),  # 17 degrees: still axial
    ((1, 0, 0, 0, np.cos(0.7), -np.sin(0.7)), "oblique"),  # 40 degrees
])
def test_orientation_label(iop: tuple[float, ...], expected: str) -> None:
    assert orientation_label(iop) == expected


# --------------------------------------------------------------------------------------------
# classification from realistic tag sets
# --------------------------------------------------------------------------------------------

CLASSIFY_CASES: dict[str, tuple[dict[str, Any], str]] = {
    **{f"siemens {k}": (v, k) for k, v in SEQUENCE_TAGS.items()},
    "ge stir": ({"SeriesDescription": "Ax STIR", "ScanningSequence": ["SE", "IR"],
                 "SequenceVariant": ["SK", "OSP"], "ScanOptions": ["FAST_GEMS", "IR_GEMS"],
                 "RepetitionTime": 4500.0, "EchoTime": 35.0, "InversionTime": 150.0,
                 "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"]}, "STIR"),
    "philips stir (TI only)": ({"SeriesDescription": "STIR_TRA", "ScanningSequence": "SE",
                                "ScanOptions": "", "RepetitionTime": 3000.0, "EchoTime": 60.0,
                                "InversionTime": 180.0,
                                "ImageType": ["ORIGINAL", "PRIMARY", "M_IR", "M", "IR"]},
                               "STIR"),
    "3T stir TI 220": ({"ScanningSequence": ["SE", "IR"], "RepetitionTime": 6000.0,
                        "EchoTime": 50.0, "InversionTime": 220.0}, "STIR"),
    "flair is not stir": ({"SeriesDescription": "t2_tirm_flair", "ScanningSequence": ["SE", "IR"],
                           "RepetitionTime": 9000.0, "EchoTime": 90.0,
                           "InversionTime": 2500.0}, "other"),
    "mprage is T1w": ({"SeriesDescription": "mprage", "ScanningSequence": ["GR", "IR"],
                       "RepetitionTime": 2000.0, "EchoTime": 3.0, "InversionTime": 900.0},
                      "T1w"),
    "philips T2 SPAIR (description)": ({"SeriesDescription": "T2W_TSE_SPAIR",
                                        "ScanningSequence": "SE", "ScanOptions": "",
                                        "RepetitionTime": 3200.0, "EchoTime": 70.0}, "T2FS"),
    "T2 without fat sat": ({"SeriesDescription": "t2_tse_tra", "ScanningSequence": "SE",
                            "RepetitionTime": 4000.0, "EchoTime": 90.0}, "other"),
    "ge T1 FSE": ({"SeriesDescription": "Ax T1 FSE", "ScanningSequence": "SE",
                   "ScanOptions": ["FAST_GEMS"], "RepetitionTime": 600.0, "EchoTime": 9.0,
                   "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"]}, "T1w"),
    "T1 hint without timing": ({"SeriesDescription": "T1 AX"}, "T1w"),
    "STIR hint without timing": ({"SeriesDescription": "cor TIRM"}, "STIR"),
    "philips mDixon water": ({"SeriesDescription": "mDIXON_W", "ScanningSequence": "GR",
                              "RepetitionTime": 5.8, "EchoTime": 1.8,
                              "ImageType": ["ORIGINAL", "PRIMARY", "W", "W", "FFE"]},
                             "dixon_water"),
    "ge flex water (description)": ({"SeriesDescription": "WATER: Ax LAVA-Flex",
                                     "ScanningSequence": "GR", "RepetitionTime": 4.0,
                                     "EchoTime": 1.7,
                                     "ImageType": ["DERIVED", "PRIMARY", "OTHER"]},
                                    "dixon_water"),
    "3-plane localizer by name": ({"SeriesDescription": "3-Plane Loc", "ScanningSequence": "GR",
                                   "RepetitionTime": 5.0, "EchoTime": 1.5}, "localizer"),
    "post contrast by description": ({"SeriesDescription": "T1 TSE AX +C",
                                      "ScanningSequence": "SE", "RepetitionTime": 500.0,
                                      "EchoTime": 10.0}, "post_contrast"),
    "nothing": ({}, "other"),
}


@pytest.mark.parametrize("case", CLASSIFY_CASES)
def test_classify_sequence(case: str) -> None:
    tags, expected = CLASSIFY_CASES[case]
    assert classify_sequence(SimpleNamespace(**tags)) == expected


# --------------------------------------------------------------------------------------------
# indexing a messy export
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def export(tmp_path: Path) -> dict[str, Any]:
    """A PACS-like export: two studies, nested folders, file names without extension, junk."""
    root = tmp_path / "export"
    s1, s2 = generate_uid(), generate_uid()
    made = {
        "t1": write_series(root / "A" / "1", sequence="T1w", study_uid=s1, series_number=3,
                           seed=1),
        "stir": write_series(root / "A" / "2" / "deep", sequence="STIR", study_uid=s1,
                             series_number=5, seed=2, slice_step=3.0),
        "loc": write_series(root / "A" / "3", ramp_pixels(3), sequence="localizer",
                            study_uid=s1, series_number=1, seed=3),
        "t1_b": write_series(root / "B", sequence="T1w", study_uid=s2, study_date="20240310",
                             series_number=2, seed=4, row_cosine=(1, 0, 0),
                             col_cosine=(0, 0, -1)),
        "t2fs_b": write_series(root / "B", sequence="T2FS", study_uid=s2,
                               study_date="20240310", series_number=4, seed=5),
    }
    (root / "notes.txt").write_text("exported by PACS\n")
    (root / "A" / "empty").write_bytes(b"")
    (root / "A" / "garbage.bin").write_bytes(np.random.default_rng(0).bytes(300))
    write_dicomdir(root / "DICOMDIR")
    write_structured_report(root / "A" / "report", s1)
    return {"root": root, "series": made, "studies": (s1, s2)}


def test_index_groups_series_and_lists_problems(export: dict[str, Any]) -> None:
    result = index_folder(export["root"])
    problems = {p.path: p.problem for p in result.problems}
    assert set(problems) == {"notes.txt", "A/empty", "A/garbage.bin", "DICOMDIR", "A/report"}
    assert "empty" in problems["A/empty"]
    assert "DICOMDIR" in problems["DICOMDIR"]
    assert "not an image" in problems["A/report"]
    assert "not a DICOM" in problems["notes.txt"]
    assert result.n_files_seen == 5 + 5 + 3 + 5 + 5 + 5
    assert result.n_files_dicom == 5 + 5 + 3 + 5 + 5 + 2  # + DICOMDIR + SR

    by_uid = {r.series_uid: r for r in result.series}
    assert len(by_uid) == 5
    stir = by_uid[export["series"]["stir"].series_uid]
    assert stir.sequence_class == "STIR"
    assert stir.orientation == "axial"
    assert stir.n_files == 5 and (stir.rows, stir.columns) == (6, 7)
    assert stir.pixel_spacing_mm == (0.8, 0.6)
    assert stir.slice_spacing_mm == pytest.approx(3.0)
    assert stir.study_date == "2024-02-25" and stir.study_time == "10:15:00"
    assert set(stir.files) == {p.resolve() for p in export["series"]["stir"].files}
    assert by_uid[export["series"]["t1_b"].series_uid].orientation == "coronal"
    assert by_uid[export["series"]["loc"].series_uid].sequence_class == "localizer"


def test_index_splits_repeats_and_refuses_mixed_orientation(tmp_path: Path) -> None:
    first = write_series(tmp_path / "echo", sequence="T2FS", seed=1)
    write_series(tmp_path / "echo", ramp_pixels() + 3, sequence="T2FS", seed=2,
                 series_uid=first.series_uid, study_uid=first.study_uid)
    mixed = write_series(tmp_path / "mixed", sequence="localizer", seed=3,
                         study_uid=first.study_uid)
    edit_file(mixed.files[0], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    result = index_folder(tmp_path)
    by_uid = {r.series_uid: r for r in result.series}
    # two images per position and no tag telling them apart: two repetitions
    repeated = by_uid[first.series_uid]
    assert repeated.status != "refused"
    assert [v.label for v in repeated.volumes] == ["rep-1", "rep-2"]
    assert all(v.n_positions == 5 and v.sequence_class == "T2FS" for v in repeated.volumes)
    assert by_uid[mixed.series_uid].status == "refused"
    assert "mixed slice orientations" in by_uid[mixed.series_uid].reason


def test_duplicate_sop_instance_listed_once(tmp_path: Path) -> None:
    info = write_series(tmp_path / "a")
    copy = tmp_path / "b" / "again"
    copy.parent.mkdir()
    copy.write_bytes(info.files[0].read_bytes())
    result = index_folder(tmp_path)
    assert result.series[0].n_files == 5
    assert [p.path for p in result.problems] == ["b/again"]
    assert "same SOPInstanceUID" in result.problems[0].problem


def _tree_state(root: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(root)): (sha256_file(p), p.stat().st_mtime)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_main_writes_outputs_and_leaves_input_unchanged(export: dict[str, Any],
                                                        tmp_path: Path) -> None:
    root: Path = export["root"]
    before = _tree_state(root)
    dirs_before = sorted(p for p in root.rglob("*") if p.is_dir())
    out = tmp_path / "out"
    assert dicom_index.main(["--input-dir", str(root), "--out-dir", str(out)]) == 0
    assert _tree_state(root) == before
    assert sorted(p for p in root.rglob("*") if p.is_dir()) == dirs_before
    assert sorted(p.name for p in out.iterdir()) == ["index.tsv", "problems.tsv",
                                                     "sessions.json", "sessions.tsv"]

    index = read_tsv(out / "index.tsv")
    assert tuple(index[0]) == INDEX_COLUMNS
    status = {row["series_uid"]: row["status"] for row in index}
    made = export["series"]
    assert status[made["t1"].series_uid] == "used"
    assert status[made["stir"].series_uid] == "used"
    assert status[made["loc"].series_uid] == "skipped"
    problems = read_tsv(out / "problems.tsv")
    assert {r["path"] for r in problems} >= {"notes.txt", "A/empty", "DICOMDIR"}

    data = json.loads((out / "sessions.json").read_text())
    assert data["input_dir"] == str(root.resolve())
    assert [s["session"] for s in data["sessions"]] == ["20240225", "20240310"]
    first = data["sessions"][0]
    assert first["study_date"] == "2024-02-25"
    assert first["anatomical"]["series_uid"] == made["t1"].series_uid
    assert first["anatomical"]["sequence_class"] == "T1w"
    assert first["fluid"]["series_uid"] == made["stir"].series_uid
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in first["fluid"]["files"])
    assert data["sessions"][1]["fluid"]["sequence_class"] == "T2FS"
    assert data["refused_studies"] == []
    assert data["n_files_seen"] == 28 and data["n_files_dicom"] == 25
    sessions_tsv = read_tsv(out / "sessions.tsv")
    assert [r["session"] for r in sessions_tsv] == ["20240225", "20240310"]
    assert list(sessions_tsv[0]) == ["session", "study_date", "anatomical_series",
                                     "fluid_series"]

    text = "".join(p.read_text() for p in out.iterdir())
    for value in PATIENT_TAGS.values():
        assert value not in text


def test_main_fails_clearly_without_usable_session(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    write_series(tmp_path / "in", sequence="T1w")
    out = tmp_path / "out"
    assert dicom_index.main(["--input-dir", str(tmp_path / "in"), "--out-dir", str(out)]) != 0
    err = capsys.readouterr().err
    assert str((tmp_path / "in").resolve()) in err
    assert "no study with both a T1-weighted and a fluid-sensitive series" in err
    assert "no fluid-sensitive series" in err
    assert (out / "index.tsv").is_file() and (out / "sessions.json").is_file()
    assert json.loads((out / "sessions.json").read_text())["sessions"] == []


def test_main_refuses_output_inside_input(tmp_path: Path) -> None:
    write_series(tmp_path / "in")
    assert dicom_index.main(["--input-dir", str(tmp_path / "in"),
                             "--out-dir", str(tmp_path / "in" / "out")]) == 2
    assert not (tmp_path / "in" / "out").exists()


# --------------------------------------------------------------------------------------------
# session selection on records (no files needed)
# --------------------------------------------------------------------------------------------

def rec(cls: str, number: int, *, study: str = "S1", date: str | None = "2024-02-25",
        time: str | None = "10:15:00", orientation: str = "axial", n_files: int = 20,
        description: str | None = None, status: str = "skipped",
        uid: str | None = None) -> SeriesRecord:
    return SeriesRecord(
        study_uid=study, study_date=date, study_time=time, series_uid=uid or f"{study}.{number}",
        series_number=number, series_description=description or f"{cls} {orientation}",
        modality="MR", sequence_class=cls, orientation=orientation, n_files=n_files, rows=256,
        columns=256, pixel_spacing_mm=(0.5, 0.5), slice_spacing_mm=4.0, status=status,
        reason="", files=())


def _picked(sessions: list[dict[str, Any]], role: str) -> list[int]:
    return [s[role]["series_number"] for s in sessions]


def test_select_prefers_axial_then_files_then_number() -> None:
    series = [rec("T1w", 2, orientation="coronal", n_files=40), rec("T1w", 3, n_files=20),
              rec("T1w", 4, n_files=20), rec("T1w", 5, n_files=18), rec("STIR", 6)]
    sessions, refused = select_sessions(series)
    assert refused == [] and _picked(sessions, "anatomical") == [4]
    series = [rec("T1w", 2, orientation="coronal", n_files=40), rec("T1w", 3, n_files=30),
              rec("T1w", 4, n_files=20), rec("STIR", 6)]
    assert _picked(select_sessions(series)[0], "anatomical") == [3]


@pytest.mark.parametrize(("classes", "expected"), [
    (["dixon_water", "T2FS", "STIR"], "STIR"),
    (["dixon_water", "T2FS"], "T2FS"),
    (["dixon_water", "dixon_fat", "localizer"], "dixon_water"),
])
def test_select_fluid_preference(classes: list[str], expected: str) -> None:
    series = [rec("T1w", 1)] + [rec(c, 10 + i) for i, c in enumerate(classes)]
    sessions, _ = select_sessions(series)
    assert sessions[0]["fluid"]["sequence_class"] == expected


def test_select_never_picks_refused_series() -> None:
    series = [rec("T1w", 1, n_files=50, status="refused"), rec("T1w", 2), rec("STIR", 3)]
    assert _picked(select_sessions(series)[0], "anatomical") == [2]


def test_select_overrides_by_regex_and_uid() -> None:
    series = [rec("T1w", 1), rec("other", 2, description="PD SPAIR cor", orientation="coronal"),
              rec("STIR", 3), rec("other", 4, description="my_t1_3d", uid="1.2.3.4")]
    sessions, refused = select_sessions(series, anatomical_regex="1.2.3.4",
                                        fluid_regex=r"pd\s+spair")
    assert refused == []
    assert _picked(sessions, "anatomical") == [4] and _picked(sessions, "fluid") == [2]
    sessions, refused = select_sessions(series, fluid_regex="no such series")
    assert sessions == [] and "no such series" in refused[0]["reason"]


def test_select_refuses_incomplete_or_undated_studies() -> None:
    series = [rec("T1w", 1, study="A"), rec("localizer", 2, study="A"),
              rec("STIR", 1, study="B"),
              rec("T1w", 1, study="C", date=None), rec("STIR", 2, study="C", date=None),
              rec("T1w", 1, study="D", date="2024-03-01"),
              rec("STIR", 2, study="D", date="2024-03-01")]
    sessions, refused = select_sessions(series)
    assert [s["study_uid"] for s in sessions] == ["D"]
    reasons = {r["study_uid"]: r["reason"] for r in refused}
    assert "no fluid-sensitive" in reasons["A"]
    assert "no T1-weighted" in reasons["B"]
    assert "StudyDate" in reasons["C"]
    assert {r["study_uid"]: r["study_date"] for r in refused}["C"] is None


def test_session_labels_sorted_and_disambiguated_by_time() -> None:
    series = [rec("T1w", 1, study="late", date="2024-03-10"),
              rec("STIR", 2, study="late", date="2024-03-10"),
              rec("T1w", 1, study="pm", time="15:30:05"), rec("STIR", 2, study="pm",
                                                               time="15:30:05"),
              rec("T1w", 1, study="am", time="08:00:00"), rec("STIR", 2, study="am",
                                                               time="08:00:00")]
    sessions, refused = select_sessions(series)
    assert refused == []
    assert [s["session"] for s in sessions] == ["20240225T080000", "20240225T153005",
                                                "20240310"]
    twin = [rec("T1w", 1, study="x"), rec("STIR", 2, study="x"),
            rec("T1w", 1, study="y"), rec("STIR", 2, study="y")]
    sessions, refused = select_sessions(twin)
    assert len(sessions) == 1 and "cannot be labelled uniquely" in refused[0]["reason"]


# --------------------------------------------------------------------------------------------
# real scanner data
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (REALDATA / "dicom2nifti_tests").is_dir(),
                    reason=f"real scanner data not found at {REALDATA} (see its README)")
def test_index_real_corpus(tmp_path: Path) -> None:
    root = REALDATA / "dicom2nifti_tests"
    result = index_folder(root)
    problems = {p.path: p.problem for p in result.problems}
    assert problems["LICENSE"] == "not a DICOM file"
    assert all(not p.endswith(".dcm") or "SOPInstanceUID" in m for p, m in problems.items())
    by_folder = {r.files[0].parent.relative_to(root.resolve()).as_posix(): r
                 for r in result.series}
    anatomical = by_folder["anatomical/001"]
    assert (anatomical.n_files, anatomical.rows, anatomical.columns) == (4, 256, 256)
    assert anatomical.orientation == "sagittal"
    assert anatomical.slice_spacing_mm == pytest.approx(1.0, abs=1e-3)
    assert anatomical.study_date == "2016-03-09"
    assert "mixed slice orientations" in by_folder["failing/sliceorientation/001"].reason
    enhanced = by_folder["philips_enhanced/anatomical/001"]  # one multi-frame file
    assert enhanced.status != "refused" and enhanced.volumes[0].n_positions == 8
    dti = by_folder["philips_enhanced/dti/001"]  # 4 diffusion volumes of 8 frames
    assert len(dti.volumes) == 4 and all(v.n_positions == 8 for v in dti.volumes)


# --------------------------------------------------------------------------------------------
# reading headers: file walk, in-memory parse, worker processes
# --------------------------------------------------------------------------------------------

def _walk_reference(root: Path) -> list[Path]:
    """The original os.walk-based walk, for comparison."""
    paths = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if Path(folder) == root and name in scan.COMPANION_FILES:
                continue
            if path.is_file():
                paths.append(path)
    return paths


def test_walk_order_and_links(export: dict[str, Any], tmp_path: Path) -> None:
    root: Path = export["root"]
    (root / "events.tsv").write_text("date\tevent\n")
    (root / "A" / "events.tsv").write_text("not a companion file here\n")
    (root / "zz_top_file").write_text("after the folders in name order\n")
    (root / "link_to_A").symlink_to(root / "A", target_is_directory=True)
    (root / "B" / "link_to_file").symlink_to(export["series"]["t1"].files[0])
    (root / "B" / "broken_link").symlink_to(tmp_path / "missing")
    walked = scan._walk(root)
    assert walked == _walk_reference(root)
    names = [p.relative_to(root).as_posix() for p in walked]
    assert "events.tsv" not in names and "A/events.tsv" in names
    assert "B/link_to_file" in names and "B/broken_link" not in names
    assert not any(n.startswith("link_to_A") for n in names)
    assert names.index("zz_top_file") < names.index("A/empty")  # a folder's files first


def test_parallel_index_equals_serial(export: dict[str, Any], monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    root: Path = export["root"]
    (root / "C").mkdir()
    (root / "C" / "again").write_bytes(export["series"]["stir"].files[2].read_bytes())
    serial = index_folder(root, workers=1)
    assert any("same SOPInstanceUID" in p.problem for p in serial.problems)
    assert index_folder(root, workers=2) == serial
    assert index_folder(root, workers=3) == serial
    monkeypatch.setattr(scan, "PARALLEL_MIN_FILES", 1)  # the default picks processes
    assert scan._n_workers(5, None) >= 1
    assert index_folder(root) == serial


def test_header_longer_than_prefix_read_from_file(export: dict[str, Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root: Path = export["root"]
    expected = index_folder(root, workers=1)
    for prefix in (200, 1000, 4096):  # part of the file meta, part of the data set
        monkeypatch.setattr(headers, "HEADER_PREFIX_BYTES", prefix)
        assert index_folder(root, workers=1) == expected
    path = export["series"]["t1"].files[0]
    ds = headers.read_header(path)
    assert ds.filename == str(path) and ds.SOPInstanceUID


@pytest.mark.skipif(not (REALDATA / "dicom2nifti_tests").is_dir(),
                    reason=f"real scanner data not found at {REALDATA} (see its README)")
def test_parallel_index_equals_serial_real_corpus() -> None:
    root = REALDATA / "dicom2nifti_tests"
    assert index_folder(root, workers=2) == index_folder(root, workers=1)
