"""Unit tests of pipeline.io.files: atomic writes, permissions, TSV formatting, checksums."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.files import (
    atomic_path,
    mm3_to_ml,
    read_tsv,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
    write_tsv_atomic,
)


@pytest.fixture
def umask():
    """Set the process umask for one test, restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_mm3_to_ml():
    assert mm3_to_ml(1000) == 1.0
    assert mm3_to_ml(1.2) == pytest.approx(0.0012, rel=1e-15)
    assert isinstance(mm3_to_ml(5), float)


# ------------------------------------------------------------------ atomic writes


def test_write_text_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    write_text_atomic(target, "first é\n")
    write_text_atomic(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_exception_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "volumes.tsv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["volumes.tsv"]


def test_exception_without_old_file_creates_nothing(tmp_path):
    target = tmp_path / "summary.json"

    class Unserialisable:
        def __str__(self):
            raise TypeError("cannot serialise")

    with pytest.raises(TypeError):
        write_json_atomic(target, {"x": Unserialisable()})
    assert list(tmp_path.iterdir()) == []


def test_failing_tsv_row_keeps_old_table(tmp_path):
    target = tmp_path / "t.tsv"
    write_tsv_atomic(target, [{"a": 1}], ["a"])

    def rows():
        yield {"a": 2}
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        write_tsv_atomic(target, rows(), ["a"])
    assert target.read_text() == "a\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.tsv"]


def test_temp_path_keeps_suffixes_beside_target(tmp_path):
    target = tmp_path / "sub-01_ses-20240301_dseg.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.endswith(".nii.gz")
        assert tmp.name.startswith(".")
        assert tmp != target
        tmp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_permissions_follow_umask_not_0600(tmp_path, umask, mask, expected):
    umask(mask)  # set after the module was imported: the write must use the current umask
    target = tmp_path / "out.txt"
    write_text_atomic(target, "x")
    assert mode(target) == expected
    # the same as a plain open() would give
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert mode(target) == mode(plain)


def test_write_bytes_and_json(tmp_path):
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    write_json_atomic(tmp_path / "j.json", {"path": Path("x/y"), "n": [1, 2.5]})
    text = (tmp_path / "j.json").read_text()
    assert text.endswith("\n")
    assert json.loads(text) == {"path": "x/y", "n": [1, 2.5]}


# ------------------------------------------------------------------ TSV


def test_write_tsv_na_and_formatting(tmp_path):
    target = tmp_path / "t.tsv"
    rows = [
        {"a": None, "b": float("nan"), "c": np.float32("nan"), "d": np.float64("nan")},
        {"a": 2345.678, "b": 0.1 + 0.2, "c": np.float32(1.5), "d": -0.00001},
        {"a": 3, "b": np.int64(7), "c": "x\ty\nz", "d": 1 / 3},
        {"a": 123456.789, "b": 100.0, "c": True},  # 'd' missing -> n/a
    ]
    write_tsv_atomic(target, rows, ["a", "b", "c", "d"])
    lines = target.read_text().splitlines()
    assert lines == ["a\tb\tc\td",
                     "n/a\tn/a\tn/a\tn/a",
                     "2345.678\t0.3\t1.5\t0",
                     "3\t7\tx y z\t0.3333",
                     "123457\t100\tTrue\tn/a"]


def test_tsv_roundtrip(tmp_path):
    target = tmp_path / "t.tsv"
    write_tsv_atomic(target, [{"s": "a b", "v": 1.25}, {"s": "é", "v": None}], ["s", "v"])
    assert read_tsv(target) == [{"s": "a b", "v": "1.25"}, {"s": "é", "v": "n/a"}]


def test_write_tsv_header_only(tmp_path):
    write_tsv_atomic(tmp_path / "e.tsv", [], ("x", "y"))
    assert (tmp_path / "e.tsv").read_text() == "x\ty\n"
    assert read_tsv(tmp_path / "e.tsv") == []


# ------------------------------------------------------------------ checksums


@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 40])
def test_sha256_file(tmp_path, data):
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(p), chunk_bytes=7) == hashlib.sha256(data).hexdigest()


def test_sha256_known_value(tmp_path):
    p = tmp_path / "abc"
    p.write_bytes(b"abc")
    assert sha256_file(p) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
