"""Hybrid cases (pipeline.validation.hybrid): real leg anatomy with inserted changes, checked
against truth.

Uses ``shared/realdata/legs`` (skipped when absent): the thigh 3-point Dixon (10 slices) and the
calf 3-D Dixon cropped to 24 slices, to stay fast on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from pipeline.validation import hybrid
from pipeline.validation.hybrid import HybridSession as S

try:
    REALDATA: str | None = str(hybrid.realdata_dir())
except hybrid.RealDataMissing as _err:
    REALDATA = None
    _MISSING = str(_err)

needs_data = pytest.mark.skipif(REALDATA is None, reason="real leg data absent "
                                "(shared/realdata/legs); set LIMBTRACK_REALDATA")
CALF_CROP = (22, 46)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), np.asarray(img.affine)


def _world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (RAS, mm) centroid of a mask."""
    c = np.array(ndimage.center_of_mass(mask.astype(float)))
    return affine[:3, :3] @ c + affine[:3, 3]


def _ring_and_deep(limb: np.ndarray, bone: np.ndarray, px_mm: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: 1.5-5 mm inside the skin (subcutaneous), > 15 mm inside and off bone."""
    ring = np.zeros_like(limb)
    deep = np.zeros_like(limb)
    for k in range(limb.shape[2]):
        d = ndimage.distance_transform_edt(limb[:, :, k]) * px_mm
        ring[:, :, k] = (d >= 1.5) & (d <= 5.0)
        deep[:, :, k] = (d > 15.0) & ~ndimage.binary_dilation(bone[:, :, k], iterations=2)
    return ring, deep


# ------------------------------------------------------------------ pure functions, no data


def test_expected_pattern_rules() -> None:
    def row(day: int, pp: float = 0.0, les: float = 0.0, ede: float = 0.0) -> dict[str, Any]:
        return {"day": day, "true_asymmetry_change_pp": pp, "lesion_ml": les, "edema_ml": ede}

    pat = hybrid.expected_pattern
    assert pat([row(0)])["pattern"] == "indeterminate"
    assert pat([row(-2, les=3), row(14, les=6), row(45, les=2.5)])["pattern"] == \
        "pseudo-progression"
    assert pat([row(0), row(12, ede=30), row(30, ede=60)])["pattern"] == "progression"
    assert pat([row(-1, les=5), row(20, les=4.5), row(50, les=2.5)])["pattern"] == "response"
    assert pat([row(0, les=3), row(30, les=3)])["pattern"] == "stable"
    # exactly +5 pp is a flare; +4.9 is not
    assert pat([row(0), row(10, pp=5.0)])["pattern"] == "progression"
    assert pat([row(0), row(10, pp=4.9)])["pattern"] == "stable"
    # a flare not resolved (edema above baseline) nor flaring at the last: stable
    assert pat([row(0, ede=10), row(5, ede=50), row(9, ede=15)])["pattern"] == "stable"


def test_suite_definitions() -> None:
    names = [c.name for c in hybrid.HYBRID_SUITE]
    assert len(set(names)) == len(names)
    for c in hybrid.HYBRID_SUITE:
        assert 2 <= len(c.sessions) <= 3
        assert c.affected_side in ("left", "right")
        # the pattern named in the description follows from the targets (swelling pct ~ pp)
        rows = [{"day": s.day, "true_asymmetry_change_pp": s.swelling_pct,
                 "lesion_ml": s.lesion_ml, "edema_ml": s.edema_ml} for s in c.sessions]
        assert hybrid.expected_pattern(rows)["pattern"] in c.description
    regions = {(c.region, bool(max(s.lesion_ml for s in c.sessions) >= 2))
               for c in hybrid.HYBRID_SUITE}
    assert ("thigh", True) in regions and ("calf", True) in regions
    assert any(c.fluid != "water" for c in hybrid.HYBRID_SUITE)
    assert any(s.moved for c in hybrid.HYBRID_SUITE for s in c.sessions)


def test_cli_without_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = hybrid.main([str(tmp_path / "out"), "--all", "--realdata", str(tmp_path / "none")])
    assert rc == 2
    assert "real leg data not found" in capsys.readouterr().err
    assert hybrid.main([str(tmp_path), "--list"]) == 0


def test_sitk_round_trip_keeps_geometry() -> None:
    aff = np.array([[0.9, 0, 0, -200.0], [0, 0.9, 0, -75.0], [0, 0, 5.0, -427.5], [0, 0, 0, 1]])
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    back, aff2 = hybrid.from_sitk(hybrid.to_sitk(arr, aff))
    assert np.array_equal(back, arr)
    assert np.allclose(aff2, aff)


# ------------------------------------------------------------------ water / fat separation


@needs_data
def test_thigh_three_point_dixon_suppresses_fat() -> None:
    src, anat = hybrid._source_and_anatomy("thigh", REALDATA, None)
    limb = anat.limb > 0
    ring, deep = _ring_and_deep(limb, anat.tissue >= hybrid.BONE, 0.8)
    w_ratio = np.median(src.water[ring]) / np.median(src.water[deep])
    f_ratio = np.median(src.fat[ring]) / np.median(src.fat[deep])
    assert w_ratio < 0.35, w_ratio  # subcutaneous fat dark on water
    assert f_ratio > 3.0, f_ratio  # and bright on fat
    marrow = anat.tissue == hybrid.MARROW
    assert np.median(src.water[marrow]) < 0.4 * np.median(src.water[deep])
    # W + F = in-phase magnitude inside the legs
    assert np.allclose((src.water + src.fat)[limb], src.in_phase[limb], rtol=1e-4, atol=1e-3)
    # the in-phase echo itself is not fat-suppressed
    assert np.median(src.in_phase[ring]) / np.median(src.in_phase[deep]) > 0.9


@needs_data
def test_calf_magnitude_dixon_suppresses_marrow_and_fat() -> None:
    src, anat = hybrid._source_and_anatomy("calf", REALDATA, CALF_CROP)
    marrow = anat.tissue == hybrid.MARROW
    muscle = anat.tissue == hybrid.MUSCLE
    assert marrow.sum() > 500
    assert np.median(src.water[marrow]) < 0.3 * np.median(src.water[muscle])
    assert np.median(src.fat[marrow]) > 2.0 * np.median(src.fat[muscle])
    # the outermost millimetres of the leg (subcutaneous fat) are darker than muscle on water
    limb = anat.limb > 0
    outer = np.zeros_like(limb)
    for k in range(limb.shape[2]):
        d = ndimage.distance_transform_edt(limb[:, :, k]) * 0.915
        outer[:, :, k] = (d > 0.5) & (d <= 2.5)
    assert np.median(src.water[outer]) < 0.8 * np.median(src.water[muscle])


# ------------------------------------------------------------------ cases against truth


@pytest.fixture(scope="module")
def thigh_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("hyb") / "thigh"
    truth = hybrid.make_case("thigh", out, (S(-1, lesion_ml=3.0, edema_ml=20.0),
                                            S(20, lesion_ml=1.5)),
                             "left", subject="T1", day0="2024-03-01", seed=11,
                             t1_fat_gain=1.8, realdata=REALDATA)
    return out, truth


@pytest.fixture(scope="module")
def calf_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("hyb") / "calf"
    truth = hybrid.make_case(
        "calf", out, (S(0, lesion_ml=2.0), S(14, lesion_ml=2.0, swelling_pct=8.0),
                      S(28, lesion_ml=2.0, table_shift_mm=10.0, rotation_deg=3.0,
                        grid_spacing_mm=(1.0, 1.0, 5.0))),
        "right", subject="C1", day0="2024-03-01", seed=12, t1_fat_gain=1.0,
        crop_slices=CALF_CROP, realdata=REALDATA)
    return out, truth


@needs_data
def test_thigh_lesion_and_edema_truth(thigh_case: tuple[Path, dict[str, Any]]) -> None:
    out, truth = thigh_case
    src, anat = hybrid._source_and_anatomy("thigh", REALDATA, None)
    vox_ml = hybrid.voxel_volume_ml(src.affine)
    first, second = truth["sessions"]
    for ses, target in ((first, 3.0), (second, 1.5)):
        les, aff = _load(out / ses["lesion_mask"])
        assert np.allclose(aff, src.affine)
        assert abs(ses["lesion_ml"] - target) <= 0.02 * target
        assert math.isclose(les.sum() * vox_ml, ses["lesion_ml"], rel_tol=1e-6)
        # inside the femoral marrow of the patient's left (RAS -x) leg
        assert np.all(anat.tissue[les > 0] == hybrid.MARROW)
        assert np.all(anat.limb[les > 0] == hybrid.LEFT)
        assert _world(les, aff)[0] < 0
    les2, _ = _load(out / second["lesion_mask"])
    les1, _ = _load(out / first["lesion_mask"])
    assert np.all(les1[les2 > 0])  # the smaller lesion nests in the larger one
    edema, _ = _load(out / first["edema_mask"])
    assert abs(first["edema_ml"] - 20.0) <= 0.02 * 20.0
    assert math.isclose(edema.sum() * vox_ml, first["edema_ml"], rel_tol=1e-6)
    assert np.all(anat.limb[edema > 0] == hybrid.LEFT)
    assert np.all(anat.tissue[edema > 0] <= hybrid.FAT)
    assert 0.2 < first["edema_in_fat_ml"] / first["edema_ml"] < 0.4
    # signal: lesion and edema bright on fluid, lesion not brighter than muscle on T1
    fl, _ = _load(out / first["fluid"])
    t1, _ = _load(out / first["t1"])
    muscle = (anat.tissue == hybrid.MUSCLE) & (edema == 0)
    fl_mus, t1_mus = np.median(fl[muscle]), np.median(t1[muscle])
    assert math.isclose(fl_mus, hybrid.FLUID_MUSCLE_LEVEL, rel_tol=0.1)
    assert np.median(fl[les1 > 0]) > 1.6 * fl_mus
    assert np.median(fl[edema > 0]) > 1.5 * fl_mus
    assert math.isclose(t1_mus, np.median(t1[muscle]), rel_tol=1e-6)
    # on T1 the lesion is at or below the muscle around it, well below the marrow it replaced
    near = ndimage.binary_dilation(les1 > 0, np.ones((3, 3, 1), bool), iterations=25) & muscle
    assert np.median(t1[les1 > 0]) < 1.0 * np.median(t1[near])
    t1_after, _ = _load(out / second["t1"])
    gone = (les1 > 0) & (les2 == 0)
    assert np.median(t1[gone]) < 0.9 * np.median(t1_after[gone])
    # outside the changed voxels the images are the source's
    fl0, _ = _load(out / second["fluid"])
    unchanged = (les1 == 0) & (edema == 0)
    assert np.array_equal(fl[unchanged], fl0[unchanged])


@needs_data
def test_thigh_sheet_and_truth_files(thigh_case: tuple[Path, dict[str, Any]]) -> None:
    from pipeline.io import nifti_input

    out, truth = thigh_case
    assert truth == json.loads((out / "truth.json").read_text())
    assert truth["expected_pattern"]["pattern"] == "response"  # 3 -> 1.5 mL, edema gone
    result = nifti_input.index_sheet(out / "sessions.tsv", "T1")
    dates = sorted(s["study_date"] for s in result["sessions"])
    assert dates == ["2024-02-29", "2024-03-21"]
    assert not result["refused"] and not result["problems"]
    by_date = {t["study_date"]: t for t in truth["sessions"]}
    for ses in result["sessions"]:
        t = by_date[ses["study_date"]]
        assert Path(ses["anatomical"]["files"][0]) == (out / t["t1"]).resolve()
        assert Path(ses["fluid"]["files"][0]) == (out / t["fluid"]).resolve()
        assert ses["fluid"]["orientation"] == "axial"
    for ses in truth["sessions"]:
        hdr = nib.load(str(out / ses["t1"])).header
        assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
        assert nib.load(str(out / ses["fluid"])).get_data_dtype() == np.float32


@needs_data
def test_calf_swelling_volume_matches_truth(calf_case: tuple[Path, dict[str, Any]]) -> None:
    out, truth = calf_case
    base, swollen = truth["sessions"][0], truth["sessions"][1]
    assert abs(swollen["swelling_pct"] - 8.0) < 0.8
    t1a, aff = _load(out / base["t1"])
    t1b, _ = _load(out / swollen["t1"])
    # a half-maximum outline: T1 above half the median tissue signal (as the truth's)
    thr = 0.5 * float(np.median(t1a[t1a > threshold_otsu(t1a[t1a > 0])]))
    assert thr == pytest.approx(swollen["swelling_outline_threshold"], rel=0.01)
    vox_ml = hybrid.voxel_volume_ml(aff)
    _, anat = hybrid._source_and_anatomy("calf", REALDATA, CALF_CROP)
    xr = ndimage.center_of_mass(anat.limb == hybrid.RIGHT)[0]
    xl = ndimage.center_of_mass(anat.limb == hybrid.LEFT)[0]
    assert aff[0, 0] * xr > aff[0, 0] * xl  # the patient's right is RAS +x
    right = np.zeros(t1a.shape, bool)
    right[int(round((xr + xl) / 2)):] = True

    def limb_ml(img: np.ndarray, half: np.ndarray) -> float:
        m = img > thr
        m[~half] = False
        m = np.stack([ndimage.binary_fill_holes(m[:, :, k]) for k in range(m.shape[2])], -1)
        return float(m.sum()) * vox_ml

    measured = limb_ml(t1b, right) - limb_ml(t1a, right)
    assert swollen["swelling_ml"] > 30
    assert abs(measured - swollen["swelling_ml"]) <= 0.02 * swollen["swelling_ml"], (
        measured, swollen["swelling_ml"])
    # the continuous outline differs by the outline's voxel discretisation only
    assert swollen["swelling_continuous_ml"] == pytest.approx(swollen["swelling_ml"], rel=0.04)
    # the contralateral (left) limb and the space around it are untouched
    left = ndimage.binary_dilation(anat.limb == hybrid.LEFT, np.ones((3, 3, 1), bool),
                                   iterations=10)
    assert np.array_equal(t1a[left], t1b[left])
    assert np.array_equal(t1a[~right], t1b[~right])
    assert math.isclose(swollen["true_asymmetry_change_pp"],
                        100 * swollen["swelling_ml"] / truth["contralateral_soft_tissue_ml"],
                        rel_tol=1e-4)
    # the lesion (in bone, which does not move) is the same
    la, _ = _load(out / base["lesion_mask"])
    lb, _ = _load(out / swollen["lesion_mask"])
    assert np.array_equal(la, lb)
    assert sum(v for _, v in swollen["swelling_ml_by_slice"]) == pytest.approx(
        swollen["swelling_ml"], rel=1e-4)


@needs_data
def test_calf_repositioned_session(calf_case: tuple[Path, dict[str, Any]]) -> None:
    out, truth = calf_case
    base, moved = truth["sessions"][0], truth["sessions"][2]
    la, aff_a = _load(out / base["lesion_mask"])
    lb, aff_b = _load(out / moved["lesion_mask"])
    assert np.allclose(np.linalg.norm(aff_b[:3, :3], axis=0), (1.0, 1.0, 5.0))
    assert lb.shape[2] == la.shape[2] - 2  # 10 mm of the 120 mm extent left the field
    assert moved["lesion_ml"] == base["lesion_ml"]
    assert abs(moved["lesion_mask_ml"] - moved["lesion_ml"]) < 0.15 * moved["lesion_ml"]
    # the lesion moved with the anatomy: rotated 3 deg about the FOV centre, +10 mm along z
    shape = np.array(la.shape)
    centre = aff_a[:3, :3] @ ((shape - 1) / 2.0) + aff_a[:3, 3]
    ca, cb = _world(la, aff_a), _world(lb, aff_b)
    t = math.radians(3.0)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    expected = rot @ (ca - centre) + centre + np.array([0, 0, 10.0])
    assert np.linalg.norm(cb - expected) < 1.0, (cb, expected)
    # the whole anatomy too: bright-voxel centroid in z moves by the table shift
    t1a, _ = _load(out / base["t1"])
    t1b, _ = _load(out / moved["t1"])
    za = np.array([(t1a[:, :, k] > 30).sum() for k in range(t1a.shape[2])])
    zb = np.array([(t1b[:, :, k] > 30).sum() for k in range(t1b.shape[2])])
    z_a = aff_a[2, 2] * np.arange(za.size) + aff_a[2, 3]
    z_b = aff_b[2, 2] * np.arange(zb.size) + aff_b[2, 3]
    # slice profiles agree where both exist, after the shift
    common = [(a, float(np.interp(z + 10.0, z_b, zb))) for z, a in zip(z_a, za, strict=True)
              if z_b[0] <= z + 10.0 <= z_b[-1]]
    a_prof, b_prof = np.array(common).T
    assert np.corrcoef(a_prof, b_prof)[0, 1] > 0.98


@needs_data
def test_not_fat_suppressed_variant(tmp_path: Path) -> None:
    truth = hybrid.make_case("thigh", tmp_path, (S(0, lesion_ml=2.0), S(10, lesion_ml=2.0)),
                             "right", fluid="in_phase", seed=3, realdata=REALDATA)
    assert truth["expected_flags"] == ["fluid_not_fat_suppressed"]
    assert truth["expected_pattern"]["pattern"] == "stable"
    src, anat = hybrid._source_and_anatomy("thigh", REALDATA, None)
    fl, _ = _load(tmp_path / truth["sessions"][0]["fluid"])
    ring, deep = _ring_and_deep(anat.limb > 0, anat.tissue >= hybrid.BONE, 0.8)
    assert np.median(fl[ring]) / np.median(fl[deep]) > 0.9  # fat not darker than muscle
    les, _ = _load(tmp_path / truth["sessions"][0]["lesion_mask"])
    assert np.all(anat.limb[les > 0] == hybrid.RIGHT)
