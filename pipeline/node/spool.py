"""The DICOM node's spool folder: where received images are filed, per patient and study.

Layout (``<spool>`` is ``limbtrack listen --spool``)::

    <spool>/<patient key>/<StudyInstanceUID>/<SOPInstanceUID>.dcm   received images
    <spool>/<patient key>/status.json                               the patient's state
    <spool>/.incoming/                                              files being received
    <spool>/.work/<patient key>/                                    the workflow's run folder

The patient key is :func:`patient_key`: the project's pseudonymous fingerprint of the
PatientID (never the name). A file is written under ``.incoming/`` and renamed into place
when complete, so a half-received file never appears under a study folder.

The workflow does not read the spool folder itself (``status.json`` lives there, and new images
may arrive while it runs): each run reads a snapshot, :func:`build_input_view`, a folder of
links to the patient's received files and their archive folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom

from pipeline.io.files import read_tsv, walk_entries
from pipeline.io.identity import normalise_patient_id, patient_fingerprint
from pipeline.workflow import DATE_RE, SIDES

#: A patient folder's name: :func:`patient_key` (FINGERPRINT_HEX_DIGITS hex digits).
PATIENT_KEY_RE = re.compile(r"[0-9a-f]{12}")
#: A DICOM UID as a file or folder name (PS3.5 9.1: digits and dots, at most 64 characters).
UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
UID_MAX_CHARS = 64
STATUS_NAME = "status.json"
INCOMING = ".incoming"
WORK = ".work"
#: Columns of the patients sheet (``events`` optional).
SHEET_COLUMNS = ("patient_id", "day0", "affected_side")


class NodeError(ValueError):
    """A node setting or input that cannot work, with what to change."""


def patient_key(patient_id: object) -> str | None:
    """The spool key of a PatientID: :func:`pipeline.io.identity.patient_fingerprint` of the
    normalised ID alone (:func:`~pipeline.io.identity.normalise_patient_id`); None for an empty
    or placeholder ID (``ANONYMOUS``, ``000``, ...), which cannot tell patients apart.

    The ID alone, not name and birth date: a PACS files by PatientID, and a renamed patient
    stays one patient. About 0.1 s per new ID (PBKDF2), cached.
    """
    normalised = normalise_patient_id(patient_id)
    return None if normalised is None else patient_fingerprint(normalised, None, None)


def is_uid(value: object) -> bool:
    """Whether `value` is a well-formed DICOM UID (safe as a file or folder name)."""
    text = str(value or "")
    return len(text) <= UID_MAX_CHARS and UID_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class Spool:
    """The spool folder ``root`` (see the module docstring for the layout)."""

    root: Path

    def prepare(self) -> None:
        """Create the folder; remove files a crash left half-received in ``.incoming/``."""
        (self.root / INCOMING).mkdir(parents=True, exist_ok=True)
        (self.root / WORK).mkdir(parents=True, exist_ok=True)
        for leftover in (self.root / INCOMING).iterdir():
            leftover.unlink(missing_ok=True)

    def patient_dir(self, key: str) -> Path:
        return self.root / key

    def status_path(self, key: str) -> Path:
        return self.root / key / STATUS_NAME

    def work_dir(self, key: str) -> Path:
        return self.root / WORK / key

    def object_path(self, key: str, study_uid: str, sop_uid: str) -> Path:
        return self.root / key / study_uid / f"{sop_uid}.dcm"

    def file_object(self, key: str, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one received object (a DICOM file's bytes) to its place, atomically.

        The bytes go to a temporary file in ``.incoming/`` (same file system), are flushed to
        disk, then renamed over the final name: a reader sees the whole file or none. The same
        SOP instance sent again replaces the earlier copy.
        """
        final = self.object_path(key, study_uid, sop_uid)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{sop_uid}.", suffix=".part",
                                        dir=self.root / INCOMING)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, final)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        return final

    def patients(self) -> list[str]:
        """The patient keys with a folder in the spool, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and PATIENT_KEY_RE.fullmatch(p.name))

    def studies(self, key: str) -> dict[str, list[Path]]:
        """StudyInstanceUID -> the received files of that study, sorted."""
        out: dict[str, list[Path]] = {}
        folder = self.patient_dir(key)
        if not folder.is_dir():
            return out
        for study in sorted(folder.iterdir()):
            if study.is_dir() and is_uid(study.name):
                out[study.name] = sorted(study.glob("*.dcm"))
        return out

    def counts(self, key: str) -> tuple[int, int]:
        """(studies, images) received for a patient."""
        studies = self.studies(key)
        return len(studies), sum(len(files) for files in studies.values())

    def patient_id(self, key: str) -> str | None:
        """The PatientID of a spooled patient (read from one received file), or None."""
        for files in self.studies(key).values():
            for path in files:
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True,
                                         specific_tags=["PatientID"])
                except Exception:  # noqa: BLE001 - try the next file
                    continue
                return str(ds.get("PatientID") or "") or None
        return None


# ------------------------------------------------------------------------- the input view


def archive_folder(archive: Path | None, key: str, patient_id: str | None) -> Path | None:
    """A patient's folder in the archive: ``<archive>/<patient key>/`` (a spool's layout), else
    ``<archive>/<PatientID>/``; None when there is neither (or no archive)."""
    if archive is None:
        return None
    candidates = [archive / key]
    if patient_id and patient_id == Path(patient_id).name and patient_id not in (".", ".."):
        candidates.append(archive / patient_id)
    return next((c for c in candidates if c.is_dir()), None)


def _files_below(top: Path) -> Iterator[Path]:
    """Every file below `top` (the DICOM index's walk; links to folders not entered)."""
    for _, entry in walk_entries(top):
        if not isinstance(entry, OSError) and entry.is_file():
            yield Path(entry.path)


def build_input_view(spool: Spool, key: str, archive: Path | None) -> tuple[Path, int]:
    """The workflow's input folder for one run: links to the patient's received files
    (``received/<study>/<sop>.dcm``) and to every file of their archive folder
    (``archive/...``), made afresh. Returns (folder, number of files).

    A snapshot: files that arrive during the run are not in it (they start another run), and
    ``status.json`` is not either. The links point at absolute paths; the workflow reads
    through them (the index follows links to files).
    """
    view = spool.work_dir(key) / "input"
    if view.exists():
        shutil.rmtree(view)
    n = 0
    for study_uid, files in spool.studies(key).items():
        for path in files:
            _link(view / "received" / study_uid / path.name, path)
            n += 1
    if archive is not None:
        for path in _files_below(archive):
            _link(view / "archive" / path.relative_to(archive), path)
            n += 1
    view.mkdir(parents=True, exist_ok=True)
    return view, n


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve())


