"""The timeline figure: volumes, asymmetry and its change from baseline against day since
day 0, with 95 % intervals, the MDC95 band, clinical events and the days not available (QC).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from pipeline.io.files import finite_float
from pipeline.report.figures import figure_to_base64
from pipeline.report.values import (
    STRUCTURE_TITLES,
    WITHIN_ERROR,
    change_within_mdc,
    to_int,
    within_error_flag,
)

#: Colour-blind-safe line colours for the timeline (Okabe-Ito).
AFFECTED_COLOR = "#D55E00"
CONTRALATERAL_COLOR = "#0072B2"
EDEMA_COLOR = "#56B4E9"
EVENT_COLOR = "#555555"
#: The ±MDC95 band of the change panel (bluish green: not the grey of "not available").
MDC_COLOR = "#009E73"
MDC_ALPHA = 0.22
#: Opacity of the shaded 95 % interval bands of the timeline.
CI_ALPHA = 0.2


def _series(
    rows: Sequence[Mapping[str, Any]], structure: str, column: str
) -> tuple[list[int], list[float]]:
    points = sorted(
        (d, v)
        for r in rows
        if r.get("structure") == structure
        for d, v in [(to_int(r.get("day")), finite_float(r.get(column)))]
        if d is not None and v is not None
    )
    return [p[0] for p in points], [p[1] for p in points]


def _event_marks(events: Sequence[Mapping[str, Any]]) -> dict[int, list[str]]:
    marks: dict[int, list[str]] = {0: ["day 0"]}
    for ev in events:
        day = to_int(ev.get("day"))
        if day is None:
            continue
        text = str(ev.get("label") or ev.get("category") or "event")
        marks.setdefault(day, [])
        if text not in marks[day]:
            marks[day].append(text)
    if len(marks[0]) > 1:
        marks[0].remove("day 0")
    return marks


def _gapped_series(
    rows: Sequence[Mapping[str, Any]], structure: str, column: str
) -> tuple[list[int], list[float]]:
    """Like :func:`_series`, with NaN where a session's value is missing (lines break there,
    so a missing session never looks like a straight line through it)."""
    points: dict[int, float] = {}
    for r in rows:
        day = to_int(r.get("day"))
        if r.get("structure") != structure or day is None:
            continue
        v = finite_float(r.get(column))
        points[day] = math.nan if v is None else v
    days = sorted(points)
    return days, [points[d] for d in days]


def _plot_gapped(
    ax: Any, rows: Sequence[Mapping[str, Any]], structure: str, column: str, style: str,
    missing: set[int], **kwargs: Any,
) -> bool:
    """Plot one series with gaps, adding the days without a value to `missing`; False (and
    nothing drawn) when no value at all is available."""
    days, vals = _gapped_series(rows, structure, column)
    gaps = {d for d, v in zip(days, vals, strict=True) if math.isnan(v)}
    if len(gaps) == len(days):
        return False
    ax.plot(days, vals, style, **kwargs)
    missing |= gaps
    return True


def _mark_unavailable(ax: Any, days: Collection[int]) -> None:
    """A grey band and the words 'not available' on each day of `ax` whose value is not
    available (QC): drawn across the panel, so it never reads as a value (0 or any other)."""
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for k, day in enumerate(sorted(days)):
        ax.axvline(day, color="#999999", alpha=0.3, linewidth=9, solid_capstyle="butt",
                   label="not available (QC)" if k == 0 else None)
        ax.text(day, 0.96, "not available", transform=trans, rotation=90, ha="center",
                va="top", fontsize=7, color="#555555", parse_math=False)


def _gapped_columns(
    rows: Sequence[Mapping[str, Any]], structure: str, *columns: str
) -> tuple[list[int], list[list[float]]]:
    """Days of `structure` and, per column, its values with NaN where missing (aligned)."""
    points: dict[int, list[float]] = {}
    for r in rows:
        day = to_int(r.get("day"))
        if r.get("structure") != structure or day is None:
            continue
        points[day] = [math.nan if (v := finite_float(r.get(c))) is None else v for c in columns]
    days = sorted(points)
    return days, [[points[d][k] for d in days] for k in range(len(columns))]


def _band(
    ax: Any, days: Sequence[int], vals: Sequence[float], ci: Sequence[float], color: str,
    label: str | None = None, hatch: bool = False,
) -> bool:
    """Shade value ± ci (95 % interval); nothing where either is missing. False when no
    interval wider than zero is known (nothing drawn). `hatch`: hatched, not filled (a second
    band on the same panel stays readable where the two overlap)."""
    v, c = np.asarray(vals, float), np.asarray(ci, float)
    ok = np.isfinite(v) & np.isfinite(c)
    if not (ok & (c > 0)).any():
        return False
    lo, hi = np.where(ok, v - c, np.nan), np.where(ok, v + c, np.nan)
    if hatch:
        ax.fill_between(days, lo, hi, facecolor="none", edgecolor=color, hatch="////",
                        alpha=0.45, linewidth=0, label=label)
    else:
        ax.fill_between(days, lo, hi, color=color, alpha=CI_ALPHA, linewidth=0, label=label)
    # a session with no known neighbour would vanish in the band: an error bar shows it too
    ax.errorbar(days, v, yerr=np.where(ok, c, 0.0), fmt="none", ecolor=color, alpha=0.7,
                elinewidth=0.8, capsize=2.5)
    return True


def _errorbars(ax: Any, days: Sequence[int], vals: Sequence[float], ci: Sequence[float],
               color: str) -> bool:
    v, c = np.asarray(vals, float), np.asarray(ci, float)
    ok = np.isfinite(v) & np.isfinite(c)
    if not (ok & (c > 0)).any():
        return False
    ax.errorbar(days, np.where(ok, v, np.nan), yerr=np.where(ok, c, 0.0), fmt="none",
                ecolor=color, elinewidth=1.0, capsize=3)
    return True


def _hollow(ax: Any, days: Sequence[int], vals: Sequence[float], within: Sequence[bool],
            color: str, marker: str = "o") -> bool:
    """Redraw the markers of the sessions whose change is within measurement error hollow."""
    pts = [(d, v) for d, v, w in zip(days, vals, within, strict=True) if w and math.isfinite(v)]
    if not pts:
        return False
    ax.plot(*zip(*pts, strict=True), marker, linestyle="none", markerfacecolor="white",
            markeredgecolor=color, markeredgewidth=1.4, zorder=5)
    return True


def _within_legend(ax: Any) -> None:
    ax.plot([], [], "o", markerfacecolor="white", markeredgecolor="#555555",
            markeredgewidth=1.4, label=WITHIN_ERROR)


def _row_flags(rows: Sequence[Mapping[str, Any]], structure: str, days: Sequence[int]
               ) -> list[bool]:
    by_day = {to_int(r.get("day")): within_error_flag(r) for r in rows
              if r.get("structure") == structure}
    return [by_day.get(d, False) for d in days]


def _change_series(
    rows: Sequence[Mapping[str, Any]], baseline_day: int | None
) -> tuple[list[int], list[float], list[float], str, str]:
    """Days, change from baseline and its MDC95 (NaN where missing), unit and axis label:
    the soft-tissue asymmetry change (pp; computed here from the asymmetry for older tables),
    else, with one limb only, the affected soft tissue's change from baseline (%)."""
    days, (chg, mdc) = _gapped_columns(rows, "soft_tissue", "asymmetry_change_pp",
                                       "asymmetry_change_pp_ci95")
    if not any(math.isfinite(v) for v in chg):
        days, (asym,) = _gapped_columns(rows, "soft_tissue", "asymmetry_pct")
        base = dict(zip(days, asym, strict=True)).get(baseline_day) if baseline_day is not None \
            else None
        if base is not None and math.isfinite(base):
            chg, mdc = [a - base for a in asym], [math.nan] * len(days)
    if any(math.isfinite(v) for v in chg):
        return days, chg, mdc, "pp", "soft-tissue asymmetry\nchange (pp)"
    days, (chg, mdc) = _gapped_columns(rows, "soft_tissue", "change_from_baseline_pct",
                                       "change_from_baseline_pct_ci95")
    return days, chg, mdc, "%", "soft-tissue change\nfrom baseline (%)"


