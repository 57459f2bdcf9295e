"""Grid-based autoregressive sampling (GRIDIT.md section 6).

One primitive does all the work, :func:`inpaint`: reverse diffusion of a batch of
grid latents in which some cells are *known*. At every step ``t -> t-1``

- the unknown part is the scheduler's step on the model's prediction;
- the known part is ``sqrt(abar_{t-1}) z_known + sqrt(1 - abar_{t-1}) eps`` with
  fresh noise ``eps`` (the noise level the sample has *after* the step, not
  before), and ``z_known`` exactly after the last step;
- ``x_{t-1} = m * known + (1 - m) * unknown`` with ``m`` the cell mask at latent
  resolution.

One model forward per step for the whole batch: the stage-1 model is
unconditional, so there is no guidance and nothing is doubled.

:func:`sample_sequence` builds any number of frames from it:

- *step 1, extension*: grid 0 is sampled unconditionally; grid ``k`` holds the
  last ``m`` rows of grid ``k-1`` in its first ``m`` rows and inpaints the other
  ``R - m`` rows, giving ``(R - m) * C`` new frames per iteration;
- *step 2, interpolation*: the step-1 frames are cut into chunks of ``k`` frames;
  for every pair of neighbouring chunks ``a, b`` a grid holds ``a`` in its first
  ``k`` cells and ``b`` in its last ``k`` cells, and the ``R*C - 2k`` cells
  between are inpainted; all these grids are independent and run as batches.
  The sequence is ``a_0, new_0, a_1, new_1, ...``. Defaults: ``k = C`` for grids
  of three rows or more (the paper's 4 x 4: a row of 4 frames, 8 new), ``k = 1``
  otherwise (2 x 2: frames in cells 0 and 3, cells 1 and 2 new).

Latents never leave memory between iterations. The result has exactly ``N``
frames (surplus frames of the last iteration are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ctgridit.core.diffusion import (EpsModel, Generators, noise_to_level, previous_timestep, randn_like, renoise,
                                     scheduler_step, strength_timesteps)
from ctgridit.core.grid import cell_mask, tile, untile

#: ``callback(phase, done, total)``: progress in model forwards of one phase.
ProgressCallback = Callable[[str, int, int], None]


def phase_callback(callback: ProgressCallback | None, phase: str, offset: int,
                   total: int) -> Callable[[int, int], None] | None:
    """An :func:`inpaint` ``callback(done, n)`` that reports ``(phase, offset + done, total)`` to ``callback``."""
    return None if callback is None else (lambda done, _n: callback(phase, offset + done, total))


# ------------------------------------------------------------------ inpainting
def repaint_schedule(num_steps: int, jump: int = 0, times: int = 1) -> list[int]:
    """Indices into the sampling timesteps visited by RePaint resampling.

    ``0 .. num_steps`` where ``i`` means "the sample is at noise level
    ``timesteps[i]``" and ``num_steps`` means clean. Without resampling
    (``jump == 0`` or ``times <= 1``) the walk goes straight down. Otherwise, every
    ``jump`` steps it goes back up ``jump`` steps, ``times - 1`` times
    (Lugmayr et al., RePaint, 2022).
    """
    if jump <= 0 or times <= 1:
        return list(range(num_steps + 1))
    pending = {i: times - 1 for i in range(jump, num_steps, jump)}
    walk, i = [0], 0
    while i < num_steps:
        i += 1
        walk.append(i)
        if pending.get(i, 0) > 0 and i < num_steps:
            pending[i] -= 1
            for _ in range(jump):
                i -= 1
                walk.append(i)
    return walk


def model_forwards(num_steps: int, jump: int = 0, times: int = 1) -> int:
    """Model forwards one :func:`inpaint` call makes (``num_steps`` without resampling)."""
    walk = repaint_schedule(num_steps, jump, times)
    return sum(1 for a, b in zip(walk, walk[1:]) if b > a)


def inpaint(model: EpsModel, scheduler, known: torch.Tensor, mask: torch.Tensor | None, *,
            cond: torch.Tensor | None = None, generator: Generators = None,
            init: torch.Tensor | None = None, strength: float = 1.0, init_at_level: bool = False,
            repaint_jump: int = 0, repaint_times: int = 1,
            callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Reverse diffusion of ``(B, C, H, W)`` latents keeping the ``mask == 1`` cells at ``known``.

    ``scheduler`` must have its timesteps set. With ``mask=None`` this is plain
    unconditional sampling and ``known`` only gives shape, device and dtype.
    ``cond`` is passed to the model as a third argument (stage 2).
    ``init`` and ``strength`` (SDEdit; GRIDIT.md section 7): the walk covers the
    last ``strength`` of the schedule (:func:`strength_timesteps`) and starts
    from ``init`` forward-diffused to its first level instead of pure noise;
    with ``init_at_level`` the caller has already brought ``init`` to that level
    (denoising: :func:`ctgridit.core.denoise.diffuse_to`) and it is used as is.
    ``generator`` may be a list, one per batch item (see :func:`randn_like`).
    ``callback(done, total)`` is called after every model forward.
    """
    timesteps = strength_timesteps(scheduler, strength)
    if strength < 1.0 and init is None:
        raise ValueError("strength < 1 needs init, the latent to start from")
    levels = timesteps + [-1]                                     # noise level at walk index i; -1 = clean
    if init is None:
        x = randn_like(known, generator) * scheduler.init_noise_sigma
    elif init_at_level:
        x = init
    else:
        x = noise_to_level(scheduler, init, levels[0], generator)
    if mask is not None:
        x = mask * noise_to_level(scheduler, known, levels[0], generator) + (1 - mask) * x
    walk = repaint_schedule(len(timesteps), repaint_jump, repaint_times)
    forwards = model_forwards(len(timesteps), repaint_jump, repaint_times)
    done = 0
    for here, there in zip(walk, walk[1:]):
        if there < here:                                          # RePaint: jump back to a noisier level
            x = renoise(scheduler, x, levels[here], levels[there], generator)
            continue
        t = timesteps[here]
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model(x, t_batch) if cond is None else model(x, t_batch, cond)
        unknown = scheduler_step(scheduler, eps, t, x, generator)
        if mask is None:
            x = unknown
        else:
            prev = previous_timestep(scheduler, t)
            x = mask * noise_to_level(scheduler, known, prev, generator) + (1 - mask) * unknown
        done += 1
        if callback is not None:
            callback(done, forwards)
    if mask is not None:                                          # known cells exactly, whatever the scheduler did
        x = mask * known + (1 - mask) * x
    return x