# --------------------------------------------------------------------- the patients sheet


@dataclass(frozen=True)
class PatientRow:
    """What the workflow needs about a patient that DICOM does not carry."""

    day0: str  # YYYY-MM-DD
    affected_side: str  # left | right | auto
    events: str = ""  # an events TSV (absolute), or "" (none)


def read_patients(sheet: Path) -> dict[str, PatientRow | str]:
    """The patients sheet (tab-separated: ``patient_id``, ``day0``, ``affected_side``,
    optional ``events``), by :func:`patient_key`.

    A row that cannot be used maps to the reason (naming the line), so that patient's status
    can say what to fix; the other rows are used. Raises :class:`NodeError` when the sheet
    cannot be read or lacks a column. An ``events`` path is relative to the sheet's folder.
    """
    try:
        rows = read_tsv(sheet)
    except (OSError, UnicodeDecodeError) as err:
        raise NodeError(f"{sheet}: the patients sheet cannot be read ({err})") from None
    missing = [c for c in SHEET_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise NodeError(f"{sheet}: missing column(s) {', '.join(missing)}; the patients "
                        f"sheet needs {', '.join(SHEET_COLUMNS)} (and optionally events), "
                        "tab-separated")
    out: dict[str, PatientRow | str] = {}
    for line, row in enumerate(rows, start=2):
        key = patient_key(row.get("patient_id"))
        if key is None:
            continue
        out[key] = _patient_row(row, sheet, line)
    return out


def _patient_row(row: Mapping[str, str | None], sheet: Path, line: int) -> PatientRow | str:
    """One row of the patients sheet, or what is wrong with it."""
    day0 = (row.get("day0") or "").strip()
    side = (row.get("affected_side") or "").strip().lower()
    events = (row.get("events") or "").strip()
    where = f"{sheet.name} line {line}"
    if not DATE_RE.fullmatch(day0):
        return f"{where}: day0 {day0!r} is not a date YYYY-MM-DD"
    if side not in SIDES:
        return f"{where}: affected_side must be {', '.join(SIDES)}, not {side!r}"
    if events:
        path = Path(events) if Path(events).is_absolute() else sheet.parent / events
        if not path.is_file():
            return f"{where}: events file {events!r} does not exist"
        events = str(path.resolve())
    return PatientRow(day0=day0, affected_side=side, events=events)
