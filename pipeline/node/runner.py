"""One patient through the DICOM node: the workflow over every study received for them (plus
their archive folder), then the results to the destination.

:func:`process_patient` is the whole job, in named steps: look the patient up in the patients
sheet, run the workflow (:func:`run_workflow`: Snakemake as a subprocess with an argument list
and a configfile written for the run), collect the DICOM SEG and SR of each session, print the
report to an Encapsulated PDF, send what the destination has not accepted yet. Every step
writes the patient's ``status.json`` (:mod:`pipeline.node.status`).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import yaml

from pipeline.export import ExportError
from pipeline.export.pdf import encapsulated_pdf, html_to_pdf, write_encapsulated_pdf
from pipeline.io.files import sha256_file
from pipeline.io.identity import normalise_patient_id
from pipeline.node.send import Destination, SendResult, send_files
from pipeline.node.spool import (
    NodeError,
    PatientRow,
    Spool,
    archive_folder,
    build_input_view,
    read_patients,
)
from pipeline.node.status import now_iso, read_status, update_status
from pipeline.run import SNAKEFILE, subject_from_patient_id

LOG = logging.getLogger("limbtrack.node")
WAITING_FOR_SHEET = "waiting for day 0 in patients.tsv"
#: Outcomes of :func:`process_patient` (the scheduler retries FAILED_SEND).
SENT, WAITING, FAILED_RUN, FAILED_SEND = "sent", "waiting", "failed-run", "failed-send"
#: Where the node keeps a patient's report PDF and its DICOM object:
#: <results>/<subject>/NODE_DIR
NODE_DIR = "dicom-node"
#: The workflow processes running now (:func:`stop_runs`).
_RUNNING: set[subprocess.Popen[bytes]] = set()
_RUNNING_LOCK = threading.Lock()


@dataclass(frozen=True)
class NodeSettings:
    """Everything a patient's job needs (``limbtrack listen``'s options)."""

    spool: Spool
    results: Path
    destination: Destination
    ae_title: str  # the node's own AE title (the calling AE title when sending)
    patients_sheet: Path | None = None
    archive: Path | None = None
    cores: int = 2
    snakefile: Path = SNAKEFILE
    chromium: str | None = None
    run_timeout_s: float = 6 * 3600.0
    send_timeout_s: float = 60.0


class RunFailed(RuntimeError):
    """The workflow did not produce the results; the message is the reason in one line."""


def process_patient(settings: NodeSettings, key: str) -> str:
    """Run and send one patient; returns SENT, WAITING, FAILED_RUN or FAILED_SEND."""
    status_path = settings.spool.status_path(key)
    row = lookup_patient(settings, key)
    if isinstance(row, str):
        update_status(status_path, "waiting", reason=row)
        LOG.info("patient %s: filed, not run (%s)", key, row)
        return WAITING
    studies, images = settings.spool.counts(key)
    started = time.monotonic()
    update_status(status_path, "running", reason=None, studies=studies, images=images,
                  run={"started": now_iso()})
    LOG.info("patient %s: workflow started (%d studies, %d images)", key, studies, images)
    try:
        subject = subject_of(settings.spool, key)
        log = run_workflow(settings, key, subject, row)
        objects = session_objects(settings.results / subject, subject)
    except (RunFailed, NodeError, OSError) as err:
        return _failed(status_path, key, FAILED_RUN, f"workflow failed: {err}", started)
    run = {**read_status(status_path).get("run", {}), "finished": now_iso(),
           "seconds": round(time.monotonic() - started, 1), "log": str(log)}
    update_status(status_path, run=run, sessions=len(objects) // 2)
    problems = []
    try:
        objects.append(report_object(settings, key, subject, objects))
    except (ExportError, OSError, ValueError) as err:
        problems.append(f"report PDF not made: {err}")
        LOG.error("patient %s: report PDF not made: %s", key, err)
    return send_results(settings, key, objects, problems)


def lookup_patient(settings: NodeSettings, key: str) -> PatientRow | str:
    """The patient's row of the patients sheet, or why the patient waits."""
    if settings.patients_sheet is None:
        return f"{WAITING_FOR_SHEET} (the node was started without --patients)"
    try:
        row = read_patients(settings.patients_sheet).get(key)
    except NodeError as err:
        return f"{WAITING_FOR_SHEET}: {err}"
    if row is None:
        return WAITING_FOR_SHEET
    return row if isinstance(row, PatientRow) else f"{WAITING_FOR_SHEET}: {row}"


