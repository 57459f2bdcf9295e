"""How close generated slices come to real ones (ctgridit/ct/evaluate.py): against scikit-image, by brute force."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from ctgridit.ct.evaluate import evaluate, nearest_slice_ssim
from ctgridit.ct.volume import CTVolume


def _unit(hu: np.ndarray) -> np.ndarray:
    return (np.clip(hu, -1000, 1000) + 1000) / 2000


def test_nearest_slice_ssim_is_the_best_of_all_real_slices():
    """Against every real slice by brute force (the candidates cover them all here); a copied slice scores 1, a
    noisy copy less, a slice of another scan least. The four nearest by pixel distance hold the best match of a
    (noisy) copy; for an unrelated slice they may miss the best of its low scores."""
    rng = np.random.default_rng(0)
    real = rng.normal(-300, 300, (48, 40, 30)).cumsum(axis=2) / 4               # slices that drift apart
    generated = np.stack([real[:, :, 4], real[:, :, 17] + rng.normal(0, 60, (48, 40)),
                          rng.normal(-300, 300, (48, 40))], axis=2)
    values = nearest_slice_ssim(generated, real, candidates=30)
    brute = [max(structural_similarity(_unit(generated[:, :, z]), _unit(real[:, :, m]), data_range=1.0)
                 for m in range(30)) for z in range(3)]
    np.testing.assert_allclose(values, brute, atol=1e-12)
    assert values[0] == pytest.approx(1.0) and values[2] < values[1] < 1.0
    few = nearest_slice_ssim(generated, real, candidates=4)
    np.testing.assert_allclose(few[:2], values[:2], atol=1e-12)
    assert few[2] <= values[2]


def test_evaluate_reports_how_close_slices_of_the_same_size_come():
    rng = np.random.default_rng(1)
    real = [CTVolume(rng.normal(-300, 300, (24, 24, 12)).astype(np.float32), np.eye(4))]
    copy = [CTVolume(real[0].array[:, :, ::-1].copy(), np.eye(4))]
    figures = evaluate(real, copy)
    assert figures["nearest_ssim_median"] == pytest.approx(1.0) and figures["nearest_ssim_max"] == pytest.approx(1.0)
    other = evaluate(real, [CTVolume(rng.normal(-300, 300, (20, 24, 12)).astype(np.float32), np.eye(4))])
    assert "nearest_ssim_median" not in other                                  # another in-plane size: not compared
