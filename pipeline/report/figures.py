"""The image figures of the report: grey-scale panels with label contours (the overlays), the
cross-sectional area profile, and what every figure shares (:class:`FigureResult`, the PNG
encoding)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from skimage.measure import find_contours

from pipeline import labels
from pipeline.io.files import finite_float
from pipeline.report.positions import Swelling

#: Figure resolution: enough to read contours on paper, small enough for ~5 MB at 5 sessions.
FIGURE_DPI = 100


@dataclass
class FigureResult:
    """A rendered figure (base64 PNG) or the reason it could not be rendered.

    ``caption`` names the figure's caption in ``templates/figure_captions.html`` ('timeline',
    'profile', 'axial', 'coronal'; '' for none) and ``facts`` holds the values it states: the
    words are the template's, the numbers the figure's.
    """

    title: str
    png_base64: str | None = None
    caption: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    #: session label of an overlay ('' for the timeline and the profile)
    session: str = ""
    #: QC labels of that session: ``{severity, text, meaning}``, exclude first
    qc_labels: list[dict[str, str]] = field(default_factory=list)


def figure_to_base64(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _window(pixels: np.ndarray) -> tuple[float, float]:
    vals = pixels[np.isfinite(pixels)]
    if vals.size and (vals > 0).any():
        vals = vals[vals > 0]
    if not vals.size:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _rgb(label: int) -> tuple[float, float, float]:
    r, g, b = labels.LABEL_COLORS.get(label, (255, 0, 255))
    return (r / 255.0, g / 255.0, b / 255.0)


#: Orientation letters (viewer's left, right, top, bottom) of each displayed plane.
MARKERS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
}


def _draw_panel(
    ax: Any,
    pixels: np.ndarray,
    spacing_rc_mm: tuple[float, float],
    lab: np.ndarray,
    title: str,
    markers: tuple[str, str, str, str] = MARKERS["axial"],
) -> list[int]:
    vmin, vmax = _window(pixels)
    ax.imshow(
        pixels,
        cmap="gray",
        vmin=vmin,
        vmax=vmax,
        aspect=spacing_rc_mm[0] / spacing_rc_mm[1],
        interpolation="nearest",  # true voxels; also compresses far better than smoothing
    )
    present = [int(v) for v in np.unique(lab) if v != labels.BACKGROUND]
    for value in present:
        color = _rgb(value)
        mask = np.pad(lab == value, 1).astype(np.float32)
        for contour in find_contours(mask, 0.5):
            ax.plot(contour[:, 1] - 1, contour[:, 0] - 1, color=color, linewidth=0.9)
    ax.set_xlim(-0.5, pixels.shape[1] - 0.5)
    ax.set_ylim(pixels.shape[0] - 0.5, -0.5)
    style = {
        "color": "white",
        "fontsize": 11,
        "fontweight": "bold",
        "transform": ax.transAxes,
        "bbox": {"facecolor": "black", "alpha": 0.6, "pad": 1.5, "edgecolor": "none"},
    }
    left, right, top, bottom = markers
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.set_title(title, fontsize=9, parse_math=False)
    ax.set_xticks([])
    ax.set_yticks([])
    return present


def _legend(fig: Figure, present: set[int]) -> None:
    # one legend entry per tissue class (same hue on both sides)
    unique: dict[str, Line2D] = {}
    for v in sorted(present, key=lambda v: (v - 1) % 4):
        if v in labels.LABEL_COLORS and v in labels.LABEL_NAMES:
            name = labels.LABEL_NAMES[v].split(" ", 1)[-1]
            unique.setdefault(name, Line2D([], [], color=_rgb(v), label=name))
    if unique:
        fig.legend(
            handles=list(unique.values()),
            loc="outside lower center",
            ncol=len(unique),
            fontsize=8,
            frameon=False,
        )


def render_panels(
    panels: Sequence[tuple[np.ndarray, str]],
    lab: np.ndarray,
    spacing_rc_mm: tuple[float, float],
    plane: str = "axial",
    row_marks: Sequence[tuple[float, str, str]] = (),
) -> str:
    """Side-by-side grey-scale panels with the same label contours (PNG, base64).

    Parameters
    ----------
    panels : sequence of (ndarray of shape (R, C), str)
        Display-oriented images (radiological) and their titles.
    lab : ndarray of shape (R, C)
        Label map on the same pixels.
    spacing_rc_mm : tuple of float
        Row and column pixel spacing in mm; sets the physical aspect ratio.
    plane : str
        'axial' or 'coronal' (orientation letters).
    row_marks : sequence of (row, text, linestyle)
        Horizontal lines across every panel (e.g. axial positions on a coronal view).
    """
    rows, cols = lab.shape
    ratio = (rows * spacing_rc_mm[0]) / max(cols * spacing_rc_mm[1], 1e-6)
    width_in = 4.2 if len(panels) > 1 else 6.0
    height_in = min(max(width_in * ratio, 1.6), 8.0)
    fig = Figure(figsize=(width_in * len(panels), height_in + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    present: set[int] = set()
    for ax, (pixels, name) in zip(axes, panels, strict=True):
        present.update(_draw_panel(ax, pixels, spacing_rc_mm, lab, name, MARKERS[plane]))
        for row, text, style in row_marks:
            if -0.5 <= row <= rows - 0.5:
                ax.axhline(row, color="#ff33ff", linewidth=0.9, linestyle=style)
                if not text:
                    continue
                # labels right of centre: clear of the R/L/S/I letters at the edges and centre
                ax.text(
                    cols * 0.6,
                    row - 0.4,
                    text,
                    color="#ff33ff",
                    fontsize=7,
                    ha="left",
                    va="bottom",
                    parse_math=False,
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.5, "edgecolor": "none"},
                )
    _legend(fig, present)
    return figure_to_base64(fig)


def render_profile(
    csa_rows: Sequence[Mapping[str, Any]],
    affected_side: str,
    session_titles: Mapping[str, str],
    swelling: Swelling | None,
) -> str:
    """Limb cross-sectional area along the thigh, affected vs contralateral, per session.

    Top: limb area (cm^2) against distance from each limb's landmark (proximal +), affected
    solid, contralateral dashed, one colour per session. Bottom: affected minus contralateral
    at the same distance (contralateral interpolated).
    """
    other = labels.other_side(affected_side) if affected_side in labels.SIDE_OFFSET else ""
    by: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in csa_rows:
        d, a = finite_float(r.get("distance_mm")), finite_float(r.get("limb_area_mm2"))
        if d is not None and a is not None:
            by.setdefault((str(r.get("session")), str(r.get("side"))), []).append((d, a / 100.0))
    sessions = sorted({s for s, _ in by})
    if not sessions:
        raise ValueError("profile_csa.tsv has no usable rows")
    fig = Figure(figsize=(8.0, 6.4), layout="constrained")
    ax_area, ax_diff = fig.subplots(2, 1, sharex=True)
    colors = _session_colors(len(sessions))
    for color, ses in zip(colors, sessions, strict=True):
        title = session_titles.get(ses, ses)
        aff = sorted(by.get((ses, affected_side), []))
        con = sorted(by.get((ses, other), []))
        if aff:
            ax_area.plot(*zip(*aff, strict=True), "-", color=color, label=f"{title} affected")
        if con:
            ax_area.plot(*zip(*con, strict=True), "--", color=color, label=f"{title} contra")
        if aff and len(con) >= 2:
            cd, ca = np.array(con).T
            pts = [(d, a - float(np.interp(d, cd, ca))) for d, a in aff if cd[0] <= d <= cd[-1]]
            if pts:
                ax_diff.plot(*zip(*pts, strict=True), "o-", ms=2.5, color=color, label=title)
    for ax in (ax_area, ax_diff):
        ax.axvline(0.0, color="#888888", linewidth=0.8)
        if swelling is not None and swelling.distance_mm is not None:
            ax.axvline(swelling.distance_mm, color="#ff33ff", linewidth=0.9, linestyle=":")
        ax.grid(alpha=0.3)
    ax_diff.axhline(0.0, color="#bbbbbb", linewidth=0.8)
    ax_area.set_ylabel("limb cross-sectional area (cm²)")
    ax_diff.set_ylabel("affected − contralateral (cm²)")
    ax_diff.set_xlabel("distance from the femoral landmark (mm, proximal +)")
    ax_area.legend(fontsize=7, ncol=2, loc="best")
    if ax_diff.lines:
        ax_diff.legend(fontsize=7, ncol=3, loc="best")
    return figure_to_base64(fig)


def _session_colors(n: int) -> list[str]:
    # Okabe-Ito without the two colours used for affected/contralateral elsewhere
    palette = ["#000000", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", "#0072B2"]
    return [palette[i % len(palette)] for i in range(n)]
