"""Detection of true changes against the measurement error (issue 13).

Phantom patients whose follow-ups carry true changes of known size (swelling, lesion, edema;
each session also repositioned), run through the command-line contract. For every follow-up
session and criterion the true change (from the phantom's truth over the same extent) is set
against the MDC95 the workflow reports (`longitudinal.tsv`):

* swelling: soft-tissue asymmetry change (pp) vs `asymmetry_change_pp_ci95`;
* lesion, edema, limb: affected volume change (mL) vs `1.96 sqrt(sd1^2 + sd2^2)`;

the truth counted over the common extent the workflow measured (each session's anatomy at
its table shift), as in benchmarks/longitudinal.py.

A change is *detected* when the measured change exceeds its MDC95 with the true sign. Printed:
detection rate where the true change is >= 2 x MDC95 (target >= 95 %), the rate of changes
called beyond the MDC95 where the true change is < 0.5 x MDC95 (false change), and every row.

    python benchmarks/detection.py [--work DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from pipeline.extent import volumes_in_extent
from pipeline.io.files import finite_float, read_tsv
from pipeline.validation.evaluation import Case, format_table, run_case

ROOT = Path(__file__).resolve().parents[1]

#: DAY:SWELLING:LESION:EDEMA:SHIFT sessions, each with repositioning (table shift, mm).
CASES: tuple[Case, ...] = (
    Case("detswell", "swelling steps 0-20 %, thigh 1.6 mm / 5 mm",
         ("--seed", "61", "--slices", "24", "--matrix", "144x108",
          "--sessions=-2:0.04:3:0.2:0,4:0.06:3:0.2:4,8:0.09:3:0.2:-3,15:0.15:3:0.2:6,"
          "30:0.22:3:0.2:-5"), "left"),
    Case("detlesion", "lesion steps 2-9 mL, thigh 1.2 mm / 4 mm",
         ("--seed", "62", "--slices", "30", "--slice-mm", "4", "--pixel-mm", "1.2",
          "--matrix", "176x132",
          "--affected-side", "right",
          "--sessions=-2:0.05:2:0.2:0,5:0.05:2.6:0.2:5,10:0.05:3.5:0.2:-4,20:0.05:5.5:0.2:3,"
          "40:0.05:9:0.2:-6"), "right"),
    Case("detedema", "edema steps, thigh 1.8 mm / 6 mm",
         ("--seed", "63", "--slices", "22", "--slice-mm", "6", "--pixel-mm", "1.8",
          "--matrix", "128x96",
          "--sessions=-1:0.05:4:0.1:0,3:0.05:4:0.3:6,7:0.08:4:0.5:-4,14:0.1:4:0.8:5,"
          "28:0.05:4:0.15:-2"), "left"),
    Case("detcalf", "calf: swelling and edema up and down, lesion down",
         ("--region", "calf", "--seed", "64", "--slices", "24", "--affected-side", "right",
          "--sessions=-2:0.03:4:0.2:0,3:0.12:4:0.6:5,9:0.2:3:0.8:-5,21:0.06:2:0.3:4,"
          "45:0.03:1:0.1:-3"), "right"),
)

def true_volumes(result: dict[str, Any]) -> dict[tuple[str, str, str], float]:
    """The phantom's true volumes over the extent the workflow measured (the common extent,
    in baseline coordinates; each session's anatomy sits at its table shift)."""
    phantom_dir = Path(result["phantom_dir"])
    extent = result["summary"]["extent_mm"]
    out: dict[tuple[str, str, str], float] = {}
    for s in result["truth"]["sessions"]:
        xfm = sitk.TranslationTransform(3, (0.0, 0.0, s["params"]["table_shift_mm"]))
        vols = volumes_in_extent(phantom_dir / s["label_map"], xfm,
                                 (extent["z_min_mm"], extent["z_max_mm"]))
        for side, by_structure in vols.items():
            for structure, ml in by_structure.items():
                out[(s["study_date"], side, structure)] = float(ml or 0.0)
    return out


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per follow-up session and criterion: true and measured change, MDC95."""
    case: Case = result["case"]
    subject_dir = Path(result["subject_dir"])
    side = result["summary"]["affected_side"]
    other = "left" if side == "right" else "right"
    true = true_volumes(result)
    long = {(r["study_date"], r["structure"]): r
            for r in read_tsv(subject_dir / "longitudinal.tsv")}
    dates = sorted({s["study_date"] for s in result["truth"]["sessions"]})
    base = result["summary"]["baseline_study_date"]
    out = []
    for date in dates:
        if date == base:
            continue
        soft = long[(date, "soft_tissue")]

        def asym(d: str) -> float:
            return 100.0 * (true[(d, side, "soft_tissue")] / true[(d, other, "soft_tissue")] - 1)

        entries = [("swelling (asymmetry pp)", asym(date) - asym(base),
                    finite_float(soft["asymmetry_change_pp"]),
                    finite_float(soft["asymmetry_change_pp_ci95"]))]
        for structure in ("limb", "marrow_lesion", "edema"):
            now, then = long[(date, structure)], long[(base, structure)]
            m, m0 = finite_float(now["affected_ml"]), finite_float(then["affected_ml"])
            c, c0 = finite_float(now["affected_ml_ci95"]), finite_float(then["affected_ml_ci95"])
            entries.append((f"{structure} (mL)",
                            true[(date, side, structure)] - true[(base, side, structure)],
                            None if m is None or m0 is None else m - m0,
                            None if c is None or c0 is None else math.hypot(c, c0)))
        for criterion, t, m, mdc in entries:
            ratio = None if not mdc else abs(t) / mdc
            beyond = None if m is None or mdc is None else abs(m) > mdc
            out.append({
                "case": case.name, "date": date, "criterion": criterion,
                "true_change": t, "measured_change": m, "mdc95": mdc,
                "true_over_mdc": ratio,
                "called_beyond": None if beyond is None else ("yes" if beyond else "no"),
                "detected": None if beyond is None else bool(
                    beyond and m is not None and math.copysign(1, m) == math.copysign(1, t)),
            })
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="limbtrack-detection-"))
    rows: list[dict[str, Any]] = []
    for case in CASES:
        result = run_case(case, work, sys.executable, ROOT)
        if "error" in result:
            print(f"{case.name}: workflow failed:\n{result['error']}")
            return 1
        result["subject_dir"] = work / "results" / case.name
        result["phantom_dir"] = work / f"phantom_{case.name}"
        rows += rows_of(result)
    large = [r for r in rows if r["true_over_mdc"] is not None and r["true_over_mdc"] >= 2
             and r["detected"] is not None]
    small = [r for r in rows if r["true_over_mdc"] is not None and r["true_over_mdc"] < 0.5
             and r["called_beyond"] is not None]
    print(format_table(rows, ["case", "date", "criterion", "true_change", "measured_change",
                              "mdc95", "true_over_mdc", "called_beyond", "detected"]))
    print()
    detected = sum(bool(r["detected"]) for r in large)
    false = sum(r["called_beyond"] == "yes" for r in small)
    print(format_table([
        {"set": "true change >= 2 x MDC95", "n": len(large), "called beyond MDC95": detected,
         "rate_pct": 100.0 * detected / len(large) if large else None, "target": ">= 95 %"},
        {"set": "true change < 0.5 x MDC95", "n": len(small), "called beyond MDC95": false,
         "rate_pct": 100.0 * false / len(small) if small else None, "target": "~5 % or less"},
    ], ["set", "n", "called beyond MDC95", "rate_pct", "target"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
