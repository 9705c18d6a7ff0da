"""DICOM SEG and SR of a session whose legs are in two series (issue 18, pipeline.export.dicom).

The demo's first study split into one series per leg (tests/split_factory.py), as the index,
convert and segment steps leave it; then ``limbtrack export dicom`` as the workflow's rule runs
it. Two layouts: both legs' series on one lattice (the composed image copies both by index),
and the left leg's series with wider columns (the right one, finer, is then the reference and
the left is resampled onto its lattice).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import rotation, write_series
from test_export import load_nifti, seg_and_nifti_labels

from pipeline.export import ExportError, dicom
from pipeline.export import session as export_cli
from pipeline.io.convert import convert_session
from pipeline.io.files import read_tsv, write_json_atomic, write_tsv_atomic
from pipeline.io.scan import index_folder
from pipeline.io.selection import select_sessions
from pipeline.labels import SIDES, STRUCTURES
from pipeline.measure import VOLUME_COLUMNS, volumes_from_labels
from pipeline.node.runner import latest_source
from pipeline.segment import segment_session, write_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from split_factory import split_study  # noqa: E402

hd = pytest.importorskip("highdicom")
from pydicom.sr.codedict import codes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO_STUDY = ROOT / "sample_data" / "demo" / "dicom" / "ST0001"
SUBJECT = "split"
DAY = -3
#: Column spacing (mm) given to the left leg's series in the second layout (the demo's 1.6 mm
#: pixels become 1.6 x 1.8 mm: a coarser series, off the right one's lattice).
WIDER_COLUMN_MM = 1.8
LAYOUTS = ("one_lattice", "left_wider_columns")
SYNTH_SHAPE = (5, 16, 18)  # slices, rows, columns of the synthetic reference series
SYNTH_SPACING = (0.8, 0.7)  # PixelSpacing: between rows, between columns (mm)
SYNTH_STEP_MM = 3.0


def _widen_columns(study_dir: Path, side: str, column_mm: float) -> None:
    """Give `side`'s series (T1 and fluid alike) another column spacing, in place."""
    for path in sorted(study_dir.rglob(f"{side}/*")):
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [ds.PixelSpacing[0], f"{column_mm:g}"]
        ds.save_as(path, enforce_file_format=True)


def build_split_session(root: Path, layout: str) -> dict[str, Any]:
    """index -> convert -> segment of the split demo study, and volumes.tsv of its label map,
    as the workflow leaves them; then the DICOM export through the command line."""
    split_study(DEMO_STUDY, root / "in" / "ST0001")
    if layout == "left_wider_columns":
        _widen_columns(root / "in" / "ST0001", "left", WIDER_COLUMN_MM)
    sessions, refused = select_sessions(index_folder(root / "in").series)
    assert refused == [] and len(sessions) == 1 and sessions[0]["fluid"].get("parts")
    subject_dir = root / SUBJECT
    session = sessions[0]["session"]
    ses_dir = subject_dir / f"ses-{session}"
    ses_dir.mkdir(parents=True)
    write_json_atomic(subject_dir / "sessions.json", {"sessions": sessions})
    convert_session(subject_dir / "sessions.json", session, SUBJECT, ses_dir)
    stem = str(ses_dir / f"sub-{SUBJECT}_ses-{session}")
    result = segment_session(f"{stem}_T1w.nii.gz", f"{stem}_fluid.nii.gz")
    write_labels(result, f"{stem}_dseg.nii.gz", f"{stem}_dseg.json")
    img = load_nifti(f"{stem}_dseg.nii.gz")
    volumes = volumes_from_labels(np.asarray(img.dataobj),
                                  float(np.prod(img.header.get_zooms()[:3])))
    date = sessions[0]["study_date"]
    write_tsv_atomic(subject_dir / "volumes.tsv", [
        {"subject": SUBJECT, "study_date": date, "day": DAY, "side": side,
         "role": "affected" if side == "left" else "contralateral", "structure": structure,
         "volume_ml": round(volumes[side][structure], 3)}
        for side in SIDES for structure in STRUCTURES], VOLUME_COLUMNS)
    paths = dicom.DicomPaths(
        subject=SUBJECT, session=session, dseg=Path(f"{stem}_dseg.nii.gz"),
        fluid_json=Path(f"{stem}_fluid.json"), sessions_json=subject_dir / "sessions.json",
        volumes_tsv=subject_dir / "volumes.tsv", seg=Path(f"{stem}_seg.dcm"),
        sr=Path(f"{stem}_sr.dcm"))
    status = export_cli.main([
        "dicom", "--subject", SUBJECT, "--session", session, "--dseg", str(paths.dseg),
        "--fluid-json", str(paths.fluid_json), "--sessions-json", str(paths.sessions_json),
        "--volumes", str(paths.volumes_tsv), "--seg", str(paths.seg), "--sr", str(paths.sr)])
    assert status == 0
    split_record = json.loads(paths.fluid_json.read_text())["SplitSeries"]
    return {"dir": subject_dir, "paths": paths, "entry": sessions[0], "date": date,
            "split": split_record}


