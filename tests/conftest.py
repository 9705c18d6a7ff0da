"""Shared fixtures (small phantoms, the demo run, once per test session) and test markers.

Markers (registered in pyproject.toml):

* ``workflow``: the test runs the Snakemake workflow. Every test under ``tests/workflow/``
  gets it here, and so does any test using the shared demo run (``demo_results``); a test
  elsewhere that runs the workflow carries ``@pytest.mark.workflow`` itself.
* ``slow``: the test takes more than about 30 s.

The quick suite, without the workflow runs::

    .venv/bin/python -m pytest -m "not workflow"

and without anything slow either: ``-m "not workflow and not slow"``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from demo_case import run_demo
from phantom_cases import small_spec

from pipeline.validation import phantom

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
WORKFLOW_TESTS = Path(__file__).resolve().parent / "workflow"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``workflow`` every test under tests/workflow/, and ``workflow`` and ``slow`` every
    test using the demo run (it runs the workflow, minutes on two cores)."""
    for item in items:
        if WORKFLOW_TESTS in item.path.resolve().parents:
            item.add_marker(pytest.mark.workflow)
        if "demo_results" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.workflow)
            item.add_marker(pytest.mark.slow)


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