def _mdc_band(ax: Any, days: Sequence[int], mdc: Sequence[float], baseline_day: int | None
              ) -> None:
    """The ±MDC95 band around the baseline (zero). It breaks where a session's MDC95 is not
    known (never drawn across it); a session with no known neighbour gets a short band."""
    bd = np.array([d for d in days if d != baseline_day], float)
    bm = np.array([m for d, m in zip(days, mdc, strict=True) if d != baseline_day], float)
    if not (np.isfinite(bm) & (bm > 0)).any():
        return
    style = {"color": MDC_COLOR, "alpha": MDC_ALPHA, "linewidth": 0}
    ax.fill_between(bd, -bm, bm, label="±MDC95 around baseline (measurement error)", **style)
    w = max(0.5, 0.02 * (max(days) - min(days)))
    for i, (d, m) in enumerate(zip(bd, bm, strict=True)):
        alone = all(not (0 <= j < len(bm) and math.isfinite(bm[j])) for j in (i - 1, i + 1))
        if math.isfinite(m) and alone:
            ax.fill_between([d - w, d + w], [-m, -m], [m, m], **style)


def _plot_change(
    ax: Any, rows: Sequence[Mapping[str, Any]], flare_pp: float | None, baseline_day: int | None,
    missing: set[int],
) -> bool:
    """Swelling change from baseline (:func:`_change_series`), the ±MDC95 band around the
    baseline (zero), the flare threshold, and hollow markers where the change is within its
    MDC95."""
    days, chg, mdc, unit, what = _change_series(rows, baseline_day)
    ax.set_ylabel(what)
    if unit == "%" and not any(math.isfinite(v) for d, v in zip(days, chg, strict=True)
                               if d != baseline_day):
        ax.text(0.5, 0.5, "not available (no change from baseline)", transform=ax.transAxes,
                ha="center", va="center", color="#777777", fontsize=8)
        return False
    if baseline_day in days:  # the baseline is the reference: change 0, no interval
        k = days.index(baseline_day)
        if not math.isfinite(chg[k]):
            chg[k] = 0.0
        mdc[k] = math.nan
    _mdc_band(ax, days, mdc, baseline_day)
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    if flare_pp is not None:
        ax.axhline(flare_pp, color=AFFECTED_COLOR, linestyle=(0, (2, 3)), linewidth=0.9,
                   label=f"flare threshold +{flare_pp:g} {unit}")
    ax.plot(days, chg, "o-", color=AFFECTED_COLOR, label="soft tissue, affected vs baseline")
    within = [d != baseline_day and change_within_mdc(v if math.isfinite(v) else None,
                                                      m if math.isfinite(m) else None)
              for d, v, m in zip(days, chg, mdc, strict=True)]
    if _hollow(ax, days, chg, within, AFFECTED_COLOR):
        _within_legend(ax)
    missing |= {d for d, v in zip(days, chg, strict=True) if math.isnan(v)}
    return True


