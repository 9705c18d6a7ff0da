"""QC flags as the report shows them (summary.json ``qc_flags``, the ``qc`` column of the tables):
what the image cannot show is said, never measured. Read tolerantly: a summary from before the
flags has none, and a code added later still shows (with its code as its meaning).

The flag box, the 'not available' cells and their footnotes, the pattern headline and the
QC labels of the figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import labels, qc
from pipeline.io.files import finite_float
from pipeline.report.values import fmt, to_int

#: Report wording of each response pattern: a measurement aid, never a diagnosis.
PATTERN_PHRASES: dict[str, str] = {
    "pseudo-progression": "Pattern consistent with pseudo-progression",
    "progression": "Pattern consistent with progression",
    "response": "Pattern consistent with response",
    "stable": "Pattern consistent with stable findings",
    "indeterminate": "Pattern indeterminate (too few sessions to compare)",
}

#: What a value removed by a QC exclude flag reads (never 0).
NOT_AVAILABLE = "not available"
_NO_CODES = ("", "n/a", "none")


@dataclass(frozen=True)
class FlagView:
    """One QC flag as the report shows it."""

    session: str
    side: str
    code: str
    severity: str  # 'exclude' or 'warn'
    message: str
    slices: tuple[int, ...] = ()

    @property
    def sides(self) -> tuple[str, ...]:
        return tuple(labels.SIDES) if self.side not in labels.SIDE_OFFSET else (self.side,)

    @property
    def meaning(self) -> str:
        return qc.MEANING.get(self.code, self.code.replace("_", " "))


def read_flags(summary: Mapping[str, Any], notes: list[str]) -> list[FlagView] | None:
    """The QC flags of `summary`; None when it predates them (no ``qc_flags`` key).

    A malformed entry is not dropped silently: it is named in `notes`.
    """
    raw = summary.get("qc_flags")
    if raw is None:
        return None
    if not isinstance(raw, list):
        notes.append(f"summary.json: qc_flags is not a list ({type(raw).__name__}): ignored")
        return []
    flags = []
    for item in raw:
        if not isinstance(item, Mapping) or not item.get("code"):
            notes.append(f"summary.json: a QC flag without a code was ignored: {str(item)[:120]}")
            continue
        slices = item.get("slices") or []
        flags.append(
            FlagView(
                session=str(item.get("session", "")),
                side=str(item.get("side", qc.BOTH)),
                code=str(item["code"]),
                # anything but an explicit warn counts as exclude: never over-trust a number
                severity="warn" if str(item.get("severity", "")).lower() == "warn" else "exclude",
                message=str(item.get("message", "")),
                slices=tuple(int(k) for k in slices if to_int(k) is not None)
                if isinstance(slices, list)
                else (),
            )
        )
    return flags


def split_codes(value: Any) -> list[str]:
    """QC codes of a table's ``qc`` cell (comma-separated; 'n/a' or empty when none)."""
    codes = [c.strip() for c in str(value or "").split(",")]
    return [c for c in codes if c.lower() not in _NO_CODES]


def merge_codes(*code_lists: Sequence[str]) -> list[str]:
    out: list[str] = []
    for codes in code_lists:
        out.extend(c for c in codes if c not in out)
    return out


@dataclass
class QCIndex:
    """Which (session, side, structure) an exclude flag makes not available, and why.

    Mirrors :func:`pipeline.qc.unavailable`, tolerant of codes it does not know (those remove
    every structure). Tables name sessions by study date; flags by session label.
    """

    flags: list[FlagView] | None
    session_of_date: dict[str, str]
    gone: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.flags or []:
            if f.severity != "exclude":
                continue
            for side in f.sides:
                for s in qc.EXCLUDED_STRUCTURES.get(f.code, labels.STRUCTURES):
                    codes = self.gone.setdefault((f.session, side, s), [])
                    if f.code not in codes:
                        codes.append(f.code)

    def session(self, date: Any) -> str:
        d = str(date or "")
        return self.session_of_date.get(d, d.replace("-", ""))

    def unavailable(
        self, date: Any, sides: Sequence[str], structure: str, row_qc: Any = None
    ) -> list[str]:
        """Codes that make `structure` of `sides` at `date` not available. Without flags in
        the summary (an older one), the row's own ``qc`` column is taken as the reason."""
        if self.flags is None:
            return split_codes(row_qc)
        ses = self.session(date)
        return merge_codes(*(self.gone.get((ses, side, structure), []) for side in sides))

    def codes(self, session: str, side: str | None = None) -> list[str]:
        """Codes of any severity raised for `session` (and `side`), in order."""
        return merge_codes(
            [
                f.code
                for f in self.flags or []
                if f.session == session and (side is None or side in f.sides)
            ]
        )

    def flagged_sessions(self, severity: str) -> set[str]:
        """Labels of the sessions with a flag of `severity`."""
        return {f.session for f in self.flags or [] if f.severity == severity}

    def n(self, severity: str) -> int:
        return sum(1 for f in self.flags or [] if f.severity == severity)

    def session_excluded(self, session: Mapping[str, Any]) -> bool:
        """Marked excluded in summary.json, or every structure of both sides not available."""
        label = str(session.get("session", ""))
        return session.get("excluded") is True or all(
            (label, side, s) in self.gone for side in labels.SIDES for s in labels.STRUCTURES
        )


