"""The DICOM node's quiet timer and job queue (pipeline.node.jobs) with a fake clock, and the
pieces of a patient's job that need no workflow run (pipeline.node.runner)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml
from node_helpers import tiny_image, write

from pipeline.node import runner
from pipeline.node.jobs import Scheduler
from pipeline.node.send import Destination
from pipeline.node.spool import PatientRow, Spool, patient_key
from pipeline.node.status import read_status, update_status
from pipeline.run import subject_from_patient_id

ROOT = Path(__file__).resolve().parents[2]

A, B = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
STUDY = "1.2.3"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _scheduler(tmp_path: Path, outcomes: dict[str, list[str]] | None = None,
               **kw: object) -> tuple[Scheduler, Clock, list[str]]:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    for key in (A, B):
        spool.file_object(key, STUDY, f"{STUDY}.{len(key)}", b"x")
    clock, ran = Clock(), []
    queue = {k: list(v) for k, v in (outcomes or {}).items()}

    def process(key: str) -> str:
        ran.append(key)
        return queue.get(key, [runner.SENT]).pop(0) if queue.get(key) else runner.SENT

    return Scheduler(spool, process, 60.0, clock=clock, **kw), clock, ran  # type: ignore[arg-type]


def _quiet(s: Scheduler, clock: Clock) -> None:
    """Patient A sent in one association, then the quiet time passes."""
    s.received(A, 1)
    s.closed(1)
    clock.t += 60


def test_quiet_time_and_open_associations(tmp_path: Path) -> None:
    s, clock, ran = _scheduler(tmp_path)
    s.received(A, association=1)
    assert read_status(s.spool.status_path(A))["state"] == "received"
    clock.t += 61
    assert s.due() == []  # the association that brought A is still open
    s.closed(1)
    clock.t += 59
    assert s.run_one() is None
    clock.t += 1
    assert s.run_one() == A and ran == [A]
    assert s.run_one() is None  # nothing new


def test_two_patients_run_separately(tmp_path: Path) -> None:
    s, clock, ran = _scheduler(tmp_path)
    s.received(A, 1)
    s.received(B, 1)
    s.closed(1)
    clock.t += 30
    s.received(B, 2)  # more for B: its quiet time starts again
    s.closed(2)
    clock.t += 30
    assert s.due() == [A]
    assert s.run_one() == A
    clock.t += 30
    assert s.run_one() == B and ran == [A, B]
    status = read_status(s.spool.status_path(B))
    assert status["images"] == 1 and "last_received" in status


def test_images_during_a_run_run_again(tmp_path: Path) -> None:
    s, clock, ran = _scheduler(tmp_path)
    _quiet(s, clock)

    def process(key: str) -> str:
        ran.append(key)
        if len(ran) == 1:
            update_status(s.spool.status_path(key), "running")
            s.received(A, 2)  # arrives while the job runs
            s.closed(2)
            assert read_status(s.spool.status_path(key))["state"] == "running"
        return runner.SENT

    s.process = process
    assert s.run_one() == A
    assert read_status(s.spool.status_path(A))["state"] == "received"
    clock.t += 60
    assert s.run_one() == A and ran == [A, A]


def test_failed_send_retried_then_given_up(tmp_path: Path) -> None:
    s, clock, ran = _scheduler(tmp_path, {A: [runner.FAILED_SEND] * 5}, retry_seconds=300,
                               max_retries=2)
    _quiet(s, clock)
    assert s.run_one() == A
    clock.t += 299
    assert s.run_one() is None
    clock.t += 1
    assert s.run_one() == A
    clock.t += 300
    assert s.run_one() == A
    clock.t += 300
    assert s.run_one() is None and ran == [A, A, A]  # 1 + 2 retries


def test_failed_run_waits_for_new_images(tmp_path: Path) -> None:
    s, clock, ran = _scheduler(tmp_path, {A: [runner.FAILED_RUN]})
    _quiet(s, clock)
    assert s.run_one() == A
    clock.t += 1000
    assert s.run_one() is None


def test_waiting_patient_tried_again_when_the_sheet_changes(tmp_path: Path) -> None:
    token = [0]
    s, clock, ran = _scheduler(tmp_path, {A: [runner.WAITING, runner.SENT]},
                               sheet_token=lambda: token[0])
    _quiet(s, clock)
    assert s.run_one() == A
    assert s.run_one() is None
    token[0] = 1
    assert s.run_one() == A and ran == [A, A]


def test_a_crashing_job_is_failed_and_the_node_goes_on(tmp_path: Path) -> None:
    s, clock, _ = _scheduler(tmp_path)

    def process(key: str) -> str:
        raise KeyError("bug")

    s.process = process
    _quiet(s, clock)
    assert s.run_one() == A
    status = read_status(s.spool.status_path(A))
    assert status["state"] == "failed" and "crashed" in status["reason"]


def test_resume_after_restart(tmp_path: Path) -> None:
    s, clock, _ = _scheduler(tmp_path)
    update_status(s.spool.status_path(A), "running")
    update_status(s.spool.status_path(B), "sent")
    assert s.resume() == [A]
    clock.t += 60
    assert s.run_one() == A


def test_worker_thread_runs_and_stops(tmp_path: Path) -> None:
    import time

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    done: list[str] = []
    s = Scheduler(spool, lambda k: done.append(k) or runner.SENT, 0.1)
    s.start()
    s.received(A, 1)
    s.closed(1)
    for _ in range(40):
        if done:
            break
        time.sleep(0.1)
    s.stop(timeout_s=5)
    assert done == [A]


# ------------------------------------------------------------------------- runner pieces


def _settings(tmp_path: Path, sheet: Path | None) -> runner.NodeSettings:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return runner.NodeSettings(spool=spool, results=tmp_path / "results",
                               destination=Destination("D", "127.0.0.1", 104), ae_title="LT",
                               patients_sheet=sheet, cores=3)


def test_lookup_patient(tmp_path: Path) -> None:
    key = patient_key("PH1") or ""
    assert runner.lookup_patient(_settings(tmp_path, None), key).startswith(
        runner.WAITING_FOR_SHEET)
    sheet = tmp_path / "patients.tsv"
    sheet.write_text("patient_id\tday0\taffected_side\nPH1\t2024-03-01\tright\nPH2\tx\tleft\n")
    settings = _settings(tmp_path, sheet)
    assert runner.lookup_patient(settings, key) == PatientRow("2024-03-01", "right")
    assert runner.lookup_patient(settings, patient_key("PH3") or "") == runner.WAITING_FOR_SHEET
    assert "line 3: day0 'x'" in str(runner.lookup_patient(settings, patient_key("PH2") or ""))


def test_process_patient_without_row_waits(tmp_path: Path) -> None:
    settings = _settings(tmp_path, None)
    assert runner.process_patient(settings, A) == runner.WAITING
    status = read_status(settings.spool.status_path(A))
    assert status["state"] == "waiting"
    assert status["reason"].startswith("waiting for day 0 in patients.tsv")


def test_workflow_command_and_config(tmp_path: Path) -> None:
    settings = _settings(tmp_path, None)
    cmd = runner.workflow_command(settings, tmp_path / "run.yaml")
    assert cmd[:3] == [sys.executable, "-m", "snakemake"]
    assert cmd[cmd.index("--cores") + 1] == "3"
    configs = cmd[cmd.index("--configfile") + 1:cmd.index("--configfile") + 3]
    assert configs == [str(ROOT / "config" / "config.yaml"), str(tmp_path / "run.yaml")]
    config = runner.run_config(settings, A, "P" + A, PatientRow("2024-03-01", "left"),
                               tmp_path / "in")
    assert config["export"] == {"dicom": True} and config["subject"] == "P" + A
    assert config["results_dir"] == str((tmp_path / "results").resolve())
    assert yaml.safe_load(yaml.safe_dump(config)) == config


def test_subject_is_that_of_limbtrack_run(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    key = patient_key(" ph1 ") or ""
    write(tiny_image(" ph1 "), spool.object_path(key, "1.2.3", "1.2.3.1"))
    assert runner.subject_of(spool, key) == subject_from_patient_id("PH1") == "P" + key
    with pytest.raises(ValueError, match="no readable image with a PatientID"):
        runner.subject_of(spool, B)


def test_failure_reason(tmp_path: Path) -> None:
    log = tmp_path / "index.log"
    log.write_text("reading\nindex: no study qualifies (see index.tsv)\n\n")
    output = (f"Building DAG\nError in rule index:\n    jobid: 3\n    log: {log} (check log)\n"
              "Exiting because a job execution failed.\n")
    assert runner.failure_reason(output) == \
        "step index failed: index: no study qualifies (see index.tsv)"
    assert runner.failure_reason("x\nWorkflowError: config invalid\ndone\n") == \
        "WorkflowError: config invalid"
    assert runner.failure_reason("") == "no output"


@pytest.mark.parametrize("missing", ["_seg.dcm", "_sr.dcm"])
def test_session_objects_all_or_failure(tmp_path: Path, missing: str) -> None:
    subject = tmp_path / A
    (subject / "ses-20240301").mkdir(parents=True)
    (subject / "sessions.json").write_text('{"sessions": [{"session": "20240301"}]}')
    for suffix in ("_seg.dcm", "_sr.dcm"):
        if suffix != missing:
            (subject / "ses-20240301" / f"sub-{A}_ses-20240301{suffix}").write_bytes(b"x")
    with pytest.raises(runner.RunFailed, match=f"sub-{A}_ses-20240301{missing} was not"):
        runner.session_objects(subject, A)


def test_failed_run_reported_with_the_step_and_its_log(tmp_path: Path) -> None:
    """A workflow that fails (a stand-in Snakefile: one step that writes its reason to its log
    and exits 1): status failed with the step and that line; the node's files stay intact."""
    flow = tmp_path / "flow"
    (flow / "config").mkdir(parents=True)
    (flow / "config" / "config.yaml").write_text("{}\n")
    (flow / "Snakefile").write_text(
        'rule index:\n    output: "out.txt"\n    log: "index.log"\n'
        '    shell: "echo \'index: no study qualifies (see index.tsv)\' > {log}; exit 1"\n')
    sheet = tmp_path / "patients.tsv"
    sheet.write_text("patient_id\tday0\taffected_side\nPH1\t2024-03-01\tleft\n")
    settings = dataclasses.replace(_settings(tmp_path, sheet), snakefile=flow / "Snakefile",
                                   cores=1)
    key = patient_key("PH1") or ""
    write(tiny_image("PH1", study_uid="1.2.3"), settings.spool.object_path(key, "1.2.3", "1.2.3.1"))
    assert runner.process_patient(settings, key) == runner.FAILED_RUN
    status = read_status(settings.spool.status_path(key))
    assert status["state"] == "failed"
    assert status["reason"].startswith(
        "workflow failed: step index failed: index: no study qualifies (see index.tsv)")
    assert "exit 1" in status["reason"] and status["run"]["seconds"] > 0
    work = settings.spool.work_dir(key)
    config = yaml.safe_load((work / "config.yaml").read_text())
    assert config["patient"] == "PH1" and config["export"] == {"dicom": True}
    assert (work / "input" / "received" / "1.2.3" / "1.2.3.1.dcm").is_symlink()
    assert settings.spool.counts(key) == (1, 1)