def render_timeline(
    rows: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    affected_side: str,
    thresholds: Mapping[str, Any],
    baseline_day: int | None,
    unavailable_days: Collection[int] = (),
) -> str:
    """Timeline panels (PNG, base64) of volumes and asymmetry against day since day 0.

    Panels: soft-tissue volume of both limbs, soft-tissue and whole-limb asymmetry, the
    soft-tissue asymmetry change from baseline with its MDC95 band around the baseline and the
    flare threshold, marrow lesion and edema of the affected side. Where the tables carry
    95 % intervals (``*_ci95`` columns) volumes get shaded bands and asymmetry error bars;
    a session whose change from baseline is within its MDC95 has a hollow marker.

    Parameters
    ----------
    rows : sequence of mapping
        Rows of ``longitudinal.tsv`` (values may be strings, 'n/a' for missing).
    events : sequence of mapping
        Clinical events with ``day`` and ``label``; drawn as vertical lines.
    affected_side : str
        Used in the legend only.
    thresholds : mapping
        ``flare_asymmetry_pp`` draws the flare threshold on the asymmetry panels.
    baseline_day : int or None
        Day of the baseline session.
    unavailable_days : collection of int
        Days of sessions with a QC exclude flag: a missing value there is marked with a grey
        band ("not available"); any missing value breaks its line.

    Returns
    -------
    str
        Base64-encoded PNG.
    """
    fig = Figure(figsize=(8.0, 10.8), layout="constrained")
    axes = fig.subplots(5, 1, sharex=True)
    missing: list[set[int]] = [set() for _ in axes]
    hollow = [False] * len(axes)
    flare_pp = finite_float(thresholds.get("flare_asymmetry_pp"))
    plotted, hollow[0] = _volume_panel(axes[0], rows, affected_side, missing[0])
    plotted |= _asymmetry_panel(axes[1], rows, flare_pp, baseline_day, missing[1])
    _plot_change(axes[2], rows, flare_pp, baseline_day, missing[2])
    for k, structure, color, name in ((3, "marrow_lesion", AFFECTED_COLOR, "marrow lesion"),
                                      (4, "edema", EDEMA_COLOR, "edema")):
        drawn, hollow[k] = _affected_panel(axes[k], rows, structure, color, name, missing[k])
        plotted |= drawn
    if not plotted:
        raise ValueError("longitudinal.tsv has no numeric values to plot")
    for ax, gaps, h in zip(axes, missing, hollow, strict=True):
        if h:
            _within_legend(ax)
        _mark_unavailable(ax, gaps & set(unavailable_days))
    _draw_events(axes, _event_marks(events))
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("day since day 0")
    return figure_to_base64(fig)


