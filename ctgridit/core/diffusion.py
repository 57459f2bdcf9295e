"""Diffusion through diffusers' schedulers: the DDPM training objective and the
helpers the samplers need (noise levels, previous timesteps, sampler choice).

Training uses a :class:`diffusers.DDPMScheduler` (1000 steps, linear betas,
epsilon prediction: docs/METHOD.md section 3). Sampling uses DDPM or DDIM built from
the same config with a configurable number of steps; timesteps are spaced
``"trailing"`` so that sampling starts at the last training step (pure noise).
Choose step counts that divide the training steps (1000: 10, 20, 25, 50, 100,
...): then every step spans the same number of training steps, and DDIM at
eta 1 and DDPM visit the same timesteps. Nothing here re-implements a scheduler.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

#: Timesteps the models are trained with (DDPM, docs/METHOD.md section 3).
NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("ddpm", "ddim")
#: What the network predicts (diffusers' ``prediction_type``): the noise (the paper's), the clean sample
#: (x0; what a pixel-space transformer with large patches can learn, docs/METHOD.md section 3) or v.
PREDICTIONS = ("epsilon", "sample", "v_prediction")

EpsModel = Callable[..., torch.Tensor]


class SequenceNoise:
    """Standard normal noise that changes smoothly along sequences of frames.

    The frames of a batch are runs of ``sequence_length`` consecutive frames,
    one run per sequence. Draw ``d`` for frame ``k`` of sequence ``s`` is the
    moving average, with Gaussian weights of standard deviation ``correlation_length``
    frames, of independent standard normal fields ``xi(d, s, j)`` for ``j``
    around ``k``, each seeded from ``(seed, d, s, j)``, normalised to unit
    variance. So every frame's noise is standard normal, the noise of frames
    ``h`` apart correlates about ``exp(-h^2 / (4 correlation_length^2))`` (``correlation_length = 2``:
    0.94 for neighbours, 0.11 six frames apart), and sequences are independent.
    It is the middle ground between one noise draw per frame (flicker when each
    frame is sampled on its own) and one per sequence (the same texture in every
    frame: streaks along the sequence axis).

    :meth:`frames` gives the source for a batch holding frames
    ``start .. start + count - 1`` of the whole set; each batch makes its draws
    in the same order (first, second, ...), so the ``d``-th draws of all batches
    join up. Use it wherever a generator goes (:func:`randn_like`); a scheduler
    step takes it as DDIM's ``variance_noise`` (:func:`scheduler_step`).
    """

    def __init__(self, seed: int, sequence_length: int, correlation_length: float) -> None:
        if sequence_length < 1 or not correlation_length > 0:
            raise ValueError(f"need sequence_length >= 1 and correlation_length > 0, "
                             f"got {sequence_length} and {correlation_length}")
        self.seed, self.sequence_length = int(seed), int(sequence_length)
        self.correlation_length = float(correlation_length)
        self.reach = max(1, math.ceil(3 * self.correlation_length))
        weights = torch.exp(-torch.arange(-self.reach, self.reach + 1, dtype=torch.float64) ** 2
                            / (2 * self.correlation_length ** 2))
        self.weights = (weights / weights.square().sum().sqrt()).tolist()   # unit variance after averaging

    def frames(self, start: int, count: int) -> "NoiseDraws":
        return NoiseDraws(self, start, count)

    def field(self, draw: int, sequence: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """``xi(draw, sequence, index)``: one standard normal field of ``shape`` (float32, CPU)."""
        key = hashlib.blake2b(f"{self.seed}:{draw}:{sequence}:{index}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        return torch.randn(shape, generator=g)


class NoiseDraws:
    """The draws of :class:`SequenceNoise` for one batch of frames (see there)."""

    def __init__(self, source: SequenceNoise, start: int, count: int) -> None:
        self.source, self.start, self.count, self.drawn = source, int(start), int(count), 0

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        """The next draw, shaped like ``like`` ``(count, ...)``, on its device and dtype."""
        if like.shape[0] != self.count:
            raise ValueError(f"this noise is for {self.count} frames, asked for {like.shape[0]}")
        src, shape, cache = self.source, tuple(like.shape[1:]), {}
        out = []
        for frame in range(self.start, self.start + self.count):
            sequence, k = divmod(frame, src.sequence_length)
            total = torch.zeros(shape)
            for offset, weight in zip(range(-src.reach, src.reach + 1), src.weights):
                key = (sequence, k + offset)
                if key not in cache:
                    cache[key] = src.field(self.drawn, sequence, k + offset, shape)
                total += weight * cache[key]
            out.append(total)
        self.drawn += 1
        return torch.stack(out).to(device=like.device, dtype=like.dtype)


#: One generator, or one per batch item (diffusers' convention), or smooth noise along sequences, or none.
Generators = torch.Generator | list[torch.Generator] | NoiseDraws | None


def make_train_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4,
                         beta_end: float = 0.02, beta_schedule: str = "linear",
                         clip_sample: bool = False, prediction_type: str = "epsilon") -> DDPMScheduler:
    """The DDPM scheduler of training. ``clip_sample`` clips predicted x0 to [-1, 1]
    when sampling; leave it off for VAE latents (they are not bounded). ``prediction_type``
    (:data:`PREDICTIONS`) says what the model predicts; it travels with the scheduler's
    config into the model folder, so every sampler's step reads the model's output right."""
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction_type!r}")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule=beta_schedule, prediction_type=prediction_type, clip_sample=clip_sample,
                         variance_type="fixed_small")


def make_sample_scheduler(train_scheduler: SchedulerMixin, sampler: str = "ddim", num_steps: int = 50) -> SchedulerMixin:
    """A sampling scheduler (``"ddpm"`` or ``"ddim"``) from the training config, with ``num_steps`` steps set."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    scheduler = cls.from_config(train_scheduler.config, timestep_spacing="trailing")
    total = scheduler.config.num_train_timesteps
    if not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be in 1..{total}, got {num_steps}")
    scheduler.set_timesteps(num_steps)
    return scheduler


