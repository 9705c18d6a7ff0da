"""The DICOM node's spool (pipeline.node.spool) and status files (pipeline.node.status):
patient key, atomic filing, layout, the patients sheet, the workflow's input view."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pipeline.io.identity import patient_fingerprint
from pipeline.node import status as node_status
from pipeline.node.spool import (
    INCOMING,
    PatientRow,
    Spool,
    archive_folder,
    build_input_view,
    is_uid,
    patient_key,
    read_patients,
)
from pipeline.node.status import read_status, update_status

STUDY = "1.2.3.4"
OTHER_STUDY = "1.2.3.5"


def test_patient_key_is_the_fingerprint_of_the_id_only() -> None:
    key = patient_key("PH000007")
    assert key == patient_fingerprint("PH000007", None, None)
    assert key is not None and len(key) == 12 and "PH" not in key
    assert patient_key(" ph000007 ") == key  # normalised like the workflow's PatientID
    assert patient_key("PH000008") != key
    for placeholder in ("", None, "ANONYMOUS", "0000", "N/A", "-"):
        assert patient_key(placeholder) is None


def test_is_uid() -> None:
    assert is_uid("1.2.840.10008.5.1.4.1.1.4")
    for bad in ("", "1..2", "../x", "1.2/3", "1.2.a", "1." + "2" * 70):
        assert not is_uid(bad)


def test_file_object_layout_and_atomic(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    key = "0123456789ab"
    path = spool.file_object(key, STUDY, "1.2.3.4.1", b"DICM data")
    assert path == tmp_path / "spool" / key / STUDY / "1.2.3.4.1.dcm"
    assert path.read_bytes() == b"DICM data"
    assert list((tmp_path / "spool" / INCOMING).iterdir()) == []  # no temporary left
    spool.file_object(key, STUDY, "1.2.3.4.1", b"again")  # the same instance replaces
    spool.file_object(key, OTHER_STUDY, "1.2.3.5.1", b"x")
    assert spool.counts(key) == (2, 2)
    assert spool.patients() == [key]
    assert path.read_bytes() == b"again"


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        spool.file_object("0123456789ab", STUDY, "1.2.3.4.1", b"data")
    assert not (tmp_path / "spool" / "0123456789ab" / STUDY / "1.2.3.4.1.dcm").exists()
    assert list((tmp_path / "spool" / INCOMING).iterdir()) == []


def test_prepare_removes_half_received_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    (tmp_path / "spool" / INCOMING / "1.2.3.part").write_bytes(b"half")
    spool.prepare()
    assert list((tmp_path / "spool" / INCOMING).iterdir()) == []


def test_patients_sheet(tmp_path: Path) -> None:
    (tmp_path / "ev.tsv").write_text("day\tlabel\tcategory\n0\tinfusion\ttreatment\n")
    sheet = tmp_path / "patients.tsv"
    sheet.write_text("patient_id\tday0\taffected_side\tevents\n"
                     "PH000007\t2024-03-01\tleft\tev.tsv\n"
                     "PH000011\t2024-3-1\tright\t\n"
                     "PH000012\t2024-03-01\tboth\t\n"
                     "PH000013\t2024-03-01\tRight\tmissing.tsv\n"
                     "\t2024-03-01\tleft\t\n")
    rows = read_patients(sheet)
    assert rows[patient_key("PH000007")] == PatientRow(
        "2024-03-01", "left", str((tmp_path / "ev.tsv").resolve()))
    assert "line 3: day0 '2024-3-1' is not a date" in str(rows[patient_key("PH000011")])
    assert "line 4: affected_side" in str(rows[patient_key("PH000012")])
    assert "events file 'missing.tsv' does not exist" in str(rows[patient_key("PH000013")])
    assert len(rows) == 4  # the row without an ID is no patient


def test_patients_sheet_missing_column(tmp_path: Path) -> None:
    sheet = tmp_path / "patients.tsv"
    sheet.write_text("patient_id\tday0\nPH1\t2024-03-01\n")
    with pytest.raises(ValueError, match="missing column.*affected_side"):
        read_patients(sheet)


def test_input_view_links_received_and_archive(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    key = "0123456789ab"
    spool.file_object(key, STUDY, "1.2.3.4.1", b"a")
    update_status(spool.status_path(key), "received")
    archive = tmp_path / "archive"
    (archive / "PH7" / "old").mkdir(parents=True)
    (archive / "PH7" / "old" / "IM1").write_bytes(b"b")
    folder = archive_folder(archive, key, "PH7")
    assert folder == archive / "PH7"
    (archive / key).mkdir()
    assert archive_folder(archive, key, "PH7") == archive / key  # the key's folder first
    assert archive_folder(archive, key, "../etc") == archive / key
    assert archive_folder(None, key, "PH7") is None
    view, n = build_input_view(spool, key, folder)
    assert n == 2
    files = sorted(str(p.relative_to(view)) for p in view.rglob("*") if p.is_file())
    assert files == ["archive/old/IM1", f"received/{STUDY}/1.2.3.4.1.dcm"]
    assert all(p.is_symlink() for p in view.rglob("*") if p.is_file())
    assert not any(p.name == "status.json" for p in view.rglob("*"))
    view2, n2 = build_input_view(spool, key, None)  # made afresh
    assert view2 == view and n2 == 1 and not (view / "archive").exists()


def test_status_file(tmp_path: Path) -> None:
    path = tmp_path / "k" / "status.json"
    assert read_status(path) == {}
    first = update_status(path, "received", images=3)
    assert first["state"] == "received" and first["images"] == 3 and "since" in first
    update_status(path, "failed", reason="why")
    second = update_status(path, None, images=4, reason=None)
    assert second["state"] == "failed" and second["images"] == 4 and "reason" not in second
    assert json.loads(path.read_text()) == second
    with pytest.raises(ValueError, match="unknown node state"):
        update_status(path, "done")


def test_status_updates_from_threads_do_not_lose_fields(tmp_path: Path) -> None:
    path = tmp_path / "status.json"

    def write(i: int) -> None:
        for _ in range(20):
            update_status(path, None, **{f"f{i}": i})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = read_status(path)
    assert {status[f"f{i}"] for i in range(4)} == {0, 1, 2, 3}
    assert node_status.STATES[-2:] == ("sent", "failed")
