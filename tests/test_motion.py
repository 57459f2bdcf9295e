"""Motion between frames (``ctgridit.core.motion``) and the grid model's ``fill: flow``.

The flow is checked against known motion: a smooth random texture moved by a
known sub-pixel shift (the TV-L1 estimate must find it), and frames between two
known ones of a moving texture (motion-compensated interpolation must beat
linear interpolation, which blends the texture where it is). Real CT: on the
held-out chest crop, the motion fill must beat linear interpolation of the
slices between every third (what ``ctgridit interpolate`` starts from).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctgridit.core.conditioning import fill_unknown_cells
from ctgridit.core.grid import cell_mask, tile, untile
from ctgridit.core.motion import TVL1, between, moved, warp

from tests.conftest import data_file


def motion_interpolate(before: torch.Tensor, after: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`between` with the flow estimated by TV-L1 on the frames' channel mean."""
    return between(before, after, weight, TVL1().flow(before.mean(1), after.mean(1)))


def texture(size: int = 64, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """``(batch, 1, size, size)`` smooth random texture in [-1, 1] (noise blurred with a Gaussian of 2 pixels)."""
    noise = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))
    kernel = torch.exp(-torch.arange(-6, 7.) ** 2 / 8)
    kernel = kernel / kernel.sum()
    smooth = F.conv2d(F.pad(noise, (6, 6, 0, 0), mode="circular"), kernel.view(1, 1, 1, -1))
    smooth = F.conv2d(F.pad(smooth, (0, 0, 6, 6), mode="circular"), kernel.view(1, 1, -1, 1))
    return smooth / smooth.abs().amax(dim=(-2, -1), keepdim=True)


