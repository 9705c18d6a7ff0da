"""Compare workflow outputs with a phantom's ground truth: volume errors and Dice per structure.

Used by the accuracy benchmark and the end-to-end tests.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.io.files import read_tsv
from pipeline.labels import SIDES, STRUCTURES, structure_labels


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


def truth_volumes(truth_dir: Path, truth: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """True volumes (mL) per session, side and structure over what the workflow may measure.

    That is the phantom's exact truth, except where the image cannot show it: slices the
    phantom made signal-void are left out (as the workflow leaves them out of the extent), and
    when a session's limb is cut by the in-plane edge of its image, every session counts only
    what every session's field of view holds (as the workflow does). Phantom sessions share
    the scanner frame in-plane, so the fields of view are intersected without registration.
    """
    from pipeline.extent import FieldOfView, Geometry, volumes_in_extent

    maps = {}
    for s in truth["sessions"]:
        img = sitk.DICOMOrient(sitk.ReadImage(str(truth_dir / s["label_map"])), "LPS")
        void = s.get("signal_void_slices") or []
        if void:
            arr = sitk.GetArrayFromImage(img)
            arr[void] = 0
            fixed = sitk.GetImageFromArray(arr)
            fixed.CopyInformation(img)
            img = fixed
        maps[s["session"]] = img
    clipped = any(s.get("fov_clipped_sides") for s in truth["sessions"])
    if not clipped and not any(s.get("signal_void_slices") for s in truth["sessions"]):
        return {s["session"]: s["volumes_ml"] for s in truth["sessions"]}
    fovs = [FieldOfView(Geometry.of(m), None) for m in maps.values()] if clipped else []
    return {label: volumes_in_extent(m, None, (-np.inf, np.inf), fovs)
            for label, m in maps.items()}


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
    measured: dict[tuple[str, str, str], float | None] = {}
    for r in read_tsv(subject_dir / "volumes.tsv"):
        measured[(r["study_date"], r["side"], r["structure"])] = (
            None if r["volume_ml"] in ("n/a", "") else float(r["volume_ml"]))
    true_ml_of = truth_volumes(truth_dir, truth)
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
                true_ml = float(true_ml_of[s["session"]][side][structure])
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
                        "dice": None if meas_ml is None
                        else dice(np.isin(seg, labs), np.isin(true_lab, labs)),
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


# --------------------------------------------------------------------------------------------
# Accuracy suite: phantom cases run through the command-line contract, scored against truth
# --------------------------------------------------------------------------------------------

#: Targets of the accuracy suite (issue 4). Percentages are absolute volume errors.
TARGETS = {
    "limb_median_pct": 1.0, "limb_worst_pct": 2.0, "bone_worst_pct": 5.0,
    "lesion_min_dice": 0.80, "lesion_worst_pct": 15.0, "lesion_scored_from_ml": 2.0,
    "edema_min_dice": 0.80, "edema_worst_pct": 15.0, "asymmetry_worst_pp": 1.0,
    "false_lesion_max_ml": 1.0, "false_edema_max_ml": 10.0,
}


@dataclass(frozen=True)
class Case:
    """One phantom patient of the suite: phantom options and the side passed to the workflow."""

    name: str
    what: str
    options: tuple[str, ...]
    affected_side: str = "auto"
    #: QC codes the workflow must raise on this case (what the image cannot show)
    expect_flags: tuple[str, ...] = ()
    #: the response pattern the workflow must find ("": not checked)
    expect_label: str = ""
    #: the case imaging the same patient otherwise (bilaterally), compared volume by volume
    twin: str = ""
    #: text some warning of summary.json must contain ("": not checked)
    expect_warning: str = ""


SUITE: tuple[Case, ...] = (
    Case("fine", "0.8 mm pixels, 3 mm slices, right, small lesion",
         ("--pixel-mm", "0.8", "--slice-mm", "3", "--slices", "44", "--matrix", "320x240",
          "--affected-side", "right", "--seed", "31", "--supersample", "2x3",
          "--sessions=-3:0.06:2.5:0.3,12:0.0:1.2:0.05")),
    Case("coarse", "1.8 mm pixels, 6 mm slices, low SNR, extensive edema",
         ("--pixel-mm", "1.8", "--slice-mm", "6", "--slices", "28", "--matrix", "144x108",
          "--snr-t1", "15", "--snr-stir", "7", "--seed", "32",
          "--sessions=-1:0.15:6:0.9,20:0.02:3:0.2")),
    Case("touching", "legs touching, bias 30 %",
         ("--gap-mm=-6", "--bias", "0.3", "--seed", "33",
          "--sessions=-1:0.12:10:0.5,10:0.03:12:0.15")),
    Case("ffs", "feet first, right, interleaved, 1.2 mm / 6 mm",
         ("--position", "FFS", "--affected-side", "right", "--slice-order", "interleaved",
          "--pixel-mm", "1.2", "--matrix", "208x150", "--slices", "28", "--slice-mm", "6",
          "--seed", "34", "--sessions=-2:0.05:4:0.3,5:0.2:8:0.8")),
    Case("prone", "head first prone, 1.4 mm / 4 mm, descending slices",
         ("--position", "HFP", "--pixel-mm", "1.4", "--matrix", "184x136", "--slices", "40",
          "--slice-mm", "4", "--slice-order", "descending", "--seed", "35",
          "--sessions=0:0.1:5:0.4")),
    Case("biglesion", "adult-size leg, 30 mL lesion, right",
         ("--leg-radius-mm", "68", "--bone-radius-mm", "14", "--cortex-mm", "3.5",
          "--gap-mm", "16", "--pixel-mm", "1.5", "--matrix", "224x160", "--slices", "32",
          "--affected-side", "right", "--seed", "36", "--sessions=0:0.08:30:0.4")),
    Case("tinylesion", "1 mL lesion, no edema, no swelling",
         ("--seed", "37", "--lesion-z", "0.6", "--sessions=0:0.0:1.0:0.0"), "left"),
    Case("edemaonly", "extensive edema and swelling, no lesion",
         ("--seed", "38", "--affected-side", "right", "--sessions=0:0.3:0:1.0")),
    Case("lesiononly", "5 mL lesion, no edema, no swelling, bias 30 %",
         ("--seed", "39", "--bias", "0.3", "--sessions=0:0.0:5:0.0")),
    Case("noisy", "SNR 12 / 6 (T1 / STIR), 3 mL lesion, moderate edema",
         ("--snr-t1", "12", "--snr-stir", "6", "--seed", "40", "--sessions=0:0.1:3:0.5")),
    Case("control1", "negative control: nothing to find, bias 30 %",
         ("--seed", "41", "--bias", "0.3", "--sessions=0:0:0:0,14:0:0:0"), "left"),
    Case("control2", "negative control: nothing, touching, 1.0 mm pixels, noisy",
         ("--seed", "42", "--gap-mm=-4", "--pixel-mm", "1.0", "--matrix", "256x190",
          "--snr-t1", "15", "--snr-stir", "7", "--sessions=0:0:0:0"), "left"),
    Case("single", "one leg in the field of view (left), lesion and edema",
         ("--seed", "43", "--sides", "left", "--sessions=0:0:4:0.4"), "left"),
)

#: Anatomy and acquisition beyond the thigh (issue: regions, vessels, growth plates, QC cases).
#: Small grids (<= 160 x 120, <= 32 slices, <= 2 sessions): about a minute each.
ANATOMY_SUITE: tuple[Case, ...] = (
    Case("calflesion", "calf: lesion in the tibia, edema, vessels",
         ("--region", "calf", "--slices", "24", "--seed", "51",
          "--sessions=-2:0.08:3:0.5,12:0.0:1.5:0.1")),
    Case("kneechild", "knee, child size, growth plates, lesion in the distal femur",
         ("--region", "knee", "--growth-plates", "--leg-radius-mm", "45",
          "--bone-radius-mm", "8.5", "--cortex-mm", "2.2", "--slice-mm", "4", "--slices", "32",
          "--seed", "52", "--sessions=-1:0.06:2.5:0.4,14:0.0:1.0:0.05")),
    Case("calfcontrol", "negative control: calf with vessels, nothing to find",
         ("--region", "calf", "--slices", "24", "--seed", "53", "--sessions=0:0:0:0,14:0:0:0"),
         "left"),
    Case("thighclipped", "thigh, second session clipped in-plane 15 mm on the affected side",
         ("--seed", "54", "--pixel-mm", "1.8", "--slices", "24",
          "--sessions=-1:0.1:4:0.4,10:0.02:2:0.1",
          "--fov-clip", "2:15:affected"), expect_flags=("limb_cut_by_fov",)),
    Case("thighvoid", "thigh, 3 coil-edge void slices at the inferior end of both sessions",
         ("--seed", "55", "--pixel-mm", "1.8", "--slices", "28",
          "--sessions=-1:0.1:4:0.4,10:0.02:2:0.1",
          "--void-slices", "all:3:inferior"), expect_flags=("signal_void_slices",)),
    Case("calfnofatsat", "calf, fluid image without fat suppression, lesion and edema",
         ("--region", "calf", "--no-stir-fat-suppressed", "--slices", "24", "--seed", "56",
          "--sessions=0:0.05:3:0.5"), expect_flags=("fluid_not_fat_suppressed",)),
)


#: Follow-ups of the affected leg alone (issue 18): the contralateral reference carried from
#: the nearest session that images both legs, or refused when that session is too far away.
_AFFONLY = ("--seed", "61", "--pixel-mm", "1.8", "--slices", "24",
            "--sessions=-2:0.05:3:0.3,6:0.25:4.5:0.8,20:0.02:2.5:0.1")
CONTRALATERAL_SUITE: tuple[Case, ...] = (
    Case("affonly", "baseline both legs; flare and resolution on follow-ups of the left leg "
         "alone (reference carried from the baseline)", (*_AFFONLY, "--affected-only", "2,3"),
         "left", expect_flags=("contralateral_from_other_session",),
         expect_label="pseudo-progression"),
    Case("affonlyold", "the only session with both legs 98+ days before the others (too old): "
         "flare and resolution of the left leg alone",
         ("--seed", "62", "--pixel-mm", "1.8", "--slices", "24",
          "--sessions=-100:0.05:3:0.3,-2:0.05:3:0.3,6:0.25:4.5:0.8,20:0.02:2.5:0.1",
          "--affected-only", "2,3,4"),
         "left", expect_flags=("contralateral_too_old",), expect_label="pseudo-progression"),
)


#: One study holding each leg in its own series (issue 18 point 1), the fields of view centred
#: on the legs; `twin` is the same patient imaged bilaterally (same seed: same anatomy).
_SPLIT_FLARE = ("--seed", "63", "--pixel-mm", "1.8", "--slices", "24",
                "--sessions=-2:0.05:3:0.3,6:0.25:4.5:0.8,20:0.02:2.5:0.1")
SPLIT_SUITE: tuple[Case, ...] = (
    Case("split", "each leg in its own series; the right's 1.6 mm pixels, 0.7 x -0.45 mm off "
         "the left's grid, another coil at 0.8 x the signal: flare and resolution",
         (*_SPLIT_FLARE, "--split-series", "--split-right-pixel-mm", "1.6",
          "--split-right-offset-mm", "0.7,-0.45", "--split-right-gain", "0.8"),
         "left", expect_flags=("split_series_differ",), expect_label="pseudo-progression",
         twin="splittwin"),
    Case("splitlat", "each leg in its own series, the right's tagged and described as the "
         "left's, 4 slices fewer, 0.5 x 0.3 mm off the left's grid; right affected",
         ("--seed", "64", "--pixel-mm", "1.8", "--slices", "24", "--affected-side", "right",
          "--sessions=-1:0.1:4:0.4,12:0.02:2:0.1", "--split-series",
          "--split-right-extra-slices=-4", "--split-right-offset-mm", "0.5,0.3",
          "--split-wrong-laterality", "right"),
         expect_label="response", expect_warning="the image geometry shows the right leg"),
    Case("splitaffonly", "affonly with each leg in its own series: baseline both legs, "
         "follow-ups of the left leg alone in its own field of view",
         (*_AFFONLY, "--affected-only", "2,3", "--split-series"),
         "left", expect_flags=("contralateral_from_other_session",),
         expect_label="pseudo-progression", twin="affonly"),
)
#: The bilateral twins of the split cases not in another suite.
SPLIT_TWINS: tuple[Case, ...] = (
    Case("splittwin", "the patient of 'split' imaged bilaterally", _SPLIT_FLARE, "left",
         expect_label="pseudo-progression"),
)


def measured_volumes(subject_dir: Path) -> dict[tuple[str, str, str], float | None]:
    """``volumes.tsv`` of a workflow run: (study_date, side, structure) -> mL (None: n/a)."""
    return {(r["study_date"], r["side"], r["structure"]):
            None if r["volume_ml"] in ("", "n/a") else float(r["volume_ml"])
            for r in read_tsv(subject_dir / "volumes.tsv")}


def twin_differences(case_ml: dict[tuple[str, str, str], float | None],
                     twin_ml: dict[tuple[str, str, str], float | None],
                     true_ml: dict[tuple[str, str, str], float] | None = None,
                     twin_true_ml: dict[tuple[str, str, str], float] | None = None,
                     ) -> list[dict[str, Any]]:
    """Per session, side and structure: a case's measured volume against its twin's (the same
    patient imaged otherwise), difference in %; with the truths, the true difference too.
    ``imaged`` is False for a side the case's session does not image (no limb measured: a
    follow-up of the affected leg alone)."""
    imaged = {(d, side) for (d, side, st), v in case_ml.items() if st == "limb" and v}
    rows = []
    for key in sorted(k for k in case_ml if k in twin_ml):
        a, b = case_ml[key], twin_ml[key]
        row: dict[str, Any] = {"study_date": key[0], "side": key[1], "structure": key[2],
                               "imaged": (key[0], key[1]) in imaged, "case_ml": a, "twin_ml": b,
                               "diff_pct": None if a is None or not b else 100.0 * (a - b) / b}
        if true_ml is not None and key in true_ml:
            row["true_ml"] = true_ml[key]
        if true_ml is not None and twin_true_ml is not None and key in true_ml:
            t, u = true_ml[key], twin_true_ml.get(key)
            row["true_diff_pct"] = None if not u else 100.0 * (t - u) / u
        rows.append(row)
    return rows


def summarise_twin(name: str, twin: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest |difference| (%) per structure between a case and its twin, over the sessions
    and sides the case images (lesion from 2 mL, edema from 10 mL, as the accuracy targets
    score them: of the true volume where the rows have it, else of the twin's)."""
    floor = {"marrow_lesion": TARGETS["lesion_scored_from_ml"], "edema": 10.0}
    out: dict[str, Any] = {"case": name, "twin": twin}
    for structure in STRUCTURES:
        vals = [abs(r["diff_pct"]) for r in rows if r["structure"] == structure
                and r["diff_pct"] is not None and r.get("imaged", True)
                and (r.get("true_ml", r["twin_ml"]) or 0) >= floor.get(structure, 0)]
        out[f"{structure}_worst_pct"] = max(vals) if vals else None
    return out


