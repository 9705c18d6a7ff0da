"""DICOM Segmentation and TID 1500 Structured Report of one session, on the source series.

Per session (needs the source DICOM series listed in ``sessions.json``):
    ``..._seg.dcm``  DICOM Segmentation (BINARY) on the source fluid-sensitive series, one
                     segment per label value (segment number = label value, 1..8), then one
                     segment per composite structure of ``volumes.tsv`` (limb, soft tissue,
                     bone per side), so that every volume has a segment of its own;
    ``..._sr.dcm``   Comprehensive 3D SR, TID 1500 Measurement Report: per side and structure
                     a TID 1411 volumetric ROI group with the volume (mL, UCUM ``ml``) of
                     ``volumes.tsv``, referencing its segment in the SEG.

Coding (DICOM PS3.16 context groups, as listed by pydicom's code dictionaries):
    categories from CID 7150; soft tissue 87784001 and bone tissue 3138006 from CID 7166
    (Common Tissue Segmentation Types) under category Tissue; edema 79654002 and lesion
    52988006 from CID 7159 (Lesion Segmentation Types) under Morphologically Abnormal
    Structure. The marrow lesion is coded Lesion, not Neoplasm: it is an imaging finding
    (fluid-bright marrow) that may be inflammatory (pseudo-progression). Lower/upper limb
    (CID 7192 / CID 4031) is the anatomic region, its laterality (CID 244 Right/Left) an
    Anatomic Region Modifier; the whole-limb segments also carry it as Segmented Property
    Type Modifier, as for paired anatomical structures.

A session whose legs are in two series of the study (issue 18: the index's role entry has
``parts``, convert composed them on the *reference* series' lattice, extended to hold the other
leg; ``SplitSeries`` of the fluid sidecar) still gets one SEG and one SR. highdicom builds a
SEG from source images of one series only, so:
    * the SEG's frames lie on the label map's own grid (:func:`label_map_grid`: the reference
      series' orientation, pixel spacing and slice step over the label map's box), given to
      highdicom as plane positions, orientation and pixel measures; its Frame of Reference,
      patient and study are the reference series' (its ``source_images``);
    * the other leg's series is a further source (``further_source_images``): it is listed
      with the reference in the Source Image Sequence and in the Referenced Series Sequence of
      the Common Instance Reference module, and a frame coplanar with its slices names them in
      its Derivation Image Sequence (Spatial Locations Preserved NO). Both series must be of
      one study (DICOM: all sources of a SEG are);
    * in the SR, each TID 1411 group's "Source series for segmentation" is the series that
      imaged that leg (TID 1411 allows one per referenced segment; the segment of a leg was
      made from that series' voxels), and the evidence lists both series and the SEG.
Segment specifications, tracking UIDs and SR content are those of a bilateral session.

Volumes in the SR are those of ``volumes.tsv``: counted over the field of view common to all
sessions (docs/design.md), which may be less than the whole segment. Each measurement therefore
names its method with a local code (``99LMBTRK``); :func:`export_dicom` also returns the
whole-segment volume for comparison.

A volume that is not available (``n/a`` in ``volumes.tsv``: a QC exclude flag, see
:mod:`pipeline.qc`) is never written as a number: its TID 1411 group (same tracking UID and
segment as in the other sessions) carries no measurement, only a qualitative evaluation
"Volume not available" (``99LMBTRK NOTAVAILABLE``) whose value is the QC code (``99LMBTRK``,
e.g. ``registration_failed``; ``NOTMEASURED`` when volumes.tsv names none). The codes also come
back in :class:`SessionExport` ``not_available`` and are printed by the command line.

The DICOM objects carry the patient and study identification of the source series (PACS
needs it to file them); the label tables (:mod:`pipeline.export.tables`)
carry none.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pipeline import __version__
from pipeline.baseline import baseline_position
from pipeline.export import ExportError
from pipeline.io.files import atomic_path, finite_float, mm3_to_ml, read_tsv
from pipeline.labels import (
    LABEL_COLORS,
    LABEL_NAMES,
    SIDES,
    STRUCTURES,
    label_value,
    structure_labels,
)

#: Largest distance (mm) between a voxel centre of the label map and of the source series.
GEOMETRY_TOLERANCE_MM = 0.05

SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002

#: UID root of pydicom (the phantom uses it too); the suffix is a hash of the inputs.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

ML = Code("ml", "UCUM", "milliliter")

#: Local (private) coding scheme for what no standard code says.
LOCAL_SCHEME = "99LMBTRK"
COMMON_EXTENT_METHOD = Code(
    "COMMONEXTENT", LOCAL_SCHEME, "Voxel volume within the extent common to all sessions"
)
#: Qualitative evaluation of a volume that is not available (QC exclude flag), never a 0.
NOT_AVAILABLE = Code("NOTAVAILABLE", LOCAL_SCHEME, "Volume not available")
NOT_MEASURED = Code("NOTMEASURED", LOCAL_SCHEME, "Not measured (n/a in volumes.tsv)")


def qc_code(code: str) -> Code:
    """The local code of a QC flag code (``registration_failed`` -> 'registration failed')."""
    return Code(code, LOCAL_SCHEME, code.replace("_", " ")[:64])



#: Colours of the composite-structure segments (Okabe-Ito; the tissue labels use labels.py).
_STRUCTURE_COLORS = {
    "limb": (153, 153, 153),
    "soft_tissue": (0, 158, 115),
    "bone": (0, 114, 178),
}

#: Type 2 patient/study attributes highdicom copies from the source (present, maybe empty).
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                 "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                 "ReferringPhysicianName")

_LATERALITY = {"right": codes.SCT.Right, "left": codes.SCT.Left}
_LOWER_LIMB_PARTS = ("LEG", "THIGH", "KNEE", "LOWER", "CALF", "ANKLE", "FOOT", "HIP", "FEMUR",
                     "TIBIA")
_UPPER_LIMB_PARTS = ("ARM", "UPPER", "ELBOW", "SHOULDER", "WRIST", "HAND", "HUMERUS")



# ----------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class SegmentSpec:
    """One DICOM segment: which label values it covers and how it is coded."""

    number: int
    label: str
    description: str
    side: str
    labels: tuple[int, ...]
    category: Code
    property_type: Code
    color: tuple[int, int, int]
    #: the volumes.tsv structure whose volume this segment is, if any
    structure: str | None = None
    primary_structure: Code | None = None
    type_has_laterality: bool = False


def limb_region(body_part: str | None) -> Code:
    """Anatomic region from BodyPartExamined: lower limb, upper limb, or limb."""
    part = (body_part or "").upper()
    if any(word in part for word in _LOWER_LIMB_PARTS):
        return codes.SCT.LowerLimb
    if any(word in part for word in _UPPER_LIMB_PARTS):
        return codes.SCT.UpperLimb
    return codes.SCT.LimbStructure


def segment_specs(region: Code) -> list[SegmentSpec]:
    """Segments 1..8 = label values; then limb, soft tissue and bone per side (overlapping)."""
    tissue_codes = {
        1: (codes.SCT.Tissue, codes.SCT.SoftTissue, None, "soft tissue without edema"),
        2: (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Edema, None,
            "edema (fluid-sensitive hyperintense soft tissue)"),
        3: (codes.SCT.Tissue, codes.SCT.BoneTissue, None, "bone: cortex and normal marrow"),
        4: (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion,
            codes.SCT.BoneMarrow, "marrow lesion"),
    }
    tissue_structure = {2: "edema", 4: "marrow_lesion"}
    specs: list[SegmentSpec] = []
    for side in SIDES:
        for tissue, (category, ptype, primary, what) in tissue_codes.items():
            value = label_value(side, tissue)
            specs.append(SegmentSpec(
                number=value, label=LABEL_NAMES[value],
                description=f"{side} {what}; label value {value}", side=side,
                labels=(value,), category=category, property_type=ptype, color=LABEL_COLORS[value],
                structure=tissue_structure.get(tissue), primary_structure=primary))
    specs.sort(key=lambda s: s.number)
    composite = {
        "limb": (codes.SCT.AnatomicalStructure, region, True, "limb: all tissue of the side"),
        "soft_tissue": (codes.SCT.Tissue, codes.SCT.SoftTissue, False,
                        "soft tissue including edema (limb minus bone and lesion)"),
        "bone": (codes.SCT.Tissue, codes.SCT.BoneTissue, False,
                 "bone including marrow lesion"),
    }
    number = len(specs)
    for side in SIDES:
        for structure, (category, ptype, lateral, what) in composite.items():
            number += 1
            labels = structure_labels(side, structure)
            specs.append(SegmentSpec(
                number=number, label=f"{side} {structure.replace('_', ' ')} (structure)",
                description=f"{side} {what}; label values {', '.join(map(str, labels))}",
                side=side, labels=labels, category=category, property_type=ptype,
                color=_STRUCTURE_COLORS[structure], structure=structure,
                type_has_laterality=lateral))
    return specs


def structure_segment(specs: Sequence[SegmentSpec], side: str, structure: str) -> SegmentSpec:
    """The segment whose voxels are `structure` on `side`."""
    for spec in specs:
        if spec.side == side and spec.structure == structure:
            return spec
    raise KeyError(f"no segment for {side} {structure}")


def _uid(*parts: object) -> str:
    """A UID derived from `parts` (same inputs, same UID)."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def tracking_uid(subject: str, side: str, structure: str) -> str:
    """Tracking UID of a structure of a subject: the same in every session, so that viewers
    (e.g. Slicer QuantitativeReporting) follow it over time."""
    return _uid("limbtrack-tracking", subject, side, structure)


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a stack of parallel planes: (n slices, rows, cols) in patient space."""

    row_cosine: NDArray[np.float64]  # direction of increasing column index
    col_cosine: NDArray[np.float64]  # direction of increasing row index
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    positions_mm: NDArray[np.float64]  # (n, 3) position of each plane's first voxel, LPS
    shape: tuple[int, int, int]

    def voxel_centres_lps(self) -> NDArray[np.float64]:
        """(n, rows, cols, 3) LPS position (mm) of every voxel centre."""
        _, rows, cols = self.shape
        r = np.arange(rows, dtype=float)[:, None, None] * self.pixel_spacing_mm[0]
        c = np.arange(cols, dtype=float)[None, :, None] * self.pixel_spacing_mm[1]
        plane = r * self.col_cosine + c * self.row_cosine  # (rows, cols, 3)
        out: NDArray[np.float64] = self.positions_mm[:, None, None, :] + plane[None]
        return out


@dataclass(frozen=True)
class SourceSeries:
    """The source fluid-sensitive series: datasets (no pixels) in slice order, geometry."""

    datasets: list[pydicom.Dataset]
    files: list[Path]
    row_cosine: NDArray[np.float64]  # direction of increasing column index
    col_cosine: NDArray[np.float64]  # direction of increasing row index
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    positions_mm: NDArray[np.float64]  # (n, 3) ImagePositionPatient per slice, LPS

    @property
    def shape(self) -> tuple[int, int, int]:
        ds = self.datasets[0]
        return len(self.datasets), int(ds.Rows), int(ds.Columns)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def grid(self) -> Grid:
        """The series' own voxel grid."""
        return Grid(self.row_cosine, self.col_cosine, self.pixel_spacing_mm, self.positions_mm,
                    self.shape)

    def voxel_centres_lps(self) -> NDArray[np.float64]:
        """(n, rows, cols, 3) LPS position (mm) of every voxel centre."""
        return self.grid.voxel_centres_lps()


