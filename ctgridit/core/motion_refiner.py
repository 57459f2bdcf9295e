"""A learned correction of the motion fill: where each of two known frames is sampled, and how the two are mixed.

The motion fill (:func:`ctgridit.core.motion.between`) moves the frames before and after a gap along their
optical flow and mixes them by distance. :class:`MotionRefiner` corrects that fill the way video frame
interpolation networks refine a flow (Super SloMo, Jiang et al. 2018; RIFE, Huang et al. 2022): a 3-scale
U-Net (:class:`UNet`) sees both moved frames, both known ones, the ones before and after them, the position in
the gap and the two moves, and predicts

- a change of each known frame's move (in units of ``displacement_unit`` pixels),
- a per-pixel share of the first moved frame (a logit added to the mix by distance's),
- an intensity residual;

the frame made is ``m warp(before, d1 + Δ1) + (1 - m) warp(after, d2 + Δ2) + r``. Its last layer starts at
zero, so an untrained refiner returns the motion fill up to :func:`displacements`' single move per frame.

Inputs (:func:`refiner_inputs`, ``CHANNELS`` = 11): the two moved frames, the two known ones, the frames before
the first and after the last (context), the position ``w`` (0: the first known frame, 1: the last), and the two
moves ``d1``, ``d2`` (x, y pixels each). Reversing the order of the frames swaps these in pairs and maps ``w`` to
``1 - w``; flipping a frame axis flips the images and negates one component of each move (:func:`reversed_inputs`
and :func:`flipped_inputs`, the augmentation of training).

``forward(inputs, scale)`` runs the U-Net on the frames resized by ``scale`` (to its working pixel size: a
refiner trained on 1.5 mm pixels refines a 0.7 mm scan at ``scale = 0.7 / 1.5``; rounded to whole pixels, the
moves scaled by the ratio of the sizes along each axis) and applies the moves, share and residual, resized back,
at the frames' own size. Generic: nothing here knows what the frames show.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ctgridit.core.motion import moved, warp

#: Input channels: 2 moved frames, 2 known ones, 2 of context, the position, 2 moves of 2 components.
CHANNELS = 11
#: Where the position and the moves sit among the inputs.
POSITION, MOVES = 6, slice(7, 11)


def displacements(flow: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where :func:`~ctgridit.core.motion.moved` samples each known frame, as one move each (``(B, 2, H, W)``):
    the first by ``-w`` times the forward flow, the last by ``1 - w`` times it; for a flow both ways (4
    channels) the mean of that and the backward flow's move (``w`` times it, and ``-(1 - w)`` times it)."""
    w = weight.to(flow.dtype).view(-1, 1, 1, 1)
    forward, back = flow[:, :2], flow[:, 2:]
    if not back.shape[1]:
        return -w * forward, (1 - w) * forward
    return w * (back - forward) / 2, (1 - w) * (forward - back) / 2


