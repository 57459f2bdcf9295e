"""The grid sampler against exact models of Gaussian sequences (``tests/gaussian_model.py``).

With the exact noise predictor of a known Gaussian, what a sampler *should*
produce is known in closed form: the conditional distribution of the unknown
cells given the known ones. These tests check

- that the masked-conditional sampler produces it: the mean exactly (any
  number of steps; tolerance from the Monte-Carlo error), and the variance of
  sampling that conditional distribution directly with the same scheduler (the
  variance a few-step sampler loses is the scheduler's, not the inpainting's),
  which with all 1000 steps is the true variance;
- that the paper's replacement inpainting does not (the bias docs/synthesis.md states);
- that hierarchical sampling puts frames in order, evenly spaced, moving at the
  right speed, at every level, for 2 x 2 and 4 x 4 grids, and that the paper's
  4 x 4 chunks of a row do not.
"""

from __future__ import annotations

import pytest
import torch

from ctgridit.core.conditioning import known_cells
from ctgridit.core.diffusion import make_sample_scheduler, make_train_scheduler
from ctgridit.core.grid import cell_mask, tile, untile
from ctgridit.core.sampler import RePaint, inpaint, plan_sequence, sample_sequence
from tests.gaussian_model import ExactModel, GaussianSequence, GaussianVectorModel, gaussian_eps

TRAIN = make_train_scheduler()                 # no clipping: the Gaussian is unbounded
ABAR = TRAIN.alphas_cumprod
#: CT-like: a level, a slow trend and an AR(1) part with neighbour correlation 0.95, plus white noise,
#: around a mean of 0.3.
CT_LIKE = dict(level=0.5, trend=0.1, white=0.1, ar=0.3, rho=0.95, offset=0.3)
GRIDS = {"2x2": dict(rows=2, cols=2, h=1, w=2), "4x4": dict(rows=4, cols=4, h=1, w=1)}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def conditional_run(grid: str, task: str, sampler: str, steps: int, conditional: bool, batch: int = 3000):
    """Inpaint ``batch`` copies of one context drawn from the distribution; return the unknown cells
    ``(B, D_U)``, the true conditional mean ``(D_U,)`` and covariance, and the scheduler."""
    dist = GaussianSequence(**GRIDS[grid], **CT_LIKE)
    flags = known_cells(task, dist.rows, dist.cols)
    known = [c for c, f in enumerate(flags) if f]
    k, u = dist.split(known)
    context = dist.sample(1, seeded(0))
    mean, cov = dist.conditional(known, dist.flatten(context)[:, k])
    scheduler = make_sample_scheduler(TRAIN, sampler, steps)
    model = ExactModel(dist, ABAR, conditional=conditional)
    mask = cell_mask(flags, dist.rows, dist.cols, dist.h, dist.w).double()
    out = inpaint(model, scheduler, context.expand(batch, -1, -1, -1), mask, conditional=conditional,
                  generator=seeded(1))
    assert torch.equal(dist.flatten(out)[:, k], dist.flatten(context)[:, k].expand(batch, -1))   # pasted exactly
    assert model.calls == steps                                                             # one forward a step
    return dist.flatten(out)[:, u], mean[0], cov, scheduler


def direct_variance(mean: torch.Tensor, cov: torch.Tensor, scheduler, batch: int) -> torch.Tensor:
    """Per-dimension variance of sampling ``N(mean, cov)`` directly (nothing known) with ``scheduler``."""
    model = GaussianVectorModel(mean, cov, ABAR)
    out = inpaint(model, scheduler, torch.zeros(batch, len(mean), dtype=torch.float64), None, generator=seeded(2))
    return out.var(dim=0)


