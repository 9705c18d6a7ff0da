"""Convert DICOM series to NIfTI volumes plus JSON sidecars, with explicit geometry.

A series may hold several volumes (echoes, Dixon water/fat/in/opp images, magnitude and
phase, diffusion b-values and directions, repetitions): its frames are grouped into volumes by
:func:`pipeline.io.dicom_frames.split_volumes` and each volume is converted on its own. Classic
single-frame files, Siemens mosaics and enhanced multi-frame files (per-frame functional
groups: positions, orientations, pixel spacing, rescale slope/intercept per frame) are read;
compressed transfer syntaxes go through pydicom's decoders (pylibjpeg, pylibjpeg-libjpeg,
pylibjpeg-openjpeg, pylibjpeg-rle; deflate is native).

Geometry policy, per volume (each rule is a check with a clear error, never a silent fix):

- slices are ordered by the projection of their position on the slice normal
  (row cosine x column cosine), never by InstanceNumber, frame number or file name;
- the slice spacing comes from the positions (median step), never from SliceThickness
  (a Siemens mosaic carries one position: its tiles are placed SpacingBetweenSlices apart
  along the CSA SliceNormalVector, as its header defines them);
- the direction cosines are kept as they are, oblique included;
- duplicate positions: identical pixels -> the duplicate is dropped with a warning;
  different pixels -> refused;
- non-uniform spacing beyond 1 % of the median step -> refused (a missing slice or a
  variable increment); the series is not resampled;
- gantry tilt (positions sheared off the normal) -> refused;
- fewer than 3 slices, missing geometry tags, mixed orientation or matrix -> refused.
- values: stored values masked to BitsStored (sign-extended when signed), then
  ``value * RescaleSlope + RescaleIntercept`` per frame; written as float32. Philips
  "precise" floating-point values are not derived: the output holds the displayed values.

The image is built in DICOM LPS physical space; SimpleITK writes NIfTI in RAS, so the
patient's left stays left whatever the patient position (head/feet first, prone, decubitus).

Command line, two modes::

    python -m pipeline.io.convert --sessions-json F --session 20240225 --subject demo --out-dir D
    python -m pipeline.io.convert DIR OUT [--subject ID] [--compression-level N]

The second mode indexes DIR and writes every volume it can into OUT, named
``sub-<subject>_ses-<YYYYMMDD>_run-<SeriesNumber, 3 digits>[_<volume entities>]_<class>``
(``.nii.gz`` + ``.json``), where the volume entities say what tells the volumes of a series
apart (``echo-2``, ``part-water``, ``bval-1000_dir-3``, ``t-4``, ``rep-2``) and the class is
the sequence class without underscores (``T1w``, ``STIR``, ``dixonwater`` ...). A name that is
still taken gets ``_uid-<8 hex digits of the SeriesInstanceUID hash>``. ``converted.tsv``
lists the volumes written, ``refusals.tsv`` every series or volume that was not (with the
reason), ``problems.tsv`` the files that are not DICOM images.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from isal import igzip_threaded

from pipeline.io import dicom_frames
from pipeline.io.classify import classify_sequence
from pipeline.io.dicom_frames import FrameError, FrameInfo, VolumeGroup
from pipeline.io.dicom_values import int_or_none, parse_dicom_date
from pipeline.io.files import (
    atomic_path,
    finite_float,
    is_within,
    write_json_atomic,
    write_tsv_atomic,
)
from pipeline.io.identity import PatientIdentity
from pipeline.io.records import FileHeader
from pipeline.io.scan import index_folder, series_agreement

log = logging.getLogger(__name__)

#: Largest accepted deviation of a slice step from the median step, as a fraction of it.
SPACING_TOLERANCE = dicom_frames.SPACING_TOLERANCE
#: Largest accepted in-plane shift of a slice per mm along the normal (tan of the tilt).
SHEAR_TOLERANCE = dicom_frames.SHEAR_TOLERANCE
#: Positions closer than this along the normal are the same slice position, in mm.
DUPLICATE_TOLERANCE_MM = dicom_frames.DUPLICATE_TOLERANCE_MM
#: Orientation cosines that differ by more than this between files are inconsistent.
ORIENTATION_TOLERANCE = dicom_frames.ORIENTATION_TOLERANCE
#: Fewest distinct slice positions that make a volume.
MIN_SLICES = dicom_frames.MIN_SLICES
DECODER_HINT = ("install a decoder for it (pip install pylibjpeg pylibjpeg-libjpeg "
                "pylibjpeg-openjpeg) or export the series uncompressed")
#: Pixel data bigger than this stays on disk while headers are read (read later by offset).
DEFER_SIZE = "64 KB"

#: Bytes read per copy step when gzipping a NIfTI file.
GZIP_CHUNK_BYTES = 8 << 20
#: Most threads used to gzip one NIfTI file.
GZIP_MAX_THREADS = 4

#: Output name suffix of each session role.
ROLE_SUFFIX: dict[str, str] = {"anatomical": "T1w", "fluid": "fluid"}

CONVERTED_COLUMNS: tuple[str, ...] = (
    "nifti", "study_date", "series_number", "series_description", "volume", "sequence_class",
    "n_slices", "series_uid")
REFUSAL_COLUMNS: tuple[str, ...] = (
    "study_date", "series_number", "series_description", "volume", "n_files", "path",
    "reason", "series_uid")


#: Largest rows or columns accepted (MR matrices are at most a few thousand pixels a side).
MAX_MATRIX = 8192


class SeriesError(Exception):
    """A series that cannot be converted: the offending file and what the user can do.

    Parameters
    ----------
    path : Path or str
        The file (or series folder) at fault.
    message : str
        What is wrong and what the user can do about it.
    """

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)
        self.message = message


@dataclass
class Volume:
    """One volume of a series: the image and its sidecar, or why it could not be built."""

    label: str
    image: sitk.Image | None
    sidecar: dict[str, Any]
    error: SeriesError | None = None
    n_frames: int = 0


@dataclass
class _Slice:
    frame: FrameInfo
    position: np.ndarray  # mm, LPS
    proj_mm: float  # position along the slice normal
    pixels: np.ndarray | None = None  # float64, rescaled, shape (rows, columns)

    @property
    def path(self) -> Path:
        return self.frame.path

    @property
    def name(self) -> str:
        frame = self.frame
        return frame.path.name if frame.kind == "single" else \
            f"{frame.path.name} frame {frame.frame + 1}"


@dataclass
class _Series:
    """Headers (pixel data deferred) and decoded pixels of one series' files.

    The stored pixels of a file holding several frames (multi-frame, mosaic) are kept until
    every volume that uses one of its frames is built (:meth:`done`); those of a single-frame
    file are read when its frame is needed and not kept.
    """

    datasets: dict[Path, pydicom.Dataset]
    frames: list[FrameInfo]
    stored: dict[Path, np.ndarray] = field(default_factory=dict)
    pending: dict[Path, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for frame in self.frames:
            self.pending[frame.path] = self.pending.get(frame.path, 0) + 1

    def _stored(self, frame: FrameInfo) -> np.ndarray:
        array = self.stored.get(frame.path)
        if array is None:
            try:
                array = dicom_frames.stored_pixels(frame.path, self.datasets[frame.path])
            except FrameError as err:
                raise SeriesError(frame.path, str(err)) from err
            if self.pending.get(frame.path, 0) > 1:
                self.stored[frame.path] = array
        return array

    def values(self, frame: FrameInfo) -> np.ndarray:
        """Rescaled values (float64) of one frame (to compare duplicates)."""
        values = dicom_frames.frame_pixels(self._stored(frame), frame).astype(np.float64)
        if frame.slope is not None and frame.slope != 0:
            values = values * frame.slope
        if frame.intercept is not None:
            values = values + frame.intercept
        return values

    def fill(self, frame: FrameInfo, out: np.ndarray) -> None:
        """Write the rescaled values of one frame into float32 `out` (rows, columns)."""
        dicom_frames.rescale_into(dicom_frames.frame_pixels(self._stored(frame), frame),
                                  frame.slope, frame.intercept, out)

    def done(self, frames: Sequence[FrameInfo]) -> None:
        """Forget the stored pixels of files whose frames are all in built volumes."""
        for frame in frames:
            left = self.pending.get(frame.path, 0) - 1
            self.pending[frame.path] = left
            if left <= 0:
                self.stored.pop(frame.path, None)


def _writable_array(image: sitk.Image) -> np.ndarray:
    """A writable float32 numpy view [z, y, x] of the pixel buffer of `image`.

    ``sitk.GetArrayViewFromImage`` is read-only; this aliases the same buffer through ctypes
    so a volume is assembled in the image itself (no second copy of it in numpy). Only for a
    float32 image just created by this module (its buffer is not shared with any other
    image); the caller keeps `image` alive while the view is in use and drops the view
    before handing the image out.
    """
    assert image.GetPixelID() == sitk.sitkFloat32
    view = sitk.GetArrayViewFromImage(image)
    address = int(view.__array_interface__["data"][0])
    buffer = (ctypes.c_float * view.size).from_address(address)
    array = np.ctypeslib.as_array(buffer).reshape(view.shape)
    assert array.dtype == np.float32
    return array


class _CappedReader(io.BufferedReader):
    """A file whose reads never ask for more than the bytes left in it.

    pydicom reads an element by asking for its stated length; for a corrupt length such as
    0xFFFFFFF0 a plain file allocates a 4 GiB buffer before finding the file shorter.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = max(0, min(size, self._size - self.tell()))
        return super().read(size)


