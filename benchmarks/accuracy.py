"""Accuracy suite: phantom patients through the command-line contract, scored against truth.

With ``--real`` (and with ``--cases all``) it then runs ``benchmarks/realdata_legs.py``: the
real-leg invariants and the hybrid cases, so that one command reports all three tables.

Prints, per case, every session / side / structure (Dice, volume error in mL and %), the
soft-tissue asymmetry error (pp), and a summary against the targets of issue 4.

    python benchmarks/accuracy.py                 # the 13 suite cases + the demo patient
    python benchmarks/accuracy.py --cases demo    # only some
    python benchmarks/accuracy.py --cases contralateral  # follow-ups of the affected leg alone
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipeline.validation.evaluation import (
    ANATOMY_SUITE,
    CONTRALATERAL_SUITE,
    SUITE,
    TARGETS,
    Case,
    format_table,
    run_case,
    score_case,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = Case("demo", "the demo patient in sample_data/ (5 sessions)", (), "left")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="all", help="comma-separated case names, or all")
    p.add_argument("--work", type=Path, default=None, help="work folder (phantoms are reused)")
    p.add_argument("--detail", action="store_true", help="print every session/side/structure")
    p.add_argument("--real", action="store_true",
                   help="also the real legs (benchmarks/realdata_legs.py); implied by 'all'")
    args = p.parse_args()
    cases = {c.name: c for c in (DEMO, *SUITE, *ANATOMY_SUITE, *CONTRALATERAL_SUITE)}
    groups = {"all": list(cases), "anatomy": [c.name for c in ANATOMY_SUITE],
              "contralateral": [c.name for c in CONTRALATERAL_SUITE],
              "thigh": ["demo", *(c.name for c in SUITE)]}
    names = groups.get(args.cases) or args.cases.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="limbtrack-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    demo_dir = work / "phantom_demo"
    if "demo" in names and not demo_dir.exists():
        demo_dir.symlink_to(ROOT / "sample_data" / "demo")
    scores = []
    for name in names:
        result = run_case(cases[name], work, sys.executable, ROOT)
        score = score_case(result)
        scores.append(score)
        print(f"\n## {name}: {cases[name].what} ({result['seconds']:.1f} s)", flush=True)
        if "error" in result:
            print(result["error"])
            continue
        if args.detail:
            print(format_table(result["rows"], ["study_date", "day", "side", "structure",
                                                "true_ml", "measured_ml", "error_ml",
                                                "error_pct", "dice"]))
            print()
            print(format_table(result["asymmetry"], ["study_date", "day", "true_pct",
                                                     "measured_pct", "error_pp"]))
    print("\n## Summary against the targets (worst over sessions and sides)\n")
    print("Targets: " + ", ".join(f"{k} {v:g}" for k, v in TARGETS.items()) + "\n")
    print(format_table(scores, ["case", "limb_median_pct", "limb_worst_pct", "bone_worst_pct",
                                "lesion_min_dice", "lesion_worst_pct", "edema_min_dice",
                                "edema_worst_pct", "asymmetry_worst_pp", "false_lesion_ml",
                                "false_edema_ml", "side_auto_ok", "qc_codes", "flags_ok",
                                "label", "label_ok", "ok", "failed"]))
    if args.real or args.cases == "all":
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "realdata_legs.py"),
                        "--work", str(work / "realdata")], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
