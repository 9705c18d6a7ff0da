"""Interoperability exports (pipeline.export: tables, dicom, the ``limbtrack export`` command):
label tables, DICOM SEG and SR round trips.

Inputs are a small synthetic oblique series per session (tests/dicom_factory.py, shuffled file
names and instance numbers) with a label map on its grid written by SimpleITK as the workflow
does, plus sessions.json, the fluid sidecar and volumes.tsv as the workflow writes them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import SeriesInfo, rotation, write_series

from pipeline import __version__
from pipeline.export import ExportError, dicom, tables
from pipeline.export import session as export_cli
from pipeline.io.files import read_tsv, write_json_atomic, write_tsv_atomic
from pipeline.labels import LABEL_COLORS, LABEL_NAMES, SIDES, STRUCTURES, structure_labels
from pipeline.measure import VOLUME_COLUMNS, volumes_from_labels

hd = pytest.importorskip("highdicom")
from pydicom.sr.codedict import codes  # noqa: E402

SUBJECT = "synth"
SHAPE = (6, 20, 24)  # slices, rows, columns
SPACING = (0.8, 0.7)  # PixelSpacing: between rows, between columns (mm)
STEP_MM = 3.0
SESSIONS = {"20240225": ("2024-02-25", -3), "20240307": ("2024-03-07", 7)}
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def synthetic_labels(grow: int) -> np.ndarray:
    """(slices, rows, cols) uint8 label map with every label but 4 (empty right lesion)."""
    n, rows, cols = SHAPE
    lab = np.zeros(SHAPE, np.uint8)
    lab[:, 2:18, 1:11] = 1  # right soft tissue
    lab[:, 2:18, 13:23] = 5  # left soft tissue
    lab[:, 8:12, 4:8] = 3  # right bone
    lab[:, 8:12, 16:20] = 7  # left bone
    lab[1:4, 9:11, 17:19] = 8  # left marrow lesion on three slices
    for k in range(n):  # edema differs per slice (slice order matters) and per session
        lab[k, 2:4 + k // 2 + grow, 13:23] = 6
        lab[k, 15:17, 1:2 + k] = 2
    return lab


def write_label_map(path: Path, labels: np.ndarray, info: SeriesInfo, *,
                    reverse_slices: bool = False, shift_mm: float = 0.0) -> None:
    """Write `labels` (source slice order) on the series grid as NIfTI through SimpleITK."""
    normal = np.cross(info.row_cosine, info.col_cosine)
    order = np.argsort(info.positions @ normal)
    positions = info.positions[order]
    arr, origin, slice_dir = labels, positions[0], normal
    if reverse_slices:  # same voxels stored the other way round
        arr, origin, slice_dir = labels[::-1], positions[-1], -normal
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetOrigin([float(v) for v in origin + shift_mm * info.row_cosine])
    img.SetSpacing((SPACING[1], SPACING[0], STEP_MM))
    img.SetDirection(np.column_stack([info.row_cosine, info.col_cosine, slice_dir]).ravel()
                     .tolist())
    sitk.WriteImage(img, str(path))


def build_subject(root: Path) -> dict[str, Any]:
    """A subject directory as the workflow leaves it, with two sessions."""
    subject_dir = root / SUBJECT
    rot = rotation(12.0, -7.0, 25.0)
    sessions, rows, truth = [], [], {}
    for i, (session, (date, day)) in enumerate(SESSIONS.items()):
        pixels = np.random.default_rng(i).integers(0, 4000, SHAPE).astype(np.uint16)
        info = write_series(root / "dicom" / session, pixels, sequence="STIR",
                            row_cosine=rot[:, 0], col_cosine=rot[:, 1],
                            origin=(-40.0 + i, 12.0, 80.0), pixel_spacing=SPACING,
                            slice_step=STEP_MM, study_date=date.replace("-", ""),
                            tags={"BodyPartExamined": "LEG"}, seed=i)
        labels = synthetic_labels(grow=i)
        ses_dir = subject_dir / f"ses-{session}"
        ses_dir.mkdir(parents=True)
        stem = ses_dir / f"sub-{SUBJECT}_ses-{session}"
        write_label_map(Path(f"{stem}_dseg.nii.gz"), labels, info)
        write_json_atomic(Path(f"{stem}_fluid.json"), {"SeriesInstanceUID": info.series_uid})
        sessions.append({"session": session, "study_date": date, "study_uid": info.study_uid,
                         "fluid": {"series_uid": info.series_uid, "volume": "",
                                   "files": [str(f) for f in info.files]}})
        vols = volumes_from_labels(labels, SPACING[0] * SPACING[1] * STEP_MM)
        for side in SIDES:
            for structure in STRUCTURES:
                rows.append({"subject": SUBJECT, "study_date": date, "day": day, "side": side,
                             "role": "affected" if side == "left" else "contralateral",
                             "structure": structure,
                             "volume_ml": round(vols[side][structure], 3)})
        truth[session] = (labels, info)
    write_json_atomic(subject_dir / "sessions.json", {"sessions": sessions})
    write_tsv_atomic(subject_dir / "volumes.tsv", rows, VOLUME_COLUMNS)
    return {"dir": subject_dir, "truth": truth}


def _stem(subject_dir: Path, session: str) -> str:
    return str(subject_dir / f"ses-{session}" / f"sub-{SUBJECT}_ses-{session}")


def dicom_paths(subject_dir: Path, session: str) -> dicom.DicomPaths:
    """The files the workflow's export_dicom rule names for `session`."""
    s = _stem(subject_dir, session)
    return dicom.DicomPaths(
        subject=SUBJECT, session=session, dseg=Path(f"{s}_dseg.nii.gz"),
        fluid_json=Path(f"{s}_fluid.json"), sessions_json=subject_dir / "sessions.json",
        volumes_tsv=subject_dir / "volumes.tsv", seg=Path(f"{s}_seg.dcm"),
        sr=Path(f"{s}_sr.dcm"))


