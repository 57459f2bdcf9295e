"""SURE blending (ctgridit.core.sure) against closed forms: linear denoisers and a Gaussian signal."""

import torch

from ctgridit.core.sure import mc_divergence, sure_mse, sure_weight


def _signal(n=400_000, s=2.0, sigma=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = s * torch.randn(n, generator=g, dtype=torch.float64)
    return x, x + sigma * torch.randn(n, generator=g, dtype=torch.float64)


def test_the_divergence_of_a_linear_denoiser_is_its_slope():
    _, y = _signal()
    for a in (0.0, 0.3, 1.0):
        assert abs(mc_divergence(lambda v: a * v, y, 1.0, torch.Generator().manual_seed(1)) - a) < 1e-9


def test_blending_the_zero_denoiser_gives_the_wiener_filter():
    """x ~ N(0, s^2), noise sigma: the best y + w (0 - y) is y * s^2 / (s^2 + sigma^2), i.e. w = sigma^2 / (s^2 + sigma^2)."""
    s, sigma = 2.0, 1.0
    _, y = _signal(s=s, sigma=sigma)
    w = sure_weight(y, torch.zeros_like(y), sigma, 0.0)
    assert abs(w - sigma**2 / (s**2 + sigma**2)) < 0.005


def test_sure_estimates_the_error_against_the_noise_free_signal():
    x, y = _signal()
    for a in (0.5, 0.8):
        estimate = sure_mse(y, a * y, 1.0, a)
        assert abs(estimate - float(((a * y - x) ** 2).mean())) < 0.02


def test_a_denoiser_that_removes_structure_is_turned_down_never_worse_than_the_input():
    """A denoiser that keeps a quarter of the signal: its own error is far above the input's; the blend is below."""
    x, y = _signal(s=2.0, sigma=0.5)
    bad = 0.25 * y
    w = sure_weight(y, bad, 0.5, 0.25)
    blended = y + w * (bad - y)
    input_error, blended_error = float(((y - x) ** 2).mean()), float(((blended - x) ** 2).mean())
    assert float(((bad - x) ** 2).mean()) > 5 * input_error
    assert 0 < w < 0.1 and blended_error <= input_error


def test_a_perfect_posterior_mean_is_kept_whole():
    """The posterior mean of the Gaussian signal (the best denoiser there is) gets w = 1."""
    s, sigma = 2.0, 1.0
    _, y = _signal(s=s, sigma=sigma)
    a = s**2 / (s**2 + sigma**2)
    assert sure_weight(y, a * y, sigma, a) > 0.99