def mean_error(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """The largest deviation of the sample mean from ``mean``, in Monte-Carlo standard errors."""
    return float(((samples.mean(dim=0) - mean).abs() / (cov.diagonal() / len(samples)).sqrt()).max())


def variance_tolerance(batch: int, sigmas: float = 4.0) -> float:
    """Relative tolerance of the ratio of two independent sample variances of ``batch`` Gaussian draws."""
    return sigmas * (2 * 2 / (batch - 1)) ** 0.5


# ---------------------------------------------------------------- the harness
def test_exact_model_is_the_conditional_mean_of_the_noise():
    """Its prediction error is uncorrelated with x_t (the orthogonality that defines E[eps | x_t]), and
    the conditional model of nothing known is the unconditional one."""
    dist = GaussianSequence(**GRIDS["2x2"], **CT_LIKE)
    model, g = ExactModel(dist, ABAR), seeded(0)
    x0 = dist.sample(40000, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for t in (10, 300, 900):
        a = float(ABAR[t])
        xt = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
        error = dist.flatten(model(xt, torch.tensor([t])) - eps)
        centred = dist.flatten(xt) - dist.flatten(xt).mean(dim=0)
        cross = error.T @ centred / len(error)                                  # (D, D): should be 0
        assert float(cross.abs().max()) < 4 * float(error.std() * centred.std()) / len(error) ** 0.5
        assert float(error.mean(dim=0).abs().max()) < 4 / len(error) ** 0.5
        conditional = ExactModel(dist, ABAR, conditional=True)
        empty = torch.zeros(len(xt), dist.channels + 1, *xt.shape[2:], dtype=torch.float64)
        torch.testing.assert_close(conditional(xt[:50], torch.tensor([t]), cond=empty[:50]), model(xt[:50], torch.tensor([t])))


def test_gaussian_eps_of_a_point_mass_is_the_added_noise():
    x0, eps, a = torch.tensor([[0.3, -0.2]]), torch.tensor([[1.5, 0.5]]), 0.6
    xt = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    got = gaussian_eps(xt.double(), a, x0[0].double(), 1e-12 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(got, eps.double())


# ------------------------------------------------ masked-conditional sampling
@pytest.mark.parametrize("grid", ["2x2", "4x4"])
@pytest.mark.parametrize("task", ["extension", "interpolation"])
@pytest.mark.parametrize("sampler,steps", [("ddpm", 10), ("ddim", 10), ("ddpm", 50), ("ddim", 50)])
def test_masked_conditional_sampling_gives_the_true_conditional(grid, task, sampler, steps):
    samples, mean, cov, scheduler = conditional_run(grid, task, sampler, steps, conditional=True)
    assert mean_error(samples, mean, cov) < 4.5
    ratio = samples.var(dim=0) / direct_variance(mean, cov, scheduler, len(samples))
    tol = variance_tolerance(len(samples))
    assert float((ratio - 1).abs().max()) < tol, ratio


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_with_all_steps_the_variance_is_the_true_one(sampler):
    samples, mean, cov, _ = conditional_run("2x2", "interpolation", sampler, 1000, conditional=True, batch=2000)
    assert mean_error(samples, mean, cov) < 4.5
    ratio = samples.var(dim=0) / cov.diagonal()
    # Monte-Carlo error, and the last step (t = 0, noise 0.01) that returns the posterior mean: about 1 %
    assert float((ratio - 1).abs().max()) < variance_tolerance(len(samples)) / 2 ** 0.5 + 0.02, ratio


# --------------------------------------------- the paper's replacement inpainting
@pytest.mark.parametrize("grid,task", [("2x2", "extension"), ("2x2", "interpolation"), ("4x4", "extension")])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_replacement_inpainting_misses_the_conditional(grid, task, sampler):
    """The known bias of the paper's mode (kept as an option): far from the conditional mean, too wide."""
    samples, mean, cov, scheduler = conditional_run(grid, task, sampler, 10, conditional=False)
    assert mean_error(samples, mean, cov) > 10
    assert float((samples.var(dim=0) / direct_variance(mean, cov, scheduler, len(samples))).min()) > 1.5


RAMP = GaussianSequence(rows=2, cols=2, h=2, w=2, level=1.0, trend=1.0, white=0.02)


def ramp_new_cells(conditional: bool, sampler: str = "ddpm", steps: int = 50, jump: int = 0, times: int = 1):
    """The mean of the two new cells when the known row of a ramp is 0 and 0.15 (truth: 0.30 and 0.45)."""
    cells = torch.tensor([0.0, 0.15, 0.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1, 1).expand(2000, 4, 1, 2, 2)
    mask = cell_mask([1, 1, 0, 0], 2, 2, 2, 2).double()
    model = ExactModel(RAMP, ABAR, conditional=conditional)
    out = inpaint(model, make_sample_scheduler(TRAIN, sampler, steps), tile(cells, 2, 2), mask,
                  conditional=conditional, generator=seeded(0), repaint=RePaint(jump, times))
    return untile(out, 2, 2)[:, 2:].mean(dim=(0, 2, 3, 4)).tolist()


def test_a_ramp_continues_with_masked_conditioning_and_not_with_replacement():
    """A ramp continues: the masked-conditional sampler gives 0.30 and 0.45, replacement loses the trend.

    ``python -m pipelines.exact_sampler_bias`` prints the whole table (docs/synthesis.md).
    """
    known = [c for c in range(4) if c < 2]
    truth, _ = RAMP.conditional(known, torch.tensor([[0.0] * 4 + [0.15] * 4], dtype=torch.float64))
    assert torch.allclose(truth.view(2, 4).mean(dim=1), torch.tensor([0.30, 0.45], dtype=torch.float64), atol=1e-3)
    conditional = ramp_new_cells(True)
    assert abs(conditional[0] - 0.30) < 0.01 and abs(conditional[1] - 0.45) < 0.01, conditional
    replaced = ramp_new_cells(False)
    assert replaced[0] < 0.15 and replaced[1] < 0.2, replaced              # about the level of the known row
    ddim = ramp_new_cells(False, "ddim")
    assert ddim[1] < replaced[1]                                           # DDIM is worse than DDPM


# ------------------------------------------------- order and speed of the frames
SLOPE = GaussianSequence(level=2.0, trend=0.2, white=0.001)                # a line per sequence, slope ~ N(0, 0.2^2)


def line_fit(sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a line to each ``(B, N, ...)`` sequence of frames; return slopes ``(B,)`` and residual RMS ``(B,)``."""
    y = sequence.flatten(2).mean(dim=2).double()                           # (B, N)
    i = torch.arange(y.shape[1], dtype=torch.float64)
    ic = i - i.mean()
    slope = ((y - y.mean(dim=1, keepdim=True)) * ic).sum(dim=1) / (ic * ic).sum()
    residual = y - y.mean(dim=1, keepdim=True) - slope[:, None] * ic
    return slope, residual.pow(2).mean(dim=1).sqrt()


SLOPE_STEPS = 50


def line_model(rows: int, cols: int) -> ExactModel:
    dist = GaussianSequence(rows=rows, cols=cols, h=1, w=1, level=SLOPE.level, trend=SLOPE.trend, white=SLOPE.white)
    return ExactModel(dist, ABAR, conditional=True)


def sample_lines(rows: int, cols: int, levels: int, num_frames: int, chunk: int | None = None,
                 strides: bool = True, batch: int = 64) -> torch.Tensor:
    max_stride = 300 if strides else 0
    return sample_sequence(line_model(rows, cols), make_sample_scheduler(TRAIN, "ddpm", SLOPE_STEPS),
                           plan_sequence(num_frames, rows, cols, levels=levels, chunk=chunk), frame_shape=(1, 1, 1),
                           batch_size=batch, max_batch=64, conditional=True, max_stride=max_stride,
                           generator=seeded(levels), dtype=torch.float64)


def grid_slope_std(rows: int, cols: int, stride: int, batch: int = 2000) -> float:
    """The std of the slope (per output frame) of single grids at ``stride`` from the same scheduler: the
    slope a sequence inherits from its first grid (a few-step sampler makes it a little smaller than the
    distribution's, 0.88x at 50 DDPM steps)."""
    grid = inpaint(line_model(rows, cols), make_sample_scheduler(TRAIN, "ddpm", SLOPE_STEPS),
                   torch.zeros(batch, 1, rows, cols, dtype=torch.float64), None, conditional=True, inputs={"stride": stride},
                   generator=seeded(9))
    return float(line_fit(untile(grid, rows, cols))[0].std()) / stride


@pytest.mark.parametrize("rows,cols,levels,num_frames,strides", [
    (2, 2, 0, 40, [1]), (2, 2, 1, 61, [3, 1]), (2, 2, 2, 201, [9, 3, 1]), (4, 4, 0, 40, [1]),
    (4, 4, 1, 201, [15, 1])])
def test_hierarchical_frames_are_in_order_evenly_spaced_and_at_speed(rows, cols, levels, num_frames, strides):
    """Every sequence is a straight line (frames of every level in order and evenly spaced: residuals at
    the white-noise level) with the slope its first grid has (not a third of it, as when extension frames
    are taken for neighbours): the std of the slopes over 64 sequences is that of single grids at the
    coarse stride (Monte-Carlo error about 9 %)."""
    plan = plan_sequence(num_frames, rows, cols, levels=levels)
    assert plan.levels == levels and plan.strides == strides
    frames = sample_lines(rows, cols, levels, num_frames)
    assert frames.shape == (64, num_frames, 1, 1, 1)
    slope, residual = line_fit(frames)
    assert float(residual.max()) < 5 * SLOPE.white, residual
    expected = grid_slope_std(rows, cols, strides[0])
    assert 0.7 * SLOPE.trend < expected <= 1.05 * SLOPE.trend
    assert 0.7 < float(slope.std()) / expected < 1.3, (float(slope.std()), expected)


def test_without_stride_labels_the_levels_disagree_on_speed():
    """The failure stride labels remove: a model that takes every grid for consecutive frames makes
    step 1 move a third as fast, so the sequence is still a line but at a third of the speed."""
    slope, residual = line_fit(sample_lines(2, 2, 1, 61, strides=False))
    assert float(residual.max()) < 5 * SLOPE.white
    assert float(slope.std()) < 0.5 * grid_slope_std(2, 2, 1), float(slope.std())


def test_the_papers_4x4_chunks_of_a_row_go_back_at_every_chunk():
    """Chunks of 4 frames (a row), 8 new frames between: not in order (docs/METHOD.md section 6)."""
    frames = sample_lines(4, 4, 1, 40, chunk=4, strides=False)
    y = frames.flatten(2).mean(dim=2)
    steps = (y[:, 1:] - y[:, :-1]) / line_fit(frames)[0][:, None]          # in units of the mean step
    backwards = (steps < -0.25).float().mean(dim=0)                          # (N-1,) share of sequences
    assert float(backwards.max()) > 0.9                                      # some steps go back in nearly all
    assert float(line_fit(frames)[1].median()) > 20 * SLOPE.white
