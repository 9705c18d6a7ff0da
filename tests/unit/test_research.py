"""Research export: pseudonym, consistently shifted dates, nothing identifying left."""

from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.export import research
from pipeline.io.files import read_tsv, write_tsv_atomic

SALT = "a-very-secret-salt-0123"


def _subject(tmp_path: Path) -> Path:
    d = tmp_path / "P7"
    for date in ("2024-02-25", "2024-03-31"):
        label = date.replace("-", "")
        for kind in ("T1w", "fluid", "dseg"):
            img = nib.Nifti1Image(np.ones((4, 4, 3), np.uint8), np.diag([1.5, 1.5, 5, 1]))
            img.header["descrip"] = b"PATIENT^CANARY"
            (d / f"ses-{label}").mkdir(parents=True, exist_ok=True)
            nib.save(img, str(d / f"ses-{label}" / f"sub-P7_ses-{label}_{kind}.nii.gz"))
    rows = [{"subject": "P7", "study_date": date, "day": day, "side": "left",
             "role": "affected", "structure": "limb", "volume_ml": 1000 + day}
            for date, day in (("2024-02-25", -5), ("2024-03-31", 30))]
    cols = ["subject", "study_date", "day", "side", "role", "structure", "volume_ml"]
    write_tsv_atomic(d / "volumes.tsv", rows, cols)
    write_tsv_atomic(d / "longitudinal.tsv", rows, cols)
    return d


def test_pseudonym_and_shift_are_stable_and_secret() -> None:
    a = research.pseudonym_and_shift("P7", SALT)
    assert a == research.pseudonym_and_shift("P7", SALT)
    assert a != research.pseudonym_and_shift("P7", SALT + "x")
    assert a[0] != research.pseudonym_and_shift("P8", SALT)[0]
    assert 1 <= a[1] <= 365
    with pytest.raises(research.ResearchExportError, match="salt"):
        research.pseudonym_and_shift("P7", "short")


def test_export_shifts_every_date_by_the_same_days(tmp_path: Path) -> None:
    subject_dir = _subject(tmp_path)
    out = research.export_subject(subject_dir, "P7", SALT, subject_dir / "research")
    pseudo, shift = research.pseudonym_and_shift("P7", SALT)
    rows = read_tsv(out / f"sub-{pseudo}_volumes.tsv")
    assert [r["day"] for r in rows] == ["-5", "30"]  # timeline unchanged
    for r, original in zip(rows, ("2024-02-25", "2024-03-31"), strict=True):
        assert r["subject"] == pseudo
        delta = dt.date.fromisoformat(original) - dt.date.fromisoformat(r["study_date"])
        assert delta.days == shift
    images = sorted(out.rglob("*.nii.gz"))
    assert len(images) == 6
    for path in out.rglob("*"):
        if path.is_file():
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else \
                path.read_bytes()
            assert b"P7" not in data and b"CANARY" not in data, path
            assert b"2024-02-25" not in data and b"20240225" not in data, path
    assert not (subject_dir / "research.partial").exists()


def test_cli_refuses_without_salt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIMBTRACK_RESEARCH_SALT", raising=False)
    subject_dir = _subject(tmp_path)
    rc = research.main(["--subject-dir", str(subject_dir), "--subject", "P7",
                        "--out-dir", str(subject_dir / "research")])
    assert rc == 2
    assert not (subject_dir / "research").exists()
    monkeypatch.setenv("LIMBTRACK_RESEARCH_SALT", SALT)
    assert research.main(["--subject-dir", str(subject_dir), "--subject", "P7",
                          "--out-dir", str(subject_dir / "research")]) == 0