def _failed(status_path: Path, key: str, outcome: str, reason: str, started: float) -> str:
    run = {**read_status(status_path).get("run", {}), "finished": now_iso(),
           "seconds": round(time.monotonic() - started, 1)}
    update_status(status_path, "failed", reason=reason, run=run)
    LOG.error("patient %s: %s", key, reason)
    return outcome


# ---------------------------------------------------------------------------- the workflow


def subject_of(spool: Spool, key: str) -> str:
    """The patient's subject ID: the one ``limbtrack run`` gives the same PatientID
    (:func:`pipeline.run.subject_from_patient_id`, ``P`` + the patient key), so both write
    to ``<results>/P<patient key>/``."""
    patient_id = spool.patient_id(key)
    normalised = normalise_patient_id(patient_id)
    if normalised is None:
        raise NodeError(f"no readable image with a PatientID in {spool.patient_dir(key)}")
    return subject_from_patient_id(normalised)


def run_config(settings: NodeSettings, key: str, subject: str, row: PatientRow,
               input_dir: Path) -> dict[str, Any]:
    """The workflow configuration of one patient's run (on top of config/config.yaml)."""
    patient_id = settings.spool.patient_id(key)
    return {
        "input_dir": str(input_dir), "subject": subject, "day0": row.day0,
        "affected_side": row.affected_side, "events": row.events or "auto",
        "results_dir": str(settings.results.resolve()), "subjects_sheet": "",
        # the folder holds one PatientID; naming it keeps studies whose name or birth date
        # differ (a renamed patient) together
        "patient": patient_id or "",
        "export": {"dicom": True},
    }


def workflow_command(settings: NodeSettings, configfile: Path) -> list[str]:
    """Snakemake's argument list (no shell): the package's Snakefile and default config,
    then the run's configfile; one run per patient at a time, so no lock is needed."""
    default_config = settings.snakefile.parent / "config" / "config.yaml"
    return [sys.executable, "-m", "snakemake", "--snakefile", str(settings.snakefile),
            "--cores", str(settings.cores), "--configfile", str(default_config),
            str(configfile), "--nolock", "--rerun-incomplete"]


