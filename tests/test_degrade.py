"""The stage-2 degradation (ctgridit/core/degrade.py, docs/METHOD.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch

from ctgridit.core.degrade import BLUR_KERNELS, Degrade, gaussian_blur, gaussian_kernel1d, opencv_sigma

DRAWS = 400


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def edge_image(channels: int = 1, size: int = 32) -> torch.Tensor:
    """A vertical step edge, -0.5 on the left half and 0.5 on the right, ``(C, size, size)``."""
    x = torch.full((channels, size, size), -0.5)
    x[..., size // 2:] = 0.5
    return x


@pytest.mark.parametrize("factor, shape", [(1, (3, 32, 32)), (2, (1, 33, 40)), (4, (3, 64, 48)), (3, (1, 31, 29))])
def test_output_shape_dtype_and_range(factor, shape):
    frame = torch.rand(shape) * 2 - 1
    out, info = Degrade(factor)(frame, gen(0))
    assert out.shape == frame.shape and out.dtype == frame.dtype
    assert out.min() >= -1 and out.max() <= 1
    assert set(info) == {"sigma", "blur_kernel"}


def test_noise_level_matches_the_drawn_sigma():
    degrade = Degrade(1, blur_prob=0.0)
    flat = torch.zeros(3, 64, 64)                          # no clamping: 15/255*2 * 5 sd < 1
    sigmas = []
    for seed in range(30):
        out, info = degrade(flat, gen(seed))
        assert info["blur_kernel"] is None
        expected = info["sigma"] * 2 / 255
        assert out.std().item() == pytest.approx(expected, rel=0.03)   # 12288 samples: sd of the estimate ~0.6%
        assert out.mean().abs().item() < 4 * expected / math.sqrt(flat.numel())
        sigmas.append(info["sigma"])
    assert all(10 <= s <= 15 for s in sigmas)
    assert min(sigmas) < 11 and max(sigmas) > 14               # spread over the range, not a constant


def test_noise_scale_follows_the_value_range():
    out, info = Degrade(1, blur_prob=0.0, value_range=(0, 255))(torch.full((1, 64, 64), 128.0), gen(1))
    assert out.std().item() == pytest.approx(info["sigma"], rel=0.05)


def test_blur_applied_about_half_the_time_with_the_listed_kernels():
    degrade = Degrade(2)
    kernels = [degrade(torch.zeros(1, 32, 32), gen(seed))[1]["blur_kernel"] for seed in range(DRAWS)]
    blurred = [k for k in kernels if k is not None]
    assert 0.4 * DRAWS <= len(blurred) <= 0.6 * DRAWS     # binomial(400, 0.5): sd 10, bounds at 4 sd
    assert set(blurred) == set(BLUR_KERNELS)


def test_blur_smooths_an_edge():
    edge = edge_image()
    sharp, _ = Degrade(1, noise_sigma=(0, 0), blur_prob=0.0)(edge, gen(0))
    soft, info = Degrade(1, noise_sigma=(0, 0), blur_prob=1.0)(edge, gen(0))
    assert info["blur_kernel"] in BLUR_KERNELS
    step = lambda x: (x[..., 1:] - x[..., :-1]).abs().max().item()  # noqa: E731 - largest jump across columns
    assert step(sharp) == pytest.approx(1.0)
    assert step(soft) < 0.5 * step(sharp)
    assert torch.allclose(soft[..., 0], edge[..., 0]) and torch.allclose(soft[..., -1], edge[..., -1])


def test_gaussian_blur_follows_opencv():
    assert opencv_sigma(9) == pytest.approx(1.7) and opencv_sigma(15) == pytest.approx(2.6)
    kernel = gaussian_kernel1d(9, opencv_sigma(9))
    assert kernel.sum().item() == pytest.approx(1.0) and torch.equal(kernel, kernel.flip(0))
    flat = torch.full((2, 20, 20), 0.3)
    assert torch.allclose(gaussian_blur(flat, 15), flat)                  # normalised, reflect padding
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1
    assert torch.allclose(gaussian_blur(impulse, 9)[0, 6:15, 6:15], torch.outer(kernel, kernel), atol=1e-7)
    with pytest.raises(ValueError, match="larger than 7"):
        gaussian_blur(torch.zeros(1, 7, 30), 15)


def test_downsampling_removes_detail_finer_than_the_factor():
    checker = (torch.arange(32).view(-1, 1) + torch.arange(32)) % 2 * 1.0 - 0.5   # period 2 pixels
    out, _ = Degrade(2, noise_sigma=(0, 0), blur_prob=0.0)(checker.expand(1, 32, 32), gen(0))
    assert checker.std() > 0.49 and out.std() < 0.05


def test_same_seed_same_output():
    frame = torch.rand(3, 32, 32) * 2 - 1
    degrade = Degrade(2)
    a, info_a = degrade(frame, gen(7))
    b, info_b = degrade(frame, gen(7))
    c, _ = degrade(frame, gen(8))
    assert torch.equal(a, b) and info_a == info_b
    assert not torch.equal(a, c)


def test_identity_without_resize_noise_or_blur():
    frame = torch.rand(3, 17, 23) * 2 - 1
    out, info = Degrade(1, noise_sigma=(0, 0), blur_prob=0.0)(frame, gen(3))
    assert torch.equal(out, frame)
    assert info == {"sigma": 0.0, "blur_kernel": None}


@pytest.mark.parametrize("kwargs", [{"factor": 0}, {"factor": 2, "noise_sigma": (15, 10)},
                                    {"factor": 2, "blur_prob": 1.5}, {"factor": 2, "blur_kernels": (8,)},
                                    {"factor": 2, "value_range": (1, -1)}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Degrade(**kwargs)


def test_rejects_batches():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        Degrade(2)(torch.zeros(2, 1, 8, 8), gen(0))