def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        with _CappedReader(path) as fh:
            ds = pydicom.dcmread(fh, defer_size=DEFER_SIZE)
        ds.filename = str(path)  # deferred elements are read later from the file by name
        return ds
    except Exception as err:  # noqa: BLE001 - report any parse failure against the file
        raise SeriesError(path, f"cannot read as DICOM ({type(err).__name__}: {err}); remove "
                                "the file or re-export the series") from err


def _load_series(files: Sequence[Path]) -> _Series:
    files = [Path(f) for f in files]
    if not files:
        raise SeriesError(Path("."), "no files given for the series")
    datasets: dict[Path, pydicom.Dataset] = {}
    frames: list[FrameInfo] = []
    headers: list[FileHeader] = []
    for path in sorted(files):
        ds = _read_dataset(path)
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise SeriesError(path, "colour image (SamplesPerPixel > 1), not an MR magnitude "
                                    "image; choose another series")
        try:
            own = dicom_frames.frames_of(path, ds)
        except FrameError as err:
            raise SeriesError(path, str(err)) from err
        frames.extend(own)
        datasets[path] = ds
        headers.append(FileHeader(path=path, sop_uid=None, orientation=None, position=None,
                                  pixel_spacing_mm=None, rows=None, columns=None,
                                  n_frames=len(own), frames=own,
                                  identity=PatientIdentity.of(ds),
                                  signature=dicom_frames.acquisition_signature(ds)))
    # the files must be one acquisition of one patient (the index leaves out files that are
    # not; a file list given directly is refused rather than stacked)
    agreement = series_agreement(headers)
    if agreement.refusal:
        raise SeriesError(headers[0].path, agreement.refusal)
    if agreement.dropped:
        odd, why = agreement.dropped[0]
        raise SeriesError(odd.path, f"{why}; the series is not converted: leave the file out "
                                    "(the index does) or re-export the series")
    return _Series(datasets, frames)