# index, convert and segment of the demo's first study, per layout (~15 s of CPU each)
@pytest.fixture(scope="module",
                params=[pytest.param(layout, marks=pytest.mark.slow) for layout in LAYOUTS])
def split_session(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    built = build_split_session(tmp_path_factory.mktemp(request.param), request.param)
    built["layout"] = request.param
    return built


def _part_headers(built: dict[str, Any]) -> dict[str, list[pydicom.Dataset]]:
    return {part["side"]: [pydicom.dcmread(f, stop_before_pixels=True) for f in part["files"]]
            for part in built["entry"]["fluid"]["parts"]}


# ----------------------------------------------------------------------------- SEG


def test_split_seg_sits_on_the_label_map_and_references_both_series(
        split_session: dict[str, Any]) -> None:
    paths, record = split_session["paths"], split_session["split"]
    if split_session["layout"] == "left_wider_columns":
        assert record["reference_side"] == "right" and not record["other_copied_by_index"]
    else:
        assert record["reference_side"] == "left" and record["other_copied_by_index"]
    headers = _part_headers(split_session)
    reference = headers[record["reference_side"]][0]
    ds = pydicom.dcmread(paths.seg)
    assert ds.StudyInstanceUID == reference.StudyInstanceUID
    assert ds.FrameOfReferenceUID == reference.FrameOfReferenceUID
    # both legs' series: Common Instance Reference and Source Image Sequence
    referenced = {item.SeriesInstanceUID: {i.ReferencedSOPInstanceUID
                                           for i in item.ReferencedInstanceSequence}
                  for item in ds.ReferencedSeriesSequence}
    assert referenced == {h[0].SeriesInstanceUID: {x.SOPInstanceUID for x in h}
                          for h in headers.values()}
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == reference.SeriesInstanceUID
    specs = dicom.segment_specs(codes.SCT.LowerLimb)
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in ds.SegmentSequence] == [
        (s.number, s.label) for s in specs]

    img = load_nifti(paths.dseg)
    label_map = np.asarray(img.dataobj)
    seg = hd.seg.segread(paths.seg)
    # the frames' voxels are label map voxels (else seg_and_nifti_labels fails), same values
    from_seg, from_nifti = seg_and_nifti_labels(seg, str(paths.dseg))
    mismatches = int(np.count_nonzero(from_seg != from_nifti))
    print(f"{split_session['layout']}: SEG of {from_seg.size} voxels, label map "
          f"{label_map.shape}: {mismatches} differ in LPS space")
    assert mismatches == 0
    masks = seg.get_volume(segment_numbers=list(range(1, 15)), combine_segments=False)
    counts = masks.array.reshape(-1, 14).astype(bool).sum(axis=0)
    expected = [int(np.isin(label_map, spec.labels).sum()) for spec in specs]
    print("voxels per segment, SEG:", counts.tolist(), "label map:", expected)
    assert counts.tolist() == expected
    # frames only where a segment is present: one per plane and segment with voxels
    planes_with = masks.array.reshape(masks.shape[0], -1, 14).any(axis=1).sum()
    assert int(ds.NumberOfFrames) == int(planes_with)


