"""Common cranio-caudal extent of a subject's sessions, and volumes counted inside it.

Serial studies cover different lengths of the thighs (table position, field of view, slice
count). Volumes are only comparable over the range covered by *every* session and *both*
limbs (docs/design.md), so this module maps each session's covered slab into baseline space and
intersects them, then counts each session's labels inside that range.

Conventions
-----------
- Physical coordinates are DICOM LPS in mm (SimpleITK's), so ``z`` is superior.
- A session's transform is the one estimated by :mod:`pipeline.register`: it maps *baseline*
  (fixed) physical points to *session* (moving) physical points, the ITK convention that
  ``sitk.Resample(session, baseline, transform)`` uses. The baseline's transform is identity
  (``None``). Session points are brought into baseline space with the inverse.
- A "layer" is one cross-section of a label map along its array axis closest to physical z: the
  axial slices of an axial acquisition (the rows of a coronal one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipeline.io.files import mm3_to_ml
from pipeline.labels import SIDE_OFFSET, SIDES, STRUCTURES, structure_labels


class HasTransform(Protocol):
    """Anything with a ``transform()`` method returning a SimpleITK transform."""

    def transform(self) -> sitk.Transform: ...


LabelMapLike = str | os.PathLike[str] | sitk.Image
TransformLike = sitk.Transform | str | os.PathLike[str] | HasTransform | None


def read_label_map(label_map: LabelMapLike) -> sitk.Image:
    """A label map as a SimpleITK image (LPS geometry); paths are read, images passed through."""
    if isinstance(label_map, sitk.Image):
        return label_map
    path = Path(label_map)
    if not path.exists():
        raise FileNotFoundError(f"{path}: label map not found")
    return sitk.ReadImage(str(path))


def as_transform(transform: TransformLike) -> sitk.Transform:
    """A SimpleITK transform from a transform, a ``.tfm`` path, a registration result or None.

    None is the identity (the baseline session).
    """
    if transform is None:
        return sitk.Transform(3, sitk.sitkIdentity)
    if isinstance(transform, sitk.Transform):
        return transform
    if isinstance(transform, str | os.PathLike):
        path = Path(transform)
        if not path.exists():
            raise FileNotFoundError(f"{path}: transform file not found")
        return sitk.ReadTransform(str(path))
    if hasattr(transform, "transform"):
        return transform.transform()
    raise TypeError(f"cannot use {type(transform).__name__} as a transform")


def affine_of(transform: TransformLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(A, b)`` with ``T(p) = A @ p + b`` for a linear (rigid/affine) transform.

    Raises ValueError for a transform that is not affine (checked on a test point).
    """
    tr = as_transform(transform)
    b = np.array(tr.TransformPoint((0.0, 0.0, 0.0)))
    a = (
        np.column_stack([np.array(tr.TransformPoint(tuple(100.0 * e))) - b for e in np.eye(3)])
        / 100.0
    )
    probe = np.array([37.0, -81.0, 173.0])
    if not np.allclose(np.array(tr.TransformPoint(tuple(probe))), a @ probe + b, atol=1e-6):
        raise ValueError("only linear (rigid or affine) transforms are supported")
    return a, b


@dataclass(frozen=True)
class Geometry:
    """Index-to-physical mapping of an image: ``p = origin + M @ index_xyz`` (mm)."""

    origin: NDArray[np.float64]
    matrix: NDArray[np.float64]  # direction @ diag(spacing); column i = step along sitk axis i
    size_xyz: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        if image.GetDimension() != 3:
            raise ValueError(f"need a 3-D image, got {image.GetDimension()}-D")
        d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        s = np.array(image.GetSpacing(), dtype=float)
        size = image.GetSize()
        return cls(
            np.array(image.GetOrigin(), dtype=float),
            d * s[None, :],
            (int(size[0]), int(size[1]), int(size[2])),
            (float(s[0]), float(s[1]), float(s[2])),
        )

    @classmethod
    def of_record(cls, record: Mapping[str, Any]) -> Geometry:
        """From a grid record ``origin_mm``, ``direction`` (9, row-major as SimpleITK),
        ``spacing_mm``, ``size`` (:func:`pipeline.io.split.grid_record`)."""
        d = np.array(record["direction"], dtype=float).reshape(3, 3)
        s = np.array(record["spacing_mm"], dtype=float)
        size = [int(v) for v in record["size"]]
        return cls(np.array(record["origin_mm"], dtype=float), d * s[None, :],
                   (size[0], size[1], size[2]), (float(s[0]), float(s[1]), float(s[2])))

    @property
    def layer_axis_xyz(self) -> int:
        """The sitk axis (0 x, 1 y, 2 z) whose direction is closest to physical z."""
        d = self.matrix / np.array(self.spacing_xyz_mm)[None, :]
        return int(np.argmax(np.abs(d[2, :])))

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.spacing_xyz_mm))


