"""benchmarks/job_monitor.py: which processes are jobs of which rule, and a job's workers folded
into the job (the per-rule peak memory of benchmarks/cohort_speed.py rests on both)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("job_monitor",
                                               ROOT / "benchmarks" / "job_monitor.py")
assert _spec is not None and _spec.loader is not None
job_monitor = importlib.util.module_from_spec(_spec)
sys.modules["job_monitor"] = job_monitor  # dataclasses look the module up by name
_spec.loader.exec_module(job_monitor)


def test_classify_jobs_snakemake_and_others() -> None:
    py = "/venv/bin/python"
    assert job_monitor.classify([py, "-m", "pipeline.cli", "register", "--fixed", "a"]) == (
        "register", "register")
    assert job_monitor.classify([py, "-m", "pipeline.cli", "export", "tables", "--dseg"]) == (
        "export_tables", "export tables")
    # rules chaining steps (limbtrack steps): the rule from the steps' commands
    steps = [py, "-m", "pipeline.cli", "steps", "--log", "a.log", "--log", "b.log", "--"]
    assert job_monitor.classify([*steps, "nifti", "convert", "--x", "::", "segment", "--t1"]
                                ) == ("convert_segment", "nifti convert :: segment")
    assert job_monitor.classify([*steps, "convert", "--x", "::", "segment", "--t1"]) == (
        "convert_segment", "convert :: segment")
    assert job_monitor.classify([*steps[:-1], "--log", "c.log", "--", "measure", "::",
                                 "longitudinal", "--x", "::", "report", "--y"]) == (
        "measure_report", "measure :: longitudinal :: report")
    assert job_monitor.classify([py, "-m", "snakemake", "--target-jobs", "x"]) == (
        job_monitor.SNAKEMAKE, "")
    # the shell around a job, and a subcommand no rule runs
    assert job_monitor.classify(["/bin/sh", "-c", f"{py} -m pipeline.cli register"]) is None
    assert job_monitor.classify([py, "-m", "pipeline.cli", "phantom", "out"]) is None


def test_workers_fold_into_their_job() -> None:
    proc = job_monitor.Proc
    monitor = job_monitor.JobMonitor(ROOT)
    monitor.procs = {
        (10, 1, "python"): proc("index", "index", ppid=5, cpu_s=2.0, peak_rss_mib=60.0),
        (11, 2, "python"): proc("index", "index", ppid=10, cpu_s=1.0, peak_rss_mib=40.0),
        (12, 3, "python"): proc("index", "index", ppid=10, cpu_s=1.5, peak_rss_mib=40.0),
        # another index job
        (20, 4, "python"): proc("index", "index", ppid=6, cpu_s=3.0, peak_rss_mib=70.0),
        (30, 5, "python"): proc(job_monitor.SNAKEMAKE, "", ppid=1, cpu_s=9.0, peak_rss_mib=300.0),
    }
    jobs = sorted(monitor.jobs(), key=lambda p: p.cpu_s)
    assert [(p.cpu_s, p.peak_rss_mib) for p in jobs] == [(3.0, 70.0), (4.5, 140.0)]


def test_a_live_job_is_seen_with_its_peak(tmp_path: Path) -> None:
    """A process that holds ~50 MiB: its VmHWM is read while it runs."""
    fake = tmp_path / "pipeline"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text(
        "import sys, time\nblock = bytearray(50 * 2**20)\nsys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "register"], cwd=tmp_path,
                             stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ""})
    try:
        monitor = job_monitor.JobMonitor(tmp_path)
        for _ in range(50):
            monitor.sample()
            jobs = monitor.jobs()
            if jobs and jobs[0].peak_rss_mib >= 50:
                break
            subprocess.run(["sleep", "0.1"], check=True)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert [p.kind for p in jobs] == ["register"]
    assert jobs[0].peak_rss_mib >= 50