# ----------------------------------------------------------------------------- SR


def test_split_sr_carries_volumes_tsv_and_each_legs_series(split_session: dict[str, Any],
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    paths = split_session["paths"]
    headers = _part_headers(split_session)
    seg = pydicom.dcmread(paths.seg)
    sr = hd.sr.srread(paths.sr)
    expected = {(r["side"], r["structure"]): float(r["volume_ml"])
                for r in read_tsv(paths.volumes_tsv)}
    found = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        side, structure = str(group.tracking_identifier).split(" ")
        (measurement,) = group.get_measurements(name=codes.SCT.Volume)
        found[(side, structure)] = float(measurement.value)
        assert group.tracking_uid == dicom.tracking_uid(SUBJECT, side, structure)
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        # the source series of a leg's segments is the series that imaged that leg
        assert ref.source_series_for_segmentation.value == headers[side][0].SeriesInstanceUID
    assert found.keys() == expected.keys() and len(found) == 10
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=5e-4), key
    evidence = {item.SeriesInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for item in study.ReferencedSeriesSequence}
    assert evidence == {seg.SeriesInstanceUID} | {h[0].SeriesInstanceUID
                                                  for h in headers.values()}
    # the whole-segment check counts with the label map's voxels: equal to volumes.tsv here
    result = dicom.export_dicom(paths)
    assert {k: round(whole, 3) for k, (_, whole) in result.volumes_ml.items()} == expected
    assert "note:" not in capsys.readouterr().out


def test_the_pdf_goes_into_the_study_of_both_series(split_session: dict[str, Any]) -> None:
    """The node's report object takes the patient and study of the latest session's first
    fluid file: with the legs in two series that is still the one study."""
    source = latest_source(split_session["dir"])
    studies = {(h.StudyInstanceUID, h.PatientID) for hs in _part_headers(split_session).values()
               for h in hs}
    assert studies == {(source.StudyInstanceUID, source.PatientID)}


# ----------------------------------------------------------------------------- refusals


def test_split_export_needs_the_reference_and_the_label_map_on_its_lattice(
        split_session: dict[str, Any], tmp_path: Path) -> None:
    paths = split_session["paths"]
    sidecar = json.loads(paths.fluid_json.read_text())
    del sidecar["SplitSeries"]
    bare = tmp_path / "fluid.json"
    write_json_atomic(bare, sidecar)
    with pytest.raises(ExportError, match="names no SplitSeries reference_side"):
        dicom.source_of(dataclasses.replace(paths, fluid_json=bare))
    _, sources = dicom.source_of(paths)
    assert sources.split and sources.reference.series_uid == (
        _part_headers(split_session)[split_session["split"]["reference_side"]][0]
        .SeriesInstanceUID)
    img = load_nifti(paths.dseg)
    shifted = tmp_path / "shifted_dseg.nii.gz"
    affine = img.affine.copy()
    affine[0, 3] += 0.4  # 0.4 mm off the lattice
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), shifted)
    with pytest.raises(ExportError, match=r"off the lattice of the reference series .* 0\.400"):
        dicom.label_map_grid(shifted, sources.reference)
    cropped = tmp_path / "cropped_dseg.nii.gz"
    # one slice less (the demo is axial: NIfTI axis 2 runs along the slices)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), cropped)
    with pytest.raises(ExportError, match="does not hold the field of view"):
        dicom.label_map_grid(cropped, sources.reference)


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy not installed (Debian package dicom3tools)")
@pytest.mark.parametrize("kind", ["seg", "sr"])
def test_split_objects_pass_dciodvfy(split_session: dict[str, Any], kind: str) -> None:
    path = getattr(split_session["paths"], kind)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    messages = [line for line in (proc.stdout + proc.stderr).splitlines()
                if line.startswith(("Error", "Warning"))]
    print(f"dciodvfy {kind}: {len(messages)} messages", *sorted(set(messages)), sep="\n  ")
    # the only warning expected: our private coding scheme (declared in the SR)
    assert all("99LMBTRK" in m for m in messages)


# ----------------------------------------------------------------------------- geometry (fast)


