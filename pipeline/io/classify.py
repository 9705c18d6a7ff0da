"""Sequence class of an MR series from its header (:func:`classify_sequence`: T1w, STIR, T2FS,
Dixon parts, ...) and slice orientation (:func:`orientation_label`: axial, coronal, ...)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.io import dicom_frames
from pipeline.io.files import finite_float

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
SEQUENCE_CLASSES: tuple[str, ...] = (
    "T1w", "STIR", "T2FS", "dixon_water", "dixon_fat", "dixon_in", "dixon_opp",
    "post_contrast", "localizer", "derived", "other",
)


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
    tr = finite_float(getattr(ds, "RepetitionTime", None))
    te = finite_float(getattr(ds, "EchoTime", None))
    ti = finite_float(getattr(ds, "InversionTime", None))
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
