"""Helpers the Snakefile calls: subjects from the config or the subjects sheet, sessions.

Kept here (importable, tested) so the Snakefile stays wiring only.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io_utils import read_tsv
from .nifti_input import is_sessions_sheet

SUBJECT_RE = re.compile(r"[A-Za-z0-9]+")
DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
SIDES = ("left", "right", "auto")
REQUIRED_COLUMNS = ("subject", "input_dir", "day0", "affected_side")


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


def index_args(subject: dict[str, str], out_dir: str, series: dict[str, str]) -> str:
    """Module and arguments of the index step for a subject's input (DICOM folder or sheet)."""
    q = shlex.quote
    if is_sessions_sheet(subject["input_dir"]):
        return (f"pipeline.nifti_input index --sheet {q(subject['input_dir'])} "
                f"--subject {q(subject['subject'])} --out-dir {q(out_dir)}")
    args = f"pipeline.dicom_index --input-dir {q(subject['input_dir'])} --out-dir {q(out_dir)}"
    for flag, key in (("--anatomical-regex", "anatomical_regex"),
                      ("--fluid-regex", "fluid_regex")):
        if series.get(key):
            args += f" {flag} {q(series[key])}"
    return args


def convert_module(subject: dict[str, str]) -> str:
    """Module (and subcommand) converting one session of a subject's input."""
    if is_sessions_sheet(subject["input_dir"]):
        return "pipeline.nifti_input convert"
    return "pipeline.convert"


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
                k: str(config.get(k, ""))
                for k in ("subject", "input_dir", "day0", "affected_side", "events")
            }
        ]
        wheres = ["config"]
    subjects: dict[str, dict[str, str]] = {}
    for row, where in zip(rows, wheres, strict=True):
        row = {k: (v or "").strip() for k, v in row.items() if k}
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
        subjects[subject["subject"]] = subject
    return subjects


def session_labels(sessions_json: str | Path) -> list[str]:
    """Session labels listed by the index stage."""
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    return [s["session"] for s in data["sessions"]]


def baseline_session(sessions_json: str | Path, day0: str) -> str:
    """Label of the baseline session: the last on or before day 0, else the first."""
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    sessions = sorted(data["sessions"], key=lambda s: s["study_date"])
    if not sessions:
        raise ValueError(f"{sessions_json}: no sessions")
    before = [s for s in sessions if s["study_date"] <= day0]
    return str((before[-1] if before else sessions[0])["session"])


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
