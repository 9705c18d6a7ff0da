"""What the report's Methods state for this subject: the response rules, from
:func:`pipeline.longitudinal.describe_rules` (the code that classifies, never retyped), and the
numbers of its measurement uncertainty, from its tables. The words are in
``templates/methods.html``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline.io.files import finite_float
from pipeline.longitudinal import Thresholds, describe_rules
from pipeline.report.values import ci_values, fmt


def response_rules(thresholds: Mapping[str, Any]) -> tuple[list[str], str]:
    """The rules of the response pattern with the thresholds recorded in summary.json, and
    '' ; or no rules and why (thresholds missing from an older summary)."""
    known = {f.name for f in dataclasses.fields(Thresholds)}
    values = {k: v for k, v in thresholds.items() if k in known}
    # summaries from before issue 18 lack it; they never carried a reference
    values.setdefault("contralateral_max_age_days",
                      Thresholds.default().contralateral_max_age_days)
    try:
        t = Thresholds.from_config(values)
    except (TypeError, ValueError) as exc:
        return [], f"summary.json: {exc}"
    return describe_rules(t), ""


def span(values: Iterable[float | None], digits: int = 1) -> str | None:
    """'lo–hi' (or one value) of the finite `values`; None without any."""
    vals = sorted(v for v in values if v is not None and math.isfinite(v))
    if not vals:
        return None
    lo, hi = fmt(vals[0], digits), fmt(vals[-1], digits)
    return lo if lo == hi else f"{lo}–{hi}"


def uncertainty_facts(
    longitudinal: Sequence[Mapping[str, Any]],
    volumes: Sequence[Mapping[str, Any]],
    baseline_date: str,
    states: Sequence[Mapping[str, Any]] | None,
) -> dict[str, Any]:
    """What the Methods on measurement uncertainty state for this subject (the
    ``uncertainty`` macro of ``templates/methods.html``).

    ``model``: 'absent' (no interval columns: an older version), 'unknown' (no interval known),
    'unfitted' (every interval 0) or 'fitted'; ``intervals`` and ``mdc``: spans of the 95 %
    half-widths and of the MDC95 of the changes, per quantity (None where unknown); ``within``:
    the changes above threshold but within measurement error, by day; ``states``: whether the
    summary has session states (confirmation).
    """
    has_columns = any(str(k).endswith("_ci95") for r in [*longitudinal, *volumes] for k in r)
    cis = ci_values(longitudinal) + ci_values(volumes)
    model = ("absent" if not has_columns else "unknown" if not cis
             else "unfitted" if not any(c > 0 for c in cis) else "fitted")
    return {
        "model": model,
        "intervals": _interval_spans(longitudinal, volumes, baseline_date),
        "mdc": _mdc_spans(longitudinal, baseline_date),
        "within": [{"day": st["day"], "text": w} for st in states or []
                   for w in st["within_error"]],
        "states": states is not None,
    }


def _column(rows: Sequence[Mapping[str, Any]], structure: str, column: str, baseline_date: str,
            baseline: bool | None = None) -> list[float | None]:
    """`column` of `structure` in ``longitudinal.tsv``: every session, or only the baseline
    (True) or only the others (False)."""
    return [finite_float(r.get(column)) for r in rows
            if r.get("structure") == structure
            and (baseline is None or (r.get("study_date") == baseline_date) == baseline)]


def _interval_spans(
    longitudinal: Sequence[Mapping[str, Any]], volumes: Sequence[Mapping[str, Any]],
    baseline_date: str,
) -> dict[str, Any]:
    """Half-widths of the 95 % intervals: soft-tissue volume (% of the volume), affected soft
    tissue at baseline (mL), lesion and edema of the affected side (mL), asymmetry (pp)."""
    rel = span(100.0 * c / v for r in volumes if r.get("structure") == "soft_tissue"
               for v, c in [(finite_float(r.get("volume_ml")),
                             finite_float(r.get("volume_ml_ci95")))]
               if v and c is not None)
    base = next((r for r in longitudinal if r.get("study_date") == baseline_date
                 and r.get("structure") == "soft_tissue"), None)
    at_baseline = None
    if base is not None and finite_float(base.get("affected_ml_ci95")) is not None:
        at_baseline = {"ml": fmt(base.get("affected_ml")), "ci": fmt(base.get("affected_ml_ci95"))}
    return {
        "soft_tissue_pct": rel,
        "baseline_affected": at_baseline,
        "marrow_lesion_ml": span(_column(longitudinal, "marrow_lesion", "affected_ml_ci95",
                                         baseline_date)),
        "edema_ml": span(_column(longitudinal, "edema", "affected_ml_ci95", baseline_date)),
        "asymmetry_pp": span(_column(longitudinal, "soft_tissue", "asymmetry_pct_ci95",
                                     baseline_date)),
    }


def _mdc_spans(longitudinal: Sequence[Mapping[str, Any]], baseline_date: str
               ) -> dict[str, str | None]:
    """MDC95 of the changes from baseline: soft-tissue asymmetry (pp, from the table), lesion
    and edema volume (mL: the two sessions' half-widths combined)."""
    out = {"asymmetry_change_pp": span(_column(
        longitudinal, "soft_tissue", "asymmetry_change_pp_ci95", baseline_date, baseline=False))}
    for structure in ("marrow_lesion", "edema"):
        ci = _column(longitudinal, structure, "affected_ml_ci95", baseline_date, baseline=True)
        base_ci = next(iter(ci), None)
        out[f"{structure}_ml"] = span(
            None if c is None or base_ci is None else math.hypot(c, base_ci)
            for c in _column(longitudinal, structure, "affected_ml_ci95", baseline_date,
                             baseline=False))
    return out
