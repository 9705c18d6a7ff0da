"""The one geometry module, the one baseline rule and the one number reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import geometry
from pipeline.baseline import baseline_position
from pipeline.io.files import finite_float


def _image(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 3.0), size=(8, 6, 4)) -> sitk.Image:
    img = sitk.Image(size, sitk.sitkInt16)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    return img


def test_same_grid_accepts_rounding_and_rejects_a_real_shift() -> None:
    a = _image()
    assert geometry.same_grid(a, _image(origin=(1e-4, 0.0, 0.0)))
    assert not geometry.same_grid(a, _image(origin=(0.01, 0.0, 0.0)))
    assert not geometry.same_grid(a, _image(spacing=(1.0, 1.0, 3.01)))
    assert not geometry.same_grid(a, _image(size=(8, 6, 5)))
    rotated = _image()
    rotated.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    assert not geometry.same_grid(a, rotated)


def test_resample_onto_keeps_labels_and_moves_through_physical_space() -> None:
    labels = _image()
    arr = np.zeros((4, 6, 8), np.int16)
    arr[1, 2, 3] = 5
    labels = sitk.GetImageFromArray(arr)
    labels.SetSpacing((1.0, 1.0, 3.0))
    same = geometry.resample_onto(labels, labels, is_label=True)
    assert same.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayFromImage(same), arr)
    shifted_ref = sitk.Image(labels)
    shifted_ref.SetOrigin((1.0, 0.0, 0.0))  # reference grid one voxel to the right
    out = sitk.GetArrayFromImage(geometry.resample_onto(labels, shifted_ref, is_label=True))
    assert out[1, 2, 2] == 5 and out.sum() == 5
    as_float = geometry.resample_onto(labels, labels, is_label=False)
    assert as_float.GetPixelID() == sitk.sitkFloat32


def test_orient_lps_flips_without_interpolation() -> None:
    arr = np.arange(4 * 6 * 8, dtype=np.int16).reshape(4, 6, 8)
    img = sitk.GetImageFromArray(arr)
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    lps = geometry.orient_lps(img)
    assert geometry.is_lps(lps) and not geometry.is_lps(img)
    assert np.array_equal(sitk.GetArrayFromImage(lps), arr[:, :, ::-1])
    p = img.TransformIndexToPhysicalPoint((0, 0, 0))
    assert lps.TransformIndexToPhysicalPoint((7, 0, 0)) == pytest.approx(p)


@pytest.mark.parametrize(("days", "expected"), [
    ([-3, 7, 14], 0), ([-10, -2, 0, 5], 2), ([3, 10], 0), ([0], 0), ([-5, -1], 1)])
def test_baseline_is_the_last_session_on_or_before_day0_else_the_first(days, expected) -> None:
    assert baseline_position(days) == expected


def test_no_sessions_have_no_baseline() -> None:
    with pytest.raises(ValueError, match="no sessions"):
        baseline_position([])


@pytest.mark.parametrize(("value", "expected"), [
    ("12.5", 12.5), (3, 3.0), ("n/a", None), ("", None), (None, None), ("abc", None),
    ("nan", None), (float("inf"), None), (True, None), (np.float32(1.5), 1.5)])
def test_finite_float_reads_numbers_and_nothing_else(value, expected) -> None:
    out = finite_float(value)
    assert out == expected and (out is None or math.isfinite(out))