@pytest.mark.parametrize("reverse_slices", [False, True])
def test_seg_on_the_reference_lattice_extended_every_way(tmp_path: Path,
                                                         reverse_slices: bool) -> None:
    """An oblique reference series and a label map on its lattice extended by whole voxels
    before its first slice, row and column and past its last slice (as convert extends it to
    hold the other leg, slices included): the SEG's frames are the label map's voxels."""
    rot = rotation(12.0, -7.0, 25.0)
    frame_uid = pydicom.uid.generate_uid()
    common = {"sequence": "STIR", "row_cosine": rot[:, 0], "col_cosine": rot[:, 1],
              "pixel_spacing": SYNTH_SPACING, "slice_step": SYNTH_STEP_MM,
              "tags": {"FrameOfReferenceUID": frame_uid, "BodyPartExamined": "LEG"}}
    reference = write_series(tmp_path / "left", np.zeros(SYNTH_SHAPE, np.uint16),
                             origin=(20.0, 5.0, 60.0), series_number=31, **common)
    # the other leg's series, of the same study, further to the patient's right
    other_origin = reference.positions[0] - 12 * SYNTH_SPACING[1] * rot[:, 0]
    other = write_series(tmp_path / "right", np.zeros(SYNTH_SHAPE, np.uint16),
                         origin=other_origin, study_uid=reference.study_uid, series_number=32,
                         **common)
    lo = np.array([-2, -3, -12])  # slices, rows, columns before the reference's first
    shape = tuple(int(v) for v in np.array(SYNTH_SHAPE) - lo + [1, 0, 0])
    labels = np.random.default_rng(3).integers(0, 9, shape).astype(np.uint8)
    labels[[0, 4]] = 0  # two planes hold no segment: no frames there
    steps = np.array([SYNTH_STEP_MM, *SYNTH_SPACING])
    lattice = np.stack([reference.normal, reference.col_cosine, reference.row_cosine])
    origin = reference.positions[0] + (lo * steps) @ lattice
    arr, slice_dir = labels, reference.normal
    if reverse_slices:  # the same voxels stored from the last plane to the first
        arr, slice_dir = labels[::-1], -reference.normal
        origin = origin + (shape[0] - 1) * SYNTH_STEP_MM * reference.normal
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetOrigin([float(v) for v in origin])
    img.SetSpacing((SYNTH_SPACING[1], SYNTH_SPACING[0], SYNTH_STEP_MM))
    img.SetDirection(np.column_stack([reference.row_cosine, reference.col_cosine, slice_dir])
                     .ravel().tolist())
    dseg = tmp_path / "dseg.nii.gz"
    sitk.WriteImage(img, str(dseg))

    ref_series = dicom.read_source_series(reference.files)
    grid = dicom.label_map_grid(dseg, ref_series)
    assert grid.shape == shape
    np.testing.assert_allclose(grid.positions_mm[2], reference.positions[0]
                               + (lo[1:] * steps[1:]) @ lattice[1:], atol=1e-6)
    on_grid = dicom.labels_on_source_grid(dseg, grid)
    np.testing.assert_array_equal(on_grid, labels)
    sources = dicom.SessionSources(
        ref_series, {"left": ref_series, "right": dicom.read_source_series(other.files)})
    seg, specs = dicom.build_segmentation(sources, on_grid, "synth", "0" * 64, grid)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    assert [item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence] == [
        reference.series_uid, other.series_uid]
    assert ds.FrameOfReferenceUID == frame_uid
    planes_with = sum(int(np.isin(labels, spec.labels).any(axis=(1, 2)).sum())
                      for spec in specs)
    assert int(ds.NumberOfFrames) == planes_with
    from_seg, from_nifti = seg_and_nifti_labels(hd.seg.segread(path), str(dseg))
    assert np.array_equal(from_seg, from_nifti)
    # every labelled voxel is in the SEG (its volume spans the planes with frames only)
    counts = np.bincount(from_seg, minlength=9)
    assert counts[1:].tolist() == np.bincount(labels.ravel(), minlength=9)[1:].tolist()
