"""Index a DICOM export folder and pick, per study, the series the workflow analyses.

Every file under the input folder is opened once, header only
(``pydicom.dcmread(path, stop_before_pixels=True)``). Files that are not DICOM images
(text files, ``DICOMDIR``, structured reports, empty files, ...) are listed as problems, never
silently dropped. Image files are grouped by StudyInstanceUID, SeriesInstanceUID and study
date; the files of a series must agree in acquisition and patient (:func:`series_agreement`)
before they are stacked. Each series gets a sequence class (:func:`classify_sequence`), an
orientation and a geometry summary. Studies are grouped into patients
(:func:`group_patients`): one subject is one patient, and a folder holding several is refused
unless the patient to use is named. :func:`select_sessions` then picks, per study, one
anatomical (T1-weighted) and one fluid-sensitive series (STIR, else T2 fat-saturated, else
Dixon water).

A study is keyed by (patient, StudyInstanceUID, study date): a StudyInstanceUID that an export
reuses on two dates gives two studies, each used or refused with its reason.

The input folder is read-only: nothing is ever written into it.

Command line::

    python -m pipeline.io.dicom_index --input-dir DIR --out-dir OUT \
        [--anatomical-regex R] [--fluid-regex R] [--patient ID_OR_FINGERPRINT] [--show-phi]

writes ``index.tsv``, ``problems.tsv``, ``sessions.json`` and ``sessions.tsv`` into OUT.
No patient name, ID or birth date reaches any output; patients are told apart by a
pseudonymous fingerprint (:func:`patient_fingerprint`). ``--show-phi`` only adds them to the
table of patients printed (to the log) when a folder holds several.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import errno
import functools
import hashlib
import io
import logging
import mmap
import multiprocessing
import os
import re
import sys
import threading
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.io import dicom_frames
from pipeline.io.dicom_frames import FrameError, FrameInfo
from pipeline.io.files import is_within, walk_entries, write_json_atomic, write_tsv_atomic

log = logging.getLogger(__name__)

#: SOP Class UID of a DICOMDIR (Media Storage Directory Storage).
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: Inversion time below which an inversion-recovery sequence nulls fat (STIR), in ms.
#: Fat nulls at TI ~ 150-170 ms at 1.5 T and ~ 200-230 ms at 3 T.
STIR_MAX_TI_MS = 250.0
#: Repetition time above which TR counts as "long" (T2 / PD / STIR), in ms.
LONG_TR_MS = 1500.0
#: Repetition time below which TR counts as "short" (T1 weighting), in ms.
SHORT_TR_MS = 1000.0
#: Echo time below which TE counts as "short" (T1 / PD weighting), in ms.
SHORT_TE_MS = 30.0
#: Echo time at or above which TE counts as "long" (T2 weighting), in ms.
LONG_TE_MS = 40.0
#: A slice normal further than this from every patient axis is called oblique, in degrees.
OBLIQUE_ANGLE_DEG = 30.0
#: Fewest slices that make a volume.
MIN_SLICES = 3

SEQUENCE_CLASSES: tuple[str, ...] = (
    "T1w", "STIR", "T2FS", "dixon_water", "dixon_fat", "dixon_in", "dixon_opp",
    "post_contrast", "localizer", "derived", "other",
)
#: Fluid-sensitive classes in order of preference.
FLUID_PREFERENCE: tuple[str, ...] = ("STIR", "T2FS", "dixon_water")
ANATOMICAL_CLASS = "T1w"

INDEX_COLUMNS: tuple[str, ...] = (
    "study_uid", "study_date", "study_time", "series_uid", "series_number",
    "series_description", "modality", "sequence_class", "orientation", "n_files", "rows",
    "columns", "pixel_spacing_mm", "slice_spacing_mm", "status", "reason", "volumes",
    "patient_fingerprint",
)
PROBLEM_COLUMNS: tuple[str, ...] = ("path", "problem")
SESSION_COLUMNS: tuple[str, ...] = ("session", "study_date", "anatomical_series", "fluid_series")


# --------------------------------------------------------------------------------------------
# patient identity
# --------------------------------------------------------------------------------------------

#: Fixed, public salt of the patient fingerprint: the same patient gets the same fingerprint
#: on every run and machine. Changing it changes every fingerprint.
FINGERPRINT_SALT = b"limbtrack-patient-fingerprint-v1"
#: PBKDF2-HMAC-SHA256 rounds of the fingerprint: patient IDs are short, so a plain hash with
#: a public salt could be reversed by trying every ID; this makes each try ~0.1 s.
FINGERPRINT_ROUNDS = 100_000
#: Hex digits kept of the fingerprint (48 bits: no collision among the patients of a folder).
FINGERPRINT_HEX_DIGITS = 12

#: Placeholders anonymisers and modalities write instead of an identity (compared upper-case,
#: letters and digits only): they identify nobody.
_PLACEHOLDER_WORDS = ("ANONYMOUS", "ANONYMIZED", "ANONYMISED", "ANON", "UNKNOWN", "UNK",
                      "NONE", "NULL", "REMOVED", "DELETED", "DEIDENTIFIED", "PATIENT",
                      "NONAME", "EMPTY", "NA")
_PLACEHOLDER_RE = re.compile(r"(?:" + "|".join(_PLACEHOLDER_WORDS) + r")+|0+|X+")
#: Birth dates written instead of an unknown one.
_PLACEHOLDER_BIRTH_DATES = {"1900-01-01"}

#: The DICOM attributes of each identity field, in fingerprint order.
IDENTITY_TAGS: tuple[str, ...] = ("PatientID", "PatientName", "PatientBirthDate")


def _letters_digits(text: str) -> str:
    """Upper-case letters and digits of `text`, accents removed (``Müller-Lüdenscheidt`` ->
    ``MULLERLUDENSCHEIDT``)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if ch.isalnum() and not unicodedata.combining(ch)
                   ).upper()


def normalise_patient_id(value: Any) -> str | None:
    """PatientID as compared: stripped, inner blanks collapsed, upper-case; None when empty or
    a placeholder (``ANONYMOUS``, ``UNKNOWN``, ``N/A``, ``0000``, ``-``, ...)."""
    text = " ".join(str(value or "").split()).upper()
    if _PLACEHOLDER_RE.fullmatch(_letters_digits(text) or "0"):
        return None
    return text


def normalise_patient_name(value: Any) -> str | None:
    """PatientName as compared: family and given name (the first two ``^`` components of the
    alphabetic group), letters and digits only, upper-case, accents removed, joined by ``^``;
    None when empty or a placeholder (``ANONYMOUS^``, ``Anonymized``, ``UNKNOWN``, ...).

    Middle names, prefixes, suffixes and the ideographic/phonetic groups are left out: exports
    of one patient differ in them more often than two patients share the rest.
    """
    text = str(value or "").split("=")[0]
    parts = (text.split("^") + ["", ""])[:2]
    family, given = (_letters_digits(p) for p in parts)
    if _PLACEHOLDER_RE.fullmatch(family + given or "0"):
        return None
    return f"{family}^{given}"


def normalise_birth_date(value: Any) -> str | None:
    """PatientBirthDate as ISO ``YYYY-MM-DD``; None when empty, invalid or a placeholder."""
    date = parse_dicom_date(value)
    return None if date in _PLACEHOLDER_BIRTH_DATES else date


