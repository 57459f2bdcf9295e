"""DICOM series reading: the real example series, and synthetic series made from its files.

The example (``example_ct_dicom``, 20 axial slices, 2 mm apart, empty
SeriesInstanceUID) has its files named in the order of InstanceNumber 267..286,
from the top slice (z = -766.5 mm LPS) down. The volume read from it is sorted
by ascending z, so file ``f`` is slice ``k = 19 - f`` of the reference volume.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctgridit.ct.io import read_ct
from ctgridit.errors import CTGridItError, CTGridItWarning
from tests.conftest import copy_slices

PIXEL = 0.9765625  # mm, the example's PixelSpacing
UID_A = "1.2.826.0.1.3680043.8.498.11"
UID_B = "1.2.826.0.1.3680043.8.498.22"


@pytest.fixture
def example_files(dicom_dir) -> list[Path]:
    return sorted(dicom_dir.iterdir())


@pytest.fixture
def reference(dicom_dir):
    """The example read by our reader (read once, shared by the tests: do not modify it)."""
    return read_once(dicom_dir)


@functools.lru_cache(maxsize=1)
def read_once(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CTGridItWarning)  # the example is regular: no warning
        return read_ct(folder)


# ------------------------------------------------------------------ example
def test_example_matches_simpleitk(dicom_dir, reference):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    itk = reader.Execute()
    assert reference.shape == (512, 512, 20) == itk.GetSize()
    spacing, origin, direction = reference.itk_geometry()
    np.testing.assert_allclose(spacing, (PIXEL, PIXEL, 2.0), atol=1e-4)
    np.testing.assert_allclose(spacing, itk.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(origin, (-249.51171875, -437.51171875, -804.5), atol=1e-4)
    np.testing.assert_allclose(origin, itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(direction, itk.GetDirection(), atol=1e-6)
    assert np.array_equal(reference.array, sitk.GetArrayFromImage(itk).transpose(2, 1, 0))
    assert reference.array.dtype == np.float32


def test_example_metadata(dicom_dir, reference):
    assert reference.source == str(dicom_dir)
    assert reference.source_dtype == "uint16"
    assert reference.series_uid == ""
    assert "(no UID)" in reference.notes[0] and "20 slices" in reference.notes[0]
    assert reference.orientation == "LPS"
    assert -1100 < reference.array.min() and reference.array.max() < 3000  # HU, not stored values


def test_sorting_uses_positions_not_instance_numbers_or_names(tmp_path, example_files, reference):
    chosen = example_files[:5]  # reference slices 15..19
    names = ["e.dcm", "a.dcm", "d.dcm", "b.dcm", "c.dcm"]

    def scramble(ds, index):
        ds.InstanceNumber = [3, 1, 5, 2, 4][index]

    volume = read_ct(copy_slices(chosen, tmp_path / "s", scramble, names))
    assert np.array_equal(volume.array, reference.array[:, :, 15:20])
    np.testing.assert_allclose(volume.affine[:3, :3], reference.affine[:3, :3], atol=1e-6)
    np.testing.assert_allclose(volume.origin_ras, (reference.affine @ [0, 0, 15, 1])[:3], atol=1e-4)


def test_conventions_agree_with_simpleitk(tmp_path, example_files):
    """Non-square pixels and swapped in-plane axes: PixelSpacing order, i/j directions and the normal's sign."""

    def edit(ds, index):
        ds.PixelSpacing = [0.5, 0.8]  # 0.5 mm between rows (along j), 0.8 mm between columns (along i)
        ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]  # rows run along +y, columns along +x: normal -z

    folder = copy_slices(example_files[:4], tmp_path / "swapped", edit)
    volume = read_ct(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    itk = reader.Execute()
    spacing, origin, direction = volume.itk_geometry()
    np.testing.assert_allclose(spacing, (0.8, 0.5, 2.0), atol=1e-6)
    np.testing.assert_allclose(spacing, itk.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(origin, itk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(direction, itk.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(direction, (0, 1, 0, 1, 0, 0, 0, 0, -1), atol=1e-6)
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(itk).transpose(2, 1, 0))


# ------------------------------------------------------------------ series
@pytest.fixture
def two_series(tmp_path, example_files) -> Path:
    """Series A: 6 slices, series B: 3 slices, plus a text file and a non-image DICOM file."""
    root = tmp_path / "two"
    copy_slices(example_files[:6], root / "a", lambda ds, i: setattr(ds, "SeriesInstanceUID", UID_A))
    copy_slices(example_files[10:13], root / "b", lambda ds, i: setattr(ds, "SeriesInstanceUID", UID_B))
    (root / "notes.txt").write_text("not DICOM\n")
    write_non_image_dicom(root / "DICOMDIR")
    return root


def write_non_image_dicom(path: Path) -> None:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Nobody"
    ds.save_as(path, enforce_file_format=True)


def test_largest_series_is_chosen_with_a_warning(two_series, reference):
    with pytest.warns(CTGridItWarning) as record:
        volume = read_ct(two_series)
    message = " ".join(str(w.message) for w in record)
    assert UID_A in message and "6 slices" in message and f"ignoring {UID_B}" in message
    assert '"CT Body 3.0"' in message and "kernel Br38f" in message and "--series UID" in message
    assert volume.series_uid == UID_A
    assert np.array_equal(volume.array, reference.array[:, :, 14:20])


def test_series_uid_selects_a_series(two_series, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CTGridItWarning)
        volume = read_ct(two_series, series_uid=UID_B)
    assert volume.series_uid == UID_B
    assert np.array_equal(volume.array, reference.array[:, :, 7:10])


def test_unknown_series_uid_lists_the_available_ones(two_series):
    with pytest.raises(CTGridItError) as info:
        read_ct(two_series, series_uid="9.9.9")
    message = str(info.value)
    assert str(two_series) in message and "9.9.9" in message
    assert f'{UID_A} ("CT Body 3.0", kernel Br38f 3, 6 slices)' in message and f"{UID_B} (" in message


def test_empty_uid_can_be_selected(example_files, tmp_path, reference):
    folder = copy_slices(example_files[:3], tmp_path / "s")
    assert np.array_equal(read_ct(folder, series_uid="(no UID)").array, reference.array[:, :, 17:20])


# --------------------------------------------------------- irregular series
def test_missing_slice_is_interpolated_with_a_warning(tmp_path, example_files, reference):
    kept = example_files[:3] + example_files[4:7]  # file 3 (reference slice 16) is missing
    with pytest.warns(CTGridItWarning, match=r"slice gaps vary from 2 to 4 mm"):
        volume = read_ct(copy_slices(kept, tmp_path / "gap"))
    expected = reference.array[:, :, 13:20]
    assert volume.shape == (512, 512, 7)
    np.testing.assert_allclose(volume.spacing, (PIXEL, PIXEL, 2.0), atol=1e-4)
    np.testing.assert_allclose(volume.affine, reference.affine @ translation(k=13), atol=1e-4)
    for k in (0, 1, 2, 4, 5, 6):
        np.testing.assert_allclose(volume.array[:, :, k], expected[:, :, k], atol=1e-3)
    np.testing.assert_allclose(volume.array[:, :, 3], (expected[:, :, 2] + expected[:, :, 4]) / 2, atol=1e-3)
    assert any("resampled" in note for note in volume.notes)


def test_duplicate_positions_are_dropped_with_a_warning(tmp_path, example_files, reference):
    folder = copy_slices(example_files[:4], tmp_path / "dup")
    copy_slices(example_files[1:2], folder, names=["zz_copy.dcm"])
    with pytest.warns(CTGridItWarning, match="repeat the position"):
        volume = read_ct(folder)
    assert np.array_equal(volume.array, reference.array[:, :, 16:20])


def test_localizer_in_the_series_is_ignored(tmp_path, example_files, reference):
    folder = copy_slices(example_files[:3], tmp_path / "s")

    def scout(ds, index):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    copy_slices(example_files[5:6], folder, scout, names=["scout.dcm"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CTGridItWarning)
        assert np.array_equal(read_ct(folder).array, reference.array[:, :, 17:20])


def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path, example_files, reference):
    """Slice m (ascending z) is moved m pixels towards the patient's left, as a tilted gantry would."""
    files = example_files[:5]  # reference slices 15..19; file f is ascending slice m = 4 - f

    def tilt(ds, index):
        m = 4 - index
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + m * PIXEL, y, z]
        ds.GantryDetectorTilt = 26

    with pytest.warns(CTGridItWarning, match=r"gantry tilt of 26\.0 degrees.*GantryDetectorTilt says 26"):
        volume = read_ct(copy_slices(files, tmp_path / "tilt", tilt))
    rotation = volume.affine[:3, :3] / np.asarray(volume.spacing)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(volume.spacing, (PIXEL, PIXEL, 2.0), atol=1e-4)

    # Where the anatomy lands: world point w on slice m shows what the untilted slice showed at w - m*PIXEL (LPS x).
    original = reference.array[:, :, 15:20]
    original_affine = reference.affine @ translation(k=15)
    i, j = np.meshgrid(np.arange(40, 470, 7), np.arange(40, 470, 11), indexing="ij")
    for m in range(5):
        world = volume.affine @ np.stack([i.ravel(), j.ravel(), np.full(i.size, m), np.ones(i.size)])
        world[0] += m * PIXEL  # RAS x = -LPS x: undo the move towards +LPS x
        src = np.rint(np.linalg.solve(original_affine, world)[:3]).astype(int)
        assert np.all(src[2] == m)
        np.testing.assert_allclose(volume.array[i.ravel(), j.ravel(), m], original[src[0], src[1], m], atol=1e-3)


def translation(k: int) -> np.ndarray:
    """The voxel-space translation by ``k`` slices (compose with an affine to move its origin)."""
    shift = np.eye(4)
    shift[2, 3] = k
    return shift


# ----------------------------------------------------------------- decoding
def test_simpleitk_decodes_slices_that_pydicom_cannot(tmp_path, example_files, reference, monkeypatch):
    folder = copy_slices(example_files[:3], tmp_path / "s")

    def refuse(self):
        raise NotImplementedError("no decoder (simulated)")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(refuse))
    assert np.array_equal(read_ct(folder).array, reference.array[:, :, 17:20])


def test_rescale_slope_and_intercept_are_applied_per_slice(tmp_path, example_files, reference):
    def rescale(ds, index):
        ds.RescaleSlope, ds.RescaleIntercept = (2, -3000) if index == 0 else (1, -1024)

    volume = read_ct(copy_slices(example_files[:3], tmp_path / "s", rescale))
    top = reference.array[:, :, 19]
    np.testing.assert_array_equal(volume.array[:, :, 2], 2 * (top + 1024) - 3000)
    np.testing.assert_array_equal(volume.array[:, :, :2], reference.array[:, :, 17:19])


# ---------------------------------------------------------------------- zips
def test_zip_of_the_folder(tmp_path, example_files, reference, monkeypatch):
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in example_files:
            zf.write(path, path.name)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    volume = read_ct(archive)
    assert np.array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-6)
    assert volume.source == str(archive)
    assert list(scratch.iterdir()) == []  # the extracted copy is gone