def to_baseline(
    geometry: Geometry, transform: TransformLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(C, c0)`` with ``q = c0 + C @ index_xyz``: baseline position of a session voxel."""
    a, b = affine_of(transform)
    a_inv = np.linalg.inv(a)
    return a_inv @ geometry.matrix, a_inv @ (geometry.origin - b)


def half_height_mm(geometry: Geometry, transform: TransformLike) -> float:
    """Half the cranio-caudal (baseline z) extent of one voxel box mapped into baseline space."""
    c, _ = to_baseline(geometry, transform)
    return 0.5 * float(np.abs(c[2, :]).sum())


@dataclass(frozen=True)
class LayerStats:
    """Per layer (cross-section) of a label map and one mask: voxel count and mean index.

    ``mean_index_xyz[k]`` is the mean voxel index (x, y, z order) of the mask in layer ``k``;
    NaN where the layer holds none of the mask.
    """

    counts: NDArray[np.int64]
    mean_index_xyz: NDArray[np.float64]


def layer_stats(mask_zyx: NDArray[np.bool_], layer_axis_xyz: int) -> LayerStats:
    """Count and mean index per layer of `mask_zyx` (array in numpy [z, y, x] order).

    Computed from axis sums, so no list of voxel coordinates is ever built (a 512x512x200
    limb mask stays cheap).
    """
    np_axis = 2 - layer_axis_xyz
    m = np.moveaxis(mask_zyx, np_axis, 0)
    others_np = [a for a in range(3) if a != np_axis]  # numpy axes of m[:, A, B]
    counts = m.sum(axis=(1, 2), dtype=np.int64)
    n_a, n_b = m.shape[1], m.shape[2]
    sum_a = (m.sum(axis=2, dtype=np.int64) * np.arange(n_a)).sum(axis=1)
    sum_b = (m.sum(axis=1, dtype=np.int64) * np.arange(n_b)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_np = np.full((m.shape[0], 3), np.nan)
        mean_np[:, np_axis] = np.arange(m.shape[0], dtype=float)
        mean_np[:, others_np[0]] = sum_a / counts
        mean_np[:, others_np[1]] = sum_b / counts
    mean_np[counts == 0] = np.nan
    return LayerStats(counts, mean_np[:, ::-1].copy())  # numpy (z, y, x) -> sitk (x, y, z)


def side_mask(labels_zyx: NDArray[Any], side: str, structure: str = "limb") -> NDArray[np.bool_]:
    """Boolean mask of `structure` on `side` in a label array."""
    return np.isin(labels_zyx, structure_labels(side, structure))


def sides_present(labels_zyx: NDArray[Any]) -> list[str]:
    """Sides with at least one limb voxel."""
    present = set(np.unique(labels_zyx).tolist())
    return [s for s in SIDES if present & set(structure_labels(s, "limb"))]


def covered_range(
    label_map: LabelMapLike,
    transform: TransformLike = None,
    sides: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Baseline-z range (mm) of the slab of one session in which every side in `sides` has limb.

    The covered layers are those holding limb voxels of every requested side (default: the
    sides present in this map). The range runs from the outer face of the first such layer to
    the outer face of the last, each face located at the limb's centroid in that layer mapped
    into baseline space; with a tilted session the slab face is not quite a baseline plane
    (error about r*tan(tilt): 1.7 mm at 2 degrees for a 50 mm thigh radius).

    Raises
    ------
    ValueError
        When no layer holds limb voxels of every requested side.
    """
    img = read_label_map(label_map)
    geo = Geometry.of(img)
    labels = sitk.GetArrayViewFromImage(img)
    wanted = list(sides) if sides is not None else sides_present(labels)
    if not wanted:
        raise ValueError("label map holds no limb labels")
    axis = geo.layer_axis_xyz
    stats = {s: layer_stats(side_mask(labels, s), axis) for s in wanted}
    both = np.logical_and.reduce([stats[s].counts > 0 for s in wanted])
    layers = np.nonzero(both)[0]
    if layers.size == 0:
        raise ValueError(f"no cross-section holds limb labels of every side in {wanted}")
    c_mat, c0 = to_baseline(geo, transform)
    h = half_height_mm(geo, transform)
    ends = []
    for k in (int(layers[0]), int(layers[-1])):
        z = [float(c0[2] + c_mat[2] @ stats[s].mean_index_xyz[k]) for s in wanted]
        ends.append(z)
    lo_side = [min(a, b) for a, b in zip(ends[0], ends[1], strict=True)]
    hi_side = [max(a, b) for a, b in zip(ends[0], ends[1], strict=True)]
    return max(lo_side) - h, min(hi_side) + h


def common_extent(
    label_maps: Sequence[LabelMapLike], transforms: Sequence[TransformLike]
) -> tuple[float, float]:
    """Cranio-caudal range (baseline z, mm) covered by every session and both limbs.

    Parameters
    ----------
    label_maps : sequence of label maps (paths or SimpleITK images), one per session.
    transforms : sequence of the same length; per session the baseline-to-session transform
        (:mod:`pipeline.register`), None for the baseline itself.

    Returns
    -------
    (z_min_mm, z_max_mm) in baseline physical (LPS) coordinates: the intersection over
    sessions of :func:`covered_range` of the limbs each session shows (a limb absent from a
    session — the affected leg imaged alone at a follow-up — or from every session, as in a
    unilateral study, does not narrow it; the contralateral value such a session borrows from
    another session is then measured over the same range).

    Raises
    ------
    ValueError
        When the lists differ in length, a session holds no limb, or the sessions share no
        range.
    """
    if len(label_maps) != len(transforms):
        raise ValueError(f"{len(label_maps)} label maps but {len(transforms)} transforms")
    if not label_maps:
        raise ValueError("no label maps")
    images = [read_label_map(m) for m in label_maps]
    present = [set(sides_present(sitk.GetArrayViewFromImage(i))) for i in images]
    required = [s for s in SIDES if any(s in p for p in present)]
    if not required:
        raise ValueError("no session holds limb labels")
    for n, p in enumerate(present):
        if not p:
            raise ValueError(f"session {n} ({_name(label_maps[n])}) holds no limb")
    lo, hi = -np.inf, np.inf
    for img, tr, p in zip(images, transforms, present, strict=True):
        a, b = covered_range(img, tr, [s for s in required if s in p])
        lo, hi = max(lo, a), min(hi, b)
    if not lo < hi:
        raise ValueError(
            "the sessions share no cranio-caudal range after registration "
            f"(intersection {lo:.1f}..{hi:.1f} mm); check the registration quality"
        )
    return float(lo), float(hi)


def _name(label_map: LabelMapLike) -> str:
    return "image in memory" if isinstance(label_map, sitk.Image) else str(label_map)


def extent_weights_zyx(
    geometry: Geometry, transform: TransformLike, extent: tuple[float, float], k: int
) -> NDArray[np.float64]:
    """Fraction (0..1) of each voxel of numpy slice ``k`` (array axis 0) inside `extent`.

    The voxel's cranio-caudal interval in baseline space is its mapped centre +/- half its
    mapped z-extent; the weight is the overlap of that interval with the extent over its
    length (content assumed uniform through the voxel).
    """
    c_mat, c0 = to_baseline(geometry, transform)
    h = half_height_mm(geometry, transform)
    nx, ny, _ = geometry.size_xyz
    jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    z = c0[2] + c_mat[2, 0] * ii + c_mat[2, 1] * jj + c_mat[2, 2] * k
    lo, hi = extent
    overlap = np.minimum(hi, z + h) - np.maximum(lo, z - h)
    return np.clip(overlap / (2 * h), 0.0, 1.0)


#: Margin (voxels) inside the in-plane edge of a grid that counts as outside its field of view.
FOV_MARGIN_VOXELS = 0.0


@dataclass(frozen=True)
class FieldOfView:
    """A session's grid and its baseline-to-session transform: what that session can see.

    ``pieces``: for a session image composed of one-leg series (:mod:`pipeline.io.split`),
    per composed image the grids of its series: a point is seen only inside one grid of each
    (the composed grid also holds what neither series covered, as 0).
    """

    geometry: Geometry
    transform: TransformLike
    pieces: tuple[tuple[Geometry, ...], ...] = ()
    #: the sides the session images: its field of view restricts only these (a follow-up of
    #: the affected leg alone in a one-leg field of view says nothing of the other leg)
    sides: tuple[str, ...] = SIDES


def _inside_in_plane(points_mm: NDArray[np.float64], geometry: Geometry) -> NDArray[np.bool_]:
    """True for session points (N, 3) inside `geometry`'s grid in-plane."""
    idx = (points_mm - geometry.origin) @ np.linalg.inv(geometry.matrix).T
    ok = np.ones(points_mm.shape[0], bool)
    for i in range(3):
        if i == geometry.layer_axis_xyz:
            continue
        n = geometry.size_xyz[i]
        ok &= (idx[:, i] >= FOV_MARGIN_VOXELS - 0.5) & (idx[:, i] <= n - 0.5 - FOV_MARGIN_VOXELS)
    return ok


def inside_fovs(
    points_baseline_mm: NDArray[np.float64], fovs: Sequence[FieldOfView],
    point_sides: NDArray[np.str_] | None = None,
) -> NDArray[np.bool_]:
    """True for baseline points (N, 3) that lie inside the in-plane field of view of every
    session in `fovs` (the cranio-caudal range is the extent's business, not this one's).
    With `point_sides` (the side of each point), a session's field of view restricts only
    the points of the sides it images (:attr:`FieldOfView.sides`)."""
    ok = np.ones(points_baseline_mm.shape[0], bool)
    for fov in fovs:
        a, b = affine_of(fov.transform)
        p = points_baseline_mm @ a.T + b
        seen = _inside_in_plane(p, fov.geometry)
        for union in fov.pieces:
            seen &= np.logical_or.reduce([_inside_in_plane(p, g) for g in union])
        if point_sides is not None:
            seen |= ~np.isin(point_sides, fov.sides)
        ok &= seen
    return ok


def volumes_in_extent(
    label_map: LabelMapLike,
    transform: TransformLike,
    extent: tuple[float, float],
    fovs: Sequence[FieldOfView] = (),
) -> dict[str, dict[str, float]]:
    """Volume (mL) per side and structure inside a baseline cranio-caudal extent.

    Every voxel counts with the fraction of its cranio-caudal length, mapped into baseline
    space, that lies inside ``extent`` (overlap weighting, content assumed uniform through the
    voxel): a 5 mm slice cut by the extent's edge counts in part rather than all or nothing,
    which would err by up to half a slice at each end. When the extent spans every slice all
    weights are 1 and this equals counting every voxel (:func:`pipeline.measure.
    volumes_from_labels`).

    Parameters
    ----------
    label_map : label map (path or SimpleITK image) of one session.
    transform : baseline-to-session transform (None for the baseline).
    extent : (z_min_mm, z_max_mm) in baseline coordinates, e.g. from :func:`common_extent`.
    fovs : the fields of view of every session of the subject: a limb voxel counts only where
        every one of them sees it in-plane (:func:`inside_fovs`), so that a session whose
        limb is cut by the edge of its image and the sessions that see all of it measure the
        same region. Empty: no in-plane restriction.

    Returns
    -------
    ``volumes_ml[side][structure]`` for both sides and every structure of docs/design.md.
    """
    img = read_label_map(label_map)
    geo = Geometry.of(img)
    labels = sitk.GetArrayViewFromImage(img)
    if labels.min() < 0 or labels.max() > 8:
        raise ValueError(f"{_name(label_map)}: label values outside 0..8")
    sums = np.zeros(9)
    lab = np.asarray(labels, dtype=np.int64)
    c_mat, c0 = to_baseline(geo, transform)
    for k in range(lab.shape[0]):
        w = extent_weights_zyx(geo, transform, extent, k)
        if not w.any():
            continue
        if fovs:
            jj, ii = np.nonzero(lab[k])
            idx = np.stack([ii, jj, np.full(ii.size, k)], axis=1).astype(float)
            sides = np.where(lab[k][jj, ii] > SIDE_OFFSET["left"], "left", "right")
            seen = inside_fovs(c0[None, :] + idx @ c_mat.T, fovs, sides)
            w = w.copy()
            w[jj[~seen], ii[~seen]] = 0.0
        sums += np.bincount(lab[k].ravel(), weights=w.ravel(), minlength=9)
    return {
        side: {
            structure: mm3_to_ml(
                float(sum(sums[v] for v in structure_labels(side, structure))) * geo.voxel_mm3
            )
            for structure in STRUCTURES
        }
        for side in SIDES
    }


__all__ = [
    "FieldOfView",
    "Geometry",
    "LabelMapLike",
    "LayerStats",
    "TransformLike",
    "affine_of",
    "as_transform",
    "common_extent",
    "covered_range",
    "extent_weights_zyx",
    "half_height_mm",
    "inside_fovs",
    "layer_stats",
    "read_label_map",
    "side_mask",
    "sides_present",
    "to_baseline",
    "volumes_in_extent",
]
