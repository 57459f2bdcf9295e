"""Along-z quality measures (ctgridit/ct/along_z.py) against scikit-image and on real scans."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ctgridit.ct.along_z import far_ssim, lung_extent, lung_fraction, max_far_ssim
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
    from ctgridit.ct.training_data import load_ct_sequences
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
