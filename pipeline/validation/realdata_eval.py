"""Real legs as the measure: invariants of healthy legs and hybrid cases, scored against truth.

Used by ``benchmarks/realdata_legs.py`` and ``tests/test_realdata_legs.py``. Every case runs
through the command-line contract (Snakemake on a NIfTI sessions sheet), as an outside check
would.

* **Invariant cases** (:func:`write_invariant_case`): the same healthy legs scanned twice on one
  day: the first session's anatomical image is the in-phase Dixon echo, the second's another
  contrast of the same anatomy (the in-phase echo again, a T1-spin-echo-like water + 1.8 x fat
  image, or the out-of-phase echo), optionally on another grid (table shift, rotation, voxel
  size); the fluid image is the Dixon water image. What healthy legs guarantee is checked:
  bones of the two legs of near-equal volume, no marrow lesion, the same limb and bone volume
  in both sessions, and a label that is never ``progression``, ``pseudo-progression`` or
  ``response``.
* **Hybrid cases** (:data:`pipeline.validation.hybrid.HYBRID_SUITE`):
  inserted lesion, edema and swelling
  of known size; the measured volumes, Dice and asymmetry change are compared with the truth.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.io.files import read_tsv
from pipeline.labels import structure_labels
from pipeline.longitudinal import _pct
from pipeline.validation import hybrid
from pipeline.validation.evaluation import dice

#: Targets of issue 12 (percent, mL, percentage points, Dice).
REAL_TARGETS: dict[str, float] = {
    "bone_left_right_pct": 3.0, "lesion_max_ml": 0.0, "limb_same_day_pct": 2.0,
    "bone_same_day_pct": 4.0, "registration_bone_dice": 0.85,
}
HYBRID_TARGETS: dict[str, float] = {
    "lesion_pct": 15.0, "lesion_dice": 0.8, "lesion_scored_from_ml": 2.0, "edema_pct": 15.0,
    "swelling_pp": 1.0,
}
NOT_FOR_HEALTHY = ("progression", "pseudo-progression", "response")


@dataclass(frozen=True)
class InvariantCase:
    """Two same-day sessions of one region's healthy legs (see the module docstring)."""

    name: str
    region: hybrid.Region
    follow_up_t1: str  # 'in_phase', 't1_like', 'out_of_phase' or 'water'
    moved: bool = False
    expect_flags: tuple[str, ...] = ()


INVARIANT_CASES: tuple[InvariantCase, ...] = (
    InvariantCase("thigh_same", "thigh", "in_phase"),
    InvariantCase("thigh_t1like", "thigh", "t1_like"),
    InvariantCase("thigh_outofphase", "thigh", "out_of_phase",
                  expect_flags=("anatomical_not_t1_like",)),
    InvariantCase("thigh_water_as_t1", "thigh", "water",
                  expect_flags=("anatomical_not_t1_like",)),
    InvariantCase("calf_same", "calf", "in_phase"),
    InvariantCase("calf_t1like_moved", "calf", "t1_like", moved=True),
    InvariantCase("calf_outofphase", "calf", "out_of_phase",
                  expect_flags=("anatomical_not_t1_like",)),
)


def _t1_image(src: hybrid.Source, kind: str) -> np.ndarray:
    if kind == "in_phase":
        return np.asarray(src.in_phase, dtype=np.float32)
    if kind == "out_of_phase":
        return np.asarray(src.out_of_phase, dtype=np.float32)
    if kind == "water":  # a fat-suppressed image given as the anatomical one
        return np.asarray(src.water, dtype=np.float32)
    if kind == "t1_like":  # fat brighter than muscle, as on a T1 spin echo
        return np.where(src.in_phase > 0, src.water + 1.8 * src.fat, src.in_phase).astype(
            np.float32)
    raise ValueError(f"unknown anatomical contrast {kind!r}")