def sampling_scheduler(train_scheduler: SchedulerMixin, sampler: str) -> SchedulerMixin:
    """The scheduler a model samples with, made from its training scheduler's noise schedule: ``"ddpm"`` or
    ``"ddim"`` (:data:`SAMPLERS`) with trailing timestep spacing (the last step starts at pure noise)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    return cls.from_config(train_scheduler.config, timestep_spacing="trailing")


def sampler_name(scheduler: SchedulerMixin) -> str:
    """``"ddpm"`` or ``"ddim"`` for those schedulers (:data:`SAMPLERS`); a ValueError for any other (the samplers
    step them as DDPM steps: other schedulers scale their inputs or sigmas differently)."""
    name = {DDPMScheduler: "ddpm", DDIMScheduler: "ddim"}.get(type(scheduler))
    if name is None:
        raise ValueError(f"stage 1 samples with a DDPMScheduler or a DDIMScheduler, got a {type(scheduler).__name__}")
    return name


def previous_timestep(scheduler: SchedulerMixin, timestep: int) -> int:
    """The timestep a scheduler step goes to from ``timestep`` (``-1``: the clean sample).

    The scheduler's own ``previous_timestep`` where it has one (DDPM: the next entry of
    its timesteps, which is not ``t - T // n`` when ``n`` does not divide ``T``), else
    DDIM's rule ``t - T // n``.
    """
    own = getattr(scheduler, "previous_timestep", None)
    if callable(own):
        return int(own(int(timestep)))
    return int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def alpha_bar(scheduler: SchedulerMixin, timestep: int) -> float:
    """Cumulative signal fraction ``abar_t``; ``1`` for ``t < 0`` (the clean sample)."""
    return 1.0 if timestep < 0 else float(scheduler.alphas_cumprod[int(timestep)])


def level_of_noise(scheduler: SchedulerMixin, sigma: float) -> tuple[float, float]:
    """The fractional level ``t`` whose noise-to-signal ratio ``sqrt((1 - abar) / abar)`` is exactly ``sigma``,
    and its ``abar = 1 / (1 + sigma^2)``: ``1 / abar`` interpolated linearly between the scheduler's integer
    steps (exact at them). The networks embed ``t`` with sinusoids, so a level between two steps is one they
    can take; ``sigma`` beyond the last step's ratio is a ValueError."""
    ratio2 = (1.0 / scheduler.alphas_cumprod.double() - 1.0).tolist()       # sigma^2 of each integer step
    s2 = float(sigma) ** 2
    if not 0.0 <= s2 <= ratio2[-1]:
        raise ValueError(f"noise-to-signal ratio {sigma} is outside the scheduler's 0..{ratio2[-1] ** 0.5:.3g}")
    i = sum(r < s2 for r in ratio2)                                         # first step at or above sigma
    low = ratio2[i - 1] if i > 0 else 0.0
    t = (i - 1) + (s2 - low) / (ratio2[i] - low)
    return max(t, 0.0), 1.0 / (1.0 + s2)                                    # below step 0: step 0's embedding


