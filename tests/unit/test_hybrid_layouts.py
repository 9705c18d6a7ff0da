"""Hybrid cases with one-leg images (issue 18): each leg in its own image (split), and
follow-ups of the affected leg alone. Uses ``shared/realdata/legs`` (skipped when absent)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.validation import hybrid
from pipeline.validation.hybrid import HybridSession as S

try:
    REALDATA: str | None = str(hybrid.realdata_dir())
except hybrid.RealDataMissing:
    REALDATA = None

needs_data = pytest.mark.skipif(REALDATA is None, reason="real leg data absent "
                                "(shared/realdata/legs); set LIMBTRACK_REALDATA")
CALF_CROP = (22, 46)
SPLIT = hybrid.SplitLayout("right", (0.43, 0.27), 1.0)


def _case(out: Path, layouts: tuple[str, str]) -> dict[str, Any]:
    return hybrid.make_case(
        "calf", out, (S(0, lesion_ml=2.0, layout=layouts[0]),
                      S(14, lesion_ml=3.0, swelling_pct=6.0, layout=layouts[1])),
        "right", subject="L1", day0="2024-03-01", seed=12, t1_fat_gain=1.0,
        crop_slices=CALF_CROP, realdata=REALDATA, split=SPLIT)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The same case three ways: bilateral, split at both visits, and a split baseline with a
    follow-up of the affected (right) leg alone."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, layouts in (("bilateral", ("bilateral", "bilateral")), ("split", ("split", "split")),
                          ("affonly", ("split", "affected_only"))):
        out[name] = (root / name, _case(root / name, layouts))
    return out


def _sheet(case_dir: Path) -> list[dict[str, str]]:
    with open(case_dir / "sessions.tsv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _image(path: Path) -> sitk.Image:
    img = nib.load(str(path))
    return hybrid.to_sitk(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def test_layout_is_checked() -> None:
    with pytest.raises(ValueError):
        S(0, layout="both")
    with pytest.raises(ValueError):
        S(0, layout="split", table_shift_mm=5.0)
    with pytest.raises(ValueError):
        hybrid.SplitLayout("up")
    names = [c.name for c in hybrid.LAYOUT_SUITE]
    assert len(set(names) | {c.name for c in hybrid.HYBRID_SUITE}) == len(names) + len(
        hybrid.HYBRID_SUITE)
    for c in hybrid.LAYOUT_SUITE:  # each is its twin with the legs imaged otherwise
        twin = hybrid.suite_case(c.twin)
        assert [(s.day, s.lesion_ml, s.edema_ml, s.swelling_pct) for s in c.sessions] == [
            (s.day, s.lesion_ml, s.edema_ml, s.swelling_pct) for s in twin.sessions]
        assert (c.region, c.affected_side, c.seed) == (twin.region, twin.affected_side, twin.seed)
        rows = [{"day": s.day, "true_asymmetry_change_pp": s.swelling_pct,
                 "lesion_ml": s.lesion_ml, "edema_ml": s.edema_ml} for s in c.sessions]
        assert hybrid.expected_pattern(rows)["pattern"] in c.description


@needs_data
def test_sheet_rows_per_leg(cases: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    rows = _sheet(cases["affonly"][0])
    by_date: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        assert r["subject"] == "L1"
        by_date.setdefault(r["study_date"], []).append((r["role"], Path(r["path"]).name))
    assert sorted(by_date["2024-03-01"]) == [
        ("anatomical", "t1_left.nii.gz"), ("anatomical", "t1_right.nii.gz"),
        ("fluid", "fluid_left.nii.gz"), ("fluid", "fluid_right.nii.gz")]
    assert sorted(by_date["2024-03-15"]) == [("anatomical", "t1_right.nii.gz"),
                                             ("fluid", "fluid_right.nii.gz")]


@needs_data
def test_each_image_is_one_leg_of_the_bilateral_twin(
        cases: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    twin_dir, twin = cases["bilateral"]
    split_dir, split = cases["split"]
    _, anat = hybrid._source_and_anatomy("calf", REALDATA, CALF_CROP)
    limb_zyx = np.transpose(anat.limb, (2, 1, 0))  # split sessions here keep the source grid
    for ses_t, ses_s in zip(twin["sessions"], split["sessions"], strict=True):
        full = _image(twin_dir / ses_t["t1"])
        full_arr = sitk.GetArrayFromImage(full)  # [z, y, x] on the source grid
        source_x = np.array([full.TransformIndexToPhysicalPoint((i, 0, 0))[0]
                             for i in range(full.GetSize()[0])])  # LPS x
        for rec in (r for r in ses_s["images"] if r["role"] == "anatomical"):
            img = _image(split_dir / rec["path"])
            arr = sitk.GetArrayFromImage(img)
            xs = [img.TransformIndexToPhysicalPoint((i, 0, 0))[0] for i in (0,
                                                                            img.GetSize()[0] - 1)]
            sign = 1.0 if rec["side"] == "left" else -1.0  # LPS: +x is the patient's left
            assert sign * np.mean(xs) > 40.0  # centred on its leg's side
            assert source_x.min() < min(xs) and max(xs) < source_x.max()
            if not rec["resampled"]:
                assert img.GetSpacing() == full.GetSpacing()
                idx = full.TransformPhysicalPointToIndex(img.GetOrigin())
                box = np.s_[:, idx[1]:idx[1] + arr.shape[1], idx[0]:idx[0] + arr.shape[2]]
                kept = arr != 0
                assert kept.mean() > 0.5
                np.testing.assert_array_equal(arr[kept], full_arr[box][kept])  # the source
                # the other leg is outside the coil: nothing of it in this image
                other = hybrid.RIGHT if rec["side"] == "left" else hybrid.LEFT
                assert not arr[limb_zyx[box] == other].any()
            else:  # off the source lattice, 1.0 mm pixels, the twin's image resampled
                off = (np.array(img.GetOrigin()[:2]) - np.array(full.GetOrigin()[:2])) / np.array(
                    full.GetSpacing()[:2])
                assert np.all(np.abs(off - np.round(off)) > 0.1)
                assert img.GetSpacing()[:2] == (1.0, 1.0)
                ref = sitk.GetArrayFromImage(sitk.Resample(full, img, sitk.Transform(),
                                                           sitk.sitkLinear, 0.0))
                kept = arr != 0
                np.testing.assert_allclose(arr[kept], ref[kept], rtol=1e-4, atol=1e-3)


@needs_data
def test_truth_is_the_twins(cases: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    twin = cases["bilateral"][1]
    for name in ("split", "affonly"):
        case_dir, truth = cases[name]
        for ses_t, ses in zip(twin["sessions"], truth["sessions"], strict=True):
            for key in ("lesion_ml", "edema_ml", "swelling_ml", "true_asymmetry_change_pp",
                        "lesion_mask_ml"):
                assert ses[key] == ses_t[key], (name, key)
            twin_mask = np.asarray(nib.load(str(cases["bilateral"][0] / ses_t["lesion_mask"]))
                                   .dataobj)
            mask = np.asarray(nib.load(str(case_dir / ses["lesion_mask"])).dataobj)
            np.testing.assert_array_equal(mask, twin_mask)
        assert truth["expected_pattern"] == twin["expected_pattern"]
        assert truth["contralateral_soft_tissue_ml"] == twin["contralateral_soft_tissue_ml"]
    follow_up = cases["affonly"][1]["sessions"][1]
    assert follow_up["params"]["layout"] == "affected_only"
    assert {r["side"] for r in follow_up["images"]} == {"right"}
    assert "layout" not in twin["sessions"][0]["params"]  # bilateral truth as before