@dataclass(frozen=True, eq=False)
class PatientIdentity:
    """The normalised identity of one file: PatientID, PatientName, PatientBirthDate.

    A field is None when empty or a placeholder. Two identities are equal when their
    :attr:`values` are. Held in memory only: ``repr`` hides it and no output carries it (only
    :meth:`fingerprint`).
    """

    patient_id: str | None = None
    name: str | None = None  # FAMILY^GIVEN
    birth_date: str | None = None  # ISO

    @classmethod
    def of(cls, ds: Any) -> PatientIdentity:
        """The identity of a dataset (values that cannot be read count as absent)."""
        values: list[str | None] = []
        for tag, normalise in zip(IDENTITY_TAGS, (normalise_patient_id, normalise_patient_name,
                                                  normalise_birth_date), strict=True):
            try:
                values.append(normalise(ds.get(tag)))
            except Exception:  # noqa: BLE001 - a value that cannot be decoded identifies nobody
                values.append(None)
        return cls(*values)

    def __repr__(self) -> str:
        return f"PatientIdentity(<hidden>, known: {', '.join(self.known) or 'nothing'})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatientIdentity) and self.values == other.values

    def __hash__(self) -> int:
        return hash(self.values)

    @property
    def values(self) -> tuple[str | None, str | None, str | None]:
        return (self.patient_id, self._name_key, self.birth_date)

    @property
    def _name_key(self) -> str | None:
        # "DOE^JANE" and "DOE JANE" (no component separator) are the same name
        return None if self.name is None else self.name.replace("^", "")

    @property
    def known(self) -> tuple[str, ...]:
        """The DICOM attributes that identify (not empty, not a placeholder)."""
        return tuple(tag for tag, v in zip(IDENTITY_TAGS, self.values, strict=True)
                     if v is not None)

    @property
    def anchored(self) -> bool:
        """Whether the identity can stand for a patient when another field is missing: a
        PatientID or a name (a birth date alone cannot)."""
        return self.patient_id is not None or self.name is not None

    def compatible(self, other: PatientIdentity) -> bool:
        """No field known in both differs."""
        return all(a is None or b is None or a == b
                   for a, b in zip(self.values, other.values, strict=True))

    def fingerprint(self) -> str:
        """See :func:`patient_fingerprint`."""
        return patient_fingerprint(*self.values)


@functools.lru_cache(maxsize=1024)
def patient_fingerprint(patient_id: str | None, name: str | None,
                        birth_date: str | None) -> str:
    """Pseudonymous fingerprint of a patient: the first :data:`FINGERPRINT_HEX_DIGITS` hex
    digits of PBKDF2-HMAC-SHA256 (salt :data:`FINGERPRINT_SALT`, :data:`FINGERPRINT_ROUNDS`
    rounds) of ``ID 0x1f NAME 0x1f BIRTHDATE`` (UTF-8), each normalised as
    :func:`normalise_patient_id`, :func:`normalise_patient_name` without the ``^``, and
    ISO ``YYYY-MM-DD``; a missing field is empty.

    Stable across runs and machines; it tells patients apart without naming them. It is a
    pseudonym, not an anonymisation: whoever holds the identity can recompute it.
    """
    text = "\x1f".join(v or "" for v in (patient_id, (name or "").replace("^", ""),
                                            birth_date))
    digest = hashlib.pbkdf2_hmac("sha256", text.encode("utf-8"), FINGERPRINT_SALT,
                                 FINGERPRINT_ROUNDS)
    return digest.hex()[:FINGERPRINT_HEX_DIGITS]


@dataclass(frozen=True)
class PatientGroup:
    """One patient of a folder: the studies of one identity (see :func:`group_patients`).

    Attributes
    ----------
    fingerprint : str
        :func:`patient_fingerprint` of `identity`.
    identified_by : tuple of str
        The DICOM attributes the grouping rests on (empty: nothing identifies the patient).
    study_keys : tuple
        (StudyInstanceUID, study date) of each study, sorted by date.
    merged : int
        Studies joined to the patient although some of their identity fields are missing.
    """

    fingerprint: str
    identified_by: tuple[str, ...]
    study_keys: tuple[tuple[str, str], ...]
    identity: PatientIdentity = field(repr=False, compare=False,
                                      default_factory=lambda: PatientIdentity())
    merged: int = 0
    #: the identities whose studies make up the patient
    members: frozenset[PatientIdentity] = field(repr=False, compare=False,
                                                default_factory=frozenset)

    @property
    def study_dates(self) -> list[str]:
        return [date or "no date" for _, date in self.study_keys]

    def describe(self) -> dict[str, Any]:
        """The patient as written to sessions.json (no names, IDs or birth dates)."""
        return {"fingerprint": self.fingerprint,
                "identified_by": list(self.identified_by),
                "n_studies": len(self.study_keys),
                "study_dates": self.study_dates}


def group_patients(series: Iterable[SeriesRecord]) -> list[PatientGroup]:
    """The patients of a folder, from the identities of its series.

    Rule:

    1. Each series carries the normalised identity of its files (PatientID, PatientName as
       FAMILY^GIVEN without accents or punctuation, PatientBirthDate); empty fields and
       placeholders (``ANONYMOUS``, ``UNKNOWN``, ``N/A``, ``000``, birth date 1900-01-01, ...)
       count as missing.
    2. Series with the same identity (all three fields equal, missing ones included) are one
       patient.
    3. An identity with a missing field joins another patient when it has a PatientID or a name,
       agrees with that patient on every field both have, and exactly one such patient with
       more known fields exists (an export that blanked the birth date in some studies).
       Otherwise it stays its own patient.
    4. An identity with nothing known (fully anonymised export) never joins another; alone in
       the folder it is taken as one patient, with a warning.

    Returns
    -------
    list of PatientGroup
        Most studies first, then by fingerprint (:func:`patient_warnings` says what was
        assumed).
    """
    studies: dict[PatientIdentity, set[tuple[str, str]]] = defaultdict(set)
    for record in series:
        studies[record.identity].add((record.study_uid, record.study_date or ""))
    order = sorted(studies, key=lambda i: (-len(i.known), i.fingerprint()))
    kept: list[PatientIdentity] = []
    target: dict[PatientIdentity, PatientIdentity] = {}
    for identity in order:
        if identity.anchored and len(identity.known) < len(IDENTITY_TAGS):
            wider = [k for k in kept if set(k.known) > set(identity.known)
                     and identity.compatible(k)]
            if len(wider) == 1:
                target[identity] = wider[0]
                continue
        kept.append(identity)
        target[identity] = identity
    keys_of: dict[PatientIdentity, set[tuple[str, str]]] = defaultdict(set)
    merged: dict[PatientIdentity, int] = defaultdict(int)
    members: dict[PatientIdentity, set[PatientIdentity]] = defaultdict(set)
    for identity, keys in studies.items():
        keys_of[target[identity]] |= keys
        members[target[identity]].add(identity)
        if target[identity] != identity:
            merged[target[identity]] += len(keys)
    groups = [PatientGroup(fingerprint=identity.fingerprint(), identified_by=identity.known,
                           study_keys=tuple(sorted(keys, key=lambda k: (k[1], k[0]))),
                           identity=identity, merged=merged[identity],
                           members=frozenset(members[identity]))
              for identity, keys in keys_of.items()]
    groups.sort(key=lambda g: (-len(g.study_keys), g.fingerprint))
    return groups


def assign_patients(series: Sequence[SeriesRecord],
                    groups: Sequence[PatientGroup]) -> list[SeriesRecord]:
    """Copies of `series` with the fingerprint of the patient each belongs to."""
    fingerprint_of = {identity: g.fingerprint for g in groups for identity in g.members}
    return [dataclasses.replace(record, patient_fingerprint=fingerprint_of.get(
        record.identity, "")) for record in series]


@dataclass(frozen=True)
class FileHeader:
    """What the index keeps of one image file's header: geometry (lengths in mm), frames,
    study date, patient identity and acquisition signature."""

    path: Path
    sop_uid: str | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 direction cosines
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm (LPS)
    pixel_spacing_mm: tuple[float, float] | None  # (row spacing, column spacing)
    rows: int | None
    columns: int | None
    n_frames: int
    frames: tuple[FrameInfo, ...] = ()  # the 2-D images of the file, placed in space
    frame_error: str | None = None  # why the frames cannot be placed, if they cannot
    study_date: str | None = None  # StudyDate, ISO
    identity: PatientIdentity = field(default_factory=lambda: PatientIdentity())
    #: acquisition values the files of a series must share (dicom_frames.SIGNATURE_TAGS)
    signature: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VolumeRecord:
    """One volume of a series (a series may hold several: echoes, Dixon images, ...).

    Attributes
    ----------
    label : str
        Volume entities ('' when the series is one volume), e.g. ``echo-2``, ``part-water``.
    status : {'ok', 'refused'}
    """

    label: str
    sequence_class: str
    n_frames: int
    n_positions: int
    status: str
    reason: str = ""

    def describe(self) -> str:
        text = f"{self.label or 'volume'}={self.sequence_class} ({self.n_positions} slices)"
        return text if self.status == "ok" else f"{text} refused: {self.reason}"


