"""Registration to baseline, common extent and volumes inside it, on phantom sessions.

The phantom's anatomy is fixed in patient coordinates and a table shift moves the acquisition
grid over it, so two sessions with table shifts alone are already aligned in physical space
(true transform: identity, different coverage). A real scanner's coordinates follow the table
instead; `move_header` reproduces that by moving a session's header (origin, direction) by a
known rigid transform, which the registration must then recover.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from phantom_cases import small_spec

from pipeline.extent import common_extent, covered_range, volumes_in_extent
from pipeline.io.files import mm3_to_ml
from pipeline.labels import SIDE_OFFSET, SIDES, STRUCTURE_CLASSES
from pipeline.measure import volumes_from_labels
from pipeline.register import (
    OptimisedFit,
    RegistrationCandidate,
    RegistrationSettings,
    align_within_session,
    bone_initial_transform,
    main,
    poor_reasons,
    read_result,
    register_session,
    registration_quality,
)
from pipeline.validation import phantom

SPEC = small_spec()
ZC = 200.0  # phantom._z_centre: mid-thigh of the unshifted grid
CENTRE = (0.0, 0.0, ZC)
STATE_BASE = dict(swelling=0.05, lesion_ml=3.0, edema=0.3)
STATE_FLARE = dict(swelling=0.2, lesion_ml=5.0, edema=0.7)
# points spread over both thighs where the transforms are compared
THIGH_POINTS = [
    (x, y, z) for x in (-50, 0, 50) for y in (-30, 0, 30) for z in (ZC - 20, ZC, ZC + 20)
]


# --------------------------------------------------------------------------- helpers


def crop_slices(rendered: dict[str, Any], k0: int, k1: int) -> dict[str, Any]:
    """Slices k0..k1-1 of a rendered session: fewer slices, same anatomy.

    (A PhantomSpec with another n_slices would change the anatomy: the taper and the flare
    are defined relative to the covered length.)
    """
    g: phantom.Grid = rendered["grid"]
    grid = dataclasses.replace(
        g,
        origin=g.slice_origin(k0),
        shape_zyx=(k1 - k0, g.shape_zyx[1], g.shape_zyx[2]),
    )
    return {"grid": grid, "fractions": rendered["fractions"][:, k0:k1]}


def rigid(t: tuple[float, float, float], deg: float = 0.0) -> sitk.Euler3DTransform:
    tr = sitk.Euler3DTransform()
    tr.SetCenter(CENTRE)
    tr.SetRotation(0.0, 0.0, math.radians(deg))
    tr.SetTranslation(t)
    return tr


def move_header(img: sitk.Image, tr: sitk.Euler3DTransform) -> sitk.Image:
    """Same voxels, header moved by rigid `tr`: anatomy at p now reads tr(p)."""
    a = np.array(tr.GetMatrix()).reshape(3, 3)
    out = sitk.Image(img)
    out.SetOrigin(tr.TransformPoint(img.GetOrigin()))
    out.SetDirection(tuple((a @ np.array(img.GetDirection()).reshape(3, 3)).ravel()))
    return out


def make_session(
    state: dict[str, float], shift: float, seed: int, crop: tuple[int, int] | None = None
) -> dict[str, Any]:
    sess = phantom.SessionSpec(day=0, table_shift_mm=shift, **state)
    rendered = phantom.render_session(SPEC, sess, FIELDS)
    if crop is not None:
        rendered = crop_slices(rendered, *crop)
    images = phantom.synthesize(SPEC, rendered, np.random.default_rng(seed))
    _, labels = phantom.truth_of(SPEC, rendered)
    grid = rendered["grid"]
    return {
        "rendered": rendered,
        "t1": phantom.to_sitk(images["T1w"].astype(np.float32), grid),
        "fluid": phantom.to_sitk(images["STIR"].astype(np.float32), grid),
        "labels": phantom.to_sitk(labels, grid),
    }


def truth_in_extent(rendered: dict[str, Any], extent: tuple[float, float]) -> dict[str, Any]:
    """Phantom volumes (mL) inside a cranio-caudal extent of patient (anatomy) coordinates.

    From the partial-volume fractions, each slice weighted by the part of its thickness inside
    the extent (the content of a 5 mm slice assumed uniform along z).
    """
    g: phantom.Grid = rendered["grid"]
    frac = rendered["fractions"]
    nz = g.shape_zyx[0]
    z = np.array([g.slice_origin(k)[2] for k in range(nz)])
    h = g.slice_mm / 2
    w = np.clip((np.minimum(extent[1], z + h) - np.maximum(extent[0], z - h)) / (2 * h), 0, 1)
    voxel_mm3 = g.pixel_mm**2 * g.slice_mm
    out: dict[str, Any] = {}
    for s_idx, side in enumerate(("right", "left")):
        per_class = np.zeros((5, nz))
        for tcode, cls in phantom.TISSUE_CLASS.items():
            per_class[cls] += frac[s_idx * phantom.N_TISSUES + tcode].sum(axis=(1, 2))
        out[side] = {
            st: mm3_to_ml(float(sum(per_class[c] @ w for c in classes)) * voxel_mm3)
            for st, classes in STRUCTURE_CLASSES.items()
        }
    assert SIDE_OFFSET  # label layout used by truth_of
    return out


def max_error_mm(found: sitk.Transform, true: sitk.Transform) -> np.ndarray:
    err = [np.subtract(found.TransformPoint(p), true.TransformPoint(p)) for p in THIGH_POINTS]
    return np.abs(np.array(err)).max(axis=0)


FIELDS = phantom._fields(SPEC)  # same random textures for every session (one patient)


@pytest.fixture(scope="module")
def sessions() -> dict[str, dict[str, Any]]:
    return build_sessions()


def build_sessions() -> dict[str, dict[str, Any]]:
    """Baseline and four follow-ups; `true` is the baseline-to-session transform."""
    base = make_session(STATE_BASE, 0.0, seed=1)
    base["true"] = sitk.Transform(3, sitk.sitkIdentity)
    out = {"base": base}
    # scanner coordinates follow the table: +20 mm, swollen limb, bigger lesion, more edema
    s = make_session(STATE_FLARE, 20.0, seed=2)
    s["true"] = rigid((0.0, 0.0, 20.0))
    out["up20"] = s
    # off-grid shift, in-plane translation and a 4 degree rotation of the patient
    s = make_session(STATE_BASE, -12.6, seed=3)
    s["true"] = rigid((5.3, -3.1, -12.6), 4.0)
    out["down12"] = s
    # table shift only (coordinates follow the anatomy), swollen, 20 mm down
    s = make_session(STATE_FLARE, -20.0, seed=4)
    s["true"] = sitk.Transform(3, sitk.sitkIdentity)
    s["identity"] = True
    out["table-20"] = s
    # fewer slices (8 of 12) and a smaller field of view, 7.3 mm table shift, header -3 deg
    s = make_session(STATE_BASE, 7.3, seed=5, crop=(2, 10))
    s["true"] = rigid((0.0, 1.5, 7.3), -3.0)
    out["short"] = s
    for name, s in out.items():
        if name != "base" and not s.get("identity"):
            for key in ("t1", "fluid", "labels"):
                s[key] = move_header(s[key], s["true"])
    return out


@pytest.fixture(scope="module")
def registered(sessions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = sessions["base"]
    out: dict[str, Any] = {"base": None}
    for name, s in sessions.items():
        if name != "base":
            out[name] = register_session(base["t1"], s["t1"], base["labels"], s["labels"])
    return out


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("name", ["up20", "down12", "table-20", "short"])
def test_registration_recovers_the_transform(
    sessions: dict[str, Any], registered: dict[str, Any], name: str
) -> None:
    res = registered[name]
    err = max_error_mm(res.transform(), sessions[name]["true"])
    assert err[2] < 1.0, f"{name}: cranio-caudal error {err[2]:.2f} mm ({res.initialisation})"
    assert err.max() < 1.0, f"{name}: error {err} mm"
    true_tz = sessions[name]["true"].TransformPoint(CENTRE)[2] - ZC
    assert res.transform().TransformPoint(CENTRE)[2] - ZC == pytest.approx(true_tz, abs=1.0)
    assert not res.poor, res.poor_reasons
    assert res.quality is not None and res.quality.bone_dice > 0.9
    assert res.quality.centroid_distance_mm < 1.0
    assert res.seconds < 10


def test_bone_initialisation_alone_is_close(sessions: dict[str, Any]) -> None:
    base = sessions["base"]
    for name in ("up20", "down12", "short"):
        init = bone_initial_transform(base["labels"], sessions[name]["labels"])
        assert init is not None
        err = max_error_mm(init.transform, sessions[name]["true"])
        assert err.max() < 2.0, f"{name}: {err} ({init.how})"


def test_swollen_limb_driving_the_metric_is_flagged(sessions: dict[str, Any]) -> None:
    """Whole-image MI slides the swollen thigh along its taper; the bone-area profiles call
    it a failure only beyond 1.5 slices (7.5 mm here): the default fit is what prevents it."""
    base, s = sessions["base"], sessions["up20"]
    res = register_session(
        base["t1"], s["t1"], base["labels"], s["labels"], RegistrationSettings(reference="whole")
    )
    assert res.quality is not None and res.quality.z_vs_bone_profile_mm is not None
    flagged = any("bone-area profiles" in r for r in res.poor_reasons)
    assert flagged == (abs(res.quality.z_vs_bone_profile_mm) > 7.5)
    # the default (each limb in turn) does not slide: the contralateral limb drives the fit
    auto = register_session(base["t1"], s["t1"], base["labels"], s["labels"])
    assert max_error_mm(auto.transform(), s["true"])[2] < 1.0 and not auto.poor


def test_quality_flags_a_misregistration(sessions: dict[str, Any]) -> None:
    base, s = sessions["base"], sessions["up20"]
    wrong = sitk.Euler3DTransform(s["true"])
    wrong.SetTranslation(np.add(wrong.GetTranslation(), (8.0, 0.0, 0.0)))
    q = registration_quality(base["labels"], s["labels"], wrong)
    reasons = poor_reasons(q, RegistrationSettings())
    assert q.centroid_distance_mm == pytest.approx(8.0, abs=1.0)
    assert any("centroid" in r for r in reasons) and any("bone Dice" in r for r in reasons)
    good = registration_quality(base["labels"], s["labels"], s["true"])
    assert not poor_reasons(good, RegistrationSettings())
    assert good.overlap_mm == pytest.approx(40.0, abs=5.1)  # 60 mm fields 20 mm apart


def test_candidates_rank_by_problems_then_worst_side_bone_dice() -> None:
    fit = OptimisedFit(sitk.Euler3DTransform(), None, 0, "")
    flagged = RegistrationCandidate("left limb", fit, None, ("bone Dice 0.60 < 0.70",), 0.95)
    fair = RegistrationCandidate("right limb", fit, None, (), 0.80)
    good = RegistrationCandidate("whole image", fit, None, (), 0.90)
    ranked = sorted([flagged, fair, good], key=lambda c: c.rank)
    assert [c.region for c in ranked] == ["whole image", "right limb", "left limb"]


def test_cli_writes_tfm_and_json(sessions: dict[str, Any], tmp_path: Any) -> None:
    paths = {}
    for key, s in (("fixed", sessions["base"]), ("moving", sessions["down12"])):
        for kind in ("t1", "labels"):
            paths[key, kind] = tmp_path / f"{key}_{kind}.nii.gz"
            img = s[kind] if kind == "t1" else sitk.Cast(s[kind], sitk.sitkUInt8)
            sitk.WriteImage(img, str(paths[key, kind]))
    tfm, js = tmp_path / "out" / "reg.tfm", tmp_path / "out" / "reg.json"
    rc = main(
        [
            "--fixed-labels", str(paths["fixed", "labels"]),
            "--fixed-image", str(paths["fixed", "t1"]),
            "--moving-labels", str(paths["moving", "labels"]),
            "--moving-image", str(paths["moving", "t1"]),
            "--out-tfm", str(tfm),
            "--out-json", str(js),
        ]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(js.read_text())
    assert doc["transform_type"] == "Euler3DTransform" and doc["poor"] is False
    res = read_result(js)
    from_tfm = sitk.ReadTransform(str(tfm))
    true = sessions["down12"]["true"]
    assert max_error_mm(from_tfm, true).max() < 1.0
    assert max_error_mm(res.transform(), from_tfm).max() < 1e-6
    assert res.quality is not None and res.quality.bone_dice_by_side["left"] > 0.9


def test_align_within_session() -> None:
    s = make_session(STATE_BASE, 0.0, seed=9)
    same = align_within_session(s["fluid"], s["t1"])
    assert same.initialisation == "same grid" and same.parameters == (0.0,) * 6
    # T1 on its own grid (2 mm pixels, 4 mm slices, shifted origin), patient still
    ref = sitk.Image([100, 80, 14], sitk.sitkFloat32)
    ref.SetSpacing((2.0, 2.0, 4.0))
    ref.SetOrigin(np.add(s["t1"].GetOrigin(), (3.0, 2.0, 1.0)))
    t1_other = sitk.Resample(s["t1"], ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    res = align_within_session(s["fluid"], t1_other)
    assert res.parameters == (0.0,) * 6, res.initialisation  # below the motion threshold
    assert "identity kept" in res.initialisation
    # the patient moved between the two series: recovered in-plane to < 0.5 mm; along z the
    # T1-vs-STIR fit on 4-5 mm slices is biased by about 1.1 mm (a known limit, see report)
    for t in ((2.0, 0.0, 3.0), (4.0, -3.0, 0.0)):
        moved = rigid(t)
        res = align_within_session(s["fluid"], move_header(t1_other, moved))
        err = max_error_mm(res.transform(), moved)
        assert err[:2].max() < 0.5 and err[2] < 1.5, (t, err)
        assert not res.poor


# --------------------------------------------------------------------------- common extent


def test_same_extent_counts_every_slice(sessions: dict[str, Any]) -> None:
    lab = sessions["base"]["labels"]
    again = sitk.Image(lab)
    extent = common_extent([lab, again], [None, None])
    z0 = lab.GetOrigin()[2]
    assert extent == pytest.approx((z0 - 2.5, z0 + 11 * 5.0 + 2.5), abs=1e-6)
    expected = volumes_from_labels(sitk.GetArrayFromImage(lab), 1.6 * 1.6 * 5.0)
    got = volumes_in_extent(lab, None, extent)
    for side in SIDES:
        for st, v in expected[side].items():
            assert got[side][st] == pytest.approx(v, rel=1e-9, abs=1e-9)


def test_common_extent_of_shifted_sessions(
    sessions: dict[str, Any], registered: dict[str, Any]
) -> None:
    names = list(sessions)
    extent = common_extent([sessions[n]["labels"] for n in names], [registered[n] for n in names])
    # anatomy coverage: base ZC-30..+30, up20 ZC-50..+10, down12 ZC-17.4..+42.6,
    # table-20 ZC-10..+50, short (slices 2..9 of a +7.3 mm grid) ZC-27.3..+12.7
    assert extent == pytest.approx((ZC - 10.0, ZC + 10.0), abs=1.0)
    assert covered_range(sessions["short"]["labels"], registered["short"]) == pytest.approx(
        (ZC - 27.3, ZC + 12.7), abs=1.0
    )


def test_volumes_in_common_extent_match_truth(
    sessions: dict[str, Any], registered: dict[str, Any]
) -> None:
    names = list(sessions)
    extent = common_extent([sessions[n]["labels"] for n in names], [registered[n] for n in names])
    report = {}
    for n in names:
        got = volumes_in_extent(sessions[n]["labels"], registered[n], extent)
        truth = truth_in_extent(sessions[n]["rendered"], extent)
        for side in SIDES:
            for st in ("limb", "soft_tissue", "bone", "marrow_lesion", "edema"):
                t = truth[side][st]
                if t < 1.0:
                    continue
                report[n, side, st] = (got[side][st], t, 100 * (got[side][st] / t - 1))
    # edema is left out: the majority-vote label map of the phantom (truth_of) misses ~20 % of
    # its sub-voxel feathery edema on any grid; that is the label map, not the extent (the
    # same-state test below checks edema between sessions)
    for key, (g, t, pct) in report.items():
        if key[2] in ("limb", "soft_tissue", "bone", "marrow_lesion"):
            assert abs(pct) < 2.0, f"{key}: {g:.2f} vs truth {t:.2f} mL ({pct:+.2f} %)"


def test_same_state_sessions_agree_over_common_extent(
    sessions: dict[str, Any], registered: dict[str, Any]
) -> None:
    names = ["base", "down12", "short"]  # same disease state, different grids and coverage
    extent = common_extent([sessions[n]["labels"] for n in names], [registered[n] for n in names])
    vols = {n: volumes_in_extent(sessions[n]["labels"], registered[n], extent) for n in names}
    for n in names[1:]:
        for side in SIDES:
            # (the 3 mL lesion is checked against truth above: between grids its majority-vote
            # labels differ by up to 4 %, each within 2 % of that grid's truth)
            for st in ("limb", "soft_tissue", "bone", "edema"):
                a, b = vols["base"][side][st], vols[n][side][st]
                assert b == pytest.approx(a, rel=0.02, abs=1e-9), f"{n} {side} {st}: {b} vs {a}"


def test_a_limb_missing_in_one_session_does_not_narrow_the_extent(
    sessions: dict[str, Any],
) -> None:
    """A follow-up of one leg alone: the common range is where every session covers the
    limbs it shows; a session with no limb at all is an error."""
    lab = sessions["base"]["labels"]
    arr = sitk.GetArrayFromImage(lab)
    one = sitk.GetImageFromArray(np.where(arr > 4, 0, arr).astype(arr.dtype))
    one.CopyInformation(lab)
    both = common_extent([lab, lab], [None, None])
    assert common_extent([lab, one], [None, None]) == pytest.approx(both)
    right_only = covered_range(one, None, ["right"])
    assert common_extent([lab, one], [None, None])[0] >= right_only[0] - 1e-6
    empty = sitk.GetImageFromArray(np.zeros_like(arr))
    empty.CopyInformation(lab)
    with pytest.raises(ValueError, match="holds no limb"):
        common_extent([lab, empty], [None, None])
    # a limb absent everywhere (unilateral study) is not required
    assert common_extent([one, one], [None, None])[1] > common_extent([one], [None])[0]


# --------------------------------------------------------------------------- thin follow-ups
# Issue 17: a follow-up of a few thin slices stopped the patient with ITK's "number of pixels
# along direction 2 is less than 4" (multi-resolution shrink and recursive Gaussians).


def _thin(img: sitk.Image, slice_mm: float = 2.0) -> sitk.Image:
    """The same voxels on 2 mm slices: a 4x shrink of 1.6 mm pixels then wants 3 slices."""
    out = sitk.Image(img)
    spacing = list(out.GetSpacing())
    spacing[2] = slice_mm
    out.SetSpacing(spacing)
    return out


@pytest.fixture(scope="module")
def thin_base() -> dict[str, sitk.Image]:
    base = make_session(STATE_BASE, 0.0, seed=1)
    return {"t1": _thin(base["t1"]), "labels": _thin(base["labels"])}


def test_thin_follow_up_is_registered(thin_base: dict[str, sitk.Image]) -> None:
    fixed, labels = thin_base["t1"], thin_base["labels"]
    result = register_session(fixed, fixed[:, :, 3:9], labels, labels[:, :, 3:9])
    assert np.abs(result.translation_mm).max() < 1.0  # same anatomy: identity
    assert result.quality is not None and result.quality.bone_dice > 0.9
    # 12 mm of overlap is below the QC minimum: flagged, with the reason
    assert result.poor and any("overlap" in r for r in result.poor_reasons)


def test_three_slice_follow_up_in_plane(thin_base: dict[str, sitk.Image]) -> None:
    fixed, labels = thin_base["t1"], thin_base["labels"]
    result = register_session(fixed, fixed[:, :, 4:7], labels, labels[:, :, 4:7])
    assert result.rotation_deg[0] == 0.0 and result.rotation_deg[1] == 0.0  # in-plane only
    assert np.abs(result.translation_mm).max() < 1.0
    assert result.poor


def test_cli_itk_failure_flags_registration_failed(tmp_path: Any, monkeypatch: Any) -> None:
    import pipeline.register as reg

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Exception thrown in SimpleITK ImageRegistrationMethod_Execute: x\n"
                           "ITK ERROR: Filter(0x1): The number of pixels along direction 2 "
                           "is less than 4.")

    for name in ("fixed.nii.gz", "moving.nii.gz"):
        labels = sitk.Image(4, 4, 4, sitk.sitkUInt8)
        labels[1, 1, 1] = 1  # something segmented (an empty map is not registered at all)
        sitk.WriteImage(labels, str(tmp_path / name))
    monkeypatch.setattr(reg, "register_session", fail)
    tfm, js = tmp_path / "reg.tfm", tmp_path / "reg.json"
    rc = main(["--fixed-labels", str(tmp_path / "fixed.nii.gz"),
               "--fixed-image", str(tmp_path / "fixed.nii.gz"),
               "--moving-labels", str(tmp_path / "moving.nii.gz"),
               "--moving-image", str(tmp_path / "moving.nii.gz"),
               "--out-tfm", str(tfm), "--out-json", str(js)])
    assert rc == 0 and tfm.is_file()
    res = read_result(js)
    assert res.poor and res.poor_reasons == (
        "registration could not run: The number of pixels along direction 2 is less than 4.",)
