"""The bad-input catalogue of issue 8: every case with its expected behaviour.

Expected behaviour, whatever the case: the bad series or file is reported with its path and
the reason (``problems.tsv`` / a refused row of ``index.tsv`` / :class:`SeriesError`), the
rest of the study goes on, and no partial output stands as complete. Only the documented
outcomes occur (a problems row, a refusal, a SeriesError, a correct image): no other
exception, no unbounded allocation.

Cases already tested elsewhere are not repeated here; this table says where each one is.

- one slice missing: test_convert::test_missing_slice_refused_with_deviation,
  test_convert::test_main_refusal_leaves_no_partial_outputs (no partial NIfTI left)
- a duplicated file: test_dicom_index::test_duplicate_sop_instance_listed_once,
  test_convert::test_identical_duplicate_dropped_with_warning
- two files at one position with different pixels:
  test_convert::test_conflicting_duplicate_refused, test_realdata (failing/notavolume)
- spacing jitter of 1e-4 mm (accepted): test_convert::test_position_jitter_accepted
- variable spacing: test_convert::test_uneven_spacing_refused_with_largest_deviation,
  test_realdata (failing/sliceincrement/001, 002)
- gantry tilt: test_convert::test_gantry_tilt_refused, test_realdata (failing/gantrytilting)
- 3-plane localizer:
  test_dicom_index::test_index_splits_repeats_and_refuses_mixed_orientation,
  test_convert::test_mixed_orientation_and_matrix_refused,
  here test_messy_study_still_gives_its_session
- three echoes under one series UID: test_volumes::test_multi_echo_series_split_into_volumes
  (two echoes), here test_three_echoes_under_one_series_uid
- Dixon water/fat/in/opp:
  test_volumes::test_dixon_series_lists_volumes_and_water_is_selected
- enhanced multi-frame equal to its classic twin:
  test_volumes::test_enhanced_multiframe_equals_classic_twin
- every compressed transfer syntax voxel-equal to uncompressed: test_realdata (dcm_qa_ts,
  nine syntaxes against dcm2niix), test_volumes::test_12bit_high_bits_masked_on_both_read_paths
  (RLE), here test_transfer_syntaxes_voxel_equal_to_uncompressed
- a decoder missing (error names the package):
  test_convert::test_undecodable_compressed_pixels_name_the_decoders,
  test_volumes::test_decoder_hint_names_the_package, here test_missing_decoder_names_the_package
- no ImagePositionPatient / ImageOrientationPatient / PixelSpacing:
  test_convert::test_missing_geometry_refused
- .DS_Store, text, random bytes, zero-byte files:
  test_dicom_index::test_main_writes_outputs_and_leaves_input_unchanged (text, 0 bytes),
  here test_junk_files_listed_and_study_goes_on
- DICOMDIR with ``../`` entries: here test_dicomdir_parent_entries_are_not_followed
- header truncated: here test_truncated_header
- pixel data truncated: here test_truncated_pixel_data
- an element length of 0xFFFFFFF0: here test_element_length_0xfffffff0_index / _convert
- a header claiming 65535 x 65535 x 1000: here test_huge_header_claim_refused_by_index /
  test_huge_header_claim_convert
- derived and localizer images: test_dicom_index::test_classify_sequence (derived, localizer,
  3-plane loc), test_dicom_index::test_main_writes_outputs_and_leaves_input_unchanged
  (localizer skipped), here test_messy_study_still_gives_its_session
- rescale intercept -1024: here test_rescale_intercept_minus_1024 (and in
  test_transfer_syntaxes_voxel_equal_to_uncompressed)
- per-frame slopes: test_convert::test_rescale_slope_intercept_applied_per_slice,
  test_volumes::test_enhanced_per_frame_rescale_and_volumes
- 12-bit signed and unsigned: test_volumes::test_12bit_high_bits_masked_on_both_read_paths,
  test_realdata (dcm_qa_12bit)
- wrong or odd character sets: here test_character_sets
- empty, 00000000 and invalid dates (unknown, never today):
  test_dicom_index::test_parse_dicom_date (parser),
  here test_bad_study_dates_are_unknown_never_today (index, sessions, sidecar, file name)
- a subject whose every series is unusable:
  test_e2e::test_folder_without_usable_series_fails_with_a_clear_message (one subject),
  here test_cohort_unusable_subject_others_finish (two subjects, --keep-going)
- the input folder is never written: test_e2e::demo_run (hashes before/after),
  test_dicom_index::test_main_writes_outputs_and_leaves_input_unchanged; the workflow runs
  here and in test_phi hash their inputs too
- fuzzing of the header reader and series assembly: test_fuzz

Issue 17 (each was a wrong answer with exit status 0):

- two patients in one folder (refused with a table, or the named patient used; anonymised
  exports): test_patient_identity
- two studies on one date: here test_two_studies_on_one_date_are_two_sessions,
  test_two_studies_on_one_date_and_time_one_used_the_other_refused
- a StudyInstanceUID reused on two dates: here
  test_study_uid_reused_across_dates_gives_two_studies,
  test_study_uid_reused_an_unusable_study_is_refused_with_its_reason
- one slice rotated, of another matrix or another pixel spacing (the true reason, naming the
  file): here test_one_odd_slice_refuses_its_study_with_the_true_reason
- symbolic link loops and dangling links: here
  test_symbolic_link_that_cannot_be_followed_is_a_problem_row
- a slice of another acquisition (or patient) carrying the series' UID: here
  test_a_slice_of_another_series_carrying_its_uid_is_left_out,
  test_series_of_two_acquisitions_without_majority_is_refused,
  test_patient_identity::test_a_file_of_another_patient_is_left_out_of_its_series
- nothing written into the input folder on any failure: here
  test_nothing_is_written_into_the_input_folder_on_failure

Two cases run the converter in a child process with an address-space limit (a header can make
it ask for gigabytes): a capped file reader and a matrix-size check refuse them with a
SeriesError before any large allocation.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import base_dataset, edit_file, ramp_pixels, write_series
from phantom_cases import small_spec
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pipeline.io import convert, dicom_index
from pipeline.io.convert import SeriesError, read_series, read_volumes
from pipeline.io.files import read_tsv
from pipeline.io.records import IndexResult, SeriesRecord
from pipeline.io.scan import index_folder
from pipeline.io.selection import select_sessions
from pipeline.validation import phantom

ROOT = Path(__file__).resolve().parents[2]
#: Peak of traced Python allocations allowed while a hostile header is read.
SMALL_PEAK_BYTES = 64 << 20


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def good_study(root: Path, study_uid: str | None = None, **kw: object) -> str:
    """A usable study (T1w + STIR) under `root`; returns its StudyInstanceUID."""
    study_uid = study_uid or generate_uid()
    write_series(root / "t1", sequence="T1w", study_uid=study_uid, series_number=3, seed=1,
                 **kw)  # type: ignore[arg-type]
    write_series(root / "stir", sequence="STIR", study_uid=study_uid, series_number=5, seed=2,
                 **kw)  # type: ignore[arg-type]
    return study_uid


def one_session(result: IndexResult) -> dict:
    sessions, refused = select_sessions(result.series)
    assert len(sessions) == 1, refused
    return sessions[0]


def problem_of(result: IndexResult, rel: str) -> str:
    found = {p.path: p.problem for p in result.problems}
    assert rel in found, (rel, found)
    return found[rel]


# --------------------------------------------------------------------------------------------
# files that are not DICOM images
# --------------------------------------------------------------------------------------------

def _ds_store() -> bytes:
    # Finder's ".DS_Store": a 4-byte alignment word, "Bud1", then a B-tree of records
    return b"\x00\x00\x00\x01Bud1" + bytes(range(256)) * 24


JUNK: dict[str, bytes] = {
    ".DS_Store": _ds_store(),
    "._IM0001": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 4000,
    "notes.txt": "Befund: Bein links geschwollen, Ödem ++\n".encode() * 40,
    "random.bin": np.random.default_rng(8).bytes(70_000),
    "random_big.bin": np.random.default_rng(9).bytes(300_000),  # past the in-memory prefix
    "fake_preamble.dcm": b"\x00" * 128 + b"DICM" + np.random.default_rng(10).bytes(5000),
    "zero_bytes": b"",
    "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 2000,
}


@pytest.mark.parametrize("name", JUNK)
def test_junk_files_listed_and_study_goes_on(tmp_path: Path, name: str) -> None:
    good_study(tmp_path / "in")
    (tmp_path / "in" / "t1" / name).write_bytes(JUNK[name])
    result = index_folder(tmp_path / "in")
    reason = problem_of(result, f"t1/{name}")
    assert reason.startswith(("not a DICOM file", "empty file", "unreadable DICOM header",
                              "not an image")), reason
    assert all(r.status != "refused" for r in result.series)
    session = one_session(result)
    assert session["anatomical"]["n_files"] == 5


def test_dicomdir_parent_entries_are_not_followed(tmp_path: Path) -> None:
    """A DICOMDIR whose records point at ``../outside/...`` (and an absolute path): the
    index walks the input folder itself and never opens what a DICOMDIR names."""
    outside_study = good_study(tmp_path / "outside")
    inside_study = good_study(tmp_path / "in" / "export")
    outside_files = sorted((tmp_path / "outside").rglob("*"))
    records = []
    for target in [*(("..", "..", "outside", p.parent.name, p.name) for p in outside_files
                     if p.is_file()), ("/etc", "passwd")]:
        record = Dataset()
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = list(target)
        record.ReferencedSOPInstanceUIDInFile = generate_uid()
        records.append(record)
    ds = base_dataset("1.2.840.10008.1.3.10", FileSetID="EVIL",
                      DirectoryRecordSequence=DicomSequence(records))
    del ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(tmp_path / "in" / "DICOMDIR", enforce_file_format=True)
    before = tree_digest(tmp_path)

    result = index_folder(tmp_path / "in")
    assert "DICOMDIR" in problem_of(result, "DICOMDIR")
    indexed = [f for r in result.series for f in r.files]
    root = (tmp_path / "in").resolve()
    assert indexed and all(f.resolve().is_relative_to(root) for f in indexed)
    assert {r.study_uid for r in result.series} == {inside_study}
    assert outside_study not in {r.study_uid for r in result.series}
    one_session(result)
    out = tmp_path / "out"
    assert dicom_index.main(["--input-dir", str(tmp_path / "in"), "--out-dir", str(out)]) == 0
    assert tree_digest(tmp_path / "in") == {k[len("in/"):]: v for k, v in before.items()
                                            if k.startswith("in/")}
    assert "outside" not in (out / "sessions.json").read_text()


# --------------------------------------------------------------------------------------------
# truncated files
# --------------------------------------------------------------------------------------------

def _pixel_tag_offset(data: bytes) -> int:
    return data.rindex(b"\xe0\x7f\x10\x00")


@pytest.mark.parametrize("cut", ["before the UIDs", "after the UIDs"])
@pytest.mark.parametrize("slice_index", [0, 2])
def test_truncated_header(tmp_path: Path, cut: str, slice_index: int) -> None:
    study = good_study(tmp_path / "in")
    # a second, complete T1w series: the study goes on with it
    spare = write_series(tmp_path / "in" / "t1_repeat", sequence="T1w", study_uid=study,
                         series_number=4, seed=7)
    broken = sorted((tmp_path / "in" / "t1").iterdir())
    info_files = sorted(broken, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    victim = info_files[slice_index]
    data = victim.read_bytes()
    at = data.index(b"\x08\x00\x60\x00") if cut == "before the UIDs" \
        else data.index(b"\x28\x00\x10\x00") + 3  # inside Rows, after every UID
    victim.write_bytes(data[:at])
    result = index_folder(tmp_path / "in")
    rel = victim.relative_to(tmp_path / "in").as_posix()
    assert problem_of(result, rel)
    with pytest.raises(SeriesError) as err:
        read_series(broken)
    assert err.value.path == victim
    if cut == "after the UIDs":
        # the file still names its series: the series is refused, the spare one is used
        t1 = next(r for r in result.series if r.series_number == 3)
        assert t1.status == "refused" and "incomplete image header" in t1.reason
        assert rel in t1.reason
        assert one_session(result)["anatomical"]["series_uid"] == spare.series_uid
    else:
        # nothing says which series lost the file: it is listed as a problem and the series
        # keeps 4 files. An inner gap is refused by the index (non-uniform spacing, the
        # spare series is used) and by convert (see test_convert); an edge slice
        # (slice_index 0) gives a volume one slice short whose only trace is the
        # problems.tsv row - a known residual risk (see issue 8's note)
        t1 = next(r for r in result.series if r.series_number == 3)
        assert t1.n_files == 4
        if slice_index:
            assert t1.status == "refused" and "non-uniform slice spacing" in t1.reason
        assert one_session(result)["anatomical"]["series_uid"] == spare.series_uid


@pytest.mark.parametrize("keep", ["40 bytes", "all but one byte", "no pixel element"])
def test_truncated_pixel_data(tmp_path: Path, keep: str) -> None:
    study = good_study(tmp_path / "in")
    spare = write_series(tmp_path / "in" / "stir_repeat", sequence="STIR", study_uid=study,
                         series_number=6, seed=8)
    files = sorted((tmp_path / "in" / "stir").iterdir())
    victim = files[2]
    data = victim.read_bytes()
    at = _pixel_tag_offset(data)
    cut = {"40 bytes": at + 12 + 40, "all but one byte": len(data) - 1,
           "no pixel element": at}[keep]
    victim.write_bytes(data[:cut])
    result = index_folder(tmp_path / "in")
    stir = next(r for r in result.series if r.series_number == 5)
    assert stir.status == "refused", stir
    assert victim.name in stir.reason
    assert "truncated file or corrupt header" in stir.reason
    assert one_session(result)["fluid"]["series_uid"] == spare.series_uid
    with pytest.raises(SeriesError) as err:
        read_series(files)
    assert err.value.path == victim


# --------------------------------------------------------------------------------------------
# hostile lengths and sizes: rejected before anything big is allocated
# --------------------------------------------------------------------------------------------

def _with_private_element(files: list[Path]) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        ds.add_new((0x0019, 0x10FF), "OB", b"0123456789abcdef")
        ds.save_as(path, enforce_file_format=True)


ELEMENTS = {
    # the element whose 32-bit length is overwritten, as its bytes in the file
    "private OB element": b"\x19\x00\xff\x10OB\x00\x00" + struct.pack("<I", 16),
    "file meta element": b"\x02\x00\x01\x00OB\x00\x00" + struct.pack("<I", 2),
}


def _set_length(path: Path, element: bytes, length: int = 0xFFFFFFF0) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(element)
    data[at + 8:at + 12] = struct.pack("<I", length)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("size", [8, 300])  # 300 x 300: past the 128 kB read in memory
@pytest.mark.parametrize("element", ELEMENTS)
def test_element_length_0xfffffff0_index(tmp_path: Path, element: str, size: int) -> None:
    study = good_study(tmp_path / "in")
    info = write_series(tmp_path / "in" / "t1b", ramp_pixels(4, size, size), sequence="T1w",
                        study_uid=study, series_number=8, seed=5)
    _with_private_element(info.files)
    _set_length(info.files[1], ELEMENTS[element])
    tracemalloc.start()
    try:
        result = index_folder(tmp_path / "in", workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < SMALL_PEAK_BYTES, f"{peak / 2**20:.0f} MiB allocated for one header"
    rel = info.files[1].relative_to(tmp_path / "in").as_posix()
    assert problem_of(result, rel)
    assert one_session(result)


_CHILD = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    from pathlib import Path
    limit = 3 << 30  # a header must not make the converter ask for gigabytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from pipeline.io.convert import SeriesError, read_series
    files = [Path(p) for p in json.loads(sys.argv[1])]
    tracemalloc.start()
    try:
        read_series(files)
        outcome = {"kind": "image"}
    except SeriesError as err:
        outcome = {"kind": "SeriesError", "path": str(err.path), "message": err.message}
    except BaseException as err:
        outcome = {"kind": type(err).__name__, "message": str(err)[:300]}
    outcome["peak"] = tracemalloc.get_traced_memory()[1]
    print(json.dumps(outcome))
""")