@dataclass(frozen=True)
class SeriesRecord:
    """One series of one study, as found in the input folder.

    Attributes
    ----------
    pixel_spacing_mm : (float, float) or None
        DICOM PixelSpacing: (distance between rows, distance between columns), mm.
    slice_spacing_mm : float or None
        Median step between adjacent slice positions along the slice normal, mm.
    status : {'used', 'skipped', 'refused'}
        'refused' means the series cannot be converted as a volume (reason says why);
        'skipped' means usable but not selected; 'used' means selected for a session.
    files : tuple of Path
        Absolute paths of the series' files, sorted.
    """

    study_uid: str
    study_date: str | None
    study_time: str | None
    series_uid: str
    series_number: int | None
    series_description: str
    modality: str
    sequence_class: str
    orientation: str | None
    n_files: int
    rows: int | None
    columns: int | None
    pixel_spacing_mm: tuple[float, float] | None
    slice_spacing_mm: float | None
    status: str
    reason: str
    files: tuple[Path, ...] = field(repr=False, default=())
    volumes: tuple[VolumeRecord, ...] = ()
    #: the volume a selection stands for ('' = the whole series, a single volume)
    volume: str = ""
    #: pseudonymous fingerprint of the patient (:func:`patient_fingerprint`); '' = not grouped
    patient_fingerprint: str = ""
    #: the patient identity of the series' files (never written anywhere)
    identity: PatientIdentity = field(default_factory=lambda: PatientIdentity(), repr=False)

    @property
    def study_key(self) -> tuple[str, str, str]:
        """What tells a study apart: (patient fingerprint, StudyInstanceUID, study date)."""
        return (self.patient_fingerprint, self.study_uid, self.study_date or "")

    def as_row(self) -> dict[str, Any]:
        """The record as an ``index.tsv`` row (everything but the file list)."""
        row = {c: getattr(self, c) for c in INDEX_COLUMNS if c != "volumes"}
        row["volumes"] = "; ".join(v.describe() for v in self.volumes) \
            if len(self.volumes) > 1 else ""
        if self.pixel_spacing_mm is not None:
            row["pixel_spacing_mm"] = ",".join(f"{v:g}" for v in self.pixel_spacing_mm)
        if self.slice_spacing_mm is not None:
            row["slice_spacing_mm"] = round(self.slice_spacing_mm, 4)
        return row


@dataclass(frozen=True)
class Problem:
    """A file that was not indexed, with the reason (path relative to the input folder)."""

    path: str
    problem: str


@dataclass(frozen=True)
class IndexResult:
    """Everything :func:`index_folder` found.

    Attributes
    ----------
    n_files_seen : int
        Regular files walked under the input folder.
    n_files_dicom : int
        Files that parsed as DICOM (images or not, DICOMDIR included).
    """

    input_dir: Path
    series: tuple[SeriesRecord, ...]
    problems: tuple[Problem, ...]
    n_files_seen: int
    n_files_dicom: int
    #: the patients of the folder (:func:`group_patients`), most studies first
    patients: tuple[PatientGroup, ...] = ()
    #: findings about the folder as a whole (StudyInstanceUIDs reused on several dates)
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# small parsers
# --------------------------------------------------------------------------------------------

def parse_dicom_date(value: Any) -> str | None:
    """DICOM DA (``YYYYMMDD``, or legacy ``YYYY.MM.DD``) as ISO ``YYYY-MM-DD``.

    Returns None for empty, ``00000000`` or impossible dates; never substitutes today's date.
    """
    text = str(value or "").strip()
    match = re.fullmatch(r"(\d{4})\.?(\d{2})\.?(\d{2})", text)
    if not match:
        return None
    try:
        date = dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None
    if date.year < 1900:
        return None
    return date.isoformat()


