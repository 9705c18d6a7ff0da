"""Helpers the Snakefile calls: subjects from the config or the subjects sheet, sessions.

Kept here (importable, tested) so the Snakefile stays wiring only.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io_utils import read_tsv

SUBJECT_RE = re.compile(r"^[A-Za-z0-9]+$")
SIDES = ("left", "right", "auto")


class ConfigError(ValueError):
    """A configuration value that cannot work, with what to change."""


def _check_subject(subject: dict[str, str], where: str) -> dict[str, str]:
    sid = subject["subject"]
    if not SUBJECT_RE.match(sid):
        raise ConfigError(f"{where}: subject {sid!r} must be letters and digits only "
                          "(it becomes part of file names)")
    try:
        dt.date.fromisoformat(subject["day0"])
    except ValueError:
        raise ConfigError(f"{where}: day0 {subject['day0']!r} of subject {sid} is not a date "
                          "YYYY-MM-DD") from None
    if subject["affected_side"] not in SIDES:
        raise ConfigError(f"{where}: affected_side of subject {sid} must be left, right or "
                          f"auto, not {subject['affected_side']!r}")
    if not Path(subject["input_dir"]).is_dir():
        raise ConfigError(f"{where}: input_dir {subject['input_dir']!r} of subject {sid} is not "
                          "a folder")
    return subject


def default_events(input_dir: str) -> str:
    """The events file of a study folder when the config says ``events: auto``.

    ``events.tsv`` at the top of the input folder, if present; else none.
    """
    candidate = Path(input_dir) / "events.tsv"
    return str(candidate) if candidate.is_file() else ""


def load_subjects(config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Subjects to run: the subjects sheet when ``subjects_sheet`` is set, else the one subject
    given by ``input_dir``/``subject``/``day0``/``affected_side``/``events``."""
    sheet = str(config.get("subjects_sheet") or "")
    rows: list[dict[str, str]]
    if sheet:
        rows = [dict(r) for r in read_tsv(sheet)]
        where = sheet
    else:
        rows = [{k: str(config.get(k, "")) for k in
                 ("subject", "input_dir", "day0", "affected_side", "events")}]
        where = "config"
    subjects: dict[str, dict[str, str]] = {}
    for row in rows:
        row = {k: (v or "").strip() for k, v in row.items() if k}
        events = row.get("events", "auto") or "auto"
        row["events"] = default_events(row["input_dir"]) if events == "auto" else events
        if row["events"] and not Path(row["events"]).is_file():
            raise ConfigError(f"{where}: events file {row['events']!r} of subject "
                              f"{row.get('subject')} does not exist")
        subject = _check_subject(row, where)
        if subject["subject"] in subjects:
            raise ConfigError(f"{where}: subject {subject['subject']} is listed twice")
        subjects[subject["subject"]] = subject
    return subjects


def session_labels(sessions_json: str | Path) -> list[str]:
    """Session labels listed by the index stage."""
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    return [s["session"] for s in data["sessions"]]