@dataclass(frozen=True)
class Cell:
    """A table value; ``reason`` holds the QC codes when it is not available.

    ``ci`` is the half-width of its 95 % interval, formatted ('' when not known: nothing
    extra is shown, never "± n/a"); ``within_error`` marks a change from baseline inside its
    MDC95.
    """

    text: str
    reason: str = ""
    note: int | None = None
    ci: str = ""
    within_error: bool = False

    def __str__(self) -> str:
        return f"{self.text} ± {self.ci}" if self.ci else self.text


@dataclass
class Footnotes:
    """Numbered reasons of the 'not available' cells of one table."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def mark(self, codes: Sequence[str]) -> int:
        reason = ", ".join(codes)
        for item in self.items:
            if item["reason"] == reason:
                return int(item["n"])
        words = "; ".join(qc.MEANING.get(c, c) for c in codes)
        self.items.append({"n": len(self.items) + 1, "reason": reason, "meaning": words})
        return len(self.items)


def value_cell(
    value: Any,
    codes: Sequence[str],
    notes: Footnotes,
    digits: int = 1,
    signed: bool = False,
    ci: Any = None,
    within_error: bool = False,
) -> Cell:
    """A formatted number; 'not available' with its QC codes when missing for a QC reason
    (never 0), plain 'n/a' when missing for another (no contralateral limb, no baseline).

    `ci` (half-width of the 95 % interval, same unit) is shown as "± ci" only with a value
    and a known interval; `within_error` marks the value as a change within its MDC95.
    """
    text = fmt(value, digits, signed)
    if text != "n/a":
        half = finite_float(ci)
        return Cell(text, ci="" if half is None else fmt(abs(half), digits),
                    within_error=within_error)
    if not codes:
        return Cell(text)
    return Cell(NOT_AVAILABLE, ", ".join(codes), notes.mark(codes))


def _session_day(session_info: Mapping[str, tuple[str, str]], session: str) -> tuple[str, str]:
    return session_info.get(session, (session or "?", "?"))


def flag_box(
    index: QCIndex,
    session_info: Mapping[str, tuple[str, str]],
    sessions: Sequence[Mapping[str, Any]],
) -> dict[str, Any] | None:
    """The QC box at the top of the report; None for a summary without ``qc_flags``."""
    if index.flags is None:
        return None
    order = {ses: i for i, ses in enumerate(session_info)}
    rows = []
    for f in sorted(
        index.flags,
        key=lambda f: (order.get(f.session, len(order)), f.session, f.severity != "exclude",
                       f.side, f.code),
    ):
        date, day = _session_day(session_info, f.session)
        side = "both sides" if f.side == qc.BOTH else f.side
        rows.append({"date": date, "day": day, "side": side, "code": f.code,
                     "meaning": f.meaning, "severity": f.severity, "message": f.message})
    excluded = [
        f"{s.get('study_date', '?')} (day {s.get('day', '?')})"
        for s in sessions
        if s.get("excluded") is True
    ]
    return {"rows": rows, "n_exclude": index.n("exclude"), "n_warn": index.n("warn"),
            "excluded_sessions": excluded}


def pattern_headline(classification: str, index: QCIndex) -> tuple[str, str]:
    """The pattern phrase and, when an exclude flag exists, what it rests on."""
    phrase = PATTERN_PHRASES.get(classification, f"Pattern: {classification}")
    n = index.n("exclude")
    if not n:
        return phrase, ""
    if classification == "indeterminate":
        return (
            "Pattern indeterminate (what passed quality control cannot decide)",
            f"{n} exclude flag(s): the sessions or structures they name are not measured; "
            "see the QC flags below.",
        )
    return (
        phrase,
        f"Rests only on what passed quality control: {n} exclude flag(s) remove sessions or "
        "structures from it (QC flags below).",
    )


def figure_qc_labels(index: QCIndex, session: str) -> list[dict[str, str]]:
    """Caption labels of a session's overlay: 'excluded: <code>' first, then warnings."""
    out = []
    for f in index.flags or []:
        if f.session != session:
            continue
        text = f"{'excluded' if f.severity == 'exclude' else 'QC warning'}: {f.code}"
        if f.side != qc.BOTH:
            text += f" ({f.side})"
        item = {"severity": f.severity, "text": text, "meaning": f.meaning}
        if item not in out:
            out.append(item)
    return sorted(out, key=lambda d: d["severity"] != "exclude")


def unavailable_days(index: QCIndex, sessions: Sequence[Mapping[str, Any]]) -> set[int]:
    """Days of sessions with an exclude flag or marked excluded (timeline bands)."""
    flagged = index.flagged_sessions("exclude")
    days = set()
    for s in sessions:
        day = to_int(s.get("day"))
        if day is not None and (s.get("excluded") is True or str(s.get("session")) in flagged):
            days.add(day)
    return days


def drop_unavailable_csa(
    rows: Sequence[dict[str, str]], index: QCIndex
) -> tuple[list[dict[str, str]], list[str]]:
    """Profile rows without the (session, side) whose limb is not available; the sessions
    left out, for the caption."""
    kept, dropped = [], []
    for r in rows:
        ses, side = str(r.get("session", "")), str(r.get("side", ""))
        if index.gone.get((ses, side, "limb")):
            if ses not in dropped:
                dropped.append(ses)
            continue
        kept.append(r)
    return kept, dropped


def qc_legend() -> list[dict[str, str]]:
    """Every QC code with its meaning (QC section)."""
    return [{"code": c, "meaning": m} for c, m in qc.MEANING.items()]
