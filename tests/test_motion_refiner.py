"""The motion fill's learned correction (``ctgridit.core.motion_refiner``).

Checked exactly where it can be: an untrained refiner gives the motion fill; the inputs of a gap taken in
reverse order, or of flipped frames, are the transformed inputs training augments with; a move the network
outputs in its working pixels is applied in the frames' own; a slice model keeps its refiner through saving
and loading, and one without a motion fill is refused one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctgridit.core.motion import between, warp
from ctgridit.core.motion_refiner import MotionRefiner, flipped_inputs, refiner_inputs, reversed_inputs

from tests.test_motion import texture


def smooth_flow(channels: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    """A smooth random motion of up to about 3 pixels, ``(2, channels, size, size)``."""
    return 3 * torch.cat([texture(size, seed + c, batch=2) for c in range(channels)], 1)


def gap(channels: int = 4, size: int = 32):
    frames = texture(size, seed=5, batch=8)
    return frames[0:2], frames[2:4], frames[4:6], frames[6:8], smooth_flow(channels, size), torch.tensor([0.25, 0.6])


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_an_untrained_refiner_gives_the_motion_fill(scale):
    """Its last layer starts at zero: no change of the moves, the mix by distance, no residual; with a forward
    flow (one move per frame) that is :func:`between` exactly, at any working size."""
    before, after, outer_before, outer_after, flow, weight = gap(channels=2)
    made = MotionRefiner()(refiner_inputs(before, after, outer_before, outer_after, flow, weight), scale)
    torch.testing.assert_close(made, between(before, after, weight, flow), atol=1e-5, rtol=0)


def test_the_inputs_of_a_gap_in_reverse_order_are_its_inputs_reversed():
    """Reversed (the last known frame first, the flow's two directions swapped, ``w -> 1 - w``), a gap's inputs
    are :func:`reversed_inputs` of its inputs: the augmentation training uses is a gap the refiner could see."""
    before, after, outer_before, outer_after, flow, weight = gap()
    inputs = refiner_inputs(before, after, outer_before, outer_after, flow, weight)
    turned = refiner_inputs(after, before, outer_after, outer_before, flow[:, [2, 3, 0, 1]], 1 - weight)
    torch.testing.assert_close(reversed_inputs(inputs), turned, atol=1e-6, rtol=0)
    torch.testing.assert_close(reversed_inputs(reversed_inputs(inputs)), inputs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("axis", [-1, -2])
def test_the_inputs_of_flipped_frames_are_the_inputs_flipped(axis):
    """Frames flipped along x (or y), and their motion with it (its x, or y, components negated): the inputs are
    :func:`flipped_inputs` of the unflipped ones."""
    before, after, outer_before, outer_after, flow, weight = gap()
    inputs = refiner_inputs(before, after, outer_before, outer_after, flow, weight)
    component = [0, 2] if axis == -1 else [1, 3]
    mirrored = flow.flip(axis)
    mirrored[:, component] *= -1
    flipped = refiner_inputs(*(f.flip(axis) for f in (before, after, outer_before, outer_after)), mirrored, weight)
    torch.testing.assert_close(flipped_inputs(inputs, axis), flipped, atol=1e-5, rtol=0)


def test_a_move_in_working_pixels_is_applied_in_the_frames_own():
    """A refiner whose output moves the first frame by 0.1 unit in x and takes all of it (share 1): working at
    half size, that is 0.1 x 10 / 0.5 = 2 pixels of the frames' own, and the frame made is the first frame moved
    2 pixels (no flow given)."""
    refiner = MotionRefiner(displacement_unit=10.0)
    with torch.no_grad():
        refiner.net.out.bias[0] = 0.1
        refiner.net.out.bias[4] = 50.0
    before, after, outer_before, outer_after, _, weight = gap()
    inputs = refiner_inputs(before, after, outer_before, outer_after, torch.zeros(2, 4, 32, 32), weight)
    made = refiner(inputs, scale=0.5)
    moved = warp(before, torch.tensor([2.0, 0.0]).view(1, 2, 1, 1).expand(2, 2, 32, 32))
    torch.testing.assert_close(made, moved, atol=1e-5, rtol=0)


def test_other_frames_are_moved_and_mixed_as_the_frames_are():
    """``others``: the gap's known frames in other units go through the same moves and shares without the residual:
    given the known frames themselves, they come back as the frame less its residual (a residual of exactly 0.07
    here, the rest of the last layer random); scaled and shifted, they come back scaled and shifted; and taken both
    ways (``symmetric``), reversing the gap and its pair gives the same frames."""
    torch.manual_seed(0)
    refiner = MotionRefiner(width=8, pixel_size=1.0)
    with torch.no_grad():
        refiner.net.out.weight.normal_(0, 0.02)
        refiner.net.out.bias.normal_(0, 0.05)
        refiner.net.out.weight[5] = 0
        refiner.net.out.bias[5] = 0.07
    frames = torch.rand(6, 1, 20, 24)
    flow = torch.randn(2, 4, 20, 24)
    inputs = refiner_inputs(frames[1:3], frames[3:5], frames[0:2], frames[4:6], flow, torch.tensor([0.3, 0.6]))
    with torch.no_grad():
        made, others = refiner(inputs, 0.5, inputs[:, 2:4])
        torch.testing.assert_close(others + 0.07, made)
        _, scaled = refiner(inputs, 0.5, 1200 * inputs[:, 2:4] - 300)
        torch.testing.assert_close(scaled, 1200 * others - 300, atol=1e-3, rtol=1e-5)
        pair = torch.randn(2, 2, 20, 24)
        both = refiner.symmetric(inputs, 0.5, pair)
        back = refiner.symmetric(reversed_inputs(inputs), 0.5, pair.flip(1))
        assert not torch.allclose(both[1], refiner.symmetric(inputs, 0.5, pair.flip(1))[1])   # the order matters
    for one, other in zip(both, back):
        torch.testing.assert_close(one, other)


def test_a_slice_model_keeps_its_refiner_and_one_without_a_motion_fill_is_refused(tmp_path):
    from ctgridit.core.pipeline import GriDiTPipeline
    from tests.test_slices import native_pipeline

    pipeline = native_pipeline(gaps=[2, 3], fill="flow_pair")
    refiner = MotionRefiner(width=8, pixel_size=1.5)
    with torch.no_grad():
        refiner.net.out.bias.fill_(0.01)
    pipeline.register_modules(refiner=refiner)
    pipeline.save_pretrained(tmp_path / "model")
    loaded = GriDiTPipeline.from_pretrained(tmp_path / "model")
    assert loaded.refiner.config.pixel_size == 1.5 and loaded.refiner.config.width == 8
    for name, value in refiner.state_dict().items():
        torch.testing.assert_close(loaded.refiner.state_dict()[name], value)
    assert GriDiTPipeline.from_pretrained(tmp_path / "model").stage2 is None
    linear = native_pipeline(gaps=[2, 3], fill="linear")
    with pytest.raises(ValueError, match="refiner corrects the motion fill"):
        GriDiTPipeline(linear.stage1, linear.codec, linear.scheduler, settings=linear.settings, refiner=refiner)


class Stop(Exception):
    pass


class Stopping(list):
    """Training sets that stop the run (raise :class:`Stop`) when a batch is drawn from them the ``draws``-th time."""

    def __init__(self, sets, draws: int):
        super().__init__(sets)
        self.draws = draws

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            self.draws -= 1
            if self.draws == 0:
                raise Stop
        return super().__getitem__(index)


def test_training_the_refiner_resumes_exactly_where_it_stopped(tmp_path):
    """A run stopped in step 5 (its last checkpoint at step 3) and started again over the same folder ends with
    the same weights, bit for bit, as a run that went through, and its log has every step once; continued to
    more steps, it still learns."""
    import csv

    from ctgridit.core.motion_refiner import MotionRefiner
    from ctgridit.training.refiner import train_refiner

    sets = []
    for seed in (0, 1):
        frames = texture(24, seed=10 + seed, batch=5)
        flow = smooth_flow(4, 24, seed)
        inputs = refiner_inputs(frames[0:2], frames[2:4], frames[0:2], frames[2:4], flow, torch.tensor([0.5, 0.5]))
        sets.append((inputs, frames[4:5].expand(2, -1, -1, -1)))
    settings = dict(width=8, batch=4, crop=20, every=3, report=lambda line: None, pixel_size=1.5,
                    window=(-1000, 1000))
    whole = train_refiner(tmp_path / "whole", sets, 6, **settings)

    with pytest.raises(Stop):                      # stopped in step 5, after the checkpoint at step 3
        train_refiner(tmp_path / "stopped", Stopping(sets, draws=5), 6, **settings)
    with (tmp_path / "stopped" / "train_log.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [1, 2, 3, 4]
    resumed = train_refiner(tmp_path / "stopped", sets, 6, **settings)
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    with (tmp_path / "stopped" / "train_log.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(1, 7))
    saved = MotionRefiner.from_pretrained(tmp_path / "stopped" / "model")
    assert torch.equal(saved.net.out.weight, whole.net.out.weight) and not torch.equal(
        whole.net.out.weight, torch.zeros_like(whole.net.out.weight))
    further = train_refiner(tmp_path / "stopped", sets, 8, **settings)     # continued: the rate is not 0
    assert not torch.equal(further.net.out.weight, whole.net.out.weight)
    started = train_refiner(tmp_path / "started", sets, 1, **{**settings, "width": 32}, start=whole)
    assert started.config.width == 8                                  # the start's weights, one step on
    assert saved.config.pixel_size == 1.5 and saved.config.window == [-1000.0, 1000.0]   # recorded
    assert started.config.window == [-1000.0, 1000.0]
    with pytest.raises(ValueError, match="trained on sets of"):                  # other data: not a continuation
        train_refiner(tmp_path / "stopped", sets[:1], 9, **settings)
    with pytest.raises(ValueError, match="start was trained in the window"):
        train_refiner(tmp_path / "other", sets, 1, **{**settings, "window": (-160, 240)}, start=whole)
    assert (started.net.out.weight - whole.net.out.weight).abs().max() < 2e-3 < whole.net.out.weight.abs().max()


class Echo(torch.nn.Module):
    """A stand-in for the U-Net: a residual equal to the (resized) first known frame it is given, all of the
    first moved frame (share 1), no change of the moves."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))           # the refiner's dtype is its parameters'

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(features), 6, *features.shape[-2:])
        out[:, 4], out[:, 5] = 50.0, features[:, 2]
        return out