@dataclass(frozen=True)
class SessionSources:
    """The source fluid-sensitive series of a session: one series holding both legs, or one
    series per leg (issue 18, the ``parts`` of the index's role entry).

    ``reference`` gives the SEG its source images, Frame of Reference, patient and study: the
    only series of a bilateral session, else the series whose grid the session's image (and
    label map) extends (``SplitSeries.reference_side`` of the fluid sidecar). ``by_side`` is the
    series that imaged each leg: the SR names it as the source series of that leg's segments.
    """

    reference: SourceSeries
    by_side: Mapping[str, SourceSeries]

    @classmethod
    def bilateral(cls, source: SourceSeries) -> SessionSources:
        """One series holding both legs."""
        return cls(source, {side: source for side in SIDES})

    @property
    def split(self) -> bool:
        """Whether the legs are in separate series."""
        return len({s.series_uid for s in self.by_side.values()}) > 1

    def further(self) -> list[pydicom.Dataset]:
        """The images of the series other than the reference (the other leg's)."""
        uids = {self.reference.series_uid}
        out: list[pydicom.Dataset] = []
        for side in SIDES:
            series = self.by_side[side]
            if series.series_uid not in uids:
                uids.add(series.series_uid)
                out += series.datasets
        return out

    def description(self) -> str:
        """The source series' descriptions, reference first."""
        names = [str(self.reference.datasets[0].get("SeriesDescription", ""))]
        names += [str(self.by_side[side].datasets[0].get("SeriesDescription", ""))
                  for side in SIDES if self.by_side[side] is not self.reference]
        return " + ".join(names)


