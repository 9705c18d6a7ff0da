"""Frames (2-D images) of DICOM files and their grouping into volumes, from headers only.

A *frame* is one 2-D image placed in space: a classic single-frame file holds one; an enhanced
multi-frame file (Siemens XA, Philips, Canon enhanced MR) holds ``NumberOfFrames`` with their
geometry in the per-frame / shared functional groups; a Siemens mosaic holds
``NumberOfImagesInMosaic`` tiles. :func:`frames_of` turns one header into its frames, and
:func:`split_volumes` groups the frames of one series into volumes:

- a series whose frames are all at different positions is one volume (whatever else varies);
- when positions repeat, the frames are split by the attributes that tell volumes apart and
  vary in the series: echo (EchoNumbers, else the echo time), image type (Dixon water / fat /
  in / opp, magnitude / phase, field map), diffusion b-value and gradient direction, temporal
  position, stack;
- a group that still holds the same number (>= 2) of frames at every position is split into
  repetitions in acquisition order (AcquisitionNumber, then InstanceNumber, then frame number);
  any other leftover repeat is left to the converter (identical duplicates dropped, conflicting
  ones refused).

Both the index (headers only) and the converter use these functions, so the volumes listed in
``index.tsv`` are the volumes the converter writes.

Pixel data: :func:`stored_pixels` returns the stored values of every frame of a file, masked to
BitsStored and sign-extended for signed data. Uncompressed little-endian data with 8 or 16 bits
allocated is read with ``np.fromfile`` at the pixel-data offset (faster than pydicom's
``pixel_array``); everything else (big endian, deflate, RLE, JPEG lossless, JPEG-LS, JPEG 2000)
goes through pydicom and its installed decoders.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.io.dicom_values import floats_or_none, int_or_none
from pipeline.io.files import finite_float

#: Fewest distinct slice positions that make a volume.
MIN_SLICES = 3
#: Positions closer than this (mm, each LPS coordinate) count as the same slice position.
POSITION_DECIMALS = 2
#: Orientation cosines that differ by more than this between frames are another orientation.
ORIENTATION_TOLERANCE = 1e-4
#: Pixel spacings that differ by more than this fraction of the larger spacing differ.
PIXEL_SPACING_TOLERANCE = 1e-4
#: Largest accepted deviation of a slice step from the median step, as a fraction of it.
SPACING_TOLERANCE = 0.01
#: Largest accepted in-plane shift of a slice per mm along the normal (tan of the tilt).
SHEAR_TOLERANCE = 0.01
#: Positions closer than this along the normal are the same slice position, in mm.
DUPLICATE_TOLERANCE_MM = 1e-3
#: Significant digits to which RepetitionTime / InversionTime / EchoTime are compared between
#: the files of one series (a 5th digit of rounding noise is not another acquisition).
TIMING_DIGITS = 4

#: Header tags this module reads (a faster header reader must keep them).
VOLUME_TAGS: tuple[str, ...] = (
    "NumberOfFrames", "ImageType", "EchoNumbers", "EchoTime", "TemporalPositionIdentifier",
    "AcquisitionNumber", "InstanceNumber", "DiffusionBValue", "DiffusionGradientOrientation",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "RescaleSlope",
    "RescaleIntercept", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
    "SpacingBetweenSlices", "Rows", "Columns", "Manufacturer",
    "(0029,1010) Siemens CSA image header (mosaics)",
    "(0043,1039) GE b-value", "(0019,100C) Siemens b-value", "(2001,1003) Philips b-value",
)

DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle (or numpy only: pydicom's RLE decoder)",
}


class FrameError(ValueError):
    """A file whose frames cannot be described (the message says why and what to do)."""


@dataclass(frozen=True)
class FrameInfo:
    """One 2-D image of a file, placed in LPS space (lengths in mm, times in ms).

    Attributes
    ----------
    frame : int
        Index of the frame in the file's pixel data (0 for a single-frame file; the tile
        number for a mosaic).
    kind : {'single', 'multiframe', 'mosaic'}
    rows, columns : int
        Size of this frame (of one tile for a mosaic).
    order : tuple
        Acquisition-order key used to number repetitions.
    """

    path: Path
    frame: int
    kind: str
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing_mm: tuple[float, ...] | None
    rows: int | None
    columns: int | None
    slope: float | None = None
    intercept: float | None = None
    echo_number: int | None = None
    echo_time_ms: float | None = None
    image_type: tuple[str, ...] = ()
    b_value: float | None = None
    gradient: tuple[float, ...] | None = None
    temporal: int | None = None
    stack: str | None = None
    order: tuple[Any, ...] = ()
    mosaic_grid: int = 0  # tiles per mosaic side (0: not a mosaic)


@dataclass(frozen=True)
class VolumeGroup:
    """The frames of one volume of a series and what tells it apart from the others.

    Attributes
    ----------
    label : str
        BIDS-like entities, '' for a series holding one volume (e.g. ``echo-2``,
        ``part-water``, ``bval-1000_dir-3``, ``rep-4``).
    attrs : dict
        Sidecar values of the volume: EchoNumber, EchoTime, ImageType, DiffusionBValue,
        DiffusionGradientOrientation, TemporalPosition, StackID, Repetition (when known).
    """

    label: str
    frames: tuple[FrameInfo, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# small parsers (numbers: pipeline.io.files.finite_float; DICOM values: dicom_values)
# --------------------------------------------------------------------------------------------

def _first(value: Any) -> Any:
    """The first value of a multi-valued element (None when it has none), else `value`."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return value[0] if len(value) else None
    return value


