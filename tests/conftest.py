"""Shared fixtures: small phantoms generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from demo_case import run_demo
from phantom_cases import small_spec

from pipeline.validation import phantom

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom_small")
    phantom.generate(small_spec(subject="small"), out)
    return out


@pytest.fixture(scope="session")
def demo_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<results>/demo`` of the demo patient (one run per session, see demo_case.py)."""
    subject_dir, _, _ = run_demo(tmp_path_factory.mktemp("demo_run"))
    return subject_dir
