"""The report and cohort rules pass every input they declare, and ``show_phi`` reaches the report.

The demo study is indexed for real (seconds; the report's per-session inputs depend on the
index checkpoint); then Snakemake prints, without running anything, the shell commands it
would run, with ``show_phi`` on and off. ``--rerun-triggers mtime`` keeps the index from being
re-planned for its changed ``--show-phi`` parameter, so the whole DAG is known.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEMS = ("fluid.nii.gz", "T1w.nii.gz", "dseg.nii.gz")


def _snakemake(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--nolock", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _command(output: str, subcommand: str) -> list[str]:
    """The argument list of `limbtrack subcommand` in the one printed shell command that runs
    it, alone or as a step of `limbtrack steps` (between ``--``/``::`` and ``::``/the end)."""
    marker = "-m pipeline.cli "
    found = []
    for line in (ln for ln in output.splitlines() if marker in ln):
        words = shlex.split(line.split(marker, 1)[1])
        words = words[: words.index(">")] if ">" in words else words
        if words[0] == "steps":
            words = words[words.index("--") + 1:]
        while words:
            step = words[: words.index("::")] if "::" in words else words
            if step[0] == subcommand:
                found.append(step[1:])
            words = words[len(step) + 1:]
    assert len(found) == 1, found
    return found[0]


def _values(argv: list[str], option: str) -> list[str]:
    """The values following `option` up to the next option."""
    start = argv.index(option) + 1
    end = next((k for k in range(start, len(argv)) if argv[k].startswith("--")), len(argv))
    return argv[start:end]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("rule") / "results"
    _snakemake("--cores", "1", "--until", "index", "--config", f"results_dir={results}",
               "show_phi=true")
    return results


@pytest.mark.parametrize("show_phi", [True, False])
def test_report_rule_passes_every_input(indexed: Path, show_phi: bool) -> None:
    out = _snakemake("-n", "-p", "--rerun-triggers", "mtime", "--config",
                     f"results_dir={indexed}", f"show_phi={str(show_phi).lower()}")
    argv = _command(out, "report")
    d = indexed / "demo"
    index = json.loads((d / "sessions.json").read_text(encoding="utf-8"))
    sessions = sorted(s["session"] for s in index["sessions"])
    assert len(sessions) == 5  # the demo's sessions, found by the index checkpoint
    tables = {"--summary": "summary.json", "--volumes": "volumes.tsv",
              "--longitudinal": "longitudinal.tsv", "--index": "index.tsv",
              "--problems": "problems.tsv", "--csa": "profile_csa.tsv",
              "--circumference": "circumference.tsv", "--sessions-json": "sessions.json"}
    for option, name in tables.items():
        assert _values(argv, option) == [str(d / name)], option
    for option, suffix in zip(("--fluid", "--t1", "--dseg"), STEMS, strict=True):
        assert _values(argv, option) == [
            str(d / f"ses-{s}" / f"sub-demo_ses-{s}_{suffix}") for s in sessions]
    for option, suffix in (("--xfm", "xfm.json"), ("--tfm", "xfm.tfm")):
        assert _values(argv, option) == [  # every session but the baseline (the first here)
            str(d / f"ses-{s}" / f"sub-demo_ses-{s}_{suffix}") for s in sessions[1:]]
    assert ("--show-phi" in argv) is show_phi
    assert "--subject-dir" not in argv


def test_cohort_rule_passes_the_files_it_declares(tmp_path: Path) -> None:
    sheet = tmp_path / "subjects.tsv"
    rows = [f"{s}\tsample_data/demo/dicom\t2024-03-01\tleft\t" for s in ("demo", "other")]
    sheet.write_text("subject\tinput_dir\tday0\taffected_side\tevents\n" + "\n".join(rows) + "\n",
                     encoding="utf-8")
    results = tmp_path / "results"
    out = _snakemake("-n", "-p", "--config", f"results_dir={results}",
                     f"subjects_sheet={sheet}")
    argv = _command(out, "cohort")
    for option, name in (("--summaries", "summary.json"), ("--longitudinal", "longitudinal.tsv"),
                         ("--reports", "report.html")):
        assert _values(argv, option) == [str(results / s / name) for s in ("demo", "other")]
    assert "--subject-dirs" not in argv
