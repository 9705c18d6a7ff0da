"""Live progress of a workflow run, read from Snakemake's log records (``limbtrack run``).

:class:`Progress` is a :class:`logging.Handler` for the ``snakemake`` logger. Snakemake tags
its records with ``record.event`` (:class:`~snakemake_interface_logger_plugins.common.LogEvent`):
``job_info`` when a step starts (``rule_name``, ``jobid``, ``wildcards``), ``job_finished``
(``job_id``), ``progress`` (``done``, ``total``), ``job_error`` (``rule_name``, ``jobid``,
``log``) and ``error`` (an exception outside any step, its text in the message).

Two displays:

- on a terminal, one line rewritten in place (every second, too, for the elapsed time):
  ``[ 7/19] segment ses-20240304, register ses-20240307  elapsed 1:02  ~2:10 left``;
- otherwise a plain line per step start and finish:
  ``[ 3/19] segment ses-20240304 done in 4.1 s  elapsed 0:21  ~0:45 left``.

The estimate of what remains is the mean duration of the finished steps times the steps left,
divided by how many steps have run at once on average (busy time / elapsed, at least 1 and at
most the cores); "estimating…" until a step has finished. The step total can grow during the
run: the sessions of a study folder are known only once its index step has run.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

#: Snakemake's event names (``LogEvent`` values) this display reads.
JOB_INFO, JOB_FINISHED, PROGRESS, RUN_INFO = "job_info", "job_finished", "progress", "run_info"
JOB_ERROR, ERROR = "job_error", "error"
#: Seconds between redraws of the terminal line when nothing happens.
TICK_S = 1.0
#: A log line that states an error: ``ERROR ...`` (the package's logging), ``ValueError: ...``.
_ERROR_LINE = re.compile(r"^(ERROR|CRITICAL)\b|^[A-Za-z_.]*(Error|Exception)\b")
#: The first line of Snakemake's exception text (``ConfigError in file "...", line 49:``) and
#: traceback lines, which do not say what went wrong.
_NOT_A_REASON = re.compile(r"^(\w+ in (file|rule) .*:|\w+:|\s+File .*|Traceback .*)$")
#: Snakemake's closing error when steps failed; the steps' own errors say more.
_JOBS_FAILED = "At least one job did not complete successfully."
#: Snakemake's message when every output is present and up to date.
_NOTHING_TO_DO = "Nothing to be done"


@dataclass
class Step:
    """One running step: Snakemake's job id, what it is (rule, session), when it started."""

    jobid: str
    label: str
    started_s: float


@dataclass(frozen=True)
class Failure:
    """Why the run failed: the step (empty when no step failed), the reason in one line, and
    the step's log file if it wrote one."""

    step: str
    reason: str
    log: str = ""


def format_clock(seconds: float) -> str:
    """``0:21``, ``12:05``, ``1:02:03`` (hours only when needed)."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_duration(seconds: float) -> str:
    """A step's duration: ``4.1 s`` below a minute, else as :func:`format_clock`."""
    return f"{seconds:.1f} s" if seconds < 60 else format_clock(seconds)


def step_label(rule: str, wildcards: Any, with_subject: bool = False) -> str:
    """``segment ses-20240304`` (``segment sub-P7 ses-20240304`` with `with_subject`)."""
    items = dict(wildcards.items()) if hasattr(wildcards, "items") else {}
    parts = [rule]
    if with_subject and items.get("subject"):
        parts.append(f"sub-{items['subject']}")
    if items.get("session"):
        parts.append(f"ses-{items['session']}")
    return " ".join(parts)


def _log_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a log, stripped; none when it is missing."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines()]
    except OSError:
        return []
    return [ln for ln in lines if ln]


def states_an_error(path: str | Path) -> bool:
    """Whether a log has a line that states an error (:data:`_ERROR_LINE`)."""
    return any(_ERROR_LINE.match(ln) for ln in _log_lines(path))


