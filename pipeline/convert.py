"""Convert one DICOM series to a NIfTI volume plus a JSON sidecar, with explicit geometry.

Geometry policy (each rule is a check with a clear error, never a silent fix):

- slices are ordered by the projection of ImagePositionPatient on the slice normal
  (row cosine x column cosine), never by InstanceNumber or file name;
- the slice spacing comes from the positions (median step), never from SliceThickness;
- the direction cosines are kept as they are, oblique included;
- duplicate positions: identical pixels -> the duplicate is dropped with a warning;
  different pixels -> refused;
- non-uniform spacing beyond 1 % of the median step -> refused (a missing slice or a
  variable increment); the series is not resampled;
- gantry tilt (positions sheared off the normal) -> refused;
- fewer than 3 slices, missing geometry tags, mixed orientation or matrix -> refused.

The image is built in DICOM LPS physical space; SimpleITK writes NIfTI in RAS, so the
patient's left stays left.

Command line::

    python -m pipeline.convert --sessions-json F --session 20240225 --subject demo --out-dir D
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.dicom_index import (
    classify_sequence,
    float_or_none,
    floats_or_none,
    int_or_none,
    parse_dicom_date,
)
from pipeline.io_utils import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

#: Largest accepted deviation of a slice step from the median step, as a fraction of it.
SPACING_TOLERANCE = 0.01
#: Largest accepted in-plane shift of a slice per mm along the normal (tan of the tilt).
SHEAR_TOLERANCE = 0.01
#: Positions closer than this along the normal are the same slice position, in mm.
DUPLICATE_TOLERANCE_MM = 1e-3
#: Orientation cosines that differ by more than this between files are inconsistent.
ORIENTATION_TOLERANCE = 1e-4
MIN_SLICES = 3
DECODER_HINT = ("install a decoder for it (pip install pylibjpeg pylibjpeg-libjpeg "
                "pylibjpeg-openjpeg) or export the series uncompressed")

#: Output name suffix of each session role.
ROLE_SUFFIX: dict[str, str] = {"anatomical": "T1w", "fluid": "fluid"}


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
class _Slice:
    path: Path
    ds: pydicom.Dataset
    position: np.ndarray  # mm, LPS
    proj_mm: float  # position along the slice normal
    pixels: np.ndarray | None = None  # float64, rescaled, shape (rows, columns)


def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - report any parse failure against the file
        raise SeriesError(path, f"cannot read as DICOM ({type(err).__name__}: {err}); remove "
                                "the file or re-export the series") from err


def _pixels(item: _Slice) -> np.ndarray:
    """Rescaled pixel values of one slice (float64, rows x columns), decoded once."""
    if item.pixels is not None:
        return item.pixels
    ds = item.ds
    if "PixelData" not in ds:
        raise SeriesError(item.path, "no pixel data; re-export the series with images")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        array = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoder errors come in many types
        detail = " ".join(str(err).split())
        if syntax is not None and syntax.is_compressed:
            raise SeriesError(item.path, f"compressed pixel data ({syntax.name}) could not be "
                                         f"decoded ({detail}); {DECODER_HINT}") from err
        raise SeriesError(item.path, f"cannot decode pixel data ({detail}); re-export the "
                                     "series") from err
    if array.shape != (int(ds.Rows), int(ds.Columns)):
        raise SeriesError(item.path, f"pixel array of shape {array.shape} does not match "
                                     f"Rows x Columns {ds.Rows} x {ds.Columns} (multi-frame or "
                                     "colour image?); export single-frame greyscale images")
    slope = float_or_none(ds.get("RescaleSlope"))
    intercept = float_or_none(ds.get("RescaleIntercept"))
    values = array.astype(np.float64)
    if slope is not None and slope != 0:
        values = values * slope
    if intercept is not None:
        values = values + intercept
    item.pixels = values
    return values


def _orthonormal_axes(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosine, column cosine and slice normal (unit, right-handed) from an IOP."""
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:6], dtype=float)
    row = row / np.linalg.norm(row)
    # remove the tiny non-orthogonality of rounded header values so NIfTI gets a rotation
    col = col - np.dot(col, row) * row
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def read_series(files: Sequence[Path]) -> tuple[sitk.Image, dict[str, Any]]:
    """Read a single-frame DICOM series into a float32 volume in LPS physical space.

    Parameters
    ----------
    files : sequence of Path
        The files of one series, in any order.

    Returns
    -------
    image : SimpleITK.Image
        float32, size (columns, rows, slices); spacing (column spacing, row spacing, slice
        step) in mm; origin = ImagePositionPatient of the first slice along the normal (mm,
        LPS); direction columns = row cosine, column cosine, slice normal. Rescale slope and
        intercept are applied.
    sidecar : dict
        Series metadata (see module docstring); no patient identifiers.

    Raises
    ------
    SeriesError
        When the series breaks one of the geometry rules of the module docstring.
    """
    files = [Path(f) for f in files]
    if not files:
        raise SeriesError(Path("."), "no files given for the series")
    warnings: list[str] = []
    datasets = [(path, _read_dataset(path)) for path in sorted(files)]

    first_path, first = datasets[0]
    iop0 = floats_or_none(first.get("ImageOrientationPatient"), 6)
    for path, ds in datasets:
        if int_or_none(ds.get("NumberOfFrames")) not in (None, 1):
            raise SeriesError(path, "enhanced multi-frame DICOM is not supported yet; export "
                                    "classic single-frame images or convert with dcm2niix")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise SeriesError(path, "colour image (SamplesPerPixel > 1), not an MR magnitude "
                                    "image; choose another series")
        missing = [k for k, n in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3),
                                  ("PixelSpacing", 2)) if floats_or_none(ds.get(k), n) is None]
        if missing or "Rows" not in ds or "Columns" not in ds:
            missing += [k for k in ("Rows", "Columns") if k not in ds]
            raise SeriesError(path, f"missing or malformed {', '.join(missing)}: the slice "
                                    "cannot be placed in space (localizer or secondary "
                                    "capture?); choose another series")
        iop = floats_or_none(ds.get("ImageOrientationPatient"), 6)
        assert iop is not None and iop0 is not None
        if np.max(np.abs(np.subtract(iop, iop0))) > ORIENTATION_TOLERANCE:
            raise SeriesError(path, f"slice orientation {list(iop)} differs from "
                                    f"{list(iop0)} of {first_path.name}: the series mixes "
                                    "orientations; export each stack as its own series")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise SeriesError(path, f"matrix {ds.Rows}x{ds.Columns} differs from "
                                    f"{first.Rows}x{first.Columns} of {first_path.name}; "
                                    "the series mixes image sizes")
        spacing = floats_or_none(ds.get("PixelSpacing"), 2)
        spacing0 = floats_or_none(first.get("PixelSpacing"), 2)
        assert spacing is not None and spacing0 is not None
        if np.max(np.abs(np.subtract(spacing, spacing0))) > 1e-4 * max(spacing0):
            raise SeriesError(path, f"pixel spacing {list(spacing)} mm differs from "
                                    f"{list(spacing0)} mm of {first_path.name}")
    assert iop0 is not None
    row, col, normal = _orthonormal_axes(iop0)

    slices: list[_Slice] = []
    for path, ds in datasets:
        position = np.asarray(floats_or_none(ds.get("ImagePositionPatient"), 3), dtype=float)
        slices.append(_Slice(path, ds, position, float(np.dot(position, normal))))
    slices.sort(key=lambda s: (s.proj_mm, str(s.path)))

    # duplicates: same position along the normal
    kept: list[_Slice] = [slices[0]]
    for item in slices[1:]:
        previous = kept[-1]
        if abs(item.proj_mm - previous.proj_mm) > DUPLICATE_TOLERANCE_MM:
            kept.append(item)
            continue
        same_place = np.allclose(item.position, previous.position, atol=DUPLICATE_TOLERANCE_MM)
        if same_place and np.array_equal(_pixels(item), _pixels(previous)):
            message = (f"duplicate slice {item.path.name} (identical pixels at the position "
                       f"of {previous.path.name}) dropped")
            warnings.append(message)
            log.warning("%s", message)
            item.pixels = None
            continue
        raise SeriesError(item.path, f"two different images at the same slice position "
                                     f"({item.proj_mm:.3f} mm along the normal) as "
                                     f"{previous.path}: the series holds several echoes, phases "
                                     "or repeats; export a single volume or pick another "
                                     "series")
    if len(kept) < MIN_SLICES:
        raise SeriesError(kept[0].path, f"only {len(kept)} slice(s); a volume needs at least "
                                        f"{MIN_SLICES}; choose a series with more slices")

    projections = np.array([s.proj_mm for s in kept])
    steps = np.diff(projections)
    step_mm = float(np.median(steps))
    deviations = np.abs(steps - step_mm)
    worst = int(np.argmax(deviations))
    if deviations[worst] > SPACING_TOLERANCE * step_mm:
        ratio = steps[worst] / step_mm
        hint = (f" (about {round(ratio)} steps: a missing slice?)"
                if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.1 else "")
        raise SeriesError(kept[worst + 1].path, (
            f"non-uniform slice spacing: step of {steps[worst]:.4f} mm between "
            f"{kept[worst].path.name} and {kept[worst + 1].path.name} against a median of "
            f"{step_mm:.4f} mm, a deviation of {deviations[worst]:.4f} mm (tolerance "
            f"{SPACING_TOLERANCE * 100:g} % = {SPACING_TOLERANCE * step_mm:.4f} mm){hint}; "
            "slices are not resampled: re-export the complete series"))

    # gantry tilt: each position must lie on the line origin + t * normal
    offsets = np.array([s.position - kept[0].position for s in kept])
    in_plane = offsets - np.outer(projections - projections[0], normal)
    shear = np.linalg.norm(in_plane, axis=1)
    allowed = SHEAR_TOLERANCE * np.abs(projections - projections[0]) + DUPLICATE_TOLERANCE_MM
    if np.any(shear > allowed):
        bad = int(np.argmax(shear - allowed))
        tilt_deg = float(np.degrees(np.arctan2(shear[bad], abs(projections[bad]
                                                                - projections[0]))))
        raise SeriesError(kept[bad].path, (
            f"slice positions are sheared by {shear[bad]:.3f} mm off the slice normal "
            f"(gantry tilt of about {tilt_deg:.1f} degrees); tilted stacks are not supported: "
            "reconstruct without tilt or convert with dcm2niix"))

    volume = np.stack([_pixels(s) for s in kept]).astype(np.float32)  # [z, y, x]
    image = sitk.GetImageFromArray(volume)
    spacing_rc = floats_or_none(first.get("PixelSpacing"), 2)
    assert spacing_rc is not None
    # PixelSpacing is (between rows, between columns); SimpleITK spacing is (x=column, y=row, z)
    image.SetSpacing((spacing_rc[1], spacing_rc[0], step_mm))
    image.SetOrigin(tuple(float(v) for v in kept[0].position))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))

    sidecar = _sidecar(kept[0].ds, kept, step_mm, spacing_rc, warnings, len(files))
    return image, sidecar


