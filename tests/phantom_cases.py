"""Phantom specifications shared by tests."""

from __future__ import annotations

from pipeline.validation import phantom


def small_spec(**kw: object) -> phantom.PhantomSpec:
    """A small but realistic phantom: 1.6 mm pixels, 5 mm slices, 12 slices, two sessions."""
    base: dict[str, object] = dict(
        leg_radius_mm=42.0, gap_mm=12.0, matrix=(128, 96), n_slices=12, slice_mm=5.0,
        pixel_mm=1.6, supersample_xy=3, supersample_z=3,
        sessions=(phantom.SessionSpec(day=-3, swelling=0.05, lesion_ml=3.0, edema=0.3),
                  phantom.SessionSpec(day=10, swelling=0.0, lesion_ml=0.0, edema=0.0)),
    )
    base.update(kw)
    return phantom.PhantomSpec(**base)  # type: ignore[arg-type]
