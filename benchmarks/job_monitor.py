"""Peak memory and CPU of every job of a workflow run, read from /proc (issue 16).

:class:`JobMonitor` samples, every ``interval_s``, the processes whose command line or working
folder names the run's folder: the ``python -m pipeline.cli <subcommand>`` of each job, and
Snakemake processes (the one started by the benchmark, and under SLURM the Snakemake that runs
a group job inside its allocation). Nothing in the workflow changes: it works the same for
local jobs (children of Snakemake) and for jobs that slurmd starts on this machine (the local
test cluster), which are nobody's children here.

Per process it keeps the last CPU time seen (``utime + stime``) and the kernel's high-water
mark of its resident memory (``VmHWM``: the peak RSS over the whole life of the process, so a
sample taken any time before it exits holds the peak up to then). What a sample cannot see:
the CPU and memory growth of the last ``interval_s`` of a process's life.

A job's worker processes (the index step reads headers in a process pool: same command line,
its parent the job's process) belong to the job: :meth:`JobMonitor.jobs` adds their CPU, and
their peaks to the job's peak (an upper bound of what the job held at once).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
#: ``limbtrack`` subcommands a rule runs (with the first argument where one module serves
#: several rules: ``nifti convert``, ``export tables``).
STEP_COMMANDS = ("index", "nifti index", "convert", "nifti convert", "segment", "register",
                 "measure", "longitudinal", "report", "cohort", "export tables",
                 "export dicom", "export dataset", "research")
#: A job's command (:func:`job_command`) -> the rule that runs it (rules/*.smk).
RULE_OF_COMMAND = {
    "index": "index", "nifti index": "index", "convert :: segment": "convert_segment",
    "nifti convert :: segment": "convert_segment", "register": "register",
    "measure :: longitudinal :: report": "measure_report", "cohort": "cohort",
    "export tables": "export_tables", "export dicom": "export_dicom",
    "export dataset": "export", "research": "research_export",
}
SNAKEMAKE = "snakemake"
#: Processes that may turn into a job by exec (re-read until they do or end).
LAUNCHERS = ("sh", "bash", "dash", "srun")


@dataclass
class Proc:
    """One process seen: what it is, its last CPU time and its peak RSS so far."""

    kind: str  # a rule name, or SNAKEMAKE
    command: str  # what the job runs (job_command; "" for Snakemake)
    ppid: int = 0
    cpu_s: float = 0.0
    peak_rss_mib: float = 0.0
    first_s: float = 0.0
    last_s: float = 0.0


def step_command(words: list[str]) -> str:
    """The subcommand at the start of ``words`` (:data:`STEP_COMMANDS`), else its first word."""
    for n in (2, 1):
        command = " ".join(words[:n])
        if command in STEP_COMMANDS:
            return command
    return words[0] if words else ""


def job_command(words: list[str]) -> str:
    """What a job runs, from the words after ``-m pipeline.cli``: ``segment``, ``nifti
    convert``; for ``limbtrack steps`` its steps joined by `` :: `` (``convert :: segment``)."""
    if words[:1] != ["steps"]:
        return step_command(words)
    rest = words[words.index("--") + 1:] if "--" in words else []
    chain: list[list[str]] = [[]]
    for word in rest:
        if word == "::":
            chain.append([])
        else:
            chain[-1].append(word)
    return " :: ".join(step_command(step) for step in chain)


def classify(argv: list[str]) -> tuple[str, str] | None:
    """(kind, command) of a command line: a limbtrack job (its rule, :func:`job_command`) or a
    Snakemake process, else None (the shells around the jobs, sbatch, squeue, ...)."""
    for i in range(1, len(argv) - 1):
        if argv[i] == "pipeline.cli" and argv[i - 1] == "-m":
            command = job_command(argv[i + 1:])
            rule = RULE_OF_COMMAND.get(command)
            return (rule, command) if rule else None
    head = [Path(a).name for a in argv[:3]]
    if SNAKEMAKE in head and not Path(argv[0]).name.endswith("sh"):
        return SNAKEMAKE, ""
    return None


class JobMonitor:
    """Samples the processes of one run (see the module's text) in a thread."""

    def __init__(self, run_dir: Path, interval_s: float = 0.1):
        self.run_dir = str(run_dir.resolve())
        self.interval_s = interval_s
        self.procs: dict[tuple[int, int, str], Proc] = {}
        self._ignored: set[tuple[int, int, str]] = set()
        # a shell (or srun) may exec the job's command later, keeping its pid and start time
        self._launchers: set[tuple[int, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> JobMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def _belongs(self, pid: int, cmdline: str) -> bool:
        if self.run_dir in cmdline:
            return True
        try:
            return os.readlink(f"/proc/{pid}/cwd") == self.run_dir
        except OSError:
            return False

    def sample(self) -> None:
        now = time.monotonic() - self._t0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                comm, rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
                stat = rest.split()
                # starttime: a reused pid is another process; comm changes with an exec (a
                # shell, srun or slurmstepd's child becoming a job or a Snakemake)
                key = (pid, int(stat[19]), comm)
                if key in self._ignored:
                    continue
                proc = self.procs.get(key)
                if proc is None:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                    argv = raw.decode(errors="replace").rstrip("\0").split("\0")
                    kind = classify(argv)
                    if kind is None or not self._belongs(pid, " ".join(argv)):
                        if Path(argv[0]).name in LAUNCHERS:
                            self._launchers.add(key)
                        else:
                            self._ignored.add(key)
                        continue
                    self._launchers.discard(key)
                    proc = self.procs[key] = Proc(kind[0], kind[1], int(stat[1]), first_s=now)
                status = Path(f"/proc/{pid}/status").read_text()
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            proc.cpu_s = (int(stat[11]) + int(stat[12])) / TICKS
            proc.last_s = now
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    proc.peak_rss_mib = max(proc.peak_rss_mib, int(line.split()[1]) / 1024)
                    break

    def jobs(self) -> list[Proc]:
        """One record per job (its workers folded in: CPU summed, peaks summed), Snakemake's
        processes left out."""
        by_pid = {pid: p for (pid, _, _), p in self.procs.items() if p.kind != SNAKEMAKE}
        roots: dict[int, Proc] = {}
        workers: list[tuple[int, Proc]] = []
        for pid, p in by_pid.items():
            parent = by_pid.get(p.ppid)
            if parent is not None and parent.command == p.command:
                workers.append((p.ppid, p))
            else:
                roots[pid] = replace(p)
        for ppid, w in workers:
            root = ppid
            while root not in roots:  # a worker's worker
                root = by_pid[root].ppid
            roots[root].cpu_s += w.cpu_s
            roots[root].peak_rss_mib += w.peak_rss_mib
        return list(roots.values())