def parse_dicom_time(value: Any) -> str | None:
    """DICOM TM (``HHMMSS.ffffff``, ``HHMM``, legacy ``HH:MM:SS``) as ``HH:MM:SS``, else None."""
    text = str(value or "").strip().replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d*)?", text)
    if not match:
        return None
    hh, mm, ss = int(match[1]), int(match[2] or 0), int(match[3] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        return None
    return f"{hh:02d}:{mm:02d}:{min(ss, 59):02d}"


def floats_or_none(value: Any, n: int) -> tuple[float, ...] | None:
    """A multi-valued DICOM element as a tuple of `n` finite floats, or None if absent/malformed."""
    if value is None:
        return None
    values = value if isinstance(value, Iterable) and not isinstance(value, str) else [value]
    try:
        items = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if len(items) != n or not all(np.isfinite(items)):
        return None
    return items


def float_or_none(value: Any) -> float | None:
    """A DICOM number as a finite float, or None if absent or malformed."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) else None


def int_or_none(value: Any) -> int | None:
    """A DICOM integer as int, or None if absent or malformed."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal (LPS) of an ImageOrientationPatient: row cosine x column cosine."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError(f"degenerate ImageOrientationPatient {list(orientation)}")
    return normal / norm


def orientation_label(orientation: Sequence[float]) -> str:
    """'axial', 'coronal', 'sagittal' or 'oblique' from the slice normal.

    The normal's largest LPS component decides (z: axial, y: coronal, x: sagittal) unless the
    normal is more than :data:`OBLIQUE_ANGLE_DEG` away from that axis.
    """
    normal = np.abs(slice_normal(orientation))
    axis = int(np.argmax(normal))
    if normal[axis] < np.cos(np.deg2rad(OBLIQUE_ANGLE_DEG)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


# --------------------------------------------------------------------------------------------
# sequence classification
# --------------------------------------------------------------------------------------------

_LOCALIZER_RE = re.compile(r"locali[sz]er|scout|survey|3[- ]?plane|tri[- ]?pilot|\bloc\b"
                           r"|aahead|\bpilot", re.I)
_DIXON_DESC_RE = re.compile(r"dixon|\bdix\b|flex|ideal|m-?dixon", re.I)
_FATSAT_DESC_RE = re.compile(r"\bfs\b|_fs\b|\bfs_|fat[ _-]?sat|fatsat|spair|spir\b|\bfs\d|"
                             r"\bsfs\b|chem[ _-]?sat|fat[ _-]?supp?", re.I)
_STIR_DESC_RE = re.compile(r"stir|tirm|\btir\b", re.I)
_T1_DESC_RE = re.compile(r"t1(?!\d)", re.I)
_T2_DESC_RE = re.compile(r"t2(?!\d)", re.I)
_CONTRAST_DESC_RE = re.compile(r"\+\s*c\b|\bpost\b|_post\b|\bgado|\bgd\b|contrast|\+gd|\bkm\b",
                               re.I)
_FATSAT_OPTIONS = {"FS", "SFS", "FSA", "FSS", "FAT_SAT", "FATSAT", "SPAIR", "SPIR", "CHEM_SAT",
                   "FSP", "FSI"}
_DIXON_TOKENS = {
    "dixon_water": {"W", "WATER"},
    "dixon_fat": {"F", "FAT"},
    "dixon_in": {"IN", "IN_PHASE", "IP"},
    "dixon_opp": {"OPP", "OUT_PHASE", "OP", "OUT", "OPP_PHASE", "OPPOSED_PHASE", "OUT_OF_PHASE"},
}
_DERIVED_TOKENS = {"MPR", "PROJECTION IMAGE", "MIP", "SUBTRACT", "ADC", "TRACEW", "CPR",
                   "REFORMATTED", "MNIP", "CSA MPR", "CSAPARALLEL"}


def _dixon_kind(image_type: Sequence[str], description: str) -> str | None:
    """Dixon component from ImageType tokens (beyond the first two) or the description."""
    # ImageType[0:2] are ORIGINAL/DERIVED and PRIMARY/SECONDARY; vendors put W/F/IP/OP later
    for kind, tokens in _DIXON_TOKENS.items():
        if any(t in tokens for t in image_type[2:]):
            return kind
    desc = description.lower()
    if _DIXON_DESC_RE.search(desc) or re.match(r"^(water|fat|inphase|outphase)\b", desc):
        patterns = {
            "dixon_water": r"(^|[^a-z])(w|water)($|[^a-z])",
            "dixon_fat": r"(^|[^a-z])(f|fat)($|[^a-z])",
            "dixon_opp": r"(^|[^a-z])(opp|op|out[ _-]?phase|outphase)($|[^a-z])",
            "dixon_in": r"(^|[^a-z])(in|ip|in[ _-]?phase|inphase)($|[^a-z])",
        }
        for kind, pattern in patterns.items():
            if re.search(pattern, desc):
                return kind
    return None


def classify_sequence(ds: Any) -> str:
    """Sequence class of an MR image from its header.

    Parameters
    ----------
    ds : pydicom.Dataset (or any object with DICOM keyword attributes)
        Header of one image of the series. Used tags: ScanningSequence, SequenceVariant,
        ScanOptions, InversionTime (ms), EchoTime (ms), RepetitionTime (ms), ImageType,
        ContrastBolusAgent, SeriesDescription (a hint when the tags are inconclusive).

    Returns
    -------
    str
        One of :data:`SEQUENCE_CLASSES`. Rules, first match wins:

        1. ``localizer``: ImageType LOCALIZER or a localizer/scout/survey description;
        2. Dixon component (ImageType W/F/IN/OPP tokens, or a Dixon description) noted;
        3. ``post_contrast``: ContrastBolusAgent filled or a post-contrast description;
        4. ``dixon_water``/``dixon_fat``/``dixon_in``/``dixon_opp`` from step 2;
        5. ``derived``: ImageType DERIVED (MPR, subtraction, maps ...);
        6. ``STIR``: inversion recovery (ScanningSequence/ScanOptions IR or TI > 0) with
           TI < 250 ms and TR >= 1500 ms (when known);
        7. ``T2FS``: TR >= 1500 ms, TE >= 40 ms and fat saturation (ScanOptions FS/SFS/...
           or FS/FATSAT/SPAIR/SPIR in the description);
        8. ``T1w``: TR < 1000 ms and TE < 30 ms without inversion recovery or fat saturation
           (spin echo, or gradient echo described as T1); IR with TI 300-1200 ms and short TE
           (MPRAGE-like) is T1w too;
        9. description hints when timing tags are missing: STIR/TIRM, T2 + fat sat, T1;
        10. ``other``.
    """
    description = str(getattr(ds, "SeriesDescription", "") or "")
    image_type = dicom_frames.tokens(getattr(ds, "ImageType", None))
    scanning = set(dicom_frames.tokens(getattr(ds, "ScanningSequence", None)))
    options = set(dicom_frames.tokens(getattr(ds, "ScanOptions", None)))
    tr = float_or_none(getattr(ds, "RepetitionTime", None))
    te = float_or_none(getattr(ds, "EchoTime", None))
    ti = float_or_none(getattr(ds, "InversionTime", None))
    agent = str(getattr(ds, "ContrastBolusAgent", "") or "").strip()

    if "LOCALIZER" in image_type or _LOCALIZER_RE.search(description):
        return "localizer"
    dixon = _dixon_kind(image_type, description)
    if agent or _CONTRAST_DESC_RE.search(description):
        return "post_contrast"
    if dixon:
        return dixon
    if image_type[:1] == ("DERIVED",) or _DERIVED_TOKENS.intersection(image_type[2:]):
        return "derived"

    inversion = "IR" in scanning or "IR" in options or (ti is not None and ti > 0)
    fat_sat = bool(options & _FATSAT_OPTIONS) or bool(_FATSAT_DESC_RE.search(description))
    short_ti = ti is not None and 0 < ti < STIR_MAX_TI_MS
    if inversion and short_ti and (tr is None or tr >= LONG_TR_MS):
        return "STIR"
    if tr is not None and te is not None:
        if not inversion and fat_sat and tr >= LONG_TR_MS and te >= LONG_TE_MS:
            return "T2FS"
        if not inversion and not fat_sat and tr < SHORT_TR_MS and te < SHORT_TE_MS:
            if "SE" in scanning or _T1_DESC_RE.search(description):
                return "T1w"
        if inversion and ti is not None and 300 <= ti <= 1200 and te < SHORT_TE_MS:
            return "T1w"
        # timing known but not matching the patterns above: only a clear description helps
        if _STIR_DESC_RE.search(description) and inversion and (ti is None or ti < STIR_MAX_TI_MS):
            return "STIR"
        return "other"
    # timing tags missing: fall back on the description
    if _STIR_DESC_RE.search(description):
        return "STIR"
    if _T2_DESC_RE.search(description) and fat_sat:
        return "T2FS"
    if _T1_DESC_RE.search(description) and not fat_sat:
        return "T1w"
    return "other"


# --------------------------------------------------------------------------------------------
# indexing
# --------------------------------------------------------------------------------------------

#: Bytes of a file read in one go before its header is parsed (from memory). Classic image
#: headers, Siemens CSA blocks included (~60 kB), fit; a longer header is read from the file.
HEADER_PREFIX_BYTES = 128 * 1024


def _dcmread_header(path: Path, force: bool = False) -> pydicom.Dataset:
    """``pydicom.dcmread(path, stop_before_pixels=True, force=force)``, parsed from memory.

    pydicom parses a header ~25 % faster from a BytesIO than through a buffered file (it calls
    ``tell``/``read`` several times per element). The first :data:`HEADER_PREFIX_BYTES` are
    read at once; when the parse runs into the end of that prefix (header longer than it, or
    a broken file), the file is parsed again directly, so the result and any error are those
    of the whole file.
    """
    with open(path, "rb") as fh:
        data = fh.read(HEADER_PREFIX_BYTES)
    buffer = io.BytesIO(data)
    if len(data) < HEADER_PREFIX_BYTES:  # the whole file is in memory
        ds = pydicom.dcmread(buffer, stop_before_pixels=True, force=force)
        ds._header_end = buffer.tell()
    else:
        try:
            ds = pydicom.dcmread(buffer, stop_before_pixels=True, force=force)
            ds._header_end = buffer.tell()
            cut = buffer.tell() >= len(data)  # stopped at the prefix end, not at pixel data
        except Exception:  # noqa: BLE001 - possibly an artefact of the cut; decide on the file
            cut = True
        if cut:
            ds = _dcmread_mapped(path, force)
    ds.filename = str(path)
    return ds


def _dcmread_mapped(path: Path, force: bool) -> pydicom.dataset.FileDataset:
    """Header of `path` parsed from a read-only memory map of the file.

    Not from a plain file object: for a corrupt element length (e.g. 0xFFFFFFF0) pydicom
    asks the file for that many bytes, and a file object allocates a buffer of the requested
    size before reading (4 GiB); a memory map returns at most the rest of the file.
    """
    with open(path, "rb") as fh:
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty file, or a file that cannot be mapped
            return pydicom.dcmread(fh, stop_before_pixels=True, force=force)
        with mapped:
            ds = pydicom.dcmread(mapped, stop_before_pixels=True,  # type: ignore[arg-type]
                                 force=force)
            ds._header_end = mapped.tell()  # where the pixel data element starts, if any
            return ds


def _read_header(path: Path) -> pydicom.Dataset:
    """Header of `path` (no pixel data). Raises InvalidDicomError for non-DICOM files.

    Files without the 128-byte preamble (old exports) are accepted when, parsed leniently,
    they carry the UIDs of a DICOM object.
    """
    try:
        return _dcmread_header(path)
    except InvalidDicomError:
        pass
    ds = _dcmread_header(path, force=True)
    if not ("SOPClassUID" in ds and ("SeriesInstanceUID" in ds
                                      or "DirectoryRecordSequence" in ds)):
        raise InvalidDicomError("no DICOM preamble and no DICOM identifiers")
    return ds


def _pixel_size_error(path: Path, ds: pydicom.Dataset) -> str | None:
    """Why `path` cannot hold the uncompressed pixel data its header claims, else None.

    Checked from the header and the file size, so that a truncated file or a header claiming
    e.g. 65535 x 65535 pixels is refused here, before anything allocates memory for it.
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_transfer_syntax or syntax.is_encapsulated \
            or syntax.is_deflated:
        return None  # compressed: the decoded size is not bounded by the file size
    rows, columns = int_or_none(ds.get("Rows")), int_or_none(ds.get("Columns"))
    if not rows or not columns:
        return None
    n_frames = max(1, int_or_none(ds.get("NumberOfFrames")) or 1)
    samples = max(1, int_or_none(ds.get("SamplesPerPixel")) or 1)
    bits = max(1, int_or_none(ds.get("BitsAllocated")) or 16)
    needed = (rows * columns * n_frames * samples * bits + 7) // 8
    available = path.stat().st_size
    header_end = getattr(ds, "_header_end", None)  # the parse stopped before the pixel data
    if isinstance(header_end, int) and header_end <= available:
        element = 8 if syntax.is_implicit_VR else 12  # tag, (VR, reserved,) length
        available = max(0, available - header_end - element)
    if available >= needed:
        return None
    return (f"the file holds at most {available} bytes of pixel data but its header claims "
            f"{n_frames} frame(s) of {rows} x {columns} pixels at {bits} bits ({needed} "
            "bytes): truncated file or corrupt header; re-export the series")


def _file_header(path: Path, ds: pydicom.Dataset) -> FileHeader:
    iop = floats_or_none(ds.get("ImageOrientationPatient"), 6)
    ipp = floats_or_none(ds.get("ImagePositionPatient"), 3)
    spacing = floats_or_none(ds.get("PixelSpacing"), 2)
    try:
        frames, frame_error = dicom_frames.frames_of(path, ds), None
    except FrameError as err:
        frames, frame_error = (), str(err)
    frame_error = frame_error or _pixel_size_error(path, ds)
    return FileHeader(
        path=path,
        sop_uid=str(ds.get("SOPInstanceUID", "")) or None,
        orientation=iop,
        position=ipp,  # type: ignore[arg-type]
        pixel_spacing_mm=spacing,  # type: ignore[arg-type]
        rows=int_or_none(ds.get("Rows")),
        columns=int_or_none(ds.get("Columns")),
        n_frames=int_or_none(ds.get("NumberOfFrames")) or 1,
        frames=frames,
        frame_error=frame_error,
        study_date=parse_dicom_date(_safe_get(ds, "StudyDate")),
        identity=PatientIdentity.of(ds),
        signature=dicom_frames.acquisition_signature(ds),
    )


def file_header(path: Path, ds: pydicom.Dataset) -> FileHeader:
    """What the index keeps of one image file's header (geometry, frames, study date,
    patient identity, acquisition signature)."""
    return _file_header(path, ds)


#: Files at the top of a study folder that belong to limbtrack, not to the DICOM export.
COMPANION_FILES = ("events.tsv",)


def _walk(input_dir: Path, problems: list[tuple[Path, str]] | None = None) -> list[Path]:
    """All regular files under `input_dir` (any nesting, hidden ones too), sorted.

    The companion files at the top level (``events.tsv``: clinical events) are left out.
    What cannot be walked (a symbolic link loop or one pointing nowhere, a folder or link
    that cannot be read) is skipped and, when `problems` is given, appended to it as
    (path, why).
    """

    def skip(path: str, why: str) -> None:
        if problems is not None:
            problems.append((Path(path), why))

    # os.scandir's cached file types instead of a stat per file
    paths: list[Path] = []
    top = os.fspath(input_dir)
    for folder, entry in walk_entries(top):
        if isinstance(entry, OSError):
            # unreadable folder (os.walk skips these too): say so
            skip(folder, f"folder cannot be read ({_os_reason(entry)}); its files are not "
                         "indexed")
            continue
        try:
            if entry.is_dir():  # a link to a folder: not followed (followlinks=False)
                continue
        except OSError:
            pass
        if folder == top and entry.name in COMPANION_FILES:
            continue
        try:
            is_file = entry.is_file()  # follows symlinks, like Path.is_file
        except OSError as err:  # e.g. ELOOP: a link to itself
            skip(entry.path, f"cannot be followed ({_os_reason(err)}); skipped")
            continue
        if is_file:
            paths.append(Path(entry.path))
            continue
        try:
            os.stat(entry.path)
        except OSError as err:
            what = "symbolic link that cannot be followed" if entry.is_symlink() \
                else "cannot be read"
            skip(entry.path, f"{what} ({_os_reason(err)}); skipped")
        else:
            skip(entry.path, "not a regular file (a named pipe, socket or device); "
                             "skipped")
    return paths


def _os_reason(err: OSError) -> str:
    """An OSError in words (``too many levels of symbolic links: a link loop``, ...)."""
    if err.errno == errno.ELOOP:
        return "too many levels of symbolic links: a link loop"
    if err.errno == errno.ENOENT:
        return "its target does not exist"
    return err.strerror or type(err).__name__


@dataclass(frozen=True)
class _FileScan:
    """What the index needs of one file; small, so that worker processes can send it back."""

    problem: str | None  # why the file is no readable DICOM (then nothing else is set)
    sop_class: str = ""
    is_image: bool = False  # Rows and Columns present
    modality: str = ""
    study_uid: str = ""
    series_uid: str = ""
    header: FileHeader | None = None  # for image files with both UIDs


def _safe_get(ds: pydicom.Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, or `default` when the stored value cannot be converted."""
    try:
        return ds.get(keyword, default)
    except Exception:  # noqa: BLE001 - pydicom converts on access (unknown VR, bad number)
        return default


def _scan_file(path: Path) -> _FileScan:
    """Read the header of `path` once and keep what :func:`index_folder` needs of it."""
    try:
        if path.stat().st_size == 0:
            return _FileScan("empty file (0 bytes)")
        ds = _read_header(path)
        return _scan_dataset(path, ds)
    except InvalidDicomError:
        return _FileScan("not a DICOM file")
    except Exception as err:  # noqa: BLE001 - a broken file must not stop the index
        # (pydicom converts values on access: a corrupt value - unknown VR, bad number,
        # broken sequence - raises only when it is read)
        return _FileScan(f"unreadable DICOM header ({type(err).__name__}: {err})")


def _scan_dataset(path: Path, ds: pydicom.Dataset) -> _FileScan:
    sop_class = str(ds.get("SOPClassUID", "") or getattr(
        getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if sop_class == DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
        return _FileScan(None, sop_class)
    if "Rows" not in ds or "Columns" not in ds:
        # the UIDs tell whether an image series lost this file (e.g. a truncated header)
        return _FileScan(None, sop_class, False, str(ds.get("Modality", "") or ""),
                         str(ds.get("StudyInstanceUID", "") or ""),
                         str(ds.get("SeriesInstanceUID", "") or ""))
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    header = _file_header(path, ds) if study_uid and series_uid else None
    return _FileScan(None, sop_class, True, "", study_uid, series_uid, header)


def _scan_chunk(names: list[str]) -> list[_FileScan]:
    """:func:`_scan_file` over consecutive paths (the unit of work of a worker process)."""
    return [_scan_file(Path(name)) for name in names]


#: Fewest files for which headers are read by worker processes; below it, starting them
#: costs more than they save (~50 ms with fork, ~0.5 s with spawn).
PARALLEL_MIN_FILES = 200
#: Most worker processes: two give x1.8 on 2 cores; beyond four the main process, which
#: gathers the results, becomes the bottleneck.
MAX_WORKERS = 4


def _n_workers(n_files: int, workers: int | None) -> int:
    if workers is not None:
        return max(1, int(workers))
    if n_files < PARALLEL_MIN_FILES:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (SLURM, taskset)
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


def _mp_context() -> Any:
    """fork (no re-import of pydicom per worker) when it is safe: Linux, one thread alive."""
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods \
            and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _scan_files(paths: Sequence[Path], workers: int | None = None) -> Iterator[_FileScan]:
    """:func:`_scan_file` of every path, in order; in `workers` processes when worth it.

    Results arrive in chunks as the workers finish them, so the caller's loop runs while
    they read on. If the process pool cannot start or breaks, the rest is read serially.
    """
    n = _n_workers(len(paths), workers)
    if n <= 1:
        yield from map(_scan_file, paths)
        return
    size = max(16, min(256, len(paths) // (8 * n)))
    chunks = [[os.fspath(p) for p in paths[i:i + size]] for i in range(0, len(paths), size)]
    done = 0
    try:
        pool = ProcessPoolExecutor(max_workers=n, mp_context=_mp_context())
        try:
            for results in pool.map(_scan_chunk, chunks):
                done += len(results)
                yield from results
        finally:  # the caller may stop early (an error): do not read the rest first
            pool.shutdown(wait=True, cancel_futures=True)
    except (OSError, BrokenProcessPool) as err:
        log.warning("reading headers in %d processes failed (%s); reading the remaining %d "
                    "files in this process", n, err, len(paths) - done)
        yield from map(_scan_file, paths[done:])


@dataclass(frozen=True)
class Agreement:
    """Whether the files of one series are one acquisition (:func:`series_agreement`).

    Attributes
    ----------
    kept : tuple of FileHeader
        The files to stack (all of them when they agree or when no majority exists).
    dropped : tuple of (FileHeader, str)
        Files left out, with what differs.
    refusal : str or None
        Why the series as a whole is refused (no strict majority), else None.
    """

    kept: tuple[FileHeader, ...]
    dropped: tuple[tuple[FileHeader, str], ...] = ()
    refusal: str | None = None


def _agreement_key(header: FileHeader, with_echo: bool) -> tuple[Any, ...]:
    frame = header.frames[0] if header.frames else None
    echo: tuple[Any, ...] = ()
    if with_echo and frame is not None:
        echo = (("EchoTime", dicom_frames.timing_text(frame.echo_time_ms)),
                ("ImageType", "\\".join(frame.image_type)))
    return (header.signature + echo, header.identity)


def _key_difference(odd: tuple[Any, ...], common: tuple[Any, ...],
                    others: str = "the others") -> str:
    """What differs between two agreement keys, in words (never a name or an ID)."""
    parts = []
    common_values = dict(common[0])
    for tag, value in odd[0]:
        other = common_values.get(tag, "")
        if value != other:
            parts.append(f"{tag} {value or 'missing'} ({others}: {other or 'missing'})")
    if odd[1] != common[1]:
        fields = [tag for tag, a, b in zip(IDENTITY_TAGS, odd[1].values, common[1].values,
                                           strict=True) if a != b]
        parts.append(f"another patient ({', '.join(fields)} differ)")
    return "; ".join(parts)


def series_agreement(headers: Sequence[FileHeader], name: Any = None) -> Agreement:
    """Check that the files of one series are one acquisition of one patient.

    Files must share the acquisition signature (:data:`pipeline.io.dicom_frames.SIGNATURE_TAGS`:
    modality, SOP class, scanning sequence and variant, sequence name, 2D/3D, TR, TI) and the
    patient identity; when every file is one slice at its own position (the series is one
    volume, nothing tells echoes apart), also EchoTime and ImageType. Geometry (orientation,
    matrix, pixel spacing) is checked per volume afterwards.

    Rule: files that differ from a strict majority of the series' files are left out of it
    (each is reported with what differs); without a strict majority the series is refused.

    Parameters
    ----------
    name : callable, optional
        Path -> the text naming a file (default: its name).
    """
    headers = list(headers)
    label = name or (lambda p: p.name)
    if len(headers) < 2:
        return Agreement(tuple(headers))
    frames = [f for h in headers for f in h.frames]
    single = all(len(h.frames) == 1 and h.frames[0].kind == "single" for h in headers)
    positions = {dicom_frames.position_key(f) for f in frames}
    with_echo = single and None not in positions and len(positions) == len(frames)
    keys = [_agreement_key(h, with_echo) for h in headers]
    counts = Counter(keys)
    if len(counts) == 1:
        return Agreement(tuple(headers))
    (common, n_common), = counts.most_common(1)
    if 2 * n_common > len(headers):
        kept = tuple(h for h, k in zip(headers, keys, strict=True) if k == common)
        dropped = tuple(
            (h, f"{_key_difference(k, common)}, unlike the other {n_common} of the "
                f"{len(headers)} files of the series: another acquisition carrying the same "
                "SeriesInstanceUID")
            for h, k in zip(headers, keys, strict=True) if k != common)
        return Agreement(kept, dropped)
    first_odd = next(h for h, k in zip(headers, keys, strict=True) if k != keys[0])
    difference = _key_difference(_agreement_key(first_odd, with_echo), keys[0],
                                 label(headers[0].path))
    geometry = ""
    if all(f.orientation is not None and f.pixel_spacing_mm is not None for f in frames):
        mixed = dicom_frames.mixed_geometry(frames, lambda f: label(f.path))
        geometry = f"; {mixed[1]}" if mixed is not None else ""
    return Agreement(tuple(headers), (), (
        f"its {len(headers)} files are not one acquisition ({len(counts)} kinds, none a "
        f"majority): {label(first_odd.path)} has {difference}{geometry}; nothing is "
        "stacked: re-export the series"))


def _volume_geometry(frames: Sequence[FrameInfo],
                     rel: Any = None) -> tuple[dict[str, Any], str | None]:
    """Orientation, matrix and spacing of one volume and, if it cannot be a volume, why not.

    `rel` turns a path into the text naming it in messages (default: the file name).
    """
    first = frames[0]
    info: dict[str, Any] = {"orientation": None, "rows": first.rows, "columns": first.columns,
                            "pixel_spacing_mm": first.pixel_spacing_mm,
                            "slice_spacing_mm": None, "n_positions": 0}
    missing = [f for f in frames if f.orientation is None or f.position is None
               or f.pixel_spacing_mm is None]
    name = rel or (lambda p: p.name)

    def frame_name(frame: FrameInfo) -> str:
        return name(frame.path) if frame.kind == "single" else \
            f"{name(frame.path)} (frame {frame.frame + 1})"

    if missing:
        return info, (f"{len(missing)} of {len(frames)} images lack ImageOrientationPatient, "
                      "ImagePositionPatient or PixelSpacing (not a volume slice; first: "
                      f"{frame_name(missing[0])})")
    iops = np.array([f.orientation for f in frames], dtype=float)
    try:
        info["orientation"] = orientation_label(iops[0])
    except ValueError as err:
        return info, f"{frame_name(frames[0])}: {err}"
    mixed = dicom_frames.mixed_geometry(frames, frame_name)
    if mixed is not None:
        return info, mixed[1]
    normal = slice_normal(iops[0])
    ordered = sorted(frames, key=lambda f: float(np.dot(f.position, normal)))  # type: ignore[arg-type]
    proj = np.array([np.dot(f.position, normal) for f in ordered])  # type: ignore[arg-type]
    steps = np.diff(proj)
    distinct = steps[steps > dicom_frames.DUPLICATE_TOLERANCE_MM]
    if distinct.size:
        info["slice_spacing_mm"] = float(np.median(distinct))
    n_positions = distinct.size + 1
    info["n_positions"] = n_positions
    if n_positions < MIN_SLICES:
        return info, (f"only {n_positions} distinct slice position(s); a volume needs at "
                      f"least {MIN_SLICES}")
    # one slice per position (repeats are the converter's: identical ones are dropped there)
    keep = [0] + [i + 1 for i, step in enumerate(steps)
                  if step > dicom_frames.DUPLICATE_TOLERANCE_MM]
    irregular = dicom_frames.stack_problem(
        np.array([ordered[i].position for i in keep], dtype=float), normal,
        [frame_name(ordered[i]) for i in keep])
    if irregular is not None:
        return info, irregular[1]
    return info, None


def _series_volumes(
    headers: list[FileHeader], first: pydicom.Dataset, rel: Any = None,
) -> tuple[dict[str, Any], str | None, str, tuple[VolumeRecord, ...]]:
    """Geometry of a series, why it cannot be converted (None if it can), its sequence class
    and its volumes (:func:`pipeline.io.dicom_frames.split_volumes`)."""
    info: dict[str, Any] = {"orientation": None, "rows": headers[0].rows,
                            "columns": headers[0].columns,
                            "pixel_spacing_mm": headers[0].pixel_spacing_mm,
                            "slice_spacing_mm": None}
    broken = [h for h in headers if h.frame_error]
    if broken:
        first_name = rel(broken[0].path) if rel else broken[0].path.name
        return info, f"{len(broken)} file(s) (first: {first_name}): " \
            f"{broken[0].frame_error}", \
            classify_sequence(first), ()
    frames = [f for h in headers for f in h.frames]
    groups = dicom_frames.split_volumes(frames)
    volumes: list[VolumeRecord] = []
    geometry: dict[str, Any] | None = None
    for group in groups:
        volume_info, refusal = _volume_geometry(group.frames, rel)
        seq_class = classify_sequence(dicom_frames.volume_header(first, group))
        volumes.append(VolumeRecord(group.label, seq_class, len(group.frames),
                                    volume_info["n_positions"],
                                    "refused" if refusal else "ok", refusal or ""))
        if geometry is None or (refusal is None and geometry.get("_refused")):
            geometry = volume_info | {"_refused": refusal is not None}
    assert geometry is not None
    info.update({k: v for k, v in geometry.items() if k in info})
    usable = [v for v in volumes if v.status == "ok"]
    sequence_class = usable[0].sequence_class if usable else volumes[0].sequence_class
    if not usable:
        reasons = sorted({v.reason for v in volumes})
        prefix = "" if len(volumes) == 1 else f"all {len(volumes)} volumes refused: "
        return info, prefix + "; ".join(reasons), sequence_class, tuple(volumes)
    return info, None, sequence_class, tuple(volumes)


def index_folder(input_dir: Path, *, workers: int | None = None) -> IndexResult:
    """Index every file under `input_dir` (read-only) by study and series.

    Parameters
    ----------
    input_dir : Path
        Folder of a DICOM export; any nesting, any file names, extensions optional.
    workers : int, optional
        Processes reading headers. Default: one for fewer than :data:`PARALLEL_MIN_FILES`
        files, else up to :data:`MAX_WORKERS` (the CPUs available). 1 reads in this process;
        more forces worker processes. The result does not depend on it.

    Returns
    -------
    IndexResult
        Series records (status 'skipped' or 'refused' until :func:`select_sessions` and
        :func:`annotate_status` decide which are used) and the problem list.
    """
    input_dir = Path(input_dir).resolve()
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist or is not a folder")
    problems: list[Problem] = []
    # a series is keyed by its study date too: an export that reuses UIDs on two dates
    # holds two series (and two studies), never one stack of both
    by_series: dict[tuple[str, str, str], list[FileHeader]] = defaultdict(list)
    seen_sops: dict[str, Path] = {}
    # files of a series without Rows/Columns, with their SOP class (see the refusal below)
    lost: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    walk_problems: list[tuple[Path, str]] = []
    paths = _walk(input_dir, walk_problems)
    n_dicom = 0

    def rel(p: Path) -> str:
        try:
            return p.relative_to(input_dir).as_posix()
        except ValueError:
            return p.as_posix()

    problems.extend(Problem(rel(p), why) for p, why in walk_problems)
    # headers are read (in worker processes for large folders) by _scan_file, which keeps
    # the per-file values (FileHeader); the loop below sees the files in sorted order
    for path, scan in zip(paths, _scan_files(paths, workers), strict=True):
        if scan.problem is not None:
            problems.append(Problem(rel(path), scan.problem))
            continue
        n_dicom += 1
        sop_class = scan.sop_class
        if sop_class == DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
            problems.append(Problem(rel(path), "DICOMDIR (directory file, not an image)"))
            continue
        if not scan.is_image:
            kind = scan.modality or "unknown modality"
            problems.append(Problem(rel(path), f"not an image (no pixel data; {kind}, "
                                    f"SOP class {sop_class or 'unknown'})"))
            if scan.series_uid:
                lost[(scan.study_uid, scan.series_uid)].append((rel(path), sop_class))
            continue
        study_uid = scan.study_uid
        series_uid = scan.series_uid
        if not study_uid or not series_uid:
            problems.append(Problem(rel(path), "missing StudyInstanceUID or SeriesInstanceUID"))
            continue
        header = scan.header
        assert header is not None
        if header.sop_uid and header.sop_uid in seen_sops:
            problems.append(Problem(rel(path), "duplicate of " + rel(seen_sops[header.sop_uid])
                                    + " (same SOPInstanceUID); ignored"))
            continue
        if header.sop_uid:
            seen_sops[header.sop_uid] = path
        by_series[(study_uid, series_uid, header.study_date or "")].append(header)

    records: list[SeriesRecord] = []
    for (study_uid, series_uid, _date), all_headers in by_series.items():
        agreement = series_agreement(all_headers, lambda p: rel(p))
        headers = list(agreement.kept)
        # the first file's header (sorted paths) stands for the series; it is read again in
        # full here (once per series) because workers send back only FileHeaders
        first: pydicom.Dataset | None = None
        while headers and first is None:
            try:
                first = _read_header(headers[0].path)
            except Exception as err:  # noqa: BLE001 - changed since it was scanned
                problems.append(Problem(rel(headers[0].path), f"unreadable DICOM header "
                                        f"({type(err).__name__}: {err})"))
                headers.pop(0)
        if first is None:
            continue
        number = int_or_none(_safe_get(first, "SeriesNumber"))
        series_name = (f"series #{'?' if number is None else number} "
                       f"'{str(_safe_get(first, 'SeriesDescription', '') or '').strip()}'")
        for odd, why in agreement.dropped:
            problems.append(Problem(rel(odd.path), f"left out of {series_name} (not stacked "
                                    f"with it): {why}"))
        try:
            geometry, refusal, sequence_class, volumes = _series_volumes(headers, first, rel)
            modality = str(first.get("Modality", "") or "")
        except Exception as err:  # noqa: BLE001 - a corrupt value of the series' first header
            geometry = {"orientation": None, "rows": None, "columns": None,
                        "pixel_spacing_mm": None, "slice_spacing_mm": None}
            refusal = (f"unreadable header value in {headers[0].path.name} "
                       f"({type(err).__name__}: {err})")
            sequence_class, volumes, modality = "other", (), ""
        if agreement.refusal:
            refusal = agreement.refusal
        image_class = str(_safe_get(first, "SOPClassUID", "") or "")
        partial = [name for name, sop in lost.get((study_uid, series_uid), ())
                   if sop == image_class]
        if partial:
            # an image file of the series whose header ends early (truncated, corrupt): the
            # volume would silently lack its slice, so the series is not used (the first cause
            # of what else is wrong with it, e.g. the gap it leaves)
            refusal = (f"{len(partial)} file(s) of the series have an incomplete image header "
                       f"(first: {partial[0]}; see problems.tsv): truncated or corrupt; "
                       "re-export the series")
        status, reason = ("refused", refusal) if refusal else ("skipped", "")
        if not refusal and modality != "MR":
            status, reason = "skipped", f"modality {modality or 'missing'} (only MR is analysed)"
        identity = Counter(h.identity for h in headers).most_common(1)[0][0]
        records.append(SeriesRecord(
            study_uid=study_uid,
            study_date=parse_dicom_date(_safe_get(first, "StudyDate")),
            study_time=parse_dicom_time(_safe_get(first, "StudyTime")),
            series_uid=series_uid,
            series_number=int_or_none(_safe_get(first, "SeriesNumber")),
            series_description=str(_safe_get(first, "SeriesDescription", "") or "").strip(),
            modality=modality,
            sequence_class=sequence_class,
            orientation=geometry["orientation"],
            n_files=len(headers),
            rows=geometry["rows"],
            columns=geometry["columns"],
            pixel_spacing_mm=geometry["pixel_spacing_mm"],
            slice_spacing_mm=geometry["slice_spacing_mm"],
            status=status,
            reason=reason,
            files=tuple(sorted(h.path for h in headers)),
            volumes=volumes,
            identity=identity,
        ))
    patients = group_patients(records)
    records = assign_patients(records, patients)
    warnings = _reused_study_uids(records)
    records.sort(key=lambda r: (r.study_date or "9999", r.study_time or "", r.study_uid,
                                r.patient_fingerprint,
                                r.series_number if r.series_number is not None else 1 << 30,
                                r.series_uid))
    return IndexResult(input_dir=input_dir, series=tuple(records), problems=tuple(problems),
                       n_files_seen=len(paths), n_files_dicom=n_dicom,
                       patients=tuple(patients), warnings=tuple(warnings))


def _reused_study_uids(records: Sequence[SeriesRecord]) -> list[str]:
    """Warnings for StudyInstanceUIDs found on several dates or patients (kept apart)."""
    keys: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for record in records:
        keys[record.study_uid].add((record.study_date or "no date", record.patient_fingerprint))
    warnings = []
    for _uid, found in sorted(keys.items()):
        if len(found) > 1:
            dates = sorted({d for d, _ in found})
            patients = sorted({p for _, p in found})
            where = (f"dates {', '.join(dates)}" if len(dates) > 1 else f"date {dates[0]}") + \
                (f" and patients {', '.join(patients)}" if len(patients) > 1 else "")
            warnings.append(f"one StudyInstanceUID is carried by {len(found)} studies ({where}): "
                            "an export or anonymiser reused it; the studies are kept apart by "
                            "date and patient, each used or refused on its own")
    return warnings


# --------------------------------------------------------------------------------------------
# selection
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
        Output of :func:`index_folder` (of one patient: see :func:`choose_patient`). Records
        with status 'refused' or a non-MR modality are never picked. A study is
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
        study_uid = records[0].study_uid
        study_date = records[0].study_date
        study_time = min((r.study_time for r in records if r.study_time), default=None)
        fingerprint = records[0].patient_fingerprint
        usable = [c for r in records if r.status != "refused" and r.modality == "MR"
                  for c in _candidates(r)]
        problems: list[str] = []
        if study_date is None:
            problems.append("no valid StudyDate (the session label and day count need it)")

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
        anat_pick = anat[0] if anat else None

        fluid_pool = [r for r in usable if anat_pick is None
                      or (r.series_uid, r.volume) != (anat_pick.series_uid, anat_pick.volume)]
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

        if problems:
            refused.append({"study_uid": study_uid, "study_date": study_date,
                            "patient_fingerprint": fingerprint,
                            "reason": "; ".join(problems)})
            continue
        assert anat_pick is not None
        chosen.append({"session": "", "study_date": study_date, "study_time": study_time,
                       "study_uid": study_uid, "patient_fingerprint": fingerprint,
                       "anatomical": _series_entry(anat_pick),
                       "fluid": _series_entry(fluid[0])})

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
    return sessions, refused


def same_day_warnings(sessions: Sequence[dict[str, Any]]) -> list[str]:
    """A warning per date holding several sessions (each is measured on its own)."""
    by_date: dict[str, list[str]] = defaultdict(list)
    for session in sessions:
        by_date[session["study_date"]].append(session["session"])
    return [f"{len(labels)} studies on {date} are separate sessions ({', '.join(labels)}), "
            "labelled by study time" for date, labels in sorted(by_date.items())
            if len(labels) > 1]


def annotate_status(
    series: Iterable[SeriesRecord],
    sessions: Sequence[dict[str, Any]],
    refused_studies: Sequence[dict[str, Any]],
) -> list[SeriesRecord]:
    """Copies of `series` with status/reason saying whether and why each series is used."""
    used: dict[tuple[tuple[str, str, str], str], list[str]] = defaultdict(list)
    for session in sessions:
        for role, text in (("anatomical", "anatomical"), ("fluid", "fluid-sensitive")):
            entry = session[role]
            volume = f" (volume {entry['volume']})" if entry.get("volume") else ""
            used[(_entry_key(session), entry["series_uid"])].append(
                f"{text}{volume} of session {session['session']}")
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
        The patient named by the user: a fingerprint (:func:`patient_fingerprint`), or a
        PatientID (compared as :func:`normalise_patient_id`; every patient carrying that ID
        is taken, e.g. one whose name was spelt differently in a later study). Empty: the
        folder must hold one patient.

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
# command line
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
        volume = f" [{entry['volume']}]" if entry.get("volume") else ""
        return f"#{entry['series_number']} {entry['description']}{volume}".strip()

    write_tsv_atomic(out_dir / "sessions.tsv", [
        {"session": s["session"], "study_date": s["study_date"],
         "anatomical_series": describe(s["anatomical"]), "fluid_series": describe(s["fluid"])}
        for s in sessions], SESSION_COLUMNS)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 when at least one session is usable;
    1 when none is, or when the folder holds several patients and none is named; 2 for
    wrong arguments)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.io.dicom_index",
        description="Index a DICOM export folder and select the series to analyse per study.")
    parser.add_argument("--input-dir", required=True, type=Path,
                        help="folder of the DICOM export (read-only)")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the outputs")
    parser.add_argument("--anatomical-regex", default=None,
                        help="SeriesInstanceUID or regex on SeriesDescription of the anatomical "
                             "(T1-weighted) series")
    parser.add_argument("--fluid-regex", default=None,
                        help="SeriesInstanceUID or regex on SeriesDescription of the "
                             "fluid-sensitive series")
    parser.add_argument("--patient", default=None,
                        help="the patient to use when the folder holds several: its "
                             "fingerprint (as listed when the index refuses the folder) or "
                             "its PatientID; the other patients' studies are listed as not "
                             "used")
    parser.add_argument("--show-phi", action="store_true",
                        help="list PatientID, name and birth date in the table of patients "
                             "printed when a folder holds several (never in output files)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    for name, pattern in (("--anatomical-regex", args.anatomical_regex),
                          ("--fluid-regex", args.fluid_regex)):
        if pattern:
            try:
                re.compile(pattern)
            except re.error as err:
                print(f"ERROR {name} {pattern!r} is not a valid regular expression: {err}",
                      file=sys.stderr)
                return 2
    input_dir: Path = args.input_dir
    if not input_dir.is_dir():
        print(f"ERROR {input_dir}: input folder does not exist or is not a folder",
              file=sys.stderr)
        return 2
    if is_within(args.out_dir, input_dir):
        print(f"ERROR {args.out_dir}: the output folder lies inside the input folder "
              f"{input_dir}, which is read-only to the workflow; choose another --out-dir",
              file=sys.stderr)
        return 2

    result = index_folder(input_dir)
    series, chosen, not_used, patient_error = split_by_patient(result, args.patient)
    sessions, refused = select_sessions(series, args.anatomical_regex, args.fluid_regex)
    refused = refused + not_used
    warnings = [*result.warnings, *patient_warnings(chosen), *same_day_warnings(sessions)]
    write_outputs(result, sessions, refused, args.out_dir, chosen=chosen, warnings=warnings)
    log.info("%s: %d files, %d DICOM, %d series, %d problem files, %d patient(s), "
             "%d sessions, %d studies refused", result.input_dir, result.n_files_seen,
             result.n_files_dicom, len(result.series), len(result.problems),
             len(result.patients), len(sessions), len(refused))
    for warning in warnings:
        log.warning("%s", warning)
    if patient_error:
        print(f"ERROR {result.input_dir}: {patient_error}. Name the patient to use with the "
              "config key `patient` (index: --patient), giving its fingerprint or its "
              "PatientID; the other patients' studies are then listed as not used. Patients "
              f"in the folder:\n{patients_table(result.patients, args.show_phi)}",
              file=sys.stderr)
        return 1
    if len(result.patients) > 1:
        log.info("patients in the folder:\n%s", patients_table(
            result.patients, args.show_phi, (g.fingerprint for g in chosen)))
    if not sessions:
        if not result.series:
            why = (f"no DICOM image series found ({result.n_files_seen} files, "
                   f"{len(result.problems)} listed in problems.tsv)")
        else:
            listed = [f"study {r['study_date'] or 'without date'}: {r['reason']}"
                      for r in refused[:5]]
            if len(refused) > 5:
                listed.append(f"{len(refused) - 5} more studies in sessions.json")
            why = ("no study with both a T1-weighted and a fluid-sensitive series and a valid "
                   "study date (" + "; ".join(listed) + ")")
        print(f"ERROR {result.input_dir}: {why}. See {args.out_dir / 'index.tsv'}; "
              "--anatomical-regex / --fluid-regex can name the series explicitly.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
