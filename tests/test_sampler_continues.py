"""A tiny model trained on a smooth moving-blob sequence continues it, by :func:`inpaint` of a grid and by
:func:`sample_sequence` frame by frame, which fails if the known cells were ignored or put in the wrong place."""

from __future__ import annotations

import math

import pytest
import torch

from ctgridit.core.diffusion import diffusion_loss, make_sample_scheduler, make_train_scheduler
from ctgridit.core.dit import GridDiT, create_dit
from ctgridit.core.grid import cell_mask, tile, untile
from ctgridit.core.sampler import RePaint, inpaint, plan_sequence, sample_sequence

# ------------------------------------- it really continues a sequence
PERIOD, SIZE = 24, 8


def blob_frame(f: float) -> torch.Tensor:
    """Frame ``f`` of a fixed smooth sequence: a Gaussian blob going round a circle, ``(1, 8, 8)`` in [-1, 1]."""
    angle = 2 * math.pi * f / PERIOD
    cy, cx = 3.5 + 2.2 * math.sin(angle), 3.5 + 2.2 * math.cos(angle)
    y = torch.arange(SIZE, dtype=torch.float32).view(SIZE, 1)
    x = torch.arange(SIZE, dtype=torch.float32).view(1, SIZE)
    return (2 * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 1.2 ** 2)) - 1).unsqueeze(0)


BLOB = torch.stack([blob_frame(f) for f in range(PERIOD)])               # (P, 1, 8, 8), periodic


def blob_frames(starts: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count, 1, 8, 8)``: ``count`` consecutive frames from each start."""
    return BLOB[(starts.view(-1, 1) + torch.arange(count).view(1, -1)) % PERIOD]


def new_model() -> GridDiT:
    return create_dit("DiT-tiny/2", sample_height=16, sample_width=16, in_channels=1, grid_rows=2, grid_cols=2,
                      hidden_size=64, depth=3, num_heads=4)


@pytest.fixture(scope="module")
def blob_models():
    """A stage-1 model trained on 2x2 grids of consecutive blob frames (fixed seed), and an untrained one."""
    torch.manual_seed(0)
    model = new_model()
    scheduler = make_train_scheduler(clip_sample=True)                    # pixel space: x0 is in [-1, 1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(900):
        starts = torch.randint(0, PERIOD, (32,), generator=g)
        loss = diffusion_loss(model, scheduler, tile(blob_frames(starts, 4), 2, 2), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(1)
    return model.eval(), new_model().eval(), scheduler, loss.item()


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.slow
def test_trained_model_continues_the_sequence(blob_models):
    model, untrained, train_scheduler, last_loss = blob_models
    assert last_loss < 0.1
    scheduler = make_sample_scheduler(train_scheduler, "ddim", 20)
    starts = torch.arange(0, PERIOD, 2)                                  # 12 different phases
    # grid k-1 holds frames s..s+3; grid k has its last row (s+2, s+3) first and must continue with s+4, s+5
    truth = blob_frames(starts + 2, 4)
    known = tile(truth, 2, 2)
    mask = cell_mask([1, 1, 0, 0], 2, 2, SIZE, SIZE)
    with torch.no_grad():
        out = inpaint(model, scheduler, known * mask, mask, generator=torch.Generator().manual_seed(1),
                      repaint=RePaint(2, 4))
        free = inpaint(model, scheduler, known, None, generator=torch.Generator().manual_seed(1),
                       repaint=RePaint(2, 4))
        blind = inpaint(untrained, scheduler, known * mask, mask, generator=torch.Generator().manual_seed(1))
    new = untile(out, 2, 2)[:, 2:]                                       # (B, 2, 1, 8, 8)
    assert torch.equal(untile(out, 2, 2)[:, :2], truth[:, :2])
    target = truth[:, 2:]                                                # frames s+4, s+5
    err = mse(new, target)
    far = mse(new, blob_frames(starts + 4 + PERIOD // 2, 2))            # the opposite side of the circle
    backwards = mse(new, blob_frames(starts, 2))                        # s, s+1: the sequence run backwards
    ignored = mse(untile(free, 2, 2)[:, 2:], target)                    # what the model makes without context
    untrained_err = mse(untile(blind, 2, 2)[:, 2:], target)
    assert err < 0.05, err
    assert err < 0.25 * far, (err, far)
    assert err < 0.25 * backwards, (err, backwards)
    assert err < 0.25 * ignored, (err, ignored)
    assert err < 0.1 * untrained_err, (err, untrained_err)
    per_item = ((new - target) ** 2).mean(dim=(1, 2, 3, 4))
    assert (per_item < 0.15).all(), per_item                             # every phase, not on average


@pytest.mark.slow
def test_trained_model_extends_a_sequence_frame_by_frame(blob_models):
    """sample_sequence alone (no interpolation): consecutive frames advance by about one step.

    Taking the wrong rows of grid ``k-1`` (its first row) makes the phase go back and forth,
    ignoring them makes it jump, and swapping new frames makes steps of -1 and +3.
    """
    model, _, train_scheduler, _ = blob_models
    scheduler = make_sample_scheduler(train_scheduler, "ddpm", 20)
    with torch.no_grad():
        frames = sample_sequence(model, scheduler, plan_sequence(10, 2, 2, control_rows=1, levels=0),
                                 frame_shape=(1, SIZE, SIZE), batch_size=8,
                                 generator=torch.Generator().manual_seed(2), repaint=RePaint(2, 4))
    assert frames.shape == (8, 10, 1, SIZE, SIZE)
    # the phase of every frame: the nearest frame of the true sequence
    dist = ((frames.unsqueeze(2) - BLOB.view(1, 1, PERIOD, 1, SIZE, SIZE)) ** 2).mean(dim=(3, 4, 5))
    best, phase = dist.min(dim=2)                                       # (B, N)
    assert float(best.mean()) < 0.05, best                              # frames look like frames of the sequence
    step = (phase[:, 1:] - phase[:, :-1] + PERIOD // 2) % PERIOD - PERIOD // 2   # signed, in [-12, 12)
    assert float(((step >= 0) & (step <= 2)).float().mean()) >= 0.9, phase
    assert 0.6 < float(step.float().mean()) < 1.4, phase
    assert float((step == 1).float().mean()) >= 0.5, phase
