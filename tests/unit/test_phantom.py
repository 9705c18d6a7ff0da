"""Phantom generator: exact truth, real DICOM geometry, determinism, MRI-like contrast."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from phantom_cases import small_spec

from pipeline.io.convert import read_series
from pipeline.validation import phantom


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    spec = small_spec(n_slices=4, sessions=(phantom.SessionSpec(day=0, lesion_ml=1.0),))
    phantom.generate(spec, tmp_path / "a")
    phantom.generate(spec, tmp_path / "b")
    assert _digest(tmp_path / "a" / "dicom") == _digest(tmp_path / "b" / "dicom")
    ta = json.loads((tmp_path / "a" / "truth.json").read_text())
    tb = json.loads((tmp_path / "b" / "truth.json").read_text())
    assert ta["sessions"] == tb["sessions"]
    other = phantom.PhantomSpec(**{**spec.__dict__, "seed": spec.seed + 1})
    phantom.generate(other, tmp_path / "c")
    assert _digest(tmp_path / "a" / "dicom") != _digest(tmp_path / "c" / "dicom")


def test_truth_volumes_converge_with_supersampling() -> None:
    """Truth at 3x3x3 samples per voxel agrees with a 6x6x9 integration within 0.5 %."""
    sess = phantom.SessionSpec(day=0, swelling=0.1, lesion_ml=4.0, edema=0.5)
    coarse = small_spec(n_slices=6, sessions=(sess,))
    fine = phantom.PhantomSpec(**{**coarse.__dict__, "supersample_xy": 6, "supersample_z": 9})
    vc, _ = phantom.truth_of(coarse, phantom.render_session(coarse, sess))
    vf, _ = phantom.truth_of(fine, phantom.render_session(fine, sess))
    for side in ("left", "right"):
        for structure in ("limb", "soft_tissue", "bone", "marrow_lesion"):
            if vf[side][structure] > 0:
                assert vc[side][structure] == pytest.approx(vf[side][structure], rel=0.005)
    # feathery edema is a fine texture: its integral converges more slowly
    assert vc["left"]["edema"] == pytest.approx(vf["left"]["edema"], rel=0.03)


def test_truth_matches_session_parameters(small_phantom: Path) -> None:
    truth = json.loads((small_phantom / "truth.json").read_text())
    first, last = truth["sessions"]
    left0, right0 = first["volumes_ml"]["left"], first["volumes_ml"]["right"]
    # structures add up
    for v in (left0, right0):
        assert v["limb"] == pytest.approx(v["soft_tissue"] + v["bone"], abs=0.01)
    # the affected (left) leg is swollen, has a lesion near the requested size and edema
    assert first["soft_tissue_asymmetry_pct"] > 3.0
    assert 2.0 < left0["marrow_lesion"] < 4.0
    assert left0["edema"] > 5.0
    assert right0["marrow_lesion"] == 0 and right0["edema"] == 0
    # last session: nothing to find, legs alike (natural asymmetry of a few percent at most)
    assert last["volumes_ml"]["left"]["marrow_lesion"] == 0
    assert abs(last["soft_tissue_asymmetry_pct"]) < 3.0
    # the majority-vote label map agrees with the fractional volumes for large structures
    lab = np.asarray(nib.load(small_phantom / first["label_map"]).dataobj)
    zooms = nib.load(small_phantom / first["label_map"]).header.get_zooms()
    voxel_ml = float(np.prod(zooms)) / 1000
    assert np.isin(lab, [5, 6, 7, 8]).sum() * voxel_ml == pytest.approx(left0["limb"], rel=0.02)
    assert np.isin(lab, [7, 8]).sum() * voxel_ml == pytest.approx(left0["bone"], rel=0.05)


def test_dicom_files_are_real_mr_images(small_phantom: Path) -> None:
    files = sorted((small_phantom / "dicom").rglob("IM*"))
    assert len(files) == 2 * 2 * 12  # sessions x series x slices
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == phantom.MR_IMAGE_STORAGE
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                "SliceThickness", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate",
                "ScanningSequence", "SequenceVariant", "RepetitionTime", "EchoTime",
                "PatientPosition", "FrameOfReferenceUID"):
        assert tag in ds, tag
    assert ds.pixel_array.shape == (96, 128)
    stir = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {d.SeriesDescription for d in stir} == {"T1 TSE AX", "STIR AX"}
    assert all("IR" in d.ScanningSequence for d in stir if d.SeriesDescription == "STIR AX")


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_left_leg_is_at_positive_lps_x_for_every_patient_position(
    tmp_path: Path, position: str
) -> None:
    spec = small_spec(position=position, n_slices=4, slice_order="interleaved",
                      sessions=(phantom.SessionSpec(day=0, lesion_ml=1.5),))
    phantom.generate(spec, tmp_path)
    series = sorted((tmp_path / "dicom" / "ST0001" / "SE0003").iterdir())
    image, _ = read_series(series)
    truth = json.loads((tmp_path / "truth.json").read_text())
    lab = nib.load(tmp_path / truth["sessions"][0]["label_map"])
    data = np.asarray(lab.dataobj)
    ras = nib.affines.apply_affine(lab.affine, np.argwhere(np.isin(data, [5, 6, 7, 8])))
    assert ras[:, 0].mean() < -20  # RAS x < 0 is the patient's left (LPS x > 0)
    # The DICOM geometry and the truth map describe the same grid: the T1 image is bright
    # (fat/muscle) where the truth says limb, dark where it says background.
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    idx = np.argwhere(np.isin(data, [1, 5]))[:200]
    pts_lps = nib.affines.apply_affine(lab.affine, idx) * np.array([-1, -1, 1])
    vals = [arr[tuple(reversed(image.TransformPhysicalPointToIndex(tuple(p))))] for p in pts_lps]
    assert np.median(vals) > 200
    instance_positions = [float(pydicom.dcmread(f).SliceLocation) for f in series]
    assert instance_positions != sorted(instance_positions)  # interleaved acquisition order


def test_contrast_follows_the_literature() -> None:
    spec = small_spec(n_slices=3, bias=0.0, sessions=(phantom.SessionSpec(day=0),))
    rendered = phantom.render_session(spec, spec.sessions[0])
    images = phantom.synthesize(spec, rendered, np.random.default_rng(0))
    frac = rendered["fractions"]
    pure_muscle = frac[phantom.MUSCLE] > 0.999
    pure_fat = frac[phantom.FAT] > 0.999
    t1, stir = images["T1w"].astype(float), images["STIR"].astype(float)
    assert t1[pure_muscle].mean() / t1[pure_fat].mean() == pytest.approx(0.33, abs=0.03)
    assert stir[pure_fat].mean() < 0.3 * stir[pure_muscle].mean()  # fat suppressed
    snr_t1 = t1[pure_muscle].mean() / t1[pure_muscle].std()
    snr_stir = stir[pure_muscle].mean() / stir[pure_muscle].std()
    assert 18 < snr_t1 < 32 and 7 < snr_stir < 13


def test_bias_field_has_requested_peak_to_peak() -> None:
    spec = small_spec(n_slices=3, bias=0.3)
    grid = phantom.make_grid(spec)
    field = phantom.bias_field(spec, grid)
    assert float(np.ptp(field)) == pytest.approx(0.3, abs=1e-6)
    assert field.mean() == pytest.approx(1.0, abs=0.1)


def test_parse_sessions_and_cli(tmp_path: Path) -> None:
    specs = phantom.parse_sessions("-5:0.1:6:0.3,14:0:0:0:12.5")
    assert specs[0] == phantom.SessionSpec(-5, 0.1, 6.0, 0.3)
    assert specs[1].table_shift_mm == 12.5
    with pytest.raises(ValueError):
        phantom.parse_sessions("1:2:3:4:5:6:7")
    assert phantom.parse_sessions("3:0:0:0:-20:24")[0].n_slices == 24
    rc = phantom.main([str(tmp_path), "--slices", "3", "--matrix", "96x72",
                       "--leg-radius-mm", "30", "--sessions", "0:0:0:0", "--sides", "right",
                       "--affected-side", "right"])
    assert rc == 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["sides"] == ["right"]
    assert truth["sessions"][0]["volumes_ml"]["left"]["limb"] == 0


# --- regions, vessels, growth plates, field-of-view clipping, coil-edge loss, contrast ---

#: sha256 of T1, STIR and label arrays of `_default_like()`, computed with the generator before
#: regions and the newer options existed: the default phantom must stay byte-identical.
DEFAULT_LIKE_SHA256 = "0ea4e4dcf87c27a10d00e1b126608f728fa5b190786e4857db464a3b68cad5be"


def _default_like() -> phantom.PhantomSpec:
    return small_spec(n_slices=4, matrix=(96, 72), sessions=(
        phantom.SessionSpec(day=0, swelling=0.1, lesion_ml=2.0, edema=0.5),))


def _region_spec(region: str, **kw: object) -> phantom.PhantomSpec:
    """A small knee or calf: child-size leg, 1.6 mm pixels, 5 mm slices."""
    base: dict[str, object] = dict(
        region=region, leg_radius_mm=40.0, bone_radius_mm=10.0, cortex_mm=2.6, gap_mm=10.0,
        matrix=(104, 60), pixel_mm=1.6, n_slices=4, slice_mm=5.0, supersample_xy=3,
        supersample_z=2, sessions=(phantom.SessionSpec(day=0),))
    base.update(kw)
    return phantom.PhantomSpec(**base)  # type: ignore[arg-type]


def test_default_phantom_is_unchanged() -> None:
    spec = _default_like()
    assert phantom.is_legacy(spec) and spec.vessels is False
    rendered = phantom.render_session(spec, spec.sessions[0])
    images = phantom.synthesize(spec, rendered, np.random.default_rng(3))
    _, labels = phantom.truth_of(spec, rendered)
    h = hashlib.sha256()
    for a in (images["T1w"], images["STIR"], labels):
        h.update(np.ascontiguousarray(a).tobytes())
    assert h.hexdigest() == DEFAULT_LIKE_SHA256
    # the newer options do not appear in a legacy phantom's truth.json either
    spec_json = phantom._spec_json(spec)
    assert "region" not in spec_json and "fov_clip_mm" not in spec_json["sessions"][0]
    assert "region" in phantom._spec_json(_region_spec("calf"))


def test_calf_bone_volume_is_tibia_plus_fibula() -> None:
    spec = _region_spec("calf")
    assert spec.vessels is True  # on by default outside the thigh
    rendered = phantom.render_session(spec, spec.sessions[0])
    volumes, labels = phantom.truth_of(spec, rendered)
    area = phantom.calf_bone_area_mm2(spec)
    length_mm = spec.n_slices * spec.slice_mm
    expected_ml = (area["tibia"] + area["fibula"]) * length_mm / 1000
    for side in ("left", "right"):
        assert volumes[side]["bone"] == pytest.approx(expected_ml, rel=0.02)
        assert volumes[side]["bone"] > area["tibia"] * length_mm / 1000 * 1.15  # fibula counted
    # two separate bones per leg, the fibula lateral (LPS x farther from the midline)
    from scipy import ndimage as ndi

    comps, n = ndi.label(labels[1] == 7)  # left bone, middle slice
    assert n == 2
    sizes = ndi.sum(np.ones_like(comps), comps, index=[1, 2])
    cols = ndi.center_of_mass(np.ones_like(comps), comps, index=[1, 2])
    small = int(np.argmin(sizes))
    assert cols[small][1] > cols[1 - small][1]  # HFS: columns increase toward the patient's left


def test_vessels_are_soft_tissue_bright_on_stir_dark_on_t1() -> None:
    spec = _region_spec("knee", bias=0.0, n_slices=3, lesion_z_fraction=0.8,
                        sessions=(phantom.SessionSpec(day=0, edema=1.0),))
    rendered = phantom.render_session(spec, spec.sessions[0])
    images = phantom.synthesize(spec, rendered, np.random.default_rng(0))
    _, labels = phantom.truth_of(spec, rendered)
    frac = rendered["fractions"]
    for s_idx, soft_label in ((0, 1), (1, 5)):
        vessel = frac[s_idx * phantom.N_TISSUES + phantom.VESSEL] > 0.9
        muscle = frac[s_idx * phantom.N_TISSUES + phantom.MUSCLE] > 0.999
        assert vessel.sum() >= 10
        assert np.all(labels[vessel] == soft_label)  # soft tissue: not bone, not edema
        t1, stir = images["T1w"].astype(float), images["STIR"].astype(float)
        assert t1[vessel].mean() < 0.4 * t1[muscle].mean()
        assert stir[vessel].mean() > 1.8 * stir[muscle].mean()
    no_vessels = dataclasses.replace(spec, vessels=False)
    frac0 = phantom.render_session(no_vessels, spec.sessions[0])["fractions"]
    assert frac0[phantom.VESSEL].sum() == 0 and frac0[phantom.N_TISSUES + phantom.VESSEL].sum() == 0


def test_knee_has_femur_and_patella_above_tibia_and_fibular_head_below() -> None:
    from scipy import ndimage as ndi

    spec = _region_spec("knee", n_slices=2, slice_mm=2.0, supersample_z=1)
    b = spec.bone_radius_mm
    for z_mm, n_bones in ((2.3 * b, 2), (-2.9 * b, 2), (0.0, 0)):
        # two thin slices centred at z_mm: table shift moves the anatomy under the grid
        sess = phantom.SessionSpec(day=0, table_shift_mm=phantom._z_centre(spec) - z_mm)
        _, labels = phantom.truth_of(spec, phantom.render_session(spec, sess))
        for bone_label in (3, 7):
            _, n = ndi.label(labels[0] == bone_label)
            assert n == n_bones, (z_mm, bone_label)


def test_growth_plates_are_bone() -> None:
    b = 10.0
    kw: dict[str, object] = dict(n_slices=2, slice_mm=4.0, supersample_z=4)
    sess = phantom.SessionSpec(day=0, table_shift_mm=phantom.REGION_Z_CENTRE["knee"] - 1.6 * b)
    child = _region_spec("knee", growth_plates=True, sessions=(sess,), **kw)
    adult = _region_spec("knee", sessions=(sess,), **kw)
    r_child = phantom.render_session(child, sess)
    v_child, _ = phantom.truth_of(child, r_child)
    v_adult, _ = phantom.truth_of(adult, phantom.render_session(adult, sess))
    physis = r_child["fractions"][phantom.N_TISSUES + phantom.PHYSIS]
    assert physis.sum() * 1.6 * 1.6 * 4.0 / 1000 > 1.0  # mL of left distal femoral physis
    assert v_child["left"]["bone"] == pytest.approx(v_adult["left"]["bone"], abs=1e-3)


def test_fov_clip_cuts_the_lateral_side_and_is_recorded(tmp_path: Path) -> None:
    spec = small_spec(n_slices=3, matrix=(144, 96), sessions=(
        phantom.SessionSpec(day=0, lesion_ml=2.0),
        phantom.SessionSpec(day=7, lesion_ml=2.0, fov_clip_mm=15.0)))
    truth = phantom.generate(spec, tmp_path)
    s0, s1 = truth["sessions"]
    assert s0["fov_clipped_sides"] == [] and s1["fov_clipped_sides"] == ["left"]
    lab = np.asarray(nib.load(tmp_path / s1["label_map"]).dataobj)  # [x, y, z], RAS affine
    lab0 = np.asarray(nib.load(tmp_path / s0["label_map"]).dataobj)
    assert lab.shape[0] < lab0.shape[0] and lab.shape[1:] == lab0.shape[1:]
    assert np.isin(lab[-1], [5, 6, 7, 8]).any()  # HFS: the last column is the patient's left
    assert not np.isin(lab[0], [1, 2, 3, 4, 5, 6, 7, 8]).any()
    left, left_full = s1["volumes_ml"]["left"]["limb"], s1["volumes_ml_unclipped"]["left"]["limb"]
    assert left < left_full and left_full == pytest.approx(s0["volumes_ml"]["left"]["limb"])
    assert s1["volumes_ml"]["right"] == s0["volumes_ml"]["right"]
    files = sorted((tmp_path / "dicom" / "ST0002" / "SE0003").iterdir())
    assert pydicom.dcmread(files[0]).Columns == lab.shape[0]


def test_coil_edge_void_slices_are_dark_and_recorded(tmp_path: Path) -> None:
    # feet first: the grid runs downward, the truth still lists z-ascending indices
    spec = small_spec(n_slices=6, position="FFS", sessions=(
        phantom.SessionSpec(day=0, signal_void_slices=2, signal_void_end="inferior"),))
    truth = phantom.generate(spec, tmp_path)
    s = truth["sessions"][0]
    assert s["signal_void_slices"] == [0, 1]
    for side in ("left", "right"):
        assert s["volumes_ml_valid"][side]["limb"] == pytest.approx(
            s["volumes_ml"][side]["limb"] * 4 / 6, rel=0.1)
    lab = nib.load(tmp_path / s["label_map"])
    z_of_slice = nib.affines.apply_affine(lab.affine, [[0, 0, k] for k in range(6)])[:, 2]
    limb = np.asarray(lab.dataobj)[..., np.argsort(z_of_slice)] > 0  # [x, y, z ascending]
    for series in ("SE0003", "SE0004"):
        dss = [pydicom.dcmread(f) for f in (tmp_path / "dicom" / "ST0001" / series).iterdir()]
        dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        # mean signal in the limb, slice by slice from the most inferior up (pixel_array is [y, x])
        means = [float(d.pixel_array.T[limb[..., k]].mean()) for k, d in enumerate(dss)]
        assert max(means[:2]) < 0.5 * min(means[2:]), (series, means)
        assert means[0] < means[1]  # the very end is darkest


def test_fluid_without_fat_suppression_and_anatomical_not_t1_like() -> None:
    base = small_spec(n_slices=2, bias=0.0, sessions=(phantom.SessionSpec(day=0),))
    for spec, series, fat_over_muscle in (
        (base, "STIR", (0.0, 0.3)),
        (dataclasses.replace(base, stir_fat_suppressed=False), "STIR", (2.0, 5.0)),
        (dataclasses.replace(base, t1_like=False), "T1w", (0.0, 0.3)),
    ):
        rendered = phantom.render_session(spec, spec.sessions[0])
        img = phantom.synthesize(spec, rendered, np.random.default_rng(0))[series].astype(float)
        fat = img[rendered["fractions"][phantom.FAT] > 0.999].mean()
        muscle = img[rendered["fractions"][phantom.MUSCLE] > 0.999].mean()
        assert fat_over_muscle[0] < fat / muscle < fat_over_muscle[1], (series, fat / muscle)


def test_cli_options_for_regions_and_artefacts() -> None:
    args = phantom.build_parser().parse_args([
        "out", "--region", "calf", "--growth-plates", "--no-stir-fat-suppressed",
        "--no-t1-like", "--sessions=0:0:2:0,7:0:2:0", "--fov-clip", "2:12:both",
        "--void-slices", "all:3:superior"])
    spec = phantom.spec_from_args(args)
    assert (spec.region, spec.vessels, spec.growth_plates) == ("calf", True, True)
    assert not spec.stir_fat_suppressed and not spec.t1_like
    assert spec.sessions[0].fov_clip_mm == 0 and spec.sessions[1].fov_clip_mm == 12.0
    assert spec.sessions[1].fov_clip_side == "both"
    assert [s.signal_void_slices for s in spec.sessions] == [3, 3]
    assert {s.signal_void_end for s in spec.sessions} == {"superior"}
    thigh = phantom.spec_from_args(phantom.build_parser().parse_args(["out"]))
    assert thigh == phantom.PhantomSpec() and thigh.vessels is False
    no_vessels = phantom.build_parser().parse_args(["out", "--region", "knee", "--no-vessels"])
    assert phantom.spec_from_args(no_vessels).vessels is False
    with pytest.raises(ValueError):
        phantom.spec_from_args(phantom.build_parser().parse_args(["out", "--fov-clip", "9:10"]))