def run_export(subject_dir: Path, what: str, session: str = "") -> int:
    """``limbtrack export <what>`` with the files the workflow's rule names."""
    s = _stem(subject_dir, session)
    if what == "tables":
        argv = ["--dseg", f"{s}_dseg.nii.gz", "--lookup", f"{s}_dseg.tsv",
                "--itksnap", f"{s}_dseg.itksnap.txt", "--ctbl", f"{s}_dseg.ctbl"]
    elif what == "dataset":
        argv = ["--description", str(subject_dir / "dataset_description.json"),
                "--lookup", str(subject_dir / "dseg.tsv")]
    else:
        p = dicom_paths(subject_dir, session)
        argv = ["--subject", p.subject, "--session", p.session, "--dseg", str(p.dseg),
                "--fluid-json", str(p.fluid_json), "--sessions-json", str(p.sessions_json),
                "--volumes", str(p.volumes_tsv), "--seg", str(p.seg), "--sr", str(p.sr)]
    return export_cli.main([what, *argv])


def run_all_exports(subject_dir: Path) -> list[int]:
    """What the workflow runs with viewers and dicom on: per session the tables and the
    DICOM objects, then the dataset files."""
    codes_ = [run_export(subject_dir, what, session)
              for session in SESSIONS for what in ("tables", "dicom")]
    return [*codes_, run_export(subject_dir, "dataset")]


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    built = build_subject(tmp_path_factory.mktemp("export"))
    assert run_all_exports(built["dir"]) == [0] * 5
    return built


def stem(subject: dict[str, Any], session: str) -> str:
    return _stem(subject["dir"], session)


# ----------------------------------------------------------------------------- label tables

ITKSNAP_LINE = re.compile(
    r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([01])\s+([01])\s+"([^"]*)"\s*$')


def test_itksnap_label_file_parses(subject: dict[str, Any]) -> None:
    text = Path(stem(subject, "20240225") + "_dseg.itksnap.txt").read_text()
    assert "# ITK-SnAP Label Description File" in text.splitlines()[:3]
    entries = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = ITKSNAP_LINE.match(line)
        assert m, f"not an ITK-SNAP label line: {line!r}"
        entries[int(m[1])] = ((int(m[2]), int(m[3]), int(m[4])), float(m[5]), m[8])
    assert set(entries) == set(LABEL_NAMES)
    for value, (rgb, alpha, name) in entries.items():
        assert name == LABEL_NAMES[value] and rgb == LABEL_COLORS[value]
        assert 0.0 <= alpha <= 1.0 and (alpha == 0.0) == (value == 0)


