"""The mirrored contralateral reference: one rigid fit serves both limbs."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from pipeline.mirror import reversed_fit


def test_reversed_fit_matches_the_same_points_the_other_way() -> None:
    width, spacing_x = 120, 1.5
    tr = sitk.Euler3DTransform((40.0, 30.0, 20.0), 0.03, -0.02, 0.1, (5.0, -3.0, 2.0))
    back = reversed_fit(tr, width, spacing_x)
    c = (width - 1) * spacing_x

    def flip(p: np.ndarray) -> np.ndarray:
        return np.array([c - p[0], p[1], p[2]])

    rng = np.random.default_rng(0)
    for p in rng.uniform(0, 150, size=(20, 3)):
        q = flip(np.array(tr.TransformPoint(tuple(p))))  # p's match in the other limb
        # the reversed fit sends q to where p sits in the flipped image
        np.testing.assert_allclose(back.TransformPoint(tuple(q)), flip(p), atol=1e-9)
    assert np.allclose(np.linalg.det(np.array(back.GetMatrix()).reshape(3, 3)), 1.0)