def _moved(image: sitk.Image, shift_mm: float, rotation_deg: float,
           spacing_mm: tuple[float, float, float]) -> sitk.Image:
    """`image` resampled onto another grid over the same field of view, the anatomy moved by
    `shift_mm` along z and rotated by `rotation_deg` about z through the image centre."""
    size = np.array(image.GetSize())
    centre = image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0))
    tr = sitk.Euler3DTransform()
    tr.SetCenter(centre)
    tr.SetRotation(0.0, 0.0, np.deg2rad(rotation_deg))
    tr.SetTranslation((0.0, 0.0, shift_mm))
    extent = size * np.array(image.GetSpacing())
    new_size = [max(4, int(round(e / s))) for e, s in zip(extent, spacing_mm, strict=True)]
    ref = sitk.Image(new_size, sitk.sitkFloat32)
    ref.SetSpacing(spacing_mm)
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.GetOrigin())
    # the anatomy moves by tr: a point p of the new image shows what was at tr^-1(p)
    return sitk.Resample(image, ref, tr.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def write_invariant_case(case: InvariantCase, out_dir: Path,
                         realdata: str | Path | None = None) -> dict[str, Any]:
    """Write the sessions sheet and images of an invariant case; returns its description."""
    src = hybrid.load_source(case.region, None if realdata is None else str(realdata))
    out_dir.mkdir(parents=True, exist_ok=True)
    subject = case.name.replace("_", "")
    day0 = "2024-01-15"
    rows = []
    for date, t1_kind, moved in (("2024-01-15", "in_phase", False),
                                 ("2024-01-16", case.follow_up_t1, case.moved)):
        ses = out_dir / f"ses-{date.replace('-', '')}"
        ses.mkdir(exist_ok=True)
        for role, arr in (("anatomical", _t1_image(src, t1_kind)),
                          ("fluid", np.asarray(src.water, dtype=np.float32))):
            img = hybrid.to_sitk(arr, np.asarray(src.affine))
            if moved:
                img = _moved(img, 10.0, 3.0, (0.8, 0.8, 4.0))
            path = ses / f"{role}.nii.gz"
            sitk.WriteImage(img, str(path), useCompression=True)
            rows.append((subject, date, role, str(path.relative_to(out_dir))))
    with open(out_dir / "sessions.tsv", "w", encoding="utf-8") as fh:
        fh.write("subject\tstudy_date\trole\tpath\n")
        fh.writelines("\t".join(r) + "\n" for r in rows)
    info = {"case": case.name, "subject": subject, "day0": day0, "region": case.region,
            "follow_up_t1": case.follow_up_t1, "moved": case.moved,
            "expect_flags": list(case.expect_flags)}
    (out_dir / "case.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def run_workflow(sheet: Path, subject: str, day0: str, affected_side: str, results: Path,
                 root: Path, python: str, cores: int = 2) -> tuple[Path, float, str]:
    """Run the command-line contract on a sessions sheet: (subject dir, seconds, log tail)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [python, "-m", "snakemake", "--cores", str(cores), "--quiet", "--forceall",
         "--config", f"input_dir={sheet}", f"subject={subject}", f"day0={day0}",
         f"affected_side={affected_side}", f"results_dir={results}"],
        cwd=root, capture_output=True, text=True)
    tail = "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:]
    return results / subject, time.perf_counter() - start, tail


def _volumes(subject_dir: Path) -> dict[tuple[str, str, str], float | None]:
    return {(r["study_date"], r["side"], r["structure"]):
            None if r["volume_ml"] in ("", "n/a") else float(r["volume_ml"])
            for r in read_tsv(subject_dir / "volumes.tsv")}


def score_invariant(subject_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """What the healthy legs of an invariant case say (see the module docstring)."""
    summary = json.loads((subject_dir / "summary.json").read_text(encoding="utf-8"))
    vols = _volumes(subject_dir)
    dates = sorted({k[0] for k in vols})
    first, second = dates[0], dates[-1]

    def lr(date: str) -> float | None:
        return _pct(vols[(date, "left", "bone")], vols[(date, "right", "bone")])

    def worst(values: Sequence[float | None]) -> float | None:
        vals = [abs(v) for v in values if v is not None]
        return max(vals) if vals else None

    reg: dict[str, Any] = summary.get("registration", {})
    first_reg: dict[str, Any] = next(iter(reg.values()), {})
    quality = first_reg.get("quality") or {}
    codes = sorted({f["code"] for f in summary.get("qc_flags", [])})
    lesion = [v for (d, s, st), v in vols.items() if st == "marrow_lesion" and v is not None]
    edema = [v for (d, s, st), v in vols.items() if st == "edema" and v is not None]
    return {
        "case": info["case"],
        "bone_lr_pct_first": lr(first), "bone_lr_pct_second": lr(second),
        "limb_same_day_pct": worst([_pct(vols[(second, s, "limb")], vols[(first, s, "limb")])
                                    for s in ("left", "right")]),
        "bone_same_day_pct": worst([_pct(vols[(second, s, "bone")], vols[(first, s, "bone")])
                                    for s in ("left", "right")]),
        "lesion_max_ml": max(lesion) if lesion else None,
        "edema_max_ml": max(edema) if edema else None,
        "registration_bone_dice": quality.get("bone_dice"),
        "qc_codes": ",".join(codes) or "-",
        "flags_ok": set(info["expect_flags"]) <= set(codes),
        "label": summary["classification"],
        "label_ok": summary["classification"] not in NOT_FOR_HEALTHY,
    }


def _mask_on(reference: sitk.Image, path: Path) -> np.ndarray:
    img = sitk.Resample(sitk.ReadImage(str(path)), reference, sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(img) > 0


def score_hybrid(subject_dir: Path, truth: dict[str, Any], case_dir: Path) -> dict[str, Any]:
    """Per session of a hybrid case: inserted vs measured lesion, edema (mL, %, Dice) and
    swelling (asymmetry change since baseline, pp); and the case's pattern and flags."""
    summary = json.loads((subject_dir / "summary.json").read_text(encoding="utf-8"))
    vols = _volumes(subject_dir)
    longi = {(r["study_date"], r["structure"]): r
             for r in read_tsv(subject_dir / "longitudinal.tsv")}
    side = truth["affected_side"]
    base_date = summary["baseline_study_date"]
    base_truth = next(s for s in truth["sessions"] if s["study_date"] == base_date)
    rows = []
    for s in truth["sessions"]:
        date = s["study_date"]
        label = date.replace("-", "")
        dseg = next((subject_dir / f"ses-{label}").glob("*_dseg.nii.gz"))
        seg_img = sitk.ReadImage(str(dseg))
        seg = sitk.GetArrayFromImage(seg_img)
        row: dict[str, Any] = {"case": truth["case"], "study_date": date, "day": s["day"]}
        for structure, key in (("marrow_lesion", "lesion"), ("edema", "edema")):
            true_ml = float(s[f"{key}_ml"])
            meas = vols.get((date, side, structure))
            row[f"{key}_true_ml"] = true_ml
            row[f"{key}_ml"] = meas
            row[f"{key}_pct"] = None if meas is None or true_ml == 0 else _pct(meas, true_ml)
            mask = s.get(f"{key}_mask")
            row[f"{key}_dice"] = None
            if mask and meas is not None and true_ml > 0:
                row[f"{key}_dice"] = dice(np.isin(seg, structure_labels(side, structure)),
                                          _mask_on(seg_img, case_dir / mask))
        a = longi.get((date, "soft_tissue"), {}).get("asymmetry_pct")
        a0 = longi.get((base_date, "soft_tissue"), {}).get("asymmetry_pct")
        true_change = float(s["true_asymmetry_change_pp"]) - float(
            base_truth["true_asymmetry_change_pp"])
        row["swelling_true_pp"] = true_change
        row["swelling_pp"] = None if a in (None, "n/a") or a0 in (None, "n/a") else (
            float(a) - float(a0))
        row["swelling_error_pp"] = None if row["swelling_pp"] is None else (
            row["swelling_pp"] - true_change)
        rows.append(row)
    codes = sorted({f["code"] for f in summary.get("qc_flags", [])})
    expected = truth["expected_pattern"]["pattern"]
    excluding = {"fluid_not_fat_suppressed", "anatomical_not_t1_like"}
    if excluding & set(truth.get("expected_flags", [])):
        expected = "indeterminate"  # what the image cannot show leaves the pattern undecided
    quality = [r.get("quality") or {} for r in summary.get("registration", {}).values()]
    dices = [q["bone_dice"] for q in quality if q.get("bone_dice") is not None]
    return {
        "rows": rows,
        "label": summary["classification"],
        "expected": expected,
        "qc_codes": ",".join(codes) or "-",
        "flags_ok": set(truth.get("expected_flags", [])) <= set(codes),
        "registration_bone_dice": min(dices) if dices else None,
    }


def summarise_hybrid(name: str, scored: dict[str, Any]) -> dict[str, Any]:
    """Worst errors of a hybrid case against :data:`HYBRID_TARGETS`."""
    t = HYBRID_TARGETS
    rows = scored["rows"]

    def worst(key: str, cond: Any) -> float | None:
        vals = [abs(r[key]) for r in rows if r[key] is not None and cond(r)]
        return max(vals) if vals else None

    def least(key: str, cond: Any) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None and cond(r)]
        return min(vals) if vals else None

    big = lambda r: r["lesion_true_ml"] >= t["lesion_scored_from_ml"]  # noqa: E731
    out = {
        "case": name,
        "lesion_worst_pct": worst("lesion_pct", big),
        "lesion_min_dice": least("lesion_dice", big),
        "edema_worst_pct": worst("edema_pct", lambda r: r["edema_true_ml"] >= 10.0),
        "edema_min_dice": least("edema_dice", lambda r: r["edema_true_ml"] >= 10.0),
        "swelling_worst_pp": worst("swelling_error_pp", lambda r: True),
        "false_lesion_ml": max([r["lesion_ml"] or 0.0 for r in rows
                                if r["lesion_true_ml"] == 0] or [0.0]),
        "registration_bone_dice": scored["registration_bone_dice"],
        "qc_codes": scored["qc_codes"], "flags_ok": scored["flags_ok"],
        "label": scored["label"], "expected": scored["expected"],
        "label_ok": scored["label"] == scored["expected"],
    }
    checks = {
        "lesion_worst_pct": lambda v: v <= t["lesion_pct"],
        "lesion_min_dice": lambda v: v >= t["lesion_dice"],
        "edema_worst_pct": lambda v: v <= t["edema_pct"],
        "swelling_worst_pp": lambda v: v <= t["swelling_pp"],
        "flags_ok": bool, "label_ok": bool,
    }
    failed = [k for k, ok in checks.items() if out[k] is not None and not ok(out[k])]
    out["failed"] = ", ".join(failed) or "-"
    return out
