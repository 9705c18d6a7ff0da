"""Accuracy suite: phantom patients through the command-line contract, scored against truth.

With ``--real`` (and with ``--cases all``) it then runs ``benchmarks/realdata_legs.py``: the
real-leg invariants and the hybrid cases, so that one command reports all three tables.

Prints, per case, every session / side / structure (Dice, volume error in mL and %), the
soft-tissue asymmetry error (pp), and a summary against the targets of issue 4. Cases imaging
the legs one at a time (issue 18) are also compared with their twin, the same patient imaged
bilaterally: the volume difference per structure in %.

    python benchmarks/accuracy.py                 # the 13 suite cases + the demo patient
    python benchmarks/accuracy.py --cases demo    # only some
    python benchmarks/accuracy.py --cases contralateral  # follow-ups of the affected leg alone
    python benchmarks/accuracy.py --cases split   # each leg in its own series, and twins
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.validation import hybrid
from pipeline.validation.evaluation import (
    ANATOMY_SUITE,
    CONTRALATERAL_SUITE,
    SPLIT_SUITE,
    SPLIT_TWINS,
    SUITE,
    TARGETS,
    Case,
    format_table,
    hybrid_true_ml,
    measured_volumes,
    run_case,
    score_case,
    summarise_twin,
    twin_differences,
)
from pipeline.validation.realdata_eval import (
    HYBRID_TARGETS,
    run_workflow,
    score_hybrid,
    summarise_hybrid,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = Case("demo", "the demo patient in sample_data/ (5 sessions)", (), "left")
#: Hybrid cases (real anatomy) of the one-leg layouts, and the groups they belong to.
HYBRID_LAYOUT = {c.name: c for c in hybrid.LAYOUT_SUITE}
HYBRID_GROUP = {"calf_split": "split", "thigh_affonly": "contralateral"}


def _run_phantom(case: Case, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = run_case(case, work, sys.executable, ROOT)
    score = score_case(result)
    print(f"\n## {case.name}: {case.what} ({result['seconds']:.1f} s)", flush=True)
    if "error" in result:
        print(result["error"])
        return {"score": score}
    if args.detail:
        print(format_table(result["rows"], ["study_date", "day", "side", "structure",
                                            "true_ml", "measured_ml", "error_ml",
                                            "error_pct", "dice"]))
        print()
        print(format_table(result["asymmetry"], ["study_date", "day", "true_pct",
                                                 "measured_pct", "error_pp"]))
    subject_dir = work / "results" / case.name
    true_ml = {(r["study_date"], r["side"], r["structure"]): r["true_ml"] for r in result["rows"]}
    return {"score": score, "measured": measured_volumes(subject_dir), "true": true_ml}


def _run_hybrid(case: hybrid.HybridCase, work: Path) -> dict[str, Any]:
    case_dir = work / "hybrid" / case.name
    if not (case_dir / "truth.json").is_file():
        case.write(case_dir)
    truth = json.loads((case_dir / "truth.json").read_text(encoding="utf-8"))
    subject_dir, seconds, err = run_workflow(case_dir / "sessions.tsv", truth["subject"],
                                             truth["day0"], truth["affected_side"],
                                             work / "results", ROOT, sys.executable)
    print(f"\n## {case.name} (hybrid): {case.description} ({seconds:.0f} s)", flush=True)
    if err:
        print(err)
        return {"hybrid": {"case": case.name, "failed": "workflow error", "seconds": seconds}}
    scored = score_hybrid(subject_dir, truth, case_dir)
    return {"hybrid": summarise_hybrid(case.name, scored) | {"seconds": seconds},
            "measured": measured_volumes(subject_dir), "true": hybrid_true_ml(truth)}


def _twins(names: list[str], run: Any, twin_of: dict[str, str],
           detail: bool) -> list[dict[str, Any]]:
    """Each case with a twin against it: one summary row per pair (twins run as needed)."""
    rows = []
    for name in names:
        twin = twin_of.get(name)
        if not twin:
            continue
        a, b = run(name), run(twin)
        if "measured" not in a or "measured" not in b:
            rows.append({"case": name, "twin": twin})
            continue
        diffs = twin_differences(a["measured"], b["measured"], a.get("true"), b.get("true"))
        if detail:
            print(f"\n## {name} against its twin {twin}\n")
            print(format_table(diffs, ["study_date", "side", "structure", "true_ml", "case_ml",
                                       "twin_ml", "diff_pct", "true_diff_pct"]))
        rows.append(summarise_twin(name, twin, diffs))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="all", help="comma-separated case names, or all")
    p.add_argument("--work", type=Path, default=None, help="work folder (phantoms are reused)")
    p.add_argument("--detail", action="store_true", help="print every session/side/structure")
    p.add_argument("--real", action="store_true",
                   help="also the real legs (benchmarks/realdata_legs.py); implied by 'all'")
    args = p.parse_args()
    cases = {c.name: c for c in (DEMO, *SUITE, *ANATOMY_SUITE, *CONTRALATERAL_SUITE,
                                 *SPLIT_SUITE)}
    twin_cases = {c.name: c for c in SPLIT_TWINS}
    groups = {"all": [*cases, *HYBRID_LAYOUT], "anatomy": [c.name for c in ANATOMY_SUITE],
              "contralateral": [c.name for c in CONTRALATERAL_SUITE],
              "split": [c.name for c in SPLIT_SUITE],
              "thigh": ["demo", *(c.name for c in SUITE)]}
    for name, group in HYBRID_GROUP.items():
        groups[group].append(name)
    names = groups.get(args.cases) or args.cases.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="limbtrack-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    demo_dir = work / "phantom_demo"
    if "demo" in names and not demo_dir.exists():
        demo_dir.symlink_to(ROOT / "sample_data" / "demo")
    done: dict[str, dict[str, Any]] = {}

    def run(name: str) -> dict[str, Any]:
        if name not in done:
            case = cases.get(name) or twin_cases.get(name)
            if isinstance(case, Case):
                done[name] = _run_phantom(case, work, args)
            else:
                done[name] = _run_hybrid(HYBRID_LAYOUT.get(name) or hybrid.suite_case(name),
                                         work)
        return done[name]

    for name in names:
        run(name)
    twin_of = {c.name: c.twin for c in SPLIT_SUITE if c.twin} | {
        c.name: c.twin for c in HYBRID_LAYOUT.values() if c.twin}
    twin_rows = _twins(names, run, twin_of, args.detail)
    # the twins run for the comparison are scored too (after the cases asked for)
    scores = [r["score"] for r in done.values() if "score" in r]
    hybrids = [r["hybrid"] for r in done.values() if "hybrid" in r]
    if scores:
        print("\n## Summary against the targets (worst over sessions and sides)\n")
        print("Targets: " + ", ".join(f"{k} {v:g}" for k, v in TARGETS.items()) + "\n")
        print(format_table(scores, ["case", "limb_median_pct", "limb_worst_pct",
                                    "bone_worst_pct", "lesion_min_dice", "lesion_worst_pct",
                                    "edema_min_dice", "edema_worst_pct", "asymmetry_worst_pp",
                                    "false_lesion_ml", "false_edema_ml", "side_auto_ok",
                                    "qc_codes", "flags_ok", "label", "label_ok",
                                    "warning_ok", "ok", "failed"]))
    if hybrids:
        print("\n## Hybrid cases of the one-leg layouts (real anatomy, inserted changes)\n")
        print("Targets: " + ", ".join(f"{k} {v:g}" for k, v in HYBRID_TARGETS.items()) + "\n")
        print(format_table(hybrids, ["case", "lesion_worst_pct", "lesion_min_dice",
                                     "edema_worst_pct", "swelling_worst_pp", "false_lesion_ml",
                                     "registration_bone_dice", "qc_codes", "flags_ok", "label",
                                     "expected", "failed", "seconds"]))
    if twin_rows:
        print("\n## Against the twin imaged bilaterally: largest |volume difference| in % "
              "(lesion from 2 mL, edema from 10 mL true)\n")
        print(format_table(twin_rows, ["case", "twin", "limb_worst_pct", "soft_tissue_worst_pct",
                                       "bone_worst_pct", "marrow_lesion_worst_pct",
                                       "edema_worst_pct"]))
    if args.real or args.cases == "all":
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "realdata_legs.py"),
                        "--work", str(work / "realdata")], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
