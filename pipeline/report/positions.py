"""Where to look: the marrow-lesion centre, the largest swelling and the femoral centroid of a
label map, and the largest swelling along the thigh from the cross-sectional area profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline import labels
from pipeline.geometry import orient_lps
from pipeline.io.files import finite_float
from pipeline.report.slices import slice_z_positions_mm


@dataclass(frozen=True)
class SliceChoice:
    """Candidate slice positions of one session, from its label map (session coordinates).

    Attributes
    ----------
    lesion_z_mm : float or None
        Physical z (mm) of the marrow-lesion centroid, None without lesion voxels.
    largest_limb_z_mm : float or None
        Physical z (mm) of the slice with the largest affected-limb area, None without limb.
    lesion_point_mm : tuple of float or None
        Physical LPS point (mm) of the marrow-lesion centroid.
    swelling_z_mm : float or None
        Physical z (mm) of the slice with the largest affected-minus-contralateral limb area;
        None when either limb is missing.
    swelling_mm2 : float or None
        That area difference, in mm^2.
    bone_point_mm : tuple of float or None
        Physical LPS centroid (mm) of the bone labels of both sides (the femora), used to
        place the coronal reformat; the limbs' centroid without bone.
    """

    lesion_z_mm: float | None
    largest_limb_z_mm: float | None
    lesion_point_mm: tuple[float, float, float] | None = None
    swelling_z_mm: float | None = None
    swelling_mm2: float | None = None
    bone_point_mm: tuple[float, float, float] | None = None


def _centroid_point(image_lps: sitk.Image, mask_zyx: np.ndarray) -> tuple[float, float, float]:
    cz, cy, cx = np.argwhere(mask_zyx).mean(axis=0)
    p = image_lps.TransformContinuousIndexToPhysicalPoint((float(cx), float(cy), float(cz)))
    return (float(p[0]), float(p[1]), float(p[2]))


def slice_candidates(dseg: sitk.Image, affected_side: str | None) -> SliceChoice:
    """Lesion centroid, largest affected-limb area, largest swelling and femoral centroid.

    Parameters
    ----------
    dseg : SimpleITK.Image
        Label map (values of :mod:`pipeline.labels`), any stored orientation.
    affected_side : str or None
        'left' or 'right'; anything else uses both sides (and no swelling is computed).

    Returns
    -------
    SliceChoice
        Positions in the physical (scanner) coordinates of this label map.
    """
    dseg_lps = orient_lps(dseg)
    lab = sitk.GetArrayViewFromImage(dseg_lps)
    sides = [affected_side] if affected_side in labels.SIDE_OFFSET else list(labels.SIDES)
    lesion_point = None
    # the affected side's lesion first; a lesion on the other side only if there is none
    for lesion_values in (
        [labels.label_value(s, labels.LESION) for s in sides],
        [labels.label_value(s, labels.LESION) for s in labels.SIDES],
    ):
        mask = np.isin(lab, lesion_values)
        if mask.any():
            lesion_point = _centroid_point(dseg_lps, mask)
            break
    z_mm = slice_z_positions_mm(dseg_lps)
    pixel_mm2 = float(dseg_lps.GetSpacing()[0] * dseg_lps.GetSpacing()[1])
    limb_values = [v for s in sides for v in labels.structure_labels(s, "limb")]
    area = np.isin(lab, limb_values).sum(axis=(1, 2))
    limb_z = None
    if area.max(initial=0) > 0:
        limb_z = float(z_mm[int(np.argmax(area))])
    swelling_z = swelling_mm2 = None
    if affected_side in labels.SIDE_OFFSET:
        other = labels.other_side(affected_side)
        aff = np.isin(lab, labels.structure_labels(affected_side, "limb")).sum(axis=(1, 2))
        con = np.isin(lab, labels.structure_labels(other, "limb")).sum(axis=(1, 2))
        both = (aff > 0) & (con > 0)  # only cross-sections holding both limbs compare
        if both.any():
            diff = np.where(both, (aff - con) * pixel_mm2, -np.inf)
            k = int(np.argmax(diff))
            swelling_z, swelling_mm2 = float(z_mm[k]), float(diff[k])
    bone_values = [v for s in labels.SIDES for v in labels.structure_labels(s, "bone")]
    bone = np.isin(lab, bone_values)
    if not bone.any():
        bone = lab > 0
    bone_point = _centroid_point(dseg_lps, bone) if bone.any() else None
    return SliceChoice(
        lesion_z_mm=None if lesion_point is None else lesion_point[2],
        largest_limb_z_mm=limb_z,
        lesion_point_mm=lesion_point,
        swelling_z_mm=swelling_z,
        swelling_mm2=swelling_mm2,
        bone_point_mm=bone_point,
    )


@dataclass(frozen=True)
class Swelling:
    """Where the affected limb exceeds the contralateral one most (baseline coordinates).

    Attributes
    ----------
    session : str
        Session label (``YYYYMMDD``) where the difference peaks.
    z_mm : float
        Baseline z (mm, LPS, superior +) of that cross-section of the affected limb.
    distance_mm : float or None
        Its distance from the affected limb's landmark (proximal +), when known.
    difference_mm2 : float
        Affected minus contralateral limb cross-sectional area, mm^2.
    """

    session: str
    z_mm: float
    distance_mm: float | None
    difference_mm2: float


def largest_swelling(
    csa_rows: Sequence[Mapping[str, Any]],
    affected_side: str,
    z_range_mm: tuple[float, float] | None = None,
) -> Swelling | None:
    """The cross-section with the largest affected-minus-contralateral limb area.

    Both limbs are compared at the same distance from their own landmark (contralateral area
    linearly interpolated at each affected cross-section's distance, never extrapolated).

    Parameters
    ----------
    csa_rows : sequence of mapping
        Rows of ``profile_csa.tsv`` (session, side, z_mm, distance_mm, limb_area_mm2).
    affected_side : str
        'left' or 'right'.
    z_range_mm : (float, float) or None
        Only cross-sections with baseline z in this range (the common extent) count.

    Returns
    -------
    Swelling or None
        None without both sides in any session.
    """
    if affected_side not in labels.SIDE_OFFSET:
        return None
    other = labels.other_side(affected_side)
    by: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in csa_rows:
        d, z, a = (finite_float(r.get(k)) for k in ("distance_mm", "z_mm", "limb_area_mm2"))
        if d is None or z is None or a is None:
            continue
        if z_range_mm is not None and not z_range_mm[0] <= z <= z_range_mm[1]:
            continue
        by.setdefault((str(r.get("session", "")), str(r.get("side", ""))), []).append((d, z, a))
    best: Swelling | None = None
    for (session, side), aff in sorted(by.items()):
        con = sorted(by.get((session, other), []))
        if side != affected_side or len(con) < 2:
            continue
        cd = np.array([c[0] for c in con])
        ca = np.array([c[2] for c in con])
        for d, z, a in aff:
            if not cd[0] <= d <= cd[-1]:
                continue
            diff = a - float(np.interp(d, cd, ca))
            if best is None or diff > best.difference_mm2:
                best = Swelling(session=session, z_mm=z, distance_mm=d, difference_mm2=diff)
    return best
