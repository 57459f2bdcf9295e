"""The empirical Wiener filter in a sliding DCT (ctgridit.core.dct_wiener): exact limits, the oracle's
closed-form error, its exact derivative, a gain on a real scan, and the block size SURE picks."""

import numpy as np
import pytest
import scipy.ndimage

from ctgridit.core.dct_wiener import CANDIDATES, choose_block, dct_hard_threshold, dct_wiener
from tests.conftest import data_file


def test_gains_of_one_and_zero_are_exact():
    rng = np.random.default_rng(0)
    assert np.isfinite(dct_wiener(rng.normal(0, 1, (8, 8, 4)), np.zeros((8, 8, 4)), 1e-30)).all()   # sigma^2 -> 0
    noisy = rng.normal(size=(20, 18, 9)).astype(np.float32)
    # a pilot far above the noise passes the input unchanged; a zero pilot gives zero
    np.testing.assert_allclose(dct_wiener(noisy, noisy * 1e4, 1e-3), noisy, atol=1e-5)
    np.testing.assert_allclose(dct_wiener(noisy, np.zeros_like(noisy), 1.0), 0.0, atol=1e-7)
    np.testing.assert_array_equal(dct_wiener(noisy, noisy * 0, 0.0), noisy)          # no noise, nothing to do
    assert dct_wiener(noisy, noisy, 1.0).shape == noisy.shape


def test_single_block_oracle_has_the_wiener_error():
    """One block covering the array and the clean signal as pilot: the oracle Wiener filter, whose expected
    squared error per voxel is mean(P^2 sigma^2 / (P^2 + sigma^2)) over the DCT coefficients P of the signal."""
    import scipy.fft

    rng = np.random.default_rng(1)
    shape, sigma = (8, 8, 4), 0.7
    x = np.linspace(-1, 1, 8)
    clean = (np.sin(3 * x)[:, None, None] + x[None, :, None] ** 2 + 0.3 * np.arange(4)[None, None, :]).astype(np.float32)
    p2 = scipy.fft.dctn(clean.astype(np.float64), norm="ortho") ** 2
    expected = float(np.mean(p2 * sigma**2 / (p2 + sigma**2)))
    errors = [np.mean((dct_wiener(clean + rng.normal(0, sigma, shape).astype(np.float32), clean, sigma,
                                  block=shape, step=shape) - clean) ** 2) for _ in range(3000)]
    assert np.mean(errors) == pytest.approx(expected, rel=0.03)
    assert expected < sigma**2 / 2                 # and it is well below the input's error


