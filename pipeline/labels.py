"""The label map of docs/design.md: one value per side and tissue class, and the structures.

A label map holds one integer per voxel on the fluid-sensitive series' grid:

====== ===================================================
value  meaning
====== ===================================================
0      background (outside both limbs)
1 / 5  right / left limb soft tissue without edema
2 / 6  right / left edema
3 / 7  right / left bone: cortex and normal marrow
4 / 8  right / left marrow lesion
====== ===================================================
"""

from __future__ import annotations

from typing import Final, Literal

Side = Literal["left", "right"]
SIDES: Final[tuple[Side, Side]] = ("right", "left")

BACKGROUND: Final = 0
SOFT_TISSUE: Final = 1
EDEMA: Final = 2
BONE: Final = 3
LESION: Final = 4

#: Label offset of each side: right uses 1..4, left 5..8.
SIDE_OFFSET: Final[dict[str, int]] = {"right": 0, "left": 4}

#: Structures reported per side, in report order.
STRUCTURES: Final[tuple[str, ...]] = ("limb", "soft_tissue", "bone", "marrow_lesion", "edema")

#: Which tissue classes (1..4, before the side offset) make up each structure.
STRUCTURE_CLASSES: Final[dict[str, tuple[int, ...]]] = {
    "limb": (SOFT_TISSUE, EDEMA, BONE, LESION),
    "soft_tissue": (SOFT_TISSUE, EDEMA),
    "bone": (BONE, LESION),
    "marrow_lesion": (LESION,),
    "edema": (EDEMA,),
}

LABEL_NAMES: Final[dict[int, str]] = {
    0: "background",
    1: "right soft tissue",
    2: "right edema",
    3: "right bone",
    4: "right marrow lesion",
    5: "left soft tissue",
    6: "left edema",
    7: "left bone",
    8: "left marrow lesion",
}

#: RGB colours (0-255) used by overlays and the label table, the same hue for both sides.
LABEL_COLORS: Final[dict[int, tuple[int, int, int]]] = {
    0: (0, 0, 0),
    1: (230, 159, 0),
    2: (86, 180, 233),
    3: (240, 228, 66),
    4: (213, 94, 0),
    5: (230, 159, 0),
    6: (86, 180, 233),
    7: (240, 228, 66),
    8: (213, 94, 0),
}


def label_value(side: str, tissue_class: int) -> int:
    """Label value of `tissue_class` (1..4) on `side` ('left' or 'right')."""
    if side not in SIDE_OFFSET:
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    if tissue_class not in (SOFT_TISSUE, EDEMA, BONE, LESION):
        raise ValueError(f"tissue class must be 1..4, not {tissue_class!r}")
    return SIDE_OFFSET[side] + tissue_class


def structure_labels(side: str, structure: str) -> tuple[int, ...]:
    """Label values that make up `structure` on `side`."""
    return tuple(label_value(side, c) for c in STRUCTURE_CLASSES[structure])


def other_side(side: str) -> Side:
    """The contralateral side."""
    return "right" if side == "left" else "left"
