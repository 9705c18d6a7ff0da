"""Real legs: invariants of healthy legs and hybrid cases, through the command-line contract.

Prints two tables against the targets of issue 12 (not a timed test):

- real invariants: the healthy legs of ``../shared/realdata/legs`` scanned twice on one day
  with another anatomical contrast (and grid): bone left vs right, lesion, same-day limb and
  bone agreement, registration bone Dice, QC flags and label;
- hybrid cases (:data:`pipeline.validation.hybrid.HYBRID_SUITE`): inserted lesion, edema, swelling.

    python benchmarks/realdata_legs.py                  # everything (about 20 min on 2 cores)
    python benchmarks/realdata_legs.py --only invariants --cases thigh_same,calf_same
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pipeline.validation import hybrid
from pipeline.validation.evaluation import format_table
from pipeline.validation.realdata_eval import (
    HYBRID_TARGETS,
    INVARIANT_CASES,
    REAL_TARGETS,
    run_workflow,
    score_hybrid,
    score_invariant,
    summarise_hybrid,
    write_invariant_case,
)

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["invariants", "hybrid"], default=None)
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--work", type=Path, default=None, help="work folder (cases are reused)")
    p.add_argument("--detail", action="store_true", help="per-session rows of hybrid cases")
    args = p.parse_args()
    try:
        hybrid.realdata_dir()
    except hybrid.RealDataMissing as err:
        print(f"skipped: {err}")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="limbtrack-realdata-"))
    wanted = set(filter(None, args.cases.split(",")))
    results = work / "results"
    if args.only in (None, "invariants"):
        rows = []
        for case in INVARIANT_CASES:
            if wanted and case.name not in wanted:
                continue
            case_dir = work / "invariant" / case.name
            if not (case_dir / "case.json").is_file():
                write_invariant_case(case, case_dir)
            info = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
            subject_dir, seconds, err = run_workflow(case_dir / "sessions.tsv", info["subject"],
                                                     info["day0"], "left", results, ROOT,
                                                     sys.executable)
            print(f"{case.name}: {seconds:.0f} s" + (f"\n{err}" if err else ""), flush=True)
            if not err:
                rows.append(score_invariant(subject_dir, info) | {"seconds": seconds})
        print("\n## Real invariants (healthy legs, same-day rescans)\n")
        print("Targets: " + ", ".join(f"{k} {v:g}" for k, v in REAL_TARGETS.items()) + "\n")
        print(format_table(rows, ["case", "bone_lr_pct_first", "bone_lr_pct_second",
                                  "limb_same_day_pct", "bone_same_day_pct", "lesion_max_ml",
                                  "edema_max_ml", "registration_bone_dice", "qc_codes",
                                  "flags_ok", "label", "label_ok", "seconds"]))
    if args.only in (None, "hybrid"):
        rows, detail = [], []
        for case in hybrid.HYBRID_SUITE:
            if wanted and case.name not in wanted:
                continue
            case_dir = work / "hybrid" / case.name
            if not (case_dir / "truth.json").is_file():
                case.write(case_dir)
            truth = json.loads((case_dir / "truth.json").read_text(encoding="utf-8"))
            subject_dir, seconds, err = run_workflow(
                case_dir / "sessions.tsv", truth["subject"], truth["day0"],
                truth["affected_side"], results, ROOT, sys.executable)
            print(f"{case.name}: {seconds:.0f} s" + (f"\n{err}" if err else ""), flush=True)
            if err:
                continue
            scored = score_hybrid(subject_dir, truth, case_dir)
            detail += scored["rows"]
            rows.append(summarise_hybrid(case.name, scored) | {"seconds": seconds})
        if args.detail:
            print(format_table(detail, ["case", "day", "lesion_true_ml", "lesion_ml",
                                        "lesion_pct", "lesion_dice", "edema_true_ml",
                                        "edema_ml", "edema_pct", "edema_dice",
                                        "swelling_true_pp", "swelling_pp",
                                        "swelling_error_pp"]))
        print("\n## Hybrid cases (real anatomy, inserted changes)\n")
        print("Targets: " + ", ".join(f"{k} {v:g}" for k, v in HYBRID_TARGETS.items()) + "\n")
        print(format_table(rows, ["case", "lesion_worst_pct", "lesion_min_dice",
                                  "edema_worst_pct", "swelling_worst_pp", "false_lesion_ml",
                                  "registration_bone_dice", "qc_codes", "flags_ok", "label",
                                  "expected", "failed", "seconds"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
