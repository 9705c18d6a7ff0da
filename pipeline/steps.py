"""``limbtrack steps``: several subcommands in one process, one after the other (issue 16).

A job pays Python's start-up and its step's imports before it does anything (convert 0.8 s,
segment 1.2 s, report 1.3 s of CPU), and on SLURM every job also runs Snakemake inside its
allocation (2.2 s). Steps that always follow each other on the same files — a session's
convert and segment, a subject's measure, longitudinal and report — run as one rule that calls
this command, so the imports they share are paid once and there is one job instead of three.
Nothing is lost: the steps were a chain (no parallelism between them), and a failed later step
fails the job, which Snakemake then re-runs whole (the earlier steps are the cheap ones).

Each step is exactly the subcommand a rule would run alone (:data:`pipeline.cli.COMMANDS`),
its output (stdout and stderr, at the file-descriptor level, so worker processes' output too)
in its own log, as ``limbtrack CMD ... > LOG 2>&1`` would write it. Each step finds the root
logger as a fresh process has it (no handlers, level WARNING), and the warning filters are put
back after it. The first step that fails (non-zero exit or an exception, its traceback
in its log) stops the chain: the steps after it are not run and their logs say so, and the
command exits with that step's status.

    limbtrack steps --log convert.log --log segment.log -- \\
        convert --sessions-json S --session 20240304 ... :: segment --t1 T1 --fluid F ...
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

#: Separates one step's command line from the next.
SEPARATOR = "::"
USAGE = ("usage: limbtrack steps --log LOG [--log LOG ...] -- COMMAND [ARGS] "
         f"[{SEPARATOR} COMMAND [ARGS] ...]   (one --log per command, in order)")


def parse(argv: Sequence[str]) -> list[tuple[list[str], Path]]:
    """``[(command line, log path), ...]`` from ``--log A --log B -- cmd1 ... :: cmd2 ...``.

    Raises ValueError naming what is wrong."""
    args = list(argv)
    logs: list[Path] = []
    while args and args[0] == "--log":
        if len(args) < 2:
            raise ValueError("--log needs a file")
        logs.append(Path(args[1]))
        del args[:2]
    if not args or args[0] != "--":
        raise ValueError("the commands follow '--'")
    commands: list[list[str]] = [[]]
    for arg in args[1:]:
        if arg == SEPARATOR:
            commands.append([])
        else:
            commands[-1].append(arg)
    if any(not c for c in commands):
        raise ValueError(f"an empty command (two '{SEPARATOR}' in a row, or one at an end)")
    if len(logs) != len(commands):
        raise ValueError(f"{len(commands)} commands but {len(logs)} --log files")
    return list(zip(commands, logs, strict=True))


@contextmanager
def output_to(log: Path) -> Iterator[None]:
    """stdout and stderr into ``log`` (truncated), put back afterwards: file descriptors 1 and
    2 (what child processes and C libraries write) and Python's ``sys.stdout``/``sys.stderr``
    (new line-buffered streams on them, whatever the process had there)."""
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = os.dup(1), os.dup(2)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    sys.stdout, sys.stderr = (open(fd, "w", encoding="utf-8", errors="backslashreplace",
                                   buffering=1, closefd=False) for fd in (1, 2))
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.close()  # flushes; the descriptor stays open (closefd=False)
        sys.stdout, sys.stderr = streams
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


@contextmanager
def fresh_logging() -> Iterator[None]:
    """The root logger as a fresh process has it (no handlers, level WARNING) while a step
    runs, and the warning filters; as they were before afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        try:
            yield
        finally:
            for handler in list(root.handlers):
                root.removeHandler(handler)
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(level)


def run_step(command: Sequence[str], log: Path) -> int:
    """One subcommand, its output in ``log``; its exit status (1 for an exception)."""
    from pipeline import cli

    with output_to(log), fresh_logging():
        try:
            return cli.main(list(command))
        except SystemExit as exc:  # argparse errors, explicit exits
            code = exc.code
            if code is None:
                return 0
            if isinstance(code, int):
                return code
            print(code, file=sys.stderr)
            return 1
        except Exception:
            traceback.print_exc()
            return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{(__doc__ or '').strip()}")
        return 0
    try:
        chain = parse(args)
    except ValueError as exc:
        print(f"limbtrack steps: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    for i, (command, log) in enumerate(chain):
        status = run_step(command, log)
        if status:
            for _, later_log in chain[i + 1:]:
                later_log.parent.mkdir(parents=True, exist_ok=True)
                later_log.write_text(f"not run: {command[0]} failed before it (exit status "
                                     f"{status}; see {log})\n", encoding="utf-8")
            print(f"limbtrack steps: {command[0]} failed (exit status {status}), step "
                  f"{i + 1} of {len(chain)}; its log: {log}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
