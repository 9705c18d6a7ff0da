"""The cohort view: one row per subject, as a table (``cohort.tsv``) and a page (``cohort.html``).

``python -m pipeline.report.cohort --summaries S1 S2 ... --longitudinal L1 L2 ... --reports R1
R2 ... --out-html F --out-tsv F`` reads each subject's ``summary.json`` and ``longitudinal.tsv``
(the outputs of the longitudinal stage) and links its report; the files are given per subject,
in one order, as the cohort rule declares them. ``--subject-dirs D1 D2 ...`` names the results
folders instead: the workflow's error handler lists failed subjects that way (their files may
not exist; the reason is taken from their logs). It writes:

- ``cohort.tsv``: ``subject, status (ok|failed), classification, affected_side, n_sessions,
  baseline_date, peak_soft_tissue_asymmetry_pct, peak_asymmetry_day, lesion_ml_baseline,
  lesion_ml_peak, lesion_ml_last, edema_ml_baseline, edema_ml_peak, edema_ml_last, n_warnings,
  report, reason, n_qc_exclude, n_qc_warn``. Asymmetry is ``100 * (affected / contralateral -
  1)`` of soft tissue (docs/design.md); lesion and edema are the affected side's volumes in mL;
  *peak* is the largest available value over all sessions (baseline included), *last* the last
  session's. A value that is not available (a QC exclude flag: ``n/a`` in ``longitudinal.tsv``)
  never stands in for another: baseline and last are ``n/a`` when that session's value is,
  and the peak is taken over the available values only. ``n_qc_exclude`` and ``n_qc_warn``
  count the subject's QC flags (``summary.json`` ``qc_flags``) by severity; ``n/a`` for a
  summary from before QC flags. ``confirmation`` is the flare confirmation of the summary
  (``confirmed``, ``unconfirmed``, ``not applicable``; ``n/a`` before issue 13).
  ``report`` is the subject report's path relative to the folder of ``cohort.html``.
- ``cohort.html``: the same table, self-contained (inline CSS and a small inline script that
  sorts the table when a column header is clicked; no network), linking every subject report.

A subject whose ``summary.json`` is missing or unreadable (a failed run) is a row with status
``failed`` and the reason: the last error line of its logs when there are any. It never stops
the other subjects.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.io.files import finite_float, read_tsv, write_text_atomic, write_tsv_atomic
from pipeline.report import html
from pipeline.report.values import to_int

log = logging.getLogger(__name__)

TEMPLATE_NAME = "cohort.html"

COLUMNS: tuple[str, ...] = (
    "subject",
    "status",
    "classification",
    "affected_side",
    "n_sessions",
    "baseline_date",
    "peak_soft_tissue_asymmetry_pct",
    "peak_asymmetry_day",
    "lesion_ml_baseline",
    "lesion_ml_peak",
    "lesion_ml_last",
    "edema_ml_baseline",
    "edema_ml_peak",
    "edema_ml_last",
    "n_warnings",
    "report",
    "reason",
    # new columns follow the original ones (docs/design.md: listed columns keep their order)
    "n_qc_exclude",
    "n_qc_warn",
    "confirmation",
)

#: Column order of the HTML table: the QC counts beside the warnings, the link hidden.
HTML_COLUMNS: tuple[str, ...] = (
    *COLUMNS[: COLUMNS.index("classification") + 1],
    "confirmation",
    *COLUMNS[COLUMNS.index("classification") + 1: COLUMNS.index("n_warnings") + 1],
    "n_qc_exclude",
    "n_qc_warn",
    "reason",
)

#: Header text of each column in the HTML table (units in brackets).
TITLES: dict[str, str] = {
    "subject": "Subject",
    "status": "Status",
    "classification": "Pattern",
    "affected_side": "Affected side",
    "n_sessions": "Sessions",
    "baseline_date": "Baseline",
    "peak_soft_tissue_asymmetry_pct": "Peak soft-tissue asymmetry (%)",
    "peak_asymmetry_day": "Peak asymmetry day",
    "lesion_ml_baseline": "Lesion baseline (mL)",
    "lesion_ml_peak": "Lesion peak (mL)",
    "lesion_ml_last": "Lesion last (mL)",
    "edema_ml_baseline": "Edema baseline (mL)",
    "edema_ml_peak": "Edema peak (mL)",
    "edema_ml_last": "Edema last (mL)",
    "n_warnings": "Warnings",
    "n_qc_exclude": "QC exclude flags",
    "n_qc_warn": "QC warn flags",
    "confirmation": "Flare confirmation",
    "report": "Report",
    "reason": "Reason (failed runs)",
}

NUMERIC = {
    "n_sessions",
    "peak_soft_tissue_asymmetry_pct",
    "peak_asymmetry_day",
    "lesion_ml_baseline",
    "lesion_ml_peak",
    "lesion_ml_last",
    "edema_ml_baseline",
    "edema_ml_peak",
    "edema_ml_last",
    "n_warnings",
    "n_qc_exclude",
    "n_qc_warn",
}

#: Whole-number columns (no decimals in the HTML table).
COUNTS = {"n_sessions", "peak_asymmetry_day", "n_warnings", "n_qc_exclude", "n_qc_warn"}

_ERROR_RE = re.compile(r"error|exception|traceback|failed|not found|cannot|could not", re.I)


def failure_reason(subject_dir: Path) -> str:
    """Why a subject has no summary: the last error-like line of its most recent log.

    Looks at ``<subject_dir>/logs/*.log`` (the rules' logs), newest first.
    """
    if not subject_dir.is_dir():
        return f"subject folder {subject_dir} not found"
    logs = sorted(
        (p for p in (subject_dir / "logs").glob("*.log") if p.is_file()),
        key=lambda p: (p.stat().st_mtime, p.name),
        reverse=True,
    )
    for path in logs:
        try:
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
        except OSError:
            continue
        hits = [ln for ln in lines if ln and _ERROR_RE.search(ln)]
        if hits:
            return f"{path.name}: {hits[-1][:300]}"
    if logs:
        return "summary.json missing; no error found in " + ", ".join(p.name for p in logs[:3])
    return "summary.json missing and no log found (the subject was not processed)"


def _values(
    rows: Sequence[Mapping[str, str]], structure: str, column: str
) -> list[tuple[int, str, float | None]]:
    """(day, study_date, value) of one structure and column, in session order; value None
    where it is not available (``n/a``)."""
    out = [
        (to_int(r.get("day")) or 0, str(r.get("study_date", "")), finite_float(r.get(column)))
        for r in rows
        if r.get("structure") == structure
    ]
    return sorted(out, key=lambda t: (t[0], t[1]))


def _baseline_peak_last(
    values: Sequence[tuple[int, str, float | None]], baseline: str
) -> tuple[float | None, float | None, float | None]:
    """Baseline (the first session when the baseline date has no row), peak over the
    available values, and last; a value that is not available is None, never replaced."""
    if not values:
        return None, None, None
    at_base = [v for _, date, v in values if date == baseline]
    base = at_base[0] if at_base else values[0][2]
    available = [v for _, _, v in values if v is not None]
    return base, (max(available) if available else None), values[-1][2]


def qc_counts(summary: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(exclude, warn) flags of a summary; (None, None) when it predates ``qc_flags``."""
    flags = summary.get("qc_flags")
    if not isinstance(flags, list):
        return None, None
    severities = [str(f.get("severity", "")).lower() for f in flags if isinstance(f, Mapping)]
    warn = severities.count("warn")
    return len(severities) - warn, warn  # anything but warn counts as exclude


@dataclass(frozen=True)
class SubjectFiles:
    """What the cohort reads of one subject: its summary, measurements and report. Their
    folder names the subject when the summary is missing and holds the logs of a failed run."""

    summary: Path
    longitudinal: Path
    report: Path

    @property
    def folder(self) -> Path:
        return self.summary.parent

    @classmethod
    def in_folder(cls, subject_dir: Path) -> SubjectFiles:
        """The workflow's names in a subject results folder: the form for listing failed
        subjects (the workflow's error handler), whose files may not exist."""
        d = Path(subject_dir)
        return cls(d / "summary.json", d / "longitudinal.tsv", d / "report.html")


def subject_row(files: SubjectFiles | Path, html_dir: Path) -> dict[str, Any]:
    """One ``cohort.tsv`` row for a subject (status 'failed' without a readable summary).

    Parameters
    ----------
    files : SubjectFiles or Path
        The subject's files, or its results folder ``<results_dir>/<subject>``.
    html_dir : Path
        Folder of ``cohort.html``: the report link is relative to it.
    """
    files = files if isinstance(files, SubjectFiles) else SubjectFiles.in_folder(files)
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row["subject"] = files.folder.name
    try:
        summary = json.loads(files.summary.read_text(encoding="utf-8"))
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        row.update(status="failed", reason=failure_reason(files.folder))
        return row
    except (OSError, ValueError) as exc:
        row.update(status="failed", reason=f"summary.json unreadable: {exc}")
        return row
    row.update(_summary_fields(summary, files.folder.name))
    if files.report.exists():
        row["report"] = Path(os.path.relpath(files.report.resolve(), html_dir.resolve())).as_posix()
    if not files.longitudinal.exists():
        row["reason"] = "longitudinal.tsv missing: no volumes"
        return row
    try:
        rows = read_tsv(files.longitudinal)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        row["reason"] = f"longitudinal.tsv unreadable: {exc}"
        return row
    row.update(_volume_fields(rows, str(summary.get("baseline_study_date") or "")))
    return row


def _summary_fields(summary: Mapping[str, Any], folder_name: str) -> dict[str, Any]:
    """The columns taken from ``summary.json``."""
    sessions = summary.get("sessions") or []
    n_exclude, n_warn = qc_counts(summary)
    return {
        "subject": str(summary.get("subject") or folder_name),
        "status": "ok",
        "classification": str(summary.get("classification") or "n/a"),
        "confirmation": summary.get("confirmation"),
        "affected_side": str(summary.get("affected_side") or "n/a"),
        "n_sessions": len(sessions),
        "baseline_date": str(summary.get("baseline_study_date") or "") or None,
        "n_warnings": len(summary.get("warnings") or [])
        + sum(len(s.get("warnings") or []) for s in sessions if isinstance(s, Mapping)),
        "n_qc_exclude": n_exclude,
        "n_qc_warn": n_warn,
    }


def _volume_fields(rows: Sequence[Mapping[str, str]], baseline: str) -> dict[str, Any]:
    """The columns taken from ``longitudinal.tsv``: peak asymmetry, lesion and edema."""
    out: dict[str, Any] = {}
    asym = [(day, v) for day, _, v in _values(rows, "soft_tissue", "asymmetry_pct")
            if v is not None]
    if asym:
        day, value = max(asym, key=lambda t: t[1])
        out.update(peak_soft_tissue_asymmetry_pct=value, peak_asymmetry_day=day)
    for structure, prefix in (("marrow_lesion", "lesion"), ("edema", "edema")):
        base, peak, last = _baseline_peak_last(_values(rows, structure, "affected_ml"), baseline)
        out.update({f"{prefix}_ml_baseline": base, f"{prefix}_ml_peak": peak,
                    f"{prefix}_ml_last": last})
    return out


def _cell(column: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {"text": "n/a", "sort": ""}
    if column in NUMERIC:
        f = finite_float(value)
        if f is None:
            return {"text": str(value), "sort": ""}
        digits = 0 if column in COUNTS else 1
        return {"text": f"{f:.{digits}f}", "sort": repr(f)}
    return {"text": str(value), "sort": str(value).lower()}


def render_cohort_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The cohort page (autoescaped: subject names and reasons render as text)."""
    shown = list(HTML_COLUMNS)
    table = [
        {
            "cells": [{"column": c, "numeric": c in NUMERIC, **_cell(c, r.get(c))} for c in shown],
            "report": r.get("report"),
            "failed": r.get("status") == "failed",
        }
        for r in rows
    ]
    counts = Counter(
        "failed" if r.get("status") == "failed" else str(r.get("classification")) for r in rows
    )
    return html.render(
        TEMPLATE_NAME,
        columns=[{"key": c, "title": TITLES[c], "numeric": c in NUMERIC} for c in shown],
        rows=table,
        counts=sorted(counts.items()),
        n_subjects=len(rows),
        version=__version__,
    )


def build_cohort(
    subjects: Sequence[SubjectFiles | Path], out_html: Path, out_tsv: Path
) -> list[dict[str, Any]]:
    """Write ``cohort.tsv`` and ``cohort.html`` for these subjects.

    Parameters
    ----------
    subjects : sequence of SubjectFiles or Path
        Each subject's files, or its results folder ``<results_dir>/<subject>``; one row each,
        in this order (failed ones too).
    out_html, out_tsv : Path
        Output files (written atomically).

    Returns
    -------
    list of dict
        The rows (keys of ``COLUMNS``).
    """
    out_html, out_tsv = Path(out_html), Path(out_tsv)
    rows = []
    for s in subjects:
        try:
            rows.append(subject_row(s, out_html.parent))
        except Exception as exc:  # one bad subject never stops the others
            folder = s.folder if isinstance(s, SubjectFiles) else Path(s)
            log.warning("cohort row of %s failed: %s", folder, exc)
            rows.append(
                {c: None for c in COLUMNS}
                | {"subject": folder.name, "status": "failed", "reason": f"{exc}"}
            )
    write_tsv_atomic(out_tsv, rows, COLUMNS)
    write_text_atomic(out_html, render_cohort_html(rows))
    return rows


def _subjects(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[SubjectFiles]:
    if args.subject_dirs:
        return [SubjectFiles.in_folder(d) for d in args.subject_dirs]
    lists = (args.summaries, args.longitudinal or [], args.reports or [])
    if len({len(x) for x in lists}) != 1:
        p.error("--summaries, --longitudinal and --reports need one file per subject each, "
                "in the same order")
    return [SubjectFiles(*paths) for paths in zip(*lists, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m pipeline.report.cohort --summaries S1 S2 --longitudinal L1 L2
    --reports R1 R2 --out-html F --out-tsv F`` (the files of each subject, in one order), or
    ``--subject-dirs D1 D2`` (the results folders: failed subjects are listed too)."""
    p = argparse.ArgumentParser(prog="limbtrack cohort",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--summaries", type=Path, nargs="+", help="summary.json per subject")
    which.add_argument("--subject-dirs", type=Path, nargs="+", help="subject results folders")
    p.add_argument("--longitudinal", type=Path, nargs="+", help="longitudinal.tsv per subject")
    p.add_argument("--reports", type=Path, nargs="+", help="report.html per subject")
    p.add_argument("--out-html", type=Path, required=True, help="output cohort.html")
    p.add_argument("--out-tsv", type=Path, required=True, help="output cohort.tsv")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = build_cohort(_subjects(p, args), args.out_html, args.out_tsv)
    failed = sum(1 for r in rows if r["status"] == "failed")
    log.info("%d subjects, %d failed: %s", len(rows), failed, args.out_html)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
