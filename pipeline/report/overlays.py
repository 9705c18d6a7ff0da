"""The overlay views: positions chosen once in baseline coordinates (marrow-lesion centre,
largest swelling, a coronal plane through the femora) and every session resampled onto the same
baseline slice through its rigid registration (``_xfm.tfm`` maps baseline points to session
points), so the same anatomy is compared across sessions.

Three passes: the sessions' transforms and candidate positions (:func:`plan_views`), each
session's slices of every view (one read of its images), then one crop per view and the
figures. Why a position was chosen and each caption are words of
``templates/figure_captions.html``; the views carry the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.extent import affine_of, as_transform
from pipeline.geometry import orient_lps, resample_onto
from pipeline.report.figures import FigureResult, render_panels
from pipeline.report.inputs import ReportInputs, read_image
from pipeline.report.positions import SliceChoice, Swelling, slice_candidates
from pipeline.report.slices import (
    axial_slab,
    coronal_slab,
    covers_z,
    crop_box,
    radiological_axial_slice,
    radiological_coronal_slice,
    slice_z_positions_mm,
)

log = logging.getLogger(__name__)


@dataclass
class OverlayView:
    """One slice position shown for every session (baseline coordinates).

    ``basis`` names why the position was chosen and ``basis_facts`` holds its values (the
    ``position`` macro of ``figure_captions.html`` says it in words); ``note`` names why the
    view is not shown ('' when it is; the ``view_note`` macro).
    """

    key: str
    title: str
    plane: str  # 'axial' (position = baseline z) or 'coronal' (position = baseline y)
    position_mm: float | None = None
    basis: str = ""
    basis_facts: dict[str, Any] = field(default_factory=dict)
    figures: list[FigureResult] = field(default_factory=list)
    note: str = ""


@dataclass
class _Pending:
    """A session's slices of one view, waiting for the view's common crop."""

    figure: FigureResult
    fluid: np.ndarray
    t1: np.ndarray | None
    lab: np.ndarray
    spacing_rc_mm: tuple[float, float]
    row_z_mm: np.ndarray | None
    session_z_mm: float | None
    base_mm: float  # baseline z (axial) or y (coronal) of the slice shown


@dataclass
class _Sessions:
    """The sessions of the overlays (baseline first in ``order``) and what pass 1 found."""

    sessions: Sequence[Mapping[str, Any]]
    inputs: ReportInputs
    base_i: int
    dates: list[str]
    titles: list[str]
    transforms: dict[int, sitk.Transform] = field(default_factory=dict)
    notes: dict[int, list[str]] = field(default_factory=dict)

    @property
    def order(self) -> list[int]:
        return [self.base_i] + [i for i in range(len(self.sessions)) if i != self.base_i]

    def label(self, i: int) -> str:
        return str(self.sessions[i].get("session", ""))

    def file(self, i: int, kind: str) -> Path | None:
        return self.inputs.session_file(kind, self.label(i))


def _identity() -> sitk.Transform:
    return sitk.Transform(3, sitk.sitkIdentity)


def _to_baseline_point(transform: sitk.Transform, point: Sequence[float]) -> np.ndarray:
    """A session point mapped into baseline space (inverse of the baseline->session map)."""
    a, b = affine_of(transform)
    return np.asarray(np.linalg.solve(a, np.asarray(point, dtype=float) - b))


def overlay_views(
    inputs: ReportInputs,
    sessions: Sequence[Mapping[str, Any]],
    affected_side: str | None,
    baseline_date: str,
    swelling: Swelling | None,
    extent_z_mm: tuple[float, float] | None,
    registration: Mapping[str, Any],
    not_for_planning: Collection[str] = (),
) -> list[OverlayView]:
    """Axial (lesion centre, largest swelling) and coronal views, the same positions in
    baseline coordinates for every session, each session resampled through its registration.

    Sessions named in `not_for_planning` (QC exclude flags) do not choose the positions unless
    no other session can; they are still shown."""
    dates = [str(s.get("study_date", "?")) for s in sessions]
    base_i = next((i for i, s in enumerate(sessions) if s.get("study_date") == baseline_date), 0)
    titles = [f"Session {dates[i]} (day {s.get('day', '?')})" for i, s in enumerate(sessions)]
    ss = _Sessions(sessions, inputs, base_i, dates, titles)
    _load_transforms(ss, registration)
    candidates, reference = _candidates(ss, affected_side)
    planning = {i: c for i, c in candidates.items() if ss.label(i) not in not_for_planning}
    session_dates = {ss.label(i): d for i, d in enumerate(dates)}
    views = plan_views(planning or candidates, ss.transforms, ss.order, dates, swelling,
                       session_dates)
    if reference is None:
        for v in views:
            v.position_mm, v.note = None, "no_grid"
    pending: dict[str, list[_Pending | FigureResult]] = {v.key: [] for v in views}
    for i in range(len(sessions)):
        _session_slices(ss, i, [v for v in views if v.position_mm is not None], reference,
                        pending)
    axial_marks = [(v.position_mm, v.key) for v in views if v.plane == "axial"]
    for v in views:
        _render_view(v, pending[v.key], axial_marks, extent_z_mm)
    return views


def _load_transforms(ss: _Sessions, registration: Mapping[str, Any]) -> None:
    """Pass 1a: each follow-up's baseline->session transform, and the notes its figures carry
    (no transform, an unusable one, a registration flagged poor)."""
    for i in range(len(ss.sessions)):
        ss.transforms[i], ss.notes[i] = _identity(), []
        if i == ss.base_i:
            continue
        try:
            path = ss.file(i, "tfm")
            if path is None:
                ss.notes[i].append(
                    "no registration transform (_xfm.tfm) given: shown at the baseline's "
                    "scanner coordinates, not registered"
                )
            else:
                ss.transforms[i] = as_transform(path)
                affine_of(ss.transforms[i])  # rigid/affine only
        except Exception as exc:
            ss.transforms[i] = _identity()
            ss.notes[i].append(f"registration transform not usable ({exc}): not registered")
        reg = registration.get(ss.label(i)) or {}
        if reg.get("poor"):
            why = "; ".join(str(r) for r in reg.get("poor_reasons") or []) or "see QC"
            ss.notes[i].append(
                f"registration flagged poor ({why}): positions may not match the baseline"
            )


def _candidates(
    ss: _Sessions, affected_side: str | None
) -> tuple[dict[int, SliceChoice], sitk.Image | None]:
    """Pass 1b: candidate positions from each label map, and the baseline grid (its label
    map, else its fluid image, LPS-oriented)."""
    candidates: dict[int, SliceChoice] = {}
    reference: sitk.Image | None = None
    for i in ss.order:
        try:
            dseg = read_image(ss.file(i, "dseg"), "label map")
            candidates[i] = slice_candidates(dseg, affected_side)
            if i == ss.base_i:
                reference = orient_lps(dseg)
        except Exception as exc:  # reported per figure in pass 2
            log.info("slice candidates of %s: %s", ss.titles[i], exc)
    if reference is None and ss.sessions:
        try:
            reference = orient_lps(read_image(ss.file(ss.base_i, "fluid"), "fluid image"))
        except Exception as exc:
            log.info("baseline reference grid: %s", exc)
    return candidates, reference


def plan_views(
    candidates: Mapping[int, SliceChoice],
    transforms: Mapping[int, sitk.Transform],
    order: Sequence[int],
    dates: Sequence[str],
    swelling: Swelling | None,
    session_dates: Mapping[str, str],
) -> list[OverlayView]:
    """The three views and their baseline positions, from the first session in `order`
    (baseline first) that has each (its candidate mapped into baseline space)."""

    def mapped(i: int, point: Sequence[float] | None) -> np.ndarray | None:
        if point is None:
            return None
        return _to_baseline_point(transforms.get(i, _identity()), point)

    lesion = OverlayView("lesion", "Axial slice through the marrow-lesion centre", "axial")
    _place(lesion, order, candidates, mapped, "lesion_point_mm", 2, dates, "no_lesion")
    coronal = OverlayView("coronal", "Coronal reformat through the femora", "coronal")
    _place(coronal, order, candidates, mapped, "bone_point_mm", 1, dates, "no_limb_coronal")
    swell = _swelling_view(candidates, order, dates, swelling, session_dates, mapped)
    return [lesion, swell, coronal]


def _place(
    view: OverlayView,
    order: Sequence[int],
    candidates: Mapping[int, SliceChoice],
    mapped: Callable[[int, Sequence[float] | None], np.ndarray | None],
    point: str,
    axis: int,
    dates: Sequence[str],
    note: str,
) -> None:
    """Position `view` at the `point` (a SliceChoice field) of the first session in `order`
    that has one, mapped into baseline space (`axis`: 2 for z, 1 for y); else `note`."""
    for i in order:
        p = mapped(i, getattr(candidates[i], point)) if i in candidates else None
        if p is not None:
            view.position_mm, view.basis = float(p[axis]), view.key
            view.basis_facts = {"date": dates[i]}
            return
    view.note = note


def _swelling_view(
    candidates: Mapping[int, SliceChoice],
    order: Sequence[int],
    dates: Sequence[str],
    swelling: Swelling | None,
    session_dates: Mapping[str, str],
    mapped: Callable[[int, Sequence[float] | None], np.ndarray | None],
) -> OverlayView:
    """The largest swelling: from the area profile, else the label maps' largest difference,
    else the largest affected-limb cross-section (one limb only)."""
    view = OverlayView("swelling", "Axial slice through the largest swelling", "axial")
    if swelling is not None:
        view.position_mm, view.basis = swelling.z_mm, "swelling_profile"
        view.basis_facts = {"difference_cm2": swelling.difference_mm2 / 100.0,
                            "date": session_dates.get(swelling.session, swelling.session),
                            "distance_mm": swelling.distance_mm}
        return view
    own = [(c.swelling_mm2, i, c) for i, c in candidates.items()
           if c.swelling_mm2 is not None and c.swelling_z_mm is not None]
    if own:
        diff, i, best = max(own, key=lambda t: t[0])
        x, y = (best.bone_point_mm or (0.0, 0.0, 0.0))[:2]
        p = mapped(i, (x, y, float(best.swelling_z_mm or 0.0)))
        view.position_mm = None if p is None else float(p[2])
        view.basis, view.basis_facts = "swelling_labels", {"difference_cm2": diff / 100.0,
                                                            "date": dates[i]}
        return view
    for i in order:
        cand = candidates.get(i)
        if cand is not None and cand.largest_limb_z_mm is not None:
            x, y = (cand.bone_point_mm or (0.0, 0.0, 0.0))[:2]
            p = mapped(i, (x, y, cand.largest_limb_z_mm))
            view.position_mm = None if p is None else float(p[2])
            view.basis, view.basis_facts = "largest_limb", {"date": dates[i]}
            return view
    view.note = "no_limb"
    return view


def _session_slices(
    ss: _Sessions,
    i: int,
    views: Sequence[OverlayView],
    reference: sitk.Image | None,
    pending: dict[str, list[_Pending | FigureResult]],
) -> None:
    """Pass 2: read session `i` once and resample it onto every view's baseline slab."""
    if reference is None or not views:
        return
    figs = {v.key: FigureResult(title=ss.titles[i], session=ss.label(i)) for v in views}
    try:
        fluid = read_image(ss.file(i, "fluid"), "fluid-sensitive image")
        dseg = read_image(ss.file(i, "dseg"), "label map")
        t1, t1_note = None, None
        try:
            t1 = read_image(ss.file(i, "t1"), "T1 image")
        except Exception as exc:
            t1_note = f"T1 panel not shown: {exc}"
        dseg_lps = orient_lps(dseg)
    except Exception as exc:
        log.warning("overlays of %s failed: %s", ss.titles[i], exc)
        for v in views:
            figs[v.key].error = f"{type(exc).__name__}: {exc}"
            pending[v.key].append(figs[v.key])
        return
    for v in views:
        fig = figs[v.key]
        fig.notes.extend(ss.notes[i] + ([t1_note] if t1_note else []))
        try:
            pending[v.key].append(_view_slices(v, fig, (fluid, dseg, t1), dseg_lps,
                                               ss.transforms[i], reference))
        except Exception as exc:
            log.warning("%s of %s failed: %s", v.title, ss.titles[i], exc)
            fig.error = f"{type(exc).__name__}: {exc}"
            pending[v.key].append(fig)