def read_source_series(files: Sequence[Path | str]) -> SourceSeries:
    """Read the headers of a classic single-frame series and sort the slices along the normal.

    Raises
    ------
    ExportError
        Missing files or geometry, multi-frame files, mixed series or orientations.
    """
    if not files:
        raise ExportError("sessions.json lists no source DICOM files for the fluid series")
    datasets: list[pydicom.Dataset] = []
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise ExportError(f"{path}: source DICOM file not found; the DICOM export needs "
                              "the study folder the workflow indexed")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise ExportError(f"{path}: multi-frame (enhanced) source images are not supported "
                              "by the DICOM export yet; use the NIfTI label map")
        for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
                        "FrameOfReferenceUID"):
            if keyword not in ds:
                raise ExportError(f"{path}: no {keyword}; cannot place the segmentation")
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:  # anonymised exports drop them; DICOM allows them empty
                setattr(ds, keyword, "")
        datasets.append(ds)
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) != 1:
        raise ExportError(f"{paths[0].parent}: the fluid files belong to {len(series)} series")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    for item, path in zip(datasets, paths, strict=True):
        if np.max(np.abs(np.asarray(item.ImageOrientationPatient, float) - iop)) > 1e-4:
            raise ExportError(f"{path}: slice orientation differs within the series")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    spacing = tuple(float(v) for v in datasets[0].PixelSpacing)
    return SourceSeries(
        datasets=[datasets[i] for i in order], files=[paths[i] for i in order],
        row_cosine=row, col_cosine=col, pixel_spacing_mm=(spacing[0], spacing[1]),
        positions_mm=positions[order])


