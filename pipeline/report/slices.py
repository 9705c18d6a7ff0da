"""Radiological display geometry: axial and coronal slices from any stored orientation,
baseline slabs, resampling through a registration, and the crop around the labels.

Display convention: axial slices in radiological convention (patient's right on the viewer's
left, anterior up), derived from the image geometry (direction cosines), never from array order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.geometry import is_lps, orient_lps


@dataclass(frozen=True)
class AxialSlice:
    """One axial slice ready for display in radiological convention.

    Attributes
    ----------
    pixels : ndarray of shape (R, C)
        Row 0 is the most anterior row, column 0 the patient's rightmost column, so that
        ``imshow(pixels)`` (origin upper) shows patient right on the viewer's left, anterior up.
    spacing_rc_mm : tuple of float
        Pixel spacing along rows (anterior-posterior) and columns (right-left), in mm.
    z_mm : float
        Physical LPS z (superior positive) of the slice centre, in mm.
    slice_index : int
        Index of the slice in the LPS-reoriented volume (0 = most inferior).
    """

    pixels: np.ndarray
    spacing_rc_mm: tuple[float, float]
    z_mm: float
    slice_index: int


def slice_z_positions_mm(image_lps: sitk.Image) -> np.ndarray:
    """Physical z (mm, LPS, superior positive) of each slice centre of an LPS-oriented image.

    Parameters
    ----------
    image_lps : SimpleITK.Image
        Output of :func:`orient_lps`.

    Returns
    -------
    ndarray of shape (Z,)
    """
    nx, ny, nz = image_lps.GetSize()
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    return np.array(
        [
            image_lps.TransformContinuousIndexToPhysicalPoint((cx, cy, float(k)))[2]
            for k in range(nz)
        ]
    )


def nearest_slice_index(image_lps: sitk.Image, z_mm: float) -> int:
    """Index of the slice of `image_lps` whose centre is nearest to physical `z_mm`."""
    return int(np.argmin(np.abs(slice_z_positions_mm(image_lps) - z_mm)))


def covers_z(image_lps: sitk.Image, z_mm: float) -> bool:
    """Whether physical `z_mm` lies within the slab covered by `image_lps` (half a slice margin)."""
    z = slice_z_positions_mm(image_lps)
    half_mm = abs(image_lps.GetSpacing()[2]) / 2.0
    return bool(z.min() - half_mm <= z_mm <= z.max() + half_mm)


def radiological_axial_slice(image: sitk.Image, z_mm: float) -> AxialSlice:
    """The axial slice nearest to physical `z_mm`, oriented for radiological display.

    Parameters
    ----------
    image : SimpleITK.Image
        3-D image in any stored orientation (the direction matrix decides left and right).
    z_mm : float
        Physical LPS z in mm; the nearest slice is taken.

    Returns
    -------
    AxialSlice
        ``pixels[r, c]``: r runs anterior to posterior, c runs patient right to patient left,
        so the patient's left appears on the viewer's right.
    """
    image_lps = image if is_lps(image) else orient_lps(image)
    k = nearest_slice_index(image_lps, z_mm)
    # numpy order is [z, y, x]; in LPS orientation y grows posterior and x grows to the left,
    # which is exactly the radiological screen layout (rows top->bottom, columns left->right).
    pixels = sitk.GetArrayViewFromImage(image_lps)[k].copy()
    sx, sy, _ = image_lps.GetSpacing()
    return AxialSlice(
        pixels=pixels,
        spacing_rc_mm=(float(sy), float(sx)),
        z_mm=float(slice_z_positions_mm(image_lps)[k]),
        slice_index=k,
    )


@dataclass(frozen=True)
class CoronalSlice:
    """One coronal slice ready for display in radiological convention.

    Attributes
    ----------
    pixels : ndarray of shape (R, C)
        Row 0 is the most superior row, column 0 the patient's rightmost column.
    spacing_rc_mm : tuple of float
        Pixel spacing along rows (superior-inferior) and columns (right-left), in mm.
    row_z_mm : ndarray of shape (R,)
        Physical z (mm, LPS) of each row.
    y_mm : float
        Physical LPS y (posterior +) of the slice, in mm.
    """

    pixels: np.ndarray
    spacing_rc_mm: tuple[float, float]
    row_z_mm: np.ndarray
    y_mm: float


def radiological_coronal_slice(slab_lps: sitk.Image) -> CoronalSlice:
    """A one-voxel-thick coronal slab of an LPS-oriented image, for radiological display.

    Parameters
    ----------
    slab_lps : SimpleITK.Image
        Output of :func:`coronal_slab` (or any LPS image of y size 1, e.g. resampled onto one).

    Returns
    -------
    CoronalSlice
        Superior up, patient's right on the viewer's left.
    """
    if slab_lps.GetSize()[1] != 1 or not is_lps(slab_lps):
        raise ValueError("expected an LPS-oriented coronal slab of one voxel in y")
    arr = sitk.GetArrayFromImage(slab_lps)  # [z, 1, x]; z grows superior, x grows to the left
    sx, _, sz = slab_lps.GetSpacing()
    centre = slab_lps.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0))
    return CoronalSlice(
        pixels=arr[::-1, 0, :].copy(),
        spacing_rc_mm=(float(sz), float(sx)),
        row_z_mm=slice_z_positions_mm(slab_lps)[::-1].copy(),
        y_mm=float(centre[1]),
    )


def axial_slab(reference_lps: sitk.Image, z_mm: float) -> sitk.Image:
    """The one-slice sub-grid of `reference_lps` (LPS-oriented) nearest to physical `z_mm`."""
    k = nearest_slice_index(reference_lps, z_mm)
    return reference_lps[:, :, k : k + 1]


def coronal_slab(reference_lps: sitk.Image, y_mm: float) -> sitk.Image:
    """The one-row (coronal) sub-grid of `reference_lps` (LPS-oriented) nearest to `y_mm`."""
    nx, ny, nz = reference_lps.GetSize()
    ys = np.array(
        [
            reference_lps.TransformContinuousIndexToPhysicalPoint(
                ((nx - 1) / 2.0, float(j), (nz - 1) / 2.0)
            )[1]
            for j in range(ny)
        ]
    )
    j = int(np.argmin(np.abs(ys - y_mm)))
    return reference_lps[:, j : j + 1, :]


def crop_box(
    masks: Sequence[np.ndarray], spacing_rc_mm: tuple[float, float], margin_mm: float = 15.0
) -> tuple[slice, slice]:
    """Row and column slices around the union of `masks` plus a margin (all rows if empty)."""
    shape: tuple[int, ...] = tuple(masks[0].shape) if masks else (1, 1)
    union = np.zeros(shape, bool)
    for m in masks:
        if m.shape == union.shape:
            union |= m
    if not union.any():
        return slice(None), slice(None)
    rows, cols = np.nonzero(union)
    mr = int(math.ceil(margin_mm / spacing_rc_mm[0]))
    mc = int(math.ceil(margin_mm / spacing_rc_mm[1]))
    n_rows, n_cols = shape[0], shape[1]
    return (
        slice(max(int(rows.min()) - mr, 0), min(int(rows.max()) + mr + 1, n_rows)),
        slice(max(int(cols.min()) - mc, 0), min(int(cols.max()) + mc + 1, n_cols)),
    )