def hybrid_true_ml(truth: dict[str, Any]) -> dict[tuple[str, str, str], float]:
    """Inserted lesion and edema (mL) of a hybrid case's truth.json per (study_date, side,
    structure); the contralateral leg has none."""
    other = "right" if truth["affected_side"] == "left" else "left"
    out = {}
    for s in truth["sessions"]:
        for structure, key in (("marrow_lesion", "lesion_ml"), ("edema", "edema_ml")):
            out[(s["study_date"], truth["affected_side"], structure)] = float(s[key])
            out[(s["study_date"], other, structure)] = 0.0
    return out


def run_case(case: Case, work: Path, python: str, root: Path) -> dict[str, Any]:
    """Generate the case's phantom, run the workflow on it, score it. Returns a result dict."""
    import subprocess
    import time

    truth_dir = work / f"phantom_{case.name}"
    if not (truth_dir / "truth.json").is_file():
        subprocess.run([python, "-m", "pipeline.cli", "phantom", str(truth_dir), "--subject",
                        case.name, *case.options], check=True, capture_output=True)
    truth = json.loads((truth_dir / "truth.json").read_text(encoding="utf-8"))
    results = work / "results"
    start = time.perf_counter()
    proc = subprocess.run(
        [python, "-m", "snakemake", "--cores", "2", "--quiet", "--forceall", "--config",
         f"input_dir={truth_dir / 'dicom'}", f"subject={case.name}",
         f"day0={truth['day0']}", f"affected_side={case.affected_side}",
         f"results_dir={results}"], cwd=root, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        return {"case": case, "error": (proc.stdout + proc.stderr)[-2000:], "seconds": elapsed}
    subject_dir = results / case.name
    summary = json.loads((subject_dir / "summary.json").read_text(encoding="utf-8"))
    return {"case": case, "truth": truth, "rows": compare_subject(subject_dir, truth_dir),
            "asymmetry": asymmetry_errors(subject_dir, truth_dir), "summary": summary,
            "seconds": elapsed}


def score_case(result: dict[str, Any]) -> dict[str, Any]:
    """Worst errors of a case, and whether each target is met (None: not applicable)."""
    if "error" in result:
        return {"case": result["case"].name, "ok": False, "failed": "workflow error"}
    rows, truth, t = result["rows"], result["truth"], TARGETS

    def worst(structure: str, min_true: float = 0.0) -> float | None:
        errs = [abs(r["error_pct"]) for r in rows if r["structure"] == structure
                and r["error_pct"] is not None and r["true_ml"] > min_true]
        return max(errs) if errs else None

    def min_dice(structure: str, min_true: float) -> float | None:
        d = [r["dice"] for r in rows if r["structure"] == structure and r["true_ml"] > min_true
             and r["dice"] is not None]
        return min(d) if d else None

    def false_ml(structure: str) -> float:
        return max([r["measured_ml"] or 0.0 for r in rows if r["structure"] == structure
                    and r["true_ml"] == 0] or [0.0])

    asym = [abs(a["error_pp"]) for a in result["asymmetry"] if a["error_pp"] is not None]
    has_finding = any(s["volumes_ml"][truth["affected_side"]]["marrow_lesion"] > 0
                      or s["params"]["swelling"] > 0 or s["params"]["edema"] > 0
                      for s in truth["sessions"])
    side_ok = None
    if result["case"].affected_side == "auto" and has_finding:
        side_ok = result["summary"]["affected_side"] == truth["affected_side"]
    limb_errs = [abs(r["error_pct"]) for r in rows if r["structure"] == "limb"
                 and r["error_pct"] is not None]
    out = {
        "case": result["case"].name,
        "limb_median_pct": statistics.median(limb_errs) if limb_errs else None,
        "limb_worst_pct": worst("limb"), "bone_worst_pct": worst("bone"),
        "lesion_min_dice": min_dice("marrow_lesion", t["lesion_scored_from_ml"]),
        "lesion_worst_pct": worst("marrow_lesion", t["lesion_scored_from_ml"]),
        "edema_min_dice": min_dice("edema", 10.0), "edema_worst_pct": worst("edema", 10.0),
        "asymmetry_worst_pp": max(asym) if asym else None,
        "false_lesion_ml": false_ml("marrow_lesion"), "false_edema_ml": false_ml("edema"),
        "side_auto_ok": side_ok, "seconds": result["seconds"],
        "qc_codes": ",".join(sorted({f["code"] for f in result["summary"].get("qc_flags", [])})),
        "flags_ok": set(result["case"].expect_flags)
        <= {f["code"] for f in result["summary"].get("qc_flags", [])},
        "label": result["summary"]["classification"],
        "label_ok": None if not result["case"].expect_label
        else result["summary"]["classification"] == result["case"].expect_label,
        "warning_ok": None if not result["case"].expect_warning
        else any(result["case"].expect_warning in w
                 for w in result["summary"].get("warnings", [])),
    }
    checks = {
        "limb_median_pct": lambda v: v <= t["limb_median_pct"],
        "limb_worst_pct": lambda v: v <= t["limb_worst_pct"],
        "bone_worst_pct": lambda v: v <= t["bone_worst_pct"],
        "lesion_min_dice": lambda v: v >= t["lesion_min_dice"],
        "lesion_worst_pct": lambda v: v <= t["lesion_worst_pct"],
        "edema_min_dice": lambda v: v >= t["edema_min_dice"],
        "edema_worst_pct": lambda v: v <= t["edema_worst_pct"],
        "asymmetry_worst_pp": lambda v: v <= t["asymmetry_worst_pp"],
        "false_lesion_ml": lambda v: v <= t["false_lesion_max_ml"],
        "false_edema_ml": lambda v: v <= t["false_edema_max_ml"],
        "side_auto_ok": lambda v: bool(v),
        "flags_ok": lambda v: bool(v),
        "label_ok": lambda v: bool(v),
        "warning_ok": lambda v: bool(v),
    }
    failed = [k for k, ok in checks.items() if out[k] is not None and not ok(out[k])]
    out["ok"] = not failed
    out["failed"] = ", ".join(failed)
    return out