# ------------------------------------------------------------------- planning
@dataclass(frozen=True)
class SequencePlan:
    """How many grids :func:`sample_sequence` needs for ``num_frames`` frames."""

    num_frames: int
    rows: int
    cols: int
    control_rows: int
    chunk: int
    interpolate: bool
    iterations: int           # step-1 grids (1 = a single unconditional grid)

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def step1_frames(self) -> int:
        return self.cells + (self.iterations - 1) * (self.rows - self.control_rows) * self.cols

    @property
    def interpolation_grids(self) -> int:
        return max(self.step1_frames // self.chunk - 1, 0) if self.interpolate else 0

    @property
    def total_frames(self) -> int:
        return self.step1_frames + self.interpolation_grids * (self.cells - 2 * self.chunk)


def plan_sequence(num_frames: int, rows: int, cols: int, control_rows: int | None = None,
                  interpolate: bool = True, chunk: int | None = None) -> SequencePlan:
    """The fewest grids that give at least ``num_frames`` frames.

    ``control_rows`` (``m``) defaults to ``rows - 1``; ``chunk`` (``k``) to ``cols``
    when ``rows >= 3``, else 1. Interpolation is skipped when one grid is enough or
    when the grid has no cell left between the two chunks.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    m = rows - 1 if control_rows is None else control_rows
    k = (cols if rows >= 3 else 1) if chunk is None else chunk
    cells = rows * cols
    if num_frames > cells and not 1 <= m < rows:
        raise ValueError(f"control_rows must be in 1..{rows - 1} to extend a {rows}x{cols} grid, got {m}")
    if not 1 <= k or cells - 2 * k < 1:
        interpolate = False
    interpolate = interpolate and num_frames > cells
    iterations = 1
    plan = SequencePlan(num_frames, rows, cols, m, k, interpolate, iterations)
    while plan.total_frames < num_frames:
        iterations += 1
        plan = SequencePlan(num_frames, rows, cols, m, k, interpolate, iterations)
    return plan


# ----------------------------------------------------------------- sequences
def sample_sequence(model: EpsModel, scheduler, *, num_frames: int, frame_shape: tuple[int, int, int],
                    rows: int, cols: int, batch_size: int = 1, control_rows: int | None = None,
                    interpolate: bool = True, chunk: int | None = None, max_batch: int = 16,
                    generator: Generators = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, repaint_jump: int = 0, repaint_times: int = 1,
                    callback: ProgressCallback | None = None) -> torch.Tensor:
    """Sample ``batch_size`` sequences of exactly ``num_frames`` latent frames.

    ``frame_shape`` is one frame's latent ``(c, h, w)``; grids are ``(c, R*h, C*w)``.
    Returns ``(B, N, c, h, w)``. ``max_batch`` bounds how many grids go through
    the model at once in step 2.
    """
    plan = plan_sequence(num_frames, rows, cols, control_rows, interpolate, chunk)
    c, h, w = frame_shape
    cells = plan.cells
    grid_shape = (batch_size, c, rows * h, cols * w)
    inpaint_args = dict(generator=generator, repaint_jump=repaint_jump, repaint_times=repaint_times)

    per_grid = model_forwards(len(scheduler.timesteps), repaint_jump, repaint_times)
    total1 = plan.iterations * per_grid

    # step 1: extension
    empty = torch.zeros(grid_shape, device=device, dtype=dtype)
    grid = inpaint(model, scheduler, empty, None, **inpaint_args, callback=phase_callback(callback, "extend", 0, total1))
    frames = [untile(grid, rows, cols)]                                     # (B, R*C, c, h, w)
    known_flags = [1.0] * (plan.control_rows * cols) + [0.0] * ((rows - plan.control_rows) * cols)
    mask = cell_mask(known_flags, rows, cols, h, w).to(device=device, dtype=dtype)
    for it in range(1, plan.iterations):
        last_rows = untile(grid, rows, cols)[:, cells - plan.control_rows * cols:]  # (B, m*C, c, h, w)
        cells_known = torch.cat([last_rows, torch.zeros_like(frames[0][:, last_rows.shape[1]:])], dim=1)
        grid = inpaint(model, scheduler, tile(cells_known, rows, cols), mask, **inpaint_args,
                       callback=phase_callback(callback, "extend", it * per_grid, total1))
        frames.append(untile(grid, rows, cols)[:, plan.control_rows * cols:])
    step1 = torch.cat(frames, dim=1)                                         # (B, L, c, h, w)

    if not plan.interpolate:
        return step1[:, :num_frames]
    return _interpolate(model, scheduler, step1, plan, max_batch, inpaint_args, per_grid, callback)[:, :num_frames]


def _interpolate(model, scheduler, step1: torch.Tensor, plan: SequencePlan, max_batch: int, inpaint_args: dict,
                 per_grid: int, callback: ProgressCallback | None) -> torch.Tensor:
    """Step 2: fill ``R*C - 2k`` frames between each pair of neighbouring ``k``-frame chunks."""
    b, length, c, h, w = step1.shape
    k, cells, pairs = plan.chunk, plan.cells, plan.interpolation_grids
    chunks = step1[:, : (pairs + 1) * k].reshape(b, pairs + 1, k, c, h, w)  # (B, P+1, k, c, h, w)
    gap = cells - 2 * k
    cells_known = torch.cat([chunks[:, :-1], torch.zeros(b, pairs, gap, c, h, w, device=step1.device,
                                                          dtype=step1.dtype), chunks[:, 1:]], dim=2)
    grids = tile(cells_known.reshape(b * pairs, cells, c, h, w), plan.rows, plan.cols)  # (B*P, c, R*h, C*w)
    flags = [1.0] * k + [0.0] * gap + [1.0] * k
    mask = cell_mask(flags, plan.rows, plan.cols, h, w).to(device=step1.device, dtype=step1.dtype)
    batches = list(torch.split(grids, max_batch))
    total = len(batches) * per_grid
    filled = [inpaint(model, scheduler, g, mask, **inpaint_args,
                      callback=phase_callback(callback, "interpolate", i * per_grid, total))
              for i, g in enumerate(batches)]
    new = untile(torch.cat(filled), plan.rows, plan.cols)[:, k:k + gap].reshape(b, pairs, gap, c, h, w)
    woven = torch.cat([chunks[:, :-1], new], dim=2).reshape(b, pairs * (k + gap), c, h, w)
    return torch.cat([woven, chunks[:, -1], step1[:, (pairs + 1) * k:]], dim=1)
