"""Index a DICOM export folder and pick, per study, the series the workflow analyses.

Every file under the input folder is opened once, header only
(``pydicom.dcmread(path, stop_before_pixels=True)``). Files that are not DICOM images
(text files, ``DICOMDIR``, structured reports, empty files, ...) are listed as problems, never
silently dropped. Image files are grouped by StudyInstanceUID and SeriesInstanceUID; each
series gets a sequence class (:func:`classify_sequence`), an orientation and a geometry
summary. :func:`select_sessions` then picks, per study, one anatomical (T1-weighted) and one
fluid-sensitive series (STIR, else T2 fat-saturated, else Dixon water).

The input folder is read-only: nothing is ever written into it.

Command line::

    python -m pipeline.dicom_index --input-dir DIR --out-dir OUT \
        [--anatomical-regex R] [--fluid-regex R]

writes ``index.tsv``, ``problems.tsv``, ``sessions.json`` and ``sessions.tsv`` into OUT.
No patient name, ID or birth date reaches any output.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.io_utils import write_json_atomic, write_tsv_atomic

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
    "columns", "pixel_spacing_mm", "slice_spacing_mm", "status", "reason",
)
PROBLEM_COLUMNS: tuple[str, ...] = ("path", "problem")
SESSION_COLUMNS: tuple[str, ...] = ("session", "study_date", "anatomical_series", "fluid_series")


@dataclass(frozen=True)
class FileHeader:
    """Geometry-relevant header values of one image file (all lengths in mm)."""

    path: Path
    sop_uid: str | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient, 6 direction cosines
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm (LPS)
    pixel_spacing_mm: tuple[float, float] | None  # (row spacing, column spacing)
    rows: int | None
    columns: int | None
    n_frames: int


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

    def as_row(self) -> dict[str, Any]:
        """The record as an ``index.tsv`` row (everything but the file list)."""
        row = {c: getattr(self, c) for c in INDEX_COLUMNS}
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


def _tokens(value: Any) -> list[str]:
    """A (possibly multi-valued) code string as upper-case tokens."""
    if value is None:
        return []
    if isinstance(value, str):
        items: Iterable[Any] = value.split("\\")
    elif isinstance(value, Iterable):
        items = value
    else:
        items = [value]
    return [str(v).strip().upper() for v in items if str(v).strip()]


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


def _dixon_kind(image_type: list[str], description: str) -> str | None:
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
    image_type = _tokens(getattr(ds, "ImageType", None))
    scanning = set(_tokens(getattr(ds, "ScanningSequence", None)))
    options = set(_tokens(getattr(ds, "ScanOptions", None)))
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
    if image_type[:1] == ["DERIVED"] or _DERIVED_TOKENS.intersection(image_type[2:]):
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

def _read_header(path: Path) -> pydicom.Dataset:
    """Header of `path` (no pixel data). Raises InvalidDicomError for non-DICOM files.

    Files without the 128-byte preamble (old exports) are accepted when, parsed leniently,
    they carry the UIDs of a DICOM object.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    if not ("SOPClassUID" in ds and ("SeriesInstanceUID" in ds
                                      or "DirectoryRecordSequence" in ds)):
        raise InvalidDicomError("no DICOM preamble and no DICOM identifiers")
    return ds


def _file_header(path: Path, ds: pydicom.Dataset) -> FileHeader:
    iop = floats_or_none(ds.get("ImageOrientationPatient"), 6)
    ipp = floats_or_none(ds.get("ImagePositionPatient"), 3)
    spacing = floats_or_none(ds.get("PixelSpacing"), 2)
    return FileHeader(
        path=path,
        sop_uid=str(ds.get("SOPInstanceUID", "")) or None,
        orientation=iop,
        position=ipp,  # type: ignore[arg-type]
        pixel_spacing_mm=spacing,  # type: ignore[arg-type]
        rows=int_or_none(ds.get("Rows")),
        columns=int_or_none(ds.get("Columns")),
        n_frames=int_or_none(ds.get("NumberOfFrames")) or 1,
    )


#: Files at the top of a study folder that belong to limbtrack, not to the DICOM export.
COMPANION_FILES = ("events.tsv",)


