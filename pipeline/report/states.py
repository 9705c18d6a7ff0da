"""Session states and flare confirmation (summary.json ``session_states`` and ``confirmation``):
the "Sessions against day 0" table and the confirmation next to the pattern. Read
tolerantly: outputs from before them render as before.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.report.values import to_int

#: CSS class of each session state's badge (docs/design.md "Confirmation in time").
STATE_CLASSES: dict[str, str] = {
    "baseline": "baseline",
    "no change": "no-change",
    "unconfirmed flare": "unconfirmed",
    "confirmed flare": "confirmed",
    "resolved": "resolved",
    "not assessable": "not-assessable",
}
#: What each state means (badge tooltip and Methods), with the iRECIST / LYRIC equivalent.
STATE_MEANINGS: dict[str, str] = {
    "baseline": "the reference session (the last on or before day 0)",
    "no change": "no flare criterion beyond its threshold and its MDC95 (iRECIST iSD, LYRIC SD)",
    "unconfirmed flare": "a flare not (yet) confirmed by a later scan (iRECIST iUPD, LYRIC IR)",
    "confirmed flare": "still flaring on a scan at least the minimum interval after the first "
    "flare of the episode (iRECIST iCPD)",
    "resolved": "back within the resolution criteria after a flare (iUPD not confirmed)",
    "not assessable": "cannot be compared with the baseline (QC exclusion, or before baseline)",
}
FLARE_STATES = ("unconfirmed flare", "confirmed flare")
_END_STATES = ("no change", "resolved")


def state_class(state: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", state.lower()).strip("-")
    return STATE_CLASSES.get(state, slug or "unknown")


def _texts(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v is not None and str(v)]
    return [str(value)] if value else []


def _day_key(day: Any, date: Any = "") -> tuple[int, str]:
    d = to_int(day)
    return (d if d is not None else 10**9, str(date))


def session_state_rows(
    summary: Mapping[str, Any], notes: list[str]
) -> list[dict[str, Any]] | None:
    """Rows of the "Sessions against day 0" table, by day; None for a summary without
    ``session_states`` (older outputs). A malformed entry is named in `notes`."""
    raw = summary.get("session_states")
    if raw is None:
        return None
    if not isinstance(raw, list):
        notes.append(f"summary.json: session_states is not a list ({type(raw).__name__}): "
                     "ignored")
        return []
    baseline = str(summary.get("baseline_study_date", ""))
    rows = []
    for item in raw:
        if not isinstance(item, Mapping):
            notes.append(f"summary.json: a session state was ignored: {str(item)[:120]}")
            continue
        state = str(item.get("state") or "not recorded")
        rows.append(
            {
                "study_date": str(item.get("study_date", "?")),
                "day": str(item.get("day", "?")),
                "timing": str(item.get("timing") or ""),
                "state": state,
                "state_class": state_class(state),
                "state_meaning": STATE_MEANINGS.get(state, state),
                "criteria": _texts(item.get("criteria")),
                "within_error": _texts(item.get("within_measurement_error")),
                "note": str(item.get("note") or ""),
                "is_baseline": str(item.get("study_date")) == baseline,
            }
        )
    return sorted(rows, key=lambda r: _day_key(r["day"], r["study_date"]))


def _episodes(
    states: Sequence[Mapping[str, Any]],
) -> list[tuple[list[Mapping[str, Any]], Mapping[str, Any] | None]]:
    """Flare episodes: (the flaring sessions, the session that ended it or None while open).
    A session without any flare ends an episode; one not assessable does not."""
    out: list[tuple[list[Mapping[str, Any]], Mapping[str, Any] | None]] = []
    current: list[Mapping[str, Any]] = []
    for st in states:
        if st["state"] in FLARE_STATES:
            current.append(st)
        elif st["state"] in _END_STATES and current:
            out.append((current, st))
            current = []
    if current:
        out.append((current, None))
    return out


def _days(states: Sequence[Mapping[str, Any]]) -> str:
    days = [str(s["day"]) for s in states]
    if len(days) == 1:
        return f"day {days[0]}"
    return f"days {', '.join(days[:-1])} and {days[-1]}"


def confirmation_headline(
    summary: Mapping[str, Any], classification: str, states: Sequence[Mapping[str, Any]] | None
) -> dict[str, str] | None:
    """The confirmation next to the pattern: ``{status, text, detail, alert}``; None when
    there is nothing to confirm (``not applicable``) or the summary predates confirmation.

    ``alert`` is set for a progression that is not confirmed: the report must not let it read
    as established progression (iRECIST iUPD, LYRIC indeterminate response).
    """
    conf = str(summary.get("confirmation") or "").strip().lower()
    if not conf or conf == "not applicable":
        return None
    states = states or []
    n = to_int((summary.get("thresholds") or {}).get("confirmation_min_interval_days"))
    gap = f"at least {n} days" if n is not None else "some days"
    episodes = _episodes(states)
    if conf == "confirmed":
        first = next((s for s in states if s["state"] == "confirmed flare"), None)
        if first is None:
            return {"status": "confirmed", "text": "Flare confirmed", "detail": "", "alert": ""}
        return {"status": "confirmed", "text": f"Flare confirmed on day {first['day']}",
                "detail": first.get("note", ""), "alert": ""}
    if conf != "unconfirmed":
        return {"status": state_class(conf), "text": f"Confirmation: {conf}", "detail": "",
                "alert": ""}
    flares, end = episodes[-1] if episodes else ([], None)
    start = to_int(flares[0]["day"]) if flares else None
    by = f" (day {start + n} or later)" if start is not None and n is not None else ""
    if end is None:
        text = "Flare not confirmed: a later scan must confirm it"
        detail = (f"flaring on {_days(flares)}; a scan {gap} after the first flare{by} that "
                  "still flares confirms it" if flares else "")
    else:
        text = "Flare not confirmed"
        detail = (f"flaring on {_days(flares)}, never still flaring {gap} after the first "
                  f"flare; {end['state']} on day {end['day']}")
    alert = ""
    if classification == "progression":
        last = flares[-1]["day"] if flares else "?"
        when = (f"A scan on day {start + n} or later ({gap} after the first flare, day "
                f"{start})" if start is not None and n is not None else "A later scan")
        alert = (
            f"UNCONFIRMED: progression is not established. The flare at the last session "
            f"(day {last}) has not been confirmed by a later scan (iRECIST iUPD, LYRIC "
            f"indeterminate response). {when} that still flares would confirm it; one back "
            "at baseline would make it a pseudo-progression."
        )
    return {"status": "unconfirmed", "text": text, "detail": detail, "alert": alert}
