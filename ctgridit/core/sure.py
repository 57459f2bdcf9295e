"""Never worse than the input: a denoiser's output blended with its input by Stein's unbiased risk estimate.

For ``y = x + n`` with white Gaussian noise ``n`` of known standard deviation
``sigma`` and any weakly differentiable denoiser ``D``, Stein's lemma gives an
unbiased estimate of the mean squared error against ``x`` from ``y`` alone
(SURE; Stein 1981, Donoho and Johnstone 1995):

    SURE(D) / n = mean((D(y) - y)^2) - sigma^2 + 2 sigma^2 div(D)(y) / n.

For the blend ``y + w (D(y) - y)`` the estimate is a parabola in ``w``; its
minimum is at ``w* = sigma^2 (1 - d) / mean((D(y) - y)^2)`` with ``d`` the mean
divergence ``div(D)(y) / n`` per value, and ``w = 0`` (the input itself) costs
``sigma^2``. Clipped to [0, 1], ``w*`` therefore never estimates an error above
the input's: a denoiser that removes structure with the noise (a large
residual for the divergence it has) is turned down, one that removes only
noise is kept whole. ``x`` is whatever the noise was added to: told the noise
that was *added* to a scan, the estimate is of the error against that scan with
its own noise, the reference a user measures against.

The divergence is estimated by Monte Carlo (Ramani, Blu and Unser 2008):
``d ~ mean(b * (D(y + eps b) - D(y)) / eps)`` with a Rademacher probe ``b``,
on a part of the data that stands for the rest (the caller picks it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: The probe's step, relative to the noise: small enough for a local derivative, large against float32 rounding.
PROBE_STEP = 0.05


def mc_divergence(denoise: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, sigma: float,
                  generator: torch.Generator | None = None, step: float = PROBE_STEP,
                  denoised: torch.Tensor | None = None) -> float:
    """The mean divergence per value of ``denoise`` at ``y`` (one Rademacher probe of size ``step * sigma``);
    ``denoised``: ``denoise(y)`` where it was computed already."""
    if sigma <= 0:
        raise ValueError(f"the noise must be positive, got {sigma}")
    probe = torch.randint(0, 2, y.shape, generator=generator, dtype=torch.int64).to(y) * 2 - 1
    eps = step * sigma
    moved = denoise(y + eps * probe) - (denoise(y) if denoised is None else denoised)
    return float((probe * moved).double().mean() / eps)


def sure_weight(y: torch.Tensor, denoised: torch.Tensor, sigma: float, divergence: float) -> float:
    """The blend weight ``w`` in [0, 1] of ``y + w (denoised - y)`` that minimises SURE (module docstring)."""
    residual = float((denoised - y).double().pow(2).mean())
    if residual <= 0 or sigma <= 0:
        return 0.0
    return min(1.0, max(0.0, sigma**2 * (1.0 - divergence) / residual))


def sure_mse(y: torch.Tensor, denoised: torch.Tensor, sigma: float, divergence: float) -> float:
    """SURE's estimate of the mean squared error of ``denoised`` against the noise-free data."""
    residual = float((denoised - y).double().pow(2).mean())
    return residual - sigma**2 + 2 * sigma**2 * divergence
