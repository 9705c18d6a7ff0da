"""Write small synthetic DICOM series with known geometry and pixel values, for tests.

Each series is MR Image Storage, one file per slice, explicit VR little endian, with the full
geometry (ImageOrientationPatient, ImagePositionPatient, PixelSpacing, SliceThickness) and
realistic sequence tags taken from :data:`SEQUENCE_TAGS`. By default files get random names
without extension and shuffled InstanceNumbers, so nothing can rely on either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Patient identifiers that must never reach any output.
PATIENT_TAGS: dict[str, str] = {
    "PatientName": "Doe^Jane",
    "PatientID": "SECRET-ID-4711",
    "PatientBirthDate": "20140101",
}

_ORIGINAL = ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]

#: Realistic (Siemens-like unless named) sequence tag sets per expected class.
SEQUENCE_TAGS: dict[str, dict[str, Any]] = {
    "T1w": {"SeriesDescription": "t1_tse_tra", "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "SP", "OSP"], "ScanOptions": "", "RepetitionTime": 550.0,
            "EchoTime": 12.0, "ImageType": _ORIGINAL},
    "STIR": {"SeriesDescription": "STIR AX", "ScanningSequence": ["SE", "IR"],
             "SequenceVariant": ["SK", "SP", "MP"], "ScanOptions": "IR", "RepetitionTime": 5200.0,
             "EchoTime": 42.0, "InversionTime": 160.0, "ImageType": _ORIGINAL},
    "T2FS": {"SeriesDescription": "t2_tse_fs_tra", "ScanningSequence": "SE",
             "SequenceVariant": ["SK", "SP", "OSP"], "ScanOptions": ["FS", "PFP"],
             "RepetitionTime": 4100.0, "EchoTime": 85.0, "ImageType": _ORIGINAL},
    "dixon_water": {"SeriesDescription": "t1_vibe_dixon_tra_W", "ScanningSequence": "GR",
                    "SequenceVariant": ["SP", "OSP"], "ScanOptions": "",
                    "RepetitionTime": 6.7, "EchoTime": 2.4,
                    "ImageType": ["DERIVED", "PRIMARY", "DIXON", "WATER"]},
    "dixon_fat": {"SeriesDescription": "t1_vibe_dixon_tra_F", "ScanningSequence": "GR",
                  "SequenceVariant": ["SP", "OSP"], "ScanOptions": "", "RepetitionTime": 6.7,
                  "EchoTime": 2.4, "ImageType": ["DERIVED", "PRIMARY", "DIXON", "FAT"]},
    "dixon_in": {"SeriesDescription": "t1_vibe_dixon_tra_in", "ScanningSequence": "GR",
                 "SequenceVariant": ["SP", "OSP"], "ScanOptions": "", "RepetitionTime": 6.7,
                 "EchoTime": 2.4, "ImageType": ["ORIGINAL", "PRIMARY", "DIXON", "IN_PHASE"]},
    "dixon_opp": {"SeriesDescription": "t1_vibe_dixon_tra_opp", "ScanningSequence": "GR",
                  "SequenceVariant": ["SP", "OSP"], "ScanOptions": "", "RepetitionTime": 6.7,
                  "EchoTime": 1.2, "ImageType": ["ORIGINAL", "PRIMARY", "DIXON", "OPP_PHASE"]},
    "post_contrast": {"SeriesDescription": "t1_tse_tra", "ScanningSequence": "SE",
                      "SequenceVariant": ["SK", "SP"], "ScanOptions": "",
                      "RepetitionTime": 560.0, "EchoTime": 11.0, "ImageType": _ORIGINAL,
                      "ContrastBolusAgent": "Gadovist 1.0"},
    "localizer": {"SeriesDescription": "localizer", "ScanningSequence": "GR",
                  "SequenceVariant": ["SP"], "ScanOptions": "", "RepetitionTime": 8.6,
                  "EchoTime": 4.0, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
    "derived": {"SeriesDescription": "t1_tse_tra_MPR_cor", "ScanningSequence": "SE",
                "SequenceVariant": ["SK", "SP"], "ScanOptions": "", "RepetitionTime": 550.0,
                "EchoTime": 12.0, "ImageType": ["DERIVED", "SECONDARY", "MPR"]},
}


@dataclass
class SeriesInfo:
    """What was written: files (in slice order along the list of positions) and geometry (mm)."""

    files: list[Path]
    positions: np.ndarray  # (n, 3) ImagePositionPatient per slice, LPS mm
    row_cosine: np.ndarray  # direction of increasing column index
    col_cosine: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    pixels: np.ndarray  # (n, rows, cols) stored values
    study_uid: str
    series_uid: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    def pixel_lps(self, k: int, r: int, c: int) -> np.ndarray:
        """LPS position (mm) of the centre of pixel (row r, column c) of slice k."""
        return (self.positions[k] + c * self.pixel_spacing[1] * self.row_cosine
                + r * self.pixel_spacing[0] * self.col_cosine)


def ramp_pixels(n: int = 5, rows: int = 6, cols: int = 7) -> np.ndarray:
    """uint16 array (n, rows, cols) whose every voxel value is unique: 1000 k + 40 r + c + 1."""
    k, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return (1000 * k + 40 * r + c + 1).astype(np.uint16)


def rotation(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx (angles in degrees)."""
    ax, ay, az = np.deg2rad([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def base_dataset(sop_class: str = MR_IMAGE_STORAGE, **tags: Any) -> Dataset:
    """A dataset with file meta (explicit VR little endian) and the given tags."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def write_series(
    directory: Path,
    pixels: np.ndarray | None = None,
    *,
    sequence: str = "T1w",
    row_cosine: Sequence[float] = (1.0, 0.0, 0.0),
    col_cosine: Sequence[float] = (0.0, 1.0, 0.0),
    origin: Sequence[float] = (-3.0, -2.5, 10.0),
    pixel_spacing: tuple[float, float] = (0.8, 0.6),
    slice_step: float = 2.0,
    positions: np.ndarray | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    study_date: str = "20240225",
    study_time: str = "101500",
    series_number: int = 3,
    names: Sequence[str] | None = None,
    instance_numbers: Sequence[int] | None = None,
    rescale: tuple[float, float] | None = None,
    tags: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> SeriesInfo:
    """Write one slice per file into `directory` and return what was written.

    Parameters
    ----------
    pixels : ndarray of shape (n, rows, cols), optional
        Stored values (uint16); default :func:`ramp_pixels`.
    row_cosine, col_cosine : 3 floats
        ImageOrientationPatient (LPS); the slice normal is their cross product.
    origin : 3 floats
        ImagePositionPatient of slice 0, mm.
    pixel_spacing : (float, float)
        DICOM PixelSpacing (between rows, between columns), mm.
    slice_step : float
        Signed step along the normal between consecutive slices, mm.
    positions : ndarray of shape (n, 3), optional
        Explicit ImagePositionPatient per slice (overrides origin/slice_step).
    names : sequence of str, optional
        File names (relative to `directory`, may contain sub-folders); default random hex
        names without extension.
    instance_numbers : sequence of int, optional
        Default: a random permutation, unrelated to the position.
    rescale : (slope, intercept), optional
        RescaleSlope and RescaleIntercept written into every file.
    tags : mapping, optional
        Extra or overriding tags for every file (after the sequence tags).
    """
    rng = np.random.default_rng(seed)
    pixels = ramp_pixels() if pixels is None else np.asarray(pixels)
    n, rows, cols = pixels.shape
    row = np.asarray(row_cosine, dtype=float)
    col = np.asarray(col_cosine, dtype=float)
    normal = np.cross(row, col)
    if positions is None:
        positions = np.asarray(origin, float) + np.outer(np.arange(n) * slice_step, normal)
    positions = np.asarray(positions, dtype=float)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    if names is None:
        names = [rng.bytes(6).hex() for _ in range(n)]
    if instance_numbers is None:
        instance_numbers = [int(i) + 1 for i in rng.permutation(n)]
    directory = Path(directory)
    files: list[Path] = []
    for k in range(n):
        ds = base_dataset(
            Modality="MR", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
            FrameOfReferenceUID=frame_uid, StudyDate=study_date, StudyTime=study_time,
            SeriesNumber=series_number, InstanceNumber=instance_numbers[k],
            Manufacturer="SIEMENS", MagneticFieldStrength=1.5, PatientPosition="HFS",
            **PATIENT_TAGS)
        for key, value in SEQUENCE_TAGS[sequence].items():
            setattr(ds, key, value)
        ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
        ds.ImagePositionPatient = [float(v) for v in positions[k]]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = abs(slice_step) * 0.9  # a gap: thickness is not the spacing
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        for key, value in (tags or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype="<u2").tobytes()
        path = directory / names[k]
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return SeriesInfo(files=files, positions=positions, row_cosine=row, col_cosine=col,
                      pixel_spacing=pixel_spacing, pixels=pixels, study_uid=study_uid,
                      series_uid=series_uid)


def edit_file(path: Path, **changes: Any) -> None:
    """Set tags of an existing file (a value of None deletes the tag)."""
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def write_dicomdir(path: Path) -> None:
    """A minimal DICOMDIR (Media Storage Directory Storage, no image)."""
    ds = base_dataset(MEDIA_STORAGE_DIRECTORY, FileSetID="EXPORT",
                      DirectoryRecordSequence=[])
    del ds.SOPClassUID, ds.SOPInstanceUID  # a DICOMDIR carries these in its file meta only
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_structured_report(path: Path, study_uid: str) -> None:
    """A Basic Text SR object: DICOM, same study, but no image."""
    ds = base_dataset(BASIC_TEXT_SR, Modality="SR", StudyInstanceUID=study_uid,
                      SeriesInstanceUID=generate_uid(), StudyDate="20240225",
                      **PATIENT_TAGS)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def write_enhanced(
    path: Path,
    volumes: Sequence[np.ndarray],
    *,
    row_cosine: Sequence[float] = (1.0, 0.0, 0.0),
    col_cosine: Sequence[float] = (0.0, 1.0, 0.0),
    origin: Sequence[float] = (-3.0, -2.5, 10.0),
    pixel_spacing: tuple[float, float] = (0.8, 0.6),
    slice_step: float = 2.0,
    frame_types: Sequence[Sequence[str]] | None = None,
    echo_times: Sequence[float] | None = None,
    rescale: Sequence[tuple[float, float]] | None = None,
    frame_order: Sequence[int] | None = None,
    study_uid: str | None = None,
    series_number: int = 7,
) -> list[np.ndarray]:
    """One enhanced MR multi-frame file holding `volumes` (each (n, rows, cols) stored values).

    Geometry goes into PlanePosition/PlaneOrientation/PixelMeasures per frame; rescale
    (slope, intercept) per frame k is ``rescale[k]`` (default none); frames are written in
    `frame_order` (a permutation of all frames, default volume-major). Returns, per frame
    written, the stored array.
    """
    from pydicom.sequence import Sequence as DicomSequence

    row = np.asarray(row_cosine, float)
    col = np.asarray(col_cosine, float)
    normal = np.cross(row, col)
    n_vol = len(volumes)
    n, rows, cols = volumes[0].shape
    all_frames = [(v, k) for v in range(n_vol) for k in range(n)]
    order = list(frame_order) if frame_order is not None else list(range(len(all_frames)))
    ds = base_dataset(ENHANCED_MR_IMAGE_STORAGE, Modality="MR",
                      StudyInstanceUID=study_uid or generate_uid(),
                      SeriesInstanceUID=generate_uid(), StudyDate="20240225",
                      StudyTime="101500", SeriesNumber=series_number, InstanceNumber=1,
                      Manufacturer="Philips Medical Systems", PatientPosition="HFS",
                      SeriesDescription="enhanced test", ImageType=["ORIGINAL", "PRIMARY",
                                                                    "M", "MIXED"],
                      **PATIENT_TAGS)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [float(v) for v in pixel_spacing]
    measures.SliceThickness = abs(slice_step)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    timing = Dataset()
    timing.RepetitionTime = 550.0
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    written = []
    for index in order:
        v, k = all_frames[index]
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [float(x) for x in np.asarray(origin, float)
                                    + k * slice_step * normal]
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [v + 1, k + 1]
        item.FrameContentSequence = DicomSequence([content])
        if frame_types is not None:
            ftype = Dataset()
            ftype.FrameType = list(frame_types[v])
            item.MRImageFrameTypeSequence = DicomSequence([ftype])
        if echo_times is not None:
            echo = Dataset()
            echo.EffectiveEchoTime = float(echo_times[v])
            item.MREchoSequence = DicomSequence([echo])
        if rescale is not None:
            transform = Dataset()
            transform.RescaleSlope, transform.RescaleIntercept = rescale[index]
            item.PixelValueTransformationSequence = DicomSequence([transform])
        per_frame.append(item)
        written.append(volumes[v][k])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.NumberOfFrames = len(order)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(np.stack(written), dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return written
