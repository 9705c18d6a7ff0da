"""Snakemake's own CPU for per-subject checkpoints, with trivial jobs (issue 16).

A synthetic workflow of the same shape as limbtrack's (per subject: an index checkpoint that
lists two sessions, a job per session, a registration, a per-subject table that gathers them;
every job a ``touch``), so that only Snakemake's bookkeeping costs CPU. For each cohort size it
prints the CPU of the Snakemake processes themselves (read from /proc, their children's
excluded) per subject, for:

- *one run*: every subject indexed in the run that goes on past the index (each finished
  checkpoint re-plans the whole DAG);
- *two runs, index_all*: first the rule gathering every subject's index output, then the rest;
- *two runs, files*: first every subject's index output as targets (the DAG holds the index
  jobs alone), then the rest (``limbtrack run --cohort``);

with Snakemake's default ILP scheduler, and with the profiles' greedy scheduler and
``--scheduler-subsample 100``.

    python benchmarks/checkpoint_scaling.py [--sizes 32,128,256] [--cores 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
SNAKEFILE = '''
SUBJECTS = [f"S{i:04d}" for i in range(int(config["subjects"]))]

rule all:
    input: expand("r/{s}/table.txt", s=SUBJECTS)

rule index_all:
    input: expand("r/{s}/sessions.txt", s=SUBJECTS)

checkpoint index:
    output: "r/{s}/sessions.txt"
    shell: "printf '20240101\\\\n20240201\\\\n' > {output}"

def sessions(w):
    with open(checkpoints.index.get(s=w.s).output[0]) as fh:
        return [line.strip() for line in fh if line.strip()]

rule session:
    input: ancient("r/{s}/sessions.txt")
    output: "r/{s}/{ses}/dseg.txt"
    shell: "touch {output}"

rule register:
    input: lambda w: [f"r/{w.s}/{x}/dseg.txt" for x in sessions(w)]
    output: "r/{s}/xfm.txt"
    shell: "touch {output}"

rule table:
    input: lambda w: [f"r/{w.s}/{x}/dseg.txt" for x in sessions(w)], "r/{s}/xfm.txt"
    output: "r/{s}/table.txt"
    shell: "touch {output}"

onstart:
    workflow.scheduler.job_rate_limiter = None  # as limbtrack's Snakefile (pipeline.workflow)
'''
SCHEDULERS = {"ILP (default)": [],
              "greedy, subsample 100": ["--scheduler", "greedy", "--scheduler-subsample", "100"]}


def snakemake_cpu_s(work: Path, subjects: int, cores: int, options: list[str],
                    targets: list[str]) -> float:
    """CPU seconds of one Snakemake run's own process."""
    cmd = [sys.executable, "-m", "snakemake", *targets, "--cores", str(cores), "-q",
           *options, "--config", f"subjects={subjects}"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cpu = 0.0
    while proc.poll() is None:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICKS
        except (OSError, IndexError):
            pass
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed: {proc.stderr.read().decode()[-2000:]}"
                         if proc.stderr else "snakemake failed")
    return cpu


def run(work: Path, subjects: int, cores: int, options: list[str], how: str) -> float:
    """Snakemake CPU per subject of a fresh cohort run `how` (one run / two runs)."""
    for name in ("r", ".snakemake"):
        shutil.rmtree(work / name, ignore_errors=True)
    passes = {"one run": [[]],
              "two runs, index_all": [["index_all"], []],
              "two runs, files": [[f"r/S{i:04d}/sessions.txt" for i in range(subjects)], []]}
    return sum(snakemake_cpu_s(work, subjects, cores, options, targets)
               for targets in passes[how]) / subjects


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="32,128,256", help="cohort sizes, comma-separated")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="checkpoint_scaling_"))
    (work / "Snakefile").write_text(SNAKEFILE, encoding="utf-8")
    print("\nSnakemake's own CPU per subject (s), synthetic workflow of limbtrack's shape "
          f"(trivial jobs), --cores {args.cores}\n")
    print("| scheduler | how | " + " | ".join(f"{n} subjects" for n in sizes) + " |")
    print("|---|---|" + "---:|" * len(sizes))
    for scheduler, options in SCHEDULERS.items():
        for how in ("one run", "two runs, index_all", "two runs, files"):
            cells = [f"{run(work, n, args.cores, options, how):.3f}" for n in sizes]
            print(f"| {scheduler} | {how} | " + " | ".join(cells) + " |", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
