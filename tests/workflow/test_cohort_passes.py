"""A cohort's first pass plans its subjects' index jobs alone (issue 16).

``limbtrack run --cohort`` (and README's two commands) index every subject first, so that the
second run knows every subject's sessions when Snakemake builds its DAG: a dry run of the
first pass, both ways it is asked for, must plan nothing but the index.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.workflow import index_targets

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "sample_data" / "demo" / "dicom"


def planned_jobs(tmp_path: Path, *targets: str) -> dict[str, int]:
    """Rule -> jobs in the 'Job stats' table of a dry run of a two-subject cohort."""
    sheet = tmp_path / "subjects.tsv"
    sheet.write_text("subject\tinput_dir\tday0\taffected_side\tevents\n"
                     + "".join(f"{s}\t{DEMO}\t2024-03-01\tleft\t\n" for s in ("A1", "B2")),
                     encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *targets, "-n", "--nolock", "--config",
         f"subjects_sheet={sheet}", f"results_dir={tmp_path / 'results'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (proc.stdout + proc.stderr).split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M) if m.group(1) != "total"}


@pytest.mark.parametrize("how", ["rule", "files"])
def test_first_pass_plans_the_index_alone(tmp_path: Path, how: str) -> None:
    targets = (["index_all"] if how == "rule"
               else index_targets(str(tmp_path / "results"), ["A1", "B2"]))
    jobs = planned_jobs(tmp_path, *targets)
    assert jobs == ({"index": 2, "index_all": 1} if how == "rule" else {"index": 2})


def test_whole_run_plans_the_rest(tmp_path: Path) -> None:
    """Without a target the Snakefile's `all` (the sessions are not known before the index:
    one measure_report per subject waits on it)."""
    jobs = planned_jobs(tmp_path)
    assert jobs["index"] == 2 and jobs["measure_report"] == 2 and jobs["cohort"] == 1
