"""Fuzzing the header reader and the series assembly with mutated real files (hypothesis).

Seeds: files of a small phantom (classic single-frame, the same recoded RLE and deflated),
an enhanced multi-frame file, and up to a few dozen files of ``../shared/realdata`` when it is
present (every transfer syntax of dcm_qa_ts, 12-bit, enhanced, several vendors). A mutation is
a sequence of byte flips, 32-bit overwrites with hostile values (lengths 0xFFFFFFFF,
0xFFFFFFF0, 0, ...), truncations, and duplicated or dropped top-level elements; mutations
favour the header, where the parser works.

Only the documented outcomes may occur:

- :func:`pipeline.io.scan.index_folder`: returns; every file is either in a series or in
  the problems list with a reason (never another exception);
- :func:`pipeline.io.convert.read_series` on the mutated file with the rest of its series: a
  :class:`SeriesError` naming a file of the series, or an image with sane geometry (finite
  positive spacing, orthonormal direction, the matrix of the header);

and never a hang: each example runs under an alarm. Failures already reported and owned by
another module are listed in :data:`KNOWN_BUGS`: they are counted, not failed, unless
``LIMBTRACK_FUZZ_STRICT=1``; the counts of every outcome are printed at the end (``-s``).

CI runs a bounded, derandomized number of examples (200 per test, well under 60 s); a longer
run:
``LIMBTRACK_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py --hypothesis-show-statistics``
(random seeds; ``LIMBTRACK_FUZZ_SEED`` fixes one).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import ramp_pixels, write_enhanced
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from phantom_cases import small_spec

from pipeline.io import scan, selection
from pipeline.io.convert import SeriesError, read_series
from pipeline.validation import phantom

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
EXAMPLES = int(os.environ.get("LIMBTRACK_FUZZ_EXAMPLES", "200"))
LONG_RUN = "LIMBTRACK_FUZZ_EXAMPLES" in os.environ
#: Seconds one example may take before it counts as a hang.
HANG_SECONDS = 20
#: Largest seed file used (bigger files make every example slow).
MAX_SEED_BYTES = 2 << 20

HOSTILE_WORDS = [0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 0x80000000, 0, 1, 0xFFFF, 0x10000]


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes = field(repr=False)
    siblings: tuple[Path, ...] = field(repr=False)  # the other files of its series
    elements: tuple[tuple[int, int], ...] = field(repr=False)  # top-level element ranges
    header_end: int = field(repr=False)  # offset of the pixel data element (or file end)

    def __repr__(self) -> str:
        return f"Seed({self.name!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' reports
        printer.text(repr(self))


def _elements(data: bytes) -> tuple[tuple[tuple[int, int], ...], int]:
    """Byte ranges [start, end) of the top-level elements, and where pixel data starts."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=0, force=True)
    implicit = ds.file_meta.get("TransferSyntaxUID", "") == pydicom.uid.ImplicitVRLittleEndian
    ranges = []
    pixel_start = len(data)
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            continue
        vr = getattr(raw, "VR", None)
        head = 8 if implicit or vr not in ("OB", "OW", "OF", "SQ", "UT", "UN", "OD", "OL",
                                           "OV", "UC", "UR") else 12
        start = tell - head
        ranges.append((start, tell + length))
        if tag == 0x7FE00010:
            pixel_start = start
    return tuple(ranges), pixel_start


def _seed(name: str, path: Path, siblings: list[Path]) -> Seed | None:
    data = path.read_bytes()
    if len(data) > MAX_SEED_BYTES:
        return None
    try:
        elements, header_end = _elements(data)
    except Exception:  # noqa: BLE001 - an unparseable seed is no seed
        return None
    return Seed(name, data, tuple(p for p in siblings if p != path), elements, header_end)


