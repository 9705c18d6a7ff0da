"""Multi-volume series, enhanced multi-frame, pixel decoding paths and the folder mode."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import (
    PATIENT_TAGS,
    SEQUENCE_TAGS,
    ramp_pixels,
    rotation,
    write_enhanced,
    write_series,
)
from pydicom.uid import RLELossless, generate_uid

from pipeline.io import convert, dicom_frames, dicom_index, scan, selection
from pipeline.io.convert import SeriesError, read_series, read_volumes, write_volume


def _multi(tmp_path: Path, variants: list[dict], sequence: str = "T1w",
           study_uid: str | None = None, series_number: int = 4):
    """One series whose volumes differ by the tags in `variants` (same positions)."""
    series_uid = generate_uid()
    study_uid = study_uid or generate_uid()
    infos = []
    for v, tags in enumerate(variants):
        infos.append(write_series(tmp_path / "multi", ramp_pixels() + 100 * v, sequence=sequence,
                                  series_uid=series_uid, study_uid=study_uid, seed=10 + v,
                                  series_number=series_number, tags=tags))
    return infos


def test_multi_echo_series_split_into_volumes(tmp_path: Path) -> None:
    infos = _multi(tmp_path, [{"EchoNumbers": 1, "EchoTime": 10.0},
                              {"EchoNumbers": 2, "EchoTime": 80.0}])
    files = [f for info in infos for f in info.files]
    volumes = read_volumes(files)
    assert [v.label for v in volumes] == ["echo-1", "echo-2"]
    for volume, info in zip(volumes, infos, strict=True):
        assert volume.error is None and volume.image is not None
        np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.image), info.pixels)
    assert volumes[1].sidecar["EchoNumber"] == 2
    assert volumes[1].sidecar["EchoTime"] == 80.0
    with pytest.raises(SeriesError, match="holds 2 volumes"):
        read_series(files)
    image, sidecar = read_series(files, volume="echo-2")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), infos[1].pixels)
    with pytest.raises(SeriesError, match="no volume 'echo-3'"):
        read_series(files, volume="echo-3")


DIXON = [("dixon_water", "WATER"), ("dixon_fat", "FAT"), ("dixon_in", "IN_PHASE"),
         ("dixon_opp", "OPP_PHASE")]


def _dixon_study(tmp_path: Path) -> tuple[str, list]:
    study = generate_uid()
    write_series(tmp_path / "t1", sequence="T1w", study_uid=study, series_number=2)
    tags = dict(SEQUENCE_TAGS["dixon_water"])
    tags["SeriesDescription"] = "t1_vibe_dixon_tra"
    variants = [tags | {"ImageType": ["DERIVED", "PRIMARY", "DIXON", token]}
                for _, token in DIXON]
    infos = _multi(tmp_path, variants, sequence="dixon_water", study_uid=study, series_number=9)
    return study, infos


def test_dixon_series_lists_volumes_and_water_is_selected(tmp_path: Path) -> None:
    _, infos = _dixon_study(tmp_path / "in")
    result = scan.index_folder(tmp_path / "in")
    dixon = next(r for r in result.series if r.series_number == 9)
    assert dixon.status != "refused"
    assert {v.label: v.sequence_class for v in dixon.volumes} == {
        "part-water": "dixon_water", "part-fat": "dixon_fat", "part-in": "dixon_in",
        "part-opp": "dixon_opp"}
    assert "part-water=dixon_water" in dixon.as_row()["volumes"]
    sessions, refused = selection.select_sessions(result.series)
    assert not refused
    assert sessions[0]["fluid"]["volume"] == "part-water"
    assert sessions[0]["fluid"]["series_uid"] == infos[0].series_uid

    out = tmp_path / "index"
    assert dicom_index.main(["--input-dir", str(tmp_path / "in"), "--out-dir", str(out)]) == 0
    assert convert.main(["--sessions-json", str(out / "sessions.json"), "--session",
                         "20240225", "--subject", "x", "--out-dir", str(tmp_path / "nii")]) == 0
    meta = json.loads((tmp_path / "nii" / "sub-x_ses-20240225_fluid.json").read_text())
    assert meta["SequenceClass"] == "dixon_water" and meta["VolumeLabel"] == "part-water"
    image = sitk.ReadImage(str(tmp_path / "nii" / "sub-x_ses-20240225_fluid.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), infos[0].pixels)


def test_repeats_without_tags_split_in_acquisition_order(tmp_path: Path) -> None:
    series_uid, study_uid = generate_uid(), generate_uid()
    infos = [write_series(tmp_path, ramp_pixels() + 7 * r, series_uid=series_uid,
                          study_uid=study_uid, seed=r,
                          instance_numbers=[10 * r + k + 1 for k in range(5)],
                          tags={"AcquisitionNumber": r + 1}) for r in range(3)]
    volumes = read_volumes([f for i in infos for f in i.files])
    assert [v.label for v in volumes] == ["rep-1", "rep-2", "rep-3"]
    for volume, info in zip(volumes, infos, strict=True):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(volume.image), info.pixels)


def test_enhanced_multiframe_equals_classic_twin(tmp_path: Path) -> None:
    rot = rotation(12, -20, 35)
    geometry = {"row_cosine": tuple(rot[:, 0]), "col_cosine": tuple(rot[:, 1]),
                "origin": (5.0, -8.0, 20.0), "pixel_spacing": (0.7, 0.9), "slice_step": 2.5}
    pixels = ramp_pixels(6, 5, 4)
    classic = write_series(tmp_path / "classic", pixels, rescale=(2.0, -10.0), **geometry)
    order = [3, 0, 5, 1, 4, 2]  # frames not in slice order
    write_enhanced(tmp_path / "enh" / "IM1", [pixels], rescale=[(2.0, -10.0)] * 6,
                   frame_order=order, **geometry)
    a, _ = read_series(classic.files)
    b, meta = read_series([tmp_path / "enh" / "IM1"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)
    assert meta["SourceLayout"] == "enhanced multi-frame"
    assert meta["RepetitionTime"] == 550.0  # from the shared functional groups


def test_enhanced_per_frame_rescale_and_volumes(tmp_path: Path) -> None:
    mag, fmap = ramp_pixels(4), ramp_pixels(4)[::-1].copy()
    rescale = [(1.5, 0.0)] * 4 + [(0.25 * (k + 1), -500.0) for k in range(4)]
    write_enhanced(tmp_path / "f", [mag, fmap], rescale=rescale, echo_times=[4.6, 0.0],
                   frame_types=[["ORIGINAL", "PRIMARY", "M", "M"],
                                ["ORIGINAL", "PRIMARY", "M", "FIELD_MAP"]])
    volumes = read_volumes([tmp_path / "f"])
    assert [v.label for v in volumes] == ["part-mag", "part-fieldmap"]
    np.testing.assert_allclose(sitk.GetArrayFromImage(volumes[0].image), mag * 1.5)
    expected = np.stack([fmap[k] * 0.25 * (k + 1) - 500.0 for k in range(4)])
    np.testing.assert_allclose(sitk.GetArrayFromImage(volumes[1].image), expected, rtol=1e-6)
    assert volumes[1].sidecar["ImageType"][-1] == "FIELD_MAP"


@pytest.mark.parametrize("signed", [False, True])
def test_12bit_high_bits_masked_on_both_read_paths(tmp_path: Path, signed: bool) -> None:
    rng = np.random.default_rng(4)
    values = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, (3, 6, 7))
    stored = (values & 0x0FFF) | 0xA000  # garbage (an overlay) in the 4 unused high bits
    info = write_series(tmp_path / "raw", stored.astype(np.uint16),
                        tags={"BitsStored": 12, "HighBit": 11,
                              "PixelRepresentation": int(signed)})
    image, _ = read_series(info.files)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), values)
    # the same file through pydicom's decoder (RLE) gives the same values
    for path in info.files:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path, enforce_file_format=True)
    image, meta = read_series(info.files)
    assert meta["TransferSyntaxUID"] == RLELossless
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), values)


def test_fast_read_equals_pydicom(tmp_path: Path) -> None:
    info = write_series(tmp_path, ramp_pixels(3))
    ds = pydicom.dcmread(info.files[0], defer_size="1 KB")
    fast = dicom_frames.stored_pixels(info.files[0], ds)
    np.testing.assert_array_equal(fast[0], pydicom.dcmread(info.files[0]).pixel_array)


def test_decoder_hint_names_the_package() -> None:
    assert "pylibjpeg-openjpeg" in dicom_frames.decoder_hint("1.2.840.10008.1.2.4.90")
    assert "pylibjpeg-libjpeg" in dicom_frames.decoder_hint("1.2.840.10008.1.2.4.80")


@pytest.mark.parametrize("position", ["HFDL", "FFDR", "HFP"])
def test_left_stays_left_in_decubitus_and_prone(tmp_path: Path, position: str) -> None:
    # decubitus: the image rows run antero-posterior and the columns left-right
    row, col = (0.0, -1.0, 0.0), (-1.0, 0.0, 0.0)
    pixels = ramp_pixels(4, 12, 6)
    # column index r of the image runs along -x: r = 2 sits at LPS x = 10 - 2 = 8 (left)
    pixels[1, 2, 3] = 60000
    info = write_series(tmp_path / "dcm", pixels, row_cosine=row, col_cosine=col,
                        origin=(10.0, 0.0, 0.0), pixel_spacing=(1.0, 1.0),
                        tags={"PatientPosition": position})
    assert info.pixel_lps(1, 2, 3)[0] == pytest.approx(8.0)
    image, sidecar = read_series(info.files)
    assert sidecar["PatientPosition"] == position
    out = tmp_path / "vol.nii.gz"
    write_volume(image, sidecar, out)
    nii = nib.load(out)
    ijk = np.argwhere(np.asarray(nii.dataobj) == 60000)[0]
    ras = nii.affine @ np.append(ijk, 1.0)
    assert ras[0] == pytest.approx(-8.0, abs=1e-4)  # RAS x < 0: the patient's left


def test_folder_mode_writes_every_volume_and_refusals(tmp_path: Path) -> None:
    study = generate_uid()
    write_series(tmp_path / "in" / "t1", sequence="T1w", study_uid=study, series_number=2)
    _multi(tmp_path / "in", [{"EchoNumbers": 1, "EchoTime": 10.0},
                             {"EchoNumbers": 2, "EchoTime": 80.0}],
           study_uid=study, series_number=5)
    write_series(tmp_path / "in" / "short", ramp_pixels(2), study_uid=study, series_number=8)
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    out = tmp_path / "out"
    assert convert.main([str(tmp_path / "in"), str(out), "--subject", "p1"]) == 0
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == ["sub-p1_ses-20240225_run-002_T1w.nii.gz",
                     "sub-p1_ses-20240225_run-005_echo-1_T1w.nii.gz",
                     "sub-p1_ses-20240225_run-005_echo-2_other.nii.gz"]  # TE 80 ms: not T1w
    meta = json.loads((out / "sub-p1_ses-20240225_run-005_echo-2_other.json").read_text())
    assert meta["EchoNumber"] == 2 and meta["SeriesNumber"] == 5
    refusals = (out / "refusals.tsv").read_text()
    assert "at least 3" in refusals and "\t8\t" in refusals
    assert "notes.txt" in (out / "problems.tsv").read_text()
    assert len((out / "converted.tsv").read_text().splitlines()) == 4
    for value in PATIENT_TAGS.values():
        assert value not in meta.values()
    # nothing usable: exit code 1; output inside input: 2
    assert convert.main([str(tmp_path / "in" / "short"), str(tmp_path / "o2")]) == 1
    assert convert.main([str(tmp_path / "in"), str(tmp_path / "in" / "o")]) == 2
