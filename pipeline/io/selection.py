"""Choosing what the workflow analyses: the patient of a folder (:func:`choose_patient`,
:func:`split_by_patient`), one anatomical and one fluid-sensitive series per study
(:func:`select_sessions`), each series' status, and the index outputs (:func:`write_outputs`:
index.tsv, problems.tsv, sessions.json, sessions.tsv)."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.io.files import is_within, write_json_atomic, write_tsv_atomic
from pipeline.io.identity import PatientGroup, normalise_patient_id
from pipeline.io.records import INDEX_COLUMNS, IndexResult, SeriesRecord
from pipeline.io.split import laterality_warnings, pair_sides

#: Fluid-sensitive classes in order of preference.
FLUID_PREFERENCE: tuple[str, ...] = ("STIR", "T2FS", "dixon_water")
ANATOMICAL_CLASS = "T1w"
PROBLEM_COLUMNS: tuple[str, ...] = ("path", "problem")
SESSION_COLUMNS: tuple[str, ...] = ("session", "study_date", "anatomical_series", "fluid_series")


# --------------------------------------------------------------------------------------------
# one anatomical and one fluid-sensitive series per study
# --------------------------------------------------------------------------------------------

def _rank_key(record: SeriesRecord) -> tuple[int, int, int]:
    """Sort key, best first: axial, then most files, then highest series number."""
    return (0 if record.orientation == "axial" else 1, -record.n_files,
            -(record.series_number if record.series_number is not None else -1))


def _override_matches(record: SeriesRecord, pattern: str) -> bool:
    """Override `pattern`: an exact SeriesInstanceUID, or a regex searched in the description."""
    if record.series_uid == pattern:
        return True
    try:
        return re.search(pattern, record.series_description, re.I) is not None
    except re.error:
        return False


def _candidates(record: SeriesRecord) -> list[SeriesRecord]:
    """A series as selection candidates: itself, or one per usable volume when it holds
    several (so that e.g. the Dixon water volume of a Dixon series can be picked)."""
    if len(record.volumes) <= 1:
        return [record]
    return [dataclasses.replace(record, sequence_class=v.sequence_class, volume=v.label,
                                n_files=v.n_positions)
            for v in record.volumes if v.status == "ok"]


def _series_entry(record: SeriesRecord) -> dict[str, Any]:
    return {
        "series_uid": record.series_uid,
        "volume": record.volume,
        "series_number": record.series_number,
        "description": record.series_description,
        "sequence_class": record.sequence_class,
        "orientation": record.orientation,
        "n_files": record.n_files,
        "files": [str(p) for p in record.files],
    }


def _role_entry(pick: SeriesRecord, partners: Sequence[SeriesRecord]) -> dict[str, Any]:
    """The session entry of a role: the picked series' entry, or, when the pick is one leg
    and another usable series of the same class is the other leg
    (:func:`pipeline.io.split.pair_sides`), a composed entry whose ``parts`` are the two
    series' entries with their ``side`` (from geometry), ``files`` both series' files and
    ``description`` both descriptions."""
    for other in partners:
        if other.series_uid == pick.series_uid or other.orientation != pick.orientation \
                or other.sequence_class != pick.sequence_class:
            continue
        sides = pair_sides(pick.x_range_mm, other.x_range_mm)
        if sides is None:
            continue
        parts = sorted(((side, record) for side, record in zip(sides, (pick, other),
                                                                strict=True)),
                       key=lambda item: item[0])  # left first
        entries = [_series_entry(record) | {
            "side": side, "laterality_tag": record.laterality_tag,
            "x_range_mm": [round(v, 2) for v in record.x_range_mm or ()]}
            for side, record in parts]
        return {
            "series_uid": "", "volume": "", "series_number": None,
            "description": " + ".join(f"{e['description']} ({e['side']} leg)" for e in entries),
            "sequence_class": pick.sequence_class, "orientation": pick.orientation,
            "n_files": sum(e["n_files"] for e in entries),
            "files": [f for e in entries for f in e["files"]],
            "parts": entries,
        }
    return _series_entry(pick)


def _role_uids(entry: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(series UID, volume, side) of each series a role entry stands for."""
    return [(e["series_uid"], e.get("volume") or "", e.get("side", ""))
            for e in entry.get("parts") or [entry]]


def _entry_key(entry: dict[str, Any]) -> tuple[str, str, str]:
    """The study key of a session or refused-study entry (see SeriesRecord.study_key)."""
    return (str(entry.get("patient_fingerprint") or ""), str(entry["study_uid"]),
            str(entry.get("study_date") or ""))


