"""An exact model for testing samplers: frame sequences with a known Gaussian distribution.

Frame ``i`` of a grid sits at position ``p_i = s * i`` along the sequence (``s``
the grid's stride) and its pixels are ``x_i = mean_i + u + v * p_i + noise``:
a random level ``u ~ N(0, level^2)``, a random trend ``v ~ N(0, trend^2)`` shared
by all pixels of all frames, and white noise of std ``white`` per pixel (plus,
optionally, an AR(1)-along-the-sequence component of std ``ar`` and neighbour
correlation ``rho``, like the slice-to-slice correlation of CT). So the whole
grid ``x`` (flattened cell by cell) is ``N(mu, Sigma)`` with ``Sigma`` in closed
form, and for a diffused grid ``x_t = sqrt(a) x + sqrt(1 - a) eps``

    E[eps | x_t] = sqrt(1 - a) (a Sigma + (1 - a) I)^-1 (x_t - sqrt(a) mu),

which is the noise predictor a perfectly trained model converges to.
:class:`ExactModel` is that predictor; with ``conditional=True`` it is the
masked-conditional model: ``cond`` holds the clean known cells (zeros elsewhere)
and the cell mask, and the unknown cells get the same formula with the
conditional distribution ``N(mu_U|K, Sigma_U|K)`` given the known cells (Gaussian
conditioning), the known cells the noise they really carry. ``stride`` (a label
per grid, as a stride-aware model gets it) sets the positions ``p_i``.

Everything is float64 and exact; the model is a plain callable with the
signature of :class:`~ctgridit.core.dit.GridDiT`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctgridit.core.grid import tile, untile


@dataclass(frozen=True)
class GaussianSequence:
    """The distribution of a grid of ``rows x cols`` frames of ``(channels, h, w)`` (module docstring)."""

    rows: int = 2
    cols: int = 2
    channels: int = 1
    h: int = 2
    w: int = 2
    level: float = 0.3
    trend: float = 0.3
    white: float = 0.02
    ar: float = 0.0
    rho: float = 0.95
    offset: float = 0.0            # a constant added to every pixel (the prior mean)

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def pixels(self) -> int:
        return self.channels * self.h * self.w

    @property
    def dim(self) -> int:
        return self.cells * self.pixels

    def positions(self, stride: float) -> torch.Tensor:
        return stride * torch.arange(self.cells, dtype=torch.float64)

    def mean(self) -> torch.Tensor:
        return torch.full((self.dim,), self.offset, dtype=torch.float64)

    def covariance(self, stride: float = 1.0) -> torch.Tensor:
        """``Sigma``, ``(D, D)`` for the flattened grid (cell-major: cell, channel, row, column)."""
        p = self.positions(stride)
        frames = self.level ** 2 + self.trend ** 2 * p[:, None] * p[None, :]
        if self.ar > 0:
            frames = frames + self.ar ** 2 * self.rho ** (p[:, None] - p[None, :]).abs()
        ones = torch.ones(self.pixels, self.pixels, dtype=torch.float64)
        return torch.kron(frames, ones) + self.white ** 2 * torch.eye(self.dim, dtype=torch.float64)

    def conditional(self, known_cells: list[int], values: torch.Tensor, stride: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(B, D_U)`` and covariance ``(D_U, D_U)`` of the unknown cells given ``values`` ``(B, D_K)``."""
        sigma, mu = self.covariance(stride), self.mean()
        k, u = self.split(known_cells)
        if not k:
            return mu[u].expand(values.shape[0], -1), sigma[u][:, u]
        s_kk, s_uk = sigma[k][:, k], sigma[u][:, k]
        gain = torch.linalg.solve(s_kk, s_uk.T).T                                   # (D_U, D_K)
        mean = mu[u] + (values.double() - mu[k]) @ gain.T
        return mean, sigma[u][:, u] - gain @ s_uk.T

    def split(self, known_cells: list[int]) -> tuple[list[int], list[int]]:
        """Indices of the flattened grid in the known and in the unknown cells."""
        known = set(known_cells)
        k = [c * self.pixels + j for c in range(self.cells) if c in known for j in range(self.pixels)]
        u = [c * self.pixels + j for c in range(self.cells) if c not in known for j in range(self.pixels)]
        return k, u

    def flatten(self, grid: torch.Tensor) -> torch.Tensor:
        """``(B, c, R*h, C*w)`` grids -> ``(B, D)`` cell-major vectors."""
        return untile(grid, self.rows, self.cols).reshape(grid.shape[0], -1)

    def unflatten(self, flat: torch.Tensor) -> torch.Tensor:
        return tile(flat.reshape(-1, self.cells, self.channels, self.h, self.w), self.rows, self.cols)

    def sample(self, n: int, generator: torch.Generator, stride: float = 1.0) -> torch.Tensor:
        """``n`` grids ``(n, c, R*h, C*w)`` drawn from the distribution (float64)."""
        chol = torch.linalg.cholesky(self.covariance(stride))
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.unflatten(self.mean() + z @ chol.T)


