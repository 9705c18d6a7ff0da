"""A job imports what its step uses (issue 16: every job pays its imports at start-up).

Each case starts a fresh Python, imports ``pipeline.cli`` and the module of one ``limbtrack``
subcommand (as a rule's job does before its step runs) and checks that a heavy package the
step does not use is not imported. What a step costs in CPU is measured by
benchmarks/cohort_speed.py, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cli import COMMANDS

# (subcommand, packages its module must not import at start-up, why it needs none of them)
CASES = [
    # the chain of steps imports each step's module when it runs it, nothing before
    ("steps", ("numpy", "SimpleITK", "nibabel", "pydicom", "matplotlib", "scipy")),
    # label maps are read with SimpleITK; nibabel (with pydicom, which nibabel imports) is
    # for measure_label_map only, which the step does not call
    ("measure", ("nibabel", "pydicom")),
    # export tables and export dataset write text files; nibabel and pydicom are for the
    # DICOM export (export dicom) only
    ("export", ("nibabel", "pydicom", "highdicom", "numpy")),
    # the cohort table is text: no image or array package
    ("cohort", ("numpy", "SimpleITK", "nibabel", "pydicom", "matplotlib")),
    # the response rules need no images
    ("longitudinal", ("SimpleITK", "nibabel", "pydicom", "matplotlib", "scipy")),
    # registration reads NIfTI with SimpleITK
    ("register", ("nibabel", "pydicom", "matplotlib", "scipy")),
    # the report draws with matplotlib and reads images with SimpleITK
    ("report", ("nibabel", "pydicom", "scipy")),
]


def imported_at_startup(command: str) -> set[str]:
    """Top-level packages in sys.modules after importing the subcommand's module."""
    return imported_by(f"pipeline.cli, {COMMANDS[command][0]}")


def imported_by(modules: str) -> set[str]:
    """Top-level packages in sys.modules after ``import <modules>`` in a fresh Python."""
    code = (f"import json, sys, {modules}; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return set(json.loads(out))


@pytest.mark.parametrize(("command", "absent"), CASES, ids=[c for c, _ in CASES])
def test_step_does_not_import_what_it_does_not_use(command: str, absent: tuple[str, ...]
                                                   ) -> None:
    loaded = imported_at_startup(command)
    assert COMMANDS[command][0].split(".")[0] in loaded  # the module itself was imported
    unexpected = sorted(loaded & set(absent))
    assert not unexpected, f"limbtrack {command} imports {unexpected} at start-up"


def test_snakefile_helpers_import_no_array_or_image_package() -> None:
    """Every Snakemake process imports pipeline.workflow (the Snakefile's helpers): on a SLURM
    cluster one per job, so nibabel there (with pydicom and scipy) cost each ~0.3 s."""
    loaded = imported_by("pipeline.workflow")
    unexpected = sorted(loaded & {"numpy", "nibabel", "pydicom", "scipy", "SimpleITK"})
    assert not unexpected, f"pipeline.workflow imports {unexpected}"
