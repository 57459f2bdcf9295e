"""What a model predicts (the noise, the clean sample or v) and the Min-SNR loss weights.

The target and the weights are checked exactly with oracles that know the clean
sample and the noise; that a sampler reads a clean-sample model right is checked
against the exact Gaussian model (``tests/gaussian_model.py``): the same
predictor written as x0 instead of the noise must give the same samples, up to
the schedulers' float32 rounding, with DDPM and DDIM and with known cells.
"""

from __future__ import annotations

import pytest
import torch

from ctgridit.core.conditioning import known_cells
from ctgridit.core.diffusion import (
    PREDICTIONS,
    diffusion_loss,
    make_sample_scheduler,
    make_train_scheduler,
    snr_weight,
)
from ctgridit.core.grid import cell_mask
from ctgridit.core.sampler import inpaint
from tests.gaussian_model import ExactModel, GaussianSequence


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Oracle:
    """A model that knows ``clean`` and answers with ``x0 = clean + error`` in the scheduler's prediction type."""

    def __init__(self, scheduler, clean: torch.Tensor, error: torch.Tensor | None = None) -> None:
        self.scheduler, self.clean = scheduler, clean
        self.error = torch.zeros_like(clean) if error is None else error

    def __call__(self, noisy: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        abar = self.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        x0 = self.clean.double() + self.error.double()
        eps = (noisy.double() - abar.sqrt() * x0) / (1 - abar).sqrt()
        kind = self.scheduler.config.prediction_type
        out = {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[kind]
        return out.to(noisy.dtype)


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_a_perfect_model_has_zero_loss_whatever_it_predicts(kind):
    train = make_train_scheduler(prediction_type=kind)
    clean = torch.rand(6, 1, 8, 8, generator=seeded(0), dtype=torch.float64) * 2 - 1
    for min_snr in (None, 5.0):
        loss = diffusion_loss(Oracle(train, clean), train, clean, generator=seeded(1), min_snr=min_snr)
        assert float(loss) < 1e-12
    wrong = make_train_scheduler(prediction_type=next(k for k in PREDICTIONS if k != kind))
    assert float(diffusion_loss(Oracle(wrong, clean), train, clean, generator=seeded(1))) > 1e-3


def test_min_snr_weights_the_clean_sample_error_alike_for_every_prediction():
    """With Min-SNR weights the loss is ``min(SNR, gamma) |x0_hat - x0|^2`` whatever the model predicts;
    without, the noise loss is ``SNR |x0_hat - x0|^2`` (the nearly clean levels dominate)."""
    clean = torch.rand(64, 1, 4, 4, generator=seeded(0), dtype=torch.float64) * 2 - 1
    error = 0.01 * torch.randn(64, 1, 4, 4, generator=seeded(3), dtype=torch.float64)
    losses = {}
    for kind in PREDICTIONS:
        train = make_train_scheduler(prediction_type=kind)
        losses[kind] = float(diffusion_loss(Oracle(train, clean, error), train, clean, generator=seeded(1),
                                            min_snr=5.0))
    # the same levels are drawn for every kind (same generator), so the three must agree
    assert losses["sample"] == pytest.approx(losses["epsilon"], rel=1e-5)
    assert losses["sample"] == pytest.approx(losses["v_prediction"], rel=1e-5)
    t = torch.randint(0, 1000, (64,), generator=seeded(1))
    abar = make_train_scheduler().alphas_cumprod.double()[t]
    expected = ((abar / (1 - abar)).clamp(max=5.0) * error.square().mean(dim=(1, 2, 3))).mean()
    assert losses["sample"] == pytest.approx(float(expected), rel=1e-5)
    weights = snr_weight(make_train_scheduler(prediction_type="epsilon"), torch.tensor([0, 999]), 5.0)
    assert float(weights[0]) < 1e-3 and float(weights[1]) == pytest.approx(1.0)   # nearly clean levels count less
    assert snr_weight(make_train_scheduler(), t, None) is None
    with pytest.raises(ValueError, match="prediction_type"):
        make_train_scheduler(prediction_type="x0")


class AsSample:
    """:class:`ExactModel` answering with its clean-sample estimate instead of the noise."""

    def __init__(self, model: ExactModel, abar: torch.Tensor) -> None:
        self.model, self.abar = model, abar.double()

    def __call__(self, sample, timestep, **inputs):
        eps = self.model(sample, timestep, **inputs)
        a = self.abar[torch.as_tensor(timestep)].view(-1, 1, 1, 1) if torch.as_tensor(timestep).ndim else \
            self.abar[int(timestep)]
        return (sample - (1 - a).sqrt() * eps) / a.sqrt()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_read_a_clean_sample_model_from_the_scheduler(sampler):
    """An x0 model sampled with an x0 scheduler gives what the same model as a noise predictor gives."""
    dist = GaussianSequence(rows=2, cols=2, h=1, w=2, level=0.5, trend=0.1, white=0.1, ar=0.3, rho=0.95,
                            offset=0.3)
    flags = known_cells("interpolation", dist.rows, dist.cols)
    mask = cell_mask(flags, dist.rows, dist.cols, dist.h, dist.w).double()
    context = dist.sample(8, seeded(0))
    runs = {}
    for kind in ("epsilon", "sample"):
        train = make_train_scheduler(prediction_type=kind)
        scheduler = make_sample_scheduler(train, sampler, 20)
        exact = ExactModel(dist, train.alphas_cumprod, conditional=True)
        model = exact if kind == "epsilon" else AsSample(exact, train.alphas_cumprod)
        runs[kind] = inpaint(model, scheduler, context, mask, conditional=True, generator=seeded(1))
    # equal up to the float32 constants diffusers' schedulers compute with (2.5e-8 here)
    assert torch.allclose(runs["sample"], runs["epsilon"], atol=1e-6, rtol=0)
    wrong = inpaint(AsSample(ExactModel(dist, make_train_scheduler().alphas_cumprod, conditional=True),
                             make_train_scheduler().alphas_cumprod),
                    make_sample_scheduler(make_train_scheduler(), sampler, 20), context, mask, conditional=True,
                    generator=seeded(1))
    assert (wrong - runs["epsilon"]).abs().max() > 0.1          # an x0 model read as noise is not the same
