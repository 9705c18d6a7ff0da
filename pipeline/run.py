"""``limbtrack run``: the whole workflow on a study folder (or a subjects sheet) in one command.

Usage::

    limbtrack run STUDY_DIR --day0 YYYY-MM-DD [--side left|right|auto] [--subject ID]
        [--patient FINGERPRINT|PATIENTID] [--events FILE] [--results DIR] [--cores N]
        [--profile DIR]
    limbtrack run --cohort subjects.tsv [--results DIR] [--cores N] [--profile DIR]

It runs the same Snakemake workflow as the documented command line::

    snakemake --cores N --config input_dir=STUDY_DIR subject=ID day0=DATE \\
        affected_side=SIDE results_dir=DIR [events=FILE] [patient=...]

(``subjects_sheet=`` with ``--cohort``), in this process through Snakemake's own argument
parser and API (:func:`snakemake.cli.parse_args`, :func:`snakemake.cli.args_to_api`), so a
``--profile`` acts exactly as on the command line. The working folder is the repository (the
Snakefile's folder), where ``config/config.yaml`` and Snakemake's state (``.snakemake/``)
live, as for the documented command; the paths given here are made absolute first, relative to
the folder ``limbtrack run`` was started in. ``--rerun-incomplete`` is always on: a run that was
killed is resumed by running the same command again.

A cohort of more than 16 subjects runs in two passes (:func:`pipeline.workflow.index_first`):
every subject's index (its ``sessions.json`` as targets,
:func:`pipeline.workflow.index_targets`), then the rest, so that Snakemake knows every
subject's sessions when it builds its DAG and plans the cohort once instead of after each
subject's index; it keeps going past a failed subject (``--keep-going``), which is listed
with its reason in the cohort table.

Progress (:mod:`pipeline.progress`) goes to standard error; Snakemake's own messages go only to
its log file (``.snakemake/log/``), named when the run fails. At the end the report's path is
printed (``<results>/<subject>/report.html``; ``<results>/cohort.html`` for a cohort) and the
exit status is 0; a failed run exits 1 with one line naming the failing step and the reason
from its log. Wrong arguments exit 2.

The subject ID defaults to a pseudonym of the patient, never the name: ``P`` followed by the
patient fingerprint (:func:`pipeline.io.identity.patient_fingerprint`, salted PBKDF2) of the
PatientID of the folder's patient. A folder holding several patients is refused as the index
refuses it (its table of patients by fingerprint), unless ``--patient`` names one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pipeline
from pipeline.io.files import read_tsv
from pipeline.io.identity import patient_fingerprint
from pipeline.io.sheet import is_sessions_sheet
from pipeline.progress import Progress
from pipeline.workflow import (
    DATE_RE,
    SIDES,
    SUBJECT_RE,
    ConfigError,
    index_first,
    index_targets,
    load_subjects,
)

#: The repository: the Snakefile and the working folder of every run.
REPO_ROOT = Path(pipeline.__file__).resolve().parents[1]
SNAKEFILE = REPO_ROOT / "Snakefile"
#: Prefix of a subject ID derived from the patient fingerprint (IDs must start the same way).
SUBJECT_PREFIX = "P"
#: Columns of the subjects sheet that hold paths.
SHEET_PATH_COLUMNS = ("input_dir", "events")


class RunError(ValueError):
    """An argument that cannot work, said in words the user can act on (exit status 2)."""


@dataclass(frozen=True)
class RunPlan:
    """What a run does: the Snakemake config, where its report will be, how it runs.

    Attributes
    ----------
    config : dict of str to str
        Snakemake config keys (``input_dir``, ``subject``, ..., or ``subjects_sheet``).
    report : Path
        The report written at the end (a subject's report.html, or cohort.html).
    cores : str or None
        ``--cores`` (a number or ``all``); None leaves it to the profile.
    profile : str or None
        ``--profile`` (a folder, absolute; or a profile name).
    cohort : bool
        A subjects sheet (progress then names the subject of each step).
    """

    config: dict[str, str]
    report: Path
    cores: str | None
    profile: str | None
    cohort: bool = False


# ------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="limbtrack run",
        description="Run the whole workflow on one patient's study folder (or a subjects "
                    "sheet), show its progress, and print where the report is.")
    parser.add_argument("study_dir", nargs="?", metavar="STUDY_DIR",
                        help="the patient's DICOM study folder (any nesting), or a NIfTI "
                             "sessions sheet (.tsv; then --subject is needed)")
    parser.add_argument("--day0", type=_date, help="infusion day (day 0), YYYY-MM-DD "
                        "(required unless --cohort)")
    parser.add_argument("--side", choices=SIDES, default=None,
                        help="the affected side (default: auto, decided from the images)")
    parser.add_argument("--subject", help="subject ID, letters and digits (default: P + the "
                        "pseudonymous fingerprint of the DICOM PatientID)")
    parser.add_argument("--patient", help="the patient to use when the folder holds several: "
                        "its fingerprint (as listed) or its PatientID")
    parser.add_argument("--events", help="clinical events TSV (default: events.tsv at the "
                        "top of the study folder, if present)")
    parser.add_argument("--results", default="results",
                        help="results folder; outputs go to RESULTS/SUBJECT/ "
                             "(default: ./results)")
    parser.add_argument("--cohort", metavar="SUBJECTS_TSV",
                        help="run every subject of a subjects sheet (subject, input_dir, "
                             "day0, affected_side[, events, patient]) instead of STUDY_DIR")
    parser.add_argument("--cores", type=_cores, default=None,
                        help="cores to use (default: all, or the profile's)")
    parser.add_argument("--profile", help="a Snakemake profile folder (e.g. profiles/slurm)")
    return parser


def _date(text: str) -> str:
    try:
        if not DATE_RE.fullmatch(text):
            raise ValueError(text)
        dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None
    return text


def _cores(text: str) -> str:
    if text == "all" or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a number of cores (or 'all')")


def _absolute(path: str, cwd: Path) -> str:
    return str((cwd / Path(path).expanduser()).resolve())


def plan_run(args: argparse.Namespace, cwd: Path) -> RunPlan:
    """The run the arguments ask for (RunError if they cannot work); paths made absolute
    relative to `cwd`."""
    if bool(args.cohort) == bool(args.study_dir):
        raise RunError("give a study folder (STUDY_DIR) or --cohort SUBJECTS_TSV, one of them")
    results = Path(_absolute(args.results, cwd))
    if args.cohort:
        config = _cohort_config(args, cwd)
        report = results / "cohort.html"
    else:
        config = _subject_config(args, cwd)
        report = results / config["subject"] / "report.html"
    config["results_dir"] = str(results)
    cores = args.cores or (None if args.profile else "all")
    profile = args.profile
    if profile and (cwd / profile).exists():  # a folder; else a profile name Snakemake finds
        profile = _absolute(profile, cwd)
    return RunPlan(config, report, cores, profile, cohort=bool(args.cohort))


def _subject_config(args: argparse.Namespace, cwd: Path) -> dict[str, str]:
    """Config keys of one subject: input_dir, subject, day0, affected_side (events, patient)."""
    if not args.day0:
        raise RunError("--day0 YYYY-MM-DD (the infusion day) is required")
    study = Path(_absolute(args.study_dir, cwd))
    if not (study.is_dir() or is_sessions_sheet(study)):
        raise RunError(f"{study}: not a folder (a DICOM study folder) nor a .tsv sessions "
                       "sheet (NIfTI input)")
    subject = args.subject or default_subject(study, args.patient or "")
    if not SUBJECT_RE.fullmatch(subject):
        raise RunError(f"--subject {subject!r} must be letters and digits only (it becomes "
                       "part of file names)")
    config = {"input_dir": str(study), "subject": subject, "day0": args.day0,
              "affected_side": args.side or "auto"}
    if args.events:
        config["events"] = _absolute(args.events, cwd)
        if not Path(config["events"]).is_file():
            raise RunError(f"--events {config['events']}: no such file")
    if args.patient:
        config["patient"] = args.patient
    return config


def _cohort_config(args: argparse.Namespace, cwd: Path) -> dict[str, str]:
    """Config keys of a cohort: subjects_sheet (the sheet holds everything per subject)."""
    given = [f"--{name}" for name in ("day0", "side", "subject", "patient", "events")
             if getattr(args, name)]
    if given:
        raise RunError(f"{', '.join(given)}: given per subject in the subjects sheet, not "
                       "with --cohort")
    sheet = Path(_absolute(args.cohort, cwd))
    try:
        rows = read_tsv(sheet)
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"--cohort {sheet}: cannot be read ({err})") from None
    relative = sorted({row[c] for row in rows for c in SHEET_PATH_COLUMNS
                       if row.get(c) and not Path(row[c]).is_absolute()})
    if relative and cwd.resolve() != REPO_ROOT:
        raise RunError(f"{sheet}: relative paths ({', '.join(relative[:3])}) are read from "
                       f"the repository folder {REPO_ROOT}, as with the snakemake command; "
                       "write absolute paths in the sheet, or run from that folder")
    return {"subjects_sheet": str(sheet)}


# ------------------------------------------------------------------------------------------
# the subject's default ID
# ------------------------------------------------------------------------------------------

def subject_from_patient_id(patient_id: str) -> str:
    """``P`` + the patient fingerprint of a (normalised) PatientID: a pseudonym that is the
    same for the patient on every run and machine and holds letters and digits only."""
    return SUBJECT_PREFIX + patient_fingerprint(patient_id, None, None)


def default_subject(study_dir: Path, patient: str = "") -> str:
    """The subject ID of a study folder's patient (:func:`subject_from_patient_id`).

    The folder is indexed (read-only) and its patients found as the index step finds them;
    a folder of several patients needs `patient` (a fingerprint or PatientID, as for the
    index). RunError when no ID can be derived (no image series, no PatientID, a sheet).
    """
    if is_sessions_sheet(study_dir):
        raise RunError(f"{study_dir}: a NIfTI sessions sheet carries no patient ID; give "
                       "--subject ID")
    from pipeline.io.scan import index_folder  # only here: reads every header
    from pipeline.io.selection import choose_patient, patients_table

    result = index_folder(study_dir)
    if not result.patients:
        raise RunError(
            f"{study_dir}: no DICOM image series found ({result.n_files_seen} files, "
            f"{result.n_files_dicom} DICOM), so no patient to name the subject after; is it "
            "the study folder? (with --subject ID the index step runs and lists every file it "
            "could not use)")
    chosen, error = choose_patient(result.patients, patient or None)
    if error:
        raise RunError(
            f"{study_dir}: {error}. Name the patient to run with --patient (its fingerprint "
            f"or its PatientID); patients in the folder:\n"
            f"{patients_table(result.patients)}")
    ids = sorted({m.patient_id for g in chosen for m in g.members if m.patient_id})
    if len(ids) != 1:
        raise RunError(f"{study_dir}: the patient has {'no' if not ids else 'more than one'} "
                       "PatientID to derive a pseudonymous subject ID from; give --subject ID")
    return subject_from_patient_id(ids[0])


# ------------------------------------------------------------------------------------------
# running Snakemake
# ------------------------------------------------------------------------------------------

def _config_value(value: str) -> str:
    """A ``--config`` value that Snakemake reads back as this very text.

    Snakemake's parser tries int, float and bool before YAML (``0012345`` would become the
    number 12345, a subject ``0042`` the folder ``42``) and strips quote characters at both
    ends; an explicit YAML string, single-quoted, followed by a space, survives both."""
    return "!!str '" + value.replace("'", "''") + "' "


def snakemake_args(plan: RunPlan, targets: Sequence[str] = ()) -> list[str]:
    """Snakemake's command-line arguments of a run (without the program name): the
    `targets` (default: the Snakefile's ``all``) and the options. A cohort keeps going past
    a failed subject."""
    args = [*targets, "--snakefile", str(SNAKEFILE), "--directory", str(REPO_ROOT),
            "--rerun-incomplete", "--nocolor"]
    if plan.cohort:
        args.append("--keep-going")
    if plan.cores:
        args += ["--cores", plan.cores]
    if plan.profile:
        args += ["--profile", plan.profile]
    args += ["--config", *(f"{k}={_config_value(v)}" for k, v in plan.config.items())]
    return args


def execute(args: Sequence[str], progress: Progress) -> tuple[bool, str]:
    """Run Snakemake in this process with `args`, `progress` reading its log records.

    Returns whether it succeeded and what Snakemake wrote to its own stream (kept out of the
    terminal: its log file holds the same)."""
    from snakemake import cli as snakemake_cli  # only here: a slow import

    parser, parsed = snakemake_cli.parse_args(list(args))
    # Snakemake replaces the handlers of "snakemake.logging" when it starts; its records
    # reach the parent logger's handlers all the same.
    logger = logging.getLogger("snakemake")
    logger.addHandler(progress)
    progress.start()
    stream = io.StringIO()
    try:
        with contextlib.redirect_stderr(stream):  # Snakemake's stream handler writes there
            ok = bool(snakemake_cli.args_to_api(parsed, parser))
    finally:
        progress.stop()
        logger.removeHandler(progress)
    return ok, stream.getvalue()


def failure_lines(progress: Progress, snakemake_output: str) -> list[str]:
    """What to print when a run failed: one line with the failing step and the reason, then
    where the logs are."""
    failure = progress.failure()
    if failure is None:
        last = [ln.strip() for ln in snakemake_output.splitlines() if ln.strip()]
        reason = last[-1] if last else "Snakemake stopped without saying why"
        lines = [f"limbtrack run: failed: {reason}"]
    else:
        where = f"step {failure.step} failed" if failure.step else "failed"
        more = len(progress.failures) - 1
        also = f" (and {more} more failed step{'s' if more > 1 else ''})" if more > 0 else ""
        lines = [f"limbtrack run: {where}: {failure.reason}{also}"]
        if failure.log:
            lines.append(f"  step log: {failure.log}")
    if progress.log_file:
        lines.append(f"  Snakemake's log: {progress.log_file}")
    return lines


def _cores_number(cores: str | None) -> int | None:
    if cores == "all":
        return os.cpu_count()
    return int(cores) if cores else None


def main(argv: Sequence[str] | None = None) -> int:
    """``limbtrack run``: 0 when the report was written, 1 when the run failed, 2 for
    arguments that cannot work."""
    args = _parser().parse_args(argv)
    try:
        plan = plan_run(args, Path.cwd())
    except RunError as err:
        print(f"limbtrack run: {err}", file=sys.stderr)
        return 2
    stderr = sys.stderr

    def new_progress() -> Progress:
        return Progress(stderr, tty=stderr.isatty(), cores=_cores_number(plan.cores),
                        with_subject=plan.cohort)

    try:
        if plan.cohort:
            # Every subject's index first, then the rest: the second run knows every
            # subject's sessions when it builds its DAG (pipeline.workflow.index_first_advice).
            # A subject whose index failed is tried again there, and reported there.
            try:
                subjects = load_subjects(plan.config)
            except ConfigError:
                subjects = {}  # the second run says what is wrong with the sheet
            if index_first(len(subjects)):
                targets = index_targets(plan.config["results_dir"], subjects)
                execute(snakemake_args(plan, targets), new_progress())
        progress = new_progress()
        ok, output = execute(snakemake_args(plan), progress)
    except KeyboardInterrupt:
        print("limbtrack run: interrupted; run the same command again to resume",
              file=stderr)
        return 130
    return _outcome(plan, progress, ok, output)


def _outcome(plan: RunPlan, progress: Progress, ok: bool, output: str) -> int:
    """Say how the run ended (the report's path on standard output) and give the exit
    status."""
    if not ok:
        for line in failure_lines(progress, output):
            print(line, file=sys.stderr)
        if plan.cohort and plan.report.is_file():  # rewritten by the Snakefile's onerror
            print(f"  cohort page (failed subjects with their reason): {plan.report}",
                  file=sys.stderr)
        return 1
    if not plan.report.is_file():
        print(f"limbtrack run: the workflow finished but wrote no report {plan.report}",
              file=sys.stderr)
        return 1
    if progress.nothing_to_do:
        print("Nothing to do: the results are up to date.", file=sys.stderr)
    print(f"Report: {plan.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
