"""End-to-end: the workflow through the command-line contract of docs/design.md, against truth."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.io.files import read_tsv
from pipeline.longitudinal import LONGITUDINAL_COLUMNS as ALL_LONGITUDINAL_COLUMNS
from pipeline.validation import phantom
from pipeline.validation.evaluation import asymmetry_errors, compare_subject

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "sample_data" / "demo"

VOLUME_COLUMNS = ["subject", "study_date", "day", "side", "role", "structure", "volume_ml"]
LONGITUDINAL_COLUMNS = ["subject", "study_date", "day", "structure", "affected_ml",
                        "contralateral_ml", "difference_ml", "asymmetry_pct",
                        "change_from_baseline_pct"]


def run_workflow(*config: str, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--config", *config]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"workflow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def demo_run(demo_results: Path) -> Path:
    """The session's demo run (conftest): its input copy was checked unmodified."""
    return demo_results


def test_demo_outputs_follow_the_contract(demo_run: Path) -> None:
    for name in ("volumes.tsv", "longitudinal.tsv", "summary.json", "report.html"):
        assert (demo_run / name).is_file(), name
    with open(demo_run / "volumes.tsv") as fh:
        # the contract's columns in their order; new ones (the QC codes) only after them
        assert fh.readline().rstrip("\n").split("\t") == [*VOLUME_COLUMNS, "qc",
                                                           "volume_ml_ci95", "session"]
    with open(demo_run / "longitudinal.tsv") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        assert header[:len(LONGITUDINAL_COLUMNS)] == LONGITUDINAL_COLUMNS
        assert header == list(ALL_LONGITUDINAL_COLUMNS)
    volumes = read_tsv(demo_run / "volumes.tsv")
    assert len(volumes) == 5 * 2 * 5  # sessions x sides x structures
    assert {r["day"] for r in volumes} == {"-5", "3", "6", "14", "30"}
    assert {(r["side"], r["role"]) for r in volumes} == {("left", "affected"),
                                                         ("right", "contralateral")}
    summary = json.loads((demo_run / "summary.json").read_text())
    for key in ("subject", "affected_side", "baseline_study_date", "classification", "reasons",
                "warnings", "software", "inputs"):
        assert key in summary, key
    assert summary["baseline_study_date"] == "2024-02-25"
    assert summary["inputs"]["n_files"] == 320
    assert len(summary["events"]) == 5
    labels = sorted(demo_run.glob("ses-*/sub-demo_ses-*_dseg.nii.gz"))
    assert len(labels) == 5
    html = (demo_run / "report.html").read_text()
    assert "pseudo-progression" in html
    assert "http://" not in html and "https://" not in html
    assert "PHANTOM^DEMO" not in html  # no patient name
    # issue 17: one pseudonymous fingerprint for the patient of every session, shown
    fingerprint = summary["patient_fingerprint"]
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0
    assert f"<code>{fingerprint}</code>" in html
    # issue 13: intervals, confirmation and one state per session
    assert summary["confirmation"] in ("confirmed", "unconfirmed", "not applicable")
    assert [st["state"] for st in summary["session_states"]][0] == "baseline"
    assert len(summary["session_states"]) == 5


def test_demo_volumes_match_truth(demo_run: Path) -> None:
    rows = compare_subject(demo_run, DEMO)
    limits = {"limb": 3.0, "soft_tissue": 3.0, "bone": 5.0, "marrow_lesion": 10.0,
              "edema": 20.0}
    for r in rows:
        if r["true_ml"] == 0:
            # nothing to find: no false lesion over 0.5 mL, no false edema over 5 mL
            assert r["measured_ml"] <= (0.5 if r["structure"] == "marrow_lesion" else 5.0), r
            continue
        if r["structure"] == "marrow_lesion" and r["true_ml"] < 2.0:
            continue
        assert abs(r["error_pct"]) <= limits[r["structure"]], r
    for a in asymmetry_errors(demo_run, DEMO):
        assert abs(a["error_pp"]) <= 1.0, a


def test_demo_pattern_is_pseudo_progression(demo_run: Path) -> None:
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["classification"] == "pseudo-progression"
    assert any("Flare at day 6" in r for r in summary["reasons"])


