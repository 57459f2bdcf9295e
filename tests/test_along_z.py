"""Along-z quality measures (ctgridit/ct/along_z.py) against scikit-image and on real scans."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ctgridit.ct.along_z import far_ssim, lung_extent, lung_fraction, lung_regions, max_far_ssim
from tests.conftest import data_file


def test_far_ssim_is_scikit_images_ssim_for_every_far_pair():
    rng = np.random.default_rng(0)
    hu = rng.normal(-300, 400, (40, 36, 12)).cumsum(axis=2) / 3          # slices that drift apart
    values = far_ssim(hu, far=3)
    scaled = (np.clip(hu, -1000, 1000) + 1000) / 2000
    for i in range(12):
        for j in range(12):
            if j - i > 3:
                expected = structural_similarity(scaled[:, :, i], scaled[:, :, j], data_range=1.0)
                assert abs(values[i, j] - expected) < 1e-9
            else:
                assert np.isnan(values[i, j])
    assert max_far_ssim(hu, far=3) == pytest.approx(np.nanmax(values))
    assert np.isnan(max_far_ssim(hu, far=20))
    assert max_far_ssim(np.repeat(hu[:, :, :1], 10, axis=2), far=3) == pytest.approx(1.0)   # a frozen volume


def _hu(relative: str, spacing=(3.0, 3.0, 1.5)) -> np.ndarray:
    from ctgridit.ct.sequences import load_ct_sequences
    from ctgridit.ct.transforms import unwindow_hu

    frames = load_ct_sequences([data_file(relative)], spacing=spacing, in_plane=(128, 128))[0]
    return unwindow_hu(frames, [-1000, 1000])[:, 0].permute(2, 1, 0).numpy()   # (X, Y, Z)


def test_a_real_chest_holds_its_lungs_and_an_abdomen_does_not():
    chest = lung_extent(_hu("lidc_idri/LIDC-IDRI-0314.nii.gz"), 1.5)
    assert chest.chest_like(), chest
    assert 130 <= chest.length_mm <= 160 and 0.25 <= chest.peak <= 0.4
    abdomen = lung_extent(_hu("totalsegmentator/example_ct.nii.gz"), 1.5)
    assert not abdomen.chest_like() and abdomen.peak < 0.2
    air = np.full((16, 16, 10), -1000.0)
    assert lung_extent(air, 1.5).peak == 0 and lung_fraction(air).shape == (10,)


def test_mid_chest_slices_show_two_lungs_and_others_fewer():
    """lung_regions counts the lungs of a slice: two in the middle of a real chest, none below the diaphragm,
    one where a phantom has a single dark region, and specks or an airway do not count."""
    hu = _hu("lidc_idri/LIDC-IDRI-0314.nii.gz")
    fraction, regions = lung_fraction(hu), lung_regions(hu)
    mid = int(np.argmax(fraction))
    assert regions[mid] == 2 and regions[0] == 0
    phantom = np.full((64, 64, 3), -1000.0)
    phantom[8:56, 12:52] = 40.0                                          # a body
    phantom[16:48, 16:30, 0] = -850.0                                    # two lungs in slice 0
    phantom[16:48, 34:48, 0] = -850.0
    phantom[16:48, 16:48, 1] = -850.0                                    # one dark region in slice 1
    phantom[30:32, 30:32, 2] = -900.0                                    # an airway-sized speck in slice 2
    assert lung_regions(phantom).tolist() == [2, 1, 0]
