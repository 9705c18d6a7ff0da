"""The demo patient run once per test session, shared by the contract and browser tests.

The run uses a copy of ``sample_data/demo/dicom`` whose STIR series description of one study
carries script payloads (the browser test checks that the report shows them as text); nothing
else in the data changes, so the contract and accuracy checks hold on the same run.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sample_data" / "demo"
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_DESCRIPTION = f"STIR AX {XSS_SCRIPT} {XSS_IMG}"  # 63 characters: fits a LO tag
XSS_STUDY_DATE = "20240304"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def inject_xss(dicom_dir: Path) -> int:
    """Put the payloads in the STIR series description of one study; returns files changed."""
    changed = 0
    for f in sorted(p for p in dicom_dir.rglob("*") if p.is_file() and p.suffix != ".tsv"):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        if ds.get("StudyDate") == XSS_STUDY_DATE and "STIR" in str(ds.get("SeriesDescription")):
            ds.SeriesDescription = XSS_DESCRIPTION
            ds.save_as(f)
            changed += 1
    return changed


def run_demo(tmp: Path) -> tuple[Path, Path, dict[str, str]]:
    """(results/demo, the input copy, the copy's digest after the run); fails loudly."""
    dicom = tmp / "dicom"
    shutil.copytree(DEMO / "dicom", dicom)
    assert inject_xss(dicom) > 0
    before = tree_digest(dicom)
    results = tmp / "results"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--config",
           f"input_dir={dicom}", "subject=demo", "day0=2024-03-01", "affected_side=left",
           f"results_dir={results}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"workflow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    after = tree_digest(dicom)
    assert after == before, "the input folder was modified"
    return results / "demo", dicom, after
