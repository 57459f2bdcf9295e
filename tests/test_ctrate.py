"""The CT-RATE dataset on a fake CT-RATE folder built from a real scan."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctgridit.ct.ctrate import CTRateDataset
from ctgridit.ct.io import read_ct
from ctgridit.ct.ctrate import CTRATE_SPACING, ctrate_preprocess
from ctgridit.ct.transforms import volume_to_metatensor
from ctgridit.ct.window import DEFAULT_WINDOW as HU_WINDOW
from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItError, CTGridItWarning
from tests.conftest import nested_path, write_csv

#: A crop of the real scan, to keep the default 0.75 mm preprocessing fast.
CROP = (slice(30, 90), slice(20, 80), slice(5, 25))
#: Per-volume rescale as in CT-RATE's metadata (raw = (HU - intercept) / slope).
RESCALES = {"train_1_a_1.nii.gz": (0.5, -1024.0), "train_2_a_2.nii.gz": (1.0, 0.0)}
MISSING = "train_3_a_1.nii.gz"
WRONG_HEADER_SPACING = 1.0


@pytest.fixture
def hu_volume(small_ct) -> CTVolume:
    """The real HU crop with its true geometry (3 mm voxels, RAS)."""
    vol = read_ct(small_ct)
    return CTVolume(vol.array[CROP].copy(), vol.affine)


@pytest.fixture
def ctrate(tmp_path, hu_volume) -> tuple[Path, Path]:
    """A CT-RATE-like folder: int16 raw values, a wrong header spacing, a CSV with one missing volume."""
    sx, sy, sz = hu_volume.spacing
    wrong = hu_volume.affine.copy()
    wrong[:3, :3] *= WRONG_HEADER_SPACING / np.array([sx, sy, sz])
    rows = []
    for name, (slope, intercept) in RESCALES.items():
        raw = np.rint((hu_volume.array - intercept) / slope).astype(np.int16)
        path = nested_path(tmp_path / "data", name)
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(raw, wrong), str(path))
        rows.append({"VolumeName": name, "RescaleSlope": slope, "RescaleIntercept": intercept,
                     "XYSpacing": f"[{sx}, {sy}]", "ZSpacing": sz})
    rows.append({**rows[0], "VolumeName": MISSING})
    return tmp_path / "data", write_csv(tmp_path / "metadata.csv", rows)


def make_dataset(root, metadata, **kwargs) -> CTRateDataset:
    with pytest.warns(CTGridItWarning, match=f"1 of the {len(RESCALES) + 1} volumes"):
        return CTRateDataset(root, metadata, **kwargs)


def test_slope_intercept_and_csv_spacing_applied(ctrate, hu_volume):
    native = ctrate_preprocess(spacing=hu_volume.spacing, spatial_size=64)  # no resampling when the spacing is right
    dataset = make_dataset(*ctrate, transform=native)
    assert len(dataset) == len(RESCALES)
    expected = native({"image": volume_to_metatensor(hu_volume), "slope": 1.0, "intercept": 0.0})["image"]
    for item, name in zip(dataset, RESCALES):
        assert item["name"] == name
        assert item["image"].shape == (1, 64, 64, 20)            # a 1 mm header would give 20 x 20 x 7 voxels
        assert torch.allclose(item["image"].as_tensor(), expected.as_tensor(), rtol=0, atol=1e-6)
        assert torch.allclose(item["image"].affine, expected.affine)


def test_default_preprocessing_and_inverse(ctrate, hu_volume):
    dataset = make_dataset(*ctrate)
    item = dataset[0]
    image = item["image"]
    assert image.shape == (1, 512, 512, 39)                       # 20 slices at 3 mm -> 39 at 1.5 mm
    assert np.allclose(np.linalg.norm(image.affine[:3, :3].numpy(), axis=0), CTRATE_SPACING)
    assert "".join(nib.aff2axcodes(image.affine.numpy())) == "LPS"
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert bool((image[0, 0] == -1.0).all()) and bool((image[0, :, -1] == -1.0).all())  # air padding
    hu = dataset.transform.inverse(item)["image"]                 # back to HU on the file's grid (CSV spacing)
    assert hu.shape == (1, *hu_volume.shape)
    assert torch.allclose(hu.affine, torch.as_tensor(hu_volume.affine))
    assert torch.allclose(hu[0].as_tensor(), torch.from_numpy(hu_volume.array).clamp(*HU_WINDOW), atol=0.5)


def test_missing_files_warn_once(ctrate):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CTRateDataset(*ctrate)
    assert [str(w.message) for w in caught if w.category is CTGridItWarning] == [
        f"1 of the 3 volumes listed in {ctrate[1]} were not found under {ctrate[0]}; skipped"]
    assert [r.name for r in dataset.records] == list(RESCALES)


def test_bad_metadata_csv(ctrate, tmp_path):
    root, metadata = ctrate
    with pytest.raises(CTGridItError, match="metadata CSV not found"):
        CTRateDataset(root, tmp_path / "nope.csv")
    with metadata.open(newline="") as f:
        rows = list(csv.DictReader(f))
    short = write_csv(tmp_path / "short.csv", rows, columns=("VolumeName", "RescaleSlope"))
    with pytest.raises(CTGridItError, match="RescaleIntercept, XYSpacing, ZSpacing"):
        CTRateDataset(root, short)
    absent = write_csv(tmp_path / "absent.csv", [{**rows[0], "VolumeName": "valid_9_a_1.nii.gz"}])
    with pytest.raises(CTGridItError, match="none of the 1 volumes"):
        CTRateDataset(root, absent)
    garbled = write_csv(tmp_path / "garbled.csv", [{**rows[0], "XYSpacing": "0.75 mm"}])
    with pytest.raises(CTGridItError, match="bad metadata for train_1_a_1.nii.gz"):
        CTRateDataset(root, garbled)
    with pytest.raises(CTGridItError, match="CT-RATE folder not found"):
        CTRateDataset(tmp_path / "nowhere", metadata)


def test_header_depths_are_read_once_with_a_depth_cache(ctrate, tmp_path, monkeypatch):
    """50,000 headers are read on the first run only; a changed file is read again."""
    import ctgridit.ct.sequences as ct_sequences
    from ctgridit.ct.sequences import CTRateSequences

    cache = tmp_path / "depths.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CTGridItWarning)
        first = CTRateSequences(*ctrate, spacing=(6.0, 6.0, 3.0), in_plane=32, depth_cache=cache).lengths()
        assert cache.is_file() and len(first) == len(RESCALES)
        calls = []
        real = ct_sequences.resampled_depth
        monkeypatch.setattr(ct_sequences, "resampled_depth", lambda *a: (calls.append(a), real(*a))[1])
        again = CTRateSequences(*ctrate, spacing=(6.0, 6.0, 3.0), in_plane=32, depth_cache=cache)
        assert again.lengths() == first and calls == []
        touched = next(ctrate[0].rglob("train_1_a_1.nii.gz"))
        touched.write_bytes(touched.read_bytes())                        # a newer file time
        os_stat = touched.stat()
        import os

        os.utime(touched, ns=(os_stat.st_atime_ns, os_stat.st_mtime_ns + 10**9))
        assert again.lengths() == first and len(calls) == 1