def predicted_clean(scheduler: SchedulerMixin, output: torch.Tensor, x: torch.Tensor, abar: float) -> torch.Tensor:
    """The clean sample a network's ``output`` at signal fraction ``abar`` implies for its input ``x``, by the
    scheduler's ``prediction_type`` (the inverse of :func:`prediction_target`), clipped where the scheduler
    clips."""
    kind = scheduler.config.prediction_type
    a, b = abar ** 0.5, (1.0 - abar) ** 0.5
    if kind == "epsilon":
        clean = (x - b * output) / a
    elif kind == "sample":
        clean = output
    elif kind == "v_prediction":
        clean = a * x - b * output
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {kind!r}")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        clean = clean.clamp(-r, r)
    return clean


def diffuse(scheduler: SchedulerMixin, x: torch.Tensor, to_t: int, from_t: int = -1, noise_std: float = 0.0,
            generator: Generators = None) -> torch.Tensor:
    """Forward diffusion, the one noising formula of the samplers: ``x`` at level ``from_t`` (-1: clean)
    to the noisier level ``to_t``.

    With ``r = abar_to / abar_from`` the result is ``sqrt(r) * x`` plus fresh noise for
    the variance ``1 - r`` that ``x``'s own noise (std ``noise_std``, a noisy input
    counted as part of the level) lacks: ``max(0, 1 - r - r * noise_std^2)``. So
    ``from_t = -1, noise_std = 0`` is the usual ``q(x_t | x_0)``, a later ``from_t``
    RePaint's jump back, and ``noise_std > 0`` the denoiser's start. ``x`` itself
    for ``to_t < 0``.
    """
    if to_t < 0:
        return x
    ratio = alpha_bar(scheduler, to_t) / alpha_bar(scheduler, from_t)
    missing = max(0.0, (1.0 - ratio) - ratio * noise_std ** 2)
    return ratio ** 0.5 * x + missing ** 0.5 * randn_like(x, generator)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` (on the generator's device).

    A list of generators draws item ``i`` of the batch from ``generator[i]``, as
    diffusers' schedulers do (``randn_tensor``): generators seeded alike give the
    items the same noise. :class:`NoiseDraws` gives its next draw.
    """
    if isinstance(generator, NoiseDraws):
        return generator.draw(x)
    return randn_tensor(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)


def scheduler_step(scheduler: SchedulerMixin, eps: torch.Tensor, timestep: int, sample: torch.Tensor,
                   generator: Generators = None) -> torch.Tensor:
    """The scheduler's step from ``timestep``: its ``prev_sample``.

    With :class:`NoiseDraws` the scheduler must be DDIM, and its step noise is the
    next draw (``variance_noise``); DDIM's ``eta`` is then 1, the DDPM sampler
    written as DDIM (same posterior mean and variance). That holds with a
    clipping scheduler (``clip_sample``) only if DDIM re-derives the noise from
    the clipped ``x0`` as DDPM does (``use_clipped_model_output=True``; without it
    the two differ by up to 31 HU on a real slice).
    """
    if isinstance(generator, NoiseDraws):
        if not isinstance(scheduler, DDIMScheduler):
            raise ValueError("noise along sequences needs the DDIM scheduler (at eta 1 it samples as DDPM)")
        return scheduler.step(eps, timestep, sample, eta=1.0, use_clipped_model_output=True,
                              variance_noise=generator.draw(sample)).prev_sample
    return scheduler.step(eps, timestep, sample, generator=generator).prev_sample


def strength_timesteps(scheduler: SchedulerMixin, strength: float = 1.0) -> list[int]:
    """The last ``round(strength * n)`` of the scheduler's ``n`` sampling timesteps (at least one).

    ``strength = 1`` is the whole schedule, from pure noise; smaller values start
    from a less noisy level, as in SDEdit / diffusers' image-to-image pipelines.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    timesteps = [int(t) for t in scheduler.timesteps]
    keep = max(1, min(len(timesteps), round(strength * len(timesteps))))
    return timesteps[len(timesteps) - keep:]


def prediction_target(scheduler: SchedulerMixin, clean: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
    """What the model should output for ``clean`` diffused with ``noise`` to levels ``t``: the scheduler's
    ``prediction_type`` decides (the noise, the clean sample, or diffusers' ``get_velocity``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, t)
    raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {kind!r}")


def snr_weight(scheduler: SchedulerMixin, t: torch.Tensor, min_snr: float | None) -> torch.Tensor | None:
    """Min-SNR-gamma loss weights (Hang et al., 2023) for levels ``t`` ``(B,)``, or None for ``min_snr=None``.

    Whatever the model predicts, the weighted loss is ``min(SNR_t, gamma) * |x0_hat - x0|^2`` up to a
    constant: ``min(SNR, gamma) / SNR`` on the noise, ``min(SNR, gamma)`` on the clean sample,
    ``min(SNR, gamma) / (SNR + 1)`` on v, with ``SNR_t = abar_t / (1 - abar_t)``. So the nearly clean
    levels, where a small error of the clean sample is a large one of the noise, do not dominate.
    """
    if min_snr is None:
        return None
    if not min_snr > 0:
        raise ValueError(f"min_snr must be > 0, got {min_snr}")
    abar = scheduler.alphas_cumprod.to(t.device)[t].double()
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=float(min_snr))
    divisor = {"epsilon": snr, "sample": torch.ones_like(snr), "v_prediction": snr + 1}[scheduler.config.prediction_type]
    return (clipped / divisor).float()


def diffusion_loss(model: EpsModel, scheduler: SchedulerMixin, clean: torch.Tensor, cond: torch.Tensor | None = None,
                   generator: Generators = None, weight: torch.Tensor | None = None,
                   stride: torch.Tensor | None = None, timesteps: tuple[int, int] | None = None,
                   min_snr: float | None = None) -> torch.Tensor:
    """The DDPM objective: MSE between the model's prediction and its target (:func:`prediction_target`:
    the added noise for the paper's epsilon models, the clean sample for x0 models).

    ``clean`` is ``(B, C, H, W)``; timesteps are uniform over the training steps,
    or over ``timesteps = (low, high)`` inclusive (a model for a range of noise
    levels, e.g. the low ones a denoiser meets). ``min_snr``: weight each sample
    by :func:`snr_weight` (None: every level alike).
    ``cond`` and ``stride`` go to the model when given. ``weight`` ``(B or 1, 1,
    H, W)``, if given, says which pixels count (masked conditioning: the cells to
    generate); the loss is the mean over them per sample, then over the batch,
    so every sample (every task) counts alike whatever number of cells it has.
    """
    b = clean.shape[0]
    device = generator.device if generator is not None else clean.device
    low, high = (0, scheduler.config.num_train_timesteps - 1) if timesteps is None else timesteps
    t = torch.randint(low, high + 1, (b,), generator=generator, device=device).to(clean.device)
    eps = randn_like(clean, generator)
    noisy = scheduler.add_noise(clean, eps, t)
    inputs = {k: v for k, v in (("cond", cond), ("stride", stride)) if v is not None}
    pred = model(noisy, t, **inputs)
    error = (pred.float() - prediction_target(scheduler, clean, eps, t).float()) ** 2  # (B, C, H, W)
    if weight is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        weight = weight.float().expand(b, 1, *clean.shape[2:])
        per_sample = (error * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3)) * clean.shape[1]).clamp_min(1)
    levels = snr_weight(scheduler, t, min_snr)
    return per_sample.mean() if levels is None else (per_sample * levels).mean()
