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
    # the session column holds the study date (and time, two sessions on a day): it is a date
    rows = [{"subject": "P7", "study_date": date, "day": day, "side": "left",
             "role": "affected", "structure": "limb", "volume_ml": 1000 + day,
             "session": session}
            for date, day, session in (("2024-02-25", -5, "20240225"),
                                       ("2024-03-31", 30, "20240331T101500"))]
    cols = ["subject", "study_date", "day", "side", "role", "structure", "volume_ml", "session"]
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


def _files(subject_dir: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """The tables and images the workflow's rule names (by kind, every session)."""
    tables = {name: subject_dir / name for name in research.TABLES}
    images = {kind: sorted(subject_dir.glob(f"ses-*/sub-P7_ses-*_{kind}.nii.gz"))
              for kind in research.IMAGES}
    return tables, images


def _cli(subject_dir: Path, out_dir: Path) -> int:
    tables, images = _files(subject_dir)
    return research.main([
        "--subject", "P7", "--volumes", str(tables["volumes.tsv"]),
        "--longitudinal", str(tables["longitudinal.tsv"]),
        *[arg for kind in research.IMAGES
          for arg in (f"--{kind.lower()}", *map(str, images[kind]))],
        "--out-dir", str(out_dir)])


def test_export_shifts_every_date_by_the_same_days(tmp_path: Path) -> None:
    subject_dir = _subject(tmp_path)
    out = research.export_subject("P7", SALT, subject_dir / "research", *_files(subject_dir))
    pseudo, shift = research.pseudonym_and_shift("P7", SALT)
    rows = read_tsv(out / f"sub-{pseudo}_volumes.tsv")
    assert [r["day"] for r in rows] == ["-5", "30"]  # timeline unchanged
    for r, original in zip(rows, ("2024-02-25", "2024-03-31"), strict=True):
        assert r["subject"] == pseudo
        delta = dt.date.fromisoformat(original) - dt.date.fromisoformat(r["study_date"])
        assert delta.days == shift
        assert r["session"][:8] == r["study_date"].replace("-", "")
    images = sorted(out.rglob("*.nii.gz"))
    assert len(images) == 6
    for path in out.rglob("*"):
        if path.is_file():
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else \
                path.read_bytes()
            assert b"P7" not in data and b"CANARY" not in data, path
            assert b"2024-02-25" not in data and b"20240225" not in data, path
            assert b"20240331" not in data, path
    assert not (subject_dir / "research.partial").exists()


def test_cli_refuses_without_salt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIMBTRACK_RESEARCH_SALT", raising=False)
    subject_dir = _subject(tmp_path)
    assert _cli(subject_dir, subject_dir / "research") == 2
    assert not (subject_dir / "research").exists()
    monkeypatch.setenv("LIMBTRACK_RESEARCH_SALT", SALT)
    assert _cli(subject_dir, subject_dir / "research") == 0
    assert len(list((subject_dir / "research").rglob("*.nii.gz"))) == 6


def test_only_the_named_files_are_exported(tmp_path: Path) -> None:
    """A session folder left from an earlier run is not swept in: only what the command
    line names (the rule's inputs) is read."""
    subject_dir = _subject(tmp_path)
    tables, images = _files(subject_dir)
    stale = {kind: [p for p in paths if "20240331" in p.name] for kind, paths in images.items()}
    kept = {kind: [p for p in paths if p not in stale[kind]] for kind, paths in images.items()}
    out = research.export_subject("P7", SALT, tmp_path / "research", tables, kept)
    assert len(list(out.rglob("*.nii.gz"))) == 3 and len(list(out.glob("ses-*"))) == 1
    with pytest.raises(research.ResearchExportError, match="_ses-<label>_"):
        research.export_subject("P7", SALT, tmp_path / "r2", tables,
                                {"dseg": [tmp_path / "no_session.nii.gz"]})
