"""Denoising a frame sequence with a GriDiT model (the paper's Algorithm 3, docs/METHOD.md section 7).

noisy frames -> grids of consecutive frames (stride 1, cells downsampled by
``r``) -> encode -> diffuse to a level ``t1`` -> reverse diffusion with stage 1
-> decode -> frames (bicubic up by ``r``) -> stage 2 per frame -> frames.

Choices the paper leaves open, made here:

- **The level from the noise** (``strength="auto"``). The input already holds
  noise of standard deviation ``sigma`` (estimated by :func:`estimate_noise`,
  in the units of the frames). Scaled by ``sqrt(abar_t)`` it is exactly the
  diffusion noise of level ``t`` when ``sqrt((1 - abar_t) / abar_t) = sigma``, so
  ``t*`` is the smallest level whose noise-to-signal ratio reaches ``sigma``
  (:func:`noise_timestep`): more noise, larger ``t*``. The sample starts at
  ``sqrt(abar) * z_noisy`` plus fresh noise only for the variance still
  missing (:func:`~ctgridit.core.diffusion.diffuse`), so clean structure is not drowned in new
  noise. Stage 1 sees the cells downsampled by ``r`` (less noise: its level is
  estimated on them), stage 2 the full-resolution frames.
- **Stage 2** is conditioned on stage 1's result upsampled by ``r`` (as in
  synthesis) and starts from the noisy full-resolution frame at its own level
  ``t2``, so it restores the detail the input has instead of inventing it.
- **A manual strength** ``s`` in (0, 1] sets ``t1 = round(s * (T - 1))`` and
  ``t2`` from the same ratio of noise levels; fresh noise fills the level.
- **Reverse diffusion** is DDPM over ``min(steps, t + 1)`` evenly spaced
  timesteps from ``t`` to 0 (diffusers' custom timesteps), whatever sampler the
  model synthesises with (DDIM cannot start at an arbitrary level).
- With a latent codec the noise is not additive in the latent, so fresh noise
  fills the whole level (SDEdit) and ``t*`` still follows the rule above.

Grids do not overlap: frames ``4k .. 4k+3`` of a 2 x 2 model share a grid; the
last grid is padded by repeating the last frame.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from diffusers import DDPMScheduler, SchedulerMixin

from ctgridit.core.codecs import LatentCodec, PixelCodec
from ctgridit.core.diffusion import Generators, alpha_bar, diffuse, level_of_noise, predicted_clean
from ctgridit.core.grid import grids_to_sequence, resize_frames, sequence_to_grids
from ctgridit.core.sampler import ProgressCallback, Start, inpaint, phase_callback
from ctgridit.core.settings import PipelineSettings
from ctgridit.errors import CTGridItError, CTGridItWarning

class DenoisingModel(Protocol):
    """What denoising reads of a model: a :class:`~ctgridit.core.pipeline.GriDiTPipeline` has it all (the
    pipeline calls this module, this module never imports the pipeline)."""

    settings: PipelineSettings
    stage1: torch.nn.Module
    stage2: torch.nn.Module | None
    codec: LatentCodec
    scheduler: SchedulerMixin
    device: torch.device
    dtype: torch.dtype
    masked: bool                    # stage 1 is masked-conditional
    max_stride: int                 # the largest stride label stage 1 takes (0: none)


#: Default number of reverse steps of a denoising run (fewer when the level is lower).
DENOISE_STEPS = 1


@dataclass(frozen=True)
class DenoiseLevels:
    """What a denoising run chose: the noise estimates (frame units) and the levels of both stages."""

    sigma_lr: float
    sigma_hr: float
    t1: int
    t2: int


#: Blocks kept by :func:`estimate_noise`: the flattest share (by their other Haar details).
FLAT_SHARE = 0.5
#: At most this many blocks enter the quantile of :func:`estimate_noise` (a fixed, even subsample beyond).
MAX_BLOCKS = 4_000_000


def estimate_noise(frames: torch.Tensor, limit: float = 1.0) -> float:
    """Noise standard deviation of ``(N, C, H, W)`` frames, in their own units.

    Donoho's rule on the flat part of the image: for every 2 x 2 block the Haar
    coefficients ``HH`` (diagonal), ``LH`` and ``HL``; keep the flattest half of
    the blocks (smallest ``LH^2 + HL^2``: no edges) and return the median of
    ``|HH|`` over them divided by 0.6745. For white Gaussian noise the four Haar
    coefficients of a block are independent, so choosing blocks by ``LH, HL``
    does not bias ``HH``: noise of std ``s`` gives ``s``; edges, which raise the
    plain estimate, are mostly left out. Blocks that touch ``+-limit`` (clipped
    values, padding) are left out too: their noise was cut off. On real CT
    slices with added Gaussian noise the estimate is the added noise and the
    scan's own in quadrature, within about 6 % at 50 and 100 HU. No usable
    block gives 0.
    """
    x = frames.float()
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    inside = torch.stack([a, b, c, d]).abs().amax(dim=0) < limit
    diag = ((a - b - c + d) / 2)[inside].abs()
    edges = (((a - b + c - d) / 2) ** 2 + ((a + b - c - d) / 2) ** 2)[inside]
    if diag.numel() == 0:
        return 0.0
    if diag.numel() > MAX_BLOCKS:
        every = -(-diag.numel() // MAX_BLOCKS)
        diag, edges = diag[::every], edges[::every]
    flat = diag[edges <= edges.quantile(FLAT_SHARE)]
    return float(flat.median() / 0.6745)


def noise_timestep(scheduler: SchedulerMixin, sigma: float) -> int:
    """The smallest level ``t`` with ``sqrt((1 - abar_t) / abar_t) >= sigma`` (0 for no noise)."""
    abar = scheduler.alphas_cumprod.double()
    ratio = ((1 - abar) / abar).sqrt()
    return min(int((ratio < sigma).sum()), len(abar) - 1)


def start_level(scheduler: SchedulerMixin, strength: float | str, sigma: float) -> tuple[int, float]:
    """The level ``t*`` a denoising run starts from, and the input's own noise that counts towards it.

    ``"auto"``: the level matching the estimated noise ``sigma`` (:func:`noise_timestep`),
    which is all input noise; a number ``s`` in (0, 1]: ``t* = round(s * (T - 1))``,
    filled with fresh noise (module docstring).
    """
    if strength == "auto":
        return noise_timestep(scheduler, sigma), sigma
    s = float(strength)
    if not 0.0 < s <= 1.0:
        raise ValueError(f"strength must be 'auto' or in (0, 1], got {strength!r}")
    return round(s * (len(scheduler.alphas_cumprod) - 1)), 0.0


def trained_level(scheduler: SchedulerMixin, t: int, strength: float | str, trained: list[int] | None,
                  where: str | None = None) -> int:
    """``t`` where a model trained on diffusion steps ``trained`` (``[low, high]``; None: all) can start from.

    A given strength beyond the last trained step is refused (the model has never seen that much noise and
    would destroy the scan); the level ``"auto"`` chose from the estimated noise is lowered to it, with a
    warning that some noise stays."""
    if trained is None or t <= trained[1]:
        return t
    top = trained[1]
    if strength != "auto":
        raise CTGridItError(f"strength {strength} starts at diffusion step {t}, beyond step {top}, the last this model "
                            f"was trained on", where, f"use at most --strength {top / (len(scheduler.alphas_cumprod) - 1):.3f}, or auto")
    warnings.warn(f"the noise is more than this model was trained to remove (noise-to-signal "
                  f"{timestep_noise(scheduler, t):.3f} against {timestep_noise(scheduler, top):.3f}); it removes "
                  "what it can and some noise stays", CTGridItWarning, stacklevel=3)
    return top


def timestep_noise(scheduler: SchedulerMixin, t: int) -> float:
    """The noise-to-signal ratio ``sqrt((1 - abar_t) / abar_t)`` of level ``t``."""
    a = alpha_bar(scheduler, t)
    return ((1 - a) / a) ** 0.5


def reverse_scheduler(train_scheduler: SchedulerMixin, t: int, steps: int = DENOISE_STEPS) -> DDPMScheduler:
    """A DDPM scheduler from the training config over ``min(steps, t + 1)`` timesteps from ``t`` down to 0."""
    n = max(1, min(steps, t + 1))
    timesteps = sorted({round(t - i * t / max(n - 1, 1)) for i in range(n)} if n > 1 else {t}, reverse=True)
    scheduler = DDPMScheduler.from_config(train_scheduler.config)
    scheduler.set_timesteps(timesteps=timesteps)
    return scheduler


def choose_levels(pipeline: DenoisingModel, frames: torch.Tensor, lr: torch.Tensor, strength: float | str
                  ) -> DenoiseLevels:
    """The levels of both stages for ``frames`` (and their low-resolution ``lr``) at ``strength``."""
    cfg = pipeline.settings
    sigma_lr, sigma_hr = estimate_noise(lr), estimate_noise(frames)
    t1, _ = start_level(pipeline.scheduler, strength, sigma_lr)
    t1 = trained_level(pipeline.scheduler, t1, strength, cfg.timesteps.get("stage1"))
    if strength == "auto":
        t2, _ = start_level(pipeline.scheduler, strength, sigma_hr)
    else:
        ratio = sigma_hr / sigma_lr if sigma_lr > 0 else 1.0
        t2 = noise_timestep(pipeline.scheduler, timestep_noise(pipeline.scheduler, t1) * ratio)
    t2 = trained_level(pipeline.scheduler, t2, strength, cfg.timesteps.get("stage2")) if pipeline.stage2 is not None else t2
    return DenoiseLevels(sigma_lr, sigma_hr, t1, t2)


def denoise_frames(pipeline: DenoisingModel, frames: torch.Tensor, strength: float | str = "auto", num_steps: int = DENOISE_STEPS,
                   generator: Generators = None, progress: ProgressCallback | None = None,
                   levels: DenoiseLevels | None = None) -> tuple[torch.Tensor, DenoiseLevels]:
    """Denoise one sequence of ``(N, C, H, W)`` frames in [-1, 1] at the model's frame size.

    ``strength`` is ``"auto"`` (levels from the estimated noise) or a number in
    (0, 1] (module docstring); ``levels``, those of an earlier run, used as they are (the same denoiser on
    other data: a divergence estimate). Returns the frames (same shape, clamped to [-1, 1]) and the levels used.
    """
    cfg = pipeline.settings
    if frames.ndim != 4 or tuple(frames.shape[1:]) != (cfg.channels, *cfg.frame_size):
        raise ValueError(f"frames must be (N, {cfg.channels}, {cfg.frame_size[0]}, {cfg.frame_size[1]}), "
                         f"got {tuple(frames.shape)}")
    frames = frames.to(pipeline.device, pipeline.dtype)
    lr = resize_frames(frames, cfg.lr_frame_size)
    pixel = isinstance(pipeline.codec, PixelCodec)
    if levels is None:
        levels = choose_levels(pipeline, frames, lr, strength)
    t1, t2 = levels.t1, levels.t2
    own_lr = levels.sigma_lr if strength == "auto" else 0.0
    own_hr = levels.sigma_hr if strength == "auto" and pixel else 0.0

    # stage 1 on grids of consecutive frames
    grids, layout = sequence_to_grids(frames, replace(cfg.grid, stride=1))
    batches = torch.split(grids, cfg.sampling.stage1.max_batch)
    per = len(reverse_scheduler(pipeline.scheduler, t1, num_steps).timesteps)
    out = [denoise_grids(pipeline, batch, t1, own_lr, num_steps, generator,
                         phase_callback(progress, "denoise", i * per, len(batches) * per))
           for i, batch in enumerate(batches)]
    up = grids_to_sequence(torch.cat(out), layout)                          # (N, C, H, W), bicubic up by r
    if pipeline.stage2 is None:
        return up.clamp(-1, 1), levels

    # stage 2 per frame, from the noisy frame, conditioned on stage 1's result
    s2 = reverse_scheduler(pipeline.scheduler, t2, num_steps)
    per = len(s2.timesteps)
    chunks = range(0, len(frames), cfg.sampling.stage2.batch)
    result = []
    for i, first in enumerate(chunks):
        part = slice(first, first + cfg.sampling.stage2.batch)
        cond = pipeline.codec.encode(up[part])
        report = phase_callback(progress, "stage2", i * per, len(chunks) * per)
        z = reverse_from(pipeline.stage2, s2, pipeline.codec.encode(frames[part]), t2, own_hr, generator,
                         inputs={"cond": cond}, callback=report)
        result.append(pipeline.codec.decode(z))
    return torch.cat(result).clamp(-1, 1), levels


def reverse_from(model, scheduler: SchedulerMixin, z: torch.Tensor, t: int, noise_std: float,
                 generator: Generators = None, callback=None, conditional: bool = False,
                 inputs: dict | None = None) -> torch.Tensor:
    """Reverse diffusion of noisy latents ``z`` from level ``t`` (:func:`~ctgridit.core.diffusion.diffuse` them there) to 0 over
    ``scheduler``'s timesteps (:func:`reverse_scheduler`); ``conditional`` and ``inputs`` (cond, stride) go to
    :func:`~ctgridit.core.sampler.inpaint`."""
    start = diffuse(scheduler, z, t, noise_std=noise_std, generator=generator)
    return inpaint(model, scheduler, z, None, start=Start(start, at_level=True), generator=generator,
                   callback=callback, conditional=conditional, inputs=inputs)


def posterior_mean(pipeline: DenoisingModel, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
    """Stage 1's estimate of the clean grids under ``noisy`` pixel grids holding Gaussian noise of std ``sigma``
    (frame units), in one network call at the level whose noise is exactly ``sigma``
    (:func:`~ctgridit.core.diffusion.level_of_noise`, a fractional step): the sample is ``sqrt(abar) * noisy``
    with no fresh noise on top. Rounding the level up to an integer step instead adds fresh noise for the
    difference, 11 HU to 20 HU of input noise and 20 HU to 100 (0.5 dB lost at 20 HU on the held-out scans)."""
    t, abar = level_of_noise(pipeline.scheduler, sigma)
    x = abar ** 0.5 * noisy
    inputs = {"stride": 1} if pipeline.max_stride else {}
    output = pipeline.stage1(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), **inputs)
    return predicted_clean(pipeline.scheduler, output, x, abar)


def denoise_grids(pipeline: DenoisingModel, grids: torch.Tensor, t: int, noise_std: float, steps: int = DENOISE_STEPS,
                  generator: Generators = None, callback=None) -> torch.Tensor:
    """Stage 1 of Algorithm 3 on ``(B, C, R*h, C*w)`` grids of consecutive noisy frames in [-1, 1].

    Encodes them, reverses the diffusion from level ``t`` (the input's own noise,
    of std ``noise_std`` in frame units, counts as part of that level's noise for
    a pixel codec) and decodes: the same grids, denoised.
    """
    scheduler = reverse_scheduler(pipeline.scheduler, t, steps)
    own = noise_std if isinstance(pipeline.codec, PixelCodec) else 0.0
    if own > 0 and len(scheduler.timesteps) == 1 and not pipeline.masked:
        clean = posterior_mean(pipeline, pipeline.codec.encode(grids), min(own, timestep_noise(pipeline.scheduler, t)))
        if callback is not None:
            callback(1, 1)
        return pipeline.codec.decode(clean)
    z = reverse_from(pipeline.stage1, scheduler, pipeline.codec.encode(grids), t, own, generator, callback,
                     conditional=pipeline.masked, inputs={"stride": 1 if pipeline.max_stride else None})
    return pipeline.codec.decode(z)