def refiner_inputs(before: torch.Tensor, after: torch.Tensor, outer_before: torch.Tensor,
                   outer_after: torch.Tensor, flow: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(B, CHANNELS, H, W)`` inputs of :class:`MotionRefiner` for frames at fraction ``weight`` (``(B,)``) of the
    way from ``before`` to ``after`` (``(B, 1, H, W)``), with ``outer_before`` and ``outer_after`` the frames
    before and after those and ``flow`` their motion (:func:`~ctgridit.core.motion.moved`'s)."""
    first, last = moved(before, after, weight, flow)
    position = weight.to(before.dtype).view(-1, 1, 1, 1).expand_as(before)
    return torch.cat([first, last, before, after, outer_before, outer_after, position,
                      *displacements(flow, weight)], 1)


def reversed_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """The inputs of the same gap with the frames in reverse order (first and last swapped, ``w -> 1 - w``)."""
    out = inputs[:, [1, 0, 3, 2, 5, 4, 6, 9, 10, 7, 8]].clone()
    out[:, POSITION] = 1 - out[:, POSITION]
    return out


def flipped_inputs(inputs: torch.Tensor, axis: int) -> torch.Tensor:
    """The inputs of the frames flipped along ``axis`` (-1: x, -2: y): the moves' component along it negated."""
    out = inputs.flip(axis)
    component = 0 if axis == -1 else 1
    out[:, [MOVES.start + component, MOVES.start + 2 + component]] *= -1
    return out


class UNet(nn.Module):
    """A 3-scale U-Net (``width``, 2x, 4x channels; two 3 x 3 convolutions a scale, GELU; a receptive field of
    about 50 pixels) whose last convolution starts at zero."""

    def __init__(self, channels: int, width: int, outputs: int):
        super().__init__()

        def block(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GELU(), nn.Conv2d(o, o, 3, padding=1), nn.GELU())

        self.down = nn.ModuleList([block(channels, width), block(width, 2 * width), block(2 * width, 4 * width)])
        self.up = nn.ModuleList([block(6 * width, 2 * width), block(3 * width, width)])
        self.out = nn.Conv2d(width, outputs, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear"), skip], 1))
        return self.out(x)


class MotionRefiner(ModelMixin, ConfigMixin):
    """The motion fill's correction (module docstring); ``pixel_size``: the size of the pixels it was trained on,
    in whatever unit the caller measures its frames in (recorded for the caller, which passes ``scale``);
    ``window``: the intensities its frames' -1 and 1 stood for in training (recorded for the caller to check; None:
    not recorded)."""

    @register_to_config
    def __init__(self, width: int = 32, displacement_unit: float = 10.0, pixel_size: float = 1.0,
                 window: list[float] | None = None):
        super().__init__()
        self.net = UNet(CHANNELS, width, outputs=6)

    def symmetric(self, inputs: torch.Tensor, scale: float = 1.0, others: torch.Tensor | None = None):
        """The mean of the frames made from ``inputs`` and from the same gaps in reverse order
        (:func:`reversed_inputs`), one call: the same frame whichever way the gap is taken (+0.03 to +0.06 dB on
        the held-out scans half way through the bundled refiner's training, nothing measurable at its end).
        ``others``: as in :meth:`forward`, each pair reversed with its gap."""
        both = self(torch.cat([inputs, reversed_inputs(inputs)]), scale,
                    None if others is None else torch.cat([others, others.flip(1)]))
        if others is None:
            return 0.5 * (both[:len(inputs)] + both[len(inputs):])
        return tuple(0.5 * (made[:len(inputs)] + made[len(inputs):]) for made in both)

    def forward(self, inputs: torch.Tensor, scale: float = 1.0, others: torch.Tensor | None = None):
        """``(B, 1, H, W)`` frames made from :func:`refiner_inputs`; the U-Net works on them resized by ``scale``.
        ``others`` (``(B, 2, H, W)``): the gap's two known frames in other units (the first, then the last), moved
        and mixed the same way without the residual; given, the result is ``(frames, others made)``."""
        unit = self.config.displacement_unit
        d1, d2 = inputs[:, MOVES][:, :2], inputs[:, MOVES][:, 2:]
        w = inputs[:, POSITION:POSITION + 1].clamp(1e-3, 1 - 1e-3)
        size = inputs.shape[-2:]
        small = tuple(max(1, round(n * scale)) for n in size)
        ratio = torch.tensor([small[1] / size[1], small[0] / size[0]] * 2, dtype=inputs.dtype,
                             device=inputs.device).view(1, 4, 1, 1)                   # x, y of each move
        resized = inputs if small == tuple(size) else F.interpolate(inputs, size=small, mode="bilinear",
                                                                    antialias=scale < 1)
        features = torch.cat([resized[:, :POSITION + 1], resized[:, MOVES] * ratio / unit], 1)
        out = self.net(features.to(self.dtype)).float()
        if small != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", antialias=scale > 1)
        moves = out[:, :4] * unit / ratio
        share = torch.sigmoid(out[:, 4:5] + torch.log((1 - w) / w))

        def mixed(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
            return share * warp(first, d1 + moves[:, 0:2]) + (1 - share) * warp(last, d2 + moves[:, 2:4])

        frames = mixed(inputs[:, 2:3], inputs[:, 3:4]) + out[:, 5:6]
        return frames if others is None else (frames, mixed(others[:, :1], others[:, 1:2]))