def _sidecar(ds: pydicom.Dataset, kept: list[_Slice], step_mm: float,
             spacing_rc: tuple[float, ...], warnings: list[str],
             n_files: int) -> dict[str, Any]:
    """Series metadata for the JSON sidecar (times in ms, lengths in mm, no patient data)."""
    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value).strip() if value not in (None, "") else None

    thickness = float_or_none(ds.get("SliceThickness"))
    return {
        "SeriesInstanceUID": text("SeriesInstanceUID"),
        "SeriesNumber": int_or_none(ds.get("SeriesNumber")),
        "SeriesDescription": text("SeriesDescription"),
        "StudyInstanceUID": text("StudyInstanceUID"),
        "StudyDate": parse_dicom_date(ds.get("StudyDate")),
        "Modality": text("Modality"),
        "SequenceClass": classify_sequence(ds),
        "EchoTime": float_or_none(ds.get("EchoTime")),
        "RepetitionTime": float_or_none(ds.get("RepetitionTime")),
        "InversionTime": float_or_none(ds.get("InversionTime")),
        "MagneticFieldStrength": float_or_none(ds.get("MagneticFieldStrength")),
        "Manufacturer": text("Manufacturer"),
        "ManufacturerModelName": text("ManufacturerModelName"),
        "PatientPosition": text("PatientPosition"),
        "ImageOrientationPatient": [float(v) for v in ds.ImageOrientationPatient],
        "ImagePositionPatientFirstSlice": [float(v) for v in kept[0].position],
        "SpacingBetweenSlicesFromPositions_mm": step_mm,
        "SliceThickness_mm": thickness,
        "PixelSpacing_mm": [float(v) for v in spacing_rc],
        "Rows": int(ds.Rows),
        "Columns": int(ds.Columns),
        "NumberOfSlices": len(kept),
        "TransferSyntaxUID": str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        "CoordinateConvention": "DICOM LPS in memory; NIfTI written in RAS by SimpleITK",
        "warnings": list(warnings),
        "SourceFiles": n_files,
        "ConversionSoftware": f"limbtrack pipeline.convert (pydicom {pydicom.__version__}, "
                              f"SimpleITK {sitk.Version.VersionString()})",
    }


