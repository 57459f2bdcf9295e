"""Grid-based autoregressive sampling (docs/METHOD.md section 6).

One primitive does all the work, :func:`inpaint`: reverse diffusion of a batch of
grid latents in which some cells are *known*. At every step ``t -> t-1``

- the unknown part is the scheduler's step on the model's prediction;
- the known part is ``sqrt(abar_{t-1}) z_known + sqrt(1 - abar_{t-1}) eps`` with
  fresh noise ``eps`` (the noise level the sample has *after* the step, not
  before), and ``z_known`` exactly after the last step;
- ``x_{t-1} = m * known + (1 - m) * unknown`` with ``m`` the cell mask at latent
  resolution.

It has two modes, for two kinds of stage-1 model:

- **replacement** (the paper's; an unconditional model): the model sees only
  the noisy grid, so the known cells reach it only through the pasted noisy
  part. Even with a perfect model this does not sample the conditional
  distribution: with the exact model of a Gaussian sequence
  (``tests/gaussian_model.py``), on a ramp whose known row is 0 and 0.15 the new
  cells should average 0.30 and 0.45 and come out at 0.10 and 0.12 (DDPM, 50
  steps), 0.05 and 0.04 (DDIM), 0.26 and 0.38 with RePaint (jump 5, 40 times,
  about 8x the forwards): the trend of the known frames is lost, motion slows
  at every extension. Optional RePaint resampling reduces, never removes, it.
- **masked-conditional** (``conditional=True``, :mod:`ctgridit.core.conditioning`):
  the model also gets the clean known cells and the mask and predicts the
  noise of the unknown cells *given* them; its noisy input is built exactly as
  in training (known cells diffused to the level). With the exact conditional
  model this samples the true conditional distribution (tested for extension
  and interpolation, 2 x 2 and 4 x 4, DDPM and DDIM). One forward per step, no
  guidance.

:func:`sample_sequence` builds any number of frames from it:

- *step 1, extension* at a coarse stride: grid 0 is sampled with nothing known;
  grid ``k`` holds the last ``m`` rows of grid ``k-1`` in its first ``m`` rows
  and generates the other ``R - m`` rows, ``(R - m) * C`` new frames per
  (sequential) iteration;
- *step 2, interpolation*, ``levels`` times: the frames so far are cut into
  chunks of ``k`` frames; for every pair of neighbouring chunks ``a, b`` a grid
  holds ``a`` in its first ``k`` cells and ``b`` in its last ``k`` cells, and the
  ``R*C - 2k`` cells between are generated; all grids of a level are
  independent and run as batches. The sequence becomes ``a_0, new_0, a_1, ...``.
  With ``k = 1`` (the default) every level divides the stride by
  ``R*C - 1`` (3 for 2 x 2, 15 for 4 x 4), so with ``L`` levels step 1 runs at
  stride ``(R*C - 1)^L`` in frames of the output, and the frames of every level
  are evenly spaced and in order. With ``k > 1`` (the paper's reading for
  4 x 4: a row of 4 frames, 8 new, the next row) they are not: chunk ``a``
  spans ``k - 1`` strides while its new frames must fit in the one stride
  before ``b``, so the sequence goes back at every chunk boundary (steps 1, 1,
  1, -0.75, 0.36 x 7, -0.75, ... measured with the exact model).

A stride-aware model (``max_stride > 0``) is told each grid's stride in frames
of the output (label 0, "not given", where frames are not evenly spaced).
Latents never leave memory between iterations. The result has exactly ``N``
frames: each level interpolates only the pairs it needs and the surplus frames
are dropped (:func:`plan_sequence` chooses the fewest grids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ctgridit.core.conditioning import known_cells, model_condition
from ctgridit.core.diffusion import (EpsModel, Generators, diffuse, previous_timestep, randn_like,
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


@dataclass(frozen=True)
class Start:
    """Where an :func:`inpaint` walk starts instead of pure noise (SDEdit: docs/METHOD.md sections 4 and 7).

    The walk covers the last ``strength`` of the schedule
    (:func:`~ctgridit.core.diffusion.strength_timesteps`) and starts from
    ``latent`` forward-diffused to its first level; with ``at_level`` the caller
    has already brought ``latent`` to that level (denoising:
    :func:`~ctgridit.core.diffusion.diffuse` with the input's own noise) and it is used as is.
    """

    latent: torch.Tensor
    strength: float = 1.0
    at_level: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.latent, torch.Tensor):
            raise ValueError("a start needs the latent to start from")


@dataclass(frozen=True)
class RePaint:
    """RePaint resampling (replacement mode): every ``jump`` steps the walk goes back ``jump`` steps,
    ``times - 1`` times (:func:`repaint_schedule`); ``jump = 0`` or ``times = 1``: none."""

    jump: int = 0
    times: int = 1


NO_REPAINT = RePaint()

#: What :func:`inpaint` may pass to the model besides the noisy latents and the level.
MODEL_INPUTS = {"cond", "stride"}


def inpaint(model: EpsModel, scheduler, known: torch.Tensor, mask: torch.Tensor | None, *,
            conditional: bool = False, inputs: dict | None = None, start: Start | None = None,
            repaint: RePaint = NO_REPAINT, generator: Generators = None,
            callback: Callable[[int, int], None] | None = None,
            positions: torch.Tensor | None = None, filled: bool | torch.Tensor = False) -> torch.Tensor:
    """Reverse diffusion of ``(B, C, H, W)`` latents keeping the ``mask == 1`` cells at ``known``.

    ``scheduler`` must have its timesteps set. With ``mask=None`` nothing is
    known and ``known`` only gives shape, device and dtype.
    What the model gets besides the noisy latents: with ``conditional`` (a
    masked-conditional model) :func:`~ctgridit.core.conditioning.model_condition`
    of ``known`` and ``mask`` (filled as the model's config says, once before the loop) (all cells unknown for ``mask=None``) as ``cond``,
    and ``inputs``: ``cond`` (stage 2's low-resolution frame; refused with
    ``conditional``) and ``stride`` (a label for the whole batch or one per item,
    :func:`stride_input`); entries that are None are left out.
    ``start``: begin from a given latent (:class:`Start`), else from pure noise.
    ``repaint``: :class:`RePaint` resampling.
    ``generator`` may be a list, one per batch item (see :func:`randn_like`).
    ``callback(done, total)`` is called after every model forward. ``positions``: where the cells lie along the
    sequence, for the condition's fill (:func:`~ctgridit.core.conditioning.fill_unknown_cells`); ``filled``: the
    unknown cells of ``known`` hold that fill already, or the fill's channels (:func:`~ctgridit.core.conditioning.model_condition`).
    """
    timesteps = strength_timesteps(scheduler, start.strength if start is not None else 1.0)
    inputs = dict(inputs or {})
    if set(inputs) - MODEL_INPUTS:
        raise ValueError(f"inpaint passes {sorted(MODEL_INPUTS)} to the model, got {sorted(inputs)}")
    if conditional:
        if inputs.get("cond") is not None:
            raise ValueError("a masked-conditional model gets its condition from known and mask: do not pass cond")
        # once per walk: the condition does not change between steps (a flow fill costs more than a forward)
        inputs["cond"] = model_condition(model, known, mask if mask is not None else torch.zeros_like(known[:, :1]),
                                         positions, filled)
    if inputs.get("stride") is not None:
        inputs["stride"] = stride_input(inputs["stride"], known)
    inputs = {name: value for name, value in inputs.items() if value is not None}
    levels = timesteps + [-1]                                     # noise level at walk index i; -1 = clean
    x = _first_latent(scheduler, known, mask, start, levels[0], generator)
    walk = repaint_schedule(len(timesteps), repaint.jump, repaint.times)
    forwards = model_forwards(len(timesteps), repaint.jump, repaint.times)
    done = 0
    for here, there in zip(walk, walk[1:]):
        if there < here:                                          # RePaint: jump back to a noisier level
            x = diffuse(scheduler, x, levels[there], levels[here], generator=generator)
            continue
        t = timesteps[here]
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        unknown = scheduler_step(scheduler, model(x, t_batch, **inputs), t, x, generator)
        if mask is None:
            x = unknown
        else:
            prev = previous_timestep(scheduler, t)
            x = mask * diffuse(scheduler, known, prev, generator=generator) + (1 - mask) * unknown
        done += 1
        if callback is not None:
            callback(done, forwards)
    if mask is not None:                                          # known cells exactly, whatever the scheduler did
        x = mask * known + (1 - mask) * x
    return x


def stride_input(stride: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A stride label (one for all, or one per batch item) as the model's ``(B,)`` long input on ``like``'s device."""
    return torch.as_tensor(stride).expand(like.shape[0]).to(device=like.device, dtype=torch.long)


def _first_latent(scheduler, known: torch.Tensor, mask: torch.Tensor | None, start: Start | None, level: int,
                  generator: Generators) -> torch.Tensor:
    """The walk's first sample, at noise ``level``: pure noise or the :class:`Start`, with the known cells
    diffused to the level."""
    if start is None:
        x = randn_like(known, generator) * scheduler.init_noise_sigma
    elif start.at_level:
        x = start.latent
    else:
        x = diffuse(scheduler, start.latent, level, generator=generator)
    if mask is not None:
        x = mask * diffuse(scheduler, known, level, generator=generator) + (1 - mask) * x
    return x


# ------------------------------------------------------------------- planning
@dataclass(frozen=True)
class SequencePlan:
    """The grids :func:`sample_sequence` runs for ``num_frames`` frames.

    ``level_inputs[l]`` is how many frames interpolation level ``l`` (coarsest
    first) takes; step 1 makes at least ``level_inputs[0]`` (or ``num_frames``
    without interpolation).
    """

    num_frames: int
    rows: int
    cols: int
    control_rows: int
    chunk: int
    iterations: int                       # step-1 grids (1 = a single grid with nothing known)
    level_inputs: tuple[int, ...] = ()    # one entry per interpolation level

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def gap(self) -> int:
        """Frames an interpolation grid generates between its two chunks."""
        return self.cells - 2 * self.chunk

    @property
    def levels(self) -> int:
        return len(self.level_inputs)

    @property
    def interpolate(self) -> bool:
        return self.levels > 0

    @property
    def step1_frames(self) -> int:
        return self.cells + (self.iterations - 1) * (self.rows - self.control_rows) * self.cols

    def pairs(self, level: int) -> int:
        """Interpolation grids of ``level`` (per sequence)."""
        return interpolation_pairs(self.level_inputs[level], self.chunk)

    def level_output(self, level: int) -> int:
        """Frames after interpolation level ``level``, before the surplus is dropped."""
        return self.level_inputs[level] + self.pairs(level) * self.gap

    @property
    def strides(self) -> list[int | None]:
        """The stride of the grids of step 1 and of every interpolation level (:func:`level_strides`)."""
        return level_strides(self.cells, self.levels, self.chunk)


def level_strides(cells: int, levels: int, chunk: int = 1) -> list[int | None]:
    """Frames of the output between neighbouring cells of the grids of step 1 and of each interpolation level.

    Entry 0 is step 1 (extension), entry ``l >= 1`` interpolation level ``l``:
    ``(R*C - 1)^(levels - l)`` for ``chunk = 1``. None where the frames are not
    evenly spaced (``chunk > 1`` with interpolation).
    """
    gap = cells - 2 * chunk
    if levels and (chunk > 1 or gap < 1):
        return [None] * (levels + 1)
    return [(gap + 1) ** (levels - level) for level in range(levels + 1)]


def interpolation_pairs(frames: int, chunk: int) -> int:
    """Neighbouring chunk pairs, i.e. interpolation grids, of ``frames`` frames cut into chunks of ``chunk``."""
    return max(frames // chunk - 1, 0)


def plan_sequence(num_frames: int, rows: int, cols: int, control_rows: int | None = None, levels: int = 1,
                  chunk: int | None = None) -> SequencePlan:
    """The fewest grids that give at least ``num_frames`` frames.

    ``control_rows`` (``m``) defaults to ``rows - 1``; ``chunk`` (``k``) to 1.
    Working back from ``num_frames``, each of the ``levels`` interpolation levels
    takes the fewest frames that it turns into enough frames for the next; a
    level is added only while more frames than one grid holds are needed (so
    there is no interpolation for ``num_frames <= R*C``, and fewer levels for
    short sequences). There is no interpolation when the grid has no cell left
    between the two chunks.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    m = rows - 1 if control_rows is None else control_rows
    k = 1 if chunk is None else chunk
    cells = rows * cols
    if num_frames > cells and not 1 <= m < rows:
        raise ValueError(f"control_rows must be in 1..{rows - 1} to extend a {rows}x{cols} grid, got {m}")
    if k < 1 or cells - 2 * k < 1:
        levels = 0
    inputs = _level_inputs(num_frames, k, cells - 2 * k, levels, cells)
    need = inputs[0] if inputs else num_frames
    iterations = 1 if need <= cells else 1 + -(-(need - cells) // ((rows - m) * cols))
    return SequencePlan(num_frames, rows, cols, m, k, iterations, tuple(inputs))


def _level_inputs(num_frames: int, chunk: int, gap: int, levels: int, cells: int) -> list[int]:
    """Frames each interpolation level takes, coarsest first, to end with ``num_frames``.

    At most ``levels`` levels, and only while a level has to make more than one grid's ``cells`` frames.
    """
    inputs, need = [], num_frames
    while len(inputs) < levels and need > cells:
        frames = 2 * chunk                                       # whole chunks: no frame left out of a pair
        while frames + interpolation_pairs(frames, chunk) * gap < need:
            frames += chunk
        inputs.insert(0, frames)
        need = frames
    return inputs


# ----------------------------------------------------------------- sequences
def sample_sequence(model: EpsModel, scheduler, plan: SequencePlan, *, frame_shape: tuple[int, int, int],
                    batch_size: int = 1, max_batch: int = 16, conditional: bool = False, max_stride: int = 0,
                    generator: Generators = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, repaint: RePaint = NO_REPAINT,
                    callback: ProgressCallback | None = None) -> torch.Tensor:
    """Sample ``batch_size`` sequences of exactly ``plan.num_frames`` latent frames, grid by grid as
    :func:`plan_sequence` planned them (grid shape, control rows, levels, chunk).

    ``frame_shape`` is one frame's latent ``(c, h, w)``; grids are ``(c, R*h, C*w)``.
    ``conditional``: the model is masked-conditional (module docstring), else
    replacement inpainting. ``max_stride > 0``: the model takes stride labels up
    to that (a plan that needs a larger stride is refused). ``max_batch`` bounds
    how many grids go through the model at once in step 2.
    Returns ``(B, N, c, h, w)``.
    """
    rows, cols = plan.rows, plan.cols
    labels = stride_labels(plan.strides, max_stride)
    c, h, w = frame_shape
    run = dict(conditional=conditional, generator=generator, repaint=repaint)
    per_grid = model_forwards(len(scheduler.timesteps), repaint.jump, repaint.times)

    # step 1: extension
    zeros = torch.zeros(batch_size, c, rows * h, cols * w, device=device, dtype=dtype)
    sequence = _extend(model, scheduler, zeros, plan, dict(run, inputs={"stride": labels[0]}), per_grid, callback)

    # step 2: interpolation, level by level
    batches = [-(-batch_size * plan.pairs(level) // max_batch) for level in range(plan.levels)]
    done, total = 0, sum(batches) * per_grid
    for level in range(plan.levels):
        sequence = _interpolate(model, scheduler, sequence[:, :plan.level_inputs[level]], plan, level, max_batch,
                                dict(run, inputs={"stride": labels[level + 1]}), per_grid, callback, done, total)
        done += batches[level] * per_grid
    return sequence[:, :plan.num_frames]


def stride_labels(strides: list[int | None], max_stride: int) -> list[int | None]:
    """The stride labels to give a model that takes labels up to ``max_stride``, for :func:`level_strides`.

    None for every level when the model takes none (``max_stride = 0``); 0 (not
    given) where the frames are not evenly spaced. A stride beyond
    ``max_stride`` is a ValueError: the model was never told that stride.
    """
    if max_stride <= 0:
        return [None] * len(strides)
    labels = [stride or 0 for stride in strides]
    if max(labels) > max_stride:
        raise ValueError(f"{len(strides) - 1} interpolation level(s) extend at stride {labels[0]}, but the model "
                         f"knows strides up to {max_stride}: use fewer levels or train with larger strides")
    return labels


def _extend(model, scheduler, zeros: torch.Tensor, plan: SequencePlan, run: dict, per_grid: int,
            callback: ProgressCallback | None) -> torch.Tensor:
    """Step 1: a first grid with nothing known, then grids whose first ``m`` rows are the last ``m`` rows of the
    grid before; ``zeros`` is one empty grid batch ``(B, c, R*h, C*w)``. Returns ``(B, L, c, h, w)``."""
    rows, cols = plan.rows, plan.cols
    h, w = zeros.shape[-2] // rows, zeros.shape[-1] // cols
    total = plan.iterations * per_grid
    grid = inpaint(model, scheduler, zeros, None, **run, callback=phase_callback(callback, "extend", 0, total))
    frames = [untile(grid, rows, cols)]                                     # (B, R*C, c, h, w)
    known = plan.control_rows * cols
    mask = cell_mask(known_cells("extension", rows, cols, plan.control_rows), rows, cols, h, w).to(zeros) \
        if plan.iterations > 1 else None
    for it in range(1, plan.iterations):
        cells = untile(grid, rows, cols)
        cells = torch.cat([cells[:, plan.cells - known:], torch.zeros_like(cells[:, known:])], dim=1)
        grid = inpaint(model, scheduler, tile(cells, rows, cols), mask, **run,
                       callback=phase_callback(callback, "extend", it * per_grid, total))
        frames.append(untile(grid, rows, cols)[:, known:])
    return torch.cat(frames, dim=1)


def _interpolate(model, scheduler, frames: torch.Tensor, plan: SequencePlan, level: int, max_batch: int,
                 run: dict, per_grid: int, callback: ProgressCallback | None, offset: int,
                 total: int) -> torch.Tensor:
    """One level of step 2: fill ``R*C - 2k`` frames between each pair of neighbouring ``k``-frame chunks."""
    b, length, c, h, w = frames.shape
    k, gap, pairs = plan.chunk, plan.gap, plan.pairs(level)
    chunks = frames[:, : (pairs + 1) * k].reshape(b, pairs + 1, k, c, h, w)  # (B, P+1, k, c, h, w)
    empty = torch.zeros(b, pairs, gap, c, h, w, device=frames.device, dtype=frames.dtype)
    cells = torch.cat([chunks[:, :-1], empty, chunks[:, 1:]], dim=2)          # (B, P, R*C, c, h, w)
    grids = tile(cells.reshape(b * pairs, plan.cells, c, h, w), plan.rows, plan.cols)  # (B*P, c, R*h, C*w)
    flags = known_cells("interpolation", plan.rows, plan.cols, chunk=k)
    mask = cell_mask(flags, plan.rows, plan.cols, h, w).to(device=frames.device, dtype=frames.dtype)
    filled = [inpaint(model, scheduler, g, mask, **run,
                      callback=phase_callback(callback, "interpolate", offset + i * per_grid, total))
              for i, g in enumerate(torch.split(grids, max_batch))]
    new = untile(torch.cat(filled), plan.rows, plan.cols)[:, k:k + gap].reshape(b, pairs, gap, c, h, w)
    woven = torch.cat([chunks[:, :-1], new], dim=2).reshape(b, pairs * (k + gap), c, h, w)
    return torch.cat([woven, chunks[:, -1], frames[:, (pairs + 1) * k:]], dim=1)
