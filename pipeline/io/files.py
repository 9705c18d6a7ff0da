"""Small helpers for atomic, read-only-safe file output and checksums."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MM3_PER_ML = 1000.0


def _current_umask() -> int:
    """The process umask now (not at import: a caller may change it later).

    Read from /proc where possible, because os.umask can only be read by setting it, which
    races with other threads creating files.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mm3_to_ml(volume_mm3: float) -> float:
    """The one place where cubic millimetres become millilitres (1 mL = 1000 mm^3)."""
    return float(volume_mm3) / MM3_PER_ML


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    Keeps the file's suffixes (``.nii.gz`` etc.) so writers that infer the format still work.
    A crash leaves no half-written file under the final name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=suffix,
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_tsv_atomic(
    path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]], columns: Sequence[str]
) -> None:
    """Write dict rows as a tab-separated table with a header, atomically.

    Floats (numpy ones too) below 1e5 are rounded to 4 decimals, larger ones written with 6
    significant digits; None and NaN become 'n/a' (BIDS convention).
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_format_cell(row.get(c)) for c in columns])


def finite_float(value: Any) -> float | None:
    """The one reader of a number from a table cell, a JSON value or a DICOM element: a finite
    float, else None (absent, empty, ``n/a`` as :func:`write_tsv_atomic` writes None, text that
    is not a number, NaN, infinity). Never 0 for what is not there."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _format_cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)  # numpy float32 etc. are not float subclasses
        if math.isnan(value):
            return "n/a"
        # '+ 0.0' turns -0.0 into 0.0; '.15g' (not ':g', which keeps only 6 significant digits
        # and turned 2345.678 mL into 2345.68) prints the rounded value in full.
        return f"{value:.6g}" if abs(value) >= 1e5 else f"{round(value, 4) + 0.0:.15g}"
    return str(value).replace("\t", " ").replace("\n", " ")


def read_tsv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a tab-separated table with a header into a list of dicts (all values str)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def is_within(child: str | os.PathLike[str], parent: str | os.PathLike[str]) -> bool:
    """True when `child` is `parent` or lies below it (after resolving links)."""
    try:
        Path(child).resolve().relative_to(Path(parent).resolve())
    except ValueError:
        return False
    return True


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def walk_entries(top: str | os.PathLike[str]
                 ) -> Iterator[tuple[str, os.DirEntry[str] | OSError]]:
    """Every entry below `top` but the real folders, in the order of ``os.walk`` (top-down,
    sorted names: a folder's entries, then its subfolders depth-first); a folder reached
    only through a symbolic link is listed, not entered (``followlinks=False``).

    Yields ``(folder, entry)``, or ``(folder, error)`` for a folder that cannot be read. The
    one walk of a study folder: the DICOM index reads what it yields, the re-run digest
    stats it (:func:`pipeline.workflow.input_digest`), so both see the same files.
    """
    stack = [os.fspath(top)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            yield folder, err
            continue
        subfolders = []
        for entry in entries:
            try:
                real_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_folder = False
            if real_folder:
                subfolders.append(entry.path)
            else:
                yield folder, entry
        stack.extend(reversed(subfolders))