def _volume_panel(ax: Any, rows: Sequence[Mapping[str, Any]], affected_side: str,
                  missing: set[int]) -> tuple[bool, bool]:
    """Soft-tissue volume of both limbs with their 95 % bands; (affected drawn, hollow
    markers drawn)."""
    plotted = hollow = False
    for column, style, color, label in (
        ("affected_ml", "o-", AFFECTED_COLOR, f"affected ({affected_side})"),
        ("contralateral_ml", "s--", CONTRALATERAL_COLOR, "contralateral"),
    ):
        drawn = _plot_gapped(ax, rows, "soft_tissue", column, style, missing,
                             color=color, label=label)
        plotted |= drawn and column == "affected_ml"
        days, (vals, ci) = _gapped_columns(rows, "soft_tissue", column, f"{column}_ci95")
        _band(ax, days, vals, ci, color, "95 % interval", hatch=column != "affected_ml")
        if column == "affected_ml":
            hollow = _hollow(ax, days, vals, _row_flags(rows, "soft_tissue", days), color)
    ax.set_ylabel("soft tissue (mL)")
    return plotted, hollow


def _asymmetry_panel(ax: Any, rows: Sequence[Mapping[str, Any]], flare_pp: float | None,
                     baseline_day: int | None, missing: set[int]) -> bool:
    """Soft-tissue and whole-limb asymmetry with error bars and the flare threshold above
    the baseline asymmetry; whether anything was drawn."""
    plotted = False
    for structure, style in (("soft_tissue", "o-"), ("limb", "^:")):
        color = AFFECTED_COLOR if structure == "soft_tissue" else "#999999"
        plotted |= _plot_gapped(ax, rows, structure, "asymmetry_pct", style, missing,
                                color=color, label=STRUCTURE_TITLES[structure])
        days, (vals, ci) = _gapped_columns(rows, structure, "asymmetry_pct", "asymmetry_pct_ci95")
        _errorbars(ax, days, vals, ci, color)
    ax.axhline(0.0, color="#bbbbbb", linewidth=0.8)
    if flare_pp is not None and baseline_day is not None:
        d, asym = _series(rows, "soft_tissue", "asymmetry_pct")
        base = dict(zip(d, asym, strict=True)).get(baseline_day)
        if base is not None:
            ax.axhline(base + flare_pp, color=AFFECTED_COLOR, linestyle=(0, (2, 3)),
                       linewidth=0.9, label=f"baseline + {flare_pp:g} pp (flare)")
    ax.set_ylabel("asymmetry (%)")
    return plotted


def _affected_panel(ax: Any, rows: Sequence[Mapping[str, Any]], structure: str, color: str,
                    name: str, missing: set[int]) -> tuple[bool, bool]:
    """The affected side's volume of `structure` with its 95 % band; (drawn, hollow)."""
    plotted = _plot_gapped(ax, rows, structure, "affected_ml", "o-", missing,
                           color=color, label=f"{name}, affected side")
    days, (vals, ci) = _gapped_columns(rows, structure, "affected_ml", "affected_ml_ci95")
    _band(ax, days, vals, ci, color, "95 % interval")
    hollow = _hollow(ax, days, vals, _row_flags(rows, structure, days), color)
    ax.set_ylabel(f"{name} (mL)")
    ax.set_ylim(bottom=0)
    return plotted, hollow


def _draw_events(axes: Sequence[Any], marks: Mapping[int, list[str]]) -> None:
    """Day 0 (solid) and the clinical events (dotted) on every panel, their names above the
    first; grid and legends."""
    for ax in axes:
        for day in marks:
            ax.axvline(day, color=EVENT_COLOR, linestyle=":" if day else "-", linewidth=0.8)
        ax.grid(True, color="#eeeeee")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7.5, frameon=False)
    trans = blended_transform_factory(axes[0].transData, axes[0].transAxes)
    for day, texts in sorted(marks.items()):
        axes[0].text(day, 1.02, "; ".join(texts), transform=trans, rotation=35, fontsize=7,
                     ha="left", va="bottom", color=EVENT_COLOR, parse_math=False)