def gaussian_eps(x: torch.Tensor, abar: float, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``E[eps | x_t]`` for ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, ``x0 ~ N(mean, cov)``: ``(B, D)``.

    ``mean`` is ``(D,)`` or ``(B, D)``.
    """
    system = abar * cov + (1 - abar) * torch.eye(cov.shape[0], dtype=torch.float64)
    return (1 - abar) ** 0.5 * torch.linalg.solve(system, (x - abar ** 0.5 * mean).T).T


class GaussianVectorModel:
    """The exact noise predictor of ``N(mean, cov)`` over flattened samples of any shape (plain sampling)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        self.mean, self.cov, self.abar = mean.double(), cov.double(), alphas_cumprod.double()

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = sample.reshape(sample.shape[0], -1).double()
        eps = gaussian_eps(x, float(self.abar[int(timestep[0])]), self.mean, self.cov)
        return eps.reshape(sample.shape).to(sample.dtype)


class ExactModel:
    """``E[eps | x_t]`` of a :class:`GaussianSequence`; see the module docstring.

    ``alphas_cumprod`` are the training scheduler's. ``conditional``: the
    masked-conditional model (``cond`` = clean known cells and the cell mask on
    channels). Calls are counted in ``calls``.
    """

    def __init__(self, dist: GaussianSequence, alphas_cumprod: torch.Tensor, conditional: bool = False) -> None:
        self.dist, self.abar = dist, alphas_cumprod.double()
        self.conditional, self.calls = conditional, 0

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None,
                 stride: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        d, n = self.dist, sample.shape[0]
        x = d.flatten(sample.double())                                               # (B, D)
        t = torch.as_tensor(timestep).expand(n)
        strides = torch.ones(n) if stride is None else torch.as_tensor(stride, dtype=torch.float64).expand(n)
        if bool((strides == 0).any()):
            raise ValueError("the exact model needs the stride of every grid (label 0 given)")
        if self.conditional:
            if cond is None:
                raise ValueError("the conditional exact model needs cond")
            flags = untile(cond[:, d.channels:], d.rows, d.cols)[:, :, 0, 0, 0] > 0.5       # (B, cells)
            values = d.flatten(cond[:, :d.channels].double())
        else:
            if cond is not None:
                raise ValueError("the unconditional exact model takes no cond")
            flags, values = torch.zeros(n, d.cells, dtype=torch.bool), x
        keys = torch.cat([t.view(n, 1).double(), strides.view(n, 1), flags.double()], dim=1)
        groups, which = torch.unique(keys, dim=0, return_inverse=True)
        eps = torch.empty_like(x)
        for g, key in enumerate(groups):
            idx = (which == g).nonzero().flatten()
            a, si = float(self.abar[int(key[0])]), float(key[1])
            known = [c for c in range(d.cells) if key[2 + c] > 0.5]
            k, u = d.split(known)
            mean_u, cov_u = d.conditional(known, values[idx][:, k], si)
            out = torch.empty(len(idx), d.dim, dtype=torch.float64)
            out[:, u] = gaussian_eps(x[idx][:, u], a, mean_u, cov_u)
            if k:
                out[:, k] = (x[idx][:, k] - a ** 0.5 * values[idx][:, k]) / (1 - a) ** 0.5
            eps[idx] = out
        return d.unflatten(eps).to(sample.dtype)
