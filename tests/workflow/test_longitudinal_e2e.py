"""Serial studies that differ in table position, field of view and slice count: registration,
common extent and the response pattern through the command-line contract (issue 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from pipeline.extent import FieldOfView, Geometry, volumes_in_extent
from pipeline.io.files import read_tsv
from pipeline.validation import phantom
from pipeline.validation.evaluation import TARGETS

ROOT = Path(__file__).resolve().parents[2]
SHIFTS_MM = {"20240228": 0.0, "20240306": 15.0, "20240321": -20.0}


def _run(*config: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--config",
                           *config], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("shifted")
    spec = phantom.PhantomSpec(
        subject="shift", seed=17, matrix=(160, 120), n_slices=24, supersample_z=3,
        sessions=(phantom.SessionSpec(-2, 0.10, 4.0, 0.3, 0.0),
                  phantom.SessionSpec(5, 0.22, 6.0, 0.7, 15.0, n_slices=18),
                  phantom.SessionSpec(20, 0.0, 0.0, 0.0, -20.0)))
    phantom.generate(spec, out / "phantom")
    _run(f"input_dir={out / 'phantom' / 'dicom'}", "subject=shift", "day0=2024-03-01",
         "affected_side=left", f"results_dir={out / 'results'}")
    return out / "phantom", out / "results" / "shift"


def test_registration_recovers_the_table_shifts(shifted: tuple[Path, Path]) -> None:
    _, subject = shifted
    for session, shift in SHIFTS_MM.items():
        if shift == 0.0:
            continue
        reg = json.loads(next((subject / f"ses-{session}").glob("*_xfm.json")).read_text())
        tx, ty, tz = reg["translation_mm"]
        assert tz == pytest.approx(shift, abs=1.0), reg
        assert abs(tx) < 1.0 and abs(ty) < 1.0
        assert not reg["poor"]


def test_volumes_over_the_common_extent_match_truth(shifted: tuple[Path, Path]) -> None:
    truth_dir, subject = shifted
    summary = json.loads((subject / "summary.json").read_text())
    extent = summary["extent_mm"]
    # baseline 24 x 5 mm around z=200; the shifted sessions cut it to [180, 255] or so
    assert 60.0 <= extent["length_mm"] <= 85.0, extent
    truth = json.loads((truth_dir / "truth.json").read_text())
    measured = {(r["study_date"], r["side"], r["structure"]): float(r["volume_ml"])
                for r in read_tsv(subject / "volumes.tsv")}
    asym = {r["study_date"]: r for r in read_tsv(subject / "longitudinal.tsv")
            if r["structure"] == "soft_tissue"}
    true_xfms = {s["session"]: sitk.TranslationTransform(3, (0.0, 0.0, SHIFTS_MM[s["session"]]))
                 for s in truth["sessions"]}  # baseline -> session
    # the workflow counts what every session's field of view sees in-plane; so does the truth
    fovs = [FieldOfView(Geometry.of(sitk.ReadImage(str(truth_dir / s["label_map"]))),
                        true_xfms[s["session"]]) for s in truth["sessions"]]
    for s in truth["sessions"]:
        true_vol = volumes_in_extent(truth_dir / s["label_map"], true_xfms[s["session"]],
                                     (extent["z_min_mm"], extent["z_max_mm"]), fovs)
        for side in ("left", "right"):
            for structure, rel in (("limb", 0.02), ("bone", TARGETS["bone_worst_pct"] / 100)):
                got = measured[(s["study_date"], side, structure)]
                assert got == pytest.approx(true_vol[side][structure], rel=rel), (
                    s["session"], side, structure)
        true_asym = 100 * (true_vol["left"]["soft_tissue"] / true_vol["right"]["soft_tissue"]
                           - 1)
        assert float(asym[s["study_date"]]["asymmetry_pct"]) == pytest.approx(true_asym,
                                                                              abs=1.0)


def test_pattern_and_profiles(shifted: tuple[Path, Path]) -> None:
    _, subject = shifted
    summary = json.loads((subject / "summary.json").read_text())
    assert summary["classification"] == "pseudo-progression"
    assert summary["baseline_session"] == "20240228"
    assert set(summary["landmarks"]) == {"left", "right"}
    csa = read_tsv(subject / "profile_csa.tsv")
    assert {r["session"] for r in csa} == set(SHIFTS_MM)
    circ = read_tsv(subject / "circumference.tsv")
    assert circ and all(float(r["circumference_mm"]) > 200 for r in circ)