def convert_in_child(files: list[Path]) -> dict:
    """read_series(files) in a child process limited to 3 GiB of address space."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([str(f) for f in files])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("element", [
    "private OB element",  # longer than convert's defer_size: skipped, not read
    "file meta element",
])
def test_element_length_0xfffffff0_convert(tmp_path: Path, element: str) -> None:
    info = write_series(tmp_path, ramp_pixels(4, 300, 300))
    _with_private_element(info.files)
    _set_length(info.files[1], ELEMENTS[element])
    outcome = convert_in_child(info.files)
    assert outcome["kind"] == "SeriesError", outcome
    assert outcome["path"] == str(info.files[1])
    assert "MemoryError" not in outcome["message"], outcome
    assert outcome["peak"] < SMALL_PEAK_BYTES


def _huge(tmp_path: Path, kind: str) -> list[Path]:
    if kind == "65535 x 65535, 3 files":
        info = write_series(tmp_path / "h", ramp_pixels(3))
        for f in info.files:
            edit_file(f, Rows=65535, Columns=65535)
        return info.files
    # one classic file claiming 1000 frames of 65535 x 65535
    info = write_series(tmp_path / "h", ramp_pixels(3))
    for f in info.files:
        edit_file(f, Rows=65535, Columns=65535, NumberOfFrames=1000)
    return info.files


@pytest.mark.parametrize("kind", ["65535 x 65535, 3 files", "65535 x 65535 x 1000 frames"])
def test_huge_header_claim_refused_by_index(tmp_path: Path, kind: str) -> None:
    study = good_study(tmp_path / "in")
    files = _huge(tmp_path / "in", kind)
    for f in files:
        edit_file(f, StudyInstanceUID=study, SeriesNumber=9)
    tracemalloc.start()
    try:
        result = index_folder(tmp_path / "in", workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < SMALL_PEAK_BYTES
    huge = next(r for r in result.series if r.series_number == 9)
    assert huge.status == "refused"
    assert "65535" in huge.reason or "1000 frames" in huge.reason
    assert one_session(result)


@pytest.mark.parametrize("kind", [
    "65535 x 65535, 3 files",
    "65535 x 65535 x 1000 frames",
])
def test_huge_header_claim_convert(tmp_path: Path, kind: str) -> None:
    files = _huge(tmp_path, kind)
    outcome = convert_in_child(files)
    assert outcome["kind"] == "SeriesError", outcome
    assert outcome["peak"] < SMALL_PEAK_BYTES


# --------------------------------------------------------------------------------------------
# pixel encodings
# --------------------------------------------------------------------------------------------

def _recode(files: list[Path], syntax: str) -> None:
    for path in files:
        ds = pydicom.dcmread(path)
        if syntax in (RLELossless, JPEGLSLossless):
            ds.compress(syntax)
        elif syntax == ExplicitVRBigEndian:
            ds.PixelData = ds.pixel_array.astype(">u2").tobytes()  # OW is written as given
            ds.file_meta.TransferSyntaxUID = syntax
            pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False,
                             force_encoding=True)
            continue
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, DeflatedExplicitVRLittleEndian,
                                    ImplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=lambda s: s.name)
def test_transfer_syntaxes_voxel_equal_to_uncompressed(tmp_path: Path, syntax: str) -> None:
    pixels = (ramp_pixels(4, 16, 12) * 3).astype(np.uint16)
    info = write_series(tmp_path / "a", pixels, rescale=(1.0, -1024.0))
    reference, _ = read_series(info.files)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    files = sorted((tmp_path / "b").iterdir())
    _recode(files, syntax)
    image, sidecar = read_series(files)
    assert sidecar["TransferSyntaxUID"] == syntax
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                  sitk.GetArrayFromImage(reference))
    assert image.GetOrigin() == reference.GetOrigin()


@pytest.mark.parametrize(("syntax", "package"), [(JPEGLSLossless, "pylibjpeg-libjpeg"),
                                                 (RLELossless, "pylibjpeg-rle")],
                         ids=["JPEG-LS", "RLE"])
def test_missing_decoder_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           syntax: str, package: str) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    info = write_series(tmp_path / "in", ramp_pixels(4))
    _recode(info.files, syntax)
    decoder = get_decoder(syntax)
    # as if no decoder package were installed: every plugin unavailable, with its needs
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg", package),
                                                  "gdcm": ("gdcm",)})
    result = index_folder(tmp_path / "in")  # headers only: nothing to decode
    assert result.series[0].status != "refused" and not result.problems
    with pytest.raises(SeriesError) as err:
        read_series(info.files)
    assert package in err.value.message
    assert "pip install" in err.value.message
    assert err.value.path in info.files


def test_rescale_intercept_minus_1024(tmp_path: Path) -> None:
    info = write_series(tmp_path, rescale=(1.0, -1024.0))
    image, _ = read_series(info.files)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                  info.pixels.astype(np.float32) - 1024.0)


def test_three_echoes_under_one_series_uid(tmp_path: Path) -> None:
    series_uid, study_uid = generate_uid(), generate_uid()
    infos = [write_series(tmp_path, ramp_pixels() + 100 * e, series_uid=series_uid,
                          study_uid=study_uid, seed=20 + e, sequence="T2FS",
                          tags={"EchoNumbers": e + 1, "EchoTime": 20.0 + 40 * e})
             for e in range(3)]
    volumes = {v.label: v for v in read_volumes([f for i in infos for f in i.files])}
    assert sorted(volumes) == ["echo-1", "echo-2", "echo-3"]
    for e, info in enumerate(infos):
        volume = volumes[f"echo-{e + 1}"]
        assert volume.image is not None and volume.sidecar["EchoTime"] == 20.0 + 40 * e
        np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.image), info.pixels)
    record = index_folder(tmp_path).series[0]
    assert sorted(v.label for v in record.volumes) == ["echo-1", "echo-2", "echo-3"]


# --------------------------------------------------------------------------------------------
# character sets and dates
# --------------------------------------------------------------------------------------------

PLACEHOLDER = "Q" * 24

CHARSETS: dict[str, tuple[str | None, bytes]] = {
    # SpecificCharacterSet (None: absent), raw bytes of SeriesDescription
    "utf-8 declared": ("ISO_IR 192", "Bein links Ödem 日本".encode()),
    "latin-1 declared, utf-8 bytes": ("ISO_IR 100", "Bein Ödem ß".encode()),
    "none declared, latin-1 bytes": (None, "Bein Ödem ß".encode("latin-1")),
    "unknown term": ("ISO_IR 999", b"Bein \xd6dem \xff\xfe"),
    "gb18030": ("GB18030", "腿部水肿".encode("gb18030")),
    "iso 2022 japanese": ("\\ISO 2022 IR 87", b"\x1b$B%H%j\x1b(B leg"),
    "invalid utf-8": ("ISO_IR 192", b"\xc3\x28 \xa0\xa1 \xf0\x28\x8c\xbc"),
    "nul bytes": ("ISO_IR 100", b"leg\x00\x00 T1"),
}


@pytest.mark.parametrize("case", CHARSETS)
def test_character_sets(tmp_path: Path, case: str) -> None:
    charset, raw = CHARSETS[case]
    study = good_study(tmp_path / "in")
    extra = write_series(tmp_path / "in" / "odd", sequence="T1w", study_uid=study,
                         series_number=7, seed=9,
                         tags={"SeriesDescription": PLACEHOLDER})
    padded = raw + b" " * (len(PLACEHOLDER) - len(raw))
    assert len(padded) == len(PLACEHOLDER)
    for path in extra.files:
        if charset is None:
            edit_file(path, SpecificCharacterSet=None)
        else:
            edit_file(path, SpecificCharacterSet=charset)
        data = path.read_bytes()
        path.write_bytes(data.replace(PLACEHOLDER.encode(), padded))
    out = tmp_path / "out"
    assert dicom_index.main(["--input-dir", str(tmp_path / "in"), "--out-dir", str(out)]) == 0
    rows = read_tsv(out / "index.tsv")
    odd = next(r for r in rows if r["series_number"] == "7")
    assert odd["status"] in ("used", "skipped"), odd
    for name in ("index.tsv", "sessions.json", "sessions.tsv", "problems.tsv"):
        (out / name).read_text(encoding="utf-8")  # valid UTF-8
    json.loads((out / "sessions.json").read_text(encoding="utf-8"))
    image, sidecar = read_series(extra.files)
    assert image.GetSize() == (7, 6, 5)
    json.dumps(sidecar, ensure_ascii=False).encode("utf-8")


BAD_DATES = {"empty": "", "zeros": "00000000", "month 13": "20241301", "30 February":
             "20240230", "text": "unknown", "year 1800": "18000101", "spaces": "        "}


@pytest.mark.parametrize("case", BAD_DATES)
def test_bad_study_dates_are_unknown_never_today(tmp_path: Path, case: str) -> None:
    value = BAD_DATES[case]
    good_study(tmp_path / "in" / "dated")
    undated = good_study(tmp_path / "in" / "undated", study_date=value, study_time="083000")
    out = tmp_path / "out"
    assert dicom_index.main(["--input-dir", str(tmp_path / "in"), "--out-dir", str(out)]) == 0
    today = dt.date.today()
    texts = {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()}
    for text in texts.values():
        assert today.isoformat() not in text and today.strftime("%Y%m%d") not in text
    rows = [r for r in read_tsv(out / "index.tsv") if r["study_uid"] == undated]
    assert len(rows) == 2 and {r["study_date"] for r in rows} == {"n/a"}
    assert all("no valid StudyDate" in r["reason"] for r in rows)
    data = json.loads(texts["sessions.json"])
    assert [s["study_date"] for s in data["sessions"]] == ["2024-02-25"]
    refused = [s for s in data["refused_studies"] if s["study_uid"] == undated]
    assert refused[0]["study_date"] is None
    files = sorted((tmp_path / "in" / "undated" / "t1").iterdir())
    image, sidecar = read_series(files)
    assert sidecar["StudyDate"] is None
    assert convert.volume_name("x", sidecar).startswith("sub-x_ses-nodate_")


# --------------------------------------------------------------------------------------------
# a messy study: localizers, derived images and junk around the usable series
# --------------------------------------------------------------------------------------------

def test_messy_study_still_gives_its_session(tmp_path: Path) -> None:
    root = tmp_path / "in"
    study = good_study(root)
    localizer = generate_uid()
    for plane, (row, col) in enumerate([((1, 0, 0), (0, 1, 0)), ((1, 0, 0), (0, 0, -1)),
                                        ((0, 1, 0), (0, 0, -1))]):
        write_series(root / "loc", ramp_pixels(3), sequence="localizer", study_uid=study,
                     series_uid=localizer, series_number=1, seed=30 + plane, row_cosine=row,
                     col_cosine=col, slice_step=10.0)
    write_series(root / "mpr", sequence="derived", study_uid=study, series_number=40, seed=40)
    (root / ".DS_Store").write_bytes(JUNK[".DS_Store"])
    (root / "loc" / "random").write_bytes(JUNK["random.bin"])
    result = index_folder(root)
    by_number = {r.series_number: r for r in result.series}
    assert by_number[1].sequence_class == "localizer" and by_number[1].status == "refused"
    assert "mixed slice orientations" in by_number[1].reason
    assert by_number[40].sequence_class == "derived"
    session = one_session(result)
    assert (session["anatomical"]["series_number"], session["fluid"]["series_number"]) == (3, 5)
    assert {p.path for p in result.problems} == {".DS_Store", "loc/random"}


# --------------------------------------------------------------------------------------------
# a cohort where one subject has nothing usable
# --------------------------------------------------------------------------------------------

def run_workflow(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.workflow
@pytest.mark.slow
def test_cohort_unusable_subject_others_finish(tmp_path: Path) -> None:
    good = tmp_path / "good"
    phantom.generate(small_spec(subject="good", n_slices=8), good)
    good_in = good / "dicom"
    # junk next to the usable studies of the good subject
    (good_in / ".DS_Store").write_bytes(JUNK[".DS_Store"])
    (good_in / "ST0001" / "random").write_bytes(JUNK["random.bin"])
    (good_in / "ST0001" / "empty").write_bytes(b"")
    bad_in = tmp_path / "bad" / "dicom"
    study = generate_uid()
    # every series unusable: a 3-plane localizer, a 2-slice T1w, a tilted STIR
    for plane, (row, col) in enumerate([((1, 0, 0), (0, 1, 0)), ((0, 1, 0), (0, 0, -1))]):
        write_series(bad_in / "loc", ramp_pixels(3), sequence="localizer", study_uid=study,
                     series_uid=study + ".1", series_number=1, seed=plane, row_cosine=row,
                     col_cosine=col)
    write_series(bad_in / "t1", ramp_pixels(2), sequence="T1w", study_uid=study,
                 series_number=2, seed=3)
    write_series(bad_in / "stir", ramp_pixels(2), sequence="STIR", study_uid=study,
                 series_number=3, seed=4)
    (bad_in / "notes.txt").write_text("nothing here\n")
    sheet = tmp_path / "subjects.tsv"
    sheet.write_text("subject\tinput_dir\tday0\taffected_side\n"
                     f"good\t{good_in}\t2024-03-01\tleft\n"
                     f"bad\t{bad_in}\t2024-03-01\tleft\n")
    before = {"good": tree_digest(good_in), "bad": tree_digest(bad_in)}
    results = tmp_path / "results"
    proc = run_workflow("--keep-going", "--config", f"subjects_sheet={sheet}",
                        f"results_dir={results}")
    assert proc.returncode != 0  # one subject failed
    assert {"good": tree_digest(good_in), "bad": tree_digest(bad_in)} == before
    for name in ("volumes.tsv", "longitudinal.tsv", "summary.json", "report.html"):
        assert (results / "good" / name).is_file(), (name, proc.stderr[-3000:])
    problems = {r["path"] for r in read_tsv(results / "good" / "problems.tsv")}
    assert problems == {".DS_Store", "ST0001/random", "ST0001/empty"}
    # the bad subject: a clear message naming the folder, nothing that looks complete
    log = (results / "bad" / "logs" / "index.log").read_text()
    assert str(bad_in.resolve()) in log
    assert "no study with both a T1-weighted and a fluid-sensitive series" in log
    for name in ("volumes.tsv", "summary.json", "report.html", "sessions.json"):
        assert not (results / "bad" / name).exists(), name
    assert "index" in proc.stderr and "bad" in proc.stderr
    # no file outside the results folder (and the inputs) was written
    made = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert made <= {"good", "bad", "subjects.tsv", "results"}


# --------------------------------------------------------------------------------------------
# issue 17: irregular exports that gave a wrong answer with exit status 0
# (two patients in one folder: tests/test_patient_identity.py)
# --------------------------------------------------------------------------------------------

def run_index(root: Path, out: Path, *args: str) -> tuple[int, dict]:
    code = dicom_index.main(["--input-dir", str(root), "--out-dir", str(out), *args])
    return code, json.loads((out / "sessions.json").read_text())


def folder_state(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (files by content, folders and links by kind)."""
    state = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            state[key] = f"link:{p.readlink()}"
        elif p.is_file():
            state[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            state[key] = "folder"
    return state


def test_two_studies_on_one_date_are_two_sessions(tmp_path: Path) -> None:
    root = tmp_path / "in"
    good_study(root / "am", study_time="081500")
    good_study(root / "pm", study_time="153000")
    good_study(root / "later", study_date="20240310")
    code, data = run_index(root, tmp_path / "out")
    assert code == 0
    assert [(s["session"], s["study_date"]) for s in data["sessions"]] == [
        ("20240225T081500", "2024-02-25"), ("20240225T153000", "2024-02-25"),
        ("20240310", "2024-03-10")]
    files = [set(s["anatomical"]["files"]) for s in data["sessions"]]
    assert not files[0] & files[1]  # each session its own series
    assert any("2 studies on 2024-02-25 are separate sessions" in w for w in data["warnings"])
    sessions_tsv = read_tsv(tmp_path / "out" / "sessions.tsv")
    assert [r["session"] for r in sessions_tsv][:2] == ["20240225T081500", "20240225T153000"]
    used = [r for r in read_tsv(tmp_path / "out" / "index.tsv") if r["status"] == "used"]
    assert sorted(r["reason"].rsplit(" ", 1)[1] for r in used) == sorted(
        ["20240225T081500"] * 2 + ["20240225T153000"] * 2 + ["20240310"] * 2)


def test_two_studies_on_one_date_and_time_one_used_the_other_refused(tmp_path: Path) -> None:
    root = tmp_path / "in"
    first = good_study(root / "a", study_uid="1.2.3.1")
    second = good_study(root / "b", study_uid="1.2.3.2")
    code, data = run_index(root, tmp_path / "out")
    assert code == 0
    assert [(s["session"], s["study_uid"]) for s in data["sessions"]] == [
        ("20240225T101500", first)]
    [refused] = data["refused_studies"]
    assert refused["study_uid"] == second
    assert "same study date and time as another study" in refused["reason"]
    assert "not used" in refused["reason"]


@pytest.mark.parametrize("series_uids", ["own", "reused too"])
def test_study_uid_reused_across_dates_gives_two_studies(tmp_path: Path,
                                                         series_uids: str) -> None:
    root = tmp_path / "in"
    uid = generate_uid()
    t1, stir = generate_uid(), generate_uid()
    extra = {"t1": {}, "stir": {}} if series_uids == "own" else \
        {"t1": {"series_uid": t1}, "stir": {"series_uid": stir}}
    for date in ("20240225", "20240310"):
        write_series(root / date / "t1", sequence="T1w", study_uid=uid, series_number=3,
                     seed=1, study_date=date, **extra["t1"])  # type: ignore[arg-type]
        write_series(root / date / "stir", sequence="STIR", study_uid=uid, series_number=5,
                     seed=2, study_date=date, **extra["stir"])  # type: ignore[arg-type]
    code, data = run_index(root, tmp_path / "out")
    assert code == 0
    assert [s["session"] for s in data["sessions"]] == ["20240225", "20240310"]
    for session in data["sessions"]:
        folder = session["session"]
        assert all(Path(f).parent.parent.name == folder
                   for role in ("anatomical", "fluid") for f in session[role]["files"])
    assert any("StudyInstanceUID is carried by 2 studies (dates 2024-02-25, 2024-03-10)" in w
               for w in data["warnings"])


def test_study_uid_reused_an_unusable_study_is_refused_with_its_reason(tmp_path: Path) -> None:
    root = tmp_path / "in"
    uid = good_study(root / "first")
    write_series(root / "second", sequence="T1w", study_uid=uid, series_number=3, seed=4,
                 study_date="20240310")
    code, data = run_index(root, tmp_path / "out")
    assert code == 0
    assert [s["session"] for s in data["sessions"]] == ["20240225"]
    [refused] = data["refused_studies"]
    assert refused["study_date"] == "2024-03-10"
    assert refused["reason"].startswith("no fluid-sensitive series")


ODD_SLICES = {
    "rotated": ({"ImageOrientationPatient": [1, 0, 0, 0, 0.9848, 0.1736]},
                "mixed slice orientations", "orientation [1, 0, 0, 0, 0.9848, 0.1736]"),
    "other matrix": ("matrix", "mixed image matrix sizes", "matrix 5x7 against 6x7"),
    "other pixel spacing": ({"PixelSpacing": [0.88, 0.66]}, "mixed pixel spacing",
                            "pixel spacing [0.88, 0.66] mm against [0.8, 0.6] mm"),
}


@pytest.mark.parametrize("case", ODD_SLICES)
def test_one_odd_slice_refuses_its_study_with_the_true_reason(tmp_path: Path,
                                                              case: str) -> None:
    change, headline, detail = ODD_SLICES[case]
    root = tmp_path / "in"
    good_study(root / "ok", study_date="20240310")
    good_study(root / "odd")
    odd = sorted((root / "odd" / "t1").iterdir())[2]
    if change == "matrix":
        ds = pydicom.dcmread(odd)
        ds.Rows = 5
        ds.PixelData = ds.PixelData[: 5 * 7 * 2]
        ds.save_as(odd, enforce_file_format=True)
    else:
        edit_file(odd, **change)  # type: ignore[arg-type]
    before = folder_state(root)
    code, data = run_index(root, tmp_path / "out")
    assert code == 0
    assert [s["session"] for s in data["sessions"]] == ["20240310"]
    [refused] = data["refused_studies"]
    reason = refused["reason"]
    assert reason.startswith("no T1-weighted series usable: series #3 't1_tse_tra' was "
                             f"refused: {headline}")
    assert f"odd/t1/{odd.name}" in reason and detail in reason
    assert folder_state(root) == before
    # convert, given the whole series, refuses it naming the same file
    with pytest.raises(SeriesError) as err:
        read_series(sorted((root / "odd" / "t1").iterdir()))
    assert err.value.path == odd and headline in err.value.message


@pytest.mark.parametrize("link", ["to itself", "loop of two", "to nowhere"])
def test_symbolic_link_that_cannot_be_followed_is_a_problem_row(tmp_path: Path,
                                                                link: str) -> None:
    root = tmp_path / "in"
    good_study(root)
    if link == "to itself":
        (root / "t1" / "loop").symlink_to("loop")
    elif link == "loop of two":
        (root / "t1" / "loop").symlink_to("other")
        (root / "t1" / "other").symlink_to("loop")
    else:
        (root / "t1" / "loop").symlink_to(tmp_path / "missing")
    out = tmp_path / "out"
    code, _ = run_index(root, out)
    assert code == 0
    problems = {r["path"]: r["problem"] for r in read_tsv(out / "problems.tsv")}
    assert "t1/loop" in problems
    expected = "target does not exist" if link == "to nowhere" else "link loop"
    assert expected in problems["t1/loop"]
    one_session(index_folder(root))


def _intrude(t1: SeriesRecord, stir_file: Path, target: Path,
             position_z: float | None) -> None:
    """Copy a STIR slice into the T1 series (its SeriesInstanceUID, a new SOP UID)."""
    shutil.copy(stir_file, target)
    changes: dict[str, object] = {"SeriesInstanceUID": t1.series_uid,
                                  "SOPInstanceUID": generate_uid()}
    if position_z is not None:
        ds = pydicom.dcmread(target)
        changes["ImagePositionPatient"] = [*ds.ImagePositionPatient[:2], position_z]
    edit_file(target, **changes)


@pytest.mark.parametrize("where", ["at an extra position", "at a T1 position",
                                   "named first"])
def test_a_slice_of_another_series_carrying_its_uid_is_left_out(tmp_path: Path,
                                                                where: str) -> None:
    root = tmp_path / "in"
    good_study(root)
    series = {r.sequence_class: r for r in index_folder(root).series}
    name = "000_intruder" if where == "named first" else "zz_intruder"
    target = root / "t1" / name
    z = 20.0 if where != "at a T1 position" else None  # T1 slices are at z = 10 ... 18
    _intrude(series["T1w"], sorted(series["STIR"].files)[0], target, z)
    code, data = run_index(root, tmp_path / "out")
    assert code == 0
    [session] = data["sessions"]
    assert session["anatomical"]["sequence_class"] == "T1w"
    assert session["anatomical"]["n_files"] == 5
    assert str(target.resolve()) not in session["anatomical"]["files"]
    problems = {r["path"]: r["problem"] for r in read_tsv(tmp_path / "out" / "problems.tsv")}
    problem = problems[f"t1/{name}"]
    assert problem.startswith("left out of series #3 't1_tse_tra' (not stacked with it)")
    assert "RepetitionTime 5200 (the others: 550)" in problem
    assert "InversionTime 160 (the others: missing)" in problem
    out = tmp_path / "nifti"
    assert convert.main(["--sessions-json", str(tmp_path / "out" / "sessions.json"),
                         "--session", "20240225", "--subject", "x", "--out-dir",
                         str(out)]) == 0
    meta = json.loads((out / "sub-x_ses-20240225_T1w.json").read_text())
    assert meta["NumberOfSlices"] == 5 and meta["SequenceClass"] == "T1w"
    # given to the converter directly, the mixed file list is refused, naming the intruder
    with pytest.raises(SeriesError) as err:
        read_series([*series["T1w"].files, target])
    assert err.value.path == target and "RepetitionTime" in err.value.message


def test_series_of_two_acquisitions_without_majority_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "in"
    study = good_study(root / "ok")
    uid = generate_uid()
    write_series(root / "mixed", ramp_pixels(4), sequence="T1w", study_uid=study,
                 series_uid=uid, series_number=7, seed=5, study_date="20240225")
    write_series(root / "mixed", ramp_pixels(4), sequence="T2FS", study_uid=study,
                 series_uid=uid, series_number=7, seed=6, origin=(-3.0, -2.5, 18.0))
    result = index_folder(root)
    mixed = next(r for r in result.series if r.series_uid == uid)
    assert mixed.status == "refused" and mixed.n_files == 8
    assert mixed.reason.startswith("its 8 files are not one acquisition (2 kinds, none a "
                                   "majority)")
    assert "RepetitionTime" in mixed.reason
    one_session(result)


def test_nothing_is_written_into_the_input_folder_on_failure(tmp_path: Path) -> None:
    root = tmp_path / "in"
    good_study(root)
    write_series(root / "other", sequence="T1w", study_date="20240301", seed=9,
                 tags={"PatientID": "OTHER-99", "PatientName": "Roe^Richard"})
    (root / "t1" / "loop").symlink_to("loop")
    before = folder_state(root)
    # index: several patients (exit 1), output inside the input (exit 2)
    assert run_index(root, tmp_path / "out")[0] == 1
    assert dicom_index.main(["--input-dir", str(root), "--out-dir", str(root / "o")]) == 2
    code, data = run_index(root, tmp_path / "out", "--patient", "SECRET-ID-4711")
    assert code == 0
    # convert, session mode: an output folder inside the input is refused before writing
    for inside in (root / "nifti", root / "t1" / "nifti", root):
        assert convert.main(["--sessions-json", str(tmp_path / "out" / "sessions.json"),
                             "--session", "20240225", "--subject", "x",
                             "--out-dir", str(inside)]) == 2
    # through a link that resolves into the input folder
    (tmp_path / "sneaky").symlink_to(root / "t1", target_is_directory=True)
    assert convert.main(["--sessions-json", str(tmp_path / "out" / "sessions.json"),
                         "--session", "20240225", "--subject", "x",
                         "--out-dir", str(tmp_path / "sneaky" / "n")]) == 2
    # convert, folder mode, as a command and as a function
    assert convert.main([str(root), str(root / "converted")]) == 2
    with pytest.raises(SeriesError, match="inside the input folder"):
        convert.convert_folder(root, root / "converted")
    # a series that fails to convert writes nothing anywhere near the input
    odd = sorted((root / "stir").iterdir())[1]
    data["sessions"][0]["fluid"]["files"].append(str(odd.with_name("missing")))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    assert convert.main(["--sessions-json", str(broken), "--session", "20240225",
                         "--subject", "x", "--out-dir", str(tmp_path / "n2")]) == 2
    assert folder_state(root) == before
