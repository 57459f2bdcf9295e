"""Masked conditioning of the grid model: one stage-1 model for generation, extension and interpolation.

This is Masked Conditional Video Diffusion (Voleti et al., 2022) on GriDiT's
grids, our correction of the paper's sampling (docs/METHOD.md section 6): the paper
samples an unconditional model and pastes the known cells in (replacement
inpainting), which even with a perfect model does not sample the conditional
distribution and loses the trend of the known frames. Here the model is *told*
the known cells:

- a grid's *task* says which of its ``R x C`` cells are known
  (:func:`known_cells`): none (``"unconditional"``), the first ``m`` rows
  (``"extension"``: the last rows of the previous grid), or the first ``k`` and
  last ``k`` cells (``"interpolation"``: frames on both sides of a gap);
- the model's condition is the clean latent of the known cells (zeros
  elsewhere) and the cell mask, stacked on channels (:func:`masked_condition`),
  which :class:`~ctgridit.core.dit.GridDiT` concatenates to its noisy input like
  stage 2's condition (``cond_channels = latent channels + 1``); for a model
  built with ``cond_fill="linear"`` the unknown cells of its condition hold the
  linear interpolation between the nearest known cells in frame order instead
  (:func:`fill_unknown_cells`), so every token sees its cell's classical
  estimate and the network learns the correction (docs/METHOD.md sections 3 and 7b);
  with ``cond_fill="flow"`` the interpolation along the motion between the known
  cells (:mod:`ctgridit.core.motion`), which linear interpolation blurs into
  two faint copies. The condition is made once per grid, before the reverse
  diffusion loop (:func:`model_condition`), not at every model call;
- training draws the task of every grid (:class:`TaskMix`) and counts the loss
  on the unknown cells only; the known cells of the noisy input are the known
  latents diffused to the level like the rest, exactly what the sampler feeds
  (:func:`ctgridit.core.sampler.inpaint`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctgridit.core.grid import tile, untile
from ctgridit.core.motion import TVL1, moved, warp
from ctgridit.core.precision import inference_precision

TASKS = ("unconditional", "extension", "interpolation")
FILLS = ("zeros", "linear", "flow", "flow_pair")


def known_cells(task: str, rows: int, cols: int, control_rows: int | None = None, chunk: int = 1) -> list[float]:
    """Row-major flags (1.0 known, 0.0 to generate) of the cells of an ``R x C`` grid for ``task``.

    ``control_rows`` (``m``, default ``R - 1``) for extension; ``chunk`` (``k``)
    for interpolation. Raises ValueError when nothing would be left to generate.
    """
    cells = rows * cols
    if task == "unconditional":
        return [0.0] * cells
    if task == "extension":
        m = rows - 1 if control_rows is None else control_rows
        if not 1 <= m < rows:
            raise ValueError(f"control_rows must be in 1..{rows - 1} for a {rows}x{cols} grid, got {m}")
        return [1.0] * (m * cols) + [0.0] * ((rows - m) * cols)
    if task == "interpolation":
        if not 1 <= chunk or cells - 2 * chunk < 1:
            raise ValueError(f"chunk must leave a cell to fill in a {rows}x{cols} grid, got {chunk}")
        return [1.0] * chunk + [0.0] * (cells - 2 * chunk) + [1.0] * chunk
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def condition_channels(latent_channels: int, fill: str = "zeros") -> int:
    """Channels of :func:`masked_condition` for latents of ``latent_channels``: the latents and the mask; with the
    ``flow_pair`` fill the two moved latents, the weight and the mask."""
    return 2 * latent_channels + 2 if fill == "flow_pair" else latent_channels + 1


def masked_condition(known: torch.Tensor, mask: torch.Tensor, fill: str = "zeros", rows: int = 1,
                     cols: int = 1, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The model's condition: ``(B, c + 1, H, W)``, the known latents and the mask.

    ``known`` is ``(B, c, H, W)``; ``mask`` (``(B or 1, 1, H, W)`` or ``(1, H, W)``,
    as :func:`~ctgridit.core.grid.cell_mask` makes it) is 1 on the known cells.
    The unknown cells hold ``fill`` (:data:`FILLS`) of the known ones: zeros, or
    their interpolation in the frame order of an ``rows x cols`` grid
    (:func:`fill_unknown_cells`; ``"flow"`` along their motion, TV-L1), at the cells' ``positions``.
    ``"flow_pair"``: ``(B, 2c + 2, H, W)``, the two known latents moved along their motion to each cell, the
    weight of the second and the mask (:func:`moved_cells`), which the model mixes itself (:func:`pair_output`).
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    mask = mask.to(known.dtype).expand(known.shape[0], 1, *known.shape[2:])
    latents = known * mask
    if fill == "flow_pair":
        return torch.cat([*moved_cells(latents, mask, rows, cols, TVL1(), positions), mask], dim=1)
    if fill != "zeros":
        latents = fill_unknown_cells(latents, mask, rows, cols, TVL1() if fill == "flow" else None, positions)
    return torch.cat([latents, mask], dim=1)


def model_condition(model, known: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor | None = None, filled: bool | torch.Tensor = False) -> torch.Tensor:
    """:func:`masked_condition` as ``model`` takes it: filled as its config says (``cond_fill``, grid shape) for a
    :class:`~ctgridit.core.dit.GridDiT`, zeros for a model without such a config. ``filled``: the unknown cells
    of ``known`` already hold the fill (made by the caller on whole frames, e.g. the flow between whole slices
    rather than between the tiles of one window), and are taken as they are; or the fill's channels themselves
    (``(B, k, H, W)``, e.g. ``flow_pair``'s moved latents and weight), the condition then ``filled`` and the mask."""
    config = getattr(model, "config", None)
    fill = getattr(config, "cond_fill", "zeros") if config is not None else "zeros"
    made = filled if isinstance(filled, torch.Tensor) else known if filled else None
    if made is not None and fill != "zeros":
        return torch.cat([made.to(known.dtype), mask.to(known.dtype).expand(known.shape[0], 1, *known.shape[2:])],
                         dim=1)
    if fill == "zeros":
        return masked_condition(known, mask)
    return masked_condition(known, mask, fill, config.grid_rows, config.grid_cols, positions)


def fill_unknown_cells(latents: torch.Tensor, mask: torch.Tensor, rows: int, cols: int,
                       motion: TVL1 | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``latents`` ``(B, c, H, W)`` with every unknown cell replaced by interpolation of the known cells.

    Cells are frames in row-major order; ``mask`` ``(B, 1, H, W)`` is 1 on the
    known cells. An unknown cell between two known ones gets their mix weighted
    by distance; one with known cells on one side only gets the
    nearest of them (hold); with no known cell it is zero. Known cells are kept.
    With ``motion``, a cell between two known ones is their mix along the motion
    between them instead (:func:`~ctgridit.core.motion.between`, the flow of each
    pair of known cells estimated once with ``motion``). ``positions``: where each cell lies along the
    sequence, ``(B or 1, N)`` increasing (e.g. ``0, 1/5, 2/5, 1`` for two new slices of a gap made five
    times finer); default the cell index (consecutive frames). The mix of :func:`moved_cells`.
    """
    first, last, weight = moved_cells(latents, mask, rows, cols, motion, positions)
    return (1 - weight) * first + weight * last


def moved_cells(latents: torch.Tensor, mask: torch.Tensor, rows: int, cols: int, motion: TVL1 | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`fill_unknown_cells` mixes, each ``(B, c, H, W)``, and the weight of the second, ``(B, 1, H, W)``:
    in a cell between two known ones the nearest known cell before it and the nearest after it (each moved along
    the motion between them to the cell's place, with ``motion``) and the cell's fraction of the way from the first
    to the second; in a known cell the cell itself twice (weight 0); in a cell with known cells on one side only
    the nearest of them twice; with none, zeros."""
    cells = untile(latents, rows, cols)                                        # (B, N, c, h, w)
    n = cells.shape[1]
    known = untile(mask, rows, cols).flatten(2).mean(-1) > 0.5                 # (B, N)
    index = torch.arange(n, device=latents.device).expand_as(known)
    where = index.to(latents.dtype) if positions is None else \
        torch.as_tensor(positions, dtype=latents.dtype, device=latents.device).expand(known.shape)
    before = torch.where(known, index, -1).cummax(dim=1).values               # nearest known at or before
    after = torch.where(known, index, n).flip(1).cummin(dim=1).values.flip(1)  # nearest known at or after
    has_before, has_after = before >= 0, after < n
    inside = has_before & has_after & ~known
    at = lambda i: where.gather(1, i.clamp(0, n - 1))                          # noqa: E731
    span = (at(after) - at(before)).clamp(min=1e-6)
    weight = torch.where(inside, (where - at(before)) / span, torch.zeros_like(where))

    def gather(at: torch.Tensor) -> torch.Tensor:
        return cells.gather(1, at.clamp(0, n - 1).view(*at.shape, 1, 1, 1).expand_as(cells))

    shape = (*known.shape, 1, 1, 1)
    zero = torch.zeros((), dtype=latents.dtype, device=latents.device)
    first = torch.where(has_before.view(shape), gather(before), torch.where(has_after.view(shape), gather(after), zero))
    last = torch.where(has_after.view(shape), gather(after), first)
    if motion is not None and bool(inside.any()):
        item, cell = inside.nonzero(as_tuple=True)
        pairs, which = torch.unique(torch.stack([item, before[item, cell], after[item, cell]], dim=1), dim=0,
                                    return_inverse=True)
        a, b = cells[pairs[:, 0], pairs[:, 1]], cells[pairs[:, 0], pairs[:, 2]]
        flow = motion.both_ways(a.mean(1), b.mean(1))[which]
        first, last = first.clone(), last.clone()
        first[item, cell], last[item, cell] = moved(a[which], b[which], weight[item, cell], flow)
    weights = weight.view(shape).expand(*known.shape, 1, *cells.shape[-2:])
    return tile(first, rows, cols), tile(last, rows, cols), tile(weights, rows, cols)


#: Output channels a ``flow_pair`` model has besides its latent correction: a displacement (x, y, in pixels over
#: :data:`PAIR_SHIFT`) of each of the two moved latents and the logit change of the second one's weight.
PAIR_FIELDS = 5

#: Pixels per unit of a ``flow_pair`` model's displacement outputs.
PAIR_SHIFT = 4.0


def pair_output(cond: torch.Tensor, out: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The clean-latent estimate of a ``flow_pair`` model with a residual output: its condition's two moved latents
    (:func:`moved_cells`) each moved again, in its own cell, by the displacement the network gives, mixed by the
    condition's weight changed by the network's logit, plus its correction. ``cond`` ``(B, 2c + 2, H, W)``, ``out``
    ``(B, c + PAIR_FIELDS, H, W)``; ``(B, c, H, W)`` in float32. With ``out`` at zero (the network's last layer as
    it starts) this is the mix of the moved latents: the flow fill."""
    c = out.shape[1] - PAIR_FIELDS
    cond, out = cond.float(), out.float()
    first, last, weight = cond[:, :c], cond[:, c:2 * c], cond[:, 2 * c:2 * c + 1].clamp(1e-4, 1 - 1e-4)
    correction, shift_first, shift_last, logit = out[:, :c], out[:, c:c + 2], out[:, c + 2:c + 4], out[:, c + 4:]

    def shifted(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:      # each cell on its own
        cells, shifts = untile(image, rows, cols), untile(shift, rows, cols)
        moved_cells_ = warp(cells.flatten(0, 1), PAIR_SHIFT * shifts.flatten(0, 1))
        return tile(moved_cells_.view(cells.shape), rows, cols)

    alpha = torch.sigmoid(torch.logit(weight) + logit)
    with inference_precision(out.device, "fp32"):                              # moved and mixed in float32
        return (1 - alpha) * shifted(first, shift_first) + alpha * shifted(last, shift_last) + correction


@dataclass(frozen=True)
class TaskMix:
    """How training draws the task of each grid (probabilities need not sum to 1; they are normalised).

    ``control_rows`` and ``chunk`` as in :func:`known_cells`: train the ``m`` and
    ``k`` you sample with.
    """

    unconditional: float = 0.2
    extension: float = 0.4
    interpolation: float = 0.4
    control_rows: int | None = None
    chunk: int = 1

    def __post_init__(self) -> None:
        weights = self.weights
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"task probabilities must be >= 0 with a positive sum, got {weights}")

    @property
    def weights(self) -> tuple[float, float, float]:
        return float(self.unconditional), float(self.extension), float(self.interpolation)

    def check(self, rows: int, cols: int) -> None:
        """Raise ValueError if a task with a positive probability cannot be laid out on this grid."""
        for task, weight in zip(TASKS, self.weights):
            if weight > 0:
                known_cells(task, rows, cols, self.control_rows, self.chunk)

    def draw_task(self, generator: torch.Generator) -> str:
        """The task of one training grid (one of :data:`TASKS`), drawn with ``generator``."""
        weights = torch.tensor(self.weights, dtype=torch.float64)
        return TASKS[int(torch.multinomial(weights, 1, generator=generator))]

    def known(self, task: str, rows: int, cols: int) -> list[float]:
        """The known-cell flags of ``task`` on an ``R x C`` grid with this mix's ``control_rows`` and ``chunk``."""
        return known_cells(task, rows, cols, self.control_rows, self.chunk)

    def draw(self, generator: torch.Generator, rows: int, cols: int) -> list[float]:
        """The known-cell flags of one training grid, drawn with ``generator``."""
        return self.known(self.draw_task(generator), rows, cols)
