"""Accuracy of the workflow against phantom ground truth: volume error and Dice per structure.

Runs the whole workflow (through the command-line contract) on phantom patients and prints
tables. Default: the demo patient in sample_data/. Usage:

    python benchmarks/accuracy.py [--cases demo,extra] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.evaluation import asymmetry_errors, compare_subject, format_table

ROOT = Path(__file__).resolve().parents[1]

# Extra phantom cases: (name, phantom options, affected_side passed to the workflow)
CASES = {
    "demo": (None, "left"),
    "rightffs": (["--affected-side", "right", "--position", "FFS", "--slice-order",
                  "interleaved", "--seed", "11", "--pixel-mm", "1.2", "--matrix", "208x150",
                  "--slices", "30", "--slice-mm", "6",
                  "--sessions=-2:0.05:4:0.3,5:0.2:8:0.8,28:0.0:0.5:0.05"], "auto"),
    "touching": (["--gap-mm=-4", "--seed", "5", "--bias", "0.3",
                  "--sessions=-1:0.1:10:0.5,10:0.02:12:0.1"], "left"),
}


def run_case(name: str, work: Path) -> tuple[list[dict], list[dict], float]:
    opts, side = CASES[name]
    if opts is None:
        truth_dir = ROOT / "sample_data" / "demo"
    else:
        truth_dir = work / f"phantom_{name}"
        subprocess.run([sys.executable, "-m", "pipeline.cli", "phantom", str(truth_dir),
                        "--subject", name, *opts], check=True, capture_output=True)
    truth = json.loads((truth_dir / "truth.json").read_text())
    results = work / "results"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--quiet", "--config",
         f"input_dir={truth_dir / 'dicom'}", f"subject={name}", f"day0={truth['day0']}",
         f"affected_side={side}", f"results_dir={results}"],
        check=True, cwd=ROOT, capture_output=True)
    elapsed = time.perf_counter() - start
    subject_dir = results / name
    return compare_subject(subject_dir, truth_dir), asymmetry_errors(subject_dir, truth_dir), \
        elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="demo", help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="limbtrack-accuracy-"))
    for name in args.cases.split(","):
        rows, asym, elapsed = run_case(name, work)
        print(f"\n## case {name} (workflow wall time {elapsed:.1f} s)\n")
        print(format_table(rows, ["study_date", "day", "side", "structure", "true_ml",
                                  "measured_ml", "error_ml", "error_pct", "dice"]))
        print("\nSoft-tissue asymmetry\n")
        print(format_table(asym, ["study_date", "day", "true_pct", "measured_pct", "error_pp"]))
        print("\nPer structure (all sessions and sides with a true volume > 0)\n")
        summary = []
        for structure in ("limb", "soft_tissue", "bone", "marrow_lesion", "edema"):
            errs = [abs(r["error_pct"]) for r in rows
                    if r["structure"] == structure and r["error_pct"] is not None]
            dices = [r["dice"] for r in rows if r["structure"] == structure
                     and r["dice"] is not None and r["true_ml"] > 0]
            summary.append({"structure": structure,
                            "median_abs_error_pct": statistics.median(errs) if errs else None,
                            "worst_abs_error_pct": max(errs) if errs else None,
                            "median_dice": statistics.median(dices) if dices else None,
                            "over_10_pct": "YES" if errs and max(errs) > 10 else "no"})
        print(format_table(summary, ["structure", "median_abs_error_pct", "worst_abs_error_pct",
                                     "median_dice", "over_10_pct"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
