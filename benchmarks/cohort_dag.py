"""Snakemake's cost of planning a large cohort, without running it (issue 16).

A dry run after indexing: every subject's index outputs exist (copies of one indexed
subject's index.tsv, problems.tsv, sessions.json and sessions.tsv), nothing else does, so
Snakemake resolves every subject's sessions and builds the whole DAG (index already done,
every later job to run). ``--rerun-triggers mtime``: the copies have no Snakemake metadata,
which would otherwise re-plan the index of every subject. The subjects all read one study
folder (the fingerprint of the index still walks it once per subject, as for distinct ones).

For each cohort size it prints the jobs planned and the CPU and wall time of the Snakemake
process (parsing, subjects sheet, DAG), in total and per subject.

    python benchmarks/cohort_dag.py --indexed RESULTS/C001 --input-dir STUDY [--sizes 256,1000]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX_OUTPUTS = ("index.tsv", "problems.tsv", "sessions.json", "sessions.tsv")


def make_cohort(work: Path, indexed: Path, input_dir: Path, n: int) -> Path:
    """Results folders of ``n`` indexed subjects and their subjects sheet."""
    lines = ["subject\tinput_dir\tday0\taffected_side\tevents"]
    for i in range(1, n + 1):
        subject = f"D{i:04d}"
        out = work / "results" / subject
        out.mkdir(parents=True, exist_ok=True)
        for name in INDEX_OUTPUTS:
            shutil.copyfile(indexed / name, out / name)
        lines.append(f"{subject}\t{input_dir}\t2024-03-01\tleft\t")
    sheet = work / "subjects.tsv"
    sheet.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sheet


def dry_run(work: Path, sheet: Path) -> tuple[float, float, int]:
    """(CPU s, wall s, jobs planned) of a dry run of the cohort (CPU: the process's own)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(work), "--configfile", str(ROOT / "config" / "config.yaml"),
           "--cores", "2", "-n", "--rerun-triggers", "mtime", "--config",
           f"subjects_sheet={sheet}", f"results_dir={work / 'results'}"]
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    total = re.search(r"^total\s+(\d+)", proc.stdout, flags=re.M)
    return cpu, wall, int(total.group(1)) if total else -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--indexed", type=Path, required=True,
                    help="results folder of one subject the workflow has indexed")
    ap.add_argument("--input-dir", type=Path, required=True, help="that subject's study folder")
    ap.add_argument("--sizes", default="256,1000", help="cohort sizes, comma-separated")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    base = args.work or Path(tempfile.mkdtemp(prefix="cohort_dag_"))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        work = base / f"cohort_{n}"
        sheet = make_cohort(work, args.indexed, args.input_dir.resolve(), n)
        cpu, wall, jobs = dry_run(work, sheet)
        rows.append((n, jobs, cpu, wall))
    print("\nDry run after indexing (DAG only), --rerun-triggers mtime\n")
    print("| subjects | jobs planned | Snakemake CPU (s) | CPU/subject (s) | wall (s) |")
    print("|---:|---:|---:|---:|---:|")
    for n, jobs, cpu, wall in rows:
        print(f"| {n} | {jobs} | {cpu:.1f} | {cpu / n:.3f} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
