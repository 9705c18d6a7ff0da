"""Tests of pipeline.report on a synthetic subject folder (small images with known labels)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline import labels, qc
from pipeline.geometry import orient_lps, resample_onto
from pipeline.io.files import read_tsv, write_tsv_atomic
from pipeline.longitudinal import LONGITUDINAL_COLUMNS
from pipeline.profiles import (
    CIRCUMFERENCE_COLUMNS,
    CSA_COLUMNS,
    Landmark,
    circumference_profile,
    csa_profile,
)
from pipeline.report import html as html_env
from pipeline.report.build import build_report, main, render_html
from pipeline.report.context import build_context
from pipeline.report.inputs import ReportInputs
from pipeline.report.overlays import OverlayView
from pipeline.report.phi import is_phi_key
from pipeline.report.positions import largest_swelling, slice_candidates
from pipeline.report.qcview import QCIndex, pattern_headline, read_flags
from pipeline.report.slices import (
    axial_slab,
    coronal_slab,
    radiological_axial_slice,
    radiological_coronal_slice,
)
from pipeline.report.states import confirmation_headline, session_state_rows
from pipeline.report.timeline import MDC_ALPHA, MDC_COLOR, render_timeline

SUBJECT = "demo"
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(2)>"
SESSIONS = [("2024-02-25", -5, 20.0), ("2024-03-04", 3, 60.0), ("2024-03-15", 14, 22.0)]
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SWELLING_Z_MM = 12.5
LESION_Z_MM = 5.0
#: Session 2024-03-04 lies 10 mm higher in its scanner than the baseline (registration +10 mm z).
SHIFTED_SESSION, SHIFT_Z_MM = 1, 10.0
FAKE_NAME = "MUSTERMANN^ERIKA"
PHI_CANARY = {
    "PatientName": "CANARY^PHI",
    "PatientID": "CANARY-ID-123",
    "PatientBirthDate": "19990101",
}


#: The uncertainty columns of longitudinal.tsv after ``qc`` (pipeline.longitudinal).
LONG_UNCERTAINTY = LONGITUDINAL_COLUMNS[LONGITUDINAL_COLUMNS.index("qc") + 1:]
ASYM_CI, CHANGE_CI, MDC_ASYM = 2.5, 3.0, 3.5
TIMING = [
    "day -5: before the infusion; 5 days before CAR-T infusion (day 0)",
    "day 3: within the CRS window (days 1-14); on the day of tocilizumab $x^2$",
    "day 14: within the CRS window (days 1-14); 11 days after tocilizumab $x^2$ (day 3)",
]
WITHIN_TEXT = ("marrow lesion 2.1 mL vs 1.8 mL at baseline (x1.17, +0.3 mL; thresholds x1.2 "
               "and +1 mL; MDC95 1.5 mL)")
SESSION_STATES = [
    {"study_date": "2024-02-25", "day": -5, "state": "baseline", "criteria": [],
     "within_measurement_error": [], "note": "", "timing": TIMING[0]},
    {"study_date": "2024-03-04", "day": 3, "state": "unconfirmed flare",
     "criteria": ["soft-tissue asymmetry +19.0 % vs +9.9 % at baseline (+9.1 pp, threshold "
                  "+5 pp, MDC95 3.5 pp)"],
     "within_measurement_error": [WITHIN_TEXT], "note": "first flare of the episode",
     "timing": TIMING[1]},
    {"study_date": "2024-03-15", "day": 14, "state": "resolved", "criteria": [],
     "within_measurement_error": [], "note": "back within the resolution criteria",
     "timing": TIMING[2]},
]


def _vol_ci(ml: float) -> float | None:
    """A demo-like 95 % half-width: 2 % of the volume plus a floor; n/a without a volume."""
    return round(0.02 * ml + 0.2, 3) if ml else None


def _physical_grid(size_xyz, spacing_xyz, origin_xyz, direction):
    """LPS coordinates (mm) of every voxel, each of shape (Z, Y, X) like the numpy array."""
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in size_xyz[::-1]), indexing="ij")
    idx_mm = np.stack([ii * spacing_xyz[0], jj * spacing_xyz[1], kk * spacing_xyz[2]])
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    phys = (
        np.tensordot(d, idx_mm, axes=1) + np.asarray(origin_xyz, dtype=float)[:, None, None, None]
    )
    return phys[0], phys[1], phys[2]


def _centred_origin(size_xyz, spacing_xyz, direction):
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    extent = (np.asarray(size_xyz) - 1) * np.asarray(spacing_xyz)
    return tuple(float(v) for v in -(d @ extent) / 2.0)


def _image(array_zyx, spacing, origin, direction):
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _phantom(size=(64, 48, 10), spacing=(3.0, 3.0, 5.0), direction=IDENTITY, edema_mm=20.0):
    """Two legs (discs at LPS x = -45 mm: right, +45 mm: left) with a left marrow lesion.

    The left leg swells by edema_mm / 5 mm of radius at most, at z = SWELLING_Z_MM.
    Returns fluid image, T1 image, label map; labels follow the geometry, not the array order.
    """
    origin = _centred_origin(size, spacing, direction)
    x, y, z = _physical_grid(size, spacing, origin, direction)
    lab = np.zeros(x.shape, np.uint8)
    for side, cx in (("right", -45.0), ("left", 45.0)):
        r = np.hypot(x - cx, y)
        radius = 30.0
        if side == "left":
            radius = 30.0 + edema_mm / 5.0 * np.clip(1.0 - np.abs(z - SWELLING_Z_MM) / 30.0, 0, 1)
        lab[r < radius] = labels.label_value(side, labels.SOFT_TISSUE)
        if side == "left":
            lab[(r < radius) & (r >= radius - edema_mm / 4) & (y < 0)] = labels.label_value(
                side, labels.EDEMA
            )
        lab[r < 10.0] = labels.label_value(side, labels.BONE)
    lesion = (np.hypot(x - 45.0, y) < 6.0) & (np.abs(z - LESION_Z_MM) < 8.0)
    lab[lesion] = labels.label_value("left", labels.LESION)
    rng = np.random.default_rng(0)
    fluid = (
        100.0 + 300.0 * np.isin(lab, [2, 4, 6, 8]) + 50.0 * (lab > 0) + rng.normal(0, 5, lab.shape)
    ).astype(np.float32)
    t1 = (
        80.0
        + 200.0 * np.isin(lab, [1, 5])
        + 120.0 * np.isin(lab, [3, 7])
        + rng.normal(0, 5, lab.shape)
    ).astype(np.float32)
    return (
        _image(fluid, spacing, origin, direction),
        _image(t1, spacing, origin, direction),
        _image(lab, spacing, origin, direction),
    )


def _write_subject(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    sessions, long_rows, vol_rows, csa_rows, circ_rows = [], [], [], [], []
    base_soft = None
    base_asym: dict[str, float | None] = {}
    for i, (date, day, edema_mm) in enumerate(SESSIONS):
        ses = date.replace("-", "")
        fluid, t1, dseg = _phantom(edema_mm=edema_mm)
        # T1 on a different grid (finer, x-flipped storage) to exercise resampling
        t1 = sitk.Resample(
            t1,
            _image(
                np.zeros((10, 60, 80), np.float32),
                (2.4, 2.4, 5.0),
                _centred_origin((80, 60, 10), (2.4, 2.4, 5.0), FLIP_X),
                FLIP_X,
            ),
            sitk.Transform(),
            sitk.sitkLinear,
            0.0,
        )
        if i == SHIFTED_SESSION:  # the same anatomy 10 mm higher in this session's scanner
            for img in (t1, fluid, dseg):
                o = img.GetOrigin()
                img.SetOrigin((o[0], o[1], o[2] + SHIFT_Z_MM))
        xfm = sitk.Euler3DTransform()
        xfm.SetTranslation((0.0, 0.0, SHIFT_Z_MM if i == SHIFTED_SESSION else 0.0))
        if i > 0:  # maps baseline points to session points (pipeline.register)
            (d / f"ses-{ses}").mkdir(parents=True, exist_ok=True)
            sitk.WriteTransform(xfm, str(d / f"ses-{ses}/sub-{SUBJECT}_ses-{ses}_xfm.tfm"))
        landmarks = {side: Landmark(side, -20.0, "test", None, "") for side in labels.SIDES}
        csa_rows.extend(csa_profile(dseg, xfm, landmarks, ses))
        circ_rows.extend(circumference_profile(dseg, xfm, landmarks, step_mm=10.0, session=ses))
        files = {}
        for key, img in (("t1", t1), ("fluid", fluid), ("dseg", dseg)):
            suffix = {"t1": "T1w", "fluid": "fluid", "dseg": "dseg"}[key]
            rel = f"ses-{ses}/sub-{SUBJECT}_ses-{ses}_{suffix}.nii.gz"
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(d / rel))
            files[key] = rel
        sessions.append(
            {
                "session": ses,
                "study_date": date,
                "day": day,
                "files": files,
                "anatomical_series": "T1 TSE AX (series 3)",
                "fluid_series": XSS_SCRIPT if i == 1 else f"STIR <b>{FAKE_NAME}</b> (series 4)",
                "warnings": [XSS_IMG] if i == 1 else [],
            }
        )
        lab = sitk.GetArrayFromImage(dseg)
        ml = 3.0 * 3.0 * 5.0 / 1000.0
        vols = {
            side: {
                s: float(np.isin(lab, labels.structure_labels(side, s)).sum() * ml)
                for s in labels.STRUCTURES
            }
            for side in labels.SIDES
        }
        for side in labels.SIDES:
            for s in labels.STRUCTURES:
                vol_rows.append(
                    {
                        "subject": SUBJECT,
                        "study_date": date,
                        "day": day,
                        "side": side,
                        "role": "affected" if side == "left" else "contralateral",
                        "structure": s,
                        "volume_ml": vols[side][s],
                        "volume_ml_ci95": _vol_ci(vols[side][s]),
                    }
                )
        for s in labels.STRUCTURES:
            aff, con = vols["left"][s], vols["right"][s]
            if s == "soft_tissue":
                aff *= 1.0 + edema_mm / 200.0
            if i == 0 and s == "soft_tissue":
                base_soft = aff
            asym = 100.0 * (aff / con - 1.0) if con else None
            if i == 0:
                base_asym[s] = asym
            change = 100.0 * (aff / base_soft - 1.0) if s == "soft_tissue" else None
            asym_change = (None if i == 0 or asym is None or base_asym[s] is None
                           else asym - base_asym[s])
            long_rows.append(
                {
                    "subject": SUBJECT,
                    "study_date": date,
                    "day": day,
                    "structure": s,
                    "affected_ml": aff,
                    "contralateral_ml": con if con else None,
                    "difference_ml": aff - con,
                    "asymmetry_pct": asym,
                    "change_from_baseline_pct": change,
                    # the uncertainty columns of longitudinal.tsv (issue 13), demo-like values
                    "affected_ml_ci95": _vol_ci(aff),
                    "contralateral_ml_ci95": _vol_ci(con) if con else None,
                    "difference_ml_ci95": _vol_ci(aff) if con else None,
                    "asymmetry_pct_ci95": ASYM_CI if asym is not None else None,
                    "change_from_baseline_pct_ci95": (
                        CHANGE_CI if change is not None and i > 0 else None
                    ),
                    "asymmetry_change_pp": asym_change,
                    "asymmetry_change_pp_ci95": MDC_ASYM if asym_change is not None else None,
                    "change_beyond_mdc95": (
                        None if change is None or i == 0
                        else "yes" if abs(change) > CHANGE_CI else "no"
                    ),
                }
            )
    write_tsv_atomic(d / "profile_csa.tsv", csa_rows, list(CSA_COLUMNS))
    write_tsv_atomic(d / "circumference.tsv", circ_rows, list(CIRCUMFERENCE_COLUMNS))
    write_tsv_atomic(
        d / "volumes.tsv",
        vol_rows,
        ["subject", "study_date", "day", "side", "role", "structure", "volume_ml",
         "volume_ml_ci95"],
    )
    write_tsv_atomic(
        d / "longitudinal.tsv",
        long_rows,
        [
            "subject",
            "study_date",
            "day",
            "structure",
            "affected_ml",
            "contralateral_ml",
            "difference_ml",
            "asymmetry_pct",
            "change_from_baseline_pct",
            *LONG_UNCERTAINTY,
        ],
    )
    index_rows = [
        {
            "study_date": "2024-03-04",
            "series_number": 4,
            "series_description": XSS_SCRIPT,
            "sequence_class": "fluid",
            "orientation": "axial",
            "n_files": 10,
            "status": "used",
            "reason": "",
        },
        {
            "study_date": "2024-03-04",
            "series_number": 9,
            "series_description": "localizer",
            "sequence_class": "other",
            "orientation": "mixed",
            "n_files": 3,
            "status": "rejected",
            "reason": "localizer " + XSS_IMG,
        },
    ]
    write_tsv_atomic(d / "index.tsv", index_rows, list(index_rows[0]))
    write_tsv_atomic(
        d / "problems.tsv", [{"path": "x/1.dcm", "problem": "not DICOM"}], ["path", "problem"]
    )
    summary = {
        "subject": SUBJECT,
        "affected_side": "left",
        "affected_side_source": "config",
        "day0": "2024-03-01",
        "baseline_study_date": "2024-02-25",
        "baseline_day": -5,
        "classification": "pseudo-progression",
        "reasons": [
            "Flare at day 3: soft-tissue asymmetry +9.1 pp over baseline (threshold 5 pp)",
            "Resolved at day 14: asymmetry within 2 pp of baseline",
        ],
        "warnings": ["global warning " + XSS_IMG],
        "sessions": sessions,
        "events": [
            {"day": 0, "date": "2024-03-01", "label": "CAR-T infusion", "category": "infusion"},
            {"day": 3, "date": "2024-03-04", "label": "tocilizumab $x^2$", "category": "drug"},
        ],
        "thresholds": {
            "flare_asymmetry_pp": 5.0,
            "resolved_asymmetry_pp": 2.0,
            "flare_lesion_ratio": 1.2,
            "flare_lesion_min_ml": 1.0,
            "flare_edema_ratio": 1.2,
            "flare_edema_min_ml": 10.0,
            "response_lesion_min_ml": 1.0,
            "response_lesion_ratio": 0.7,
            "response_asymmetry_pp": 5.0,
            "confirmation_min_interval_days": 4,
            "crs_window_days": 14,
        },
        "confirmation": "unconfirmed",
        "session_states": SESSION_STATES,
        "settings": {"n4": {"shrink": 4}, "registration": "rigid", "dicom": PHI_CANARY},
        "extent_mm": {
            "method": "common extent after registration",
            "z_min_mm": -12.5,
            "z_max_mm": 22.5,
            "length_mm": 35.0,
        },
        "baseline_session": "20240225",
        "landmarks": {s: {"z_mm": -20.0, "method": "test"} for s in labels.SIDES},
        "unilateral": False,
        "registration": {
            "20240304": {
                "translation_mm": [0.0, 0.0, SHIFT_Z_MM],
                "rotation_deg": [0.0, 0.0, 0.0],
                "quality": {
                    "bone_dice": 0.61,
                    "limb_dice": 0.9,
                    "centroid_distance_mm": 4.2,
                    "overlap_mm": 35.0,
                    "z_vs_bone_profile_mm": 0.1,
                },
                "poor": True,
                "poor_reasons": ["bone Dice 0.61 < 0.80"],
                "initialisation": "bones (right, left)",
            },
            "20240315": {
                "translation_mm": [0.0, 0.0, 0.0],
                "rotation_deg": [0.0, 0.0, 0.0],
                "quality": {
                    "bone_dice": 0.987,
                    "limb_dice": 0.97,
                    "centroid_distance_mm": 0.12,
                    "overlap_mm": 45.0,
                    "z_vs_bone_profile_mm": 0.0,
                },
                "poor": False,
                "poor_reasons": [],
                "initialisation": "bones (right, left)",
            },
        },
        "software": {"limbtrack": "0.1.0", "python": "3.11.7", "SimpleITK": "2.5.7"},
        "inputs": {"n_files": 320, "sha256_of_list": "ab" * 32, "files": []},
        "run_date": "2026-11-25T12:00:00Z",
    }
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return d


def _session_paths(d: Path) -> dict[str, list[Path]]:
    """The per-session files of a synthetic subject folder, as the report rule passes them
    (whether they exist or not): images of every session, transforms of the follow-ups."""
    stems = [d / f"ses-{s}" / f"sub-{SUBJECT}_ses-{s}"
             for s in (date.replace("-", "") for date, _, _ in SESSIONS)]
    return {
        "fluid": [Path(f"{x}_fluid.nii.gz") for x in stems],
        "t1": [Path(f"{x}_T1w.nii.gz") for x in stems],
        "dseg": [Path(f"{x}_dseg.nii.gz") for x in stems],
        "tfm": [Path(f"{x}_xfm.tfm") for x in stems[1:]],
        "xfm": [Path(f"{x}_xfm.json") for x in stems[1:]],
    }


TABLES = {"longitudinal": "longitudinal.tsv", "volumes": "volumes.tsv", "index": "index.tsv",
          "problems": "problems.tsv", "csa": "profile_csa.tsv",
          "circumference": "circumference.tsv"}


def _inputs(d: Path, sessions_json: Path | None = None) -> ReportInputs:
    """What the report rule gives the report of the subject in folder `d`."""
    return ReportInputs.of(d / "summary.json", sessions_json=sessions_json,
                           **{k: d / name for k, name in TABLES.items()}, **_session_paths(d))


def _argv(d: Path) -> list[str]:
    """The report command's arguments for the subject in folder `d` (as the rule passes them)."""
    argv = ["--summary", str(d / "summary.json")]
    for key, name in TABLES.items():
        argv += [f"--{key}", str(d / name)]
    for kind, paths in _session_paths(d).items():
        argv += [f"--{kind}", *map(str, paths)]
    return argv


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_subject(tmp_path_factory.mktemp("subj") / SUBJECT)


