"""Helpers the Snakefile calls: subjects from the config or the subjects sheet, sessions.

Kept here (importable, tested) so the Snakefile stays wiring only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.baseline import baseline_position, session_day
from pipeline.io.files import is_within, read_tsv, walk_entries
from pipeline.io.sheet import SHEET_COLUMNS, is_sessions_sheet

SUBJECT_RE = re.compile(r"[A-Za-z0-9]+")
DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
SIDES = ("left", "right", "auto")
REQUIRED_COLUMNS = ("subject", "input_dir", "day0", "affected_side")
#: Files at the top of a study folder that are not part of the DICOM export (the DICOM index
#: leaves them out too: pipeline.io.scan.COMPANION_FILES).
COMPANION_FILES = ("events.tsv",)


class ConfigError(ValueError):
    """A configuration value that cannot work, with what to change."""


def _check_subject(subject: dict[str, str], where: str) -> dict[str, str]:
    sid = subject["subject"]
    if not SUBJECT_RE.fullmatch(sid):
        raise ConfigError(
            f"{where}: subject {sid!r} must be letters and digits only "
            "(it becomes part of file names)"
        )
    try:
        # Python 3.11 also accepts 20240301 or 2024-W09-5; the outputs promise YYYY-MM-DD.
        if not DATE_RE.fullmatch(subject["day0"]):
            raise ValueError(subject["day0"])
        dt.date.fromisoformat(subject["day0"])
    except ValueError:
        raise ConfigError(
            f"{where}: day0 {subject['day0']!r} of subject {sid} is not a date YYYY-MM-DD"
        ) from None
    if subject["affected_side"] not in SIDES:
        raise ConfigError(
            f"{where}: affected_side of subject {sid} must be left, right or "
            f"auto, not {subject['affected_side']!r}"
        )
    # Path("") is the current folder: an empty cell must not pass as a study folder.
    given = subject["input_dir"]
    if not given or not (Path(given).is_dir() or is_sessions_sheet(given)):
        raise ConfigError(
            f"{where}: input_dir {given!r} of subject {sid} is not a folder (a DICOM study "
            "folder) nor a .tsv sessions sheet (NIfTI input)"
        )
    return subject


def index_args(subject: dict[str, str], out_dir: str, series: dict[str, str],
               show_phi: bool = False) -> str:
    """``limbtrack`` subcommand and arguments of the index step for a subject's input (DICOM
    folder or sheet).

    A DICOM folder's index takes the subject's ``patient`` (its fingerprint or PatientID:
    only that patient's studies are used; empty: the folder must hold one patient) and
    ``show_phi`` (the table of patients of a refused folder then shows IDs and names)."""
    q = shlex.quote
    if is_sessions_sheet(subject["input_dir"]):
        return (f"nifti index --sheet {q(subject['input_dir'])} "
                f"--subject {q(subject['subject'])} --out-dir {q(out_dir)}")
    args = f"index --input-dir {q(subject['input_dir'])} --out-dir {q(out_dir)}"
    for flag, key in (("--anatomical-regex", "anatomical_regex"),
                      ("--fluid-regex", "fluid_regex")):
        if series.get(key):
            args += f" {flag} {q(series[key])}"
    if subject.get("patient"):
        args += f" --patient {q(subject['patient'])}"
    if show_phi:
        args += " --show-phi"
    return args


def is_dicom_input(subject: Mapping[str, str]) -> bool:
    """Whether a subject's input is a DICOM study folder (else a NIfTI sessions sheet)."""
    return not is_sessions_sheet(subject["input_dir"])


def convert_command(subject: Mapping[str, str]) -> str:
    """``limbtrack`` subcommand converting one session of a subject's input."""
    return "convert" if is_dicom_input(subject) else "nifti convert"


def default_events(input_dir: str) -> str:
    """The events file of a study folder when the config says ``events: auto``.

    ``events.tsv`` at the top of the input folder, if present; else none.
    """
    if not Path(input_dir).is_dir():
        return ""  # a sessions sheet: events must be named explicitly
    candidate = Path(input_dir) / "events.tsv"
    return str(candidate) if candidate.is_file() else ""


def load_subjects(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Subjects to run: the subjects sheet when ``subjects_sheet`` is set, else the one subject
    given by ``input_dir``/``subject``/``day0``/``affected_side``/``events``."""
    sheet = str(config.get("subjects_sheet") or "")
    rows: list[dict[str, str]]
    if sheet:
        try:
            rows = [dict(r) for r in read_tsv(sheet)]
        except OSError as err:
            raise ConfigError(f"subjects_sheet {sheet!r} cannot be read ({err})") from None
        if not rows:
            raise ConfigError(
                f"{sheet}: no subjects listed (a header line, then one line per subject)"
            )
        wheres = [f"{sheet}, subject row {n}" for n in range(1, len(rows) + 1)]
        missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
        if missing:
            raise ConfigError(
                f"{sheet}: missing column(s) {', '.join(missing)}; the subjects "
                f"sheet needs {', '.join(REQUIRED_COLUMNS)} (and optionally "
                "events), tab-separated"
            )
    else:
        rows = [
            {
                k: str(config.get(k, "") or "")
                for k in ("subject", "input_dir", "day0", "affected_side", "events", "patient")
            }
        ]
        wheres = ["config"]
    subjects: dict[str, dict[str, str]] = {}
    for row, where in zip(rows, wheres, strict=True):
        row = {k: (v or "").strip() for k, v in row.items() if k}
        if sheet and not row.get("patient"):  # the sheet's optional column, else the config's
            row["patient"] = str(config.get("patient", "") or "").strip()
        events = row.get("events", "auto") or "auto"
        row["events"] = default_events(row["input_dir"]) if events == "auto" else events
        if row["events"] and not Path(row["events"]).is_file():
            raise ConfigError(
                f"{where}: events file {row['events']!r} of subject "
                f"{row.get('subject')} does not exist"
            )
        subject = _check_subject(row, where)
        if subject["subject"] in subjects:
            raise ConfigError(f"{where}: subject {subject['subject']} is listed twice")
        results = str(config.get("results_dir") or "")
        if results:
            _check_outputs_outside_input(subject, Path(results) / subject["subject"], where)
        _check_events(subject, where)
        subjects[subject["subject"]] = subject
    return subjects


def _check_outputs_outside_input(subject: Mapping[str, str], subject_dir: Path,
                                 where: str) -> None:
    """Refuse, before anything is written, a results folder inside the input (or the
    input inside the subject's results folder, which the workflow writes into), and a
    Snakemake working folder (``.snakemake/``) inside the input."""
    given = subject["input_dir"]
    sid = subject["subject"]
    if is_sessions_sheet(given):
        inputs = [Path(given), *sheet_images(Path(given), sid)]
        clash = [p for p in inputs if is_within(p, subject_dir)]
        if clash:
            raise ConfigError(
                f"{where}: the results folder {subject_dir} of subject {sid} holds its input "
                f"{clash[0]}, which the workflow only reads; choose another results_dir")
        return
    if is_within(subject_dir, given) or is_within(given, subject_dir):
        raise ConfigError(
            f"{where}: the results folder {subject_dir} of subject {sid} lies inside its "
            f"study folder {given} (or holds it), which is only read, never written; choose "
            "a results_dir outside it")
    if is_within(os.getcwd(), given):
        raise ConfigError(
            f"{where}: the working folder {os.getcwd()} lies inside the study folder {given} "
            f"of subject {sid}, which is only read, never written (Snakemake keeps its state "
            "in .snakemake/ there); run from, or give --directory, another folder")


def _check_events(subject: Mapping[str, str], where: str) -> None:
    """The events file of a subject can be read (ConfigError naming file and line if not)."""
    if not subject["events"]:
        return
    from pipeline.longitudinal import read_events  # lazily: only when there is an events file

    try:
        read_events(subject["events"], subject["day0"], warnings=[])
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: events of subject {subject['subject']}: {err}") from None


# --------------------------------------------------------------------------- re-run triggers


def _walk_stats(top: Path, skip: set[str]) -> Iterator[str]:
    """One line per entry under `top` (relative path, size, mtime in ns), in the DICOM
    index's walk order (:func:`pipeline.io.files.walk_entries`), but for the relative paths
    in `skip`. No file is opened."""
    root = os.fspath(top)
    cut = len(root.rstrip(os.sep)) + 1
    for folder, entry in walk_entries(root):
        if isinstance(entry, OSError):
            yield f"{folder[cut:]}\tunreadable folder\t{entry.errno}"
            continue
        rel = entry.path[cut:]
        if rel in skip:
            continue
        try:
            st = entry.stat()  # follows a link, as the index reads it
            yield f"{rel}\t{st.st_size}\t{st.st_mtime_ns}"
        except OSError as err:
            yield f"{rel}\tunreadable\t{err.errno}"


def sheet_images(sheet: Path, subject: str) -> list[Path]:
    """The image paths a sessions sheet names for `subject` (resolved, relative to the sheet);
    empty when the sheet cannot be read (the index step says why)."""
    try:
        rows = read_tsv(sheet)
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for row in rows:
        if (row.get("subject") or "").strip() == subject and (row.get("path") or "").strip():
            path = Path((row.get("path") or "").strip())
            out.append(path if path.is_absolute() else (sheet.parent / path).resolve())
    return out


def input_digest(subject: Mapping[str, str], series: Mapping[str, Any]) -> str:
    """A fingerprint of everything the index step reads, computed when the workflow is
    built (a ``params`` of the index rule, so a change re-runs it):

    * a study folder: its resolved path and, for every file below it, the relative path,
      size and modification time (no file is opened; ``events.tsv`` at the top and the
      subject's events file are left out: the events are an input of their own);
    * a sessions sheet: its resolved path, its header and the subject's rows, and the size
      and modification time of every image they name;
    * the series selection settings.

    Cost: one ``stat`` per file, no read: 5 000 files in nested study folders took 40-45 ms
    with a warm file-system cache and 0.17 s after dropping it (2 busy cores).
    """
    digest = hashlib.sha256()
    given = subject["input_dir"]
    n = 0
    if is_sessions_sheet(given):
        kind, sheet = "NIfTI sessions sheet", Path(given).resolve()
        digest.update(f"sheet\t{sheet}\n".encode())
        try:
            rows = read_tsv(sheet)
        except (OSError, UnicodeDecodeError) as err:
            rows = []
            digest.update(f"unreadable\t{err}\n".encode())
        if rows:
            digest.update(("\t".join(rows[0]) + "\n").encode())
        for row in rows:
            if (row.get("subject") or "").strip() == subject["subject"]:
                digest.update(("\t".join(str(row.get(c)) for c in SHEET_COLUMNS)
                               + "\n").encode())
        for path in sheet_images(sheet, subject["subject"]):
            try:
                st = path.stat()
                line = f"{path}\t{st.st_size}\t{st.st_mtime_ns}"
            except OSError as err:
                line = f"{path}\tmissing\t{err.errno}"
            digest.update((line + "\n").encode())
            n += 1
    else:
        kind, top = "study folder", Path(given).resolve()
        digest.update(f"folder\t{top}\n".encode())
        skip = set(COMPANION_FILES)
        events = Path(subject.get("events") or "").resolve() if subject.get("events") else None
        if events is not None and is_within(events, top):
            skip.add(os.path.relpath(events, top))
        lines = list(_walk_stats(top, skip))
        digest.update(("\n".join(lines) + "\n").encode())
        n = len(lines)
    for key in sorted(series):
        digest.update(f"series.{key}\t{series[key]}\n".encode())
    return f"{kind} {given}: {n} files, listing sha256 {digest.hexdigest()[:24]}"


def session_entry_digest(sessions_json: str | Path, session: str) -> str:
    """A fingerprint of what the index says about one session (its series, the input it came
    from) and of the size and modification time of each of its files: a ``params`` of the
    convert rule, so that re-indexing re-converts only the sessions whose entry or files
    changed (a file rewritten with the same header, too)."""
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    entry = next((s for s in data["sessions"] if s["session"] == session), None)
    digest = hashlib.sha256(json.dumps(
        {"input_dir": data.get("input_dir"), "input_kind": data.get("input_kind"),
         "entry": entry}, sort_keys=True).encode())
    for role in ("anatomical", "fluid"):
        for name in (entry or {}).get(role, {}).get("files", []):
            try:
                st = os.stat(name)
                digest.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            except OSError as err:
                digest.update(f"{name}\tmissing\t{err.errno}\n".encode())
    return f"session {session}: sha256 {digest.hexdigest()[:24]}"


def session_labels(sessions_json: str | Path) -> list[str]:
    """Session labels listed by the index stage."""
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    return [s["session"] for s in data["sessions"]]


def baseline_session(sessions_json: str | Path, day0: str) -> str:
    """Label of the baseline session: :func:`pipeline.baseline.baseline_position` over the
    sessions in date order (the last on or before day 0, else the first)."""
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    sessions = sorted(data["sessions"], key=lambda s: s["study_date"])
    if not sessions:
        raise ValueError(f"{sessions_json}: no sessions")
    days = [session_day(s["study_date"], day0) for s in sessions]
    return str(sessions[baseline_position(days)]["session"])


def limbtrack_command(python: str, conda: bool = False, package_dir: str = "") -> str:
    """The command a rule's shell runs a ``limbtrack`` subcommand with
    (:data:`pipeline.cli.COMMANDS`).

    Without conda: `python`, the interpreter running Snakemake (a cluster node's Snakemake
    runs its job with its own). With ``--use-conda`` (`conda`): the ``python`` of the rule's
    environment (environment.yml, activated by Snakemake), which holds the dependencies; the
    package is this folder's (`package_dir` on ``PYTHONPATH``).
    """
    if conda:
        return f"PYTHONPATH={shlex.quote(package_dir)} python -m pipeline.cli"
    return f"{shlex.quote(python)} -m pipeline.cli"


def registration_reference(affected_side: str) -> str:
    """Limb that drives the registration: the contralateral one when the side is known (its
    size does not change with the disease), else both are tried."""
    return {"left": "right", "right": "left"}.get(affected_side, "auto")


def as_flag(value: Any) -> Any:
    """A boolean from command-line text ('true', 'yes', '1'); other values unchanged."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return value


def pass_research_salt(config: Mapping[str, Any]) -> None:
    """Hand the research-export salt to jobs through the environment, never through a command
    line (which Snakemake prints and logs)."""
    import os

    salt = str(config.get("research", {}).get("salt") or "")
    if salt:
        os.environ["LIMBTRACK_RESEARCH_SALT"] = salt


#: The target that indexes every subject of a cohort and nothing more (the Snakefile's rule).
INDEX_ALL = "index_all"
#: Subjects still to index above which a run is advised to index them first.
INDEX_FIRST_ABOVE_SUBJECTS = 16


def index_targets(results_dir: str, subjects: Iterable[str]) -> list[str]:
    """Every subject's ``sessions.json`` (an output of its index), in the subjects' order:
    the input of the Snakefile's ``index_all``, and the targets of the first pass of
    ``limbtrack run --cohort``. Given as files, the targets make Snakemake's DAG hold the
    index jobs alone, so a finished index re-plans nothing (an ``index_all`` job gathering
    them is re-planned after each one; benchmarks/checkpoint_scaling.py compares both)."""
    results = results_dir.rstrip("/")
    return [f"{results}/{subject}/sessions.json" for subject in sorted(subjects)]


def index_first(subjects: int) -> bool:
    """Whether a cohort of `subjects` is run in two passes, every subject's index first
    (:func:`index_targets`): above :data:`INDEX_FIRST_ABOVE_SUBJECTS`; below, the re-planning
    costs less than a second Snakemake start (~2 s of CPU)."""
    return subjects > INDEX_FIRST_ABOVE_SUBJECTS


def index_first_advice(unindexed: int, target_rules: set[str]) -> str:
    """The warning for a run that would index more than :data:`INDEX_FIRST_ABOVE_SUBJECTS`
    subjects and go on past their index in the same run; empty when none is due.

    Why: each subject's index is a checkpoint, and after every checkpoint Snakemake re-plans
    the whole DAG of the run, so its own CPU grows with the square of the subjects still to
    index (docs/design.md, Costs). Indexed subjects' sessions are known when the DAG is built:
    a first run with the target ``index_all`` makes the second one plan once."""
    if not index_first(unindexed) or target_rules <= {INDEX_ALL, "index"}:
        return ""
    return (f"{unindexed} subjects are not indexed yet, and Snakemake re-plans the whole run "
            "after each one's index (its own CPU grows with the square of their number). "
            f"Index them first: the same command with the target {INDEX_ALL}, then without "
            "it; `limbtrack run --cohort` does both.")


#: Snakemake's default ``--max-jobs-per-timespan`` (its command line's ``100/1s``).
DEFAULT_SUBMISSION_LIMIT = (100, 1.0)


def lift_default_submission_limit(scheduler: Any) -> bool:
    """Drop the default job submission limit (100 jobs per second) from Snakemake's job
    scheduler before it starts (the Snakefile's ``onstart``); a limit the user set otherwise
    is kept. Returns whether it was dropped.

    Why: with a limit, Snakemake's scheduler (9.x) arms a one-timespan timer each time it
    wakes with jobs waiting, and each timer wakes it again, so the timers pile up, one more
    per job finished: with 8 small subjects its loop turned ~30 times a second by the end,
    each turn costing time in the number of waiting jobs, and its CPU grew with the square
    of the cohort. 100 jobs per second limits nothing here: the jobs take seconds to
    minutes, and ``jobs:`` in profiles/slurm bounds what is queued on a cluster."""
    limiter = getattr(scheduler, "job_rate_limiter", None)
    if limiter is None:
        return False
    if (limiter.max_jobs, float(limiter.timespan)) != DEFAULT_SUBMISSION_LIMIT:
        return False
    scheduler.job_rate_limiter = None
    return True
