"""Cohort throughput on this machine, and how much of it is workflow overhead (issue 7).

Cohorts of small phantom subjects (two sessions each, 16 slices of 128 x 96) run through the
workflow with profiles/local and ``--cores 2`` in a fresh working folder, as ``limbtrack run
--cohort`` runs them: above 16 subjects a first Snakemake run indexes every subject (their
``sessions.json`` as targets), a second one does the rest. For each cohort size it prints the
wall time, subjects per hour, and where the CPU time went (both runs together):

- *Snakemake*: the CPU time of the Snakemake processes themselves (DAG, scheduling, checkpoint
  re-evaluation), read from /proc/<pid>/stat just before they exit;
- *job start-up*: per job, starting Python and importing the modules of what the job runs
  (:data:`pipeline.cli.COMMANDS`; a rule chaining steps with ``limbtrack steps`` imports each
  step's; ``python -c "import pipeline.cli, <modules>"``, measured separately, median of 3)
  times the number of jobs of each kind;
- *compute*: the jobs' CPU time (from the kernel's accounting of Snakemake's children) minus
  their start-up.

Overhead share = (Snakemake + job start-up) / all CPU time. CPU rather than wall time is used
for the split because a shared machine's load inflates wall time but hardly CPU time.

Snakemake's CPU per subject is the number to watch for large cohorts (issue 16: flat from 8 to
32 subjects once its scheduler's timers no longer pile up; see pipeline.workflow); for the DAG
alone at hundreds or thousands of subjects, benchmarks/cohort_dag.py.

Per rule it also prints the jobs' peak resident memory and longest wall time against the
``mem_mb`` and ``runtime`` the rule requests (rules/*.smk), sampled from /proc
(benchmarks/job_monitor.py: the kernel's high-water mark of each job's RSS).

``--executor slurm`` runs the cohort through profiles/slurm on a SLURM cluster of this machine
(``SLURM_CONF`` set; tests/slurm_setup.sh starts one). Its jobs are not Snakemake's children
there, so their CPU comes from the /proc samples (each job's last ~0.1 s unseen), and the
Snakemake that runs each group job inside its allocation counts as Snakemake's CPU.

``--phantoms K`` makes K distinct phantoms and lists them in turn (subject i reads phantom
i mod K): every subject is still indexed, converted, segmented, ... on its own; only the
phantoms' generation (100 s of CPU each at the realistic size) is saved.

    python benchmarks/cohort_speed.py [--sizes 5,10,20] [--cores 2] [--work DIR] [--realistic]
        [--phantoms K] [--executor local|slurm]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from job_monitor import SNAKEMAKE, JobMonitor, Proc, job_command

from pipeline.workflow import index_first, index_targets

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
#: SLURM status checks: the first one 2 s after a submission (the test cluster's MinJobAge of
#: 300 s is well above 3 x this; tests/slurm_setup.sh), then Snakemake's default period.
SLURM_OPTIONS = ("--slurm-status-command", "squeue",
                 "--slurm-init-seconds-before-status-checks", "2")


#: The phantom of each subject: small by default; --realistic: three sessions of 320 x 320 x 40.
SMALL = {"slices": "16", "matrix": "128x96", "leg_radius_mm": "40",
         "sessions": "-2:0.1:4:0.3,10:0:0:0"}
REALISTIC = {"slices": "40", "matrix": "320x320",  # the phantom's own leg radius
             "sessions": "-2:0.1:4:0.3,10:0.15:5:0.5,30:0:0:0"}


def make_phantom(out: Path, subject: str, seed: int, shape: dict[str, str] = SMALL) -> Path:
    if not (out / "dicom").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "phantom", str(out), "--subject", subject,
             "--seed", str(seed), "--slices", shape["slices"], "--matrix", shape["matrix"],
             *(["--leg-radius-mm", shape["leg_radius_mm"]] if "leg_radius_mm" in shape else []),
             f"--sessions={shape['sessions']}"],
            check=True, capture_output=True, text=True,
        )
    return out / "dicom"


def write_sheet(path: Path, dicom_dirs: list[Path]) -> Path:
    lines = ["subject\tinput_dir\tday0\taffected_side\tevents"]
    lines += [f"C{i:03d}\t{d}\t2024-03-01\tleft\t" for i, d in enumerate(dicom_dirs, 1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def child_cpu_s(cmd: list[str]) -> float:
    """CPU seconds (user + system) of running ``cmd`` to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def startup_cpu_s(command: str, repeats: int = 3) -> float:
    """Median CPU seconds to start Python and import the modules of a job's ``command``
    (:func:`job_monitor.job_command`; a chain of steps imports every step's module): the
    job's fixed cost."""
    from pipeline.cli import COMMANDS

    steps = command.split(" :: ")
    modules = [COMMANDS[step.split()[0]][0] for step in steps]
    if len(steps) > 1:
        modules.append(COMMANDS["steps"][0])
    return statistics.median(
        child_cpu_s([sys.executable, "-c", f"import pipeline.cli, {', '.join(modules)}"])
        for _ in range(repeats)
    )


