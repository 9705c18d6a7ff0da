"""Shared fixtures: small phantoms generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from phantom_cases import small_spec

from pipeline import phantom

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom_small")
    phantom.generate(small_spec(subject="small"), out)
    return out