def last_meaningful_line(path: str | Path) -> str:
    """The line of a step's log that says what went wrong: the last error line (``ERROR ...``,
    ``ValueError: ...``), else the last non-empty line; its ``ERROR`` level word dropped.
    Empty when the file is missing or empty."""
    lines = _log_lines(path)
    errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
    line = (errors or lines or [""])[-1]
    return re.sub(r"^(ERROR|CRITICAL):?\s+", "", line)


def exception_reason(message: str) -> str:
    """What an ``error`` record of Snakemake says went wrong, in one line: its first line that
    is not a heading (``ConfigError in file "Snakefile", line 49:``) or a traceback line."""
    lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    reasons = [ln.strip() for ln in lines if not _NOT_A_REASON.match(ln)]
    return (reasons or [ln.strip() for ln in lines] or [""])[0]


class Progress(logging.Handler):
    """Shows a run's progress from Snakemake's log records and remembers why it failed.

    Parameters
    ----------
    stream : text stream
        Where the progress goes (the real standard error).
    tty : bool
        One line rewritten in place (a terminal), else a line per step start and finish.
    cores : int, optional
        Most steps that run at once (caps the estimate's parallelism); None: no cap.
    with_subject : bool
        Name the subject in each step (a cohort).
    clock : callable
        Seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, stream: TextIO, *, tty: bool, cores: int | None = None,
                 with_subject: bool = False, clock: Callable[[], float] = time.monotonic,
                 width: int | None = None) -> None:
        super().__init__()
        self.stream, self.tty, self.cores = stream, tty, cores
        self.with_subject, self.clock, self.width = with_subject, clock, width
        self.start_s = clock()
        self.done = 0
        self.total = 0
        self.running: dict[str, Step] = {}
        self.labels: dict[str, str] = {}  # job id -> label, also of finished steps
        self.durations_s: list[float] = []
        self.failures: list[Failure] = []
        self.errors: list[str] = []  # reasons of errors outside any step
        self.log_file = ""  # Snakemake's own log of the run
        self.nothing_to_do = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._shown = False  # a terminal line is on screen

    # -- estimate ------------------------------------------------------------------------
    def elapsed_s(self) -> float:
        return self.clock() - self.start_s

    def remaining_s(self) -> float | None:
        """Seconds left (see the module docstring); None until a step has finished."""
        if not self.durations_s:
            return None
        left = max(0, self.total - self.done)
        busy_s = sum(self.durations_s)
        parallel = busy_s / max(self.elapsed_s(), 1e-9)
        parallel = max(1.0, min(parallel, float(self.cores or parallel)))
        return busy_s / len(self.durations_s) * left / parallel

    def _timing(self) -> str:
        left = self.remaining_s()
        estimate = "estimating…" if left is None else f"~{format_clock(left)} left"
        return f"elapsed {format_clock(self.elapsed_s())}  {estimate}"

    def _counter(self, done: int) -> str:
        width = len(str(max(self.total, done, 1)))
        return f"[{done:>{width}}/{self.total or '?'}]"

    # -- records -------------------------------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self._lock:
                self._note_log_file(record)
                self._dispatch(record)
        except Exception:  # noqa: BLE001 - a display must never stop the workflow
            self.handleError(record)

    def _dispatch(self, record: logging.LogRecord) -> None:
        event = str(getattr(record, "event", "") or "")
        if event == JOB_INFO:
            self._started(record)
        elif event == JOB_FINISHED:
            self._finished(str(getattr(record, "job_id", "")))
        elif event == PROGRESS:
            self.done = int(getattr(record, "done", self.done))
            self.total = int(getattr(record, "total", self.total))
            self._redraw()
        elif event == RUN_INFO:
            stats = getattr(record, "stats", None)
            if isinstance(stats, Mapping) and "total" in stats:
                self.total = max(self.total, int(stats["total"]))
        elif event == JOB_ERROR:
            self._failed(record)
        elif event == ERROR:
            reason = exception_reason(record.getMessage())
            if reason and reason != _JOBS_FAILED:
                self.errors.append(reason)
        elif not event and record.getMessage().startswith(_NOTHING_TO_DO):
            self.nothing_to_do = True

    def _started(self, record: logging.LogRecord) -> None:
        jobid = str(getattr(record, "jobid", ""))
        label = step_label(str(getattr(record, "rule_name", "") or "step"),
                           getattr(record, "wildcards", None), self.with_subject)
        self.labels[jobid] = label
        self.running[jobid] = Step(jobid, label, self.clock())
        if self.tty:
            self._redraw()
        else:
            self._print(f"{self._counter(self.done)} {label} started  {self._timing()}")

    def _finished(self, jobid: str) -> None:
        step = self.running.pop(jobid, None)
        if step is None:
            return
        duration_s = self.clock() - step.started_s
        self.durations_s.append(duration_s)
        self.done += 1  # the progress record that follows confirms it
        if self.tty:
            self._redraw()
        else:
            self._print(f"{self._counter(self.done)} {step.label} done in "
                        f"{format_duration(duration_s)}  {self._timing()}")

    def _failed(self, record: logging.LogRecord) -> None:
        jobid = str(getattr(record, "jobid", ""))
        self.running.pop(jobid, None)
        label = self.labels.get(jobid) or step_label(
            str(getattr(record, "rule_name", "") or "step"), None)
        logs = [str(p) for p in _as_list(getattr(record, "log", None))]
        # a rule chaining steps (limbtrack steps) has a log per step: the failed one first
        logs.sort(key=lambda p: not states_an_error(p))
        reason = next((r for r in (last_meaningful_line(p) for p in logs) if r), "")
        self.failures.append(Failure(label, reason, logs[0] if logs else ""))
        if not self.tty:
            self._print(f"{self._counter(self.done)} {label} FAILED  {self._timing()}")

    def _note_log_file(self, record: logging.LogRecord) -> None:
        """Snakemake's log file: the file handler its logger writes to (kept by Snakemake)."""
        if self.log_file:
            return
        for handler in logging.getLogger(record.name).handlers:
            if isinstance(handler, logging.FileHandler):
                self.log_file = handler.baseFilename
                return

    # -- display -------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def status_line(self) -> str:
        """The terminal line: counter, running steps, elapsed, estimate."""
        running = ", ".join(s.label for s in self.running.values()) or (
            "waiting" if self.labels else "preparing the workflow")
        return f"{self._counter(self.done)} {running}  {self._timing()}"

    def _redraw(self) -> None:
        if not self.tty:
            return
        width = self.width or shutil.get_terminal_size().columns
        line = self.status_line()
        if len(line) > width - 1:
            line = line[: max(width - 2, 0)] + "…"
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._shown = True

    def start(self) -> None:
        """Start redrawing the terminal line every :data:`TICK_S` (elapsed time moves)."""
        if self.tty and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="limbtrack-progress",
                                            daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                self._redraw()

    def stop(self) -> None:
        """Stop redrawing; on a terminal, leave the steps done and the time taken."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self._shown:
                self.stream.write(f"\r\x1b[K{self._counter(self.done)} steps done  "
                                  f"elapsed {format_clock(self.elapsed_s())}\n")
                self.stream.flush()
                self._shown = False

    # -- outcome -------------------------------------------------------------------------
    def failure(self) -> Failure | None:
        """The first failed step, else the first error outside any step, else None."""
        if self.failures:
            first = self.failures[0]
            return first if first.reason else Failure(
                first.step, self.errors[0] if self.errors else "no reason in its log",
                first.log)
        if self.errors:
            return Failure("", self.errors[0])
        return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [value]
    return list(value) if isinstance(value, Iterable) else [value]
