"""Scan-rescan repeatability study: run it, fit the uncertainty model, report it.

Runs every case of :mod:`pipeline.validation.repeatability` (phantom subjects, hybrid real-anatomy
subjects and real same-day rescans, all without true change) through the command-line
contract, collects the scan-rescan pairs, fits :func:`pipeline.uncertainty.fit` and writes the
model the workflow reads (``pipeline/data/repeatability.json``) with its provenance. Prints,
in Markdown (and saves next to the pair table):

- the cases, the fitted coefficients;
- repeatability per structure: n pairs, mean volume, within-subject sd, RC = 1.96 sqrt(2) wSD
  (mL and % for limb, soft tissue, bone), the model's MDC95 at the typical geometry, and RC
  split by slice thickness, pixel size and source;
- calibration by leave-one-case-out: the share of pairs beyond their MDC95 (the false-change
  rate, about 5 % when the model is right), of soft-tissue asymmetry changes beyond theirs,
  and the false flare rate (flare criteria of the workflow met without any change);
- the limb-volume MDC95 in % of the volume at each case's geometry (target <= 2 %).

    python benchmarks/repeatability.py                    # the full study (20-40 min, 2 cores)
    python benchmarks/repeatability.py --quick            # 5 cases; writes OUT/ model only
    python benchmarks/repeatability.py --reuse results/repeatability_study/repeatability_pairs.tsv
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import uncertainty as unc
from pipeline.io.files import write_json_atomic, write_text_atomic
from pipeline.labels import STRUCTURES
from pipeline.validation import repeatability as rp
from pipeline.validation.evaluation import format_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "results" / "repeatability_study"
PAIRS_NAME = "repeatability_pairs.tsv"
CASES_NAME = "repeatability_cases.json"
TABLES_NAME = "repeatability_tables.md"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def snapshot(dest: Path) -> Path:
    """Copy the working tree (tracked and untracked, not ignored files) to `dest`, so that a
    long study runs one version of the code even while the tree is being edited."""
    files = _git("ls-files", "-co", "--exclude-standard").splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def run_study(cases: Sequence[rp.StudyCase], work: Path, root: Path,
              log: Callable[[str], None]) -> list[rp.CaseResult]:
    results = []
    for n, case in enumerate(cases, start=1):
        log(f"[{n}/{len(cases)}] {case.name} ({case.source}, {case.region}) ...")
        res = rp.run_case(case, work, root, sys.executable, reuse=True, log=log)
        if res.reused:
            log(f"  {len(res.records)} pairs from the earlier run in {work / 'cases'}")
        if res.error:
            log(f"  FAILED after {res.seconds:.0f} s:\n{res.error[-1500:]}")
        results.append(res)
    return results


def _group_slice(r: rp.PairRecord) -> str:
    return "slice <= 4 mm" if max(r.first.slice_mm, r.second.slice_mm) <= 4.0 + 1e-6 \
        else "slice > 4 mm"


def _group_pixel(r: rp.PairRecord) -> str:
    return "pixel <= 1.5 mm" if max(r.first.pixel_mm, r.second.pixel_mm) <= 1.5 + 1e-6 \
        else "pixel > 1.5 mm"


def _order(structure: str) -> int:
    return STRUCTURES.index(structure) if structure in STRUCTURES else len(STRUCTURES)


RC_COLUMNS = ["structure", "group", "n_pairs", "mean_ml", "mean_d_ml", "mean_d_pct", "wsd_ml",
              "rc_ml", "rc_pct", "typical_ml", "mdc95_ml", "mdc95_pct"]


def tables(records: Sequence[rp.PairRecord], model: unc.RepeatabilityModel,
           cases: Sequence[dict[str, Any]]) -> str:
    out: list[str] = []

    def section(title: str, body: str, note: str = "") -> None:
        out.append(f"## {title}\n")
        if note:
            out.append(note + "\n")
        out.append(body + "\n")

    case_rows = [{"case": c["case"], "source": c["source"], "region": c["region"],
                  "pixel_mm": c.get("pixel_mm"), "slice_mm": c.get("slice_mm"),
                  "sessions": c.get("n_sessions"), "n_pairs": c["n_pairs"],
                  "n/a": c.get("missing"), "qc": ",".join(c.get("qc_codes") or []) or "-",
                  "excluded": c.get("excluded") or c.get("error") and "workflow error" or "-",
                  "seconds": c.get("seconds")} for c in cases]
    section("Cases", format_table(case_rows, list(case_rows[0]) if case_rows else ["case"]),
            "Every case: one subject, several sessions of the same anatomy without true change; "
            "pairs = later session vs baseline, per side and structure (n/a: values the "
            "workflow left not available, no pair).")
    coef_rows = [{"structure": s, "n_pairs": m.n_pairs,
                  **{t: f"{c:.3g}" for t, c in zip(unc.TERMS, m.coefficients, strict=True)}}
                 for s, m in sorted(model.structures.items(), key=lambda kv: _order(kv[0]))]
    section("Fitted model", format_table(coef_rows, ["structure", "n_pairs", *unc.TERMS]),
            "sd_ml**2 = a V**2 + b (pixel/10 V**(2/3))**2 + c (slice/10 V**(2/3))**2 + "
            "d (misreg/10 V**(2/3))**2 + e  (pipeline/uncertainty.py); coefficients a..e:")
    section("Repeatability per structure",
            format_table(rp.repeatability_rows(records, model), RC_COLUMNS),
            "d = follow-up minus baseline; mean_d: its mean (a systematic offset between "
            "baseline and follow-ups; the model counts it as error). "
            "wSD = sqrt(mean(d^2)/2); RC = 1.96 sqrt(2) wSD (observed); MDC95 = the fitted "
            "model's 1.96 sqrt(sd1^2 + sd2^2) at the typical geometry (median non-zero "
            "volume, median pixel and slice, median follow-up misregistration); % of the "
            "mean (RC) or typical (MDC95) volume for limb, soft tissue and bone.")
    for title, grp in (("by slice thickness", _group_slice), ("by pixel size", _group_pixel),
                       ("by source", lambda r: r.source)):
        section(f"Repeatability {title}",
                format_table(rp.repeatability_rows(records, model, grp), RC_COLUMNS))
    loco = rp.leave_one_case_out(records)
    full = rp.model_sd(model)
    cal = rp.calibration_rows(records, loco)
    ins = {r["structure"]: r for r in rp.calibration_rows(records, full)}
    for r in cal:
        r["in_sample_pct"] = ins[r["structure"]]["false_change_pct"]
        r["in_sample_mean_z2"] = ins[r["structure"]]["mean_z2"]
    section("Calibration (leave one case out)",
            format_table(cal, ["structure", "n_pairs", "beyond_mdc95", "false_change_pct",
                               "mean_z2", "in_sample_pct", "in_sample_mean_z2"]),
            "Each case's pairs predicted by a model fitted on the other cases: share of "
            "|d| > 1.96 sqrt(sd1^2 + sd2^2) (false-change rate, ~5 % when calibrated) and "
            "mean (d/sd)^2 (~1). in_sample: the same with the model fitted on all pairs.")
    sessions = rp.session_rows(records, loco)
    summary = [{"model": "leave one case out", **rp.asymmetry_calibration(sessions)},
               {"model": "all cases (in sample)",
                **rp.asymmetry_calibration(rp.session_rows(records, full))}]
    section("Asymmetry change and false flares",
            format_table(summary, ["model", "n_sessions", "n_asymmetry",
                                   "asymmetry_wsd_pp", "asymmetry_beyond_mdc95",
                                   "asymmetry_false_change_pct", "false_flares",
                                   "false_flare_pct"]),
            "Per follow-up session: soft-tissue asymmetry (affected/contralateral - 1, pp) "
            "change since baseline, its MDC95 from uncertainty.ratio_pct_sd and "
            "difference_sd; a false flare is a flare criterion of pipeline.longitudinal.assess "
            "met (asymmetry +5 pp, lesion x1.2 and +1 mL, edema x1.2 and +10 mL, each beyond "
            "its MDC95) although nothing changed.")
    flagged = [s for s in sessions if s["flares"] or s["asymmetry_beyond"]]
    if flagged:
        section("Sessions with a false change (leave one case out)",
                format_table(flagged, ["case", "session", "asymmetry_change_pp",
                                       "asymmetry_mdc95_pp", "asymmetry_beyond", "flares"]))
    mdc = rp.limb_mdc_rows(records, model)
    section("Limb-volume MDC95 per case (target <= 2 %)",
            format_table(mdc, ["case", "source", "role", "pixel_mm", "slice_mm",
                               "misregistration_mm", "limb_ml", "mdc95_ml", "mdc95_pct",
                               "observed_max_pct", "target_ok"]),
            "MDC95 of the limb volume between the baseline and a follow-up at the case's own "
            "geometry (fitted model); observed_max_pct: the largest scan-rescan difference "
            "seen in the case.")
    return "\n".join(out)


def _case_info(res: rp.CaseResult) -> dict[str, Any]:
    info = res.provenance()
    recs = res.records
    info["pixel_mm"] = sorted({r.first.pixel_mm for r in recs} | {r.second.pixel_mm
                                                                  for r in recs}) or None
    info["slice_mm"] = sorted({r.first.slice_mm for r in recs} | {r.second.slice_mm
                                                                  for r in recs}) or None
    info["n_sessions"] = len({r.session2 for r in recs}) + 1 if recs else None
    info["missing"] = res.missing
    info["seconds"] = round(res.seconds, 1)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"only {', '.join(rp.QUICK)} (the model goes to OUT, not the package)")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    p.add_argument("--reuse", type=Path, default=None, metavar="PAIRS_TSV",
                   help="refit and report from a pair table without running the workflow")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"pair table, case list and tables (default {DEFAULT_OUT})")
    p.add_argument("--model", type=Path, default=None,
                   help=f"model file to write (default {unc.DEFAULT_MODEL}; with --quick or "
                   "--cases: OUT/repeatability.json)")
    p.add_argument("--work", type=Path, default=None,
                   help="case folders and workflow results (default OUT/work); a case whose "
                   "pairs are there is not run again")
    p.add_argument("--fresh", action="store_true", help="run every case again")
    p.add_argument("--no-snapshot", action="store_true",
                   help="run the workflow in the working tree itself (default: in a copy of "
                   "it, so edits made while the study runs do not mix into it)")
    p.add_argument("--realdata", default=None, help="the real 'legs' folder")
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    subset = args.quick or bool(args.cases)
    model_path: Path = args.model or (out / "repeatability.json" if subset
                                      else unc.DEFAULT_MODEL)
    pairs_path, cases_path = out / PAIRS_NAME, out / CASES_NAME
    start = time.perf_counter()
    command = " ".join(["python", "benchmarks/repeatability.py",
                        *(sys.argv[1:] if argv is None else argv)])
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    revision = _git("rev-parse", "--short", "HEAD") or None
    modified = sorted(_git("diff", "--name-only", "HEAD").splitlines())

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.reuse:
        records = rp.read_pairs(args.reuse)
        side = args.reuse.parent / CASES_NAME
        study: dict[str, Any] = json.loads(side.read_text(encoding="utf-8")) if (
            side.is_file()) else {}
        if isinstance(study, list):  # the first format: the case list alone
            study = {"cases": study}
        cases = study.get("cases") or [
            {"case": c, "source": s, "region": g, "n_pairs": 0, "geometry": {}}
            for c, s, g in sorted({(r.case, r.source, r.region) for r in records})]
        for c in cases:
            c["n_pairs"] = sum(1 for r in records if r.case == c["case"])
        if args.reuse.resolve() != pairs_path.resolve():
            rp.write_pairs(pairs_path, records)
    else:
        try:
            from pipeline.validation import hybrid

            hybrid.realdata_dir(args.realdata)
            realdata_ok = True
        except Exception as err:  # noqa: BLE001 - RealDataMissing or an unreadable folder
            log(f"hybrid and real cases skipped: {err}")
            realdata_ok = False
        chosen: list[rp.StudyCase] = rp.all_cases(realdata_ok)
        wanted = set(filter(None, args.cases.split(","))) or (set(rp.QUICK) if args.quick
                                                              else set())
        if wanted:
            unknown = wanted - {c.name for c in chosen}
            if unknown:
                log(f"unknown or unavailable cases: {', '.join(sorted(unknown))}")
            chosen = [c for c in chosen if c.name in wanted]
        work: Path = args.work or out / "work"
        if args.fresh and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        tmp = None
        root = ROOT
        if not args.no_snapshot:
            tmp = tempfile.TemporaryDirectory(prefix="limbtrack-repeatability-")
            root = snapshot(Path(tmp.name))
            log(f"workflow code: snapshot of the working tree in {root}")
        try:
            results = run_study(chosen, work, root, log)
        finally:
            if tmp is not None:
                tmp.cleanup()
        records = [r for res in results for r in res.records]
        cases = [_case_info(res) for res in results]
        study = {"command": command, "date": today, "git_revision": revision,
                 "working_tree_modified": modified, "minutes": (time.perf_counter() - start) / 60,
                 "cases": cases}
        rp.write_pairs(pairs_path, records)
        write_json_atomic(cases_path, study)
    if not records:
        log("no pairs: nothing to fit")
        return 1
    n_pairs = rp.pairs_per_structure(records)
    provenance: dict[str, Any] = {
        "study": "scan-rescan repeatability without true change "
                 "(pipeline/validation/repeatability.py, "
                 "benchmarks/repeatability.py)",
        "date": study.get("date", today),
        "git_revision": study.get("git_revision", revision),
        "working_tree_modified": study.get("working_tree_modified", modified),
        "command": study.get("command", command),
        "n_pairs": n_pairs,
        "n_cases": len({r.case for r in records}),
        "pairs_table": str(pairs_path.resolve().relative_to(ROOT)
                           if pairs_path.resolve().is_relative_to(ROOT) else pairs_path),
        "cases": [{k: c.get(k) for k in ("case", "source", "region", "geometry", "n_pairs",
                                         "qc_codes", "excluded", "error")} for c in cases],
    }
    if args.reuse:
        provenance["refit"] = {"command": command, "date": today, "git_revision": revision}
    model = unc.fit([r.pair for r in records], source=provenance)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(model_path, json.dumps(model.to_json(), indent=1) + "\n")
    text = tables(records, model, cases)
    elapsed = time.perf_counter() - start
    header = (f"# Scan-rescan repeatability ({provenance['date']}, "
              f"revision {provenance['git_revision']})\n\n"
              f"{len(records)} pairs from {provenance['n_cases']} cases "
              f"({', '.join(f'{s} {n}' for s, n in n_pairs.items())}); model written to "
              f"`{model_path}`; this run {elapsed / 60:.1f} min, the cases' own runs "
              f"(phantom or image writing + workflow, 2 cores) "
              f"{sum(c.get('seconds') or 0.0 for c in cases) / 60:.1f} min in all.\n")
    write_text_atomic(out / TABLES_NAME, header + "\n" + text)
    print(header)
    print(text)
    log(f"pairs: {pairs_path}\ntables: {out / TABLES_NAME}\nmodel: {model_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
