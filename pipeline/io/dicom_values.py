"""Readers of DICOM element values: dates (DA), times (TM), integers and multi-valued numbers.

Single numbers are read by :func:`pipeline.io.files.finite_float`, the one reader of a number.
Each reader returns None for what is absent or malformed, never a made-up value.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Any

from pipeline.io.files import finite_float


def parse_dicom_date(value: Any) -> str | None:
    """DICOM DA (``YYYYMMDD``, or legacy ``YYYY.MM.DD``) as ISO ``YYYY-MM-DD``.

    Returns None for empty, ``00000000`` or impossible dates; never substitutes today's date.
    """
    text = str(value or "").strip()
    match = re.fullmatch(r"(\d{4})\.?(\d{2})\.?(\d{2})", text)
    if not match:
        return None
    try:
        date = dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None
    if date.year < 1900:
        return None
    return date.isoformat()


def parse_dicom_time(value: Any) -> str | None:
    """DICOM TM (``HHMMSS.ffffff``, ``HHMM``, legacy ``HH:MM:SS``) as ``HH:MM:SS``, else None."""
    text = str(value or "").strip().replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d*)?", text)
    if not match:
        return None
    hh, mm, ss = int(match[1]), int(match[2] or 0), int(match[3] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        return None
    return f"{hh:02d}:{mm:02d}:{min(ss, 59):02d}"


def floats_or_none(value: Any, n: int) -> tuple[float, ...] | None:
    """A multi-valued DICOM element as a tuple of `n` finite floats, or None if absent or
    malformed (another count, a value that is not a finite number)."""
    if value is None:
        return None
    values = value if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) \
        else [value]
    read = [finite_float(v) for v in values]
    numbers = tuple(v for v in read if v is not None)
    return numbers if len(read) == n and len(numbers) == n else None


def int_or_none(value: Any) -> int | None:
    """A DICOM integer as int, or None if absent or malformed."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