def _realdata_seeds() -> list[Seed]:
    if not REALDATA.is_dir():
        return []
    picks: list[tuple[str, list[Path]]] = []
    for f in sorted((REALDATA / "dcm_qa_ts" / "In").glob("*.dcm")):
        picks.append((f"dcm_qa_ts/{f.name}", [f]))
    for f in sorted((REALDATA / "dcm_qa_12bit" / "In").glob("*.dcm")):
        picks.append((f"dcm_qa_12bit/{f.name}", [f]))
    for rel in ("dicom2nifti_tests/anatomical/001", "dicom2nifti_tests/ge/anatomical/001",
                "dicom2nifti_tests/philips/anatomical/001",
                "dicom2nifti_tests/hitachi/anatomical/001",
                "dicom2nifti_tests/siemens/anatomical/001",
                "dicom2nifti_tests/philips_enhanced/anatomical/001"):
        folder = REALDATA / rel
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.is_file()
                           and not p.name.endswith((".nii.gz", ".json", ".txt")))
            picks += [(f"{rel}/{f.name}", files) for f in files[:2]]
    seeds = []
    for name, files in picks:
        made = _seed(name, files[0] if len(files) == 1 else files[0], files)
        if made is not None:
            seeds.append(made)
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    base = tmp_path_factory.mktemp("fuzz_seeds")
    phantom.generate(small_spec(subject="fuzz", n_slices=6, matrix=(64, 48),
                                sessions=small_spec().sessions[:1]), base / "ph")
    series = sorted((base / "ph" / "dicom" / "ST0001" / "SE0003").iterdir())
    made = [_seed("phantom/T1w", series[2], series)]
    for syntax in (pydicom.uid.RLELossless, pydicom.uid.DeflatedExplicitVRLittleEndian):
        folder = base / syntax.name.replace(" ", "_")
        shutil.copytree(series[0].parent, folder)
        copies = sorted(folder.iterdir())
        for path in copies:
            ds = pydicom.dcmread(path)
            if syntax.is_compressed:
                ds.compress(syntax)
            else:
                ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(path, enforce_file_format=True)
        made.append(_seed(f"phantom/{syntax.name}", copies[1], copies))
    enhanced = base / "enh" / "IM1"
    write_enhanced(enhanced, [ramp_pixels(4), ramp_pixels(4) + 9],
                   echo_times=[5.0, 40.0])
    made.append(_seed("enhanced", enhanced, [enhanced]))
    result = [s for s in made if s is not None] + _realdata_seeds()
    assert len(result) >= 4
    return result


@st.composite
def mutations(draw: st.DrawFn, n_seeds: int) -> tuple[int, list[tuple]]:
    index = draw(st.integers(0, n_seeds - 1))
    ops = draw(st.lists(st.tuples(
        st.sampled_from(["flip", "word", "truncate", "duplicate", "drop", "byte"]),
        st.floats(0, 1, allow_nan=False), st.integers(0, 255), st.integers(0, 7),
        st.booleans()), min_size=1, max_size=4))
    return index, ops


def mutate(seed_: Seed, ops: list[tuple]) -> bytes:
    """Apply the drawn operations; positions are fractions of the header (or the file)."""
    data = bytearray(seed_.data)
    elements = list(seed_.elements)
    for op, where, value, bit, whole_file in ops:
        span = len(data) if whole_file else max(1, min(seed_.header_end, len(data)))
        at = min(int(where * span), max(0, len(data) - 1))
        if op == "flip" and data:
            data[at] ^= 1 << bit
        elif op == "byte" and data:
            data[at] = value
        elif op == "word" and len(data) >= 4:
            at = min(at, len(data) - 4)
            data[at:at + 4] = struct.pack("<I", HOSTILE_WORDS[value % len(HOSTILE_WORDS)])
        elif op == "truncate":
            del data[at:]
        elif op in ("duplicate", "drop") and elements:
            start, end = elements[int(where * len(elements)) % len(elements)]
            if end <= len(data):
                chunk = bytes(data[start:end])
                if op == "duplicate":
                    data[end:end] = chunk
                else:
                    del data[start:end]
                elements = []  # offsets are stale after a structural change
    return bytes(data)


class Hang(Exception):
    pass


#: Reported bugs in modules this test does not own: the module whose code let the error out
#: -> what is wrong. Hits are counted per site (see TALLY) instead of failing.
KNOWN_BUGS: dict[str, str] = {}  # all reported bugs are fixed; list new ones here
STRICT = os.environ.get("LIMBTRACK_FUZZ_STRICT", "1") == "1"  # known bugs fixed: strict
TALLY: Counter[str] = Counter()


