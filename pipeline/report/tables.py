"""The report's tables from the subject's TSV files and summary: measurements per session,
volumes, registration, circumference.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pipeline import labels
from pipeline import qc as qc_mod
from pipeline.io.files import finite_float
from pipeline.report.qcview import Cell, Footnotes, QCIndex, merge_codes, split_codes, value_cell
from pipeline.report.values import (
    STRUCTURE_TITLES,
    change_within_mdc,
    fmt,
    to_int,
    within_error_flag,
)


def series_used(row: Mapping[str, Any], used: set[tuple[str, str]]) -> bool:
    """Whether an ``index.tsv`` row is a series used for measurement (its status, else the
    summary's "<description> (series <number>)" of that study date)."""
    if str(row.get("status", "")).strip().lower() in ("used", "selected"):
        return True
    date, desc = str(row.get("study_date", "")), str(row.get("series_description", ""))
    return (date, f"{desc} (series {row.get('series_number', '')})") in used or (date, desc) in used


def _sides(affected: str) -> tuple[list[str], list[str]]:
    """(affected sides, contralateral sides): both for both when the side is not known."""
    if affected in labels.SIDE_OFFSET:
        return [affected], [labels.other_side(affected)]
    return list(labels.SIDES), list(labels.SIDES)


def _longitudinal_reasons(
    index: QCIndex, row: Mapping[str, Any], affected: str, baseline_date: str
) -> dict[str, list[str]]:
    """Per column of a ``longitudinal.tsv`` row, the QC codes that make it not available."""
    aff, con = _sides(affected)
    s, date, row_qc = str(row.get("structure")), row.get("study_date"), row.get("qc")
    a = index.unavailable(date, aff, s, row_qc)
    c = index.unavailable(date, con, s, row_qc)
    if qc_mod.CONTRALATERAL_TOO_OLD in split_codes(row_qc):  # no reference near enough
        c = merge_codes(c, [qc_mod.CONTRALATERAL_TOO_OLD])
    base_a = index.unavailable(baseline_date, aff, s)
    base_c = index.unavailable(baseline_date, con, s)
    return {
        "affected_ml": a,
        "contralateral_ml": c,
        "difference_ml": merge_codes(a, c),
        "asymmetry_pct": merge_codes(a, c),
        "asymmetry_change_pp": merge_codes(a, c, base_a, base_c),
        "change_from_baseline_pct": merge_codes(a, base_a),
    }


#: Value columns of the measurements table, in column order, and whether they are signed.
LONGITUDINAL_VALUES: tuple[tuple[str, bool], ...] = (
    ("affected_ml", False),
    ("contralateral_ml", False),
    ("difference_ml", True),
    ("asymmetry_pct", True),
    ("asymmetry_change_pp", True),
    ("change_from_baseline_pct", True),
)


def longitudinal_table(
    rows: Sequence[Mapping[str, str]],
    baseline_date: str,
    index: QCIndex | None = None,
    affected: str = "",
    notes: Footnotes | None = None,
    excluded_dates: Collection[str] = (),
) -> list[dict[str, Any]]:
    """The measurements table: ``longitudinal.tsv`` by day, date and structure, each value a
    :class:`Cell` ('not available' with its QC codes, ± its 95 % interval, marked where a
    change from baseline is within its MDC95)."""
    index = index if index is not None else QCIndex(None, {})
    notes = notes if notes is not None else Footnotes()
    base_asym = {
        r.get("structure"): finite_float(r.get("asymmetry_pct"))
        for r in rows
        if r.get("study_date") == baseline_date
    }
    order = {s: i for i, s in enumerate(labels.STRUCTURES)}

    def key(r: Mapping[str, str]) -> tuple[int, str, int]:
        return (to_int(r.get("day")) or 0, str(r.get("study_date")),
                order.get(str(r.get("structure")), 99))

    table = []
    days = {str(r.get("session")): str(r.get("day", "")) for r in rows}
    for r in sorted(rows, key=key):
        date = str(r.get("study_date", ""))
        row = _longitudinal_cells(r, base_asym.get(r.get("structure")), baseline_date,
                                  _longitudinal_reasons(index, r, affected, baseline_date), notes)
        structure = str(r.get("structure"))
        table.append({"study_date": date, "day": str(r.get("day", "")),
                      "structure": STRUCTURE_TITLES.get(structure, structure), **row,
                      "contralateral_from": reference_source(r, days),
                      "qc": ", ".join(_row_qc(index, r, None)),
                      "is_baseline": date == baseline_date, "excluded": date in excluded_dates})
    return table


def reference_source(row: Mapping[str, Any], days: Mapping[str, str]) -> str:
    """Where a ``longitudinal.tsv`` row's contralateral value came from, in words:
    ``this session``, ``session S (day d)`` (carried from another session; `days`: session
    label -> day) or ``none`` (not available)."""
    source = str(row.get("contralateral_session") or "")
    if source in ("", "n/a"):
        return "none"
    if source == str(row.get("session") or ""):
        return "this session"
    return f"session {source} (day {days.get(source, '?')})"


def carries_reference(table: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any row of the measurements table takes its contralateral value from another
    session, or has none where other sessions have one (the table then shows where each
    value came from)."""
    sources = {str(r.get("contralateral_from", "")) for r in table}
    return any(x.startswith("session ") for x in sources) or (
        "none" in sources and "this session" in sources)


def _longitudinal_cells(
    r: Mapping[str, Any], base_asym: float | None, baseline_date: str,
    why: Mapping[str, Sequence[str]], notes: Footnotes,
) -> dict[str, Cell]:
    """The value cells of one ``longitudinal.tsv`` row (footnotes numbered in column order)."""
    asym = finite_float(r.get("asymmetry_pct"))
    # the table's own asymmetry change (newer outputs); else computed here; 0 at baseline
    asym_change = finite_float(r.get("asymmetry_change_pp"))
    if asym_change is None and asym is not None and base_asym is not None:
        asym_change = asym - base_asym
    values = {**r, "asymmetry_pct": asym, "asymmetry_change_pp": asym_change}
    within = {
        "asymmetry_change_pp": str(r.get("study_date", "")) != baseline_date and change_within_mdc(
            asym_change, finite_float(r.get("asymmetry_change_pp_ci95"))),
        "change_from_baseline_pct": within_error_flag(r),
    }
    return {c: value_cell(values.get(c), why[c], notes, signed=signed, ci=r.get(f"{c}_ci95"),
                          within_error=within.get(c, False))
            for c, signed in LONGITUDINAL_VALUES}


def _row_qc(index: QCIndex, row: Mapping[str, Any], side: str | None) -> list[str]:
    """QC codes shown in a table row: the summary's flags, else the row's ``qc`` column."""
    if index.flags is None:
        return split_codes(row.get("qc"))
    return index.codes(index.session(row.get("study_date")), side)


def volumes_table(
    rows: Sequence[Mapping[str, Any]], index: QCIndex, notes: Footnotes
) -> list[dict[str, Any]]:
    """``volumes.tsv`` for display: 'not available' (with its QC codes) instead of n/a."""
    out = []
    for r in rows:
        side, structure = str(r.get("side", "")), str(r.get("structure", ""))
        codes = index.unavailable(r.get("study_date"), [side], structure, r.get("qc"))
        out.append(
            {
                "study_date": r.get("study_date", ""),
                "day": r.get("day", ""),
                "side": side,
                "role": r.get("role", ""),
                "structure": STRUCTURE_TITLES.get(structure, structure),
                "volume_ml": value_cell(r.get("volume_ml"), codes, notes,
                                        ci=r.get("volume_ml_ci95")),
                "qc": ", ".join(_row_qc(index, r, side)),
            }
        )
    return out


def _vector(values: Any, digits: int = 2) -> str:
    if not isinstance(values, list | tuple) or not values:
        return "n/a"
    return ", ".join(fmt(v, digits, signed=True) for v in values)


def registration_table(
    sessions: Sequence[Mapping[str, Any]], registration: Mapping[str, Any], baseline_date: str
) -> list[dict[str, Any]]:
    table = []
    for s in sessions:
        label = str(s.get("session", ""))
        row: dict[str, Any] = {
            "study_date": str(s.get("study_date", "")),
            "day": str(s.get("day", "")),
            "is_baseline": str(s.get("study_date")) == baseline_date,
        }
        reg = registration.get(label)
        if row["is_baseline"]:
            row.update(status="reference (baseline)", poor=False)
        elif not reg:
            row.update(status="no registration result found", poor=True)
        else:
            q = reg.get("quality") or {}
            poor = bool(reg.get("poor"))
            row.update(
                translation=_vector(reg.get("translation_mm")),
                rotation=_vector(reg.get("rotation_deg")),
                bone_dice=fmt(q.get("bone_dice"), 3),
                limb_dice=fmt(q.get("limb_dice"), 3),
                centroid=fmt(q.get("centroid_distance_mm"), 2),
                z_vs_profile=fmt(q.get("z_vs_bone_profile_mm"), 2, signed=True),
                overlap=fmt(q.get("overlap_mm"), 0),
                poor=poor,
                status=(
                    "POOR: " + "; ".join(str(r) for r in reg.get("poor_reasons") or [])
                    if poor
                    else "ok"
                ),
                initialisation=str(reg.get("initialisation") or ""),
            )
        table.append(row)
    return table


def circumference_table(
    rows: Sequence[Mapping[str, Any]], affected: str, session_info: Mapping[str, tuple[str, str]]
) -> list[dict[str, str]]:
    """One row per session and distance: tape (convex hull) and contour circumference, cm."""
    if affected not in labels.SIDE_OFFSET:
        return []
    other = labels.other_side(affected)
    cells: dict[tuple[str, float], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        d = finite_float(r.get("distance_mm"))
        if d is not None:
            cells.setdefault((str(r.get("session", "")), d), {})[str(r.get("side"))] = r
    out = []
    for (ses, d), by_side in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        date, day = session_info.get(ses, (ses, "?"))

        def cm(side: str, column: str, _by: Mapping[str, Mapping[str, Any]] = by_side) -> Any:
            v = finite_float((_by.get(side) or {}).get(column))
            return None if v is None else v / 10.0

        a, c = cm(affected, "hull_circumference_mm"), cm(other, "hull_circumference_mm")
        out.append(
            {
                "study_date": date,
                "day": day,
                "distance_cm": fmt(d / 10.0, 0, signed=True),
                "affected_cm": fmt(a),
                "contralateral_cm": fmt(c),
                "difference_cm": fmt(None if a is None or c is None else a - c, signed=True),
                "affected_contour_cm": fmt(cm(affected, "circumference_mm")),
                "contralateral_contour_cm": fmt(cm(other, "circumference_mm")),
            }
        )
    return out


def session_rows(sessions: Sequence[Mapping[str, Any]], baseline_date: str) -> list[dict[str, Any]]:
    """The sessions and the series used in each."""
    return [
        {
            "study_date": str(s.get("study_date", "n/a")),
            "day": str(s.get("day", "n/a")),
            "anatomical_series": str(s.get("anatomical_series") or "n/a"),
            "fluid_series": str(s.get("fluid_series") or "n/a"),
            "is_baseline": str(s.get("study_date")) == baseline_date,
        }
        for s in sessions
    ]


def event_rows(events: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [{k: str(e.get(k, "")) for k in ("day", "date", "label", "category")} for e in events]


#: Columns of ``index.tsv`` shown in the "All series found" table.
INDEX_COLUMNS = ["study_date", "series_number", "series_description", "sequence_class",
                 "orientation", "n_files", "status", "reason"]


def index_table(
    index_rows: Sequence[Mapping[str, Any]] | None, sessions: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]] | None:
    """``index.tsv`` rows with the series used for measurement marked; None without it."""
    if index_rows is None:
        return None
    # summary names a used series "<description> (series <number>)" per study date
    used = {
        (str(s.get("study_date", "")), str(v))
        for s in sessions
        for v in (s.get("anatomical_series"), s.get("fluid_series"))
        if v
    }
    return [{**{c: str(r.get(c) or "") for c in INDEX_COLUMNS}, "used": series_used(r, used)}
            for r in index_rows]


def extent_view(extent: Mapping[str, Any]) -> dict[str, str] | None:
    """The common extent (mm), formatted; None when not recorded."""
    if not extent:
        return None
    return {"method": str(extent.get("method", "")), "z_min_mm": fmt(extent.get("z_min_mm")),
            "z_max_mm": fmt(extent.get("z_max_mm")), "length_mm": fmt(extent.get("length_mm"))}


def landmark_rows(landmarks: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"side": str(side), "z_mm": fmt((lm or {}).get("z_mm")),
             "method": str((lm or {}).get("method", ""))}
            for side, lm in sorted(landmarks.items())]


def label_legend() -> list[dict[str, Any]]:
    """Every label value with its name and colour (Methods, overlay legend)."""
    return [
        {
            "value": v,
            "name": labels.LABEL_NAMES[v],
            "color": "#{:02x}{:02x}{:02x}".format(*labels.LABEL_COLORS[v]),
        }
        for v in sorted(labels.LABEL_NAMES)
        if v != labels.BACKGROUND
    ]
