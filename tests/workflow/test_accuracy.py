"""A smaller accuracy suite in the tests: phantom cases through the command-line contract,
with the targets of issue 4 as assertions (the full suite: benchmarks/accuracy.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.validation.evaluation import SUITE, run_case, score_case

ROOT = Path(__file__).resolve().parents[2]
CASES = {c.name: c for c in SUITE}


# the whole suite (and these) in benchmarks/accuracy.py; here one limb alone and the negative
# control (feet first is in test_e2e, a lesion alone in the demo and test_segment)
@pytest.mark.parametrize("name", ["single", "control1"])
def test_case_meets_the_targets(name: str, tmp_path: Path) -> None:
    result = run_case(CASES[name], tmp_path, sys.executable, ROOT)
    assert "error" not in result, result.get("error")
    score = score_case(result)
    assert score["ok"], f"{name}: targets missed: {score['failed']} ({score})"