def test_contract_other_patient_right_side_feet_first_auto(tmp_path: Path) -> None:
    """A patient unlike the demo: right leg, feet first, interleaved slices, 1.2 mm pixels,
    a lesion and swelling that still grow at the last visit; side found automatically."""
    spec = phantom.PhantomSpec(
        subject="p2", seed=23, day0="2023-11-20", affected_side="right", position="FFS",
        slice_order="interleaved", pixel_mm=1.2, matrix=(176, 128), n_slices=16,
        slice_mm=6.0, leg_radius_mm=45.0, gap_mm=16.0, supersample_xy=2, supersample_z=3,
        sessions=(phantom.SessionSpec(day=-2, swelling=0.02, lesion_ml=3.0, edema=0.2),
                  phantom.SessionSpec(day=21, swelling=0.15, lesion_ml=6.0, edema=0.6)))
    phantom.generate(spec, tmp_path / "p2")
    results = tmp_path / "results"
    run_workflow(f"input_dir={tmp_path / 'p2' / 'dicom'}", "subject=p2", "day0=2023-11-20",
                 "affected_side=auto", f"results_dir={results}")
    summary = json.loads((results / "p2" / "summary.json").read_text())
    assert summary["affected_side"] == "right"
    assert summary["affected_side_source"].startswith("automatic")
    assert summary["classification"] == "progression"
    rows = compare_subject(results / "p2", tmp_path / "p2")
    for r in rows:
        if r["structure"] in ("limb", "bone") and r["true_ml"] > 0:
            assert abs(r["error_pct"]) <= 5.0, r
    for a in asymmetry_errors(results / "p2", tmp_path / "p2"):
        assert abs(a["error_pp"]) <= 1.5, a


def test_folder_without_usable_series_fails_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "export"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")
    (bad / "empty").write_bytes(b"")
    results = tmp_path / "results"
    proc = run_workflow(f"input_dir={bad}", "subject=bad", "day0=2024-01-01",
                        "affected_side=left", f"results_dir={results}", expect_ok=False)
    assert proc.returncode != 0
    log = (results / "bad" / "logs" / "index.log").read_text()
    assert "no DICOM image series found" in log
    assert str(bad) in log
    # Snakemake removes the failed step's outputs: nothing half-made stands as complete.
    assert not (results / "bad" / "volumes.tsv").exists()
    assert not (results / "bad" / "sessions.json").exists()


def test_refused_study_keeps_its_series_table(tmp_path: Path) -> None:
    """A study without a fluid-sensitive series: the step fails, Snakemake removes its outputs,
    and the table of every series with its class and status stays readable in logs/."""
    only_t1 = tmp_path / "export" / "ST0001"
    shutil.copytree(DEMO / "dicom" / "ST0001" / "SE0003", only_t1 / "SE0003")
    results = tmp_path / "results"
    proc = run_workflow(f"input_dir={tmp_path / 'export'}", "subject=t1only", "day0=2024-03-01",
                        "affected_side=left", f"results_dir={results}", expect_ok=False)
    assert proc.returncode != 0
    subject = results / "t1only"
    assert not (subject / "index.tsv").exists()  # a failed step's output
    kept = subject / "logs" / "index.tsv"
    rows = read_tsv(kept)
    assert len(rows) == 1 and rows[0]["sequence_class"] == "T1w", rows
    log = (subject / "logs" / "index.log").read_text()
    assert str(kept) in log and "no study with both" in log


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    proc = run_workflow(f"input_dir={tmp_path / 'missing'}", "subject=x", "day0=2024-01-01",
                        "affected_side=left", f"results_dir={tmp_path}", expect_ok=False)
    assert proc.returncode != 0
    assert "is not a folder" in proc.stdout + proc.stderr
    proc = run_workflow(f"input_dir={DEMO / 'dicom'}", "subject=../evil", "day0=2024-01-01",
                        "affected_side=left", f"results_dir={tmp_path}", expect_ok=False)
    assert proc.returncode != 0
    assert not (tmp_path.parent / "evil").exists()


def test_snakemake_lint_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr
