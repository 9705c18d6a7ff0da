"""Patient identity: normalising PatientID, name and birth date, the pseudonymous fingerprint,
and grouping the studies of a folder into patients (:func:`group_patients`).

No name, ID or birth date leaves this module except through :func:`patient_fingerprint`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.io.dicom_values import parse_dicom_date

if TYPE_CHECKING:
    from pipeline.io.records import SeriesRecord


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
        Most studies first, then by fingerprint
        (:func:`pipeline.io.selection.patient_warnings` says what was assumed).
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
