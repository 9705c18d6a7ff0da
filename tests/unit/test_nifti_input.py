"""NIfTI sessions sheet: checks per row, and the workflow fed by it equals the DICOM route."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.io import nifti_input
from pipeline.io.convert import read_series
from pipeline.io.files import read_tsv

ROOT = Path(__file__).resolve().parents[2]


def _nifti(path: Path, shape: tuple[int, ...] = (8, 8, 4), geometry: bool = True) -> Path:
    # content differs from file to file: identical images for both roles are refused
    value = 1.0 + zlib.crc32(path.name.encode()) % 1000
    img = nib.Nifti1Image(np.full(shape, value, np.float32), np.diag([1.5, 1.5, 5.0, 1.0]))
    if not geometry:
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
    nib.save(img, str(path))
    return path


def _sheet(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    lines = ["subject\tstudy_date\trole\tpath"] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sheet_rows_are_checked_one_by_one(tmp_path: Path) -> None:
    _nifti(tmp_path / "t1.nii.gz")
    _nifti(tmp_path / "stir.nii.gz")
    _nifti(tmp_path / "nogeo.nii.gz", geometry=False)
    _nifti(tmp_path / "fourd.nii.gz", shape=(8, 8, 4, 3))
    sheet = _sheet(tmp_path / "s.tsv", [
        ("p1", "2024-01-01", "T1w", "t1.nii.gz"),
        ("p1", "2024-01-01", "STIR", "stir.nii.gz"),
        ("p1", "2024-02-01", "anatomical", "t1.nii.gz"),
        ("p1", "2024-02-01", "fluid", "nogeo.nii.gz"),
        ("p1", "2024-03-01", "fluid", "fourd.nii.gz"),
        ("p1", "2024-03-01", "anatomical", "missing.nii.gz"),
        ("p1", "01/04/2024", "fluid", "stir.nii.gz"),
        ("p1", "2024-05-01", "flair", "stir.nii.gz"),
        ("p2", "2024-01-01", "fluid", "stir.nii.gz"),
    ])
    result = nifti_input.index_sheet(sheet, "p1")
    assert [s["session"] for s in result["sessions"]] == ["20240101"]
    reasons = {r["study_date"]: r["reason"] for r in result["refused"]}
    assert "no usable fluid" in reasons["2024-02-01"]
    problems = " | ".join(p["problem"] for p in result["problems"])
    assert "sform_code and qform_code are both 0" in problems
    assert "needs one 3-D volume" in problems
    assert "file not found" in problems
    assert "not YYYY-MM-DD" in problems and "line 8" in problems
    assert "'flair' is not anatomical or fluid" in problems
    assert result["n_rows"] == 8  # the other subject's row is not counted


def test_missing_columns_and_no_usable_session(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("subject\tdate\tpath\np1\t2024-01-01\tx.nii\n")
    with pytest.raises(nifti_input.SheetError, match="missing column"):
        nifti_input.index_sheet(bad, "p1")
    _nifti(tmp_path / "t1.nii.gz")
    sheet = _sheet(tmp_path / "s.tsv", [("p1", "2024-01-01", "T1w", "t1.nii.gz")])
    assert nifti_input.write_index(sheet, "p1", tmp_path / "out") == 1
    assert (tmp_path / "out" / "index.tsv").is_file()


def _run(*config: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--config",
                           *config], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.workflow
@pytest.mark.slow
def test_workflow_from_a_sheet_equals_the_dicom_route(small_phantom: Path,
                                                      tmp_path: Path) -> None:
    """The same images as NIfTI (stored in another voxel order) give the same volumes."""
    rows = []
    for study in sorted((small_phantom / "dicom").iterdir()):
        for series, role in (("SE0003", "anatomical"), ("SE0004", "fluid")):
            image, meta = read_series(sorted((study / series).iterdir()))
            flipped = sitk.Flip(image, [True, False, True])  # same anatomy, other array order
            out = tmp_path / "nifti" / f"{study.name}_{role}.nii.gz"
            out.parent.mkdir(exist_ok=True)
            sitk.WriteImage(flipped, str(out))
            rows.append(("small", meta["StudyDate"], role, f"nifti/{out.name}"))
    sheet = _sheet(tmp_path / "sessions.tsv", rows)
    _run(f"input_dir={sheet}", "subject=small", "day0=2024-03-01", "affected_side=left",
         f"results_dir={tmp_path / 'res_nifti'}")
    _run(f"input_dir={small_phantom / 'dicom'}", "subject=small", "day0=2024-03-01",
         "affected_side=left", f"results_dir={tmp_path / 'res_dicom'}")
    a = read_tsv(tmp_path / "res_nifti" / "small" / "volumes.tsv")
    b = read_tsv(tmp_path / "res_dicom" / "small" / "volumes.tsv")
    assert len(a) == len(b) == 2 * 2 * 5
    for ra, rb in zip(a, b, strict=True):
        assert (ra["study_date"], ra["side"], ra["structure"]) == (
            rb["study_date"], rb["side"], rb["structure"])
        assert float(ra["volume_ml"]) == pytest.approx(float(rb["volume_ml"]), rel=0.005,
                                                       abs=0.05)
    index = read_tsv(tmp_path / "res_nifti" / "small" / "index.tsv")
    assert {r["status"] for r in index} == {"used"}