def known_bug(err: BaseException) -> str | None:
    """The site ('convert.py:_sidecar') of a known bug that raised `err`, else None."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if f"{os.sep}pipeline{os.sep}" in f.filename]
    if STRICT or not ours:
        return None
    from_library = "site-packages" in frames[-1].filename  # pydicom, a decoder
    site = Path(ours[-1].filename).name
    caller = next((Path(f.filename).name for f in reversed(ours)
                   if Path(f.filename).name in KNOWN_BUGS), None)
    if caller is None or not (from_library or site in KNOWN_BUGS):
        return None
    return f"{site}:{ours[-1].name}"


@pytest.fixture(scope="module", autouse=True)
def report_tally() -> Iterator[None]:
    yield
    print("\nfuzz outcomes:", dict(sorted(TALLY.items())))


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=not LONG_RUN, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large])
_SEED = os.environ.get("LIMBTRACK_FUZZ_SEED")


def _maybe_seed(test):  # noqa: ANN001, ANN202
    return seed(int(_SEED))(test) if _SEED else test


def _write(folder: Path, name: str, data: bytes) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    path = folder / name
    path.write_bytes(data)
    return path


@_maybe_seed
@FUZZ_SETTINGS
@given(case=st.data())
def test_fuzz_index(seeds: list[Seed], tmp_path: Path, case: st.DataObject) -> None:
    index, ops = case.draw(mutations(len(seeds)))
    data = mutate(seeds[index], ops)
    folder = tmp_path / "idx"
    path = _write(folder, "mutated", data)
    with warnings.catch_warnings(), alarm(HANG_SECONDS):
        warnings.simplefilter("ignore")
        result = scan.index_folder(folder, workers=1)
        selection.select_sessions(result.series)
    TALLY["index: in a series" if result.series else "index: problem row"] += 1
    assert result.n_files_seen == 1
    in_series = [f for r in result.series for f in r.files]
    listed = [p for p in result.problems if p.path == "mutated"]
    assert (len(in_series) == 1) != bool(listed), result  # in a series, or a problem row
    assert all(p.problem for p in result.problems)
    for record in result.series:
        assert record.files == (path.resolve(),) or record.files == (path,)
        assert record.status in ("skipped", "refused")
        assert record.status != "refused" or record.reason


@_maybe_seed
@FUZZ_SETTINGS
@given(case=st.data())
def test_fuzz_read_series(seeds: list[Seed], tmp_path: Path, case: st.DataObject) -> None:
    index, ops = case.draw(mutations(len(seeds)))
    chosen = seeds[index]
    data = mutate(chosen, ops)
    folder = tmp_path / "series"
    path = _write(folder, "mutated", data)
    files = [path, *chosen.siblings]
    with warnings.catch_warnings(), alarm(HANG_SECONDS):
        warnings.simplefilter("ignore")
        try:
            image, sidecar = read_series(files)
        except SeriesError as err:
            assert err.path in files or err.path == Path(".") or err.path.parent == folder
            assert err.message
            TALLY["read_series: SeriesError"] += 1
            return
        except (KeyboardInterrupt, SystemExit, Hang):
            raise
        except BaseException as err:  # noqa: B036 - decoders may panic (pyo3 PanicException)
            bug = known_bug(err)
            if bug is None:
                raise
            TALLY[f"read_series: known bug {bug} ({type(err).__name__})"] += 1
            return
    TALLY["read_series: image"] += 1
    size = image.GetSize()
    assert len(size) == 3 and all(n >= 1 for n in size) and size[2] >= 3
    spacing = np.array(image.GetSpacing())
    assert np.all(np.isfinite(spacing)) and np.all(spacing > 0)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-6)
    assert np.all(np.isfinite(image.GetOrigin()))
    assert sidecar["Rows"] == size[1] and sidecar["Columns"] == size[0]
    assert image.GetPixelID() == sitk.sitkFloat32
