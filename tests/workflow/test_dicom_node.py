"""The DICOM node for real, on loopback: ``python -m pipeline.node.listen`` (what ``limbtrack
listen`` runs) receives the demo patient from dcmtk's ``storescu``, runs the workflow and sends
DICOM SEG, TID 1500 SR and the report as Encapsulated PDF to dcmtk's ``storescp``.

Also on the same node: C-ECHO (``echoscu``), a CT object refused with status 0x0122, a second
patient (the small phantom, another PatientID) run and sent separately, and a third patient
without a row in the patients sheet filed and left waiting. One demo workflow run plus one
small phantom run. ``tests/dcmtk_setup.sh`` and ``tests/browser_setup.sh`` install dcmtk and
chromium with apt when missing (as root); otherwise the tests skip, saying why.

What was sent, what came back and the time from the last received image to the results
arriving are written to ``test-artifacts/dicom_node_roundtrip.json`` and printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_helpers import CT_IMAGE_STORAGE, free_port, send, tiny_image

from pipeline.export.pdf import ENCAPSULATED_PDF_STORAGE, pdf_page_count
from pipeline.io.files import read_tsv
from pipeline.node.spool import patient_key
from pipeline.node.status import read_status
from pipeline.validation import phantom

hd = pytest.importorskip("highdicom")
from phantom_cases import small_spec  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "sample_data" / "demo" / "dicom"
ARTIFACTS = ROOT / "test-artifacts"
DEMO_ID, SECOND_ID, NO_ROW_ID = "PH000007", "PH000011", "NO-ROW-1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
RUN_TIMEOUT_S = 1500


def _setup(script: str) -> None:
    proc = subprocess.run(["sh", str(ROOT / "tests" / script)], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"{script}: {proc.stderr.strip()[-300:] or 'tool not available'}")


def _wait_for_echo(port: int, node: subprocess.Popen[bytes], log: Path) -> float:
    """Seconds until the node answers C-ECHO (echoscu's exit status 0)."""
    start = time.monotonic()
    while time.monotonic() - start < 60:
        if node.poll() is not None:
            raise AssertionError(f"the node exited: {log.read_text()[-2000:]}")
        proc = subprocess.run(["echoscu", "-aet", "PACS", "-aec", "LIMBTRACK", "127.0.0.1",
                               str(port)], capture_output=True, timeout=30)
        if proc.returncode == 0:
            return time.monotonic() - start
        time.sleep(0.3)
    raise AssertionError("the node never answered C-ECHO")


def _wait_for_states(spool: Path, keys: list[str], log: Path) -> dict[str, dict[str, Any]]:
    """Statuses once every patient in `keys` is done (sent, failed or waiting)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        states = {k: read_status(spool / k / "status.json") for k in keys}
        if all(s.get("state") in ("sent", "failed", "waiting") for s in states.values()):
            return states
        time.sleep(1)
    raise AssertionError(f"no results in {RUN_TIMEOUT_S} s: {log.read_text()[-3000:]}")


def _storescu(port: int, folder: Path) -> subprocess.CompletedProcess[str]:
    # +sp: the images only (the demo folder also holds events.tsv). TCP_NODELAY=1: dcmtk turns
    # Nagle's algorithm off (with it on, each image waits ~40 ms for a delayed ACK)
    return subprocess.run(["storescu", "-aet", "PACS", "-aec", "LIMBTRACK", "+sd", "+r",
                           "+sp", "IM*", "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TCP_NODELAY": "1"})


def _start(tmp: Path, node_port: int, dest_port: int, sheet: Path
           ) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], Path]:
    (tmp / "dest").mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "DEST", "+xa", "-od", str(tmp / "dest"), "-fe", ".dcm",
         str(dest_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp / "node.log"
    cmd = [sys.executable, "-m", "pipeline.node.listen", "--ae-title", "LIMBTRACK",
           "--host", "127.0.0.1", "--port", str(node_port), "--spool", str(tmp / "spool"),
           "--results", str(tmp / "results"), "--destination",
           f"DEST@127.0.0.1:{dest_port}", "--patients", str(sheet), "--quiet-seconds", "2",
           "--cores", "2", "--log", str(log)]
    node = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return node, storescp, log


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _setup("dcmtk_setup.sh")
    _setup("browser_setup.sh")
    tmp = tmp_path_factory.mktemp("dicom_node")
    second = phantom.generate(small_spec(subject="second", seed=11), tmp / "second")
    sheet = tmp / "patients.tsv"
    sheet.write_text("patient_id\tday0\taffected_side\tevents\n"
                     f"{DEMO_ID}\t2024-03-01\tleft\t{DEMO / 'events.tsv'}\n"
                     f"{SECOND_ID}\t{second['day0']}\t{second['affected_side']}\t\n")
    node_port, dest_port = free_port(), free_port()
    node, storescp, log = _start(tmp, node_port, dest_port, sheet)
    try:
        out: dict[str, Any] = {"tmp": tmp, "log": log,
                               "echo_s": _wait_for_echo(node_port, node, log)}
        out["refused"] = send(node_port, [tiny_image(DEMO_ID, sop_class=CT_IMAGE_STORAGE)])
        start = time.monotonic()
        demo_send = _storescu(node_port, DEMO)
        out["demo_send_s"] = time.monotonic() - start
        assert demo_send.returncode == 0, demo_send.stderr[-2000:]
        assert _storescu(node_port, tmp / "second" / "dicom").returncode == 0
        out["no_row"] = send(node_port, [tiny_image(NO_ROW_ID)])
        keys = [patient_key(i) or "" for i in (DEMO_ID, SECOND_ID, NO_ROW_ID)]
        out["states"] = _wait_for_states(tmp / "spool", keys, log)
        time.sleep(1)  # storescp has the files before the node hears success
        yield out
    finally:
        for proc in (node, storescp):
            proc.send_signal(signal.SIGTERM)
        for proc in (node, storescp):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _images(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("IM*") if p.is_file()]


def _received(dest: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return [(p, pydicom.dcmread(p)) for p in sorted(dest.rglob("*.dcm"))]


def _sr_volumes(path: Path) -> dict[tuple[str, str], float]:
    sr = hd.sr.srread(path)
    found = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        key = tuple(str(group.tracking_identifier).split(" "))
        for m in group.get_measurements(name=codes.SCT.Volume):
            found[key] = float(m.value)
    return found


def test_echo_and_refusal(roundtrip: dict[str, Any]) -> None:
    assert roundtrip["echo_s"] < 60
    assert roundtrip["refused"] == [0x0122]
    assert "refused CT Image Storage (1.2.840.10008.5.1.4.1.1.2)" in \
        roundtrip["log"].read_text()


def test_demo_round_trip(roundtrip: dict[str, Any]) -> None:
    tmp: Path = roundtrip["tmp"]
    key = patient_key(DEMO_ID) or ""
    status = roundtrip["states"][key]
    assert status["state"] == "sent", status
    subject = tmp / "results" / f"P{key}"
    sessions = json.loads((subject / "sessions.json").read_text())["sessions"]
    volumes = read_tsv(subject / "volumes.tsv")
    got = [(p, ds) for p, ds in _received(tmp / "dest") if ds.PatientID == DEMO_ID]
    by_class = defaultdict(list)
    for p, ds in got:
        by_class[str(ds.SOPClassUID)].append((p, ds))
    assert len(by_class[SEG_STORAGE]) == len(by_class[COMPREHENSIVE_3D_SR]) == len(sessions)
    assert len(by_class[ENCAPSULATED_PDF_STORAGE]) == 1 and len(got) == 2 * len(sessions) + 1
    uid_date = {s["study_uid"]: s["study_date"] for s in sessions}
    checked = 0
    for path, ds in by_class[COMPREHENSIVE_3D_SR]:
        date = uid_date[ds.StudyInstanceUID]
        expected = {(r["side"], r["structure"]): float(r["volume_ml"]) for r in volumes
                    if r["study_date"] == date and r["volume_ml"] != "n/a"}
        found = _sr_volumes(path)
        assert found.keys() == expected.keys() and found
        for k, v in expected.items():
            assert found[k] == pytest.approx(v, abs=5e-4), (date, k)
        checked += len(expected)
    segments = []
    for path, ds in by_class[SEG_STORAGE]:
        seg = hd.seg.segread(path)
        assert seg.number_of_segments >= 8 and ds.StudyInstanceUID in uid_date
        segments.append(seg.number_of_segments)
    _, pdf_ds = by_class[ENCAPSULATED_PDF_STORAGE][0]
    latest = max(sessions, key=lambda s: (s["study_date"], s["study_time"]))
    assert pdf_ds.StudyInstanceUID == latest["study_uid"]
    assert pdf_ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    pdf = bytes(pdf_ds.EncapsulatedDocument)[:pdf_ds.EncapsulatedDocumentLength]
    pages = pdf_page_count(pdf)
    assert pdf.startswith(b"%PDF") and pages >= 1
    assert status["report"]["pdf_pages"] == pages
    validation = {"sr_volumes_equal_volumes_tsv": checked, "seg_segments": segments,
                  "pdf_study_is_latest_session": True}
    _record(roundtrip, key, got, sessions, {"pdf_pages": pages, "pdf_bytes": len(pdf),
                                            "validation": validation})


def _record(roundtrip: dict[str, Any], key: str, got: list[tuple[Path, pydicom.Dataset]],
            sessions: list[dict[str, Any]], checks: dict[str, Any]) -> None:
    """Write and print what was sent and what came back, and the latency."""
    tmp: Path = roundtrip["tmp"]
    last_image = max(p.stat().st_mtime for p in (tmp / "spool" / key).rglob("*.dcm"))
    arrived = max(p.stat().st_mtime for p, _ in got)
    status = roundtrip["states"][key]
    summary = {
        "sent_to_node": {"images": len(_images(DEMO)),
                         "studies": sum(1 for p in DEMO.iterdir() if p.is_dir()),
                         "storescu_seconds": round(roundtrip["demo_send_s"], 1)},
        "came_back": sorted(f"{pydicom.uid.UID(ds.SOPClassUID).name}: {p.name}"
                            for p, ds in got),
        "sessions": len(sessions), **checks,
        "workflow_seconds": status["run"]["seconds"],
        "last_image_to_results_seconds": round(arrived - last_image, 1),
        "quiet_seconds": 2,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dicom_node_roundtrip.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def test_two_patients_never_mix(roundtrip: dict[str, Any]) -> None:
    tmp: Path = roundtrip["tmp"]
    keys = {i: patient_key(i) or "" for i in (DEMO_ID, SECOND_ID, NO_ROW_ID)}
    assert roundtrip["states"][keys[SECOND_ID]]["state"] == "sent"
    studies = {i: set(os.listdir(tmp / "spool" / k)) - {"status.json"} for i, k in keys.items()}
    assert all(studies.values()) and not studies[DEMO_ID] & studies[SECOND_ID]
    by_patient: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for _, ds in _received(tmp / "dest"):
        by_patient[str(ds.PatientID)].append(ds)
    assert set(by_patient) == {DEMO_ID, SECOND_ID}  # nothing of the patient without a row
    for pid in (DEMO_ID, SECOND_ID):
        assert {ds.StudyInstanceUID for ds in by_patient[pid]} <= studies[pid]
        results = tmp / "results" / f"P{keys[pid]}"
        index = json.loads((results / "sessions.json").read_text())
        assert {s["study_uid"] for s in index["sessions"]} <= studies[pid]
    assert len(by_patient[SECOND_ID]) == 2 * 2 + 1  # two sessions + the PDF
    waiting = roundtrip["states"][keys[NO_ROW_ID]]
    assert roundtrip["no_row"] == [0]
    assert waiting["state"] == "waiting"
    assert waiting["reason"] == "waiting for day 0 in patients.tsv"
    assert not (tmp / "results" / f"P{keys[NO_ROW_ID]}").exists()


def test_status_files_and_log(roundtrip: dict[str, Any]) -> None:
    tmp: Path = roundtrip["tmp"]
    key = patient_key(DEMO_ID) or ""
    status = roundtrip["states"][key]
    assert status["images"] == len(_images(DEMO))
    assert status["last_send"]["accepted"] == status["last_send"]["objects"] == len(
        status["sent"])
    assert "not_accepted" not in status and "reason" not in status
    text = roundtrip["log"].read_text() + (tmp / "spool" / key / "status.json").read_text()
    for secret in (DEMO_ID, "PHANTOM^DEMO", "PHANTOM"):
        assert secret not in text  # patients appear by key only
