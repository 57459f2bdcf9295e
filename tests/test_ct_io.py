"""read_ct / write_nifti: real-scan round trips, other formats, and every kind of bad input."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctgridit.ct import io as ct_io
from ctgridit.ct.io import read_ct, write_nifti
from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItError
from tests.conftest import data_file

REAL_NIFTI = [
    "totalsegmentator/example_ct.nii.gz",
    "totalsegmentator/example_ct_sm.nii.gz",
    "totalsegmentator/chest_cta_crop.nii.gz",
    "totalsegmentator/chest_crop.nii.gz",
    "lung_pet_ct_dx/A0001_5mm_kernelL.nii.gz",
    "lung_pet_ct_dx/A0001_5mm_kernelB.nii.gz",
    "lung_pet_ct_dx/A0002_8mm_B70f.nii.gz",
    "lung_pet_ct_dx/A0002_8mm_B40f.nii.gz",
]


def assert_same_geometry(a: CTVolume, b: CTVolume) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    assert a.orientation == b.orientation


def assert_itk_agrees(path: Path, volume: CTVolume) -> None:
    """SimpleITK's header geometry (LPS) equals ``volume.itk_geometry()``."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    spacing, origin, direction = volume.itk_geometry()
    assert reader.GetSize() == volume.shape
    np.testing.assert_allclose(reader.GetSpacing(), spacing, atol=1e-4)
    np.testing.assert_allclose(reader.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(reader.GetDirection(), direction, atol=1e-5)


# -------------------------------------------------------------- round trips
@pytest.mark.parametrize("relative", REAL_NIFTI)
def test_real_nifti_round_trip(relative, tmp_path):
    original = data_file(relative)
    volume = read_ct(original)
    img = nib.load(original)
    assert volume.array.dtype == np.float32
    assert np.array_equal(volume.array, img.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(volume.affine, img.affine, atol=1e-6)
    assert volume.source == str(original) and volume.source_dtype == str(img.get_data_dtype())

    out = write_nifti(volume, tmp_path / "copy.nii.gz")
    again = read_ct(out)
    assert np.array_equal(again.array, volume.array)  # integer HU survive exactly
    assert_same_geometry(again, volume)
    assert_itk_agrees(out, again)


def test_dicom_round_trip(dicom_dir, tmp_path):
    volume = read_ct(dicom_dir)
    out = write_nifti(volume, tmp_path / "dicom.nii")
    again = read_ct(out)
    assert np.array_equal(again.array, volume.array)
    assert_same_geometry(again, volume)
    assert_itk_agrees(out, volume)
    np.testing.assert_allclose(again.itk_geometry()[1], (-249.51171875, -437.51171875, -804.5), atol=1e-4)


def test_written_header(small_ct, tmp_path):
    volume = read_ct(small_ct)
    out = write_nifti(volume, tmp_path / "v.nii.gz")
    header = nib.Nifti1Header.from_fileobj(gzip.open(out))  # the raw header, before nibabel consumes scaling
    assert header.get_data_dtype() == np.int16
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    assert float(header["scl_slope"]) == 1.0 and float(header["scl_inter"]) == 0.0
    assert header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(header.get_qform(), volume.affine, atol=1e-4)
    np.testing.assert_allclose(header.get_sform(), volume.affine, atol=1e-6)


@pytest.mark.parametrize("relative", ["totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/chest_crop.nii.gz"])
@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_itk_formats(relative, suffix, tmp_path):
    original = data_file(relative)
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(original)), str(path))
    volume = read_ct(path)
    img = nib.load(original)
    assert np.array_equal(volume.array, img.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(volume.affine, img.affine, atol=1e-4)
    assert volume.orientation == "".join(nib.aff2axcodes(img.affine))
    assert volume.source_dtype == "int16"


def test_trailing_singleton_dimension_is_dropped(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    path = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1), affine), path)
    volume = read_ct(path)
    assert volume.shape == (2, 3, 4)
    assert volume.array[1, 2, 3] == 23
    assert volume.spacing == (2.0, 2.0, 3.0)


