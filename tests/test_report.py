"""Tests of pipeline.report on a synthetic subject folder (small images with known labels)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from pipeline import labels
from pipeline.io_utils import write_tsv_atomic
from pipeline.report import (
    build_report,
    main,
    radiological_axial_slice,
    slice_candidates,
)

SUBJECT = "demo"
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(2)>"
SESSIONS = [("2024-02-25", -5, 20.0), ("2024-03-04", 3, 60.0), ("2024-03-15", 14, 22.0)]
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


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

    Returns fluid image, T1 image, label map; labels follow the geometry, not the array order.
    """
    origin = _centred_origin(size, spacing, direction)
    x, y, z = _physical_grid(size, spacing, origin, direction)
    lab = np.zeros(x.shape, np.uint8)
    for side, cx in (("right", -45.0), ("left", 45.0)):
        r = np.hypot(x - cx, y)
        lab[r < 30.0] = labels.label_value(side, labels.SOFT_TISSUE)
        if side == "left":
            lab[(r < 30.0) & (r >= 30.0 - edema_mm / 4) & (y < 0)] = labels.label_value(
                side, labels.EDEMA
            )
        lab[r < 10.0] = labels.label_value(side, labels.BONE)
    lesion = (np.hypot(x - 45.0, y) < 6.0) & (np.abs(z - 5.0) < 8.0)
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
    sessions, long_rows, vol_rows = [], [], []
    base_soft = None
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
                "fluid_series": XSS_SCRIPT if i == 1 else "STIR AX (series 4)",
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
                    }
                )
        for s in labels.STRUCTURES:
            aff, con = vols["left"][s], vols["right"][s]
            if s == "soft_tissue":
                aff *= 1.0 + edema_mm / 200.0
            if i == 0 and s == "soft_tissue":
                base_soft = aff
            long_rows.append(
                {
                    "subject": SUBJECT,
                    "study_date": date,
                    "day": day,
                    "structure": s,
                    "affected_ml": aff,
                    "contralateral_ml": con if con else None,
                    "difference_ml": aff - con,
                    "asymmetry_pct": 100.0 * (aff / con - 1.0) if con else None,
                    "change_from_baseline_pct": (
                        100.0 * (aff / base_soft - 1.0) if s == "soft_tissue" else None
                    ),
                }
            )
    write_tsv_atomic(
        d / "volumes.tsv",
        vol_rows,
        ["subject", "study_date", "day", "side", "role", "structure", "volume_ml"],
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
        "thresholds": {"flare_asymmetry_pp": 5.0, "resolved_asymmetry_pp": 2.0},
        "settings": {"n4": {"shrink": 4}, "registration": "rigid"},
        "software": {"limbtrack": "0.1.0", "python": "3.11.7", "SimpleITK": "2.5.7"},
        "inputs": {"n_files": 320, "sha256_of_list": "ab" * 32, "files": []},
        "run_date": "2026-11-25T12:00:00Z",
    }
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_subject(tmp_path_factory.mktemp("subj") / SUBJECT)


@pytest.fixture(scope="module")
def report_html(subject_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("out") / "report.html"
    build_report(subject_dir, out)
    assert out.exists()
    return out.read_text(encoding="utf-8")


def _data_uri_pngs(html: str) -> list[np.ndarray]:
    return [
        imread(io.BytesIO(base64.b64decode(m)), format="png")
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    ]


def test_report_content(report_html: str) -> None:
    assert "Pattern consistent with pseudo-progression" in report_html
    assert "measurement aid, not a diagnosis" in report_html
    for date, _, _ in SESSIONS:
        assert date in report_html
    assert "+9.1 pp" in report_html
    assert "(mL)" in report_html and "(pp)" in report_html and "(%)" in report_html
    assert report_html.count("z = ") == len(SESSIONS)
    assert "could not be drawn" not in report_html
    # same physical slice position for all sessions (all cover the baseline lesion centre)
    assert len(set(re.findall(r"z = (-?[\d.]+) mm", report_html))) == 1
    assert "2.5.7" in report_html and "ab" * 32 in report_html


def test_self_contained(report_html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", report_html, re.I)
    assert "http://" not in report_html and "https://" not in report_html
    assert "<script" not in report_html.lower()
    assert "url(" not in report_html
    for src in re.findall(r'src="([^"]*)"', report_html):
        assert src.startswith("data:image/png;base64,")
    pngs = _data_uri_pngs(report_html)
    assert len(pngs) == 1 + len(SESSIONS)
    for png in pngs:
        assert png.ndim == 3 and png[..., :3].std() > 0.01


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
    build_report(d, out)
    html = out.read_text(encoding="utf-8")
    assert "could not be drawn" in html
    assert missing.name in html
    assert "Figure “Timeline” could not be drawn" in html
    # the two other sessions still have their overlays
    assert len(_data_uri_pngs(html)) == 2
    assert "T1 panel not shown" in html  # fluid-only overlay for the session without T1
    assert "Pattern consistent with pseudo-progression" in html


def test_cli(subject_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    assert main(["--subject-dir", str(subject_dir), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert not list(tmp_path.glob(".r.*"))  # no temporary file left behind


def test_missing_summary(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="summary.json"):
        build_report(tmp_path, tmp_path / "r.html")


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
