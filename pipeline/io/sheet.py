"""A NIfTI sessions sheet as a subject's input: its columns, and how it is recognised.

Kept apart from :mod:`pipeline.io.nifti_input` (which reads the images, with nibabel) because
the Snakefile needs only these: every Snakemake process imports :mod:`pipeline.workflow`, on a
SLURM cluster one per job, and nibabel (with the pydicom and scipy it imports) cost each of
them ~0.3 s of CPU (a dry run of the demo: 2.2 -> 1.94 s; issue 16).
"""

from __future__ import annotations

from pathlib import Path

SHEET_COLUMNS = ("subject", "study_date", "role", "path")


def is_sessions_sheet(input_path: str | Path) -> bool:
    """True when the subject's input is a sessions sheet (a .tsv file), not a study folder."""
    p = Path(input_path)
    return p.suffix.lower() == ".tsv" and p.is_file()