def test_slicer_color_table_parses(subject: dict[str, Any]) -> None:
    lines = Path(stem(subject, "20240225") + "_dseg.ctbl").read_text().splitlines()
    assert lines[0].startswith("# Color table file ")
    assert lines[1] == f"# {len(LABEL_NAMES)} values"
    rows = [line.split() for line in lines if not line.startswith("#")]
    assert len(rows) == len(LABEL_NAMES)
    for fields in rows:
        assert len(fields) == 6, fields  # index name R G B A: no spaces in names
        value, name, *rgba = fields
        assert name == LABEL_NAMES[int(value)].replace(" ", "_")
        assert tuple(int(v) for v in rgba[:3]) == LABEL_COLORS[int(value)]
        assert all(0 <= int(v) <= 255 for v in rgba)


def test_bids_lookup_and_dataset_description(subject: dict[str, Any]) -> None:
    for path in (Path(stem(subject, "20240307") + "_dseg.tsv"), subject["dir"] / "dseg.tsv"):
        rows = read_tsv(path)
        assert list(rows[0]) == ["index", "name", "abbreviation", "color", "mapping"]
        assert {int(r["index"]): r["name"] for r in rows} == LABEL_NAMES
        for r in rows:
            assert r["color"] == "#{:02x}{:02x}{:02x}".format(*LABEL_COLORS[int(r["index"])])
            assert r["abbreviation"].isalnum()
            assert int(r["mapping"]) in (0, 4, 5, 7)  # BIDS common labels BG, B, ST, L
    desc = json.loads((subject["dir"] / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "limbtrack"
    assert desc["GeneratedBy"][0]["Version"] == __version__


def test_tables_only_without_dicom(tmp_path: Path) -> None:
    built = build_subject(tmp_path)
    assert run_export(built["dir"], "tables", "20240225") == 0
    written = sorted(p.name for p in (built["dir"] / "ses-20240225").iterdir())
    assert not any(name.endswith(".dcm") for name in written)
    assert f"sub-{SUBJECT}_ses-20240225_dseg.ctbl" in written
    assert not (built["dir"] / "dataset_description.json").exists()  # only when asked


def test_exports_write_where_named_and_read_only_what_is_named(tmp_path: Path) -> None:
    """Nothing is looked up beside the results: outputs go where the command line says, and
    the label map must be the one named."""
    built = build_subject(tmp_path)
    out = tmp_path / "elsewhere"
    dseg = _stem(built["dir"], "20240225") + "_dseg.nii.gz"
    assert export_cli.main(["tables", "--dseg", dseg, "--lookup", str(out / "a.tsv"),
                            "--itksnap", str(out / "b.txt"), "--ctbl", str(out / "c.ctbl")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.tsv", "b.txt", "c.ctbl"]
    assert (out / "c.ctbl").read_text().startswith(
        f"# Color table file sub-{SUBJECT}_ses-20240225_dseg\n")
    assert export_cli.main(["dataset", "--description", str(out / "d.json"),
                            "--lookup", str(out / "e.tsv")]) == 0
    assert json.loads((out / "d.json").read_text())["DatasetType"] == "derivative"
    with pytest.raises(ExportError, match="label map not found"):
        tables.write_label_tables(tmp_path / "absent_dseg.nii.gz", out / "a.tsv",
                                  out / "b.txt", out / "c.ctbl")
    paths = dicom_paths(built["dir"], "20240307")
    seg, sr = tmp_path / "objects" / "seg.dcm", tmp_path / "objects" / "sr.dcm"
    result = dicom.export_dicom(dataclasses.replace(paths, seg=seg, sr=sr))
    assert result.written == [seg, sr] and seg.is_file() and sr.is_file()
    assert not any(p.suffix == ".dcm" for p in built["dir"].rglob("*"))


# ----------------------------------------------------------------------------- SEG


def load_nifti(path: Path | str) -> nib.Nifti1Image:
    img = nib.load(str(path))
    assert isinstance(img, nib.Nifti1Image)
    return img


def nifti_labels_at(points_lps: np.ndarray, dseg: str) -> np.ndarray:
    """Label map values at LPS points (mm), which must be voxel centres of the map."""
    img = load_nifti(dseg)
    to_index = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine)
    index = points_lps @ to_index[:3, :3].T + to_index[:3, 3]
    nearest = np.rint(index)
    assert np.max(np.abs(index - nearest)) < 1e-3, "SEG voxels are not label map voxels"
    data = np.asarray(img.dataobj)
    i, j, k = nearest.astype(int).T
    return data[i, j, k]


def seg_and_nifti_labels(seg: Any, dseg: str) -> tuple[np.ndarray, np.ndarray]:
    """The label values (1..8) of every voxel of a SEG's volume, and the label map's at the
    same LPS points (which must be label map voxel centres)."""
    volume = seg.get_volume(segment_numbers=list(range(1, 9)), combine_segments=True,
                            relabel=False)
    n, rows, cols = volume.shape
    kk, rr, cc = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    index = np.stack([kk, rr, cc, np.ones_like(kk)], axis=-1).reshape(-1, 4)
    points = (index @ volume.affine.T)[:, :3]
    return volume.array.reshape(-1), nifti_labels_at(points, dseg)


@pytest.mark.parametrize("session", list(SESSIONS))
def test_seg_round_trip_same_voxels_in_physical_space(subject: dict[str, Any],
                                                      session: str) -> None:
    labels, info = subject["truth"][session]
    path = stem(subject, session) + "_seg.dcm"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == info.study_uid
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_uid
    referenced = {item.ReferencedSOPInstanceUID
                  for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                          for f in info.files}
    segments = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    assert sorted(segments) == list(range(1, 15))
    for value in range(1, 9):
        s = segments[value]
        assert s.SegmentLabel == LABEL_NAMES[value]
        side = "right" if value <= 4 else "left"
        region = s.AnatomicRegionSequence[0]
        assert region.CodeValue == codes.SCT.LowerLimb.value
        assert region.AnatomicRegionModifierSequence[0].CodeMeaning == side.capitalize()

    seg = hd.seg.segread(path)
    from_seg, from_nifti = seg_and_nifti_labels(seg, stem(subject, session) + "_dseg.nii.gz")
    mismatches = int(np.count_nonzero(from_seg != from_nifti))
    print(f"ses-{session}: {from_seg.size} voxels compared in LPS space, {mismatches} differ; "
          f"label counts SEG {np.bincount(from_seg, minlength=9).tolist()} "
          f"NIfTI {np.bincount(from_nifti, minlength=9).tolist()}")
    assert mismatches == 0
    assert from_seg.size == labels.size
    # composite segments are the unions of their labels
    masks = seg.get_volume(segment_numbers=list(range(1, 15)), combine_segments=False)
    stack = masks.array.reshape(-1, 14).astype(bool)
    specs = dicom.segment_specs(codes.SCT.LowerLimb)
    for spec in specs:
        assert np.array_equal(stack[:, spec.number - 1], np.isin(from_seg, spec.labels)), spec
    assert not stack[:, 3].any()  # the empty right lesion stays an empty segment


def test_reoriented_label_map_is_read_in_source_order(tmp_path: Path) -> None:
    labels = synthetic_labels(grow=0)
    info = write_series(tmp_path / "dicom", np.zeros(SHAPE, np.uint16), sequence="STIR",
                        row_cosine=(0, 1, 0), col_cosine=(0, 0, -1), pixel_spacing=SPACING,
                        slice_step=-STEP_MM)  # sagittal, slices running the other way
    path = tmp_path / "dseg.nii.gz"
    write_label_map(path, labels, info, reverse_slices=True)
    source = dicom.read_source_series(info.files)
    # the label map stores the slices the other way round; the export reads source order
    np.testing.assert_array_equal(dicom.labels_on_source_grid(path, source), labels)


def test_label_map_off_the_source_grid_is_refused(tmp_path: Path) -> None:
    labels = synthetic_labels(grow=0)
    info = write_series(tmp_path / "dicom", np.zeros(SHAPE, np.uint16), sequence="STIR",
                        pixel_spacing=SPACING, slice_step=STEP_MM)
    source = dicom.read_source_series(info.files)
    shifted = tmp_path / "shifted.nii.gz"
    write_label_map(shifted, labels, info, shift_mm=0.35)
    with pytest.raises(ExportError, match=r"off the source series grid by up to 0\.350"):
        dicom.labels_on_source_grid(shifted, source)
    cropped = tmp_path / "cropped.nii.gz"
    img = load_nifti(tmp_path / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), cropped)
    with pytest.raises(ExportError, match="not on the source grid"):
        dicom.labels_on_source_grid(cropped, source)


def test_nifti_input_has_no_dicom_to_reference(tmp_path: Path) -> None:
    built = build_subject(tmp_path)
    sessions_json = built["dir"] / "sessions.json"
    data = json.loads(sessions_json.read_text())
    data["sessions"][0]["fluid"]["files"] = []
    sessions_json.write_text(json.dumps(data))
    with pytest.raises(ExportError, match="NIfTI input"):
        dicom.export_dicom(dicom_paths(built["dir"], "20240225"))
    # each session is its own command (rule): the bad one fails, the other is exported
    assert run_export(built["dir"], "dicom", "20240225") == 1
    assert run_export(built["dir"], "dicom", "20240307") == 0
    assert (built["dir"] / "ses-20240307" / f"sub-{SUBJECT}_ses-20240307_sr.dcm").exists()
    assert not (built["dir"] / "ses-20240225" / f"sub-{SUBJECT}_ses-20240225_sr.dcm").exists()


# ----------------------------------------------------------------------------- SR


def test_sr_carries_every_volume_of_volumes_tsv(subject: dict[str, Any]) -> None:
    tsv = read_tsv(subject["dir"] / "volumes.tsv")
    tracking: dict[str, set[str]] = {}
    for session, (date, day) in SESSIONS.items():
        seg = pydicom.dcmread(stem(subject, session) + "_seg.dcm")
        seg_labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
        ds = pydicom.dcmread(stem(subject, session) + "_sr.dcm")
        assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
        assert ds.StudyInstanceUID == seg.StudyInstanceUID
        sr = hd.sr.srread(stem(subject, session) + "_sr.dcm")
        groups = sr.content.get_volumetric_roi_measurement_groups()
        expected = {(r["side"], r["structure"]): float(r["volume_ml"])
                    for r in tsv if r["study_date"] == date}
        found = {}
        for group in groups:
            side, structure = str(group.tracking_identifier).split(" ")
            (measurement,) = group.get_measurements(name=codes.SCT.Volume)
            assert measurement.unit.value == "ml" and measurement.unit.scheme_designator == "UCUM"
            found[(side, structure)] = float(measurement.value)
            ref = group.referenced_segment
            assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            (number,) = ref.referenced_segment_numbers
            spec = dicom.structure_segment(dicom.segment_specs(codes.SCT.LowerLimb),
                                           side, structure)
            assert number == spec.number and seg_labels[number] == spec.label
            assert set(spec.labels) == set(structure_labels(side, structure))
            assert group.finding_sites[0].laterality.meaning == side.capitalize()
            tracking.setdefault(f"{side} {structure}", set()).add(group.tracking_uid)
        assert found.keys() == expected.keys() and len(groups) == 10
        for key, value in expected.items():
            assert found[key] == pytest.approx(value, abs=5e-4), key
        print(f"ses-{session} (day {day}): {len(found)} volumes equal volumes.tsv, e.g. "
              f"left edema {found[('left', 'edema')]} mL")
    # one tracking UID per structure, the same in both sessions (longitudinal tracking)
    assert all(len(uids) == 1 for uids in tracking.values())
    assert len({next(iter(u)) for u in tracking.values()}) == len(tracking)


def test_outputs_are_reproducible(subject: dict[str, Any]) -> None:
    """Same inputs, same UIDs (a rerun does not send PACS a second copy)."""
    before = pydicom.dcmread(stem(subject, "20240225") + "_sr.dcm").SOPInstanceUID
    assert run_export(subject["dir"], "dicom", "20240225") == 0
    assert pydicom.dcmread(stem(subject, "20240225") + "_sr.dcm").SOPInstanceUID == before


def test_dicom_only_leaves_the_tables_alone(tmp_path: Path) -> None:
    built = build_subject(tmp_path)
    assert run_export(built["dir"], "dicom", "20240307") == 0
    names = {p.name for p in (built["dir"] / "ses-20240307").iterdir()}
    assert {f"sub-{SUBJECT}_ses-20240307_seg.dcm", f"sub-{SUBJECT}_ses-20240307_sr.dcm"} <= names
    assert not any(n.endswith((".ctbl", ".itksnap.txt", "_dseg.tsv")) for n in names)


# ----------------------------------------------------------------------------- validation


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian package dicom3tools)")
@pytest.mark.parametrize("kind", ["seg", "sr"])
def test_dciodvfy_finds_no_errors(subject: dict[str, Any], kind: str) -> None:
    path = stem(subject, "20240307") + f"_{kind}.dcm"
    proc = subprocess.run(["dciodvfy", path], capture_output=True, text=True, timeout=60)
    messages = [line for line in (proc.stdout + proc.stderr).splitlines()
                if line.startswith(("Error", "Warning"))]
    print(f"dciodvfy {kind}: {len(messages)} messages", *sorted(set(messages)), sep="\n  ")
    assert not [m for m in messages if m.startswith("Error")]
    # expected warnings: our private coding scheme (declared in the SR), and the Study ID the
    # synthetic source lacks (copied empty, as DICOM allows for a Type 2 attribute)
    expected = ("99LMBTRK", "needed to build DICOMDIR - Study ID")
    assert all(any(e in m for e in expected) for m in messages)


# ----------------------------------------------------------------------------- QC: n/a volumes

NOT_FAT_SUPPRESSED = "fluid_not_fat_suppressed"


def _mark_not_available(volumes_tsv: Path, date: str, structures: tuple[str, ...],
                        code: str) -> None:
    """volumes.tsv as the QC contract writes it: n/a (never 0) and the codes in ``qc``."""
    rows: list[dict[str, Any]] = [dict(r) for r in read_tsv(volumes_tsv)]
    for r in rows:
        hit = r["study_date"] == date and r["structure"] in structures
        r["volume_ml"] = None if hit else r["volume_ml"]
        r["qc"] = code if r["study_date"] == date else None
    write_tsv_atomic(volumes_tsv, rows, [*VOLUME_COLUMNS, *(["qc"] * ("qc" not in VOLUME_COLUMNS))])


def _sr_volumes(path: str) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], list]]:
    """Volumes of the SR, and the QC codes of the structures it says are not available."""
    sr = hd.sr.srread(path)
    found, not_available = {}, {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        side, structure = str(group.tracking_identifier).split(" ")
        key = (side, structure)
        measurements = group.get_measurements(name=codes.SCT.Volume)
        evaluations = group.get_qualitative_evaluations(name=dicom.NOT_AVAILABLE)
        assert len(measurements) + bool(evaluations) == 1, key  # a volume or a reason
        if measurements:
            found[key] = float(measurements[0].value)
        else:
            not_available[key] = [e.value.value for e in evaluations]
            assert group.referenced_segment is not None  # still names its segment
    return found, not_available


def test_session_volumes_skip_not_available(tmp_path: Path) -> None:
    built = build_subject(tmp_path)
    tsv = built["dir"] / "volumes.tsv"
    _mark_not_available(tsv, "2024-03-07", ("marrow_lesion", "edema"), NOT_FAT_SUPPRESSED)
    rows = dicom.session_volumes(tsv, "2024-03-07")
    assert len(rows) == 6 and {r.structure for r in rows} == {"limb", "soft_tissue", "bone"}
    assert all(r.volume_ml is not None for r in rows)
    assert dicom.unavailable_volumes(tsv, "2024-03-07") == {
        (side, s): [NOT_FAT_SUPPRESSED] for side in SIDES for s in ("marrow_lesion", "edema")}
    assert len(dicom.session_volumes(tsv, "2024-02-25")) == 10
    assert dicom.unavailable_volumes(tsv, "2024-02-25") == {}


def test_sr_of_volumes_not_available(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Lesion and edema not available (fluid not fat-suppressed): the SR has no volume for
    them (never a 0), only a 'not available' evaluation with the QC code; the other volumes
    are those of volumes.tsv; the SEG is complete."""
    built = build_subject(tmp_path)
    tsv = built["dir"] / "volumes.tsv"
    _mark_not_available(tsv, "2024-03-07", ("marrow_lesion", "edema"), NOT_FAT_SUPPRESSED)
    assert [run_export(built["dir"], "dicom", s) for s in SESSIONS] == [0, 0]
    out = capsys.readouterr().out
    assert f"ses-20240307 left edema: not available ({NOT_FAT_SUPPRESSED})" in out
    expected = {(r["side"], r["structure"]): float(r["volume_ml"]) for r in read_tsv(tsv)
                if r["study_date"] == "2024-03-07" and r["volume_ml"] != "n/a"}
    found, not_available = _sr_volumes(stem(built, "20240307") + "_sr.dcm")
    assert found.keys() == expected.keys() and len(found) == 6
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=5e-4)
    assert not_available == {(side, s): [NOT_FAT_SUPPRESSED]
                             for side in SIDES for s in ("marrow_lesion", "edema")}
    base, none = _sr_volumes(stem(built, "20240225") + "_sr.dcm")
    assert len(base) == 10 and none == {}  # the other session is complete
    seg = pydicom.dcmread(stem(built, "20240307") + "_seg.dcm")
    assert len(seg.SegmentSequence) == 14


def test_session_without_any_volume(tmp_path: Path) -> None:
    """Registration failed: nothing available; the SR says so per structure (no zeros) and
    the export does not fail (the workflow's rule still gets its files)."""
    built = build_subject(tmp_path)
    tsv = built["dir"] / "volumes.tsv"
    _mark_not_available(tsv, "2024-03-07", STRUCTURES, "registration_failed")
    assert dicom.session_volumes(tsv, "2024-03-07") == []
    result = dicom.export_dicom(dicom_paths(built["dir"], "20240307"))
    assert result.volumes_ml == {} and len(result.not_available) == 10
    assert set(map(tuple, result.not_available.values())) == {("registration_failed",)}
    sr = pydicom.dcmread(stem(built, "20240307") + "_sr.dcm")
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    found, not_available = _sr_volumes(stem(built, "20240307") + "_sr.dcm")
    assert found == {} and set(map(tuple, not_available.values())) == {("registration_failed",)}
    assert len(not_available) == 10
    assert Path(stem(built, "20240307") + "_seg.dcm").exists()


# ----------------------------------------------------------------------------- baseline, numbers


def test_sr_baseline_is_the_last_session_on_or_before_day_0(tmp_path: Path) -> None:
    """The SR's baseline time point follows pipeline.baseline: the last session on or before
    day 0, else the first (not simply the first)."""
    tsv = tmp_path / "volumes.tsv"
    rows = [{"study_date": d, "day": day, "side": "left", "structure": "limb",
             "volume_ml": 1.0} for d, day in (("2024-02-20", -10), ("2024-02-28", -2),
                                              ("2024-03-05", 4))]
    write_tsv_atomic(tsv, rows, ["study_date", "day", "side", "structure", "volume_ml"])
    assert dicom.baseline_date(tsv) == "2024-02-28"
    write_tsv_atomic(tsv, rows[2:], ["study_date", "day", "side", "structure", "volume_ml"])
    assert dicom.baseline_date(tsv) == "2024-03-05"


@pytest.mark.parametrize(("cell", "expected"), [("12.5", 12.5), ("n/a", None), ("", None),
                                                ("nan", None), ("inf", None)])
def test_volume_cells_are_read_as_finite_numbers_or_none(tmp_path: Path, cell: str,
                                                         expected: float | None) -> None:
    tsv = tmp_path / "volumes.tsv"
    tsv.write_text("study_date\tday\tside\tstructure\tvolume_ml\tqc\n"
                   f"2024-03-05\t4\tleft\tlimb\t{cell}\t\n")
    (row,) = dicom.session_rows(tsv, "2024-03-05")
    assert row.volume_ml == expected