def _view_slices(
    v: OverlayView,
    fig: FigureResult,
    images: tuple[sitk.Image, sitk.Image, sitk.Image | None],
    dseg_lps: sitk.Image,
    transform: sitk.Transform,
    reference: sitk.Image,
) -> _Pending | FigureResult:
    """One session's fluid, T1 and label slices of view `v` on its baseline slab; the figure
    with a note when an axial position lies outside the session."""
    assert v.position_mm is not None
    slab = (axial_slab if v.plane == "axial" else coronal_slab)(reference, v.position_mm)
    centre = slab.TransformContinuousIndexToPhysicalPoint(
        tuple((n - 1) / 2.0 for n in slab.GetSize())
    )
    session_z = float(transform.TransformPoint(centre)[2])
    if v.plane == "axial" and not covers_z(dseg_lps, session_z):
        zs = slice_z_positions_mm(dseg_lps)
        fig.notes.append(
            f"this session does not cover the position (z = {session_z:.1f} mm in "
            f"its coordinates; it covers {zs.min():.1f} to {zs.max():.1f} mm)"
        )
        return fig
    fluid, dseg, t1_image = images
    fl = resample_onto(fluid, slab, is_label=False, transform=transform)
    lb = resample_onto(dseg, slab, is_label=True, transform=transform)
    t1 = None if t1_image is None else resample_onto(t1_image, slab, is_label=False,
                                                     transform=transform)
    if v.plane == "axial":
        a = radiological_axial_slice(fl, v.position_mm)
        t1_px = None if t1 is None else radiological_axial_slice(t1, a.z_mm).pixels
        return _Pending(fig, a.pixels, t1_px, radiological_axial_slice(lb, a.z_mm).pixels,
                        a.spacing_rc_mm, None, session_z, float(centre[2]))
    c = radiological_coronal_slice(fl)
    t1_px = None if t1 is None else radiological_coronal_slice(t1).pixels
    return _Pending(fig, c.pixels, t1_px, radiological_coronal_slice(lb).pixels,
                    c.spacing_rc_mm, c.row_z_mm, None, float(centre[1]))