def _float(value: Any) -> float | None:
    """A number (the first one of a multi-valued element) as a finite float, else None."""
    return finite_float(_first(value))


def _int(value: Any) -> int | None:
    """An integer (the first one of a multi-valued element) as int, else None."""
    return int_or_none(_first(value))


def tokens(value: Any) -> tuple[str, ...]:
    """A (possibly multi-valued) code string as upper-case tokens."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: Iterable[Any] = value.split("\\")
    elif isinstance(value, Iterable):
        items = value
    else:
        items = [value]
    return tuple(str(v).strip().upper() for v in items if str(v).strip())


def _private(ds: Any, group: int, element: int) -> Any:
    try:
        item = ds.get((group, element))
    except Exception:  # noqa: BLE001 - a malformed private element is just absent
        return None
    return None if item is None else item.value


def _private_number(value: Any) -> float | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii", "ignore").strip("\x00 ").split("\\")[0]
        except Exception:  # noqa: BLE001
            return None
    return _float(value)


# --------------------------------------------------------------------------------------------
# frames of one header
# --------------------------------------------------------------------------------------------

def _b_value(ds: Any) -> float | None:
    b = _float(ds.get("DiffusionBValue"))
    if b is not None:
        return b
    maker = str(ds.get("Manufacturer", "") or "").upper()
    if maker.startswith("GE"):
        b = _private_number(_private(ds, 0x0043, 0x1039))
        if b is not None and b >= 1e9:  # GE adds 1e9 (or multiples) as a flag
            b = b % 1e9
        return b
    if maker.startswith("SIEMENS"):
        return _private_number(_private(ds, 0x0019, 0x100C))
    if maker.startswith("PHILIPS"):
        return _private_number(_private(ds, 0x2001, 0x1003))
    return None


def _gradient(ds: Any) -> tuple[float, ...] | None:
    vector = floats_or_none(ds.get("DiffusionGradientOrientation"), 3)
    if vector is not None:
        return vector
    maker = str(ds.get("Manufacturer", "") or "").upper()
    if maker.startswith("SIEMENS"):
        return floats_or_none(_private(ds, 0x0019, 0x100E), 3)
    if maker.startswith("GE"):
        parts = [_private_number(_private(ds, 0x0019, e)) for e in (0x10BB, 0x10BC, 0x10BD)]
        if all(p is not None for p in parts):
            return tuple(float(p) for p in parts)  # type: ignore[arg-type]
    return None


def _is_mosaic(ds: Any) -> bool:
    return "MOSAIC" in tokens(ds.get("ImageType"))


def _mosaic_frames(path: Path, ds: Any) -> list[FrameInfo]:
    """The tiles of a Siemens mosaic as frames (geometry from the CSA image header)."""
    import warnings

    with warnings.catch_warnings():
        # nibabel warns on importing its DICOM readers; only the CSA parser is used here
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader

    try:
        csa = csareader.get_csa_header(ds, "image")
    except Exception as err:  # noqa: BLE001 - any CSA parse failure means no geometry
        raise FrameError(f"Siemens mosaic with an unreadable CSA header ({err}); convert "
                         "with dcm2niix") from err
    n_tiles = csareader.get_n_mosaic(csa) if csa else None
    normal = csareader.get_slice_normal(csa) if csa else None
    if not n_tiles or normal is None:
        raise FrameError("Siemens mosaic without NumberOfImagesInMosaic / SliceNormalVector "
                         "in its CSA header (anonymised?): the slices cannot be placed; "
                         "export the original files or convert with dcm2niix")
    grid = int(math.ceil(math.sqrt(n_tiles)))
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    iop = floats_or_none(ds.get("ImageOrientationPatient"), 6)
    ipp = floats_or_none(ds.get("ImagePositionPatient"), 3)
    spacing = floats_or_none(ds.get("PixelSpacing"), 2)
    step = _float(ds.get("SpacingBetweenSlices"))
    if rows is None or columns is None or rows % grid or columns % grid:
        raise FrameError(f"mosaic of {rows}x{columns} pixels cannot hold {n_tiles} tiles")
    if iop is None or ipp is None or spacing is None or step is None:
        raise FrameError("Siemens mosaic without ImageOrientationPatient, "
                         "ImagePositionPatient, PixelSpacing or SpacingBetweenSlices: the "
                         "slices cannot be placed")
    tile_rows, tile_cols = rows // grid, columns // grid
    row_cos, col_cos = np.asarray(iop[:3]), np.asarray(iop[3:])
    # the header position is the corner of the whole mosaic centred on the field of view
    origin = (np.asarray(ipp) + row_cos * spacing[1] * (columns - tile_cols) / 2
              + col_cos * spacing[0] * (rows - tile_rows) / 2)
    normal = np.asarray(normal, dtype=float)
    common = _common_attrs(ds)
    return [FrameInfo(path=path, frame=k, kind="mosaic", orientation=iop,
                      position=tuple(float(v) for v in origin + k * step * normal),
                      pixel_spacing_mm=spacing, rows=tile_rows, columns=tile_cols,
                      mosaic_grid=grid, **common)
            for k in range(n_tiles)]


def _common_attrs(ds: Any) -> dict[str, Any]:
    instance = _int(ds.get("InstanceNumber"))
    return {
        "slope": _float(ds.get("RescaleSlope")),
        "intercept": _float(ds.get("RescaleIntercept")),
        "echo_number": _int(ds.get("EchoNumbers")),
        "echo_time_ms": _float(ds.get("EchoTime")),
        "image_type": tokens(ds.get("ImageType")),
        "b_value": _b_value(ds),
        "gradient": _gradient(ds),
        "temporal": _int(ds.get("TemporalPositionIdentifier")),
        "order": (_int(ds.get("TemporalPositionIdentifier")) or 0,
                  _int(ds.get("AcquisitionNumber")) or 0, instance or 0, (), 0),
    }


def _group_item(groups: Any, macro: str) -> Any:
    """First item of functional group `macro` in a functional-groups item, else None."""
    if groups is None:
        return None
    seq = groups.get(macro)
    if seq is None or not len(seq):
        return None
    return seq[0]


def _multiframe_frames(path: Path, ds: Any, n_frames: int) -> list[FrameInfo]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq is not None and len(shared_seq) else None
    if per_frame is None or len(per_frame) != n_frames:
        raise FrameError(f"multi-frame file with {n_frames} frames but "
                         f"{0 if per_frame is None else len(per_frame)} per-frame functional "
                         "groups: the frames cannot be placed; convert with dcm2niix")
    top_iop = floats_or_none(ds.get("ImageOrientationPatient"), 6)
    top_spacing = floats_or_none(ds.get("PixelSpacing"), 2)
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    instance = _int(ds.get("InstanceNumber")) or 0
    frames = []
    for i, groups in enumerate(per_frame):
        def item(macro: str, groups: Any = groups) -> Any:
            found = _group_item(groups, macro)
            return found if found is not None else _group_item(shared, macro)

        def value(macro: str, keyword: str, default: Any = None, item: Any = item) -> Any:
            found = item(macro)
            return found.get(keyword, default) if found is not None else default

        content = item("FrameContentSequence")
        diffusion = item("MRDiffusionSequence")
        gradient = None
        if diffusion is not None:
            direction = _group_item(diffusion, "DiffusionGradientDirectionSequence")
            if direction is not None:
                gradient = floats_or_none(direction.get("DiffusionGradientOrientation"), 3)
        frame_type = tokens(value("MRImageFrameTypeSequence", "FrameType")) \
            or tokens(ds.get("ImageType"))
        dims = tuple(int(v) for v in (content.get("DimensionIndexValues") or [])) \
            if content is not None and content.get("DimensionIndexValues") is not None else ()
        dims = dims if isinstance(dims, tuple) else (dims,)
        temporal = _int(content.get("TemporalPositionIndex")) if content is not None else None
        stack = content.get("StackID") if content is not None else None
        frames.append(FrameInfo(
            path=path, frame=i, kind="multiframe",
            orientation=floats_or_none(
                value("PlaneOrientationSequence", "ImageOrientationPatient"), 6) or top_iop,
            position=floats_or_none(value("PlanePositionSequence", "ImagePositionPatient"), 3),
            pixel_spacing_mm=floats_or_none(
                value("PixelMeasuresSequence", "PixelSpacing"), 2) or top_spacing,
            rows=rows, columns=columns,
            slope=_float(value("PixelValueTransformationSequence", "RescaleSlope",
                               ds.get("RescaleSlope"))),
            intercept=_float(value("PixelValueTransformationSequence", "RescaleIntercept",
                                   ds.get("RescaleIntercept"))),
            echo_number=None,
            echo_time_ms=_float(value("MREchoSequence", "EffectiveEchoTime",
                                      ds.get("EchoTime"))),
            image_type=frame_type,
            b_value=_float(diffusion.get("DiffusionBValue")) if diffusion is not None else None,
            gradient=gradient,
            temporal=temporal,
            stack=str(stack) if stack not in (None, "") else None,
            order=(temporal or 0, 0, instance, dims, i),
        ))
    return frames


def frames_of(path: Path, ds: Any) -> tuple[FrameInfo, ...]:
    """The frames of one file, from its header (pixel data not needed).

    Raises
    ------
    FrameError
        When the file holds frames that cannot be placed in space.
    """
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    if "PerFrameFunctionalGroupsSequence" in ds:
        return tuple(_multiframe_frames(Path(path), ds, n_frames))
    if n_frames > 1:
        raise FrameError(f"{n_frames} frames without per-frame functional groups (a cine "
                         "or legacy multi-frame object): the frames cannot be placed")
    if _is_mosaic(ds) and "Rows" in ds:
        return tuple(_mosaic_frames(Path(path), ds))
    return (FrameInfo(path=Path(path), frame=0, kind="single",
                      orientation=floats_or_none(ds.get("ImageOrientationPatient"), 6),
                      position=floats_or_none(ds.get("ImagePositionPatient"), 3),
                      pixel_spacing_mm=floats_or_none(ds.get("PixelSpacing"), 2),
                      rows=_int(ds.get("Rows")), columns=_int(ds.get("Columns")),
                      **_common_attrs(ds)),)


# --------------------------------------------------------------------------------------------
# what the files of one series must share
# --------------------------------------------------------------------------------------------

#: Acquisition tags that every file of a series must share (they do not tell the volumes of a
#: series apart: echoes, Dixon images, b-values and repetitions differ in EchoTime, ImageType,
#: b-value and position, never in these). A file that differs belongs to another acquisition.
SIGNATURE_TAGS: tuple[str, ...] = (
    "Modality", "SOPClassUID", "ScanningSequence", "SequenceVariant", "SequenceName",
    "MRAcquisitionType", "RepetitionTime", "InversionTime",
)

#: Siemens diffusion sequence names carry the b-value and direction (``*ep_b1000#3``).
_SEQUENCE_NAME_VOLUME_RE = re.compile(r"_b\d+\w*(#\d+)?$|#\d+$")


def timing_text(value: Any) -> str:
    """A time (ms) as compared between files: :data:`TIMING_DIGITS` significant digits."""
    number = _float(value)
    return "" if number is None else f"{number:.{TIMING_DIGITS}g}"


def acquisition_signature(ds: Any) -> tuple[tuple[str, str], ...]:
    """The values of :data:`SIGNATURE_TAGS` of one file, as comparable text.

    Code strings are compared as sets of tokens, times to :data:`TIMING_DIGITS` significant
    digits, the sequence name without its diffusion suffix. A missing tag is ``''``.
    """
    values: list[tuple[str, str]] = []
    for tag in SIGNATURE_TAGS:
        try:
            raw = ds.get(tag)
        except Exception:  # noqa: BLE001 - a value that cannot be converted compares as text
            raw = None
        if tag in ("RepetitionTime", "InversionTime"):
            text = timing_text(raw)
        elif tag in ("ScanningSequence", "SequenceVariant"):
            text = "\\".join(sorted(set(tokens(raw))))
        elif tag == "SequenceName":
            text = _SEQUENCE_NAME_VOLUME_RE.sub("", str(raw or "").strip().lstrip("*"))
        else:
            text = str(raw or "").strip().upper() if tag == "Modality" else str(raw or "").strip()
        values.append((tag, text))
    return tuple(values)


def _odd_one(values: Sequence[Any], same: Any) -> tuple[int, Any, Any, int] | None:
    """(index of the first value unlike the most common one, that value, the common value,
    how many share the common value), or None when all agree (``same(a, b)`` compares)."""
    classes: list[list[int]] = []
    for i, value in enumerate(values):
        for members in classes:
            if same(values[members[0]], value):
                members.append(i)
                break
        else:
            classes.append([i])
    if len(classes) <= 1:
        return None
    common = max(classes, key=len)
    odd = min(i for members in classes if members is not common for i in members)
    return odd, values[odd], values[common[0]], len(common)


def _same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    return float(np.max(np.abs(np.subtract(a, b)))) <= ORIENTATION_TOLERANCE


def _same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return float(np.max(np.abs(np.subtract(a, b)))) <= PIXEL_SPACING_TOLERANCE * max(*a, *b)


def frame_name(frame: FrameInfo) -> str:
    """The file name of a frame, with the frame number for multi-frame files and mosaics."""
    return frame.path.name if frame.kind == "single" else \
        f"{frame.path.name} (frame {frame.frame + 1})"


def mixed_geometry(frames: Sequence[FrameInfo],
                   name: Any = frame_name) -> tuple[FrameInfo, str] | None:
    """The first frame whose orientation, matrix or pixel spacing differs from that of most
    frames of the volume, and what differs; None when they all agree.

    The frames' geometry tags must be present (checked before). `name` turns a frame into the
    text naming it (default: the file name). The messages say "mixed slice orientations",
    "mixed image matrix sizes" and "mixed pixel spacing" so callers can tell them apart.
    """
    n = len(frames)
    checks: tuple[tuple[str, list[Any], Any, str, Any], ...] = (
        ("orientation", [f.orientation for f in frames], _same_orientation,
         "mixed slice orientations: the series mixes orientations (e.g. a 3-plane "
         "localizer)",
         lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"),
        ("matrix", [(f.rows, f.columns) for f in frames], lambda a, b: a == b,
         "mixed image matrix sizes: the series mixes image sizes",
         lambda v: f"{v[0]}x{v[1]}"),
        ("pixel spacing", [f.pixel_spacing_mm for f in frames], _same_spacing,
         "mixed pixel spacing: the series mixes pixel spacings",
         lambda v: "[" + ", ".join(f"{x:.6g}" for x in v) + "] mm"),
    )
    for what, values, same, headline, show in checks:
        found = _odd_one(values, same)
        if found is None:
            continue
        index, odd, common, n_common = found
        n_odd = sum(1 for v in values if not same(v, common))
        return frames[index], (
            f"{headline}: {n_odd} of {n} slices differ, first {name(frames[index])} with "
            f"{what} {show(odd)} against {show(common)} of {n_common} slices; the series "
            "is not stacked (export each stack as its own series, or re-export it)")
    return None


def stack_problem(positions: np.ndarray, normal: np.ndarray,
                  names: Sequence[str]) -> tuple[int, str] | None:
    """Why distinct slice positions do not make a regular stack, else None.

    Parameters
    ----------
    positions : ndarray of shape (n, 3)
        Slice positions (mm, LPS), one per distinct position, sorted along `normal`.
    normal : ndarray of shape (3,)
        Unit slice normal.
    names : sequence of str
        What names each slice in messages.

    Returns
    -------
    (int, str) or None
        The offending slice and the message: a step deviating from the median step by more
        than :data:`SPACING_TOLERANCE` of it (a missing slice, a variable increment), or
        positions sheared off the normal by more than :data:`SHEAR_TOLERANCE` per mm (gantry
        tilt). Used by the index (header only) and the converter alike.
    """
    positions = np.asarray(positions, dtype=float)
    projections = positions @ normal
    steps = np.diff(projections)
    if steps.size == 0:
        return None
    step_mm = float(np.median(steps))
    deviations = np.abs(steps - step_mm)
    worst = int(np.argmax(deviations))
    if deviations[worst] > SPACING_TOLERANCE * step_mm:
        ratio = steps[worst] / step_mm
        hint = (f" (about {round(ratio)} steps: a missing slice?)"
                if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.1 else "")
        return worst + 1, (
            f"non-uniform slice spacing: step of {steps[worst]:.4f} mm between "
            f"{names[worst]} and {names[worst + 1]} against a median of "
            f"{step_mm:.4f} mm, a deviation of {deviations[worst]:.4f} mm (tolerance "
            f"{SPACING_TOLERANCE * 100:g} % = {SPACING_TOLERANCE * step_mm:.4f} mm){hint}; "
            "slices are not resampled: re-export the complete series")
    # gantry tilt: each position must lie on the line origin + t * normal
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(projections - projections[0], normal)
    shear = np.linalg.norm(in_plane, axis=1)
    allowed = SHEAR_TOLERANCE * np.abs(projections - projections[0]) + DUPLICATE_TOLERANCE_MM
    if np.any(shear > allowed):
        bad = int(np.argmax(shear - allowed))
        tilt_deg = float(np.degrees(np.arctan2(shear[bad], abs(projections[bad]
                                                                - projections[0]))))
        return bad, (
            f"slice positions are sheared by {shear[bad]:.3f} mm off the slice normal "
            f"(gantry tilt of about {tilt_deg:.1f} degrees); tilted stacks are not supported: "
            "reconstruct without tilt or convert with dcm2niix")
    return None


# --------------------------------------------------------------------------------------------
# volumes of one series
# --------------------------------------------------------------------------------------------

def _position_key(frame: FrameInfo) -> tuple[float, ...] | None:
    if frame.position is None:
        return None
    return tuple(round(v, POSITION_DECIMALS) + 0.0 for v in frame.position)


def position_key(frame: FrameInfo) -> tuple[float, ...] | None:
    """The slice position of a frame as compared (rounded to :data:`POSITION_DECIMALS`)."""
    return _position_key(frame)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower()) or "x"


_IMAGE_TYPE_NAMES = {"W": "water", "WATER": "water", "F": "fat", "FAT": "fat",
                     "IN_PHASE": "in", "IN": "in", "IP": "in", "OUT_PHASE": "opp",
                     "OPP_PHASE": "opp", "OPP": "opp", "OP": "opp", "M": "mag",
                     "MAGNITUDE": "mag", "P": "phase", "PHASE": "phase", "R": "real",
                     "I": "imag", "FIELD_MAP": "fieldmap", "B0 MAP": "fieldmap"}


def _part_labels(types: Sequence[tuple[str, ...]]) -> list[str]:
    """Short names for image types that differ: the tokens in which they differ."""
    width = max(len(t) for t in types)
    padded = [t + ("",) * (width - len(t)) for t in types]
    differing = [i for i in range(width) if len({p[i] for p in padded}) > 1]
    labels = []
    for p in padded:
        words = [_IMAGE_TYPE_NAMES.get(p[i], _slug(p[i])) for i in differing if p[i]]
        labels.append("".join(words) or "none")
    return labels


def _ranks(values: Sequence[Any]) -> list[int]:
    distinct = sorted(set(values), key=lambda v: (v is None, v if v is not None else 0))
    return [distinct.index(v) + 1 for v in values]


def _attrs_of(frames: Sequence[FrameInfo]) -> dict[str, Any]:
    first = frames[0]
    return {
        "EchoNumber": first.echo_number,
        "EchoTime": first.echo_time_ms,
        "ImageType": list(first.image_type),
        "DiffusionBValue": first.b_value,
        "DiffusionGradientOrientation": list(first.gradient) if first.gradient else None,
        "TemporalPosition": first.temporal,
        "StackID": first.stack,
    }


def split_volumes(frames: Sequence[FrameInfo]) -> list[VolumeGroup]:
    """Group the frames of one series into volumes (rules in the module docstring).

    Returns
    -------
    list of VolumeGroup
        One group when the series is a single volume (label ''), else one per volume in a
        stable order (echo, image type, b-value, direction, time, stack, repetition).
    """
    frames = list(frames)
    if not frames:
        return []
    keys = [_position_key(f) for f in frames]
    if any(k is None for k in keys) or len(set(keys)) == len(keys):
        return [VolumeGroup("", tuple(frames), _attrs_of(frames))]
    fields, use_echo_number = _volume_fields(frames)
    varying, groups = _partition(frames, fields)
    group_keys = list(groups)
    labels = _volume_labels(group_keys, varying, use_echo_number)

    def sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
        # acquisition order of the volume's first frame
        return min(f.order for f in groups[key])

    result: list[VolumeGroup] = []
    for key in sorted(group_keys, key=sort_key):
        base = "_".join(labels[key][n] for n in _ENTITY_ORDER if n in labels[key])
        result.extend(_repetitions(base, groups[key]))
    if len(result) == 1:
        result = [VolumeGroup("", result[0].frames, result[0].attrs)]
    return result


#: The fields that tell volumes apart, in BIDS order (echo before part) for labels.
_ENTITY_ORDER = ("echo", "part", "bval", "dir", "t", "stack")


def _volume_fields(frames: Sequence[FrameInfo]) -> tuple[dict[str, list[Any]], bool]:
    """The value of each field that may tell volumes apart, per frame, in priority order;
    and whether echoes are told apart by EchoNumbers (else by the echo time)."""
    echo = [f.echo_number for f in frames]
    use_echo_number = len(set(echo)) > 1 and None not in echo
    fields: dict[str, list[Any]] = {
        "part": [f.image_type for f in frames],
        "echo": echo if use_echo_number else [f.echo_time_ms for f in frames],
        "bval": [None if f.b_value is None else round(f.b_value, 1) for f in frames],
        "dir": [None if f.gradient is None else tuple(round(v, 4) for v in f.gradient)
                for f in frames],
        "t": [f.temporal for f in frames],
        "stack": [f.stack for f in frames],
    }
    return fields, use_echo_number


def _partition(frames: Sequence[FrameInfo], fields: dict[str, list[Any]]
               ) -> tuple[list[str], dict[tuple[Any, ...], list[FrameInfo]]]:
    """The fields that split the frames, and the frames grouped by their values of them.

    A field is used only when it splits the groups made by the fields before it (a TE that
    differs only between the magnitude and the field map adds nothing to the image type).
    """
    varying: list[str] = []
    partition: list[tuple[Any, ...]] = [() for _ in frames]
    for name, values in fields.items():
        refined = [key + (value,) for key, value in zip(partition, values, strict=True)]
        if len(set(refined)) > len(set(partition)):
            varying.append(name)
            partition = refined
    groups: dict[tuple[Any, ...], list[FrameInfo]] = defaultdict(list)
    for key, frame in zip(partition, frames, strict=True):
        groups[key].append(frame)
    return varying, groups


def _volume_labels(group_keys: Sequence[tuple[Any, ...]], varying: Sequence[str],
                   use_echo_number: bool) -> dict[tuple[Any, ...], dict[str, str]]:
    """The label entities (``echo-2``, ``part-water``, ...) of each group, per varying field."""
    labels: dict[tuple[Any, ...], dict[str, str]] = {k: {} for k in group_keys}
    for j, name in enumerate(varying):
        values = [k[j] for k in group_keys]
        if name == "echo":
            texts = [str(v) for v in values] if use_echo_number else \
                [str(r) for r in _ranks(values)]
        elif name == "part":
            texts = _part_labels(values)
        elif name == "bval":
            texts = ["none" if v is None else f"{v:g}" for v in values]
        elif name in ("dir", "stack"):
            texts = [str(r) for r in _ranks([None if v is None else str(v) for v in values])]
        else:
            texts = ["none" if v is None else str(v) for v in values]
        for key, text in zip(group_keys, texts, strict=True):
            labels[key][name] = f"{name}-{text}"
    return labels


def _repetitions(base: str, members: Sequence[FrameInfo]) -> list[VolumeGroup]:
    """The volume(s) of one group labelled `base`: one per repetition when it holds the same
    number (>= 2) of frames at each of at least :data:`MIN_SLICES` positions, else one."""
    by_position: dict[Any, list[FrameInfo]] = defaultdict(list)
    for frame in members:
        by_position[_position_key(frame)].append(frame)
    counts = {len(v) for v in by_position.values()}
    if not (len(by_position) >= MIN_SLICES and len(counts) == 1 and counts.pop() > 1):
        return [VolumeGroup(base, tuple(members), _attrs_of(members))]
    per_position = [sorted(v, key=lambda f: f.order) for v in by_position.values()]
    result = []
    for rep in range(len(per_position[0])):
        chosen = [v[rep] for v in per_position]
        label = "_".join(x for x in (base, f"rep-{rep + 1}") if x)
        attrs = _attrs_of(chosen) | {"Repetition": rep + 1}
        result.append(VolumeGroup(label, tuple(chosen), attrs))
    return result


# --------------------------------------------------------------------------------------------
# pixel data
# --------------------------------------------------------------------------------------------

_FAST_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


def _fix_bits(array: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Mask unused high bits (overlays, garbage) and sign-extend signed values."""
    bits_allocated = array.dtype.itemsize * 8
    if bits_stored >= bits_allocated:
        return array
    mask = (1 << bits_stored) - 1
    values = array.astype(np.int32) & mask
    if signed:
        sign = 1 << (bits_stored - 1)
        values = (values ^ sign) - sign
        return values.astype(np.int16 if bits_allocated == 16 else np.int8)
    return values.astype(array.dtype if array.dtype.kind == "u" else
                         np.dtype(f"u{array.dtype.itemsize}"))


