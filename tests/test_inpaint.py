"""Grid inpainting (docs/METHOD.md section 6): :func:`inpaint` keeps the known cells exactly and noises them,
at every step, to the level of the *next* model input with fresh noise; SDEdit starts (strength), RePaint
schedules; and the noise it draws: per-item generators, noise that varies slowly along a sequence, and DDIM at
eta 1 with given noise equal to DDPM's step."""

from __future__ import annotations

import math

import pytest
import torch

from ctgridit.core.diffusion import (NoiseDraws, SequenceNoise, make_sample_scheduler, make_train_scheduler,
                                     scheduler_step, strength_timesteps)
from ctgridit.core.grid import cell_mask, untile
from ctgridit.core.sampler import RePaint, Start, inpaint, model_forwards, repaint_schedule
from tests.sampler_fakes import TRAIN, Recorder, tiny_model


def cells_of(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return untile(grid, rows, cols)


# ---------------------------------------------------------------- inpaint
SCHEDULES = [("ddpm", 0, 1), ("ddim", 0, 1), ("ddim", 2, 3), ("ddpm", 3, 2)]


@pytest.mark.parametrize("sampler,jump,times", SCHEDULES)
def test_inpaint_keeps_known_cells_exactly(sampler, jump, times):
    model = Recorder(tiny_model())
    scheduler = make_sample_scheduler(TRAIN, sampler, 8)
    g = torch.Generator().manual_seed(0)
    known = torch.randn(3, 2, 8, 8, generator=g)
    flags = [1, 0, 0, 1]
    mask = cell_mask(flags, 2, 2, 4, 4)
    out = inpaint(model, scheduler, known, mask, generator=torch.Generator().manual_seed(1),
                  repaint=RePaint(jump, times))
    assert out.shape == known.shape
    got, ref = cells_of(out, 2, 2), cells_of(known, 2, 2)
    assert torch.equal(got[:, [0, 3]], ref[:, [0, 3]])          # bit for bit
    for cell in (1, 2):
        assert torch.isfinite(got[:, cell]).all()
        assert not torch.equal(got[:, cell], ref[:, cell])
        assert (got[:, cell] - ref[:, cell]).abs().max() > 1e-3
    assert len(model.batches) == model_forwards(8, jump, times)
    if jump:
        assert len(model.batches) > 8                            # resampling really happened


def test_inpaint_without_mask_is_plain_sampling():
    model = Recorder(tiny_model())
    scheduler = make_sample_scheduler(TRAIN, "ddim", 5)
    shape_only = torch.full((2, 2, 8, 8), 7.0)
    out = inpaint(model, scheduler, shape_only, None, generator=torch.Generator().manual_seed(0))
    assert out.shape == shape_only.shape and torch.isfinite(out).all()
    assert not torch.isclose(out, shape_only).any()
    assert model.batches == [2] * 5


def known_levels(sampler: str, num_steps: int, clean: torch.Tensor, mask: torch.Tensor, jump: int = 0,
                 times: int = 1):
    """Run inpaint with a recording model; return the recorded inputs, timesteps and the mask as bool."""
    model = Recorder(lambda x, t: 0.1 * x, keep=True)
    scheduler = make_sample_scheduler(TRAIN, sampler, num_steps)
    inpaint(model, scheduler, clean, mask, generator=torch.Generator().manual_seed(3),
            repaint=RePaint(jump, times))
    return model.inputs, [int(t[0]) for t in model.timesteps], mask.expand_as(clean).bool()


@pytest.mark.parametrize("sampler,num_steps", [("ddim", 10), ("ddpm", 10), ("ddpm", 7)])
def test_known_cells_are_at_the_level_of_the_next_model_input(sampler, num_steps):
    """With a huge clean value the known region's level ``sqrt(abar)`` can be read off to 1e-4.

    The known part fed to the model at label ``t`` must be at ``abar_t`` (so after the step
    ``t -> t'`` it is at ``abar_t'``, not at ``abar_t`` as in the reference implementation).
    ``ddpm`` with 7 steps (7 does not divide 1000) checks the scheduler's real next timestep is used.
    """
    g = torch.Generator().manual_seed(0)
    clean = 1e4 + torch.randn(2, 4, 64, 64, generator=g)
    mask = cell_mask([1, 1, 0, 0], 2, 2, 32, 32)
    inputs, labels, known = known_levels(sampler, num_steps, clean, mask)
    assert labels == [int(t) for t in make_sample_scheduler(TRAIN, sampler, num_steps).timesteps]
    z = clean[known].double()
    for x, t in zip(inputs, labels):
        sqrt_a = (x[known].double() * z).sum() / (z * z).sum()
        expected = TRAIN.alphas_cumprod[t].double().sqrt()
        assert abs(sqrt_a / expected - 1) < 1e-3, (t, float(sqrt_a), float(expected))


@pytest.mark.parametrize("sampler,jump,times", [("ddim", 0, 1), ("ddpm", 0, 1), ("ddim", 2, 2)])
def test_known_cells_get_fresh_standard_noise(sampler, jump, times):
    """``x_known = sqrt(abar_t) z + sqrt(1 - abar_t) eps``: eps is N(0, 1) and new at every step."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 4, 64, 64, generator=g)
    mask = cell_mask([1, 1, 0, 0], 2, 2, 32, 32)
    inputs, labels, known = known_levels(sampler, 10, clean, mask, jump, times)
    z = clean[known]
    eps = []
    for x, t in zip(inputs, labels):
        a = float(TRAIN.alphas_cumprod[t])
        e = (x[known] - a ** 0.5 * z) / (1 - a) ** 0.5
        assert abs(float(e.mean())) < 0.05, t
        assert abs(float(e.std()) - 1) < 0.03, t
        eps.append(e)
    assert len(eps) == model_forwards(10, jump, times)
    for i in range(len(eps)):
        for j in range(i + 1, len(eps)):
            corr = float(torch.corrcoef(torch.stack([eps[i], eps[j]]))[0, 1])
            assert abs(corr) < 0.05, (i, j, corr)             # fresh noise at every step


# ------------------------------------------------------------ SDEdit start and shared noise
@pytest.mark.parametrize("sampler,steps,strength,kept", [("ddpm", 10, 1.0, 10), ("ddpm", 10, 0.5, 5),
                                                         ("ddim", 50, 0.3, 15), ("ddpm", 10, 0.01, 1)])
def test_strength_keeps_the_last_part_of_the_schedule(sampler, steps, strength, kept):
    scheduler = make_sample_scheduler(TRAIN, sampler, steps)
    timesteps = strength_timesteps(scheduler, strength)
    assert timesteps == [int(t) for t in scheduler.timesteps][steps - kept:]


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_strength_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="strength"):
        strength_timesteps(make_sample_scheduler(TRAIN, "ddpm", 10), bad)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpaint_from_init_starts_at_the_level_of_its_first_step(sampler):
    """SDEdit: the first model input is ``init`` diffused to the first kept level, and only those steps run."""
    g = torch.Generator().manual_seed(0)
    init = 1e4 + torch.randn(2, 2, 8, 8, generator=g)
    model = Recorder(lambda x, t: 0.1 * x, keep=True)
    scheduler = make_sample_scheduler(TRAIN, sampler, 10)
    inpaint(model, scheduler, torch.zeros_like(init), None, start=Start(init, 0.4), generator=g)
    labels = [int(t[0]) for t in model.timesteps]
    assert labels == [int(t) for t in scheduler.timesteps][6:]
    x = model.inputs[0].double()
    sqrt_a = (x * init).sum() / (init.double() ** 2).sum()
    assert abs(sqrt_a / TRAIN.alphas_cumprod[labels[0]].double().sqrt() - 1) < 1e-3


def test_inpaint_with_low_strength_stays_near_init_and_needs_one():
    model = tiny_model()
    init = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    scheduler = make_sample_scheduler(TRAIN, "ddpm", 50)
    g = torch.Generator().manual_seed(2)
    near = inpaint(model, scheduler, init, None, start=Start(init, 0.04), generator=g)
    far = inpaint(model, scheduler, init, None, start=Start(init, 1.0), generator=g)
    assert (near - init).abs().mean() < 0.25 * (far - init).abs().mean()
    with pytest.raises(ValueError, match="latent"):
        Start(None, 0.5)


def test_inpaint_passes_only_the_inputs_a_model_takes():
    model, scheduler, x = tiny_model(), make_sample_scheduler(TRAIN, "ddim", 2), torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="strides"):
        inpaint(model, scheduler, x, None, inputs={"strides": 3})              # a typo is not passed on silently
    with pytest.raises(ValueError, match="do not pass cond"):
        inpaint(model, scheduler, x, None, conditional=True, inputs={"cond": x})


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generators_seeded_alike_give_batch_items_the_same_noise(sampler):
    """A list of generators (diffusers' convention) reaches the initial noise and every scheduler step."""
    model = tiny_model()
    scheduler = make_sample_scheduler(TRAIN, sampler, 5)
    shape = torch.zeros(3, 2, 8, 8)
    same = inpaint(model, scheduler, shape, None, generator=[torch.Generator().manual_seed(7) for _ in range(3)])
    assert torch.allclose(same[0], same[1], atol=1e-5) and torch.allclose(same[0], same[2], atol=1e-5)
    other = inpaint(model, scheduler, shape, None, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    assert torch.allclose(other[0], same[0], atol=1e-5)
    assert not torch.allclose(other[1], other[0], atol=1e-2)


# ------------------------------------------------------------ schedules
@pytest.mark.parametrize("num_steps,jump,times", [(1, 0, 1), (10, 0, 5), (10, 3, 1), (10, 2, 3), (25, 5, 4),
                                                  (7, 3, 2), (4, 10, 3), (50, 10, 10)])
def test_repaint_schedule_walk(num_steps, jump, times):
    walk = repaint_schedule(num_steps, jump, times)
    assert walk[0] == 0 and walk[-1] == num_steps
    assert all(abs(b - a) == 1 for a, b in zip(walk, walk[1:]))
    assert min(walk) >= 0 and max(walk) == num_steps and walk.count(num_steps) == 1
    forwards = sum(1 for a, b in zip(walk, walk[1:]) if b > a)
    assert forwards == model_forwards(num_steps, jump, times)
    if jump <= 0 or times <= 1:
        assert walk == list(range(num_steps + 1))
    else:
        jumps = len(range(jump, num_steps, jump))
        assert forwards == num_steps + (times - 1) * jump * jumps
        assert sum(1 for a, b in zip(walk, walk[1:]) if b < a) == (times - 1) * jump * jumps



# ------------------------------------------------ noise along sequences
def test_sequence_noise_is_standard_and_correlates_by_distance():
    noise = SequenceNoise(seed=3, sequence_length=60, correlation_length=2.0)
    x = noise.frames(0, 120).draw(torch.zeros(120, 1, 32, 32)).flatten(1)          # two sequences of 60
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02

    def corr(i, j):
        return float(torch.corrcoef(torch.stack([x[i], x[j]]))[0, 1])

    for lag, expected in [(1, math.exp(-1 / 16)), (3, math.exp(-9 / 16)), (6, math.exp(-36 / 16)), (20, 0.0)]:
        measured = sum(corr(k, k + lag) for k in range(10, 30)) / 20
        assert abs(measured - expected) < 0.06, (lag, measured, expected)
    assert abs(sum(corr(59 - k, 60 + k) for k in range(5)) / 5) < 0.06         # the next sequence: independent


def test_sequence_noise_joins_up_across_batches_and_is_seeded():
    like = torch.zeros(20, 2, 4, 4)
    whole = SequenceNoise(seed=1, sequence_length=10, correlation_length=1.5).frames(0, 20)
    first, again = whole.draw(like), whole.draw(like)                             # draws 0 and 1
    assert not torch.allclose(first, again)
    a, b = SequenceNoise(1, 10, 1.5).frames(0, 7), SequenceNoise(1, 10, 1.5).frames(7, 13)
    for expected in (first, again):                                              # batch by batch, draw by draw
        torch.testing.assert_close(torch.cat([a.draw(like[:7]), b.draw(like[7:])]), expected)
    assert not torch.allclose(SequenceNoise(2, 10, 1.5).frames(0, 20).draw(like), first)
    with pytest.raises(ValueError, match="for 20 frames"):
        whole.draw(like[:3])
    with pytest.raises(ValueError, match="length > 0"):
        SequenceNoise(1, 10, 0.0)


class GivenNoise(NoiseDraws):
    """NoiseDraws that hand out fixed tensors, to compare scheduler_step with DDPM's own step."""

    def __init__(self, *draws: torch.Tensor):
        super().__init__(SequenceNoise(0, 1, 1.0), 0, draws[0].shape[0])
        self.draws = list(draws)

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        return self.draws.pop(0)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_at_eta_1_with_given_noise_is_the_ddpm_step(clip):
    """scheduler_step with noise along sequences runs DDIM at eta 1; with DDPM's own noise it equals DDPM's
    step, with a clipping scheduler too (x0 beyond [-1, 1] here, so clipping acts at every step)."""
    train = make_train_scheduler(clip_sample=clip)
    ddpm, ddim = make_sample_scheduler(train, "ddpm", 10), make_sample_scheduler(train, "ddim", 10)
    assert list(ddpm.timesteps) == list(ddim.timesteps)
    g = torch.Generator().manual_seed(0)
    x, eps = 3 * torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    worst_unclipped = 0.0
    for t in [int(t) for t in ddpm.timesteps[:-1]]:                              # the last step adds no noise
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        expected = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        got = scheduler_step(ddim, eps, t, x, GivenNoise(z))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        plain = ddim.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample     # without use_clipped_model_output
        worst_unclipped = max(worst_unclipped, float((plain - expected).abs().max()))
    assert (worst_unclipped > 0.05) == clip, worst_unclipped
    draws = SequenceNoise(0, 3, 1.0).frames(0, 3)
    assert not torch.allclose(scheduler_step(ddim, eps, 500, x, draws), ddim.step(eps, 500, x).prev_sample)
    with pytest.raises(ValueError, match="needs the DDIM scheduler"):
        scheduler_step(ddpm, eps, 500, x, draws)