@pytest.fixture(scope="module")
def report_html(subject_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("out") / "report.html"
    build_report(_inputs(subject_dir), out)
    assert out.exists()
    return out.read_text(encoding="utf-8")


def _data_uri_pngs(html: str) -> list[np.ndarray]:
    return [
        imread(io.BytesIO(base64.b64decode(m)), format="png")
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    ]


N_VIEWS = 3  # axial at the lesion centre, axial at the largest swelling, coronal


def _captions(html: str, prefix: str) -> list[str]:
    return re.findall(re.escape(prefix) + r"[^<]*", html)


def test_report_content(report_html: str) -> None:
    assert "Pattern consistent with pseudo-progression" in report_html
    assert "measurement aid, not a diagnosis" in report_html
    for date, _, _ in SESSIONS:
        assert date in report_html
    assert "+9.1 pp" in report_html
    assert "(mL)" in report_html and "(pp)" in report_html and "(%)" in report_html
    assert "could not be drawn" not in report_html
    assert "2.5.7" in report_html and "ab" * 32 in report_html
    assert "@media print" in report_html and "break-inside: avoid" in report_html


def test_same_baseline_position_across_sessions(report_html: str) -> None:
    """Every session shows the same baseline z; the shifted session is read 10 mm higher."""
    axial = _captions(report_html, "Axial slice at baseline z = ")
    assert len(axial) == 2 * len(SESSIONS)
    lesion, swelling = axial[: len(SESSIONS)], axial[len(SESSIONS) :]
    for captions, expected_z in ((lesion, LESION_Z_MM), (swelling, SWELLING_Z_MM)):
        base_z = {float(re.search(r"baseline z = (-?[\d.]+)", c)[1]) for c in captions}
        assert len(base_z) == 1 and abs(base_z.pop() - expected_z) <= 2.5  # nearest 5 mm slice
        session_z = [float(re.search(r"z = (-?[\d.]+) mm in this session", c)[1]) for c in captions]
        assert session_z[SHIFTED_SESSION] - session_z[0] == pytest.approx(SHIFT_Z_MM, abs=0.01)
        assert session_z[2] == pytest.approx(session_z[0], abs=0.01)
    assert "centre of the marrow lesion segmented at 2024-02-25" in report_html
    assert "largest limb cross-sectional area difference" in report_html
    coronal = _captions(report_html, "Coronal reformat at baseline y = ")
    assert len(coronal) == len(SESSIONS)
    assert len({re.search(r"baseline y = (-?[\d.]+)", c)[1] for c in coronal}) == 1


def test_profile_circumference_and_qc(report_html: str) -> None:
    assert 'id="profile"' in report_html and "Cross-sectional area profile" in report_html
    table = report_html[report_html.index('id="circumference"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr>") == 1 + len(SESSIONS) * 5  # header + 5 distances per session
    reg = report_html[report_html.index('id="registration"') :]
    reg = reg[: reg.index("</table>")]
    assert 'class="poor"' in reg and "POOR: bone Dice 0.61 &lt; 0.80" in reg
    assert "reference (baseline)" in reg and "+10.00" in reg and "0.987" in reg
    assert "1 session(s) flagged poor" in report_html
    assert "35.0 mm" in report_html  # common extent length
    assert "Both limbs are in the field of view" in report_html


def test_file_strings_escaped(report_html: str) -> None:
    assert XSS_SCRIPT not in report_html
    assert XSS_IMG not in report_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report_html
    assert "&lt;img src=x onerror=alert(2)&gt;" in report_html


def test_failing_figure_is_reported(subject_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / SUBJECT
    shutil.copytree(subject_dir, d)
    missing = d / "ses-20240304" / f"sub-{SUBJECT}_ses-20240304_dseg.nii.gz"
    missing.unlink()
    (d / "ses-20240315" / f"sub-{SUBJECT}_ses-20240315_T1w.nii.gz").unlink()
    (d / "longitudinal.tsv").write_text("subject\tstudy_date\tday\tstructure\n", encoding="utf-8")
    out = d / "report.html"
    build_report(_inputs(d), out)
    html = out.read_text(encoding="utf-8")
    assert "could not be drawn" in html
    assert missing.name in html
    assert "Figure “Timeline” could not be drawn" in html
    # the two other sessions still have their overlays (and the profile is still drawn)
    assert len(_data_uri_pngs(html)) == 1 + N_VIEWS * 2
    assert "T1 panel not shown" in html  # fluid-only overlay for the session without T1
    assert "Pattern consistent with pseudo-progression" in html


def test_cli(subject_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    assert main([*_argv(subject_dir), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert not list(tmp_path.glob(".r.*"))  # no temporary file left behind


def test_missing_summary(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="summary.json"):
        build_report(_inputs(tmp_path), tmp_path / "r.html")


@pytest.mark.parametrize(
    "direction",
    [
        IDENTITY,
        FLIP_X,
        (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),
        (-1.0, 0, 0, 0, -1.0, 0, 0, 0, -1.0),
        (0, 1.0, 0, 1.0, 0, 0, 0, 0, 1.0),
    ],
    ids=["identity", "x-flipped", "y-flipped", "all-flipped", "xy-swapped"],
)
def test_radiological_orientation(direction: tuple[float, ...]) -> None:
    """A label at patient left (LPS +x) and anterior (LPS -y) shows right and up on screen."""
    size, spacing = (40, 30, 6), (2.0, 2.0, 4.0)
    origin = _centred_origin(size, spacing, direction)
    x, y, z = _physical_grid(size, spacing, origin, direction)
    lab = np.zeros(x.shape, np.uint8)
    lab[(x > 10.0) & (np.abs(y) < 5.0)] = labels.label_value("left", labels.SOFT_TISSUE)
    lab[(np.abs(x) < 5.0) & (y < -10.0)] = labels.label_value("right", labels.SOFT_TISSUE)
    img = _image(lab, spacing, origin, direction)
    # raw array order differs between storages; the displayed slice must not
    sl = radiological_axial_slice(img, z_mm=float(z.mean()))
    rows, cols = sl.pixels.shape
    left_rc = np.argwhere(sl.pixels == 5).mean(axis=0)
    anterior_rc = np.argwhere(sl.pixels == 1).mean(axis=0)
    assert left_rc[1] > cols / 2, "patient left must be on the viewer's right"
    assert anterior_rc[0] < rows / 2, "anterior must be up"
    assert sl.spacing_rc_mm == (2.0, 2.0)


def test_slice_candidates_lesion_centre() -> None:
    _, _, dseg = _phantom(direction=FLIP_X)
    cand = slice_candidates(dseg, "left")
    assert cand.lesion_z_mm is not None and abs(cand.lesion_z_mm - 5.0) < 5.0
    assert cand.largest_limb_z_mm is not None


def test_phi_never_rendered(report_html: str, subject_dir: Path, tmp_path: Path) -> None:
    """Canary: PHI keys in the summary are dropped; a DICOM text holding a name is escaped."""
    for value in PHI_CANARY.values():
        assert value not in report_html
    assert "PatientName" not in report_html and "PatientBirthDate" not in report_html
    assert f"STIR &lt;b&gt;{FAKE_NAME}&lt;/b&gt; (series 4)" in report_html
    assert f"<b>{FAKE_NAME}" not in report_html
    out = tmp_path / "phi.html"
    build_report(_inputs(subject_dir), out, show_phi=True)
    assert "CANARY^PHI" in out.read_text(encoding="utf-8")  # only when asked for


@pytest.mark.parametrize(
    ("key", "phi"),
    [
        ("dicom.PatientName", True),
        ("patient_id", True),
        ("PatientBirthDate", True),
        ("Patient's Birth Date", True),
        ("segment.n4_shrink", False),
        ("software.pydicom", False),
    ],
)
def test_is_phi_key(key: str, phi: bool) -> None:
    assert is_phi_key(key) is phi


def test_resample_onto_slab_follows_registration(subject_dir: Path) -> None:
    """The baseline lesion slice of the shifted session holds the lesion only through its xfm."""
    base = sitk.ReadImage(str(subject_dir / f"ses-20240225/sub-{SUBJECT}_ses-20240225_dseg.nii.gz"))
    ses = "20240304"
    moving = sitk.ReadImage(str(subject_dir / f"ses-{ses}/sub-{SUBJECT}_ses-{ses}_dseg.nii.gz"))
    xfm = sitk.ReadTransform(str(subject_dir / f"ses-{ses}/sub-{SUBJECT}_ses-{ses}_xfm.tfm"))
    slab = axial_slab(orient_lps(base), LESION_Z_MM)
    lesion = labels.label_value("left", labels.LESION)
    registered = sitk.GetArrayFromImage(resample_onto(moving, slab, is_label=True, transform=xfm))
    unregistered = sitk.GetArrayFromImage(
        resample_onto(moving, slab, is_label=True, transform=sitk.Transform(3, sitk.sitkIdentity))
    )
    assert (registered == lesion).sum() > 5
    assert (unregistered == lesion).sum() == 0


@pytest.mark.parametrize("direction", [IDENTITY, FLIP_X, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, -1.0)])
def test_radiological_coronal_orientation(direction: tuple[float, ...]) -> None:
    """Patient left (LPS +x) on the viewer's right, superior (+z) up, physical spacing kept."""
    size, spacing = (40, 30, 12), (2.0, 2.0, 4.0)
    origin = _centred_origin(size, spacing, direction)
    x, y, z = _physical_grid(size, spacing, origin, direction)
    lab = np.zeros(x.shape, np.uint8)
    lab[(x > 10.0) & (z > 8.0)] = labels.label_value("left", labels.SOFT_TISSUE)
    img = orient_lps(_image(lab, spacing, origin, direction))
    sl = radiological_coronal_slice(coronal_slab(img, 0.0))
    rows, cols = sl.pixels.shape
    rc = np.argwhere(sl.pixels == 5).mean(axis=0)
    assert rc[1] > cols / 2, "patient left must be on the viewer's right"
    assert rc[0] < rows / 2, "superior must be up"
    assert sl.spacing_rc_mm == (4.0, 2.0)
    assert sl.row_z_mm[0] > sl.row_z_mm[-1]


def test_largest_swelling_pairs_by_distance() -> None:
    rows = []
    for ses, bump in (("20240101", 100.0), ("20240201", 900.0)):
        for k in range(5):
            d = 10.0 * k
            rows.append(
                {
                    "session": ses,
                    "side": "right",
                    "z_mm": 50.0 + d,
                    "distance_mm": d,
                    "limb_area_mm2": 5000.0,
                }
            )
            # left landmark 3 mm higher: its z differs, its distances match
            rows.append(
                {
                    "session": ses,
                    "side": "left",
                    "z_mm": 53.0 + d,
                    "distance_mm": d,
                    "limb_area_mm2": 5000.0 + (bump if k == 3 else 0.0),
                }
            )
    best = largest_swelling(rows, "left")
    assert best is not None
    assert (best.session, best.z_mm, best.distance_mm) == ("20240201", 83.0, 30.0)
    assert best.difference_mm2 == pytest.approx(900.0)
    assert largest_swelling(rows, "left", z_range_mm=(0.0, 80.0)).difference_mm2 == 0.0
    assert largest_swelling([r for r in rows if r["side"] == "left"], "left") is None


# ----------------------------------------------------------------------------- QC flags

EXCLUDED_SESSION = "20240304"  # registration failed: nothing of it is available
PARTIAL_SESSION = "20240315"  # fluid not fat-suppressed: lesion and edema not available
REG_MESSAGE = "could not be aligned with the baseline (bone Dice 0.41 < 0.80) <b>x</b>"
FOV_MESSAGE = "the limb is cut by the in-plane edge of the image on slices 0-2 of 10"
FAT_MESSAGE = "subcutaneous fat / muscle signal on the fluid-sensitive image is 1.31 (> 0.8)"
QC_FLAGS = [
    {"session": EXCLUDED_SESSION, "side": "both", "code": "registration_failed",
     "severity": "exclude", "message": REG_MESSAGE, "slices": []},
    {"session": PARTIAL_SESSION, "side": "left", "code": "limb_cut_by_fov",
     "severity": "warn", "message": FOV_MESSAGE, "slices": [0, 1, 2]},
    {"session": PARTIAL_SESSION, "side": "both", "code": "fluid_not_fat_suppressed",
     "severity": "exclude", "message": FAT_MESSAGE, "slices": []},
]
LONG_VALUES = ("affected_ml", "contralateral_ml", "difference_ml", "asymmetry_pct",
               "change_from_baseline_pct", "asymmetry_change_pp", "change_beyond_mdc95")


def _not_measured(session: str, structure: str) -> list[str]:
    """The codes that make `structure` of `session` not available in QC_FLAGS (both sides)."""
    if session == EXCLUDED_SESSION:
        return ["registration_failed"]
    if session == PARTIAL_SESSION and structure in ("marrow_lesion", "edema"):
        return ["fluid_not_fat_suppressed"]
    return []


def _codes(session: str, side: str | None = None) -> str:
    return ",".join(f["code"] for f in QC_FLAGS
                    if f["session"] == session and (side is None or f["side"] in (side, "both")))


def _add_qc_flags(d: Path, flags: list[dict] | None = QC_FLAGS, classification: str = "stable"
                  ) -> Path:
    """Turn a copied subject folder into one as the QC contract writes it: n/a, never 0,
    where an exclude flag removes a structure; a ``qc`` column in both tables."""
    vol = read_tsv(d / "volumes.tsv")
    for r in vol:
        ses = r["study_date"].replace("-", "")
        if _not_measured(ses, r["structure"]):
            r["volume_ml"] = None
        r["qc"] = _codes(ses, r["side"]) or None
    write_tsv_atomic(d / "volumes.tsv", vol, [*vol[0].keys()])
    long = read_tsv(d / "longitudinal.tsv")
    for r in long:
        ses = r["study_date"].replace("-", "")
        if _not_measured(ses, r["structure"]):
            r.update({k: None for k in LONG_VALUES})
        r["qc"] = _codes(ses) or None
    write_tsv_atomic(d / "longitudinal.tsv", long, [*long[0].keys()])
    summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    if flags is not None:
        summary["qc_flags"] = flags
    summary["classification"] = classification
    summary["reasons"] = ["session 20240304, both sides: registration_failed (exclude): ..."]
    for s in summary["sessions"]:
        if s["session"] == EXCLUDED_SESSION:
            s["excluded"] = True
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def flagged_html(subject_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("flagged") / SUBJECT
    shutil.copytree(subject_dir, d)
    out = d / "report.html"
    build_report(_inputs(_add_qc_flags(d)), out)
    return out.read_text(encoding="utf-8")


def _table(html: str, table_id: str) -> str:
    part = html[html.index(f'id="{table_id}"') :]
    return part[: part.index("</table>")]


def _rows_of(table: str, date: str) -> list[str]:
    return [row for row in table.split("<tr")[1:] if f"<td>{date}" in row]


def test_qc_flags_box_above_the_fold(flagged_html: str) -> None:
    """The flags sit next to the pattern headline, before the first figure, with codes,
    words (pipeline.qc.MEANING), severity and message (escaped)."""
    box_at = flagged_html.index('id="qc-flags"')
    assert flagged_html.index('id="classification"') < box_at
    assert box_at < flagged_html.index("<img") and box_at < flagged_html.index('id="timeline"')
    box = flagged_html[box_at : flagged_html.index("</div>", box_at)]
    for flag in QC_FLAGS:
        assert f'data-code="{flag["code"]}"' in box
        assert qc.MEANING[flag["code"]] in box
    assert "could not be aligned with the baseline (bone Dice 0.41 &lt; 0.80) &lt;b&gt;" in box
    assert FOV_MESSAGE in box and "1.31 (&gt; 0.8)" in box
    assert box.count('class="qc-exclude"') == 2 and box.count('class="qc-warn"') == 1
    assert "2 exclude, 1 warn" in box
    assert "Not in the response pattern: 2024-03-04 (day 3)" in box
    # ordered by session: the day-3 flag first; the exclude flag before the warning of day 14
    codes = re.findall(r'data-code="([a-z_]+)"', box)
    assert codes == ["registration_failed", "fluid_not_fat_suppressed", "limb_cut_by_fov"]


def test_headline_rests_on_what_passed_qc(flagged_html: str) -> None:
    head = flagged_html[flagged_html.index('id="classification"') :]
    head = head[: head.index("</div>")]
    assert "Pattern consistent with stable findings" in head
    assert "Rests only on what passed quality control" in head


def test_not_available_is_never_zero(flagged_html: str) -> None:
    long = _table(flagged_html, "longitudinal")
    excluded = _rows_of(long, "2024-03-04")
    assert len(excluded) == len(labels.STRUCTURES)
    for row in excluded:
        assert 'class="excluded"' in row
        cells = re.findall(r'<td class="num na" title="([^"]*)">([^<]*)<sup>(\d+)</sup>', row)
        assert len(cells) == 6, row  # five columns of the table + the asymmetry change
        assert {(title, text) for title, text, _ in cells} == {
            ("not available: registration_failed", "not available")
        }
        assert not re.search(r">\s*[+-]?0\.0\s*<", row)
    partial = {re.search(r"<td>([a-z (.)]+)</td>", r)[1]: r for r in _rows_of(long, "2024-03-15")}
    assert "not available: fluid_not_fat_suppressed" in partial["marrow lesion"]
    assert "not available: fluid_not_fat_suppressed" in partial["edema"]
    assert "not available" not in partial["soft tissue"]  # measured: only lesion/edema gone
    assert "<th>QC</th>" in long
    notes = flagged_html[flagged_html.index('id="longitudinal"') :]
    notes = notes[: notes.index("</ul>")]
    assert "not available: <code>registration_failed</code>" in notes
    vols = _table(flagged_html, "volumes-table")
    for row in _rows_of(vols, "2024-03-04"):
        assert 'title="not available: registration_failed">not available<sup>' in row
        assert "<td>registration_failed</td>" in row  # the QC column
    left_lesion = [r for r in _rows_of(vols, "2024-03-15") if "left" in r and "lesion" in r]
    assert "<td>limb_cut_by_fov, fluid_not_fat_suppressed</td>" in left_lesion[0]


def test_figures_with_unavailable_values(flagged_html: str) -> None:
    assert "could not be drawn" not in flagged_html
    assert "Grey bands: not available at that session" in flagged_html
    # every overlay of the excluded session says so in its caption; the others do not
    for view in ("lesion", "swelling", "coronal"):
        part = flagged_html[flagged_html.index(f'id="view-{view}"') :]
        part = part[: part.index("</div>")]
        figures = part.split("<h4>")[1:]
        assert len(figures) == len(SESSIONS)
        for fig, (date, _, _) in zip(figures, SESSIONS, strict=True):
            caption = fig[fig.index("<figcaption>") :]
            assert ('<span class="qc-label exclude"' in caption) == (date != "2024-02-25")
            assert ("excluded: registration_failed" in caption) == (date == "2024-03-04")
        assert "QC warning: limb_cut_by_fov (left)" in figures[2]
        assert "excluded: fluid_not_fat_suppressed" in figures[2]


def test_without_qc_flags_nothing_changes(report_html: str) -> None:
    """An older summary (no qc_flags) has no flags box and no 'not available' cells."""
    assert 'id="qc-flags"' not in report_html and "Rests only on" not in report_html
    assert 'class="num na"' not in report_html and "<sup>" not in report_html
    assert 'id="qc-legend"' in report_html  # the codes are explained in any case


def test_empty_qc_flags_say_none(subject_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / SUBJECT
    shutil.copytree(subject_dir, d)
    summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    summary["qc_flags"] = []
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    html = build_context(_inputs(d))
    assert html["qc_box"] == {"rows": [], "n_exclude": 0, "n_warn": 0, "excluded_sessions": []}
    assert html["pattern_qc_note"] == ""
    assert "Quality control flags: none raised." in render_html(html)


def test_old_summary_with_qc_column_only(subject_dir: Path, tmp_path: Path) -> None:
    """Tables with n/a and a qc column but no qc_flags in the summary: the column is the
    reason, and still never 0."""
    d = tmp_path / SUBJECT
    shutil.copytree(subject_dir, d)
    _add_qc_flags(d, flags=None)
    ctx = build_context(_inputs(d))
    assert ctx["qc_box"] is None
    row = next(r for r in ctx["volumes"] if r["study_date"] == "2024-03-04")
    assert str(row["volume_ml"]) == "not available" and row["volume_ml"].reason == (
        "registration_failed"
    )


@pytest.mark.parametrize(
    ("classification", "flags", "phrase", "note"),
    [
        ("progression", [], "Pattern consistent with progression", ""),
        ("indeterminate", [], "too few sessions", ""),
        ("indeterminate", QC_FLAGS, "what passed quality control cannot decide", "2 exclude"),
        ("response", QC_FLAGS[1:2], "Pattern consistent with response", ""),  # warn only
        ("response", QC_FLAGS, "Pattern consistent with response", "Rests only on"),
    ],
)
def test_pattern_headline(classification: str, flags: list[dict], phrase: str,
                          note: str) -> None:
    index = QCIndex(read_flags({"qc_flags": flags}, []), {})
    got_phrase, got_note = pattern_headline(classification, index)
    assert phrase in got_phrase
    assert (note in got_note) if note else got_note == ""


def test_read_flags_is_tolerant() -> None:
    notes: list[str] = []
    flags = read_flags({"qc_flags": [{"code": "future_code", "session": "1", "side": "x",
                                      "severity": "odd", "message": "m"}, "junk"]}, notes)
    assert flags is not None and len(flags) == 1
    assert flags[0].severity == "exclude" and flags[0].sides == tuple(labels.SIDES)
    assert flags[0].meaning == "future code"
    assert len(notes) == 1 and "junk" in notes[0]
    assert read_flags({}, notes) is None


def test_timeline_skips_missing_points() -> None:
    rows = [
        {"day": day, "structure": s, "affected_ml": v, "contralateral_ml": v,
         "asymmetry_pct": None if v is None else 1.0}
        for day, v in ((-5, 10.0), (3, None), (14, 12.0))
        for s in labels.STRUCTURES
    ]
    png = render_timeline(rows, [], "left", {"flare_asymmetry_pp": 5}, -5, {3})
    assert imread(io.BytesIO(base64.b64decode(png)), format="png").shape[0] > 100
    with pytest.raises(ValueError, match="no numeric values"):
        render_timeline([{**r, "affected_ml": "n/a", "asymmetry_pct": "n/a"} for r in rows],
                        [], "left", {}, -5, {-5, 3, 14})


# ----------------------------------------------------------- uncertainty and confirmation


def _copy_with_summary(subject_dir: Path, d: Path, **changes: object) -> Path:
    shutil.copytree(subject_dir, d)
    summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    summary.update(changes)
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return d


def _headline(html: str) -> str:
    head = html[html.index('id="classification"') :]
    return head[: head.index("</div>")]


def test_confirmation_next_to_the_pattern(report_html: str) -> None:
    head = _headline(report_html)
    assert "Pattern consistent with pseudo-progression" in head
    assert 'data-confirmation="unconfirmed"' in head and 'id="confirmation"' in head
    assert "Flare not confirmed" in head
    assert "flaring on day 3, never still flaring at least 4 days after the first flare" in head
    assert "resolved on day 14" in head
    assert "UNCONFIRMED" not in head and 'id="unconfirmed-progression"' not in report_html


def test_unconfirmed_progression_is_unmissable(subject_dir: Path, tmp_path: Path) -> None:
    states = [
        SESSION_STATES[0],
        {**SESSION_STATES[1], "state": "no change", "criteria": [],
         "note": "no flare criterion beyond its threshold and MDC95"},
        {**SESSION_STATES[2], "state": "unconfirmed flare", "note": "first flare of the episode",
         "criteria": ["edema 40.0 mL vs 20.0 mL at baseline (x2.00, +20.0 mL; MDC95 6.0 mL)"]},
    ]
    reason = ("The last session (day 14) flares against baseline, UNCONFIRMED (first flare of "
              "the episode): a first apparent progression (iRECIST iUPD) ...")
    d = _copy_with_summary(subject_dir, tmp_path / SUBJECT, classification="progression",
                           session_states=states, reasons=[reason])
    build_report(_inputs(d), d / "report.html")
    html = (d / "report.html").read_text(encoding="utf-8")
    head = _headline(html)
    assert "Pattern consistent with progression" in head
    assert '<span class="tag-unconfirmed">UNCONFIRMED</span>' in head
    assert "Flare not confirmed: a later scan must confirm it" in head
    # right under the headline: before the reasons, the QC box and any figure
    alert_at = html.index('id="unconfirmed-progression"')
    assert html.index('id="classification"') < alert_at < html.index("Why (measured")
    assert alert_at < html.index('id="timeline"') and alert_at < html.index("<img")
    alert = html[alert_at : html.index("</div>", alert_at)]
    assert "UNCONFIRMED: progression is not established" in alert
    assert "(day 14)" in alert and "iRECIST iUPD" in alert
    assert "A scan on day 18 or later (at least 4 days after the first flare, day 14)" in alert
    assert f'<li class="reason-unconfirmed">{reason}</li>' in html


@pytest.mark.parametrize(
    ("confirmation", "states", "classification", "text", "alert"),
    [
        ("confirmed",
         [("baseline", -5), ("unconfirmed flare", 3), ("confirmed flare", 14)],
         "progression", "Flare confirmed on day 14", False),
        ("unconfirmed",
         [("baseline", -5), ("no change", 3), ("unconfirmed flare", 14)],
         "progression", "Flare not confirmed: a later scan must confirm it", True),
        ("unconfirmed",
         [("baseline", -5), ("unconfirmed flare", 3), ("no change", 14)],
         "stable", "Flare not confirmed", False),
        ("not applicable", [("baseline", -5), ("no change", 3)], "stable", None, False),
        (None, [], "stable", None, False),
    ],
)
def test_confirmation_headline(confirmation: str | None, states: list[tuple[str, int]],
                               classification: str, text: str | None, alert: bool) -> None:
    summary = {"thresholds": {"confirmation_min_interval_days": 4},
               "session_states": [{"study_date": f"d{day}", "day": day, "state": st}
                                  for st, day in states]}
    if confirmation is not None:
        summary["confirmation"] = confirmation
    rows = session_state_rows(summary, [])
    got = confirmation_headline(summary, classification, rows)
    if text is None:
        assert got is None
        return
    assert got is not None and got["text"] == text
    assert bool(got["alert"]) is alert


def test_sessions_against_day0(report_html: str) -> None:
    table = _table(report_html, "session-states")
    # in the timeline section, before its figure
    at = report_html.index('id="session-states"')
    assert report_html.index('id="timeline"') < at < report_html.index("<img")
    assert "Sessions against day 0" in report_html
    rows = [r for r in table.split("<tr")[1:] if "data-state=" in r]
    assert [re.search(r'data-state="([^"]+)"', r)[1] for r in rows] == [
        "baseline", "unconfirmed flare", "resolved"]
    for row, badge, timing in zip(rows, ("baseline", "unconfirmed", "resolved"), TIMING,
                                  strict=True):
        assert f'<span class="state state-{badge}"' in row
        assert f'<td class="timing">{timing}</td>' in row
    assert "first flare of the episode" in rows[1]
    assert "(+9.1 pp, threshold +5 pp, MDC95 3.5 pp)" in rows[1]  # criterion met
    assert WITHIN_TEXT in rows[1].split('class="within-list"')[1]  # within measurement error
    assert rows[2].split('class="within-list"')[1].startswith(">none")
    assert "iRECIST iUPD" in rows[1]  # the badge says what the state means (title)


def test_values_with_intervals(report_html: str, subject_dir: Path) -> None:
    long = _table(report_html, "longitudinal")
    tsv = read_tsv(subject_dir / "longitudinal.tsv")
    base = next(r for r in tsv if r["study_date"] == "2024-02-25"
                and r["structure"] == "soft_tissue")
    ci = '<span class="ci"> ±&nbsp;{:.1f}</span>'
    row = next(r for r in _rows_of(long, "2024-02-25") if "<td>soft tissue</td>" in r)
    assert f"{float(base['affected_ml']):.1f}" + ci.format(float(base["affected_ml_ci95"])) in row
    assert ci.format(float(base["contralateral_ml_ci95"])) in row
    day3 = next(r for r in _rows_of(long, "2024-03-04") if "<td>soft tissue</td>" in r)
    for half in (ASYM_CI, MDC_ASYM, CHANGE_CI):  # asymmetry, its change (MDC95), change
        assert ci.format(half) in day3
    # the baseline is the reference: its change has no interval
    assert ci.format(MDC_ASYM) not in row and ci.format(CHANGE_CI) not in row
    vols = _table(report_html, "volumes-table")
    vol_tsv = read_tsv(subject_dir / "volumes.tsv")
    with_ci = [r for r in vol_tsv if r["volume_ml_ci95"] != "n/a"]
    assert 0 < len(with_ci) < len(vol_tsv)  # some volumes without an interval
    assert vols.count('<span class="ci">') == len(with_ci)
    lesion = [r for r in vols.split("<tr")[1:] if "<td>right</td>" in r and "marrow" in r]
    assert lesion and all("±" not in r for r in lesion)  # 0 mL, interval n/a: nothing extra


@pytest.mark.parametrize("which", ["report_html", "flagged_html"])
def test_no_interval_reads_n_a(which: str, request: pytest.FixtureRequest) -> None:
    html = request.getfixturevalue(which)
    assert "±" in html
    assert not re.search(r"±(\s|&nbsp;|<[^>]*>)*(n/a|not available|nan)", html), "± n/a"


def test_within_measurement_error_where_the_tsv_says_no(
    report_html: str, subject_dir: Path
) -> None:
    long = _table(report_html, "longitudinal")
    tsv = read_tsv(subject_dir / "longitudinal.tsv")
    assert {r["change_beyond_mdc95"] for r in tsv} == {"yes", "no", "n/a"}
    titles = {"limb": "limb (all)", "soft_tissue": "soft tissue", "bone": "bone (incl. lesion)",
              "marrow_lesion": "marrow lesion", "edema": "edema"}
    for r in tsv:
        row = next(x for x in _rows_of(long, r["study_date"])
                   if f"<td>{titles[r['structure']]}</td>" in x)
        change_cell = re.findall(r'<td class="num[^"]*"[^>]*>.*?</td>', row)[-1]
        within = '<span class="within">within measurement error</span>' in change_cell
        assert within is (r["change_beyond_mdc95"] == "no"), (r, change_cell)


def _methods_text(html: str) -> str:
    """The Methods section as plain text (tags removed, entities decoded, spaces collapsed)."""
    part = html[html.index('id="methods"') :]
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", part)).split())


def test_methods_uncertainty_numbers_from_the_data(
    report_html: str, subject_dir: Path, tmp_path: Path
) -> None:
    methods = report_html[report_html.index('id="methods"') :]
    assert 'id="uncertainty"' in methods and 'id="state-legend"' in methods
    text = _methods_text(report_html)
    assert "scan–rescan study" in text and "MDC95" in text
    assert f"soft-tissue asymmetry change {MDC_ASYM:.1f} pp" in text  # from the table
    assert f"soft-tissue asymmetry ±{ASYM_CI:.1f} pp" in text
    assert "1 for this subject: day 3: " + WITHIN_TEXT in text
    # the response rules with this run's thresholds (pipeline.longitudinal.describe_rules)
    assert "soft-tissue asymmetry up by at least 5 pp" in text
    assert "the marrow lesion at least ×1.2 its baseline volume and at least 1 mL larger" in text
    assert "at least 4 days after the episode's first flare" in text
    assert "Sessions on days 1–14 after the infusion lie in the CRS window" in text
    summary = json.loads((subject_dir / "summary.json").read_text(encoding="utf-8"))
    thresholds = {**summary["thresholds"], "confirmation_min_interval_days": 7}
    d = _copy_with_summary(subject_dir, tmp_path / SUBJECT, thresholds=thresholds)
    ctx = build_context(_inputs(d))
    text = _methods_text(render_html(ctx))
    assert "at least 7 days after" in text and "at least 4 days" not in text
    assert "at least 7 days after the first flare" in ctx["confirmation"]["detail"]


def test_methods_rules_need_every_threshold(subject_dir: Path, tmp_path: Path) -> None:
    """An older summary without some thresholds: the rules are not restated with made-up
    values; the Methods say which are missing."""
    summary = json.loads((subject_dir / "summary.json").read_text(encoding="utf-8"))
    thresholds = {k: v for k, v in summary["thresholds"].items() if not k.startswith("response")}
    d = _copy_with_summary(subject_dir, tmp_path / SUBJECT, thresholds=thresholds)
    text = _methods_text(render_html(build_context(_inputs(d))))
    assert "The response-pattern rules are not restated" in text
    assert "response_asymmetry_pp" in text and "up by at least" not in text


def test_unfitted_model_is_said(subject_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / SUBJECT
    shutil.copytree(subject_dir, d)
    for name in ("longitudinal.tsv", "volumes.tsv"):
        rows = read_tsv(d / name)
        for r in rows:
            r.update({k: 0 for k, v in r.items() if k.endswith("_ci95") and v != "n/a"})
        write_tsv_atomic(d / name, rows, [*rows[0].keys()])
    assert "has not been fitted" in _methods_text(render_html(build_context(_inputs(d))))


def test_outputs_without_uncertainty_render_as_before(subject_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / SUBJECT
    shutil.copytree(subject_dir, d)
    for name in ("longitudinal.tsv", "volumes.tsv"):
        rows = [{k: v for k, v in r.items() if not k.endswith("_ci95")
                 and k not in ("asymmetry_change_pp", "change_beyond_mdc95")}
                for r in read_tsv(d / name)]
        write_tsv_atomic(d / name, rows, [*rows[0].keys()])
    summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    del summary["session_states"], summary["confirmation"]
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    build_report(_inputs(d), d / "report.html")
    html = (d / "report.html").read_text(encoding="utf-8")
    assert '<span class="ci">' not in html and 'class="within"' not in html
    assert 'id="session-states"' not in html and 'id="confirmation"' not in html
    assert "carry no measurement uncertainty" in html
    assert "could not be drawn" not in html
    # the asymmetry change is computed from the asymmetry, as before
    asym = {r["study_date"]: float(r["asymmetry_pct"]) for r in read_tsv(d / "longitudinal.tsv")
            if r["structure"] == "soft_tissue"}
    long = _table(html, "longitudinal")
    day3 = next(r for r in _rows_of(long, "2024-03-04") if "<td>soft tissue</td>" in r)
    assert f">{asym['2024-03-04'] - asym['2024-02-25']:+.1f}</td>" in day3


def _png(b64: str) -> np.ndarray:
    return imread(io.BytesIO(base64.b64decode(b64)), format="png")


def test_timeline_draws_intervals(subject_dir: Path, tmp_path: Path) -> None:
    """95 % bands and error bars, the MDC95 band around the baseline and hollow markers are
    drawn from the *_ci95 columns (and nothing of them without those columns)."""
    rows = read_tsv(subject_dir / "longitudinal.tsv")
    plain = [{k: v for k, v in r.items() if not k.endswith("_ci95")
              and k != "change_beyond_mdc95"} for r in rows]
    args = ([], "left", {"flare_asymmetry_pp": 5.0}, -5)
    with_ci = render_timeline(rows, *args)
    (tmp_path / "timeline.png").write_bytes(base64.b64decode(with_ci))
    a, b = _png(with_ci), _png(render_timeline(plain, *args))
    assert a.shape == b.shape
    changed = (np.abs(a[..., :3] - b[..., :3]).sum(axis=2) > 0.05).mean()
    assert changed > 0.01, changed  # bands cover a visible part of the figure
    # the MDC95 band around the baseline (its colour over white) only with intervals
    band = 1.0 - MDC_ALPHA * (1.0 - np.array(to_rgb(MDC_COLOR)))
    n_a, n_b = ((np.abs(x[..., :3] - band).max(axis=2) < 0.02).sum() for x in (a, b))
    assert n_a > 500 and n_b < n_a / 5, (n_a, n_b)


# ------------------------------------------------------------------ show_phi: the identity


PATIENT = {"PatientName": "QUERTY^LIOBA^M", "PatientID": "ID-4711-Q",
           "PatientBirthDate": "19700215"}


def _dicom_header(path: Path, **tags: str) -> Path:
    """A minimal DICOM file holding the patient identity (no pixels: only headers are read)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for tag, value in tags.items():
        setattr(ds, tag, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _sessions_json(d: Path, identities: list[dict[str, str]]) -> Path:
    """An index sessions.json whose sessions list one DICOM file each (`identities`)."""
    sessions = []
    for (date, _, _), identity in zip(SESSIONS, identities, strict=True):
        ses = date.replace("-", "")
        dcm = _dicom_header(d / "dicom" / ses / "IM1", **identity)
        sessions.append({"session": ses, "study_date": date,
                         "anatomical": {"files": [str(dcm)]}, "fluid": {"files": [str(dcm)]}})
    path = d / "sessions.json"
    path.write_text(json.dumps({"sessions": sessions, "n_files_dicom": len(sessions)}),
                    encoding="utf-8")
    return path


def test_show_phi_shows_name_id_and_birth_date(subject_dir: Path, tmp_path: Path) -> None:
    """config show_phi -> --show-phi: the header names the patient (from the DICOM headers
    the index listed); by default nothing identifying is read or shown."""
    sessions_json = _sessions_json(tmp_path, [PATIENT] * len(SESSIONS))
    inputs = _inputs(subject_dir, sessions_json)
    default = build_context(inputs)
    assert default["patient"] is None
    html = render_html(default)
    for needle in ("QUERTY", "LIOBA", "ID-4711-Q", "1970-02-15", "19700215", "Patient name"):
        assert needle not in html
    ctx = build_context(inputs, show_phi=True)
    assert ctx["patient"] == {"name": "QUERTY, LIOBA M", "id": "ID-4711-Q",
                              "birth_date": "1970-02-15"}
    html = render_html(ctx)
    assert '<td id="patient-name">QUERTY, LIOBA M</td>' in html
    assert '<td id="patient-id">ID-4711-Q</td>' in html
    assert '<td id="patient-birth-date">1970-02-15</td>' in html


def test_show_phi_without_identity(subject_dir: Path, tmp_path: Path) -> None:
    """No sessions.json, or headers without an identity: 'not available', said why; sessions
    whose headers differ show every value."""
    ctx = build_context(_inputs(subject_dir), show_phi=True)
    assert set(ctx["patient"].values()) == {"not available"}
    assert any("no sessions.json given" in n for n in ctx["input_notes"])
    other = {**PATIENT, "PatientID": "ID-0815"}
    sessions_json = _sessions_json(tmp_path, [PATIENT, other, {}])
    ctx = build_context(_inputs(subject_dir, sessions_json), show_phi=True)
    assert ctx["patient"]["id"] == "ID-4711-Q; ID-0815"
    assert ctx["patient"]["name"] == "QUERTY, LIOBA M"


@pytest.mark.parametrize(
    ("view", "words"),
    [
        (OverlayView("lesion", "t", "axial", note="no_lesion"), "No marrow lesion was segmented"),
        (OverlayView("swelling", "t", "axial", note="no_limb"), "No limb was segmented: this"),
        (OverlayView("coronal", "t", "coronal", note="no_limb_coronal"), "the coronal reformat"),
        (OverlayView("lesion", "t", "axial", note="no_grid"), "no common grid"),
        (OverlayView("swelling", "t", "axial", 1.0, "swelling_labels",
                     {"difference_cm2": 12.34, "date": "2024-01-02"}),
         "affected − contralateral, from the label maps: +12.3 cm² at 2024-01-02"),
        (OverlayView("swelling", "t", "axial", 1.0, "largest_limb", {"date": "2024-01-02"}),
         "largest affected-limb cross-section (no contralateral limb to compare) at 2024-01-02"),
        (OverlayView("swelling", "t", "axial", 1.0, "swelling_profile",
                     {"difference_cm2": -0.04, "date": "d", "distance_mm": None}),
         "affected − contralateral: -0.0 cm² at d"),
    ],
)
def test_every_view_note_and_position_has_words(view: OverlayView, words: str) -> None:
    """The words for each position basis and each note of the overlay views are in
    figure_captions.html (the views carry only keys and numbers)."""
    macros = html_env.environment().get_template("figure_captions.html").module
    text = str(macros.view_note(view) if view.note else macros.position(view))
    assert words in " ".join(text.split())
    if not view.note:
        assert "from the landmark" not in text
