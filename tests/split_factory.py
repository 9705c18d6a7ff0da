"""Split a bilateral DICOM study into one series per leg, as a site imaging one limb at a time
in a dedicated coil would have it (issue 18): each series of the study is written twice, once
cropped to the columns of the patient's left half and once to the right half (with an overlap
margin), each with its own SeriesInstanceUID, SeriesNumber, description and Laterality tag.

Cropping whole columns keeps each half on the original grid, so the composed session must
equal the original image wherever a half covers it: the invariant the tests check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid


def _columns_of_left(ds: pydicom.Dataset) -> bool:
    """Whether increasing column index runs toward the patient's left (LPS +x)."""
    return float(ds.ImageOrientationPatient[0]) > 0


def split_study(study_dir: Path, out_dir: Path, *, overlap_fraction: float = 0.1,
                wrong_tag_side: str | None = None, drop_right: bool = False) -> Path:
    """Write `study_dir`'s image series as left/right one-leg series into `out_dir`.

    Parameters
    ----------
    overlap_fraction : float
        Each half reaches this fraction of the width past the middle column.
    wrong_tag_side : {'left', 'right'}, optional
        That side's series carry the other side's Laterality tag and description.
    drop_right : bool
        Write the left leg's series only (a follow-up of the affected leg alone).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    new_uids: dict[tuple[str, str], str] = {}
    for path in sorted(p for p in study_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not DICOM (events.tsv, ...)
            continue
        if "PixelData" not in ds:
            continue
        cols = int(ds.Columns)
        reach = int(round(overlap_fraction * cols))
        to_left = _columns_of_left(ds)
        halves = {"left": (cols // 2 - reach, cols), "right": (0, cols // 2 + reach)}
        if not to_left:
            halves = {"left": (0, cols // 2 + reach), "right": (cols // 2 - reach, cols)}
        for side, (c0, c1) in halves.items():
            if drop_right and side == "right":
                continue
            part = pydicom.dcmread(path)
            pixels = part.pixel_array[:, c0:c1].copy()
            row_dir = np.array([float(v) for v in part.ImageOrientationPatient[:3]])
            position = np.array([float(v) for v in part.ImagePositionPatient])
            position += c0 * float(part.PixelSpacing[1]) * row_dir
            part.ImagePositionPatient = [f"{v:.6f}" for v in position]
            part.Columns = c1 - c0
            part.PixelData = np.ascontiguousarray(pixels).tobytes()
            tag_side = side if wrong_tag_side != side else \
                {"left": "right", "right": "left"}[side]
            part.Laterality = "L" if tag_side == "left" else "R"
            suffix = 'LT' if tag_side == 'left' else 'RT'
            part.SeriesDescription = f"{ds.SeriesDescription} {suffix}"
            key = (str(ds.SeriesInstanceUID), side)
            part.SeriesInstanceUID = new_uids.setdefault(key, generate_uid())
            part.SeriesNumber = int(ds.SeriesNumber) * 10 + (1 if side == "left" else 2)
            part.SOPInstanceUID = generate_uid()
            part.file_meta.MediaStorageSOPInstanceUID = part.SOPInstanceUID
            target = out_dir / path.relative_to(study_dir).parent / side / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            part.save_as(target, enforce_file_format=True)
    return out_dir