def test_nifti_scaling_is_applied(tmp_path):
    img = nib.Nifti1Image(np.full((3, 3, 3), 100, dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii"
    nib.save(img, path)
    volume = read_ct(path)
    assert np.all(volume.array == 2 * 100 - 1024)
    assert volume.source_dtype == "int16"


# ------------------------------------------------------------------- writing
def test_write_rounds_and_clips(tmp_path):
    volume = CTVolume(np.array([1.4, 1.6, -2.5, -40000.0, 40000.0, 0.0, 7.0, 8.0]).reshape(2, 2, 2).astype(np.float32), np.eye(4))
    again = read_ct(write_nifti(volume, tmp_path / "r.nii.gz"))
    assert again.array.ravel().tolist() == [1, 2, -2, -32768, 32767, 0, 7, 8]


def test_write_refuses_an_existing_file_unless_forced(small_ct, tmp_path):
    volume = read_ct(small_ct)
    out = tmp_path / "v.nii.gz"
    out.write_bytes(b"keep me")
    with pytest.raises(CTGridItError, match="output exists"):
        write_nifti(volume, out)
    assert out.read_bytes() == b"keep me"
    write_nifti(volume, out, force=True)
    assert np.array_equal(read_ct(out).array, volume.array)


@pytest.mark.parametrize("name", ["v.nrrd", "v.nii.gz.tmp", "v"])
def test_write_needs_a_nifti_name(tmp_path, name):
    volume = CTVolume(np.zeros((2, 2, 2), np.float32), np.eye(4))
    with pytest.raises(CTGridItError, match="not a NIfTI file name"):
        write_nifti(volume, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_nan_and_leaves_nothing(tmp_path):
    array = np.zeros((2, 2, 2), np.float32)
    array[0, 0, 0] = np.nan
    with pytest.raises(CTGridItError, match="NaN"):
        write_nifti(CTVolume(array, np.eye(4)), tmp_path / "nan.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_write(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ct_io.nib, "save", half_write)
    out = tmp_path / "full.nii.gz"
    with pytest.raises(CTGridItError) as info:
        write_nifti(CTVolume(np.zeros((2, 2, 2), np.float32), np.eye(4)), out)
    assert str(out) in str(info.value) and "No space left" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input
def save_nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def text_named(name):
    def make(tmp_path):
        path = tmp_path / name
        path.write_text("hello, I am not an image\n" * 20)
        return path

    return make


def half_gz(tmp_path):
    raw = data_file("totalsegmentator/example_ct_sm.nii.gz").read_bytes()
    path = tmp_path / "half.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def cut_nii(tmp_path):
    raw = gzip.decompress(data_file("totalsegmentator/example_ct_sm.nii.gz").read_bytes())
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: len(raw) - 1000])
    return path


def image_2d(tmp_path):
    return save_nifti(tmp_path / "slice.nii.gz", np.zeros((8, 8), np.int16))


def image_single_slice(tmp_path):
    return save_nifti(tmp_path / "slice3d.nii.gz", np.zeros((8, 8, 1), np.int16))


def image_4d(tmp_path):
    return save_nifti(tmp_path / "series.nii.gz", np.zeros((4, 4, 4, 2), np.int16))


def with_value(value):
    def make(tmp_path):
        array = np.zeros((4, 4, 4), np.float32)
        array[1, 2, 3] = value
        return save_nifti(tmp_path / "bad_values.nii", array)

    return make


def mha_2d(tmp_path):
    path = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(path))
    return path


def mhd_without_raw(tmp_path):
    path = tmp_path / "lost.mhd"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkInt16), str(path))
    path.with_suffix(".raw").unlink()
    return path


def empty_zip(tmp_path):
    path = tmp_path / "empty.zip"
    zipfile.ZipFile(path, "w").close()
    return path


def single_dicom_file(tmp_path):
    files = sorted(data_file("totalsegmentator/example_ct_dicom").iterdir())
    return files[0]


BAD_INPUTS = [
    (lambda tmp_path: tmp_path / "missing.nii.gz", "no such file or folder"),
    (text_named("notes.nii.gz"), "not a readable CT image (supported: "),
    (text_named("notes.nii"), "not a readable CT image (supported: "),
    (text_named("notes.txt"), "not a readable CT image (supported: "),
    (text_named("notes.nrrd"), "not a readable CT image (supported: "),
    (half_gz, "truncated or corrupt"),
    (cut_nii, "truncated"),
    (image_2d, "2D image"),
    (image_single_slice, "2D image"),
    (image_4d, "4D image"),
    (with_value(np.nan), "NaN or infinite"),
    (with_value(np.inf), "NaN or infinite"),
    (mha_2d, "2D image"),
    (mhd_without_raw, "truncated or corrupt"),
    (empty_zip, "holds no files"),
    (text_named("scan.zip"), "not a valid zip file"),
    (single_dicom_file, "single DICOM file"),
]


@pytest.mark.parametrize("make, phrase", BAD_INPUTS, ids=[f"{i}-{p.split()[0]}" for i, (_, p) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_one_line_error(make, phrase, tmp_path):
    path = make(tmp_path)
    with pytest.raises(CTGridItError) as info:
        read_ct(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert phrase in message
    assert "\n" not in message


def test_series_uid_is_refused_for_a_nifti(small_ct):
    with pytest.raises(CTGridItError, match="only applies to a DICOM"):
        read_ct(small_ct, series_uid="1.2.3")
