"""Resume (issue 7): a run killed midway, then rerun, ends with the outputs of an uninterrupted run.

The workflow is killed (its whole process group, jobs included) as soon as the first label map
exists, while other jobs are running. A user then reruns the same command with
``--rerun-incomplete``; after SIGKILL Snakemake's lock is left behind, so ``--unlock`` first.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBJECT = "R1"
TABLES = ("volumes.tsv", "longitudinal.tsv")

pytestmark = pytest.mark.slow


def snakemake_cmd(workdir: Path, input_dir: Path, results: Path, *options: str) -> list[str]:
    """The workflow of this repository run in ``workdir`` (its own .snakemake state and lock)."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(ROOT / "config" / "config.yaml"),
            "--cores", "2", *options, "--config", f"input_dir={input_dir}",
            f"subject={SUBJECT}", "day0=2024-03-01", "affected_side=left",
            f"results_dir={results}"]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom with three sessions (days -2, 3, 10): 13 jobs, killed after ~4."""
    out = tmp_path_factory.mktemp("resume_phantom")
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "phantom", str(out), "--subject", SUBJECT,
         "--seed", "21", "--slices", "16", "--matrix", "128x96", "--leg-radius-mm", "40",
         "--sessions=-2:0.1:4:0.3,3:0.15:5:0.5,10:0:0:0"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    return out / "dicom"


@pytest.fixture(scope="module")
def reference(subject: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run."""
    work = tmp_path_factory.mktemp("resume_reference")
    run(snakemake_cmd(work, subject, work / "results"))
    return work / "results" / SUBJECT


def kill_when(cmd: list[str], marker_glob: tuple[Path, str], sig: signal.Signals, log: Path,
              timeout_s: float = 300.0) -> None:
    """Start ``cmd`` in its own process group (output to ``log``); send ``sig`` to the group
    once a file matching the glob exists (the workflow is then midway)."""
    folder, pattern = marker_glob
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not any(folder.glob(pattern)):
            if proc.poll() is not None:
                pytest.fail(f"the workflow ended ({proc.returncode}) before {pattern} existed")
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern} did not appear within {timeout_s:.0f} s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)  # Snakemake and every job it started
        proc.wait(timeout=60)  # after SIGTERM, Snakemake stops its jobs first
        if sig == signal.SIGKILL:  # nothing may survive in the group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def progress(log: str) -> str:
    """Snakemake's last "N of M steps (P%) done" line, or "no step done"."""
    steps = re.findall(r"^\d+ of \d+ steps \(\d+%\) done", log, flags=re.M)
    return steps[-1] if steps else "no step done"


def comparable_summary(path: Path, results: Path) -> dict[str, object]:
    summary = json.loads(path.read_text(encoding="utf-8").replace(str(results), "RESULTS"))
    summary.pop("run_date")
    return summary


def assert_same(got: object, want: object, where: str = "summary") -> None:
    """Equal, floats within 1e-9 relative (registration runs single-threaded and reproduces
    its transform exactly; the tolerance only absorbs a float written through another path)."""
    if isinstance(want, float) and isinstance(got, float):
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {got} != {want}"
    elif isinstance(want, dict) and isinstance(got, dict):
        assert got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list) and isinstance(got, list):
        assert len(got) == len(want), f"{where}: {len(got)} items != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


# a graceful stop during segmentation and a hard kill during registration (the latest
# stage that writes several files per session); both leave partial outputs behind
@pytest.mark.parametrize(("sig", "marker"), [
    (signal.SIGTERM, "ses-*/*_dseg.nii.gz"),
    (signal.SIGKILL, "ses-*/*_xfm.json"),  # during registration
], ids=["SIGTERM-segment", "SIGKILL-register"])
def test_killed_run_resumes_to_identical_outputs(sig: signal.Signals, marker: str,
                                                 subject: Path, reference: Path,
                                                 tmp_path: Path) -> None:
    results = tmp_path / "results"
    cmd = snakemake_cmd(tmp_path, subject, results)
    kill_when(cmd, (results / SUBJECT, marker), sig, tmp_path / "killed.log")
    assert not (results / SUBJECT / "summary.json").exists(), "killed too late: run complete"
    killed_at = progress((tmp_path / "killed.log").read_text())
    if sig == signal.SIGKILL:  # the lock of the killed run is left behind
        run(snakemake_cmd(tmp_path, subject, results, "--unlock"))
    rerun = run(snakemake_cmd(tmp_path, subject, results, "--rerun-incomplete"))
    print(f"\n{sig.name}: killed at {killed_at}; the rerun: {progress(rerun.stderr)}")

    resumed = results / SUBJECT
    for name in TABLES:
        assert (resumed / name).read_text() == (reference / name).read_text(), name
    assert_same(comparable_summary(resumed / "summary.json", results),
                comparable_summary(reference / "summary.json", reference.parent))
    labels = sorted(p.relative_to(reference) for p in reference.glob("ses-*/*_dseg.nii.gz"))
    assert len(labels) == 3
    for rel in labels:
        got, want = nib.load(resumed / rel), nib.load(reference / rel)
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj),
                                      err_msg=str(rel))
        np.testing.assert_array_equal(got.affine, want.affine, err_msg=str(rel))