def self_cpu_s(pid: int) -> float | None:
    """CPU seconds of process ``pid`` itself (not its children), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def run_phase(cmd: list[str], log_path: Path) -> tuple[float, float, float, int]:
    """Run one Snakemake command: (wall s, its own CPU s, its CPU with its children's, pid)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        snakemake_cpu = 0.0
        while True:
            sample = self_cpu_s(proc.pid)
            if sample is not None:
                snakemake_cpu = sample
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done == proc.pid:
                break
            time.sleep(0.2)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise SystemExit(f"workflow failed ({proc.returncode}); see {log_path}")
    return wall, snakemake_cpu, usage.ru_utime + usage.ru_stime, proc.pid


def run_cohort(sheet: Path, work: Path, cores: int, executor: str = "local"
               ) -> dict[str, object]:
    """Run the cohort as limbtrack run --cohort does: above 16 subjects every subject's
    index first (its sessions.json as targets), then the rest, through profiles/local or
    profiles/slurm. Wall time, CPU (all, Snakemake's own), jobs per command, and the processes
    the job monitor saw, both runs together."""
    profile = "slurm" if executor == "slurm" else "local"
    # --cores: this machine's cores; on SLURM (the test cluster's one node has `cores` CPUs)
    # it caps the cpus a group job asks for (a subject's images group: a session each)
    opts = ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
            "--configfile", str(ROOT / "config" / "config.yaml"), "--printshellcmds",
            "--profile", str(ROOT / "profiles" / profile), "--cores", str(cores)]
    if executor == "slurm":
        opts += SLURM_OPTIONS
    results = work / "results"
    opts += ["--config", f"subjects_sheet={sheet}", f"results_dir={results}"]
    subjects = [line.split("\t", 1)[0] for line in sheet.read_text().splitlines()[1:]]
    phases = {"index": index_targets(str(results), subjects)} if index_first(len(subjects)) \
        else {}
    phases["all"] = []
    wall = own_cpu = total = 0.0
    pids, logs = [], []
    with JobMonitor(work) as monitor:
        for name, targets in phases.items():
            log_path = work / f"snakemake_{name}.log"
            w, own, cpu, pid = run_phase(
                [sys.executable, "-m", "snakemake", *targets, *opts], log_path)
            wall, own_cpu, total, pids = wall + w, own_cpu + own, total + cpu, [*pids, pid]
            logs.append(log_path)
    jobs = monitor.jobs()
    note = ""
    if executor == "slurm":  # jobs and in-job Snakemake are not children: their samples
        modules = Counter(p.command for p in jobs)
        in_jobs = [p.cpu_s for (pid, _, _), p in monitor.procs.items()
                   if p.kind == SNAKEMAKE and pid not in pids]
        # the benchmark's Snakemake (and its sbatch/squeue) + the Snakemake in each job
        total += sum(in_jobs) + sum(p.cpu_s for p in jobs)
        snakemake_cpu = total - sum(p.cpu_s for p in jobs)
        note = (f"Snakemake CPU: {snakemake_cpu - sum(in_jobs):.1f} s submitting (its own, "
                f"sbatch, squeue), {sum(in_jobs):.1f} s in {len(in_jobs)} Snakemake "
                f"processes inside the SLURM jobs ({statistics.median(in_jobs or [0]):.2f} s "
                "median)")
    else:
        snakemake_cpu = own_cpu
        modules = Counter(
            job_command(shlex.split(line))
            for log_path in logs
            for line in re.findall(r"^Shell command: \S+ -m pipeline\.cli (.*)$",
                                   log_path.read_text(), flags=re.M))
    return {"wall_s": wall, "total_cpu_s": total, "snakemake_cpu_s": snakemake_cpu,
            "jobs": modules, "procs": jobs, "note": note}


def requested(rules_dir: Path = ROOT / "rules") -> dict[str, tuple[int, int]]:
    """Rule -> (mem_mb, runtime in minutes) as written in rules/*.smk."""
    out = {}
    for path in sorted(rules_dir.glob("*.smk")):
        text = path.read_text(encoding="utf-8")
        for block in re.split(r"^(?=(?:rule|checkpoint) )", text, flags=re.M):
            name = re.match(r"(?:rule|checkpoint) (\w+):", block)
            mem = re.search(r"mem_mb=(\d+)", block)
            runtime = re.search(r"runtime=(\d+)", block)
            if name and mem and runtime:
                out[name.group(1)] = (int(mem.group(1)), int(runtime.group(1)))
    return out