def label_map_grid(dseg: Path, reference: SourceSeries,
                   tolerance_mm: float = GEOMETRY_TOLERANCE_MM) -> Grid:
    """The label map's own grid as planes parallel to `reference`'s slices, in its order.

    The image of a session whose legs are in two series is composed on the finer series'
    lattice (same orientation, pixel spacing and slice step), extended by whole voxels to hold
    the other leg (:mod:`pipeline.io.split`); its label map is on that grid. This is that
    lattice over the label map's box; :func:`labels_on_source_grid` then reads the labels onto
    it one to one.

    Raises
    ------
    ExportError
        The label map's corner voxels are off `reference`'s lattice by more than
        `tolerance_mm`, or its box does not hold `reference`'s field of view.
    """
    img = nib.load(str(dseg))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image) or len(img.shape) != 3:
        raise ExportError(f"{dseg}: not a 3D NIfTI label map")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    index_to_lps = ras_to_lps @ np.asarray(img.affine, dtype=np.float64)
    corners = np.array([[i, j, k, 1.0] for i in (0, img.shape[0] - 1)
                        for j in (0, img.shape[1] - 1) for k in (0, img.shape[2] - 1)])
    points = (corners @ index_to_lps.T)[:, :3] - reference.positions_mm[0]
    normal = np.cross(reference.row_cosine, reference.col_cosine)
    step_mm = _slice_step_mm(reference)
    # lattice coordinates (slice, row, column) of `reference`, and their steps in mm
    steps_mm = np.array([step_mm, *reference.pixel_spacing_mm])
    lattice = np.stack([normal, reference.col_cosine, reference.row_cosine])
    coords = points @ lattice.T / steps_mm
    nearest = np.rint(coords)
    off_mm = float(np.max(np.linalg.norm((coords - nearest) * steps_mm, axis=1)))
    if off_mm > tolerance_mm:
        raise ExportError(
            f"{dseg}: label map grid is off the lattice of the reference series "
            f"{reference.series_uid} by up to {off_mm:.3f} mm (tolerance {tolerance_mm} mm); "
            "it is not on the session image's grid")
    lo, hi = nearest.min(axis=0).astype(int), nearest.max(axis=0).astype(int)
    if np.any(lo > 0) or np.any(hi < np.asarray(reference.shape) - 1):
        raise ExportError(f"{dseg}: the label map does not hold the field of view of the "
                          f"reference series {reference.series_uid}")
    n_ref = len(reference.positions_mm)
    in_plane = (lo[1] * reference.pixel_spacing_mm[0] * reference.col_cosine
                + lo[2] * reference.pixel_spacing_mm[1] * reference.row_cosine)
    # the reference's own slice positions where it has the slice (exact plane matches)
    positions = np.array([
        (reference.positions_mm[k] if 0 <= k < n_ref
         else reference.positions_mm[0] + k * step_mm * normal) + in_plane
        for k in range(lo[0], hi[0] + 1)])
    shape = tuple(int(v) for v in hi - lo + 1)
    return Grid(reference.row_cosine, reference.col_cosine, reference.pixel_spacing_mm,
                positions, (shape[0], shape[1], shape[2]))


def labels_on_source_grid(
    dseg: Path, source: SourceSeries | Grid, tolerance_mm: float = GEOMETRY_TOLERANCE_MM
) -> NDArray[np.uint8]:
    """The label map resampled (by index only, no interpolation) onto the source slices
    (a series, or a :class:`Grid` such as :func:`label_map_grid`'s).

    Every voxel centre of the source series must coincide with one of the label map within
    `tolerance_mm`, one to one; otherwise the label map is not on the source grid.

    Returns
    -------
    labels : ndarray of shape (n_slices, rows, cols), uint8, in the source's slice order.

    Raises
    ------
    ExportError
        Grids differ (size, spacing, orientation or position), or values outside 0..8.
    """
    img = nib.load(str(dseg))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ExportError(f"{dseg}: not a NIfTI image")
    data = np.asarray(img.dataobj)
    if data.ndim != 3:
        raise ExportError(f"{dseg}: label map has {data.ndim} dimensions, expected 3")
    if not np.issubdtype(data.dtype, np.integer) and not np.all(np.mod(data, 1) == 0):
        raise ExportError(f"{dseg}: label map holds non-integer values")
    if data.size and (data.min() < 0 or data.max() > max(LABEL_NAMES)):
        raise ExportError(f"{dseg}: label values outside 0..{max(LABEL_NAMES)}")
    n, rows, cols = source.shape
    if data.size != n * rows * cols:
        raise ExportError(
            f"{dseg}: label map has {data.shape} voxels, the source series {n} slices of "
            f"{rows}x{cols}; it is not on the source grid (was the series re-exported?)")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = np.asarray(img.affine, dtype=np.float64)
    lps_to_index = np.linalg.inv(ras_to_lps @ affine)
    centres = source.voxel_centres_lps().reshape(-1, 3)
    index = centres @ lps_to_index[:3, :3].T + lps_to_index[:3, 3]
    nearest = np.rint(index)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)  # mm per index step along each axis
    off_mm = float(np.max(np.linalg.norm((index - nearest) * zooms, axis=1))) if index.size else 0
    if off_mm > tolerance_mm:
        raise ExportError(
            f"{dseg}: label map grid is off the source series grid by up to {off_mm:.3f} mm "
            f"(tolerance {tolerance_mm} mm); it is not on the fluid series' grid")
    ijk = nearest.astype(np.int64)
    shape = np.asarray(data.shape)
    if np.any(ijk < 0) or np.any(ijk >= shape):
        raise ExportError(f"{dseg}: source voxels fall outside the label map; the grids "
                          "cover different regions")
    flat = np.ravel_multi_index(ijk.T, data.shape)
    if np.unique(flat).size != flat.size:
        raise ExportError(f"{dseg}: several source voxels map to one label voxel; the grids "
                          "differ in spacing")
    out: NDArray[np.uint8] = data.ravel(order="C")[flat].reshape(n, rows, cols).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- DICOM objects