def decoder_hint(syntax: Any) -> str:
    """What to install to decode transfer syntax `syntax`."""
    packages = DECODER_PACKAGES.get(str(syntax), "pylibjpeg pylibjpeg-libjpeg "
                                                  "pylibjpeg-openjpeg pylibjpeg-rle")
    return (f"install a decoder for it (pip install {packages}; or python-gdcm) or export "
            "the series uncompressed")


def stored_pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values of every frame of `path`, shape (frames, rows, columns).

    `ds` is the file's dataset read with ``defer_size`` (pixel data not loaded). Values are
    masked to BitsStored and sign-extended when PixelRepresentation is 1; rescaling is left
    to the caller (it may differ per frame).

    Raises
    ------
    FrameError
        When the pixel data cannot be read or decoded (the message names the decoder).
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
    bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if samples != 1:
        raise FrameError(f"colour image ({samples} samples per pixel, "
                         f"{ds.get('PhotometricInterpretation', '')}), not a greyscale MR "
                         "image; choose another series")
    if "PixelData" not in ds:
        raise FrameError("no pixel data (FloatPixelData or none); re-export the series")
    # keep_deferred: a deferred element stays on disk (get_item would otherwise read the
    # whole block into the dataset, where it would stay for as long as the header is kept)
    raw = ds.get_item("PixelData", keep_deferred=True)
    if syntax in _FAST_SYNTAXES and bits_allocated in (8, 16):
        dtype = np.dtype(("<i" if signed and bits_stored == bits_allocated else "<u")
                         + str(bits_allocated // 8))
        array = _uncompressed_pixels(path, raw, (n_frames, rows, columns), dtype)
        if array is not None:
            return _fix_bits(array, bits_stored, signed) if bits_stored < bits_allocated \
                else array
    array = _decoded_pixels(ds, syntax)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.shape != (n_frames, rows, columns):
        raise FrameError(f"pixel array of shape {array.shape} does not match {n_frames} "
                         f"frame(s) of {rows} x {columns} (colour image?)")
    if array.dtype.kind in "ui" and bits_stored < array.dtype.itemsize * 8:
        array = _fix_bits(array, bits_stored, signed)
    return array


def _uncompressed_pixels(path: Path, raw: Any, shape: tuple[int, int, int],
                         dtype: np.dtype[Any]) -> np.ndarray | None:
    """Uncompressed little-endian pixel data of shape `shape` (frames, rows, columns), from
    the element's bytes or, for a deferred element, straight from the file; None when the
    element holds too few bytes (then pydicom decodes it)."""
    offset = getattr(raw, "value_tell", None)
    length = getattr(raw, "length", None)
    count = shape[0] * shape[1] * shape[2]
    expected = count * dtype.itemsize
    value = getattr(raw, "value", None)
    array = None
    if isinstance(value, (bytes, bytearray)) and len(value) >= expected:
        array = np.frombuffer(value, dtype=dtype, count=count)
    elif value is None and offset is not None and length is not None \
            and length >= expected:
        # deferred element: read the pixel block straight from the file
        array = np.fromfile(path, dtype=dtype, count=count, offset=int(offset))
    if array is not None and array.size == count:
        return array.reshape(shape)
    return None


def _decoded_pixels(ds: pydicom.Dataset, syntax: Any) -> np.ndarray:
    """The pixel data as pydicom and its installed decoders read it (not cached on `ds`)."""
    try:
        array = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoder errors come in many types
        detail = " ".join(str(err).split())
        if syntax is not None and syntax.is_compressed:
            raise FrameError(f"compressed pixel data ({syntax.name}) could not be decoded "
                             f"({detail}); {decoder_hint(syntax)}") from err
        raise FrameError(f"cannot decode pixel data ({detail}); re-export the series") from err
    array = np.asarray(array)
    if getattr(ds, "_pixel_array", None) is not None:
        # pydicom caches the decoded array on the dataset, which the caller keeps for its
        # header; the caller keeps what it needs of the returned array itself
        ds._pixel_array = None
    return array


def frame_pixels(stored: np.ndarray, frame: FrameInfo) -> np.ndarray:
    """Stored values of `frame` (a tile of a mosaic, one frame of a multi-frame file)."""
    if frame.kind == "mosaic":
        assert frame.rows is not None and frame.columns is not None
        r0 = (frame.frame // frame.mosaic_grid) * frame.rows
        c0 = (frame.frame % frame.mosaic_grid) * frame.columns
        return stored[0, r0:r0 + frame.rows, c0:c0 + frame.columns]
    return stored[frame.frame]


#: Integers up to this magnitude are exact in float32 (24-bit significand).
_FLOAT32_EXACT = float(1 << 24)


def _exact_in_float32(dtype: np.dtype[Any], slope: float | None,
                      intercept: float | None) -> bool:
    """Whether ``stored * slope + intercept`` is computed exactly in float32 arithmetic.

    True for integer stored values of at most 16 bits with an integer slope and intercept
    whose results stay within +-2**24: every product, sum and cast is then an exact integer,
    so float32 arithmetic gives the same value as float64 arithmetic followed by one cast.
    """
    if dtype.kind not in "ui" or dtype.itemsize > 2:
        return False
    scale = 1.0 if slope is None else slope
    offset = 0.0 if intercept is None else intercept
    if not (float(scale).is_integer() and float(offset).is_integer()):
        return False
    largest = float(max(abs(int(np.iinfo(dtype).min)), int(np.iinfo(dtype).max)))
    return largest * abs(scale) + abs(offset) <= _FLOAT32_EXACT


def rescale_into(stored: np.ndarray, slope: float | None, intercept: float | None,
                 out: np.ndarray) -> None:
    """Write ``stored * slope + intercept`` (the displayed values) into float32 `out`.

    The same values as ``(stored.astype(float64) * slope + intercept).astype(float32)``: a
    slope of None or 0 is not applied, an intercept of None neither. Integer data with an
    integer rescale (the usual MR case: slope 1, intercept 0) is converted and rescaled in
    `out` itself, exactly; anything else goes through a float64 copy of the frame and is
    rounded once.
    """
    if slope is not None and slope == 0:
        slope = None
    if _exact_in_float32(stored.dtype, slope, intercept):
        np.copyto(out, stored, casting="unsafe")
        if slope is not None and slope != 1:
            np.multiply(out, np.float32(slope), out=out)
        if intercept:
            np.add(out, np.float32(intercept), out=out)
        return
    values = stored.astype(np.float64)
    if slope is not None:
        values *= slope
    if intercept is not None:
        values += intercept
    np.copyto(out, values, casting="same_kind")


# --------------------------------------------------------------------------------------------
# per-volume header view (for the sequence class of one volume of a series)
# --------------------------------------------------------------------------------------------

class HeaderView:
    """A dataset seen through per-volume values (ImageType, EchoTime, ...)."""

    def __init__(self, ds: Any, **values: Any) -> None:
        self._ds = ds
        self._values = {k: v for k, v in values.items() if v not in (None, [], ())}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._values:
            return self._values[name]
        return getattr(self._ds, name)

    def __contains__(self, name: str) -> bool:
        return name in self._values or name in self._ds

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, self._ds.get(name, default))


def shared_value(ds: Any, macro: str, keyword: str) -> Any:
    """A value from the shared functional groups of an enhanced file, else None."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is None or not len(shared):
        return None
    item = _group_item(shared[0], macro)
    return None if item is None else item.get(keyword)


def volume_header(ds: Any, group: VolumeGroup) -> HeaderView:
    """`ds` (a header of the series) with the values of volume `group`: its ImageType and
    echo time, and the timing of an enhanced file's shared functional groups."""
    attrs = group.attrs
    tr = ds.get("RepetitionTime") or shared_value(ds, "MRTimingAndRelatedParametersSequence",
                                                  "RepetitionTime")
    ti = ds.get("InversionTime") or shared_value(ds, "MRModifierSequence", "InversionTimes")
    if isinstance(ti, (list, tuple, pydicom.multival.MultiValue)):
        ti = ti[0] if len(ti) else None
    return HeaderView(ds, ImageType=list(attrs.get("ImageType") or []) or None,
                      EchoTime=attrs.get("EchoTime"), RepetitionTime=tr, InversionTime=ti)
