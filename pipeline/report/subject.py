"""One subject's outputs as the report reads them: ``summary.json`` and the tables, read once,
with the lookups every section of the report shares (sessions by day, QC index, registration).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import labels
from pipeline.io.files import finite_float
from pipeline.report.inputs import ReportInputs, read_optional_tsv
from pipeline.report.qcview import QCIndex, read_flags, unavailable_days
from pipeline.report.states import session_state_rows
from pipeline.report.values import to_int


@dataclass
class SubjectData:
    """The subject's outputs. ``subject`` is the summary's name for it (else its folder's);
    ``notes`` collects what could not be read, in the order found; a table that is absent is
    None (``longitudinal`` and ``volumes``: empty)."""

    subject: str
    summary: dict[str, Any]
    notes: list[str]
    longitudinal: list[dict[str, str]]
    volumes: list[dict[str, str]]
    index_rows: list[dict[str, str]] | None
    problems: list[dict[str, str]] | None
    csa_rows: list[dict[str, str]] | None
    circ_rows: list[dict[str, str]] | None
    sessions: list[dict[str, Any]]
    qc: QCIndex
    states: list[dict[str, Any]] | None
    registration: dict[str, Any]

    @property
    def affected(self) -> str:
        return str(self.summary.get("affected_side", "n/a"))

    @property
    def affected_known(self) -> str | None:
        """The affected side when it is 'left' or 'right'."""
        return self.affected if self.affected in labels.SIDE_OFFSET else None

    @property
    def baseline_date(self) -> str:
        return str(self.summary.get("baseline_study_date", ""))

    @property
    def classification(self) -> str:
        return str(self.summary.get("classification", "indeterminate"))

    @property
    def thresholds(self) -> dict[str, Any]:
        return dict(self.summary.get("thresholds", {}) or {})

    @property
    def events(self) -> list[dict[str, Any]]:
        events = self.summary.get("events", []) or []
        return sorted(events, key=lambda e: to_int(e.get("day")) or 0)

    @property
    def extent(self) -> dict[str, Any]:
        return dict(self.summary.get("extent_mm") or {})

    @property
    def extent_z(self) -> tuple[float, float] | None:
        """Baseline z range (mm) of the common extent, when recorded."""
        lo = finite_float(self.extent.get("z_min_mm"))
        hi = finite_float(self.extent.get("z_max_mm"))
        return (lo, hi) if lo is not None and hi is not None else None

    @property
    def unilateral(self) -> bool:
        return bool(self.summary.get("unilateral"))

    @property
    def session_info(self) -> dict[str, tuple[str, str]]:
        """Session label -> (study date, day), in session order."""
        return {str(s.get("session", "")): (str(s.get("study_date", "?")), str(s.get("day", "?")))
                for s in self.sessions}

    @property
    def session_titles(self) -> dict[str, str]:
        return {k: f"{d} (day {day})" for k, (d, day) in self.session_info.items()}

    @property
    def qc_days(self) -> set[int]:
        """Days of the sessions with an exclude flag (timeline bands)."""
        return unavailable_days(self.qc, self.sessions)

    @property
    def excluded_dates(self) -> set[str]:
        return {str(s.get("study_date", "")) for s in self.sessions
                if self.qc.session_excluded(s)}


def session_key(session: Mapping[str, Any]) -> tuple[int, str]:
    """Sessions by day, then study date (a session without a day last)."""
    day = to_int(session.get("day"))
    return (day if day is not None else 10**9, str(session.get("study_date", "")))


def read_summary(path: Path) -> dict[str, Any]:
    """``summary.json``; FileNotFoundError says which stage writes it."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run the longitudinal stage for this subject first"
        )
    summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return summary


def load_subject(inputs: ReportInputs) -> SubjectData:
    """Read the subject's outputs named in `inputs` (each file once)."""
    summary = read_summary(inputs.summary)
    notes: list[str] = []
    longitudinal = read_optional_tsv(inputs.longitudinal, notes)
    if longitudinal is None:
        notes.append("longitudinal.tsv is missing: no volume table or timeline.")
    tables = [read_optional_tsv(path, notes) for path in (
        inputs.volumes, inputs.index, inputs.problems, inputs.csa, inputs.circumference)]
    sessions = sorted(summary.get("sessions", []) or [], key=session_key)
    registration = registration_of(summary, sessions, inputs)
    qc_index = QCIndex(
        read_flags(summary, notes),
        {str(s.get("study_date")): str(s["session"]) for s in sessions if s.get("session")},
    )
    return SubjectData(
        str(summary.get("subject", inputs.summary.parent.name)), summary, notes,
        longitudinal or [], tables[0] or [], index_rows=tables[1], problems=tables[2],
        csa_rows=tables[3], circ_rows=tables[4], sessions=sessions, qc=qc_index,
        states=session_state_rows(summary, notes), registration=registration,
    )


def registration_of(
    summary: Mapping[str, Any], sessions: Sequence[Mapping[str, Any]], inputs: ReportInputs
) -> dict[str, Any]:
    """Registration results per session label: summary.json first, else the ``_xfm.json``
    given for the session."""
    out: dict[str, Any] = dict(summary.get("registration") or {})
    for s in sessions:
        label = str(s.get("session", ""))
        js = inputs.session_file("xfm", label) if label and label not in out else None
        if js is not None and js.exists():
            try:
                out[label] = json.loads(js.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
    return out