def _render_view(
    v: OverlayView,
    items: Sequence[_Pending | FigureResult],
    axial_marks: Sequence[tuple[float | None, str]],
    extent_z_mm: tuple[float, float] | None,
) -> None:
    """Pass 3: one crop for the view (union of all sessions' labels), then each figure."""
    slices = [p for p in items if isinstance(p, _Pending)]
    spacing = slices[0].spacing_rc_mm if slices else (1.0, 1.0)
    rows, cols = crop_box([p.lab > 0 for p in slices], spacing, margin_mm=15.0)
    for p in items:
        if isinstance(p, FigureResult):
            v.figures.append(p)
            continue
        fig = p.figure
        try:
            panels = [(p.fluid[rows, cols], "fluid-sensitive")]
            if p.t1 is not None:
                panels.append((p.t1[rows, cols], "T1-weighted"))
            marks = _row_marks(p.row_z_mm, rows, axial_marks, extent_z_mm)
            fig.png_base64 = render_panels(panels, p.lab[rows, cols], p.spacing_rc_mm, v.plane,
                                           marks)
            fig.caption = v.plane
            fig.facts = {"base_mm": p.base_mm, "position_mm": v.position_mm,
                         "session_z_mm": p.session_z_mm, "spacing_rc_mm": p.spacing_rc_mm}
        except Exception as exc:
            log.warning("%s of %s failed: %s", v.title, fig.title, exc)
            fig.error = f"{type(exc).__name__}: {exc}"
        v.figures.append(fig)


def _row_marks(
    row_z_mm: np.ndarray | None,
    rows: slice,
    axial_marks: Sequence[tuple[float | None, str]],
    extent_z_mm: tuple[float, float] | None,
) -> list[tuple[float, str, str]]:
    """Lines across a coronal view: the axial positions (solid) and the common extent
    (dashed); none on an axial view."""
    if row_z_mm is None:
        return []
    z_rows = row_z_mm[rows]
    idx = np.arange(z_rows.size, dtype=float)
    marks = [(_z_to_row(z_rows, idx, z), "lesion centre" if key == "lesion" else
              "largest swelling", "-") for z, key in axial_marks if z is not None]
    for z in extent_z_mm or ():
        marks.append((_z_to_row(z_rows, idx, z), "", "--"))
    return marks


def _z_to_row(z_rows: np.ndarray, idx: np.ndarray, z_mm: float) -> float:
    """Fractional display row of physical `z_mm` (rows run superior to inferior)."""
    if z_rows.size < 2:
        return 0.0 if z_rows.size else -1.0
    step = float(z_rows[1] - z_rows[0])
    return float(idx[0] + (z_mm - float(z_rows[0])) / step) if step else -1.0