def _segment_description(
    spec: SegmentSpec, region: Code, algorithm: Any, subject: str
) -> Any:
    import highdicom as hd
    from pydicom.dataset import Dataset

    desc = hd.seg.SegmentDescription(
        segment_number=spec.number,
        segment_label=spec.label,
        segmented_property_category=spec.category,
        segmented_property_type=spec.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=(None if spec.structure is None
                      else tracking_uid(subject, spec.side, spec.structure)),
        tracking_id=None if spec.structure is None else f"{spec.side} {spec.structure}",
        anatomic_regions=[region],
        primary_anatomic_structures=(None if spec.primary_structure is None
                                     else [spec.primary_structure]),
        display_color=hd.color.CIELabColor.from_rgb(*spec.color),
    )
    desc.SegmentDescription = spec.description[:64]
    laterality = hd.sr.CodedConcept.from_code(_LATERALITY[spec.side])
    desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [laterality]
    if spec.type_has_laterality:
        modifier = Dataset()
        for key in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning"):
            setattr(modifier, key, getattr(laterality, key))
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            modifier]
    return desc


def _algorithm() -> Any:
    import highdicom as hd

    # CID 7162: thresholds on the T1-weighted and fluid-sensitive images together
    return hd.AlgorithmIdentificationSequence(
        name="limbtrack", family=codes.cid7162.MultispectralProcessing, version=__version__)


def segment_masks(labels: NDArray[np.integer[Any]], specs: Sequence[SegmentSpec]
                  ) -> NDArray[np.bool_]:
    """(n, rows, cols, n_segments) boolean masks, segment k+1 in channel k."""
    return np.stack([np.isin(labels, spec.labels) for spec in specs], axis=-1)


def _plane_geometry(grid: Grid, reference: SourceSeries) -> dict[str, Any]:
    """highdicom's plane positions, orientation and pixel measures of `grid`'s planes."""
    import highdicom as hd

    patient = hd.CoordinateSystemNames.PATIENT
    thickness = getattr(reference.datasets[0], "SliceThickness", None)
    return {
        "plane_positions": [hd.PlanePositionSequence(patient, [float(v) for v in position])
                            for position in grid.positions_mm],
        "plane_orientation": hd.PlaneOrientationSequence(
            patient, [float(v) for v in (*grid.row_cosine, *grid.col_cosine)]),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=list(grid.pixel_spacing_mm),
            slice_thickness=float(thickness) if thickness else _slice_step_mm(reference),
            spacing_between_slices=_slice_step_mm(reference)),
    }


def build_segmentation(
    sources: SessionSources, labels: NDArray[np.uint8], subject: str,
    content_hash: str, grid: Grid | None = None,
) -> tuple[Any, list[SegmentSpec]]:
    """The DICOM Segmentation (highdicom) of `labels`. Returns (seg, specs).

    Without `grid`, `labels` are on the source images of the reference series, slice for
    slice. With `grid` (a session whose legs are in two series: the label map's own grid,
    :func:`label_map_grid`) the frames carry `grid`'s plane positions; the reference series
    is the source of the geometry (Frame of Reference, patient, study) and the other leg's
    series is recorded as a further source (Source Image Sequence and the Referenced Series
    Sequence of the Common Instance Reference module)."""
    import highdicom as hd

    first = sources.reference.datasets[0]
    region = limb_region(getattr(first, "BodyPartExamined", None))
    specs = segment_specs(region)
    algorithm = _algorithm()
    descriptions = [_segment_description(s, region, algorithm, subject) for s in specs]
    series_uid = str(first.SeriesInstanceUID)
    placement: dict[str, Any] = {}
    if grid is not None:
        placement = _plane_geometry(grid, sources.reference)
    further = sources.further()
    if further:
        placement["further_source_images"] = further
    seg = hd.seg.Segmentation(
        source_images=sources.reference.datasets,
        pixel_array=segment_masks(labels, specs),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid("seg-series", series_uid, content_hash, __version__),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=_uid("seg-instance", series_uid, content_hash, __version__),
        instance_number=1,
        manufacturer="limbtrack",
        manufacturer_model_name="limbtrack",
        software_versions=__version__,
        device_serial_number="1",
        series_description=f"limbtrack segmentation ({sources.description()})"[:64],
        content_label="LIMBTRACK",
        content_description="Limb soft tissue, edema, bone and marrow lesion per side",
        omit_empty_frames=True,
        **placement,
    )
    return seg, specs