def run_workflow(settings: NodeSettings, key: str, subject: str, row: PatientRow) -> Path:
    """Run the workflow for one patient in their work folder; returns the log's path.

    Raises RunFailed with the failing step and the last line of its log.
    """
    work = settings.spool.work_dir(key)
    patient_id = settings.spool.patient_id(key)
    view, n_files = build_input_view(settings.spool, key,
                                     archive_folder(settings.archive, key, patient_id))
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(run_config(settings, key, subject, row, view)),
                          encoding="utf-8")
    log = work / "workflow.log"
    LOG.info("patient %s: snakemake over %d files, log %s", key, n_files, log)
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(workflow_command(settings, configfile), cwd=work, stdout=fh,
                                stderr=subprocess.STDOUT)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            returncode = proc.wait(timeout=settings.run_timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
            raise RunFailed(f"did not finish in {settings.run_timeout_s:.0f} s (log {log})"
                            ) from None
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    if returncode != 0:
        output = log.read_text(encoding="utf-8", errors="replace")
        raise RunFailed(f"{failure_reason(output, work)} (exit {returncode}; log {log})")
    return log


def stop_runs() -> None:
    """Ask every running workflow to stop (SIGTERM: Snakemake stops its jobs and marks their
    outputs incomplete; the next run redoes them)."""
    with _RUNNING_LOCK:
        for proc in _RUNNING:
            proc.terminate()


def failure_reason(output: str, cwd: Path = Path()) -> str:
    """One line from Snakemake's output: the failing rule and the last line of its log (a
    relative log path is below `cwd`, the run's folder), else the last error-looking line."""
    rule = re.search(r"Error in rule (\w+):", output)
    if rule:
        after = output[rule.end():]
        log = re.search(r"^\s*log: (\S+)", after, flags=re.M)
        last = _last_line(cwd / log.group(1)) if log else ""
        return f"step {rule.group(1)} failed" + (f": {last}" if last else "")
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "rror" in ln or "xception" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    return next((ln for ln in reversed(lines) if ln), "")[:300]


def session_objects(subject_dir: Path, subject: str) -> list[Path]:
    """The SEG and SR of every session the index listed; RunFailed when one is missing."""
    sessions = json.loads((subject_dir / "sessions.json").read_text(encoding="utf-8"))
    out = []
    for entry in sessions["sessions"]:
        session = entry["session"]
        stem = subject_dir / f"ses-{session}" / f"sub-{subject}_ses-{session}"
        for suffix in ("_seg.dcm", "_sr.dcm"):
            path = stem.with_name(stem.name + suffix)
            if not path.is_file():
                raise RunFailed(f"{path.name} was not written")
            out.append(path)
    return out


# ------------------------------------------------------------------------------ the report


def latest_source(subject_dir: Path) -> pydicom.Dataset:
    """A source image (header only) of the latest session: its patient and study go on the
    report object."""
    sessions = json.loads((subject_dir / "sessions.json").read_text(encoding="utf-8"))
    latest = max(sessions["sessions"],
                 key=lambda s: (s.get("study_date") or "", s.get("study_time") or ""))
    files = (latest.get("fluid") or {}).get("files") or latest["anatomical"]["files"]
    return pydicom.dcmread(files[0], stop_before_pixels=True)


def report_object(settings: NodeSettings, key: str, subject: str, sources: Sequence[Path]
                  ) -> Path:
    """The report as Encapsulated PDF (``<results>/<subject>/dicom-node/report_pdf.dcm``),
    made again only when report.html changed since the last one."""
    subject_dir = settings.results / subject
    html = subject_dir / "report.html"
    out_dir = subject_dir / NODE_DIR
    pdf, dcm = out_dir / "report.pdf", out_dir / "report_pdf.dcm"
    html_sha = sha256_file(html)
    status_path = settings.spool.status_path(key)
    if dcm.is_file() and read_status(status_path).get("report", {}).get("html_sha256") \
            == html_sha:
        return dcm
    pages = html_to_pdf(html, pdf, settings.chromium)
    references = []
    for path in sources:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        references.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    obj = encapsulated_pdf(pdf.read_bytes(), latest_source(subject_dir),
                           references=references)
    write_encapsulated_pdf(obj, dcm)
    update_status(status_path, report={"html_sha256": html_sha, "pdf_pages": pages,
                                       "pdf_bytes": pdf.stat().st_size,
                                       "sop_instance_uid": str(obj.SOPInstanceUID)})
    LOG.info("patient %s: report PDF, %d pages, %d bytes", key, pages, pdf.stat().st_size)
    return dcm


# -------------------------------------------------------------------------------- sending


def send_results(settings: NodeSettings, key: str, objects: Sequence[Path],
                 problems: Sequence[str]) -> str:
    """Send the objects the destination has not accepted yet (same SOP instance and bytes);
    ``sent`` only when every one was accepted and nothing else went wrong."""
    status_path = settings.spool.status_path(key)
    accepted_before = read_status(status_path).get("sent", [])
    done = {(e.get("sop_instance_uid"), e.get("sha256")) for e in accepted_before}
    digests = {p: sha256_file(p) for p in objects}
    todo = [p for p in objects if (_instance_uid(p), digests[p]) not in done]
    update_status(status_path, "sending", reason=None, not_accepted=None,
                  sending={"objects": len(todo), "destination": str(settings.destination),
                           "started": now_iso()})
    results = send_files(settings.destination, todo, settings.ae_title,
                         settings.send_timeout_s) if todo else []
    accepted = [dict(r.describe(), sha256=digests[r.path]) for r in results if r.accepted]
    refused = [r for r in results if not r.accepted]
    fields = {"sent": [*accepted_before, *accepted],
              "last_send": {"finished": now_iso(), "objects": len(todo),
                            "accepted": len(accepted), "already_sent": len(objects) - len(todo),
                            "destination": str(settings.destination)},
              "sending": None}
    if refused or problems:
        reason = "; ".join([*problems, *_refusal_summary(refused)])
        update_status(status_path, "failed", reason=reason,
                      not_accepted=[r.describe() for r in refused], **fields)
        LOG.error("patient %s: %s", key, reason)
        return FAILED_SEND
    update_status(status_path, "sent", reason=None, **fields)
    LOG.info("patient %s: sent %d objects to %s (%d sent before)", key, len(todo),
             settings.destination, len(objects) - len(todo))
    return SENT


def _refusal_summary(refused: Sequence[SendResult]) -> list[str]:
    if not refused:
        return []
    names = ", ".join(r.path.name for r in refused[:5]) + (" ..." if len(refused) > 5 else "")
    return [f"{len(refused)} object(s) not accepted by the destination: {names} "
            f"({refused[0].reason or refused[0].describe()['status']})"]


def _instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True,
                               specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
