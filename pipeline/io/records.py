"""What the DICOM index finds: one file's header (:class:`FileHeader`), the volumes and series
of a folder (:class:`VolumeRecord`, :class:`SeriesRecord`), the files it could not index
(:class:`Problem`) and the whole result (:class:`IndexResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.io.dicom_frames import FrameInfo
from pipeline.io.identity import PatientGroup, PatientIdentity

INDEX_COLUMNS: tuple[str, ...] = (
    "study_uid", "study_date", "study_time", "series_uid", "series_number",
    "series_description", "modality", "sequence_class", "orientation", "n_files", "rows",
    "columns", "pixel_spacing_mm", "slice_spacing_mm", "status", "reason", "volumes",
    "patient_fingerprint",
)


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
    #: pseudonymous fingerprint of the patient
    #: (:func:`pipeline.io.identity.patient_fingerprint`); '' = not grouped
    patient_fingerprint: str = ""
    #: the patient identity of the series' files (never written anywhere)
    identity: PatientIdentity = field(default_factory=lambda: PatientIdentity(), repr=False)
    #: left-right range (LPS x, mm) of the voxel centres; None when not placed
    x_range_mm: tuple[float, float] | None = None
    #: the Laterality (else ImageLaterality) tag of the first file, '' when absent
    laterality_tag: str = ""

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
    """Everything :func:`pipeline.io.scan.index_folder` found.

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
    #: the patients of the folder (:func:`pipeline.io.identity.group_patients`), most studies
    #: first
    patients: tuple[PatientGroup, ...] = ()
    #: findings about the folder as a whole (StudyInstanceUIDs reused on several dates)
    warnings: tuple[str, ...] = ()
