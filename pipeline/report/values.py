"""Values shared by the report's parts: whole numbers and formatted numbers of table cells
(numbers are read by :func:`pipeline.io.files.finite_float`), structure titles, the "within
measurement error" words and flags, flattened settings."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.io.files import finite_float

#: Display name of each structure of pipeline.labels.
STRUCTURE_TITLES: dict[str, str] = {
    "limb": "limb (all)",
    "soft_tissue": "soft tissue",
    "bone": "bone (incl. lesion)",
    "marrow_lesion": "marrow lesion",
    "edema": "edema",
}
#: Words for a change inside its MDC95 (figures, tables, legend).
WITHIN_ERROR = "within measurement error"


def to_int(value: Any) -> int | None:
    """A whole number from a table cell or JSON value (rounded); None where no finite number."""
    f = finite_float(value)
    return None if f is None else int(round(f))


def within_error_flag(row: Mapping[str, Any]) -> bool:
    """Whether the row's change from baseline is inside its MDC95 (``change_beyond_mdc95``
    is ``no``); ``yes``, ``n/a`` or no such column: not marked."""
    return str(row.get("change_beyond_mdc95") or "").strip().lower() == "no"


def change_within_mdc(change: float | None, mdc: float | None) -> bool:
    """A change whose size does not exceed its known MDC95 (the caller leaves out the
    baseline, the reference itself)."""
    return change is not None and mdc is not None and abs(change) <= mdc


def fmt(value: Any, digits: int = 1, signed: bool = False) -> str:
    """`value` with `digits` decimals (a sign when `signed`); 'n/a' where no finite number."""
    f = finite_float(value)
    if f is None:
        return "n/a"
    return f"{f:+.{digits}f}" if signed else f"{f:.{digits}f}"


def flatten(mapping: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, text) of every leaf of a nested mapping; lists as JSON, None as 'n/a'."""
    if isinstance(mapping, Mapping):
        out: list[tuple[str, str]] = []
        for key, value in mapping.items():
            out.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(mapping, list | tuple):
        return [(prefix, json.dumps(mapping, default=str))]
    return [(prefix, "n/a" if mapping is None else str(mapping))]


def ci_values(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """Every known 95 % half-width (``*_ci95`` cells) of `rows`."""
    return [v for r in rows for k, x in r.items()
            if str(k).endswith("_ci95") for v in [finite_float(x)] if v is not None]
