"""Names of the workflow's per-session files: ``sub-<subject>_ses-<session>_<suffix>``."""

from __future__ import annotations

import os
from pathlib import Path


def session_of(path: str | os.PathLike[str]) -> str:
    """The session label in a file name ``..._ses-<label>_...``; '' when the name has none."""
    name = Path(path).name
    return name.split("_ses-")[1].split("_")[0] if "_ses-" in name else ""
