"""Bone segmentation: every bone (cortex and marrow cavity) of one limb from a T1-like image.

A bone section is a compact region enclosed by a dark cortex (:func:`bone_mask`); sections
that cannot be found on their own are followed from an adjacent slice. Arrays are (Z, Y, X)
with axial slices along axis 0 (the segmentation's LPS-ordered frame).
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage import measure

BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float32]
#: In-plane 4-neighbourhood: the smallest opening, which strips lines one voxel thick.
_DISK1 = ndimage.generate_binary_structure(2, 1)
#: In-plane 3 x 3 neighbourhood: slices are eroded one by one (slices are thick).
_PLANE: Final = np.ones((1, 3, 3), bool)


#: Threshold levels (x muscle T1) tried for the dark cortex, lowest first: partial volume lifts
#: a thin (metaphyseal, child's) cortex above half the muscle level.
CORTEX_LEVELS: Final = (0.5, 0.65, 0.8)
#: Higher levels, for sections that can only continue a bone of the adjacent slice: at the
#: knee the tibial plateau's and condyles' cortex is thin and partial-volumed up to muscle.
FOLLOW_LEVELS: Final = (0.95, 1.1, 1.25)
#: A bone's marrow cavity: at least this area (mm^2) of not-dark signal inside the cortex.
#: Marrow is not required to be bright: on gradient-echo images it is near muscle.
MIN_CAVITY_MM2: Final = 6.0
#: Mean cortical thickness (dark area / outline length, mm) of a bone section found on its
#: own; fascia enclosing a muscle compartment is one voxel thick (0.8-1.3 mm with partial
#: volume). Thinner (metaphyseal) cortex is followed from the adjacent slice instead.
MIN_CORTEX_MM: Final = 1.5
#: Compactness of a bone section (area / convex hull area); a section found on its own is
#: convex (real femur, tibia, fibula: 0.92-0.98), a bundle of vessels around a pocket is not.
MIN_BONE_SOLIDITY: Final = 0.85
#: A section found on its own (cavity inside a thick cortex) is more compact still: a closed
#: ring around a round cavity, where a muscle compartment's fascia loop is not.
MIN_RING_SOLIDITY: Final = 0.9
#: A marrow cavity is at least this fraction of the section (fibula ~0.3, femur 0.3, tibia
#: 0.6); three vessels touching in a triangle enclose far less.
MIN_CAVITY_FRACTION: Final = 0.15
#: Smallest bone section (mm^2): a child's fibula is ~30 mm^2.
MIN_BONE_AREA_MM2: Final = 25.0
#: Largest bone section as a fraction of the limb's (femoral condyles reach ~45 %).
MAX_BONE_FRACTION: Final = 0.5
#: A section continues a bone of the adjacent slice when they overlap by this fraction of the
#: smaller one and it is at most this many times larger (bones change slowly along z).
MIN_CONTINUATION_OVERLAP: Final = 0.5
MAX_CONTINUATION_GROWTH: Final = 1.4
#: Candidates are looked for this far (mm) inside the skin: away from the skin's dark edge,
#: but not so far that the shin's tibia (a few mm under the skin) is cut.
SKIN_CLEARANCE_MM: Final = 2.0
#: With at least this many slices every bone section must continue into an adjacent slice
#: (bones are long); fewer slices cannot show that.
MIN_SLICES_FOR_CONTINUITY: Final = 3
#: Guards the cortical thickness of a section with no outline (mm; never a real perimeter).
_MIN_PERIMETER_MM: Final = 1e-6


def bone_mask(t1: FloatArray, limb: BoolArray, muscle: float, pixel_mm: float) -> BoolArray:
    """Every bone (cortex and marrow) of one limb, array of shape (Z, Y, X).

    A bone section is a compact region enclosed by a dark cortex. Per slice, dark voxels (T1
    below ``level x muscle``) away from the skin are hole-filled and opened (thin septa and
    vessels touching the cortex go), and each compact component of plausible size is a
    candidate; levels rise (:data:`CORTEX_LEVELS`, then :data:`FOLLOW_LEVELS` for followed
    sections only) so that a cortex lifted by partial volume still closes, and a place keeps
    the lowest level that finds it.

    - **sections found on their own**: a marrow cavity inside a thick cortex
      (:data:`MIN_CORTEX_MM`): femur, tibia, fibula, patella, several per slice;
    - **followed sections**: other candidates (thin metaphyseal cortex, the distal fibula's
      solid cortex, a cavity filled by a T1-dark lesion) are bone only where they continue a
      bone section of an adjacent slice (overlap, similar size), followed slice by slice.
      Flow voids (dark, no cavity) and fascia loops never start a bone;
    - with three or more slices every bone section must continue into an adjacent slice:
      bones are long.

    Parameters
    ----------
    t1 : ndarray of shape (Z, Y, X)
        Bias-corrected T1-like image.
    limb : ndarray of bool, shape (Z, Y, X)
        One limb.
    muscle : float
        Muscle T1 level of that limb.
    pixel_mm : float
        In-plane pixel size (mm).
    """
    inner = ndimage.binary_erosion(
        limb, structure=_PLANE, iterations=max(1, int(round(SKIN_CLEARANCE_MM / pixel_mm)))
    )
    found = np.zeros_like(limb)
    weak: dict[int, list[BoolArray]] = {}
    for k in range(limb.shape[0]):
        limb_px = float(limb[k].sum())
        if limb_px == 0:
            continue
        for level in CORTEX_LEVELS + FOLLOW_LEVELS:
            dark = (t1[k] < level * muscle) & inner[k]
            for comp, on_its_own in _bone_candidates(dark, pixel_mm, limb_px):
                if (comp & found[k]).any():
                    continue
                if on_its_own and level in CORTEX_LEVELS:
                    found[k] |= comp
                else:  # candidates of every level compete in the following, lowest first
                    weak.setdefault(k, []).append(comp)
    bone = _follow_along_z(found, weak)
    if bone.shape[0] >= MIN_SLICES_FOR_CONTINUITY:
        bone = _continued_along_z(bone)
    return bone


def _sections(mask2d: BoolArray) -> list[BoolArray]:
    lab, n = ndimage.label(mask2d)
    return [lab == i for i in range(1, n + 1)]


def _continues(section: BoolArray, neighbour: BoolArray) -> bool:
    """True when `section` is a bone section of `neighbour` one slice on: overlapping it by
    :data:`MIN_CONTINUATION_OVERLAP` of the smaller and of similar size (within a factor
    :data:`MAX_CONTINUATION_GROWTH` either way; a fragment of a cortex is not a bone)."""
    if not (section & neighbour).any():
        return False
    area = float(section.sum())
    for other in _sections(neighbour):
        inter = float((section & other).sum())
        size = float(other.sum())
        if inter >= MIN_CONTINUATION_OVERLAP * min(area, size) and (
            size / MAX_CONTINUATION_GROWTH <= area <= MAX_CONTINUATION_GROWTH * size
        ):
            return True
    return False


def _follow_along_z(found: BoolArray, weak: dict[int, list[BoolArray]]) -> BoolArray:
    """`found` plus the `weak` candidates that continue it slice by slice (both directions);
    in a slice the first candidate (lowest level) that continues a bone wins its place."""
    bone = found.copy()
    pending = {k: list(c) for k, c in weak.items() if c}
    changed = True
    while changed and pending:
        changed = False
        for k in list(pending):
            keep = []
            for section in pending[k]:
                if (section & bone[k]).any():
                    continue  # its place is taken
                neighbours = [bone[j] for j in (k - 1, k + 1) if 0 <= j < bone.shape[0]]
                if any(_continues(section, nb) for nb in neighbours):
                    bone[k] |= section
                    changed = True
                else:
                    keep.append(section)
            if keep:
                pending[k] = keep
            else:
                del pending[k]
    return bone


_SLICE_CONNECTIVITY = np.zeros((3, 3, 3), bool)
_SLICE_CONNECTIVITY[1] = ndimage.generate_binary_structure(2, 1)


def _continued_along_z(bone: BoolArray) -> BoolArray:
    """Bone sections (2-D components) that overlap bone in an adjacent slice."""
    lab, _ = ndimage.label(bone, structure=_SLICE_CONNECTIVITY)
    up = np.zeros_like(bone)
    down = np.zeros_like(bone)
    up[:-1] = bone[1:]
    down[1:] = bone[:-1]
    keep = np.unique(lab[bone & (up | down)])
    return np.isin(lab, keep[keep > 0])


def _bone_candidates(
    dark: BoolArray, pixel_mm: float, limb_px: float
) -> list[tuple[BoolArray, bool]]:
    """Compact dark-outlined regions of one slice: ``(mask, found_on_its_own)``."""
    # The opening strips thin dark lines (septa, vessels) that touch the cortex, so that the
    # bone's own outline decides its compactness.
    filled = ndimage.binary_opening(ndimage.binary_fill_holes(dark), structure=_DISK1)
    lab, _ = ndimage.label(filled)
    px_mm2 = pixel_mm**2
    out = []
    for region in measure.regionprops(lab):
        area_mm2 = region.area * px_mm2
        if not MIN_BONE_AREA_MM2 <= area_mm2 <= MAX_BONE_FRACTION * limb_px * px_mm2:
            continue
        if region.solidity < MIN_BONE_SOLIDITY:
            continue
        comp = lab == region.label
        cavity_mm2 = float((comp & ~dark).sum()) * px_mm2
        cortex_mm = (area_mm2 - cavity_mm2) / max(region.perimeter * pixel_mm, _MIN_PERIMETER_MM)
        out.append((comp, cavity_mm2 >= max(MIN_CAVITY_MM2, MIN_CAVITY_FRACTION * area_mm2)
                    and cortex_mm >= MIN_CORTEX_MM and region.solidity >= MIN_RING_SOLIDITY))
    return out