def sidecar_path(nifti_path: Path) -> Path:
    """The ``.json`` path next to a ``.nii.gz`` / ``.nii`` file."""
    name = nifti_path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return nifti_path.with_name(name[: -len(suffix)] + ".json")
    return nifti_path.with_suffix(".json")


def write_volume(image: sitk.Image, sidecar: dict[str, Any], nifti_path: Path,
                 compression_level: int = 1) -> None:
    """Write `image` as NIfTI (RAS, by SimpleITK) and `sidecar` as JSON next to it, atomically.

    Parameters
    ----------
    compression_level : int
        gzip level; 1 is several times faster than the default 6 for slightly larger files.
    """
    nifti_path = Path(nifti_path)
    with atomic_path(nifti_path) as tmp:
        sitk.WriteImage(image, str(tmp), True, compression_level)
    write_json_atomic(sidecar_path(nifti_path), sidecar)


def output_path(out_dir: Path, subject: str, session: str, role: str) -> Path:
    """BIDS-like NIfTI path ``sub-<subject>_ses-<session>_<T1w|fluid>.nii.gz`` of a role."""
    return Path(out_dir) / f"sub-{subject}_ses-{session}_{ROLE_SUFFIX[role]}.nii.gz"


def convert_session(sessions_json: Path, session: str, subject: str,
                    out_dir: Path) -> list[Path]:
    """Convert a session's anatomical and fluid series; all outputs or none.

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
    volumes = []
    for role in ROLE_SUFFIX:
        files = [Path(f) for f in entry[role]["files"]]
        image, sidecar = read_series(files)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success, 2 when a series is refused."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.convert",
        description="Convert a session's anatomical and fluid-sensitive DICOM series to NIfTI.")
    parser.add_argument("--sessions-json", required=True, type=Path,
                        help="sessions.json written by pipeline.dicom_index")
    parser.add_argument("--session", required=True, help="session label, e.g. 20240225")
    parser.add_argument("--subject", required=True, help="subject label for the file names")
    parser.add_argument("--out-dir", required=True, type=Path, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        written = convert_session(args.sessions_json, args.session, args.subject, args.out_dir)
    except SeriesError as err:
        print(f"ERROR {err.path}: {err.message}", file=sys.stderr)
        return 2
    for path in written:
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