@pytest.mark.parametrize("size", [(64, 64), (101, 87)])
def test_the_working_size_lines_up_with_the_frames_own(size):
    """What the U-Net gives at half size (odd sizes included, which do not halve exactly) lands where it was
    computed: a residual echoing the smooth first frame comes back as that frame, within what resizing a
    smooth texture down and up loses (its rms), not shifted towards one edge."""
    refiner = MotionRefiner()
    refiner.net = Echo()
    frames = torch.cat([texture(128, seed=s)[..., :size[0], :size[1]] for s in range(4)])
    inputs = refiner_inputs(frames[0:1], frames[1:2], frames[2:3], frames[3:4], torch.zeros(1, 4, *size),
                            torch.tensor([0.5]))
    with torch.no_grad():
        residual = refiner(inputs, scale=0.5) - frames[0:1]
    error = (residual - frames[0:1])[..., 4:-4, 4:-4]
    assert error.pow(2).mean().sqrt() < 0.22 * frames[0].pow(2).mean().sqrt()     # 0.18-0.19; shifted: 0.29


def test_the_symmetric_refiner_makes_the_same_frame_whichever_way_the_gap_is_taken():
    """``symmetric``: the mean of the gap taken both ways, so the gap in reverse order gives the same frame (a
    trained refiner alone need not: here one with random last-layer weights, which differs by more)."""
    refiner = MotionRefiner(width=8)
    with torch.no_grad():
        torch.nn.init.normal_(refiner.net.out.weight, std=0.05)
    inputs = refiner_inputs(*gap()[:5], torch.tensor([0.25, 0.6]))
    with torch.no_grad():
        torch.testing.assert_close(refiner.symmetric(reversed_inputs(inputs)), refiner.symmetric(inputs),
                                   atol=1e-5, rtol=0)
        assert (refiner(reversed_inputs(inputs)) - refiner(inputs)).abs().max() > 1e-2