def _describe_series(record: SeriesRecord) -> str:
    number = record.series_number if record.series_number is not None else "?"
    return f"series #{number} '{record.series_description}'"


def _refused_as(records: Sequence[SeriesRecord], wanted: Any) -> str:
    """': series #3 'T1 TSE AX' was refused: <reason>' for the refused series of a study that
    would have qualified (``wanted(record, sequence_class)``), else ''."""
    found = [r for r in records if r.status == "refused"
             and (wanted(r, r.sequence_class)
                  or any(wanted(r, v.sequence_class) for v in r.volumes))]
    if not found:
        return ""
    return ": " + "; ".join(f"{_describe_series(r)} was refused: {r.reason}" for r in found)


def select_sessions(
    series: Iterable[SeriesRecord],
    anatomical_regex: str | None = None,
    fluid_regex: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pick one anatomical and one fluid-sensitive series per study.

    Parameters
    ----------
    series : iterable of SeriesRecord
        Output of :func:`pipeline.io.scan.index_folder` (of one patient: see
        :func:`choose_patient`). Records with status 'refused' or a non-MR modality are never
        picked. A study is
        :attr:`SeriesRecord.study_key`: (patient, StudyInstanceUID, study date).
    anatomical_regex, fluid_regex : str, optional
        Overrides: an exact SeriesInstanceUID or a regular expression searched
        (case-insensitive) in SeriesDescription. When given, only matching series qualify;
        otherwise the class decides (T1w; STIR, else T2FS, else dixon_water).

    Returns
    -------
    sessions : list of dict
        Sorted by study date (then time); keys ``session``, ``study_date``, ``study_time``,
        ``study_uid``, ``patient_fingerprint``, ``anatomical`` and ``fluid`` (series entries
        with absolute file paths). The session label is the study date ``YYYYMMDD``; studies
        sharing a date get ``T`` + ``HHMMSS`` of their study time appended (two sessions,
        never one); studies sharing date and time cannot be labelled apart: the first (by
        StudyInstanceUID) is used, the others refused saying so.
    refused_studies : list of dict
        ``study_uid``, ``study_date`` (ISO or None), ``patient_fingerprint`` and ``reason``
        of studies not used; the reason names the refused series and why, when a series of
        the wanted kind was there but could not be used.
    """
    by_study: dict[tuple[str, str, str], list[SeriesRecord]] = defaultdict(list)
    for record in series:
        by_study[record.study_key].append(record)
    chosen: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for records in by_study.values():
        session, refusal = _study_session(records, anatomical_regex, fluid_regex)
        if session is not None:
            chosen.append(session)
        if refusal is not None:
            refused.append(refusal)
    return _label_sessions(chosen, refused), refused


def _study_session(
    records: list[SeriesRecord], anatomical_regex: str | None, fluid_regex: str | None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The session of one study (its label still empty), or its refused-study entry."""
    study_uid = records[0].study_uid
    study_date = records[0].study_date
    study_time = min((r.study_time for r in records if r.study_time), default=None)
    fingerprint = records[0].patient_fingerprint
    usable = [c for r in records if r.status != "refused" and r.modality == "MR"
              for c in _candidates(r)]
    problems: list[str] = []
    if study_date is None:
        problems.append("no valid StudyDate (the session label and day count need it)")
    anat_pick = _pick_anatomical(records, usable, anatomical_regex, problems)
    anatomical = None if anat_pick is None else _role_entry(anat_pick[0], anat_pick)
    taken = set() if anatomical is None else {uid[:2] for uid in _role_uids(anatomical)}
    fluid_pick = _pick_fluid(records, [r for r in usable if (r.series_uid, r.volume)
                                       not in taken], fluid_regex, problems)
    if problems:
        return None, {"study_uid": study_uid, "study_date": study_date,
                      "patient_fingerprint": fingerprint, "reason": "; ".join(problems)}
    assert anatomical is not None and fluid_pick is not None
    return {"session": "", "study_date": study_date, "study_time": study_time,
            "study_uid": study_uid, "patient_fingerprint": fingerprint,
            "anatomical": anatomical, "fluid": _role_entry(fluid_pick[0], fluid_pick)}, None


def _pick_anatomical(records: Sequence[SeriesRecord], usable: Sequence[SeriesRecord],
                     anatomical_regex: str | None,
                     problems: list[str]) -> list[SeriesRecord] | None:
    """The anatomical candidates of a study, best first; when there is none, why goes to
    `problems` (and None is returned)."""
    if anatomical_regex:
        anat = [r for r in usable if _override_matches(r, anatomical_regex)]
        if not anat:
            problems.append(
                f"no usable series matches the anatomical override {anatomical_regex!r}"
                + _refused_as(records, lambda r, c: _override_matches(r, anatomical_regex)))
    else:
        anat = [r for r in usable if r.sequence_class == ANATOMICAL_CLASS]
        if not anat:
            problems.append("no T1-weighted series" + (
                " usable" + why if (why := _refused_as(
                    records, lambda r, c: c == ANATOMICAL_CLASS)) else ""))
    anat.sort(key=_rank_key)
    return anat or None


def _pick_fluid(records: Sequence[SeriesRecord], fluid_pool: Sequence[SeriesRecord],
                fluid_regex: str | None, problems: list[str]) -> list[SeriesRecord] | None:
    """The fluid-sensitive candidates of a study (of `fluid_pool`: the usable series but the
    anatomical pick), best first: the most preferred class only; when there is none, why goes
    to `problems` (and None is returned)."""
    fluid: list[SeriesRecord] = []
    if fluid_regex:
        fluid = sorted((r for r in fluid_pool if _override_matches(r, fluid_regex)),
                       key=_rank_key)
        if not fluid:
            problems.append(
                f"no usable series matches the fluid override {fluid_regex!r}"
                + _refused_as(records, lambda r, c: _override_matches(r, fluid_regex)))
    else:
        for cls in FLUID_PREFERENCE:
            fluid = sorted((r for r in fluid_pool if r.sequence_class == cls), key=_rank_key)
            if fluid:
                break
        if not fluid:
            problems.append("no fluid-sensitive series (STIR, T2 fat-sat or Dixon water)"
                            + (" usable" + why if (why := _refused_as(
                                records, lambda r, c: c in FLUID_PREFERENCE)) else ""))
    return fluid or None


def _label_sessions(chosen: list[dict[str, Any]],
                    refused: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chosen studies in date order, labelled ``YYYYMMDD`` (``T`` + ``HHMMSS`` added
    when a date holds several); a study whose label is taken is appended to `refused`."""
    chosen.sort(key=lambda s: (s["study_date"], s["study_time"] or "", s["study_uid"],
                               s["patient_fingerprint"]))
    sessions: list[dict[str, Any]] = []
    per_date: dict[str, int] = defaultdict(int)
    for session in chosen:
        per_date[session["study_date"]] += 1
    labels: dict[str, dict[str, Any]] = {}
    for session in chosen:
        label = session["study_date"].replace("-", "")
        if per_date[session["study_date"]] > 1:
            label += "T" + (session["study_time"] or "").replace(":", "")
        if label in labels:
            refused.append({"study_uid": session["study_uid"],
                            "study_date": session["study_date"],
                            "patient_fingerprint": session["patient_fingerprint"],
                            "reason": f"same study date and time as another study (session "
                                      f"{label}, used); the session cannot be labelled "
                                      "uniquely, so this study is not used"})
            continue
        labels[label] = session
        session["session"] = label
        sessions.append(session)
    return sessions


def same_day_warnings(sessions: Sequence[dict[str, Any]]) -> list[str]:
    """A warning per date holding several sessions (each is measured on its own)."""
    by_date: dict[str, list[str]] = defaultdict(list)
    for session in sessions:
        by_date[session["study_date"]].append(session["session"])
    return [f"{len(labels)} studies on {date} are separate sessions ({', '.join(labels)}), "
            "labelled by study time" for date, labels in sorted(by_date.items())
            if len(labels) > 1]


def split_warnings(sessions: Sequence[dict[str, Any]]) -> list[str]:
    """A warning per one-leg series whose description or Laterality tag names the other side
    than its geometry (:func:`pipeline.io.split.laterality_warnings`)."""
    out: list[str] = []
    for session in sessions:
        for role in ("anatomical", "fluid"):
            for part in session[role].get("parts") or ():
                number = part["series_number"] if part["series_number"] is not None else "?"
                out += laterality_warnings(
                    part["side"], f"session {session['session']}, series #{number} "
                    f"'{part['description']}'", part["description"],
                    part.get("laterality_tag", ""))
    return out


def annotate_status(
    series: Iterable[SeriesRecord],
    sessions: Sequence[dict[str, Any]],
    refused_studies: Sequence[dict[str, Any]],
) -> list[SeriesRecord]:
    """Copies of `series` with status/reason saying whether and why each series is used."""
    used: dict[tuple[tuple[str, str, str], str], list[str]] = defaultdict(list)
    for session in sessions:
        for role, text in (("anatomical", "anatomical"), ("fluid", "fluid-sensitive")):
            for uid, volume, side in _role_uids(session[role]):
                what = f" (volume {volume})" if volume else ""
                leg = f" ({side} leg, by geometry)" if side else ""
                used[(_entry_key(session), uid)].append(
                    f"{text}{what}{leg} of session {session['session']}")
    study_refusal = {_entry_key(s): s["reason"] for s in refused_studies}
    result = []
    for record in series:
        key = (record.study_key, record.series_uid)
        if record.status == "refused":
            result.append(record)
        elif key in used:
            result.append(dataclasses.replace(record, status="used",
                                              reason="; ".join(used[key])))
        elif record.study_key in study_refusal:
            result.append(dataclasses.replace(
                record, status="skipped",
                reason=f"study not used: {study_refusal[record.study_key]}"))
        else:
            result.append(dataclasses.replace(
                record, status="skipped",
                reason=record.reason or f"not selected ({record.sequence_class})"))
    return result


# --------------------------------------------------------------------------------------------
# one subject = one patient
# --------------------------------------------------------------------------------------------

def choose_patient(patients: Sequence[PatientGroup],
                   wanted: str | None = None) -> tuple[list[PatientGroup], str | None]:
    """The patient(s) whose studies are used, or why none can be.

    Parameters
    ----------
    patients : sequence of PatientGroup
        :attr:`IndexResult.patients`.
    wanted : str, optional
        The patient named by the user: a fingerprint
        (:func:`pipeline.io.identity.patient_fingerprint`), or a PatientID (compared as
        :func:`pipeline.io.identity.normalise_patient_id`; every patient carrying that ID is
        taken, e.g. one whose name was spelt differently in a later study). Empty: the folder
        must hold one patient.

    Returns
    -------
    chosen : list of PatientGroup
        Empty when the folder cannot be used (then `error` says why).
    error : str or None
    """
    wanted = (wanted or "").strip()
    if not wanted:
        if len(patients) <= 1:
            return list(patients), None
        return [], (f"the folder holds {len(patients)} patients; one subject must be one "
                    "patient")
    by_fingerprint = [p for p in patients if p.fingerprint == wanted.lower()]
    if by_fingerprint:
        return by_fingerprint, None
    patient_id = normalise_patient_id(wanted)
    by_id = [p for p in patients if patient_id is not None
             and patient_id in {m.patient_id for m in p.members}]
    if by_id:
        return by_id, None
    return [], ("the patient named by `patient` (a fingerprint or a PatientID) is not in the "
                f"folder, which holds {len(patients)} patient(s)")


def patient_warnings(chosen: Sequence[PatientGroup]) -> list[str]:
    """What the grouping assumed about the chosen patient(s) (no names or IDs)."""
    warnings: list[str] = []
    for group in chosen:
        if not group.identified_by:
            warnings.append(
                f"{len(group.study_keys)} studies carry no patient identity (PatientID, "
                "PatientName and PatientBirthDate empty or placeholders: an anonymised "
                "export); they are taken as one patient, so the folder must hold one "
                "patient only")
        elif group.merged:
            warnings.append(
                f"{group.merged} studies of patient {group.fingerprint} lack some of "
                f"{', '.join(group.identified_by)} and were joined to that patient because "
                "every field they have agrees")
    if len(chosen) > 1:
        warnings.append(
            f"the PatientID named by `patient` is carried by {len(chosen)} identities "
            f"(fingerprints {', '.join(g.fingerprint for g in chosen)}: name or birth date "
            "differ); all are taken as this one patient, as asked")
    return warnings


def patients_table(patients: Sequence[PatientGroup], show_phi: bool = False,
                   used: Iterable[str] = ()) -> str:
    """The patients of a folder as a text table (fingerprint, studies, dates, identified by;
    with `show_phi` also PatientID, name and birth date as compared)."""
    used = set(used)
    header = ["fingerprint", "studies", "dates", "identified by"]
    if show_phi:
        header += ["PatientID", "PatientName", "PatientBirthDate"]
    if used:
        header.append("status")
    rows = [header]
    for group in patients:
        row = [group.fingerprint, str(len(group.study_keys)), ", ".join(group.study_dates),
               ", ".join(group.identified_by) or "nothing (anonymised)"]
        if show_phi:
            row += [v or "-" for v in (group.identity.patient_id, group.identity.name,
                                       group.identity.birth_date)]
        if used:
            row.append("used" if group.fingerprint in used else "not used")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)
                                     ).rstrip() for r in rows)


def split_by_patient(
    result: IndexResult, patient: str | None = None,
) -> tuple[list[SeriesRecord], list[PatientGroup], list[dict[str, Any]], str | None]:
    """The series of the patient to use, and a refused-study entry for every other study.

    Returns
    -------
    series : list of SeriesRecord
        The chosen patient's series (none when `error`).
    chosen : list of PatientGroup
    not_used : list of dict
        Refused-study entries (``study_uid``, ``study_date``, ``patient_fingerprint``,
        ``reason``) of the other patients' studies (of every study when `error`).
    error : str or None
        Why the folder cannot be used (several patients and none named, or the named one
        absent).
    """
    chosen, error = choose_patient(result.patients, patient)
    fingerprints = {g.fingerprint for g in chosen}
    mine = [r for r in result.series if r.patient_fingerprint in fingerprints]
    not_used: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for record in result.series:
        if record.patient_fingerprint in fingerprints or record.study_key in seen:
            continue
        seen.add(record.study_key)
        if error:
            reason = (f"{error}: this study belongs to patient {record.patient_fingerprint}; "
                      "name the patient to use (config `patient`: its fingerprint or "
                      "PatientID; see the index log for the table of patients)")
        else:
            reason = (f"another patient (fingerprint {record.patient_fingerprint}): not used, "
                      f"`patient` selects {', '.join(sorted(fingerprints))}")
        not_used.append({"study_uid": record.study_uid, "study_date": record.study_date,
                         "patient_fingerprint": record.patient_fingerprint, "reason": reason})
    return mine, chosen, not_used, error


# --------------------------------------------------------------------------------------------
# the outputs of the index step
# --------------------------------------------------------------------------------------------

def write_outputs(
    result: IndexResult,
    sessions: list[dict[str, Any]],
    refused_studies: list[dict[str, Any]],
    out_dir: Path,
    *,
    chosen: Sequence[PatientGroup] | None = None,
    warnings: Sequence[str] = (),
) -> None:
    """Write index.tsv, problems.tsv, sessions.json and sessions.tsv atomically into `out_dir`.

    sessions.json holds, besides the sessions and refused studies: ``patient_fingerprint``
    (the patient used, None when none is), ``patient_fingerprint_fields`` (the DICOM
    attributes it rests on; empty: nothing identifies the patient), ``patients`` (every
    patient of the folder: fingerprint, identified_by, n_studies, study_dates, used) and
    ``warnings``. `chosen` defaults to the folder's patient when it holds one.
    """
    if is_within(out_dir, result.input_dir):
        raise ValueError(f"{out_dir}: the output folder lies inside the input folder "
                         f"{result.input_dir}, which is read-only")
    if chosen is None:
        chosen = list(result.patients) if len(result.patients) == 1 else []
    used = {g.fingerprint for g in chosen}
    records = annotate_status(result.series, sessions, refused_studies)
    write_tsv_atomic(out_dir / "index.tsv", [r.as_row() for r in records], INDEX_COLUMNS)
    write_tsv_atomic(out_dir / "problems.tsv",
                     [dataclasses.asdict(p) for p in result.problems], PROBLEM_COLUMNS)
    write_json_atomic(out_dir / "sessions.json", {
        "input_dir": str(result.input_dir),
        "sessions": sessions,
        "refused_studies": refused_studies,
        "n_files_seen": result.n_files_seen,
        "n_files_dicom": result.n_files_dicom,
        "patient_fingerprint": chosen[0].fingerprint if chosen else None,
        "patient_fingerprint_fields": list(chosen[0].identified_by) if chosen else [],
        "patients": [g.describe() | {"used": g.fingerprint in used} for g in result.patients],
        "warnings": list(warnings),
    })

    def describe(entry: dict[str, Any]) -> str:
        if entry.get("parts"):
            return " + ".join(f"{describe(part)} ({part['side']} leg)"
                              for part in entry["parts"])
        volume = f" [{entry['volume']}]" if entry.get("volume") else ""
        return f"#{entry['series_number']} {entry['description']}{volume}".strip()

    write_tsv_atomic(out_dir / "sessions.tsv", [
        {"session": s["session"], "study_date": s["study_date"],
         "anatomical_series": describe(s["anatomical"]), "fluid_series": describe(s["fluid"])}
        for s in sessions], SESSION_COLUMNS)