def shifted(images: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """``images`` moved by ``(dx, dy)`` pixels: the content at ``x`` goes to ``x + d``."""
    flow = torch.tensor([-dx, -dy]).view(1, 2, 1, 1).expand(images.shape[0], 2, *images.shape[-2:])
    return warp(images, flow)


@pytest.mark.parametrize("dx,dy", [(1.5, -0.75), (-2.25, 1.0), (0.0, 0.0)])
def test_tvl1_finds_a_known_shift(dx, dy):
    """A texture moved by (dx, dy): the flow of the moved one onto the first is (dx, dy) inside the frame
    (within 0.15 px median), for every item of a batch."""
    first = texture(batch=3)
    second = shifted(first, dx, dy)
    flow = TVL1().flow(first[:, 0], second[:, 0])
    inner = flow[..., 12:-12, 12:-12]
    assert flow.shape == (3, 2, 64, 64)
    assert (inner[:, 0] - dx).abs().median() < 0.15
    assert (inner[:, 1] - dy).abs().median() < 0.15


def test_between_follows_the_motion_and_linear_interpolation_does_not():
    """Frames a third and two thirds of the way along a 3-pixel move: motion-compensated interpolation is far
    closer to them than the linear blend of the two ends (which doubles the texture)."""
    start = texture(seed=1, batch=2)
    frames = [shifted(start, 3.0 * k / 3, -1.5 * k / 3) for k in range(4)]
    for k, w in ((1, 1 / 3), (2, 2 / 3)):
        made = motion_interpolate(frames[0], frames[3], torch.full((2,), w))
        blend = (1 - w) * frames[0] + w * frames[3]
        inner = (..., slice(8, -8), slice(8, -8))
        error = (made - frames[k])[inner].pow(2).mean()
        linear = (blend - frames[k])[inner].pow(2).mean()
        assert error < 0.15 * linear, (k, float(error), float(linear))
    exact = between(frames[0], frames[3], torch.zeros(2), torch.zeros(2, 2, 64, 64))
    torch.testing.assert_close(exact, frames[0])                     # weight 0: the first frame itself


def test_both_ways_holds_the_flow_each_way_and_moved_averages_the_two():
    """:meth:`TVL1.both_ways`: its first two channels are :meth:`TVL1.flow` of the second frame onto the first, its
    last two the flow of the first onto the second (a known shift found with opposite signs). :func:`moved` with
    such a 4-channel motion gives each frame the mean of it moved along either: exactly, with made-up flows."""
    first = texture(seed=2, batch=2)
    second = shifted(first, 1.5, -1.0)
    both = TVL1().both_ways(first[:, 0], second[:, 0])
    torch.testing.assert_close(both[:, :2], TVL1().flow(first[:, 0], second[:, 0]))
    inner = both[..., 12:-12, 12:-12]
    for channel, expected in ((0, 1.5), (1, -1.0), (2, -1.5), (3, 1.0)):
        assert (inner[:, channel] - expected).abs().median() < 0.15, channel
    forward, back = torch.randn(2, 2, 64, 64), torch.randn(2, 2, 64, 64)
    w = torch.tensor([0.25, 0.6]).view(-1, 1, 1, 1)
    made_first, made_last = moved(first, second, w.flatten(), torch.cat([forward, back], 1))
    torch.testing.assert_close(made_first, 0.5 * (warp(first, -w * forward) + warp(first, w * back)))
    torch.testing.assert_close(made_last, 0.5 * (warp(second, (1 - w) * forward) + warp(second, -(1 - w) * back)))
    one_way = moved(first, second, w.flatten(), forward)
    torch.testing.assert_close(one_way[0], warp(first, -w * forward))
    start = texture(seed=3, batch=2)                                 # content moved by (3, -1.5) over 3 frames
    frames = [shifted(start, 1.0 * k, -0.5 * k) for k in range(4)]
    exact = torch.tensor([3.0, -1.5, -3.0, 1.5]).view(1, 4, 1, 1).expand(2, 4, 64, 64)
    inner = (..., slice(8, -8), slice(8, -8))
    for k, w in ((1, 1 / 3), (2, 2 / 3)):      # either end, moved both ways, far closer than the linear blend
        blend = ((1 - w) * frames[0] + w * frames[3] - frames[k])[inner].pow(2).mean()
        for made in moved(frames[0], frames[3], torch.full((2,), w), exact):
            assert (made - frames[k])[inner].pow(2).mean() < 0.1 * blend, k   # a sign wrong either way: > 2


def test_a_motion_fill_keeps_known_cells_holds_at_the_ends_and_moves_between():
    """fill_unknown_cells with motion: known cells exactly, cells with known frames on one side only held as
    with the linear fill (extension), cells between two known ones along the motion; the same per item whether
    the batch holds one task or several."""
    start = texture(seed=2, batch=1)
    frames = torch.cat([shifted(start, 2.0 * k / 3, 1.0 * k / 3) for k in range(4)])[:, None]   # (4, 1, 1, H, W)
    cells = frames.permute(1, 0, 2, 3, 4).expand(2, 4, 1, 64, 64)             # 2 items, 4 cells
    flags = [[1, 0, 0, 1], [1, 1, 0, 0]]                                       # interpolation, extension
    mask = cell_mask(flags, 2, 2, 64, 64)
    grids = tile(cells, 2, 2) * mask
    moved = untile(fill_unknown_cells(grids, mask, 2, 2, TVL1()), 2, 2)
    linear = untile(fill_unknown_cells(grids, mask, 2, 2), 2, 2)
    torch.testing.assert_close(moved[0, [0, 3]], cells[0, [0, 3]])
    torch.testing.assert_close(moved[1], linear[1])                            # extension: held, as linear
    for k in (1, 2):
        assert (moved[0, k] - cells[0, k]).pow(2).mean() < 0.3 * (linear[0, k] - cells[0, k]).pow(2).mean()
    alone = untile(fill_unknown_cells(grids[:1], mask[:1], 2, 2, TVL1()), 2, 2)
    torch.testing.assert_close(alone[0], moved[0])


def test_the_motion_fill_beats_linear_interpolation_on_a_held_out_chest():
    """Real CT (the held-out 1.5 mm chest crop, HU window -1000..1000): every third slice kept, the two between
    each kept pair filled on 64 x 64 tiles; the motion fill is closer to the real slices than linear interpolation
    (measured +0.8 dB; asserted +0.5 dB)."""
    from ctgridit.ct.io import read_ct

    hu = read_ct(data_file("totalsegmentator/chest_crop.nii.gz")).array
    volume = torch.from_numpy(np.clip(hu, -1000, 1000) / 1000).float().permute(2, 0, 1)   # (Z, X, Y)
    tiles = [volume[j:j + 4, y:y + 64, x:x + 64] for j in range(0, 60, 3) for y in (0, 56) for x in (0, 38)]
    cells = torch.stack(tiles)[:, :, None]                                     # (B, 4, 1, 64, 64)
    mask = cell_mask([1, 0, 0, 1], 2, 2, 64, 64).expand(len(cells), 1, 128, 128)
    grids = tile(cells, 2, 2) * mask
    errors = {}
    for name, motion in (("linear", None), ("flow", TVL1())):
        made = untile(fill_unknown_cells(grids, mask, 2, 2, motion), 2, 2)
        errors[name] = float((made[:, 1:3] - cells[:, 1:3]).pow(2).mean())
    gain = 10 * np.log10(errors["linear"] / errors["flow"])
    assert gain > 0.5, errors
