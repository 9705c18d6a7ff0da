"""Scanning a DICOM export folder (:func:`index_folder`): walking it, reading every header once
(in worker processes for large folders), grouping the image files by study and series,
checking that the files of a series are one acquisition (:func:`series_agreement`) and make
volumes, and grouping the studies into patients."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import sys
import threading
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
from pipeline.io.classify import classify_sequence, orientation_label, slice_normal
from pipeline.io.dicom_frames import FrameInfo
from pipeline.io.dicom_values import int_or_none, parse_dicom_date, parse_dicom_time
from pipeline.io.files import walk_entries
from pipeline.io.headers import file_header, read_header, safe_get
from pipeline.io.identity import IDENTITY_TAGS, assign_patients, group_patients
from pipeline.io.records import FileHeader, IndexResult, Problem, SeriesRecord, VolumeRecord

log = logging.getLogger(__name__)


#: SOP Class UID of a DICOMDIR (Media Storage Directory Storage).
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Fewest slices that make a volume (one value for the index and the converter).
MIN_SLICES = dicom_frames.MIN_SLICES
#: Files at the top of a study folder that belong to limbtrack, not to the DICOM export.
COMPANION_FILES = ("events.tsv",)


# --------------------------------------------------------------------------------------------
# walking the folder
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# reading every header once (in worker processes for large folders)
# --------------------------------------------------------------------------------------------

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


def _scan_file(path: Path) -> _FileScan:
    """Read the header of `path` once and keep what :func:`index_folder` needs of it."""
    try:
        if path.stat().st_size == 0:
            return _FileScan("empty file (0 bytes)")
        ds = read_header(path)
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
    header = file_header(path, ds) if study_uid and series_uid else None
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


# --------------------------------------------------------------------------------------------
# one series: one acquisition, volumes, geometry
# --------------------------------------------------------------------------------------------

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
                            "slice_spacing_mm": None, "n_positions": 0, "x_range_mm": None}
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
    info["x_range_mm"] = _x_range_mm(frames)
    return info, None


def _x_range_mm(frames: Sequence[FrameInfo]) -> tuple[float, float]:
    """Left-right range (LPS x, mm) of the voxel centres of placed frames: where a series
    lies tells a one-leg field of view's side (:mod:`pipeline.io.split`)."""
    xs: list[float] = []
    for f in frames:
        assert f.orientation is not None and f.position is not None
        assert f.pixel_spacing_mm is not None
        last_col = ((f.columns or 1) - 1) * f.pixel_spacing_mm[1] * f.orientation[0]
        last_row = ((f.rows or 1) - 1) * f.pixel_spacing_mm[0] * f.orientation[3]
        xs += [f.position[0] + a + b for a in (0.0, last_col) for b in (0.0, last_row)]
    return min(xs), max(xs)


def _series_volumes(
    headers: list[FileHeader], first: pydicom.Dataset, rel: Any = None,
) -> tuple[dict[str, Any], str | None, str, tuple[VolumeRecord, ...]]:
    """Geometry of a series, why it cannot be converted (None if it can), its sequence class
    and its volumes (:func:`pipeline.io.dicom_frames.split_volumes`)."""
    info: dict[str, Any] = {"orientation": None, "rows": headers[0].rows,
                            "columns": headers[0].columns,
                            "pixel_spacing_mm": headers[0].pixel_spacing_mm,
                            "slice_spacing_mm": None, "x_range_mm": None}
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


