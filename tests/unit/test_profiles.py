"""Cross-sectional area and circumference profiles, and the bone landmark."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from phantom_cases import small_spec

from pipeline.io.files import read_tsv
from pipeline.profiles import (
    CIRCUMFERENCE_COLUMNS,
    CSA_COLUMNS,
    circumference_profile,
    csa_profile,
    find_landmark,
    find_landmarks,
    outer_perimeter_mm,
    write_profile_tsv,
)
from pipeline.validation import phantom


def ellipse_mask(
    n_rows: int,
    n_cols: int,
    a_mm: float,
    b_mm: float,
    spacing: tuple[float, float],
    centre_mm: tuple[float, float] | None = None,
) -> np.ndarray:
    """Pixels whose centre lies in the ellipse (semi-axes a along rows, b along columns)."""
    r = (np.arange(n_rows) + 0.5) * spacing[0]
    c = (np.arange(n_cols) + 0.5) * spacing[1]
    rc, cc = centre_mm or (n_rows * spacing[0] / 2 + 0.3, n_cols * spacing[1] / 2 - 0.2)
    rr, col = np.meshgrid(r, c, indexing="ij")
    return ((rr - rc) / a_mm) ** 2 + ((col - cc) / b_mm) ** 2 <= 1.0


def ramanujan(a: float, b: float) -> float:
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


@pytest.mark.parametrize("radius_mm", [25.0, 45.0, 80.0])  # child to adult thigh
def test_circle_circumference(radius_mm: float) -> None:
    m = ellipse_mask(140, 140, radius_mm, radius_mm, (1.6, 1.6))
    got = outer_perimeter_mm(m, (1.6, 1.6))
    assert got == pytest.approx(2 * math.pi * radius_mm, rel=0.02)
    assert outer_perimeter_mm(m, (1.6, 1.6), hull=True) == pytest.approx(got, rel=0.01)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.8, 1.2)])
def test_ellipse_circumference(spacing: tuple[float, float]) -> None:
    m = ellipse_mask(200, 200, 60.0, 35.0, spacing)
    assert outer_perimeter_mm(m, spacing) == pytest.approx(ramanujan(60.0, 35.0), rel=0.02)


def test_concave_outline_hull_is_shorter() -> None:
    m = ellipse_mask(120, 120, 40.0, 40.0, (1.0, 1.0))
    m[55:65, :60] = False  # a notch
    assert outer_perimeter_mm(m, (1.0, 1.0), hull=True) < outer_perimeter_mm(m, (1.0, 1.0))
    assert outer_perimeter_mm(np.zeros((5, 5)), (1.0, 1.0)) == 0.0


def cylinder_labels(
    radius_mm: float = 40.0,
    bone_radius: Any = 10.0,
    n_slices: int = 30,
    slice_mm: float = 5.0,
    pixel_mm: float = 1.0,
) -> sitk.Image:
    """Two vertical cylinders (right at -x, left at +x) with a bone of radius bone_radius(z)."""
    nx, ny = 200, 100
    x = (np.arange(nx) - (nx - 1) / 2) * pixel_mm
    y = (np.arange(ny) - (ny - 1) / 2) * pixel_mm
    yy, xx = np.meshgrid(y, x, indexing="ij")
    arr = np.zeros((n_slices, ny, nx), dtype=np.uint8)
    for k in range(n_slices):
        z = k * slice_mm
        rb = bone_radius(z) if callable(bone_radius) else bone_radius
        for cx, off in ((-50.0, 0), (50.0, 4)):
            d = np.hypot(xx - cx, yy)
            arr[k][d <= radius_mm] = 1 + off
            arr[k][d <= rb] = 3 + off
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((pixel_mm, pixel_mm, slice_mm))
    img.SetOrigin((float(x[0]), float(y[0]), 0.0))
    return img


def test_cylinder_profile_is_flat_pi_r_squared(tmp_path: Path) -> None:
    img = cylinder_labels()
    lm = find_landmarks(img)
    assert lm["left"].method == "baseline_fov_distal_edge"  # no flare in a cylinder
    rows = csa_profile(img, None, lm, session="s1")
    assert len(rows) == 2 * 30
    areas = np.array([r["limb_area_mm2"] for r in rows])
    assert areas.std() / areas.mean() < 0.005
    assert areas.mean() == pytest.approx(math.pi * 40.0**2, rel=0.01)
    bone = np.array([r["bone_area_mm2"] for r in rows])
    assert bone.mean() == pytest.approx(math.pi * 10.0**2, rel=0.03)
    circ = circumference_profile(img, None, lm, step_mm=50.0, session="s1")
    assert [r["distance_mm"] for r in circ if r["side"] == "left"] == [0.0, 50.0, 100.0]
    for r in circ:
        assert r["circumference_mm"] == pytest.approx(2 * math.pi * 40.0, rel=0.02)
    write_profile_tsv(tmp_path / "csa.tsv", rows, CSA_COLUMNS)
    write_profile_tsv(tmp_path / "circ.tsv", circ, CIRCUMFERENCE_COLUMNS)
    back = read_tsv(tmp_path / "circ.tsv")
    assert list(back[0]) == list(CIRCUMFERENCE_COLUMNS) and len(back) == len(circ)
    assert float(back[0]["circumference_mm"]) == pytest.approx(circ[0]["circumference_mm"])


def test_flare_landmark_on_a_synthetic_femur() -> None:
    # bone radius 10 mm in the diaphysis, widening distally: area ratio crosses 1.3 at z_true
    def rb(z: float) -> float:
        return 10.0 * (1 + 0.5 / (1 + math.exp((z - 40.0) / 6.0)))

    # area ratio (r/10)^2 = 1.3 -> 1 + 0.5 s = sqrt(1.3) with s the logistic
    s = (math.sqrt(1.3) - 1) / 0.5
    z_true = 40.0 + 6.0 * math.log(1 / s - 1)
    img = cylinder_labels(bone_radius=rb, n_slices=40, slice_mm=3.0, pixel_mm=0.5)
    lm = find_landmark(img, "left")
    assert lm.method == "metaphyseal_flare"
    assert lm.z_mm == pytest.approx(z_true, abs=1.5)


# --------------------------------------------------------------------------- phantom

SPEC = small_spec()
ZC = 200.0


@pytest.fixture(scope="module")
def phantom_pair() -> dict[str, Any]:
    """Baseline and a swollen follow-up 15 mm up the table whose header follows the table."""
    fields = phantom._fields(SPEC)
    out = {}
    for name, sess in (
        ("base", phantom.SessionSpec(day=0, swelling=0.05, lesion_ml=3.0, edema=0.3)),
        (
            "follow",
            phantom.SessionSpec(
                day=7, swelling=0.25, lesion_ml=3.0, edema=0.6, table_shift_mm=15.0
            ),
        ),
    ):
        r = phantom.render_session(SPEC, sess, fields)
        _, labels = phantom.truth_of(SPEC, r)
        out[name] = phantom.to_sitk(labels, r["grid"])
    tr = sitk.TranslationTransform(3, (0.0, 0.0, 15.0))  # baseline -> follow-up coordinates
    img = sitk.Image(out["follow"])
    img.SetOrigin(tr.TransformPoint(img.GetOrigin()))
    out["follow"], out["transform"] = img, tr
    return out


def test_phantom_landmark_and_profiles(phantom_pair: dict[str, Any]) -> None:
    base, follow, tr = phantom_pair["base"], phantom_pair["follow"], phantom_pair["transform"]
    lm = find_landmarks(base)
    # phantom femur: r = R (1 + 0.55 m(z)), m logistic centred at ZC - 0.35 * span, scale 8 mm
    span = SPEC.n_slices * SPEC.slice_mm
    s = (math.sqrt(1.3) - 1) / 0.55
    z_true = ZC - 0.35 * span + 8.0 * math.log(1 / s - 1)
    for side in ("left", "right"):
        assert lm[side].method == "metaphyseal_flare"
        assert lm[side].z_mm == pytest.approx(z_true, abs=2.0)
        # the same landmark found on the follow-up, mapped back to baseline space (area
        # discretisation of a 9.5 mm femur at 1.6 mm pixels: ~1 mm of landmark noise)
        assert find_landmark(follow, side, tr).z_mm == pytest.approx(lm[side].z_mm, abs=1.5)
    c0 = circumference_profile(base, None, lm, step_mm=10.0, session="base")
    c1 = circumference_profile(follow, tr, lm, step_mm=10.0, session="follow")
    by = {(r["session"], r["side"], r["distance_mm"]): r for r in c0 + c1}
    common = [k[1:] for k in by if k[0] == "base" and ("follow", *k[1:]) in by]
    assert len(common) >= 4
    for side, d in common:
        a, b = by["base", side, d], by["follow", side, d]
        if side == "right":  # contralateral: unchanged
            assert b["circumference_mm"] == pytest.approx(a["circumference_mm"], rel=0.01)
        else:  # affected: swelling 5 % -> 25 % of area, circumference x sqrt(1.25 / 1.05)
            ratio = b["circumference_mm"] / a["circumference_mm"]
            assert ratio == pytest.approx(math.sqrt(1.25 / 1.05), abs=0.03)
    csa = csa_profile(follow, tr, lm, session="follow")
    z = [r["z_mm"] for r in csa if r["side"] == "right"]
    assert min(z) == pytest.approx(ZC - 30 + 2.5 - 15.0, abs=0.5)  # slice centres, baseline z