def test_zip_with_a_subfolder(tmp_path, example_files, reference):
    archive = tmp_path / "nested.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in example_files[:4]:
            zf.write(path, f"export/CT/{path.name}")
        zf.writestr("export/README.txt", "exported series")
    assert np.array_equal(read_ct(archive).array, reference.array[:, :, 16:20])


def test_zip_temporary_folder_is_removed_on_error(tmp_path, monkeypatch):
    archive = tmp_path / "texts.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "hello")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(CTGridItError, match="no DICOM image slices"):
        read_ct(archive)
    assert list(scratch.iterdir()) == []


# -------------------------------------------------------------- bad input
def empty_folder(tmp_path, files):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def junk_only(tmp_path, files):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    write_non_image_dicom(folder / "DICOMDIR")
    return folder


def single_slice(tmp_path, files):
    return copy_slices(files[:1], tmp_path / "one")


def mixed_sizes(tmp_path, files):
    return copy_slices(files[:3], tmp_path / "mixed", lambda ds, i: setattr(ds, "Columns", 256) if i == 1 else None)


def truncated_slice(tmp_path, files):
    folder = copy_slices(files[:3], tmp_path / "cut")
    victim = folder / files[1].name
    victim.write_bytes(victim.read_bytes()[:60_000])
    return folder


def empty_zip(tmp_path, files):
    path = tmp_path / "empty.zip"
    zipfile.ZipFile(path, "w").close()
    return path


def not_a_zip(tmp_path, files):
    path = tmp_path / "fake.zip"
    path.write_text("this is not a zip archive")
    return path


@pytest.mark.parametrize(
    "make, phrase",
    [
        (empty_folder, "holds no files"),
        (junk_only, "no DICOM image slices"),
        (single_slice, "single image slice"),
        (mixed_sizes, "mixed image sizes"),
        (truncated_slice, "cannot be decoded"),
        (empty_zip, "holds no files"),
        (not_a_zip, "not a valid zip file"),
    ],
)
def test_bad_dicom_input_is_a_one_line_error(tmp_path, example_files, make, phrase):
    path = make(tmp_path, example_files)
    with pytest.raises(CTGridItError) as info:
        read_ct(path)
    message = str(info.value)
    assert str(path) in message and phrase in message
    assert "\n" not in message
    assert "ctgridit-dicom-" not in message  # the zip is named, not its temporary copy
