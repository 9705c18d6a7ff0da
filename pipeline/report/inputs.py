"""The files one subject report reads, each named by the caller.

The report rule passes every input it declares (``--summary``, ``--longitudinal``, ... and the
per-session ``--fluid``, ``--t1``, ``--dseg``, ``--tfm``, ``--xfm``); nothing is searched for.
Per-session files are matched to the sessions of ``summary.json`` by the ``_ses-<label>_``
entity of their names (:func:`pipeline.names.session_of`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from pipeline.io.files import read_tsv
from pipeline.names import session_of

#: Per-session inputs: keyword -> what the file is (for messages).
SESSION_FILES: dict[str, str] = {
    "fluid": "fluid-sensitive image",
    "t1": "T1 image",
    "dseg": "label map",
    "tfm": "registration transform (_xfm.tfm)",
    "xfm": "registration result (_xfm.json)",
}


def by_session(paths: Iterable[str | Path], what: str) -> dict[str, Path]:
    """`paths` keyed by the session label in their names; a name without one, or a second
    file of one session, is refused (the caller passed the wrong files)."""
    out: dict[str, Path] = {}
    for p in map(Path, paths):
        label = session_of(p)
        if not label:
            raise ValueError(f"{p}: {what} without _ses-<label>_ in its name "
                             "(expected sub-<subject>_ses-<label>_<suffix>)")
        if label in out:
            raise ValueError(f"{p}: a second {what} of session {label} (also {out[label]})")
        out[label] = p
    return out


@dataclass(frozen=True)
class ReportInputs:
    """Every file the subject report reads. Tables other than ``summary`` may be None (the
    report then says what is missing); per-session files are keyed by session label."""

    summary: Path
    longitudinal: Path | None = None
    volumes: Path | None = None
    index: Path | None = None
    problems: Path | None = None
    csa: Path | None = None
    circumference: Path | None = None
    #: the index's sessions.json: where each session's DICOM files are (read for --show-phi)
    sessions_json: Path | None = None
    sessions: Mapping[str, Mapping[str, Path]] = field(default_factory=dict)

    @classmethod
    def of(cls, summary: str | Path, **files: Any) -> ReportInputs:
        """From paths: the tables by name, the keys of :data:`SESSION_FILES` as lists."""
        per_session = {k: by_session(files.pop(k, None) or (), what)
                       for k, what in SESSION_FILES.items()}
        tables = {k: None if v is None else Path(v) for k, v in files.items()}
        return cls(Path(summary), sessions=per_session, **tables)

    def session_file(self, kind: str, session: str) -> Path | None:
        """The `kind` file (a key of :data:`SESSION_FILES`) of `session`, None if not given."""
        return (self.sessions.get(kind) or {}).get(session)


def read_optional_tsv(path: Path | None, notes: list[str]) -> list[dict[str, str]] | None:
    """Rows of a table that may be absent (None); an unreadable one is named in `notes`."""
    if path is None or not path.exists():
        return None
    try:
        return read_tsv(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        notes.append(f"{path.name} could not be read: {exc}")
        return None


def read_image(path: Path | None, what: str) -> sitk.Image:
    """An image the report was given; the error names the file and what is wrong."""
    if path is None:
        raise FileNotFoundError(f"no {what} file given for this session")
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path.name} not found ({path.parent})")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(f"{what} file {path.name} could not be read: {first}") from exc
