"""Tests of the NIfTI writer of pipeline.io.convert: real gzip levels, geometry kept exactly."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import rotation, write_series

from pipeline.io import convert
from pipeline.io.convert import gzip_file, read_series, write_nifti, write_volume


def _image(size: tuple[int, int, int] = (40, 32, 12), oblique: bool = True) -> sitk.Image:
    """A float32 image with structure (compressible) and an oblique LPS geometry."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    rng = np.random.default_rng(7)
    values = (200 * np.sin(x / 5.0) * np.cos(y / 7.0) + 10 * z
              + rng.integers(0, 8, size=x.shape)).round().astype(np.float32)
    values[1, 2, 3] = 1234.5
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.75, 0.5, 2.0))
    image.SetOrigin((12.5, -7.25, 30.0))
    direction = rotation(20, -15, 30) if oblique else np.eye(3)
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def _ras_affine(image: sitk.Image) -> np.ndarray:
    """The RAS affine of an LPS SimpleITK geometry: flip the first two world axes."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_gzipped_nifti_is_simpleitk_nifti_and_reads_back(tmp_path: Path, level: int) -> None:
    image = _image()
    reference = tmp_path / "reference.nii"
    sitk.WriteImage(image, str(reference), False)  # SimpleITK's own header and voxels
    out = tmp_path / "vol.nii.gz"
    write_volume(image, {"a": 1}, out, compression_level=level)

    # the same bytes as SimpleITK writes, in a standard single-member gzip file
    assert gzip.decompress(out.read_bytes()) == reference.read_bytes()
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    inflater.decompress(out.read_bytes())
    assert inflater.eof and not inflater.unused_data
    assert json.loads((tmp_path / "vol.json").read_text()) == {"a": 1}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    # SimpleITK: same geometry and voxels as the image written
    back = sitk.ReadImage(str(out))
    _assert_same_geometry(back, image)
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back),
                                  sitk.GetArrayViewFromImage(image))

    # nibabel: the RAS affine of the SimpleITK geometry (LPS -> RAS), same voxels (x, y, z)
    nii = nib.load(out)
    assert isinstance(nii, nib.Nifti1Image)
    np.testing.assert_allclose(nii.affine, _ras_affine(image), atol=1e-6)
    np.testing.assert_allclose(nii.affine, _ras_affine(back), atol=1e-6)
    assert nii.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(nii.dataobj),
                                  sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def test_compression_level_changes_the_output(tmp_path: Path) -> None:
    image = _image((96, 96, 16))
    sizes = {}
    for level in (0, 1, 6):
        out = tmp_path / f"level{level}.nii.gz"
        write_nifti(image, out, compression_level=level)
        sizes[level] = out.stat().st_size
    plain = tmp_path / "plain.nii"
    write_nifti(image, plain, compression_level=6)  # .nii: never compressed
    assert plain.read_bytes()[:2] != b"\x1f\x8b"
    # ISA-L: level 0 is its fastest deflate (not stored); higher levels compress more
    assert plain.stat().st_size > sizes[0] >= sizes[1] > sizes[6]


@pytest.mark.parametrize("threads", [1, 3])
def test_gzip_file_blocks_and_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      threads: int) -> None:
    monkeypatch.setattr(convert, "GZIP_CHUNK_BYTES", 1000)  # many blocks
    data = np.random.default_rng(3).integers(0, 40, 25_017, dtype=np.uint8).tobytes()
    source, target = tmp_path / "data.bin", tmp_path / "data.bin.gz"
    source.write_bytes(data)
    gzip_file(source, target, compression_level=1, threads=threads)
    assert gzip.decompress(target.read_bytes()) == data
    source.write_bytes(b"")
    gzip_file(source, target, compression_level=1, threads=threads)
    assert gzip.decompress(target.read_bytes()) == b""


def test_bad_level_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in 0-9"):
        write_volume(_image(), {}, tmp_path / "vol.nii.gz", compression_level=10)
    assert not list(tmp_path.iterdir())


def test_converted_series_round_trip(tmp_path: Path) -> None:
    """DICOM -> read_series -> .nii.gz -> SimpleITK and nibabel: geometry and values kept."""
    info = write_series(tmp_path / "dcm", row_cosine=tuple(rotation(10, 5, -20)[:, 0]),
                        col_cosine=tuple(rotation(10, 5, -20)[:, 1]), slice_step=2.5,
                        origin=(12.0, -7.0, 30.0), rescale=(2.0, -100.0))
    image, sidecar = read_series(info.files)
    out = tmp_path / "out" / "vol.nii.gz"
    write_volume(image, sidecar, out)
    back = sitk.ReadImage(str(out))
    _assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back),
                                  (info.pixels * 2.0 - 100.0).astype(np.float32))
    nii = nib.load(out)
    assert isinstance(nii, nib.Nifti1Image)
    np.testing.assert_allclose(nii.affine, _ras_affine(image), atol=1e-5)
