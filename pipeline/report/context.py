"""The template context of the subject report: everything report.html needs, as plain values.

:func:`build_context` reads the subject's outputs once (:mod:`pipeline.report.subject`) and
composes one builder per part of the page: the header, the pattern and its confirmation,
the figures, the measurement tables, quality control, the Methods and provenance. Each figure
is built in its own ``try`` block: one that fails is replaced by a note that says which figure
and why, and the rest of the report is still written.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import __version__
from pipeline.report.figures import FigureResult, render_profile
from pipeline.report.inputs import ReportInputs
from pipeline.report.methods import response_rules, uncertainty_facts
from pipeline.report.overlays import OverlayView, overlay_views
from pipeline.report.phi import is_phi_key, patient_identity
from pipeline.report.positions import Swelling, largest_swelling
from pipeline.report.qcview import (
    Footnotes,
    drop_unavailable_csa,
    figure_qc_labels,
    flag_box,
    pattern_headline,
    qc_legend,
)
from pipeline.report.states import STATE_MEANINGS, confirmation_headline, state_class
from pipeline.report.subject import SubjectData, load_subject
from pipeline.report.tables import (
    INDEX_COLUMNS,
    carries_reference,
    circumference_table,
    event_rows,
    extent_view,
    index_table,
    label_legend,
    landmark_rows,
    longitudinal_table,
    registration_table,
    session_rows,
    volumes_table,
)
from pipeline.report.timeline import render_timeline
from pipeline.report.values import WITHIN_ERROR, ci_values, flatten, to_int

log = logging.getLogger(__name__)

#: Words for the summary's ``affected_side_source``.
SIDE_SOURCES: dict[str, str] = {
    "config": "as configured",
    "configuration": "as configured",
    "auto": "determined automatically from the images",
    "automatic": "determined automatically from the images",
}


def build_context(inputs: ReportInputs, show_phi: bool = False) -> dict[str, Any]:
    """Everything the template needs, read from the files named in `inputs`.

    Parameters
    ----------
    inputs : ReportInputs
        ``summary.json``, the tables and the per-session images and transforms of one subject.
    show_phi : bool
        Show the patient's name, ID and birth date (read from the DICOM headers listed in
        ``inputs.sessions_json``) and keys naming patient-identifying data in the summary's
        settings tables. Off by default: then nothing identifying is read or shown.

    Returns
    -------
    dict
        Template context (plain strings, lists and dicts; images as base64 PNG).

    Raises
    ------
    FileNotFoundError
        If ``summary.json`` is missing.
    """
    s = load_subject(inputs)
    figures = figure_context(s, inputs)
    return {
        **header_context(s),
        "patient": patient_identity(inputs.sessions_json, s.notes) if show_phi else None,
        **pattern_context(s),
        **figures,
        **measurement_context(s),
        **qc_context(s, [figures["timeline"], figures["profile"],
                         *(f for v in figures["views"] for f in v.figures)]),
        **methods_context(s, show_phi),
    }


def header_context(s: SubjectData) -> dict[str, Any]:
    """The subject, side, day 0, baseline and sessions at the top of the page."""
    source = str(s.summary.get("affected_side_source", ""))
    return {
        "subject": s.subject,
        "patient_fingerprint": str(s.summary.get("patient_fingerprint") or ""),
        "affected_side": s.affected,
        "affected_side_source": SIDE_SOURCES.get(source, source),
        "day0": str(s.summary.get("day0", "n/a")),
        "baseline_study_date": s.baseline_date or "n/a",
        "baseline_day": str(s.summary.get("baseline_day", "n/a")),
        "sessions": session_rows(s.sessions, s.baseline_date),
        "events": event_rows(s.events),
        "extent": extent_view(s.extent),
        "unilateral": s.unilateral,
        "n_poor_registrations": sum(
            1 for x in s.sessions
            if (s.registration.get(str(x.get("session", ""))) or {}).get("poor")
        ),
    }


def pattern_context(s: SubjectData) -> dict[str, Any]:
    """The response pattern, what it rests on, its confirmation and the reasons."""
    phrase, qc_note = pattern_headline(s.classification, s.qc)
    return {
        "classification": s.classification,
        "pattern_phrase": phrase,
        "pattern_qc_note": qc_note,
        "confirmation": confirmation_headline(s.summary, s.classification, s.states),
        "session_states": s.states,
        "reasons": [str(r) for r in s.summary.get("reasons", []) or []],
        "within_error_label": WITHIN_ERROR,
    }


def figure_context(s: SubjectData, inputs: ReportInputs) -> dict[str, Any]:
    """The timeline, the area profile and the overlay views (QC labels on each overlay)."""
    timeline = timeline_figure(s)
    csa_rows, dropped = s.csa_rows, list[str]()
    if csa_rows:
        csa_rows, dropped = drop_unavailable_csa(csa_rows, s.qc)
    swelling = None
    if csa_rows and s.affected_known and not s.unilateral:
        try:
            swelling = largest_swelling(csa_rows, s.affected_known, s.extent_z)
        except Exception as exc:
            log.warning("largest swelling from profile_csa.tsv: %s", exc)
    profile = profile_figure(s, csa_rows, dropped, swelling)
    views = overlay_views(inputs, s.sessions, s.affected_known, s.baseline_date, swelling,
                          s.extent_z, s.registration, s.qc.flagged_sessions("exclude"))
    _label_views(s, views)
    return {"timeline": timeline, "profile": profile, "views": views}


def timeline_figure(s: SubjectData) -> FigureResult:
    timeline = FigureResult(title="Timeline")
    try:
        timeline.png_base64 = render_timeline(
            s.longitudinal, s.events, s.affected, s.thresholds,
            to_int(s.summary.get("baseline_day")), s.qc_days,
        )
        timeline.caption = "timeline"
        timeline.facts = {"intervals": bool(ci_values(s.longitudinal)),
                          "qc_days": bool(s.qc_days)}
    except Exception as exc:
        log.warning("timeline failed: %s", exc)
        timeline.error = f"{type(exc).__name__}: {exc}"
    return timeline


def profile_figure(s: SubjectData, csa_rows: list[dict[str, str]] | None, dropped: list[str],
                   swelling: Swelling | None) -> FigureResult:
    profile = FigureResult(title="Cross-sectional area profile")
    if csa_rows is None:
        profile.error = "profile_csa.tsv not found"
        return profile
    titles = s.session_titles
    try:
        profile.png_base64 = render_profile(csa_rows, s.affected, titles, swelling)
        profile.caption = "profile"
        profile.facts = {"dropped": [titles.get(ses, ses) for ses in dropped]}
    except Exception as exc:
        log.warning("profile failed: %s", exc)
        profile.error = f"{type(exc).__name__}: {exc}"
    return profile


def _label_views(s: SubjectData, views: list[OverlayView]) -> None:
    """Each overlay's QC labels, and its title prefixed with its view's."""
    for v in views:
        for f in v.figures:
            f.qc_labels = figure_qc_labels(s.qc, f.session)
            f.title = f"{v.title}: {f.title}" if not f.title.startswith(v.title) else f.title


def measurement_context(s: SubjectData) -> dict[str, Any]:
    """The measurement, circumference and volume tables with their footnotes."""
    long_notes, vol_notes = Footnotes(), Footnotes()
    long_table = longitudinal_table(s.longitudinal, s.baseline_date, s.qc, s.affected,
                                    long_notes, s.excluded_dates)
    return {
        "longitudinal": long_table,
        "longitudinal_notes": long_notes.items,
        "longitudinal_has_qc": any(r["qc"] for r in long_table),
        "longitudinal_has_reference": carries_reference(long_table),
        "has_intervals": bool(ci_values(s.longitudinal) or ci_values(s.volumes)),
        "circumference": circumference_table(s.circ_rows or [], s.affected, s.session_info),
        "circumference_found": s.circ_rows is not None,
        "volumes": volumes_table(s.volumes, s.qc, vol_notes),
        "volumes_notes": vol_notes.items,
    }


def qc_context(s: SubjectData, figures: list[FigureResult]) -> dict[str, Any]:
    """The QC box and legend, warnings, figures that failed, registration, inputs."""
    summary = s.summary
    return {
        "qc_box": flag_box(s.qc, s.session_info, s.sessions),
        "qc_legend": qc_legend(),
        "warnings": [str(w) for w in summary.get("warnings", []) or []],
        "session_warnings": [
            {"session": str(x.get("study_date", x.get("session", "?"))), "warning": str(w)}
            for x in s.sessions for w in (x.get("warnings") or [])
        ],
        "failed_figures": [f for f in figures if f.error],
        "registration": registration_table(s.sessions, s.registration, s.baseline_date),
        "landmarks": landmark_rows(summary.get("landmarks") or {}),
        "index_columns": INDEX_COLUMNS,
        "index_rows": index_table(s.index_rows, s.sessions),
        "problems": s.problems,
        "input_notes": s.notes,
    }


def methods_context(s: SubjectData, show_phi: bool) -> dict[str, Any]:
    """The Methods (response rules, uncertainty, states) and provenance tables."""
    rules, rules_missing = response_rules(s.thresholds)
    inputs = s.summary.get("inputs", {}) or {}

    def flat(mapping: Any) -> list[tuple[str, str]]:
        return [(k, v) for k, v in flatten(mapping) if show_phi or not is_phi_key(k)]

    return {
        "rules": rules,
        "rules_missing": rules_missing,
        "uncertainty": uncertainty_facts(s.longitudinal, s.volumes, s.baseline_date, s.states),
        "state_legend": [((name, state_class(name)), meaning)
                         for name, meaning in STATE_MEANINGS.items()],
        "thresholds": flat(s.thresholds),
        "settings": flat(s.summary.get("settings", {}) or {}),
        "software": flat(s.summary.get("software", {}) or {}),
        "n_input_files": str(inputs.get("n_files", "n/a")),
        "input_checksum": str(inputs.get("sha256_of_list", "n/a")),
        "run_date": str(s.summary.get("run_date", "n/a")),
        "report_version": __version__,
        "label_legend": label_legend(),
    }