@dataclass(frozen=True)
class VolumeRow:
    """One row of volumes.tsv; ``volume_ml`` None when not available (``qc`` says why)."""

    side: str
    structure: str
    volume_ml: float | None
    day: int
    study_date: str
    qc: tuple[str, ...] = ()


def _qc_codes(value: str | None) -> tuple[str, ...]:
    """The codes of a ``qc`` cell (comma-separated; ``n/a`` or empty when none)."""
    return tuple(c.strip() for c in (value or "").split(",") if c.strip() not in ("", "n/a"))


def session_rows(volumes_tsv: Path, study_date: str) -> list[VolumeRow]:
    """Every row of `volumes_tsv` for the session of `study_date` (YYYY-MM-DD), available or
    not (``volume_ml`` None for ``n/a``, never 0)."""
    rows = [r for r in read_tsv(volumes_tsv) if r["study_date"] == study_date]
    if not rows:
        raise ExportError(f"{volumes_tsv}: no volumes for study date {study_date}; run the "
                          "measure step first")
    return [VolumeRow(r["side"], r["structure"], finite_float(r.get("volume_ml")), int(r["day"]),
                      r["study_date"], _qc_codes(r.get("qc"))) for r in rows]


def session_volumes(volumes_tsv: Path, study_date: str) -> list[VolumeRow]:
    """The rows of :func:`session_rows` whose volume is available; an ``n/a`` volume (a QC
    exclude flag) is skipped. Empty when none of the session's volumes is available."""
    return [r for r in session_rows(volumes_tsv, study_date) if r.volume_ml is not None]


def unavailable_volumes(volumes_tsv: Path, study_date: str) -> dict[tuple[str, str], list[str]]:
    """``(side, structure) -> QC codes`` of the session's volumes that are not available."""
    return {(r.side, r.structure): list(r.qc)
            for r in session_rows(volumes_tsv, study_date) if r.volume_ml is None}


def baseline_date(volumes_tsv: Path) -> str:
    """Baseline study date (:func:`pipeline.baseline.baseline_position` over the sessions of
    `volumes_tsv` in date order)."""
    dated = sorted({(r["study_date"], int(r["day"])) for r in read_tsv(volumes_tsv)})
    return dated[baseline_position([day for _, day in dated])][0]


def _time_point(row: VolumeRow, baseline_study_date: str, order: int) -> Any:
    """TID 1502 time point of the session of `row` (baseline, pre- or post-treatment)."""
    import highdicom as hd

    if row.study_date == baseline_study_date:
        point_type = codes.UMLS.Baseline
    elif row.day > 0:
        point_type = codes.DCM.Posttreatment
    else:
        point_type = codes.UMLS.Pretreatment
    return hd.sr.TimePointContext(
        time_point=f"day {row.day}", time_point_type=point_type, time_point_order=order,
        subject_time_point_identifier=row.study_date)


def _not_available(row: VolumeRow) -> list[Any]:
    """Qualitative evaluations saying why `row` has no volume (one per QC code)."""
    import highdicom as hd

    values = [qc_code(c) for c in row.qc] or [NOT_MEASURED]
    return [hd.sr.QualitativeEvaluation(name=NOT_AVAILABLE, value=v) for v in values]


def _volume_group(row: VolumeRow, spec: SegmentSpec, seg: Any, series_uid: str, region: Code,
                  time_point: Any, subject: str) -> Any:
    """The TID 1411 volumetric ROI group of one side and structure: its volume, or, when not
    available, a qualitative 'not available' evaluation naming the QC codes (never a 0)."""
    import highdicom as hd

    algorithm = hd.sr.AlgorithmIdentification(name="limbtrack", version=__version__)
    measurements = None
    if row.volume_ml is not None:
        measurements = [hd.sr.Measurement(
            name=codes.SCT.Volume, value=row.volume_ml, unit=ML,
            method=COMMON_EXTENT_METHOD, algorithm_id=algorithm)]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(subject, row.side, row.structure),
            identifier=f"{row.side} {row.structure}"),
        # the source series, not its images: an empty segment has no source image
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
            segment_number=spec.number,
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid)),
        time_point_context=time_point,
        finding_type=spec.property_type,
        finding_category=spec.category,
        finding_sites=[hd.sr.FindingSite(anatomic_location=region,
                                         laterality=_LATERALITY[row.side])],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=_not_available(row) if measurements is None else None,
    )


