"""What identifies the patient, shown only when asked (``--show-phi``, config ``show_phi``).

No output of the workflow carries the patient's name, ID or birth date (the index keeps them in
memory only; outputs name the patient by a pseudonymous fingerprint). With ``--show-phi`` the
report reads them from the DICOM headers of the files the index listed per session in
``sessions.json``; without it, nothing is read and keys naming such data are dropped from the
settings tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.io.dicom_values import parse_dicom_date
from pipeline.report.qcview import NOT_AVAILABLE

#: Keys that would carry protected health information; never rendered unless show_phi.
PHI_KEY_RE = re.compile(
    r"patient.?(name|id|birth|sex|age|address|telephone)|birth.?date|other.?patient|"
    r"referring.?physician|institution.?address|accession",
    re.I,
)
#: The identity shown in the report header: field -> DICOM attribute.
IDENTITY_TAGS: dict[str, str] = {
    "name": "PatientName",
    "id": "PatientID",
    "birth_date": "PatientBirthDate",
}


def is_phi_key(key: str) -> bool:
    """Whether a (possibly dotted) key names patient-identifying data (PatientName, ...)."""
    return bool(PHI_KEY_RE.search(key.replace("_", "").replace(" ", "")))


def person_name(value: Any) -> str | None:
    """A DICOM PN as 'FAMILY, Prefix Given Middle Suffix' (alphabetic group); None if empty."""
    parts = [p.strip() for p in str(value or "").split("=")[0].split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    rest = " ".join(p for p in (prefix, given, middle, suffix) if p)
    return ", ".join(p for p in (family, rest) if p) or None


def _first_file(entry: Mapping[str, Any]) -> Path | None:
    for role in ("anatomical", "fluid"):
        files = (entry.get(role) or {}).get("files") or []
        if files:
            return Path(str(files[0]))
    return None


def _identity_of(path: Path) -> dict[str, str | None]:
    import pydicom  # here: read only with show_phi; a report job does not load it otherwise

    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=list(IDENTITY_TAGS.values()))
    return {
        "name": person_name(ds.get("PatientName")),
        "id": str(ds.get("PatientID") or "").strip() or None,
        "birth_date": parse_dicom_date(ds.get("PatientBirthDate")),
    }


def patient_identity(sessions_json: Path | None, notes: list[str]) -> dict[str, str]:
    """The patient's name, ID and birth date from the first DICOM file of each session listed
    in the index's `sessions_json` (values that differ between sessions joined by '; ');
    'not available' where no header has one. What cannot be read is named in `notes`."""
    found: dict[str, list[str]] = {k: [] for k in IDENTITY_TAGS}
    try:
        if sessions_json is None:
            raise ValueError("no sessions.json given (--sessions-json)")
        index = json.loads(sessions_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"patient identity not shown: {exc}")
        index = {}
    if index and not index.get("n_files_dicom", 1):
        notes.append("patient identity not shown: the input is NIfTI, which carries none")
        index = {}
    for entry in index.get("sessions") or []:
        path = _first_file(entry)
        try:
            identity = _identity_of(path) if path is not None else {}
        except Exception as exc:  # one unreadable header never stops the report
            notes.append(f"patient identity: {path} could not be read ({exc})")
            continue
        for key, value in identity.items():
            if value and value not in found[key]:
                found[key].append(value)
    return {k: "; ".join(v) or NOT_AVAILABLE for k, v in found.items()}
