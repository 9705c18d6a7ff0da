"""Compare workflow outputs with a phantom's ground truth: volume errors and Dice per structure.

Used by the accuracy benchmark and the end-to-end tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .io_utils import read_tsv
from .labels import SIDES, STRUCTURES, structure_labels


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice coefficient of two boolean masks; None when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def _label_array_on(reference: sitk.Image, path: Path) -> np.ndarray:
    img = sitk.ReadImage(str(path))
    img = sitk.Resample(
        img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    return sitk.GetArrayFromImage(img)


def compare_subject(subject_dir: Path, truth_dir: Path) -> list[dict[str, Any]]:
    """One row per session, side and structure: true and measured volume (mL), error, Dice.

    Parameters
    ----------
    subject_dir : Path
        ``<results_dir>/<subject>`` of a workflow run.
    truth_dir : Path
        The phantom folder holding ``truth.json`` and ``truth/``.
    """
    truth = json.loads((truth_dir / "truth.json").read_text(encoding="utf-8"))
    measured: dict[tuple[str, str, str], float] = {}
    for r in read_tsv(subject_dir / "volumes.tsv"):
        measured[(r["study_date"], r["side"], r["structure"])] = float(r["volume_ml"])
    rows = []
    for s in truth["sessions"]:
        dseg_path = next((subject_dir / f"ses-{s['session']}").glob("*_dseg.nii.gz"))
        dseg_img = sitk.ReadImage(str(dseg_path))
        seg = sitk.GetArrayFromImage(dseg_img)
        true_lab = _label_array_on(dseg_img, truth_dir / s["label_map"])
        for side in SIDES:
            if side not in truth.get("sides", SIDES):
                continue
            for structure in STRUCTURES:
                labs = structure_labels(side, structure)
                true_ml = float(s["volumes_ml"][side][structure])
                meas_ml = measured.get((s["study_date"], side, structure))
                err_ml = None if meas_ml is None else meas_ml - true_ml
                rows.append(
                    {
                        "study_date": s["study_date"],
                        "day": s["day"],
                        "side": side,
                        "structure": structure,
                        "true_ml": true_ml,
                        "measured_ml": meas_ml,
                        "error_ml": err_ml,
                        "error_pct": None
                        if err_ml is None or true_ml == 0
                        else 100.0 * err_ml / true_ml,
                        "dice": dice(np.isin(seg, labs), np.isin(true_lab, labs)),
                    }
                )
    return rows


def asymmetry_errors(subject_dir: Path, truth_dir: Path) -> list[dict[str, Any]]:
    """Soft-tissue asymmetry (%) measured vs true per session, error in percentage points."""
    truth = json.loads((truth_dir / "truth.json").read_text(encoding="utf-8"))
    meas = {
        r["study_date"]: r
        for r in read_tsv(subject_dir / "longitudinal.tsv")
        if r["structure"] == "soft_tissue"
    }
    out = []
    for s in truth["sessions"]:
        t = s.get("soft_tissue_asymmetry_pct")
        m = meas.get(s["study_date"], {}).get("asymmetry_pct")
        m_val = None if m in (None, "n/a") else float(m)
        out.append(
            {
                "study_date": s["study_date"],
                "day": s["day"],
                "true_pct": t,
                "measured_pct": m_val,
                "error_pp": None if t is None or m_val is None else m_val - t,
            }
        )
    return out


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width text table (Markdown-compatible) of `rows`."""

    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(v.rjust(w) for v, w in zip(b, widths, strict=False)) + " |" for b in body
    ]
    return "\n".join(lines)
