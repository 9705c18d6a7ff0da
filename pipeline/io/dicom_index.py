"""The ``limbtrack index`` step: index a DICOM export folder and pick, per study, the series
the workflow analyses.

Every file under the input folder is opened once, header only
(``pydicom.dcmread(path, stop_before_pixels=True)``). Files that are not DICOM images
(text files, ``DICOMDIR``, structured reports, empty files, ...) are listed as problems, never
silently dropped. Image files are grouped by StudyInstanceUID, SeriesInstanceUID and study
date; the files of a series must agree in acquisition and patient
(:func:`pipeline.io.scan.series_agreement`) before they are stacked. Each series gets a
sequence class (:func:`pipeline.io.classify.classify_sequence`), an orientation and a geometry
summary. Studies are grouped into patients (:func:`pipeline.io.identity.group_patients`): one
subject is one patient, and a folder holding several is refused unless the patient to use is
named. :func:`pipeline.io.selection.select_sessions` then picks, per study, one anatomical
(T1-weighted) and one fluid-sensitive series (STIR, else T2 fat-saturated, else Dixon water).

A study is keyed by (patient, StudyInstanceUID, study date): a StudyInstanceUID that an export
reuses on two dates gives two studies, each used or refused with its reason.

The input folder is read-only: nothing is ever written into it.

Command line::

    python -m pipeline.io.dicom_index --input-dir DIR --out-dir OUT \
        [--anatomical-regex R] [--fluid-regex R] [--patient ID_OR_FINGERPRINT] [--show-phi]

writes ``index.tsv``, ``problems.tsv``, ``sessions.json`` and ``sessions.tsv`` into OUT.
No patient name, ID or birth date reaches any output; patients are told apart by a
pseudonymous fingerprint (:func:`pipeline.io.identity.patient_fingerprint`). ``--show-phi``
only adds them to the table of patients printed (to the log) when a folder holds several.

Where the work is done: :mod:`pipeline.io.scan` (the folder), :mod:`pipeline.io.headers` (one
file), :mod:`pipeline.io.classify` (sequence class), :mod:`pipeline.io.identity` (patients),
:mod:`pipeline.io.records` (what is found), :mod:`pipeline.io.selection` (what is used, and
the outputs).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.io.files import is_within
from pipeline.io.records import IndexResult
from pipeline.io.scan import index_folder
from pipeline.io.selection import (
    patient_warnings,
    patients_table,
    same_day_warnings,
    select_sessions,
    split_by_patient,
    split_warnings,
    write_outputs,
)

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (0 when at least one session is usable;
    1 when none is, or when the folder holds several patients and none is named; 2 for
    wrong arguments)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    error = _argument_error(args)
    if error is not None:
        print(f"ERROR {error}", file=sys.stderr)
        return 2

    result = index_folder(args.input_dir)
    series, chosen, not_used, patient_error = split_by_patient(result, args.patient)
    sessions, refused = select_sessions(series, args.anatomical_regex, args.fluid_regex)
    refused = refused + not_used
    warnings = [*result.warnings, *patient_warnings(chosen), *same_day_warnings(sessions),
                *split_warnings(sessions)]
    write_outputs(result, sessions, refused, args.out_dir, chosen=chosen, warnings=warnings)
    log.info("%s: %d files, %d DICOM, %d series, %d problem files, %d patient(s), "
             "%d sessions, %d studies refused", result.input_dir, result.n_files_seen,
             result.n_files_dicom, len(result.series), len(result.problems),
             len(result.patients), len(sessions), len(refused))
    for warning in warnings:
        log.warning("%s", warning)
    if patient_error or not sessions:
        kept = keep_tables(args.out_dir)
    if patient_error:
        print(f"ERROR {result.input_dir}: {patient_error}. Name the patient to use with the "
              "config key `patient` (index: --patient), giving its fingerprint or its "
              "PatientID; the other patients' studies are then listed as not used. Patients "
              f"in the folder:\n{patients_table(result.patients, args.show_phi)}",
              file=sys.stderr)
        return 1
    if len(result.patients) > 1:
        log.info("patients in the folder:\n%s", patients_table(
            result.patients, args.show_phi, (g.fingerprint for g in chosen)))
    if not sessions:
        print(f"ERROR {result.input_dir}: {_no_session_reason(result, refused)}. Every series "
              f"with its class and why it was not used: {kept}; --anatomical-regex / "
              "--fluid-regex can name the series explicitly.", file=sys.stderr)
        print(Path(kept).read_text(encoding="utf-8"), file=sys.stderr)
        return 1
    return 0


#: Where a failed index keeps its tables: Snakemake removes a failed step's outputs (index.tsv,
#: problems.tsv) but never its log folder, so the user can still read why each series was refused.
KEPT_TABLES_DIR = "logs"


def keep_tables(out_dir: Path) -> Path:
    """Copy index.tsv and problems.tsv into ``out_dir/logs/`` (kept when the step fails);
    returns the kept index.tsv."""
    kept_dir = out_dir / KEPT_TABLES_DIR
    kept_dir.mkdir(parents=True, exist_ok=True)
    for name in ("index.tsv", "problems.tsv"):
        if (out_dir / name).exists():
            shutil.copyfile(out_dir / name, kept_dir / name)
    return kept_dir / "index.tsv"


def _parser() -> argparse.ArgumentParser:
    """The command line of the index step."""
    parser = argparse.ArgumentParser(
        prog="limbtrack index",
        description="Index a DICOM export folder and select the series to analyse per study.")
    parser.add_argument("--input-dir", required=True, type=Path,
                        help="folder of the DICOM export (read-only)")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the outputs")
    parser.add_argument("--anatomical-regex", default=None,
                        help="SeriesInstanceUID or regex on SeriesDescription of the anatomical "
                             "(T1-weighted) series")
    parser.add_argument("--fluid-regex", default=None,
                        help="SeriesInstanceUID or regex on SeriesDescription of the "
                             "fluid-sensitive series")
    parser.add_argument("--patient", default=None,
                        help="the patient to use when the folder holds several: its "
                             "fingerprint (as listed when the index refuses the folder) or "
                             "its PatientID; the other patients' studies are listed as not "
                             "used")
    parser.add_argument("--show-phi", action="store_true",
                        help="list PatientID, name and birth date in the table of patients "
                             "printed when a folder holds several (never in output files)")
    return parser


def _argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (an invalid override, a missing input folder, an
    output folder inside the input), else None."""
    for name, pattern in (("--anatomical-regex", args.anatomical_regex),
                          ("--fluid-regex", args.fluid_regex)):
        if pattern:
            try:
                re.compile(pattern)
            except re.error as err:
                return f"{name} {pattern!r} is not a valid regular expression: {err}"
    input_dir: Path = args.input_dir
    if not input_dir.is_dir():
        return f"{input_dir}: input folder does not exist or is not a folder"
    if is_within(args.out_dir, input_dir):
        return (f"{args.out_dir}: the output folder lies inside the input folder "
                f"{input_dir}, which is read-only to the workflow; choose another --out-dir")
    return None


def _no_session_reason(result: IndexResult, refused: Sequence[dict[str, Any]]) -> str:
    """Why a folder gives no session: no image series, or each study's refusal (first five)."""
    if not result.series:
        return (f"no DICOM image series found ({result.n_files_seen} files, "
                f"{len(result.problems)} listed in problems.tsv)")
    listed = [f"study {r['study_date'] or 'without date'}: {r['reason']}"
              for r in refused[:5]]
    if len(refused) > 5:
        listed.append(f"{len(refused) - 5} more studies in sessions.json")
    return ("no study with both a T1-weighted and a fluid-sensitive series and a valid "
            "study date (" + "; ".join(listed) + ")")


if __name__ == "__main__":
    sys.exit(main())
