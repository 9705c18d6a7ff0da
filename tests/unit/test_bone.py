"""Bone segmentation (pipeline/bone.py) on analytic shapes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import bone


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_bone_ring_found_despite_a_septum_touching_it() -> None:
    muscle = 330.0
    img = np.full((1, 80, 80), muscle, np.float32)
    ring = _disk((80, 80), (40, 40), 10) & ~_disk((80, 80), (40, 40), 8)
    img[0][_disk((80, 80), (40, 40), 8)] = 950.0  # fatty marrow
    img[0][ring] = 10.0  # cortex
    img[0, 40, 50:75] = 20.0  # a septum from the cortex to the fascia
    limb = np.zeros_like(img, bool)
    limb[0][_disk((80, 80), (40, 40), 38)] = True
    found = bone.bone_mask(img, limb, muscle, pixel_mm=1.0)
    true_area = _disk((80, 80), (40, 40), 10).sum()
    assert found.sum() == pytest.approx(true_area, rel=0.08)
    assert not found[0, 40, 60:].any()  # the septum is not bone


def test_a_bone_must_continue_along_z() -> None:
    """With three slices or more, a ring on one slice only (a vessel loop) is not bone."""
    muscle = 330.0
    img = np.full((3, 80, 80), muscle, np.float32)
    limb = np.ones_like(img, bool)
    for k in range(3):
        img[k][_disk((80, 80), (40, 40), 10)] = 10.0  # cortex
        img[k][_disk((80, 80), (40, 40), 8)] = 950.0  # marrow
    lone = _disk((80, 80), (15, 15), 7) & ~_disk((80, 80), (15, 15), 5)
    img[1][lone] = 10.0
    img[1][_disk((80, 80), (15, 15), 5)] = 950.0
    found = bone.bone_mask(img, limb, muscle, pixel_mm=1.0)
    assert found[:, 40, 40].all()
    assert not found[1, 15, 15]
