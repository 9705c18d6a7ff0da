"""``limbtrack`` command: one subcommand per stage, each the same ``main(argv)`` a rule calls.

:data:`COMMANDS` is the one map from subcommand to module: the workflow's rules run
``python -m pipeline.cli <subcommand> ...`` (the Snakefile's ``LIMBTRACK``), never a module.

Examples::

    limbtrack phantom sample_data/demo          # the demo patient (DICOM + truth)
    limbtrack index --input-dir DIR --out-dir OUT
    limbtrack convert --sessions-json OUT/sessions.json --session 20240225 --subject demo \
        --out-dir D
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from pipeline import __version__

COMMANDS = {
    "run": ("pipeline.run",
            "the whole workflow on a study folder (or --cohort sheet), with progress"),
    "listen": ("pipeline.node.listen", "DICOM node: receive MR studies, run the workflow per "
               "patient, send SEG, SR and PDF back"),
    "phantom": ("pipeline.validation.phantom",
                "write a serial bilateral thigh MRI phantom with ground truth"),
    "index": ("pipeline.io.dicom_index", "index a DICOM folder and select series per study"),
    "convert": ("pipeline.io.convert", "convert a session's series to NIfTI + JSON sidecars"),
    "nifti": ("pipeline.io.nifti_input",
              "index (nifti index) or convert (nifti convert) a NIfTI sessions sheet"),
    "segment": ("pipeline.segment", "segment one session into a label map"),
    "register": ("pipeline.register", "register a session to the baseline (rigid)"),
    "measure": ("pipeline.measure", "volumes per session, side and structure"),
    "longitudinal": ("pipeline.longitudinal", "asymmetry, change, response pattern, summary"),
    "report": ("pipeline.report.build", "the self-contained HTML report of a subject"),
    "cohort": ("pipeline.report.cohort", "the cohort table and page of several subjects"),
    "export": ("pipeline.export.session",
               "label tables, BIDS dataset files, DICOM SEG + SR (export tables|dataset|dicom)"),
    "research": ("pipeline.export.research", "de-identified export with shifted dates"),
    "steps": ("pipeline.steps", "several commands in one process, each with its own log "
              "(a rule chaining steps)"),
}


def usage() -> str:
    lines = [
        f"limbtrack {__version__}: longitudinal limb volumetry on serial MRI",
        "",
        "usage: limbtrack COMMAND [options]   (limbtrack COMMAND --help for options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "One command: limbtrack run STUDY_DIR --day0 YYYY-MM-DD [--side left|right|auto]",
        "The whole workflow: snakemake --cores 2 --config input_dir=PATH subject=ID "
        "day0=YYYY-MM-DD affected_side=left|right|auto results_dir=PATH",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] == "--version":
        print(f"limbtrack {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"limbtrack: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