# --------------------------------------------------------------------------------------------
# the folder: files -> series -> patients
# --------------------------------------------------------------------------------------------

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
        Series records (status 'skipped' or 'refused' until
        :func:`pipeline.io.selection.select_sessions` and
        :func:`pipeline.io.selection.annotate_status` decide which are used) and the problem
        list.
    """
    input_dir = Path(input_dir).resolve()
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist or is not a folder")

    def rel(p: Path) -> str:
        try:
            return p.relative_to(input_dir).as_posix()
        except ValueError:
            return p.as_posix()

    walk_problems: list[tuple[Path, str]] = []
    paths = _walk(input_dir, walk_problems)
    problems = [Problem(rel(p), why) for p, why in walk_problems]
    # headers are read (in worker processes for large folders) by _scan_file, which keeps
    # the per-file values (FileHeader); the files are seen in sorted order
    found = _sort_files(paths, _scan_files(paths, workers), rel, problems)
    records: list[SeriesRecord] = []
    for key, headers in found.by_series.items():
        record = _series_record(key, headers, found.lost, rel, problems)
        if record is not None:
            records.append(record)
    patients = group_patients(records)
    records = assign_patients(records, patients)
    warnings = _reused_study_uids(records)
    records.sort(key=_record_order)
    return IndexResult(input_dir=input_dir, series=tuple(records), problems=tuple(problems),
                       n_files_seen=len(paths), n_files_dicom=found.n_dicom,
                       patients=tuple(patients), warnings=tuple(warnings))


@dataclass
class _SortedFiles:
    """The image files of a folder by series, and what else the scan found."""

    #: a series is keyed by its study date too: an export that reuses UIDs on two dates
    #: holds two series (and two studies), never one stack of both
    by_series: dict[tuple[str, str, str], list[FileHeader]] = field(
        default_factory=lambda: defaultdict(list))
    #: files of a series without Rows/Columns, with their SOP class (see
    #: :func:`_incomplete_header_refusal`)
    lost: dict[tuple[str, str], list[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(list))
    #: files that parsed as DICOM
    n_dicom: int = 0


def _sort_files(paths: Sequence[Path], scans: Iterable[_FileScan], rel: Any,
                problems: list[Problem]) -> _SortedFiles:
    """The scanned files by series; each file that is no image of a series goes to
    `problems` with the reason (`rel` names a file)."""
    found = _SortedFiles()
    seen_sops: dict[str, Path] = {}
    for path, scan in zip(paths, scans, strict=True):
        if scan.problem is not None:
            problems.append(Problem(rel(path), scan.problem))
            continue
        found.n_dicom += 1
        sop_class = scan.sop_class
        if sop_class == DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
            problems.append(Problem(rel(path), "DICOMDIR (directory file, not an image)"))
            continue
        if not scan.is_image:
            kind = scan.modality or "unknown modality"
            problems.append(Problem(rel(path), f"not an image (no pixel data; {kind}, "
                                    f"SOP class {sop_class or 'unknown'})"))
            if scan.series_uid:
                found.lost[(scan.study_uid, scan.series_uid)].append((rel(path), sop_class))
            continue
        if not scan.study_uid or not scan.series_uid:
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
        found.by_series[(scan.study_uid, scan.series_uid, header.study_date or "")].append(
            header)
    return found


def _series_record(key: tuple[str, str, str], all_headers: list[FileHeader],
                   lost: dict[tuple[str, str], list[tuple[str, str]]], rel: Any,
                   problems: list[Problem]) -> SeriesRecord | None:
    """The record of one series (None when none of its files can be read again); files
    left out of it go to `problems`."""
    study_uid, series_uid, _date = key
    agreement = series_agreement(all_headers, lambda p: rel(p))
    headers = list(agreement.kept)
    first = _first_header(headers, rel, problems)
    if first is None:
        return None
    number = int_or_none(safe_get(first, "SeriesNumber"))
    series_name = (f"series #{'?' if number is None else number} "
                   f"'{str(safe_get(first, 'SeriesDescription', '') or '').strip()}'")
    for odd, why in agreement.dropped:
        problems.append(Problem(rel(odd.path), f"left out of {series_name} (not stacked "
                                f"with it): {why}"))
    geometry, refusal, sequence_class, volumes, modality = _examine_series(headers, first, rel)
    refusal = agreement.refusal or refusal
    refusal = _incomplete_header_refusal(first, lost.get((study_uid, series_uid), ())) \
        or refusal
    status, reason = ("refused", refusal) if refusal else ("skipped", "")
    if not refusal and modality != "MR":
        status, reason = "skipped", f"modality {modality or 'missing'} (only MR is analysed)"
    identity = Counter(h.identity for h in headers).most_common(1)[0][0]
    return SeriesRecord(
        study_uid=study_uid,
        study_date=parse_dicom_date(safe_get(first, "StudyDate")),
        study_time=parse_dicom_time(safe_get(first, "StudyTime")),
        series_uid=series_uid,
        series_number=int_or_none(safe_get(first, "SeriesNumber")),
        series_description=str(safe_get(first, "SeriesDescription", "") or "").strip(),
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
        x_range_mm=geometry["x_range_mm"],
        laterality_tag=str(safe_get(first, "Laterality", "")
                           or safe_get(first, "ImageLaterality", "") or "").strip(),
    )


def _first_header(headers: list[FileHeader], rel: Any,
                  problems: list[Problem]) -> pydicom.Dataset | None:
    """The full header of the series' first file (sorted paths), which stands for the series.

    It is read again here (once per series) because workers send back only FileHeaders. A
    file that cannot be read any more (changed since it was scanned) goes to `problems` and
    is removed from `headers`; None when no file is left.
    """
    first: pydicom.Dataset | None = None
    while headers and first is None:
        try:
            first = read_header(headers[0].path)
        except Exception as err:  # noqa: BLE001 - changed since it was scanned
            problems.append(Problem(rel(headers[0].path), f"unreadable DICOM header "
                                    f"({type(err).__name__}: {err})"))
            headers.pop(0)
    return first


def _examine_series(
    headers: list[FileHeader], first: pydicom.Dataset, rel: Any,
) -> tuple[dict[str, Any], str | None, str, tuple[VolumeRecord, ...], str]:
    """:func:`_series_volumes` and the modality of a series; a corrupt value of its first
    header refuses the series instead of stopping the index."""
    try:
        geometry, refusal, sequence_class, volumes = _series_volumes(headers, first, rel)
        modality = str(first.get("Modality", "") or "")
    except Exception as err:  # noqa: BLE001 - a corrupt value of the series' first header
        geometry = {"orientation": None, "rows": None, "columns": None,
                    "pixel_spacing_mm": None, "slice_spacing_mm": None, "x_range_mm": None}
        refusal = (f"unreadable header value in {headers[0].path.name} "
                   f"({type(err).__name__}: {err})")
        sequence_class, volumes, modality = "other", (), ""
    return geometry, refusal, sequence_class, volumes, modality


def _incomplete_header_refusal(first: pydicom.Dataset,
                               lost: Sequence[tuple[str, str]]) -> str | None:
    """Why the series is refused when image files of it (`lost`: name and SOP class of the
    series' files without Rows/Columns) have a header that ends early, else None."""
    image_class = str(safe_get(first, "SOPClassUID", "") or "")
    partial = [name for name, sop in lost if sop == image_class]
    if not partial:
        return None
    # an image file of the series whose header ends early (truncated, corrupt): the volume
    # would silently lack its slice, so the series is not used (the first cause of what else
    # is wrong with it, e.g. the gap it leaves)
    return (f"{len(partial)} file(s) of the series have an incomplete image header "
            f"(first: {partial[0]}; see problems.tsv): truncated or corrupt; "
            "re-export the series")


def _record_order(record: SeriesRecord) -> tuple[Any, ...]:
    """Order of the series in the index: by study date and time, study, patient, number."""
    return (record.study_date or "9999", record.study_time or "", record.study_uid,
            record.patient_fingerprint,
            record.series_number if record.series_number is not None else 1 << 30,
            record.series_uid)


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