def _orthonormal_axes(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosine, column cosine and slice normal (unit, right-handed) from an IOP."""
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:6], dtype=float)
    row = row / np.linalg.norm(row)
    # remove the tiny non-orthogonality of rounded header values so NIfTI gets a rotation
    col = col - np.dot(col, row) * row
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _check_frames(frames: Sequence[FrameInfo]) -> None:
    """Geometry tags present and consistent across the frames of one volume."""
    for frame in frames:
        missing = [name for name, value in (("ImageOrientationPatient", frame.orientation),
                                            ("ImagePositionPatient", frame.position),
                                            ("PixelSpacing", frame.pixel_spacing_mm),
                                            ("Rows", frame.rows), ("Columns", frame.columns))
                   if value is None]
        if missing:
            raise SeriesError(frame.path, f"missing or malformed {', '.join(missing)}"
                                          f"{'' if frame.kind == 'single' else ' in frame '}"
                                          f"{'' if frame.kind == 'single' else frame.frame + 1}"
                                          ": the slice cannot be placed in space (localizer or "
                                          "secondary capture?); choose another series")
    mixed = dicom_frames.mixed_geometry(frames)
    if mixed is not None:
        raise SeriesError(mixed[0].path, mixed[1])


def _assemble(series: _Series, group: VolumeGroup,
              n_files: int) -> tuple[sitk.Image, dict[str, Any]]:
    """Build one volume from its frames (rules in the module docstring)."""
    frames = list(group.frames)
    _check_frames(frames)
    iop0 = frames[0].orientation
    assert iop0 is not None
    row, col, normal = _orthonormal_axes(iop0)
    warnings: list[str] = []
    slices = [_Slice(f, np.asarray(f.position, dtype=float),
                     float(np.dot(np.asarray(f.position, dtype=float), normal)))
              for f in frames]
    slices.sort(key=lambda s: (s.proj_mm, str(s.path), s.frame.frame))
    kept = _drop_duplicates(series, slices, warnings)
    step_mm = _slice_step_mm(kept, normal)
    image = _stacked_image(series, frames, kept)
    spacing_rc = frames[0].pixel_spacing_mm
    assert spacing_rc is not None
    # PixelSpacing is (between rows, between columns); SimpleITK spacing is (x=column, y=row, z)
    image.SetSpacing((spacing_rc[1], spacing_rc[0], step_mm))
    image.SetOrigin(tuple(float(v) for v in kept[0].position))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))

    ds = series.datasets[kept[0].path]
    sidecar = _sidecar(ds, group, kept, step_mm, spacing_rc, warnings, n_files)
    return image, sidecar


def _drop_duplicates(series: _Series, slices: list[_Slice],
                     warnings: list[str]) -> list[_Slice]:
    """The slices (sorted along the normal) with identical repeats at one position dropped
    (each noted in `warnings`); two different images at one position refuse the series."""

    def pixels(item: _Slice) -> np.ndarray:
        if item.pixels is None:
            item.pixels = series.values(item.frame)
        return item.pixels

    kept: list[_Slice] = [slices[0]]
    for item in slices[1:]:
        previous = kept[-1]
        if abs(item.proj_mm - previous.proj_mm) > DUPLICATE_TOLERANCE_MM:
            kept.append(item)
            continue
        same_place = np.allclose(item.position, previous.position, atol=DUPLICATE_TOLERANCE_MM)
        if same_place and np.array_equal(pixels(item), pixels(previous)):
            message = (f"duplicate slice {item.name} (identical pixels at the position "
                       f"of {previous.name}) dropped")
            warnings.append(message)
            log.warning("%s", message)
            item.pixels = None
            continue
        raise SeriesError(item.path, f"two different images at the same slice position "
                                     f"({item.proj_mm:.3f} mm along the normal) as "
                                     f"{previous.path}: the series holds several echoes, phases "
                                     "or repeats that no header tag tells apart; export a "
                                     "single volume or pick another series")
    return kept


def _slice_step_mm(kept: list[_Slice], normal: np.ndarray) -> float:
    """The median step between slices along the normal, mm; a series with too few slices or
    an irregular stack is refused."""
    if len(kept) < MIN_SLICES:
        raise SeriesError(kept[0].path, f"only {len(kept)} slice(s); a volume needs at least "
                                        f"{MIN_SLICES}; choose a series with more slices")
    projections = np.array([s.proj_mm for s in kept])
    irregular = dicom_frames.stack_problem(np.array([s.position for s in kept]), normal,
                                           [s.name for s in kept])
    if irregular is not None:
        raise SeriesError(kept[irregular[0]].path, irregular[1])
    return float(np.median(np.diff(projections)))


def _stacked_image(series: _Series, frames: list[FrameInfo], kept: list[_Slice]) -> sitk.Image:
    """The kept slices as a float32 image (geometry not yet set).

    Assembled slice by slice in the image's own float32 buffer: no float64 volume, no
    numpy -> SimpleITK copy (peak memory ~ one float32 volume).
    """
    assert frames[0].rows is not None and frames[0].columns is not None
    n_cols, n_rows = int(frames[0].columns or 0), int(frames[0].rows or 0)
    if not (0 < n_rows <= MAX_MATRIX and 0 < n_cols <= MAX_MATRIX):
        raise SeriesError(frames[0].path, f"implausible matrix {n_rows} x {n_cols} (more than "
                          f"{MAX_MATRIX} pixels a side): a damaged header; refused before "
                          "allocating memory")
    image = sitk.Image([n_cols, n_rows, len(kept)], sitk.sitkFloat32)
    volume = _writable_array(image)  # [z, y, x]
    try:
        for k, item in enumerate(kept):
            if item.pixels is not None:  # already decoded to compare duplicates (float64)
                volume[k] = item.pixels
                item.pixels = None
            else:
                series.fill(item.frame, volume[k])
    finally:
        del volume
    return image


def _sidecar(ds: pydicom.Dataset, group: VolumeGroup, kept: list[_Slice], step_mm: float,
             spacing_rc: tuple[float, ...], warnings: list[str],
             n_files: int) -> dict[str, Any]:
    """Volume metadata for the JSON sidecar (times in ms, lengths in mm, no patient data)."""
    header = dicom_frames.volume_header(ds, group)

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value).strip() if value not in (None, "") else None

    frame = kept[0].frame
    assert frame.orientation is not None
    thickness = finite_float(ds.get("SliceThickness"))
    if thickness is None:
        thickness = finite_float(dicom_frames.shared_value(ds, "PixelMeasuresSequence",
                                                           "SliceThickness"))
    attrs = group.attrs
    return {
        "SeriesInstanceUID": text("SeriesInstanceUID"),
        "SeriesNumber": int_or_none(ds.get("SeriesNumber")),
        "SeriesDescription": text("SeriesDescription"),
        "StudyInstanceUID": text("StudyInstanceUID"),
        "StudyDate": parse_dicom_date(ds.get("StudyDate")),
        "Modality": text("Modality"),
        "SequenceClass": classify_sequence(header),
        "VolumeLabel": group.label,
        "EchoNumber": attrs.get("EchoNumber"),
        "EchoTime": finite_float(header.get("EchoTime")),
        "RepetitionTime": finite_float(header.get("RepetitionTime")),
        "InversionTime": finite_float(header.get("InversionTime")),
        "ImageType": attrs.get("ImageType") or None,
        "DiffusionBValue": attrs.get("DiffusionBValue"),
        "DiffusionGradientOrientation": attrs.get("DiffusionGradientOrientation"),
        "TemporalPosition": attrs.get("TemporalPosition"),
        "Repetition": attrs.get("Repetition"),
        "MagneticFieldStrength": finite_float(ds.get("MagneticFieldStrength")),
        "Manufacturer": text("Manufacturer"),
        "ManufacturerModelName": text("ManufacturerModelName"),
        "PatientPosition": text("PatientPosition"),
        "ReceiveCoilName": text("ReceiveCoilName"),
        "FrameOfReferenceUID": text("FrameOfReferenceUID"),
        "ImageOrientationPatient": [float(v) for v in frame.orientation],
        "ImagePositionPatientFirstSlice": [float(v) for v in kept[0].position],
        "SpacingBetweenSlicesFromPositions_mm": step_mm,
        "SliceThickness_mm": thickness,
        "PixelSpacing_mm": [float(v) for v in spacing_rc],
        "Rows": frame.rows,
        "Columns": frame.columns,
        "NumberOfSlices": len(kept),
        "SourceLayout": {"single": "classic single-frame", "multiframe": "enhanced multi-frame",
                         "mosaic": "Siemens mosaic"}[frame.kind],
        "TransferSyntaxUID": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        "CoordinateConvention": "DICOM LPS in memory; NIfTI written in RAS by SimpleITK",
        "warnings": list(warnings),
        "SourceFiles": n_files,
        "ConversionSoftware": f"limbtrack pipeline.io.convert (pydicom {pydicom.__version__}, "
                              f"SimpleITK {sitk.Version.VersionString()})",
    }


@contextmanager
def _guard(files: Sequence[Path], what: str) -> Iterator[None]:
    """Turn any unexpected failure while reading damaged files into a SeriesError.

    pydicom and the decoders raise many exception types on corrupt data (and the Rust RLE
    decoder a panic that is not an Exception); the user needs the file and a reason, and the
    rest of the study must go on.
    """
    try:
        yield
    except (SeriesError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001 - see the docstring
        path = Path(files[0]) if files else Path(".")
        raise SeriesError(path, f"cannot {what}: {type(err).__name__}: {err} (a damaged or "
                          "unusual file; check the export)") from err


def read_volumes(files: Sequence[Path]) -> list[Volume]:
    """Read every volume of one series (several when it holds echoes, Dixon images, ...).

    Parameters
    ----------
    files : sequence of Path
        The files of one series, in any order.

    Returns
    -------
    list of Volume
        One per volume, in the order of :func:`pipeline.io.dicom_frames.split_volumes`; a volume
        that breaks a rule has ``image`` None and ``error`` set.

    Raises
    ------
    SeriesError
        When the series as a whole cannot be read (a file that is not DICOM, colour images,
        frames that cannot be placed).
    """
    with _guard(files, "read the series"):
        series = _load_series(files)
        groups = dicom_frames.split_volumes(series.frames)
    n_files = len(series.datasets)
    volumes: list[Volume] = []
    for group in groups:
        try:
            with _guard([f.path for f in group.frames], f"read volume {group.label or 1}"):
                image, sidecar = _assemble(series, group, n_files)
        except SeriesError as err:
            volumes.append(Volume(group.label, None, {}, err, len(group.frames)))
            continue
        finally:
            # decoded pixels of files whose frames all belong to done volumes are not needed
            series.done(group.frames)
        volumes.append(Volume(group.label, image, sidecar, None, len(group.frames)))
    return volumes


def read_series(files: Sequence[Path],
                volume: str | None = None) -> tuple[sitk.Image, dict[str, Any]]:
    """Read one volume of a DICOM series into a float32 image in LPS physical space.

    Parameters
    ----------
    files : sequence of Path
        The files of one series, in any order.
    volume : str, optional
        Label of the volume to read (see :func:`read_volumes`) when the series holds several;
        required then.

    Returns
    -------
    image : SimpleITK.Image
        float32, size (columns, rows, slices); spacing (column spacing, row spacing, slice
        step) in mm; origin = position of the first slice along the normal (mm, LPS);
        direction columns = row cosine, column cosine, slice normal. Rescale slope and
        intercept are applied.
    sidecar : dict
        Volume metadata; no patient identifiers.

    Raises
    ------
    SeriesError
        When the volume breaks one of the rules of the module docstring, or the series holds
        several volumes and `volume` does not name one of them.
    """
    with _guard(files, "read the series"):
        series = _load_series(files)
        groups = dicom_frames.split_volumes(series.frames)
    labels = [g.label for g in groups]
    if volume:
        chosen = [g for g in groups if g.label == volume]
        if not chosen:
            raise SeriesError(series.frames[0].path, f"no volume {volume!r} in the series; it "
                                                     f"holds: {', '.join(labels) or 'one'}")
        group = chosen[0]
    elif len(groups) > 1:
        raise SeriesError(series.frames[0].path, (
            f"the series holds {len(groups)} volumes ({', '.join(labels)}); name the one to "
            "read (read_series(files, volume=...)) or use read_volumes"))
    else:
        group = groups[0]
    with _guard(files, "read the series"):
        return _assemble(series, group, len(series.datasets))


def sidecar_path(nifti_path: Path) -> Path:
    """The ``.json`` path next to a ``.nii.gz`` / ``.nii`` file."""
    name = nifti_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return nifti_path.with_name(name[: -len(suffix)] + ".json")
    return nifti_path.with_suffix(".json")


def _gzip_threads(threads: int | None) -> int:
    if threads is not None:
        return max(1, int(threads))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(GZIP_MAX_THREADS, cores))


#: isal (Intel ISA-L) has four levels; zlib-style 0-9 map onto them.
ISAL_LEVEL = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 2, 6: 3, 7: 3, 8: 3, 9: 3}


def gzip_file(source: Path, target: Path, compression_level: int = 1,
              threads: int | None = None) -> None:
    """Write `source` gzip-compressed to `target` with ISA-L (python-isal), on `threads` cores.

    ISA-L deflates several times faster than zlib at a similar ratio and compresses blocks in
    parallel (as pigz does), writing one standard gzip file any reader (zlib, ITK's znzlib,
    nibabel) reads.

    Parameters
    ----------
    compression_level : int
        zlib-style 0 to 9, mapped onto ISA-L's 0-3 (:data:`ISAL_LEVEL`).
    threads : int, optional
        Compressing threads; default: the usable cores, at most :data:`GZIP_MAX_THREADS`.
    """
    if not 0 <= compression_level <= 9:
        raise ValueError(f"gzip level {compression_level} is not in 0-9")
    with open(source, "rb") as fin, igzip_threaded.open(
        target, "wb", compresslevel=ISAL_LEVEL[compression_level],
        threads=_gzip_threads(threads), block_size=1 << 20,
    ) as fout:
        shutil.copyfileobj(fin, fout, GZIP_CHUNK_BYTES)


def write_nifti(image: sitk.Image, path: Path, compression_level: int = 1,
                threads: int | None = None) -> None:
    """Write `image` as NIfTI-1 at `path`: ``.nii`` uncompressed, ``.nii.gz`` gzipped.

    SimpleITK writes the file (header in RAS: the LPS -> RAS flip, qform and sform as ITK
    sets them), uncompressed: its own gzip ignores the level and runs at ~18 MB/s. A
    ``.nii.gz`` is the same bytes compressed by :func:`gzip_file` at `compression_level`
    (0-9) on `threads` threads. Not atomic by itself (see :func:`write_volume`).
    """
    path = Path(path)
    if not 0 <= compression_level <= 9:
        raise ValueError(f"gzip level {compression_level} is not in 0-9")
    if not path.name.endswith(".gz"):
        sitk.WriteImage(image, str(path), False)
        return
    fd, name = tempfile.mkstemp(prefix=".", suffix=".nii", dir=path.parent)
    os.close(fd)
    plain = Path(name)
    try:
        sitk.WriteImage(image, str(plain), False)
        gzip_file(plain, path, compression_level, threads)
    finally:
        plain.unlink(missing_ok=True)


def write_volume(image: sitk.Image, sidecar: dict[str, Any], nifti_path: Path,
                 compression_level: int = 1, threads: int | None = None) -> None:
    """Write `image` as NIfTI (RAS, by SimpleITK) and `sidecar` as JSON next to it, atomically.

    Parameters
    ----------
    compression_level : int
        gzip level of a ``.nii.gz`` (0-9; ignored for ``.nii``). Level 1 (the default) is
        ~7x faster than 6 on float32 MR volumes for files ~17 % larger (512x512x200:
        2.7 s / 82 MB against 20 s / 70 MB, one thread).
    threads : int, optional
        Threads compressing the ``.nii.gz`` (default: usable cores, at most 4).
    """
    nifti_path = Path(nifti_path)
    with atomic_path(nifti_path) as tmp:
        write_nifti(image, tmp, compression_level, threads)
    write_json_atomic(sidecar_path(nifti_path), sidecar)


def output_path(out_dir: Path, subject: str, session: str, role: str) -> Path:
    """BIDS-like NIfTI path ``sub-<subject>_ses-<session>_<T1w|fluid>.nii.gz`` of a role."""
    return Path(out_dir) / f"sub-{subject}_ses-{session}_{ROLE_SUFFIX[role]}.nii.gz"


def _refuse_output_inside_input(out_dir: Path, input_dir: str | Path | None,
                                files: Sequence[str | Path] = ()) -> None:
    """Raise SeriesError when `out_dir` is the input folder or lies inside it (or inside a
    folder holding input files): the input is read-only, whatever else fails."""
    for folder in ([Path(input_dir)] if input_dir else []) + [Path(f).parent for f in files]:
        if is_within(out_dir, folder):
            raise SeriesError(out_dir, f"the output folder lies inside the input folder "
                                       f"{folder}, which is read-only; choose another output "
                                       "folder")


def read_role(entry: dict[str, Any], role: str,
              min_contact_mm: float) -> tuple[sitk.Image, dict[str, Any]]:
    """The image and sidecar of a session's role: its series, or, for an entry with
    ``parts`` (the left and the right leg in separate series), both composed by
    :func:`pipeline.io.split.compose` — the sidecar is the reference series' with
    ``SplitSeries`` (what was done, each series' identity) and ``QCFlags`` added."""
    if not entry.get("parts"):
        return read_series([Path(f) for f in entry["files"]], volume=entry.get("volume") or None)
    from pipeline.io import split  # noqa: PLC0415 - only split sessions need it

    parts, sidecars = [], {}
    for part in entry["parts"]:
        image, sidecar = read_series([Path(f) for f in part["files"]],
                                     volume=part.get("volume") or None)
        number = part["series_number"] if part["series_number"] is not None else "?"
        parts.append(split.Part(part["side"], image, f"series #{number} "
                                f"'{part['description']}'", sidecar.get("ReceiveCoilName"),
                                sidecar.get("FrameOfReferenceUID")))
        sidecars[part["side"]] = sidecar
    composition = split.compose(parts, t1_like=role == "anatomical",
                                min_contact_mm=min_contact_mm)
    reference = composition.record["reference_side"]
    sidecar = dict(sidecars[reference])
    for side, part_sidecar in sidecars.items():
        composition.record["series"][side] |= {
            key: part_sidecar.get(key) for key in (
                "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SliceThickness_mm",
                "PixelSpacing_mm", "NumberOfSlices", "ImagePositionPatientFirstSlice")}
    size = composition.image.GetSize()
    sidecar.update(SeriesInstanceUID=None, SeriesNumber=None,
                   SeriesDescription=entry["description"], Columns=size[0], Rows=size[1],
                   NumberOfSlices=size[2],
                   ImagePositionPatientFirstSlice=list(composition.image.GetOrigin()),
                   SplitSeries=composition.record,
                   QCFlags=[flag.to_json() for flag in composition.flags])
    return composition.image, sidecar


def convert_session(sessions_json: Path, session: str, subject: str,
                    out_dir: Path, min_contact_mm: float | None = None) -> list[Path]:
    """Convert a session's anatomical and fluid series; all outputs or none.

    `min_contact_mm` (default: the segmentation setting ``min_fov_contact_mm``) is the
    contact with a one-leg series' own field-of-view edge that cuts the leg (split sessions).

    Returns
    -------
    list of Path
        The NIfTI files written.

    Raises
    ------
    SeriesError
        When a series cannot be converted or the session is not in `sessions_json`.
    """
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    entries = {s["session"]: s for s in data.get("sessions", [])}
    if session not in entries:
        raise SeriesError(sessions_json, f"no session {session!r}; available: "
                                         f"{', '.join(entries) or 'none'}")
    entry = entries[session]
    _refuse_output_inside_input(out_dir, data.get("input_dir"),
                                [f for role in ROLE_SUFFIX for f in entry[role]["files"]])
    if min_contact_mm is None:
        from pipeline.settings import defaults  # noqa: PLC0415

        min_contact_mm = float(defaults()["segment"]["min_fov_contact_mm"])
    volumes = []
    for role in ROLE_SUFFIX:
        image, sidecar = read_role(entry[role], role, min_contact_mm)
        sidecar["Role"] = role
        volumes.append((output_path(out_dir, subject, session, role), image, sidecar))
    written: list[Path] = []
    try:
        for path, image, sidecar in volumes:
            write_volume(image, sidecar, path)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
            sidecar_path(path).unlink(missing_ok=True)
        raise
    return written


# --------------------------------------------------------------------------------------------
# convert a whole folder
# --------------------------------------------------------------------------------------------

def _entity(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum()) or "x"


def volume_name(subject: str, sidecar: dict[str, Any]) -> str:
    """File stem of a volume: ``sub-S_ses-YYYYMMDD_run-NNN[_entities]_<class>``."""
    date = (sidecar.get("StudyDate") or "").replace("-", "") or "nodate"
    number = sidecar.get("SeriesNumber")
    run = f"{number:03d}" if isinstance(number, int) and number >= 0 else "x"
    parts = [f"sub-{_entity(subject)}", f"ses-{date}", f"run-{run}"]
    label = sidecar.get("VolumeLabel") or ""
    parts += ["-".join(_entity(p) for p in entity.split("-", 1))
              for entity in label.split("_") if entity]
    parts.append(_entity(sidecar.get("SequenceClass") or "other"))
    return "_".join(parts)


@dataclass
class FolderConversion:
    """What :func:`convert_folder` wrote and refused (rows of the two TSV tables)."""

    converted: list[dict[str, Any]]
    refusals: list[dict[str, Any]]
    n_problem_files: int


def convert_folder(input_dir: Path, out_dir: Path, subject: str = "unknown",
                   compression_level: int = 1) -> FolderConversion:
    """Index `input_dir` and write every volume of every image series into `out_dir`.

    Series and volumes that cannot be converted are listed with the reason in
    ``refusals.tsv``; the volumes written in ``converted.tsv``; files that are not DICOM
    images in ``problems.tsv`` (all in `out_dir`). One bad series never stops the others.
    """
    _refuse_output_inside_input(Path(out_dir), input_dir)
    result = index_folder(Path(input_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    converted: list[dict[str, Any]] = []
    refusals: list[dict[str, Any]] = []
    taken: set[str] = set()
    root = result.input_dir

    def rel(path: Path) -> str:
        try:
            return path.resolve().relative_to(root).as_posix()
        except ValueError:
            return str(path)

    for record in result.series:
        base = {"study_date": record.study_date, "series_number": record.series_number,
                "series_description": record.series_description,
                "series_uid": record.series_uid}
        try:
            volumes = read_volumes(list(record.files))
        except SeriesError as err:
            refusals.append(base | {"volume": "", "n_files": record.n_files,
                                    "path": rel(err.path), "reason": err.message})
            continue
        for item in volumes:
            if item.error is not None or item.image is None:
                assert item.error is not None
                refusals.append(base | {"volume": item.label, "n_files": record.n_files,
                                        "path": rel(item.error.path),
                                        "reason": item.error.message})
                continue
            stem = volume_name(subject, item.sidecar)
            if stem in taken:
                digest = hashlib.sha1(record.series_uid.encode()).hexdigest()[:8]
                stem = stem.rsplit("_", 1)[0] + f"_uid-{digest}_" + stem.rsplit("_", 1)[1]
            taken.add(stem)
            path = out_dir / f"{stem}.nii.gz"
            write_volume(item.image, item.sidecar, path, compression_level)
            converted.append(base | {"nifti": path.name, "volume": item.label,
                                     "sequence_class": item.sidecar.get("SequenceClass"),
                                     "n_slices": item.sidecar.get("NumberOfSlices")})
    write_tsv_atomic(out_dir / "converted.tsv", converted, CONVERTED_COLUMNS)
    write_tsv_atomic(out_dir / "refusals.tsv", refusals, REFUSAL_COLUMNS)
    write_tsv_atomic(out_dir / "problems.tsv", [{"path": p.path, "problem": p.problem}
                                                for p in result.problems], ("path", "problem"))
    return FolderConversion(converted, refusals, len(result.problems))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Returns 0 on success; 2 when a session series is refused or the arguments are wrong;
    in folder mode 1 when no volume at all could be written.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.sessions_json is not None:
        return _session_mode(parser, args)
    return _folder_mode(parser, args)


def _parser() -> argparse.ArgumentParser:
    """The command line of the converter (session mode and folder mode)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.io.convert",
        description="Convert DICOM to NIfTI: a session's anatomical and fluid-sensitive series "
                    "(--sessions-json ...), or every volume of a folder (DIR OUT).")
    parser.add_argument("input_dir", nargs="?", type=Path,
                        help="folder mode: DICOM folder to convert (read-only)")
    parser.add_argument("output_dir", nargs="?", type=Path,
                        help="folder mode: output folder for NIfTI, sidecars and tables")
    parser.add_argument("--sessions-json", type=Path,
                        help="session mode: sessions.json written by pipeline.io.dicom_index")
    parser.add_argument("--session", help="session mode: session label, e.g. 20240225")
    parser.add_argument("--subject", default=None,
                        help="subject label for the file names (folder mode: 'unknown')")
    parser.add_argument("--out-dir", type=Path, help="session mode: output folder")
    parser.add_argument("--min-fov-contact-mm", type=float, default=None,
                        help="session mode: contact (mm) with a one-leg series' own "
                             "field-of-view edge that cuts the leg (default: the "
                             "segmentation setting min_fov_contact_mm)")
    parser.add_argument("--compression-level", type=int, default=1, choices=range(0, 10),
                        metavar="0-9", help="gzip level of the NIfTI files (default 1)")
    return parser


def _session_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Convert the two series of one session of a sessions.json."""
    if args.input_dir is not None:
        parser.error("give either --sessions-json ... or DIR OUT, not both")
    for name in ("session", "subject", "out_dir"):
        if getattr(args, name) is None:
            parser.error(f"--sessions-json needs --{name.replace('_', '-')}")
    try:
        written = convert_session(args.sessions_json, args.session, args.subject,
                                  args.out_dir, args.min_fov_contact_mm)
    except SeriesError as err:
        print(f"ERROR {err.path}: {err.message}", file=sys.stderr)
        return 2
    for path in written:
        log.info("wrote %s", path)
    return 0


def _folder_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Convert every volume of a DICOM folder."""
    if args.input_dir is None or args.output_dir is None:
        parser.error("give DIR OUT (convert every volume of a folder) or --sessions-json ...")
    if not args.input_dir.is_dir():
        print(f"ERROR {args.input_dir}: input folder does not exist or is not a folder",
              file=sys.stderr)
        return 2
    if is_within(args.output_dir, args.input_dir):
        print(f"ERROR {args.output_dir}: the output folder lies inside the input folder "
              f"{args.input_dir}, which is read-only; choose another output folder",
              file=sys.stderr)
        return 2
    outcome = convert_folder(args.input_dir, args.output_dir, args.subject or "unknown",
                             args.compression_level)
    log.info("%s: %d volumes written, %d refused (refusals.tsv), %d non-image files "
             "(problems.tsv)", args.input_dir, len(outcome.converted), len(outcome.refusals),
             outcome.n_problem_files)
    for row in outcome.refusals:
        log.warning("refused series %s %s %s: %s", row["series_number"],
                    row["series_description"], row["volume"], row["reason"])
    return 0 if outcome.converted else 1


if __name__ == "__main__":
    sys.exit(main())
