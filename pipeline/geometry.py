"""Image geometry in one place: when two images share a grid, resampling onto a grid, and
radiological orientation.

Every stage keeps geometry with the pixels (SimpleITK images carry origin, spacing and
direction); this module is the only place that decides whether two grids are the same and how
an image is brought onto another's grid, so segment, register and the report agree.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import SimpleITK as sitk

#: Two grids are the same when sizes match and spacing and origin agree within this distance.
#: Converted NIfTI headers store float32 (about 1e-5 mm at 100 mm from the origin), so 1 µm
#: accepts rounding and rejects any real shift (the finest grids here are 0.3 mm).
GRID_TOLERANCE_MM: Final = 1e-3
#: Direction cosines agree within this (1e-6 rad, far below any real rotation).
DIRECTION_TOLERANCE: Final = 1e-6


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images share size, spacing, origin and direction (within the tolerances)."""
    return (
        a.GetSize() == b.GetSize()
        and bool(np.allclose(a.GetSpacing(), b.GetSpacing(), atol=GRID_TOLERANCE_MM))
        and bool(np.allclose(a.GetOrigin(), b.GetOrigin(), atol=GRID_TOLERANCE_MM))
        and bool(np.allclose(a.GetDirection(), b.GetDirection(), atol=DIRECTION_TOLERANCE))
    )


def resample_onto(
    moving: sitk.Image,
    reference: sitk.Image,
    *,
    is_label: bool,
    transform: sitk.Transform | None = None,
) -> sitk.Image:
    """`moving` on the grid of `reference`, through physical space.

    Labels: nearest neighbour, pixel type kept. Intensities: linear, float32. Voxels outside
    `moving` become 0. With no `transform` (identity) and the same grid, the pixels are returned
    as they are (cast to float32 for intensities).
    """
    pixel_type = moving.GetPixelID() if is_label else sitk.sitkFloat32
    if transform is None:
        if same_grid(moving, reference):
            return moving if moving.GetPixelID() == pixel_type else sitk.Cast(moving, pixel_type)
        transform = sitk.Transform(3, sitk.sitkIdentity)
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(moving, reference, transform, interpolator, 0.0, pixel_type)


def orient_lps(image: sitk.Image) -> sitk.Image:
    """Permute and flip `image` so index axes run toward patient Left, Posterior, Superior.

    Only axis permutations and flips are applied (no interpolation); for an oblique acquisition
    the closest LPS axes are chosen from the direction cosines. Every voxel keeps its physical
    position.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    return sitk.DICOMOrient(image, "LPS")


def is_lps(image: sitk.Image) -> bool:
    """Whether the index axes already run toward Left, Posterior, Superior."""
    return bool(np.allclose(image.GetDirection(), np.eye(3).ravel(), atol=DIRECTION_TOLERANCE))
