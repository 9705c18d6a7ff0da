"""A cohort through a real SLURM cluster (issue 7): the same tables as a local run, and a
subject that fails blocks none of the others (issue 16: keep-going in profiles/slurm).

tests/slurm_setup.sh installs (apt, as root) and starts a one-node SLURM on this machine;
tests/slurm_teardown.sh stops the daemons it started, by PID. Without root or apt the test is
skipped with the reason. Snakemake reaches SLURM through snakemake-executor-plugin-slurm with
the profile profiles/slurm. Without accounting storage sacct does not work, so job states come
from squeue (SLURM keeps finished jobs for MinJobAge seconds, see slurm_setup.sh).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "tests" / "slurm_setup.sh"
TEARDOWN = ROOT / "tests" / "slurm_teardown.sh"
SKIP_EXIT = 77  # slurm_setup.sh: SLURM cannot be set up on this machine
# (subject, seed, affected side): small two-session phantoms, one of them right-sided.
COHORT = (("S1", 11, "left"), ("S2", 12, "right"))
# A subject whose folder holds no DICOM study: its index fails, listed between the others.
FAILING = "S0"
# profiles/slurm groups jobs: per subject the index, its images (convert_segment and register of
# every session) and its tables (measure_report); then the cohort's table, which
# waits for every subject and so is not run when one fails (onerror writes it instead).
SLURM_JOBS_PER_SUBJECT = 3
SLURM_TIMEOUT_S = 240
STATUS_DELAY_S = 2  # first status check after a submission; MinJobAge (300 s) >= 3 x this

pytestmark = pytest.mark.slow


def make_phantom(out: Path, subject: str, seed: int, side: str) -> Path:
    """A small DICOM subject (16 slices, 128 x 96, days -2 and 10) in ``out/dicom``."""
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "phantom", str(out), "--subject", subject,
         "--seed", str(seed), "--affected-side", side, "--slices", "16", "--matrix", "128x96",
         "--leg-radius-mm", "40", "--sessions=-2:0.1:4:0.3,10:0:0:0"],
        check=True, capture_output=True, text=True, timeout=120,
    )
    return out / "dicom"


def write_sheet(path: Path, subjects: list[tuple[str, Path, str]]) -> Path:
    lines = ["subject\tinput_dir\tday0\taffected_side\tevents"]
    lines += [f"{s}\t{d}\t2024-03-01\t{side}\t" for s, d, side in subjects]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def snakemake_cmd(workdir: Path, sheet: Path, results: Path, *options: str) -> list[str]:
    """The workflow of this repository run in ``workdir`` (its own .snakemake state)."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(ROOT / "config" / "config.yaml"),
            *options, "--config", f"subjects_sheet={sheet}", f"results_dir={results}"]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment with SLURM_CONF pointing at a running one-node cluster."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[test]')")
    state = tmp_path_factory.mktemp("slurm")
    try:
        proc = subprocess.run(["bash", str(SETUP), str(state)], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode == SKIP_EXIT:
            pytest.skip(f"no SLURM here: {proc.stderr.strip()}")
        if proc.returncode != 0:
            pytest.fail(f"slurm_setup.sh failed ({proc.returncode}):\n{proc.stdout}\n"
                        f"{proc.stderr}")
        conf = proc.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
        yield {**os.environ, "SLURM_CONF": conf}
    finally:
        subprocess.run(["bash", str(TEARDOWN), str(state)], timeout=120)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cohort")
    with ThreadPoolExecutor(max_workers=2) as pool:
        dirs = list(pool.map(lambda c: make_phantom(base / c[0], *c), COHORT))
    failing = base / FAILING / "dicom"
    failing.mkdir(parents=True)
    (failing / "notes.txt").write_text("no DICOM here\n", encoding="utf-8")
    return write_sheet(base / "subjects.tsv",
                       [(FAILING, failing, "left")]
                       + [(s, d, side) for (s, _, side), d in zip(COHORT, dirs, strict=True)])


def job_states(job_ids: list[str], env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """SLURM job id -> (state, comment: rule and wildcards), from squeue (no sacct here)."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T|%k", "--jobs", ",".join(job_ids)],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    states = {}
    for line in out.splitlines():
        job_id, state, comment = line.split("|", 2)
        states[job_id] = (state, comment)
    return states


def test_cohort_on_slurm_equals_local(slurm_env: dict[str, str], cohort: Path,
                                      tmp_path: Path) -> None:
    slurm_dir, local_dir = tmp_path / "slurm", tmp_path / "local"
    slurm_dir.mkdir()
    local_dir.mkdir()
    cmd = snakemake_cmd(
        slurm_dir, cohort, slurm_dir / "results",
        "--profile", str(ROOT / "profiles" / "slurm"),
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", str(STATUS_DELAY_S),
        "--jobs", "4",
    )
    # timeout -k: a hang (e.g. a status query that never sees a job finish) fails the test.
    start = time.monotonic()
    proc = subprocess.run(["timeout", "-k", "10", str(SLURM_TIMEOUT_S), *cmd], env=slurm_env,
                          capture_output=True, text=True)
    slurm_s = time.monotonic() - start
    log = proc.stdout + proc.stderr
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", log)
    # the failing subject fails the run (exit 1, not a timeout) after the others finished:
    # no --keep-going here, the profile's
    assert proc.returncode == 1, (f"SLURM run: exit {proc.returncode}, expected 1 (124 = "
                                  f"timeout):\n{log[-6000:]}")
    states = job_states(job_ids, slurm_env)
    print(f"\n{len(job_ids)} SLURM jobs in {slurm_s:.0f} s (job id, state, rule):")
    for job_id in job_ids:
        state, comment = states.get(job_id, ("(gone from squeue)", ""))
        print(f"  {job_id:>5}  {state:<10} {comment}")
    by_rule = {comment: state for state, comment in states.values()}
    assert by_rule.get(f"rule_index_wildcards_{FAILING}") == "FAILED", by_rule
    ok = [j for j, (_, comment) in states.items() if FAILING not in comment]
    assert all(states[j][0] == "COMPLETED" for j in ok), states
    for subject, _, _ in COHORT:  # each subject's first step ran as a job of its own
        assert f"rule_index_wildcards_{subject}" in by_rule, by_rule
    # the failing subject's index, every job of the others; no cohort table job
    assert len(job_ids) == 1 + SLURM_JOBS_PER_SUBJECT * len(COHORT), states
    assert "no DICOM image series found" in (
        slurm_dir / "results" / FAILING / "logs" / "index.log").read_text(encoding="utf-8")
    for subject, _, _ in COHORT:
        assert (slurm_dir / "results" / subject / "report.html").is_file(), subject
    # onerror still lists every subject, the failed one with its reason
    cohort_tsv = (slurm_dir / "results" / "cohort.tsv").read_text(encoding="utf-8")
    assert all(s in cohort_tsv for s in (FAILING, *(c[0] for c in COHORT))), cohort_tsv

    start = time.monotonic()
    local = subprocess.run(snakemake_cmd(local_dir, cohort, local_dir / "results",
                                         "--profile", str(ROOT / "profiles" / "local")),
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 1, local.stderr[-4000:]  # the failing subject, as on SLURM
    print(f"the same cohort locally (profiles/local): {time.monotonic() - start:.0f} s")
    for subject, _, _ in COHORT:
        for name in ("volumes.tsv", "longitudinal.tsv"):
            on_slurm = (slurm_dir / "results" / subject / name).read_text(encoding="utf-8")
            here = (local_dir / "results" / subject / name).read_text(encoding="utf-8")
            assert on_slurm == here, f"{subject}/{name} differs between SLURM and local"