def rule_table(procs: list[Proc]) -> list[str]:
    """Per rule: jobs, CPU, peak RSS and wall time of its jobs, and what the rule requests."""
    asked = requested()
    lines = ["| rule | jobs | CPU/job median (s) | CPU/job max (s) | peak RSS median (MiB) "
             "| peak RSS max (MiB) | mem_mb requested | wall/job max (s) "
             "| runtime requested (min) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_rule: dict[str, list[Proc]] = {}
    for p in procs:
        by_rule.setdefault(p.kind, []).append(p)
    for rule, ps in sorted(by_rule.items()):
        mem, runtime = asked.get(rule, (0, 0))
        cpu = [p.cpu_s for p in ps]
        rss = [p.peak_rss_mib for p in ps]
        lines.append(f"| {rule} | {len(ps)} | {statistics.median(cpu):.1f} | {max(cpu):.1f} "
                     f"| {statistics.median(rss):.0f} | {max(rss):.0f} | {mem} "
                     f"| {max(p.last_s - p.first_s for p in ps):.0f} | {runtime} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="5,10,20", help="cohort sizes, comma-separated")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--realistic", action="store_true",
                    help="three sessions of 320 x 320 x 40 per subject (default: two small)")
    ap.add_argument("--phantoms", type=int, default=0,
                    help="distinct phantoms, listed in turn (default: one per subject)")
    ap.add_argument("--executor", choices=("local", "slurm"), default="local",
                    help="slurm: through profiles/slurm (SLURM_CONF must name a cluster)")
    args = ap.parse_args(argv)
    shape = REALISTIC if args.realistic else SMALL
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="cohort_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    n_phantoms = min(args.phantoms or max(sizes), max(sizes))

    print(f"phantoms: {n_phantoms} for {max(sizes)} subjects in {work}", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=args.cores) as pool:
        distinct = list(pool.map(
            lambda i: make_phantom(work / "phantoms" / f"C{i:03d}", f"C{i:03d}", 100 + i,
                                   shape),
            range(1, n_phantoms + 1)))
    dicom_dirs = [distinct[i % n_phantoms] for i in range(max(sizes))]

    rows, startup, rule_tables = [], {}, {}
    for n in sizes:
        run_dir = work / f"cohort_{n}" if args.executor == "local" else work / f"slurm_{n}"
        run_dir.mkdir(exist_ok=True)
        sheet = write_sheet(run_dir / "subjects.tsv", dicom_dirs[:n])
        print(f"cohort of {n} ...", file=sys.stderr)
        result = run_cohort(sheet, run_dir, args.cores, args.executor)
        rule_tables[n] = rule_table(result["procs"])  # type: ignore[arg-type]
        if result["note"]:
            rule_tables[n].insert(0, f"{result['note']}\n")
        jobs: Counter[str] = result["jobs"]  # type: ignore[assignment]
        for module in jobs:
            if module not in startup:
                startup[module] = startup_cpu_s(module)
        startup_cpu = sum(startup[m] * k for m, k in jobs.items())
        total = float(result["total_cpu_s"])  # type: ignore[arg-type]
        snakemake_cpu = float(result["snakemake_cpu_s"])  # type: ignore[arg-type]
        compute = total - snakemake_cpu - startup_cpu
        wall = float(result["wall_s"])  # type: ignore[arg-type]
        rows.append((n, sum(jobs.values()), wall, 3600 * n / wall, wall / n, total,
                     snakemake_cpu, startup_cpu, compute,
                     100 * (snakemake_cpu + startup_cpu) / total,
                     100 * total / (wall * args.cores)))

    n_sessions = len(shape["sessions"].split(","))
    how = (f"--cores {args.cores}" if args.executor == "local"
           else "profiles/slurm on the SLURM cluster of this machine")
    print(f"\nCohorts of phantom subjects ({n_sessions} sessions, {shape['slices']} x "
          f"{shape['matrix'].replace('x', ' x ')}; {n_phantoms} distinct phantoms), {how}\n")
    print("| subjects | jobs | wall (s) | subjects/hour | wall/subject (s) | CPU (s) "
          "| Snakemake CPU (s) | Snakemake CPU/subject (s) | job start-up CPU (s) "
          "| compute CPU (s) | overhead share | cores busy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.1f} | {r[5]:.0f} "
              f"| {r[6]:.1f} | {r[6] / r[0]:.2f} | {r[7]:.1f} | {r[8]:.1f} | {r[9]:.0f} % "
              f"| {r[10]:.0f} % |")
    print("\nStart-up CPU per job (python + imports, median of 3): "
          + ", ".join(f"{m} {s:.2f} s" for m, s in
                      sorted(startup.items())))
    for n, lines in rule_tables.items():
        print(f"\nPer rule, cohort of {n} (peak RSS: VmHWM sampled every 0.1 s; requested: "
              "rules/*.smk)\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
