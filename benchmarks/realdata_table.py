"""Print, as Markdown, how limbtrack's conversion compares with the real-data references.

One row per dataset of ``../shared/realdata`` (see its README): volumes matched / total
(shape equal, affine within 0.01 mm after reorienting both to the closest canonical
orientation, voxel values equal after scaling where the reference holds real values), known
reference defects, and the refusals with their reasons. The same cases are asserted by
``tests/test_realdata.py``.

Usage::

    python benchmarks/realdata_table.py [--details]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdata_cases import REALDATA, Outcome, cases, run_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--details", action="store_true", help="also list every case")
    args = parser.parse_args(argv)
    if not REALDATA.is_dir():
        print(f"real data not found at {REALDATA}", file=sys.stderr)
        return 1
    outcomes: dict[str, list[Outcome]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases():
            outcomes[case.dataset].append(run_case(case, Path(tmp)))

    print("| dataset | series | volumes matched / total | reference defects (xfail) "
          "| expected refusals (right reason / total) | refusals with reasons |")
    print("|---|---|---|---|---|---|")
    for dataset, items in outcomes.items():
        compared = [o for o in items if o.case.refusal is None]
        failing = [o for o in items if o.case.refusal is not None]
        matched = sum(o.matched for o in compared)
        total = sum(o.total for o in compared)
        defects = [o for o in compared if o.case.xfail and not o.ok]
        defect_text = "; ".join(f"{o.case.name}: {o.case.xfail.split(':')[0]}"
                                for o in defects) or "-"
        refusals = []
        for o in items:
            for reason in o.refusals:
                short = reason.split(";")[0]
                refusals.append(f"`{o.case.name}`: {short}")
        right = sum(1 for o in failing if o.ok)
        print(f"| {dataset} | {len(items)} | {matched} / {total} | {defect_text} | "
              f"{right} / {len(failing)} | {'<br>'.join(refusals) or '-'} |")
    print()
    for dataset in outcomes:
        missing = REALDATA / dataset / "MISSING_FROM_SNAPSHOT.txt"
        if missing.is_file():
            absent = [line.strip() for line in missing.read_text().splitlines()
                      if line.strip()]
            print(f"- {dataset}: not in the snapshot, so not compared: {', '.join(absent)}")
    if args.details:
        print()
        print("| dataset | case | result | detail |")
        print("|---|---|---|---|")
        for dataset, items in outcomes.items():
            for o in items:
                if o.case.refusal is not None:
                    result = "refused as expected" if o.ok else "NOT refused as expected"
                    detail = o.refusals[0] if o.refusals else "-"
                else:
                    result = f"{o.matched}/{o.total}" + (" (xfail)" if o.case.xfail else "")
                    detail = "; ".join(o.mismatches) or "match"
                print(f"| {dataset} | {o.case.name} | {result} | {detail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