@pytest.mark.parametrize("block, step", CANDIDATES)
def test_the_threads_share_the_blocks_without_changing_the_result(block, step):
    """Every block at every offset of the step (the padded array's) filtered on its own and averaged with
    BM3D's weights, in float64, one block at a time: the threaded filter gives that, and the same bits for 1, 2
    or 5 threads (the bands of one offset's blocks are disjoint), also on an array thinner than the block."""
    import itertools

    import scipy.fft

    rng = np.random.default_rng(3)
    for shape in ((13, 11, 7), (3, 12, 10)):
        noisy = (rng.normal(0, 1, shape) + np.linspace(0, 3, shape[0])[:, None, None]).astype(np.float32)
        pilot = scipy.ndimage.uniform_filter(noisy, 3)
        b = tuple(min(x, n) for x, n in zip(block, shape))
        st = tuple(min(x, y) for x, y in zip(step, b))
        y, p = (np.pad(a.astype(np.float64), [(x, x) for x in b], mode="edge") for a in (noisy, pilot))
        total, weights = np.zeros_like(y), np.zeros_like(y)
        starts = [sorted({o * s + k * x for o in range(x // s) for k in range(n // x) if o * s + (k + 1) * x <= n})
                  for n, x, s in zip(y.shape, b, st)]         # every multiple of the step where it divides the block
        for corner in itertools.product(*starts):
            part = tuple(slice(c, c + x) for c, x in zip(corner, b))
            signal = scipy.fft.dctn(p[part], norm="ortho") ** 2
            gain = signal / (signal + 0.5**2)
            weight = 1 / max((gain**2).sum(), 1e-6)
            total[part] += weight * scipy.fft.idctn(gain * scipy.fft.dctn(y[part], norm="ortho"), norm="ortho")
            weights[part] += weight
        inner = tuple(slice(x, x + n) for x, n in zip(b, shape))
        expected = total[inner] / weights[inner]
        outs = [dct_wiener(noisy, pilot, 0.5, block, step, workers=w) for w in (1, 2, 5)]
        np.testing.assert_allclose(outs[0], expected, atol=1e-4)
        assert all(np.array_equal(outs[0], out) for out in outs[1:])
        hard = [dct_hard_threshold(noisy, 0.5, block, step, workers=w) for w in (1, 2, 5)]
        assert all(np.array_equal(hard[0], out) for out in hard[1:])


def test_refuses_mismatched_arrays():
    with pytest.raises(ValueError, match="one shape"):
        dct_wiener(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), 1.0)
    with pytest.raises(ValueError, match="3D"):
        dct_wiener(np.zeros((4, 4)), np.zeros((4, 4)), 1.0)


def test_improves_a_smoothing_pilot_on_a_real_scan(chest_ct):
    """On a real chest crop (1.5 mm) with 50 HU of noise, a lightly smoothed pilot (a little better than the
    input, its edges blurred) is improved: the Wiener estimate beats the input and the pilot by far (measured
    RMSE 49.9 input, 46.2 pilot, 37.9 Wiener). A pilot worse than the input can make it worse (sigma 0.9 voxels:
    92 -> 55 HU), which is why it takes the denoiser's output."""
    from ctgridit.ct.io import read_ct

    clean = read_ct(chest_ct).array[:, :, 40:72].astype(np.float32)
    noisy = clean + np.random.default_rng(0).normal(0, 50, clean.shape).astype(np.float32)
    pilot = scipy.ndimage.gaussian_filter(noisy, (0.5, 0.5, 0.35))
    out = dct_wiener(noisy, pilot, 50.0)

    def rmse(a):
        return float(np.sqrt(np.mean((np.clip(a, -1000, 1000) - np.clip(clean, -1000, 1000)) ** 2)))

    assert rmse(pilot) < rmse(noisy)
    assert rmse(out) < 0.9 * rmse(pilot) and rmse(out) < 0.8 * rmse(noisy)


def test_soft_tissue_keeps_its_mean_hu():
    """The gain shrinks each block's mean towards zero: denoise filters HU + 1000 (zero in air), so a flat 30 HU
    region keeps the mean it has in the input (within 0.2 HU at 100 HU of noise, the clean region as pilot);
    on raw HU it would be pulled towards water's 0 HU (by about 1.4 HU)."""
    from ctgridit.ct.denoising import _wiener
    from ctgridit.ct.volume import CTVolume

    rng = np.random.default_rng(3)
    clean = np.full((64, 64, 16), 30.0, np.float32)
    noisy = CTVolume(clean + rng.normal(0, 100, clean.shape).astype(np.float32), np.diag([0.7, 0.7, 2.5, 1.0]))
    out, details = _wiener(noisy, clean, 100.0, None)
    assert abs(float(out.mean()) - float(noisy.array.mean())) < 0.2
    assert details["block"] == [8, 8, 4]
    raw = dct_wiener(noisy.array, clean, 100.0)
    assert float(raw.mean()) < float(noisy.array.mean()) - 0.8                 # the bias the offset removes


def test_the_short_side_of_the_block_lies_along_the_slice_axis():
    """A volume stored slice axis first (5 mm slices along array axis 0) gets its 4-voxel side there."""
    from ctgridit.ct.denoising import _wiener
    from ctgridit.ct.volume import CTVolume

    chosen = []
    for seed in range(2):                   # textured, two cases where SURE picks each size: both keep their
        array = np.random.default_rng(seed).normal(0, 100 + 400 * seed, (8, 16, 16)).astype(np.float32)
        volume = CTVolume(array, np.diag([5.0, 0.8, 0.8, 1.0]))   # 4 (and step 1) along the slices
        details = _wiener(volume, scipy.ndimage.uniform_filter(array, 1 + 2 * seed), 10.0 + 200 * seed, None)[1]
        chosen.append((details["block"], details["step"]))
    assert chosen == [([4, 8, 8], [1, 2, 2]), ([4, 4, 4], [1, 1, 1])]


@pytest.mark.parametrize("block, step", CANDIDATES)
def test_the_diagonal_is_the_derivative_of_each_output_by_its_input(block, step):
    """With the pilot fixed the filter is linear; its diagonal, voxel by voxel, is the output a unit impulse at
    that voxel gives there (exact inside; the outermost layer also gets its padded copies' share)."""
    rng = np.random.default_rng(0)
    noisy = rng.normal(0, 50, (9, 9, 8))
    pilot = (rng.normal(0, 50, noisy.shape) + 500).astype(np.float32)
    out, diagonal = dct_wiener(noisy, pilot, 50.0, block, step, diagonal=True)
    np.testing.assert_array_equal(out, dct_wiener(noisy, pilot, 50.0, block, step))
    impulse = np.zeros_like(noisy)
    for index in np.ndindex(*(n - 2 for n in noisy.shape)):
        voxel = tuple(i + 1 for i in index)
        impulse[voxel] = 1.0
        assert abs(dct_wiener(impulse, pilot, 50.0, block, step)[voxel] - diagonal[voxel]) < 1e-5
        impulse[voxel] = 0.0


@pytest.mark.parametrize("scan, best", [("totalsegmentator/chest_crop.nii.gz", (4, 4, 4)),
                                        ("lidc_idri/LIDC-IDRI-0001.nii.gz", (8, 8, 4))])
def test_sure_picks_the_block_size_with_the_lower_true_error(scan, best):
    """On real CT with 50 HU of noise and a pilot independent of it (so that SURE with the pilot fixed is
    unbiased), the estimated error of each candidate is within 2 % of the true one (RMSE; measured within 1 %),
    and the candidate picked is the better one: small blocks on the 1.5 mm chest, whose structures are few voxels
    wide, 8 x 8 x 4 on the 0.7 mm one (true RMSE 27.8 vs 28.6 HU and 18.8 vs 19.2 HU)."""
    from ctgridit.ct.io import read_ct

    array = read_ct(data_file(scan)).array
    start = [(n - c) // 2 for n, c in zip(array.shape, (96, 96, 16))]
    clean = array[start[0]:start[0] + 96, start[1]:start[1] + 96, start[2]:start[2] + 16].astype(np.float32) + 1000
    rng = np.random.default_rng(0)
    noisy = clean + rng.normal(0, 50, clean.shape).astype(np.float32)
    pilot = clean + rng.normal(0, 50 / 3, clean.shape).astype(np.float32)
    chosen, estimates = choose_block(noisy, pilot, 50.0)
    inner = (slice(1, -1),) * 3
    true = [float(np.mean((dct_wiener(noisy, pilot, 50.0, b, s) - clean)[inner] ** 2)) for b, s in CANDIDATES]
    np.testing.assert_allclose(np.sqrt(estimates), np.sqrt(true), rtol=0.02)
    assert CANDIDATES[chosen][0] == best and chosen == int(np.argmin(true))


def test_hard_thresholding_limits_and_gain_on_a_real_scan(chest_ct):
    """Threshold 0 keeps every coefficient (the input back), sigma 0 does nothing; one block covering the array keeps
    exactly the coefficients above threshold x sigma and the mean; on a real chest crop with 50 HU of noise it
    removes part of the noise with no pilot at all."""
    import scipy.fft

    from ctgridit.ct.io import read_ct

    rng = np.random.default_rng(0)
    noisy = rng.normal(0, 1, (12, 10, 8)).astype(np.float32)
    np.testing.assert_allclose(dct_hard_threshold(noisy, 1.0, threshold=0.0), noisy, atol=1e-5)
    np.testing.assert_array_equal(dct_hard_threshold(noisy, 0.0), noisy)
    block = rng.normal(0, 1, (8, 8, 4)) + 5.0
    coefficients = scipy.fft.dctn(block, norm="ortho")
    keep = np.abs(coefficients) > 1.3 * 0.8
    keep[0, 0, 0] = True
    assert 0 < keep.sum() < keep.size - 1                                       # some kept, some dropped
    np.testing.assert_allclose(dct_hard_threshold(block, 0.8, block=(8, 8, 4), step=(8, 8, 4), threshold=1.3),
                               scipy.fft.idctn(coefficients * keep, norm="ortho"), atol=1e-5)
    clean = read_ct(chest_ct).array[:, :, 40:72].astype(np.float32) + 1000
    noisy = clean + rng.normal(0, 50, clean.shape).astype(np.float32)
    rmse = lambda a: float(np.sqrt(np.mean((a - clean) ** 2)))                 # noqa: E731
    assert rmse(dct_hard_threshold(noisy, 50.0)) < 0.8 * rmse(noisy)