def _walk(input_dir: Path) -> list[Path]:
    """All regular files under `input_dir` (any nesting, hidden ones too), sorted.

    The companion files at the top level (``events.tsv``: clinical events) are left out.
    """
    paths: list[Path] = []
    for root, dirs, files in os.walk(input_dir, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if Path(root) == Path(input_dir) and name in COMPANION_FILES:
                continue
            if path.is_file():
                paths.append(path)
    return paths


def _series_geometry(headers: list[FileHeader]) -> tuple[dict[str, Any], str | None]:
    """Orientation, matrix and spacing of a series and, if it cannot be a volume, why not."""
    info: dict[str, Any] = {"orientation": None, "rows": headers[0].rows,
                            "columns": headers[0].columns,
                            "pixel_spacing_mm": headers[0].pixel_spacing_mm,
                            "slice_spacing_mm": None}
    if any(h.n_frames > 1 for h in headers):
        return info, ("enhanced multi-frame DICOM is not supported yet; export classic "
                      "single-frame images or convert this series with dcm2niix")
    missing = [h for h in headers if h.orientation is None or h.position is None
               or h.pixel_spacing_mm is None]
    if missing:
        return info, (f"{len(missing)} of {len(headers)} files lack ImageOrientationPatient, "
                      "ImagePositionPatient or PixelSpacing (not a volume slice)")
    iops = np.array([h.orientation for h in headers], dtype=float)
    try:
        info["orientation"] = orientation_label(iops[0])
    except ValueError as err:
        return info, str(err)
    if np.max(np.abs(iops - iops[0])) > 1e-4:
        return info, "mixed slice orientations in one series (e.g. a 3-plane localizer)"
    if len({(h.rows, h.columns) for h in headers}) > 1:
        return info, "mixed image matrix sizes in one series"
    normal = slice_normal(iops[0])
    proj = np.sort(np.array([np.dot(h.position, normal) for h in headers]))  # type: ignore[arg-type]
    steps = np.diff(proj)
    distinct = steps[steps > 1e-3]
    if distinct.size:
        info["slice_spacing_mm"] = float(np.median(distinct))
    n_positions = distinct.size + 1
    if n_positions < MIN_SLICES:
        return info, (f"only {n_positions} distinct slice position(s); a volume needs at "
                      f"least {MIN_SLICES}")
    if len(headers) % n_positions == 0 and len(headers) // n_positions >= 2:
        per_pos = len(headers) // n_positions
        return info, (f"{len(headers)} images at {n_positions} positions ({per_pos} per "
                      "position: several echoes, phases or repeats in one series); export "
                      "them as separate series")
    return info, None


def index_folder(input_dir: Path) -> IndexResult:
    """Index every file under `input_dir` (read-only) by study and series.

    Parameters
    ----------
    input_dir : Path
        Folder of a DICOM export; any nesting, any file names, extensions optional.

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
    by_series: dict[tuple[str, str], list[FileHeader]] = defaultdict(list)
    first_header: dict[tuple[str, str], pydicom.Dataset] = {}
    seen_sops: dict[str, Path] = {}
    paths = _walk(input_dir)
    n_dicom = 0

    def rel(p: Path) -> str:
        return p.relative_to(input_dir).as_posix()

    for path in paths:
        try:
            if path.stat().st_size == 0:
                problems.append(Problem(rel(path), "empty file (0 bytes)"))
                continue
            ds = _read_header(path)
        except InvalidDicomError:
            problems.append(Problem(rel(path), "not a DICOM file"))
            continue
        except Exception as err:  # noqa: BLE001 - a broken file must not stop the index
            problems.append(Problem(rel(path), f"unreadable DICOM header ({type(err).__name__}: "
                                    f"{err})"))
            continue
        n_dicom += 1
        sop_class = str(ds.get("SOPClassUID", "") or getattr(
            getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if sop_class == DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
            problems.append(Problem(rel(path), "DICOMDIR (directory file, not an image)"))
            continue
        if "Rows" not in ds or "Columns" not in ds:
            kind = ds.get("Modality", "") or "unknown modality"
            problems.append(Problem(rel(path), f"not an image (no pixel data; {kind}, "
                                    f"SOP class {sop_class or 'unknown'})"))
            continue
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not study_uid or not series_uid:
            problems.append(Problem(rel(path), "missing StudyInstanceUID or SeriesInstanceUID"))
            continue
        header = _file_header(path, ds)
        if header.sop_uid and header.sop_uid in seen_sops:
            problems.append(Problem(rel(path), "duplicate of " + rel(seen_sops[header.sop_uid])
                                    + " (same SOPInstanceUID); ignored"))
            continue
        if header.sop_uid:
            seen_sops[header.sop_uid] = path
        key = (study_uid, series_uid)
        if key not in first_header:
            # the first file's header (sorted paths) stands for the series
            first_header[key] = ds
        by_series[key].append(header)

    records: list[SeriesRecord] = []
    for (study_uid, series_uid), headers in by_series.items():
        first = first_header[(study_uid, series_uid)]
        geometry, refusal = _series_geometry(headers)
        modality = str(first.get("Modality", "") or "")
        status, reason = ("refused", refusal) if refusal else ("skipped", "")
        if not refusal and modality != "MR":
            status, reason = "skipped", f"modality {modality or 'missing'} (only MR is analysed)"
        records.append(SeriesRecord(
            study_uid=study_uid,
            study_date=parse_dicom_date(first.get("StudyDate")),
            study_time=parse_dicom_time(first.get("StudyTime")),
            series_uid=series_uid,
            series_number=int_or_none(first.get("SeriesNumber")),
            series_description=str(first.get("SeriesDescription", "") or "").strip(),
            modality=modality,
            sequence_class=classify_sequence(first),
            orientation=geometry["orientation"],
            n_files=len(headers),
            rows=geometry["rows"],
            columns=geometry["columns"],
            pixel_spacing_mm=geometry["pixel_spacing_mm"],
            slice_spacing_mm=geometry["slice_spacing_mm"],
            status=status,
            reason=reason,
            files=tuple(sorted(h.path for h in headers)),
        ))
    records.sort(key=lambda r: (r.study_date or "9999", r.study_time or "", r.study_uid,
                                r.series_number if r.series_number is not None else 1 << 30,
                                r.series_uid))
    return IndexResult(input_dir=input_dir, series=tuple(records), problems=tuple(problems),
                       n_files_seen=len(paths), n_files_dicom=n_dicom)


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


def _series_entry(record: SeriesRecord) -> dict[str, Any]:
    return {
        "series_uid": record.series_uid,
        "series_number": record.series_number,
        "description": record.series_description,
        "sequence_class": record.sequence_class,
        "orientation": record.orientation,
        "n_files": record.n_files,
        "files": [str(p) for p in record.files],
    }


def select_sessions(
    series: Iterable[SeriesRecord],
    anatomical_regex: str | None = None,
    fluid_regex: str | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pick one anatomical and one fluid-sensitive series per study.

    Parameters
    ----------
    series : iterable of SeriesRecord
        Output of :func:`index_folder`. Records with status 'refused' or a non-MR modality
        are never picked.
    anatomical_regex, fluid_regex : str, optional
        Overrides: an exact SeriesInstanceUID or a regular expression searched
        (case-insensitive) in SeriesDescription. When given, only matching series qualify;
        otherwise the class decides (T1w; STIR, else T2FS, else dixon_water).

    Returns
    -------
    sessions : list of dict
        Sorted by study date (then time); keys ``session``, ``study_date``, ``study_time``,
        ``study_uid``, ``anatomical`` and ``fluid`` (series entries with absolute file paths).
        The session label is the study date ``YYYYMMDD``; studies sharing a date get
        ``T`` + ``HHMMSS`` of their study time appended.
    refused_studies : list of dict
        ``study_uid``, ``study_date`` (ISO or None) and ``reason`` of studies not used.
    """
    by_study: dict[str, list[SeriesRecord]] = defaultdict(list)
    for record in series:
        by_study[record.study_uid].append(record)

    chosen: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    for study_uid, records in by_study.items():
        study_date = records[0].study_date
        study_time = records[0].study_time
        usable = [r for r in records if r.status != "refused" and r.modality == "MR"]
        problems: list[str] = []
        if study_date is None:
            problems.append("no valid StudyDate (the session label and day count need it)")

        if anatomical_regex:
            anat = [r for r in usable if _override_matches(r, anatomical_regex)]
            if not anat:
                problems.append(f"no usable series matches the anatomical override "
                                f"{anatomical_regex!r}")
        else:
            anat = [r for r in usable if r.sequence_class == ANATOMICAL_CLASS]
            if not anat:
                problems.append("no T1-weighted series")
        anat.sort(key=_rank_key)
        anat_pick = anat[0] if anat else None

        fluid_pool = [r for r in usable if r is not anat_pick]
        fluid: list[SeriesRecord] = []
        if fluid_regex:
            fluid = sorted((r for r in fluid_pool if _override_matches(r, fluid_regex)),
                           key=_rank_key)
            if not fluid:
                problems.append(f"no usable series matches the fluid override {fluid_regex!r}")
        else:
            for cls in FLUID_PREFERENCE:
                fluid = sorted((r for r in fluid_pool if r.sequence_class == cls), key=_rank_key)
                if fluid:
                    break
            if not fluid:
                problems.append("no fluid-sensitive series (STIR, T2 fat-sat or Dixon water)")

        if problems:
            refused.append({"study_uid": study_uid, "study_date": study_date,
                            "reason": "; ".join(problems)})
            continue
        assert anat_pick is not None
        chosen.append({"session": "", "study_date": study_date, "study_time": study_time,
                       "study_uid": study_uid, "anatomical": _series_entry(anat_pick),
                       "fluid": _series_entry(fluid[0])})

    chosen.sort(key=lambda s: (s["study_date"], s["study_time"] or "", s["study_uid"]))
    sessions: list[dict[str, Any]] = []
    per_date: dict[str, int] = defaultdict(int)
    for session in chosen:
        per_date[session["study_date"]] += 1
    labels: set[str] = set()
    for session in chosen:
        label = session["study_date"].replace("-", "")
        if per_date[session["study_date"]] > 1:
            label += "T" + (session["study_time"] or "").replace(":", "")
        if label in labels:
            refused.append({"study_uid": session["study_uid"],
                            "study_date": session["study_date"],
                            "reason": f"same study date and time as another study (session "
                                      f"{label}); the session cannot be labelled uniquely"})
            continue
        labels.add(label)
        session["session"] = label
        sessions.append(session)
    return sessions, refused


def annotate_status(
    series: Iterable[SeriesRecord],
    sessions: Sequence[dict[str, Any]],
    refused_studies: Sequence[dict[str, Any]],
) -> list[SeriesRecord]:
    """Copies of `series` with status/reason saying whether and why each series is used."""
    used: dict[str, str] = {}
    for session in sessions:
        used[session["anatomical"]["series_uid"]] = f"anatomical of session {session['session']}"
        used[session["fluid"]["series_uid"]] = f"fluid-sensitive of session {session['session']}"
    study_refusal = {s["study_uid"]: s["reason"] for s in refused_studies}
    result = []
    for record in series:
        if record.status == "refused":
            result.append(record)
        elif record.series_uid in used:
            result.append(dataclasses.replace(record, status="used",
                                              reason=used[record.series_uid]))
        elif record.study_uid in study_refusal:
            result.append(dataclasses.replace(
                record, status="skipped",
                reason=f"study not used: {study_refusal[record.study_uid]}"))
        else:
            result.append(dataclasses.replace(
                record, status="skipped",
                reason=record.reason or f"not selected ({record.sequence_class})"))
    return result


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def write_outputs(
    result: IndexResult,
    sessions: list[dict[str, Any]],
    refused_studies: list[dict[str, Any]],
    out_dir: Path,
) -> None:
    """Write index.tsv, problems.tsv, sessions.json and sessions.tsv atomically into `out_dir`."""
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
    })

    def describe(entry: dict[str, Any]) -> str:
        return f"#{entry['series_number']} {entry['description']}".strip()

    write_tsv_atomic(out_dir / "sessions.tsv", [
        {"session": s["session"], "study_date": s["study_date"],
         "anatomical_series": describe(s["anatomical"]), "fluid_series": describe(s["fluid"])}
        for s in sessions], SESSION_COLUMNS)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 when at least one session is usable)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dicom_index",
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
    if _is_within(args.out_dir, input_dir):
        print(f"ERROR {args.out_dir}: the output folder lies inside the input folder "
              f"{input_dir}, which is read-only to the workflow; choose another --out-dir",
              file=sys.stderr)
        return 2

    result = index_folder(input_dir)
    sessions, refused = select_sessions(result.series, args.anatomical_regex, args.fluid_regex)
    write_outputs(result, sessions, refused, args.out_dir)
    log.info("%s: %d files, %d DICOM, %d series, %d problem files, %d sessions, %d studies "
             "refused", result.input_dir, result.n_files_seen, result.n_files_dicom,
             len(result.series), len(result.problems), len(sessions), len(refused))
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