def build_report(
    sources: SessionSources, seg: Any, specs: Sequence[SegmentSpec],
    volumes: Sequence[VolumeRow], subject: str, baseline_study_date: str,
    time_point_order: int, content_hash: str,
) -> Any:
    """TID 1500 Measurement Report (Comprehensive 3D SR) carrying `volumes`, one TID 1411
    group per side and structure referencing its segment in `seg`; its source series for
    segmentation is the series that imaged that side (the one series of a bilateral session).

    `volumes` are rows of :func:`session_rows`: a row whose volume is not available gets a
    group without measurement, with a qualitative 'not available' evaluation (its QC codes);
    rows of :func:`session_volumes` (available only) give measurements only."""
    import highdicom as hd

    first = sources.reference.datasets[0]
    region = limb_region(getattr(first, "BodyPartExamined", None))
    series_uid = str(first.SeriesInstanceUID)
    side_order: dict[str, int] = {s: i for i, s in enumerate(SIDES)}
    order = {s: i for i, s in enumerate(STRUCTURES)}
    if not volumes:
        raise ExportError("no volumes to report")
    time_point = _time_point(volumes[0], baseline_study_date, time_point_order)
    groups = [
        _volume_group(row, structure_segment(specs, row.side, row.structure), seg,
                      sources.by_side[row.side].series_uid, region, time_point, subject)
        for row in sorted(volumes, key=lambda r: (side_order[r.side], order[r.structure]))
    ]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("limbtrack-device", __version__), name="limbtrack",
            manufacturer_name="limbtrack", model_name="limbtrack"),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.MRIUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources.reference.datasets, *sources.further(), seg],
        content=report,
        series_instance_uid=_uid("sr-series", series_uid, content_hash, __version__),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid("sr-instance", series_uid, content_hash, __version__),
        instance_number=1,
        manufacturer="limbtrack",
        series_description="limbtrack volumes (mL)",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    _declare_local_scheme(sr)
    return sr


def _declare_local_scheme(ds: pydicom.Dataset) -> None:
    """Coding Scheme Identification for the private ``99LMBTRK`` codes."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "limbtrack local codes"
    item.CodingSchemeResponsibleOrganization = "limbtrack"
    existing = list(getattr(ds, "CodingSchemeIdentificationSequence", []))
    ds.CodingSchemeIdentificationSequence = [*existing, item]


# ----------------------------------------------------------------------------- session export


@dataclass(frozen=True)
class DicomPaths:
    """The files one session's DICOM export reads and writes, all named by the caller (the
    workflow's rule passes its declared inputs and outputs)."""

    subject: str
    session: str
    dseg: Path
    fluid_json: Path
    sessions_json: Path
    volumes_tsv: Path
    seg: Path
    sr: Path


