"""Issue 18 point 1, end to end: every study of the demo patient holds the left leg and the
right leg in separate series (tests/split_factory.py: cropped by whole columns, so the legs
stay on the original grid). Composed per session, the workflow must give exactly what the
bilateral demo gives: same volumes, same pattern; the series are named per leg, and a wrong
Laterality tag is warned about, never followed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from split_factory import split_study

from pipeline.io.files import read_tsv

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "sample_data" / "demo" / "dicom"


@pytest.fixture(scope="module")
def split_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("split_demo")
    dicom = tmp / "dicom"
    for study in sorted(p for p in DEMO.iterdir() if p.is_dir()):
        split_study(study, dicom / study.name,
                    wrong_tag_side="right" if study.name == "ST0002" else None)
    results = tmp / "results"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--config",
           f"input_dir={dicom}", "subject=demo", "day0=2024-03-01", "affected_side=left",
           f"results_dir={results}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results / "demo"


def _values(subject_dir: Path, table: str) -> dict[tuple[str, ...], str]:
    rows = read_tsv(subject_dir / table)
    keys = [c for c in ("study_date", "side", "structure") if c in rows[0]]
    return {tuple(r[k] for k in keys): r.get("volume_ml") or r.get("asymmetry_pct", "")
            for r in rows}


def test_split_studies_measure_exactly_as_the_bilateral_ones(split_results: Path,
                                                             demo_results: Path) -> None:
    assert _values(split_results, "volumes.tsv") == _values(demo_results, "volumes.tsv")
    split_summary = json.loads((split_results / "summary.json").read_text())
    demo_summary = json.loads((demo_results / "summary.json").read_text())
    assert split_summary["classification"] == demo_summary["classification"]
    def states(summary: dict) -> list[tuple[str, str, list]]:  # (the demo has events.tsv)
        return [(s["session"], s["state"], s["criteria"]) for s in summary["session_states"]]

    assert states(split_summary) == states(demo_summary)


def test_each_session_names_both_legs_series(split_results: Path) -> None:
    rows = read_tsv(split_results / "sessions.tsv")
    assert len(rows) == 5
    for row in rows:
        assert "(left leg)" in row["anatomical_series"]
        assert "(right leg)" in row["fluid_series"]
    used = [r for r in read_tsv(split_results / "index.tsv") if r["status"] == "used"]
    assert len(used) == 20  # 5 studies x 2 roles x 2 legs
    assert all("leg, by geometry" in r["reason"] for r in used)


def test_a_wrong_laterality_tag_is_warned_and_not_followed(split_results: Path) -> None:
    warnings = json.loads((split_results / "sessions.json").read_text())["warnings"]
    wrong = [w for w in warnings if "geometry shows the right leg" in w]
    assert len(wrong) == 2 and all("session 20240304" in w for w in wrong)
    summary = (split_results / "summary.json").read_text()
    assert "geometry shows the right leg" in summary