@dataclass
class SessionExport:
    """What one session's export wrote, and the whole-segment volumes for comparison."""

    session: str
    written: list[Path] = field(default_factory=list)
    #: ``(side, structure) -> (volume_ml in volumes.tsv, whole-segment volume_ml)``
    volumes_ml: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    #: ``(side, structure) -> QC codes`` of the volumes not available (left out of the SR)
    not_available: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def _session_entry(sessions_json: Path, session: str) -> Mapping[str, Any]:
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    for entry in data.get("sessions", []):
        if str(entry.get("session")) == session:
            return dict(entry)
    raise ExportError(f"{sessions_json}: no session {session}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fluid_sidecar(paths: DicomPaths) -> Mapping[str, Any]:
    if not Path(paths.fluid_json).exists():
        return {}
    data = json.loads(Path(paths.fluid_json).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _split_sources(paths: DicomPaths, parts: Sequence[Mapping[str, Any]],
                   sidecar: Mapping[str, Any]) -> SessionSources:
    """The two one-leg series of a session (index ``parts``), the reference series named by
    the fluid sidecar's ``SplitSeries`` (the series whose grid the session image extends)."""
    record = sidecar.get("SplitSeries") or {}
    reference_side = record.get("reference_side")
    if reference_side not in SIDES:
        raise ExportError(f"{paths.fluid_json}: session {paths.session} has its legs in two "
                          "series but the fluid sidecar names no SplitSeries reference_side; "
                          "convert the session again")
    by_side: dict[str, SourceSeries] = {}
    for part in parts:
        side = str(part.get("side"))
        if side not in SIDES or side in by_side:
            raise ExportError(f"{paths.sessions_json}: session {paths.session}: fluid parts "
                              f"are not one series per leg ({side!r})")
        if part.get("volume"):
            raise ExportError(f"{paths.sessions_json}: session {paths.session} uses volume "
                              f"{part['volume']!r} of a multi-volume series; the DICOM export "
                              "supports classic single-frame series only")
        series = read_source_series(part.get("files") or [])
        expected = ((record.get("series") or {}).get(side) or {}).get("SeriesInstanceUID")
        if expected and expected != series.series_uid:
            raise ExportError(f"{paths.fluid_json}: the {side} leg's fluid series {expected} "
                              f"is not the series of its files in sessions.json "
                              f"({series.series_uid})")
        by_side[side] = series
    if sorted(by_side) != sorted(SIDES):
        raise ExportError(f"{paths.sessions_json}: session {paths.session}: fluid parts "
                          f"cover {sorted(by_side)}, not both legs")
    studies = {str(s.datasets[0].StudyInstanceUID) for s in by_side.values()}
    if len(studies) != 1:
        raise ExportError(f"{paths.sessions_json}: session {paths.session}: the legs' series "
                          "belong to different studies; one SEG cannot reference both")
    return SessionSources(by_side[reference_side], by_side)


def source_of(paths: DicomPaths) -> tuple[Mapping[str, Any], SessionSources]:
    """The session's entry in sessions.json and its source fluid series: the one series
    (checked against the fluid sidecar's SeriesInstanceUID when the sidecar exists), or, when
    the legs are in two series (the entry's ``parts``), both, with the reference series of the
    fluid sidecar's ``SplitSeries``."""
    entry = _session_entry(paths.sessions_json, paths.session)
    fluid = entry.get("fluid") or {}
    files = fluid.get("files") or []
    if fluid.get("volume"):
        raise ExportError(f"{paths.sessions_json}: session {paths.session} uses volume "
                          f"{fluid['volume']!r} of a multi-volume series; the DICOM export "
                          "supports classic single-frame series only")
    if not files:
        raise ExportError(f"{paths.sessions_json}: session {paths.session} has no source DICOM "
                          "files (NIfTI input?); the DICOM export needs DICOM input")
    sidecar = _fluid_sidecar(paths)
    if fluid.get("parts"):
        return entry, _split_sources(paths, fluid["parts"], sidecar)
    source = read_source_series(files)
    sidecar_uid = sidecar.get("SeriesInstanceUID")
    source_uid = source.series_uid
    if sidecar_uid and sidecar_uid != source_uid:
        raise ExportError(f"{paths.fluid_json}: fluid series {sidecar_uid} is not the series "
                          f"of the files in sessions.json ({source_uid})")
    return entry, SessionSources.bilateral(source)


def export_dicom(paths: DicomPaths) -> SessionExport:
    """Write the DICOM SEG and SR of one session (see the module docstring).

    Raises
    ------
    ExportError
        No source DICOM (NIfTI input), source series and label map on different grids,
        or no volumes for the session.
    """
    entry, sources = source_of(paths)
    grid = label_map_grid(paths.dseg, sources.reference) if sources.split else None
    labels = labels_on_source_grid(paths.dseg, grid or sources.reference)
    content_hash = hashlib.sha256(
        (_sha256(paths.dseg) + _sha256(paths.volumes_tsv)).encode()).hexdigest()
    study_date = str(entry["study_date"])
    volumes = session_rows(paths.volumes_tsv, study_date)
    seg, specs = build_segmentation(sources, labels, paths.subject, content_hash, grid)
    dates = sorted({r["study_date"] for r in read_tsv(paths.volumes_tsv)})
    sr = build_report(sources, seg, specs, volumes, paths.subject,
                      baseline_date(paths.volumes_tsv), dates.index(study_date) + 1,
                      content_hash)
    with atomic_path(paths.seg) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    with atomic_path(paths.sr) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    result = SessionExport(paths.session, [Path(paths.seg), Path(paths.sr)],
                           not_available=unavailable_volumes(paths.volumes_tsv, study_date))
    result.volumes_ml = whole_segment_volumes(volumes, specs, labels,
                                              label_map_voxel_mm3(paths.dseg))
    return result


def label_map_voxel_mm3(dseg: Path) -> float:
    """Voxel volume (mm3) of a label map, from its header, as the measure step counts it."""
    img = nib.load(str(dseg))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ExportError(f"{dseg}: not a NIfTI image")
    return float(np.prod(img.header.get_zooms()[:3]))


def whole_segment_volumes(
    volumes: Sequence[VolumeRow], specs: Sequence[SegmentSpec], labels: NDArray[np.uint8],
    voxel_mm3: float,
) -> dict[tuple[str, str], tuple[float, float]]:
    """``(side, structure) -> (volume_ml of volumes.tsv, volume_ml of the whole segment)`` for
    the available volumes (the SR's are over the common extent, which may be less);
    `voxel_mm3` is the label map's voxel volume."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for row in volumes:
        if row.volume_ml is None:
            continue
        spec = structure_segment(specs, row.side, row.structure)
        whole = mm3_to_ml(float(np.isin(labels, spec.labels).sum()) * voxel_mm3)
        out[(row.side, row.structure)] = (row.volume_ml, whole)
    return out


def _slice_step_mm(source: SourceSeries) -> float:
    if len(source.positions_mm) < 2:
        return float(getattr(source.datasets[0], "SliceThickness", 1.0) or 1.0)
    normal = np.cross(source.row_cosine, source.col_cosine)
    steps = np.diff(source.positions_mm @ normal)
    return float(np.median(steps))
