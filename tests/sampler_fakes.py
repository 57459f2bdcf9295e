"""Stand-ins for a trained model in the sampler tests: a tiny random DiT and a call recorder."""

from __future__ import annotations

import torch

from ctgridit.core.diffusion import make_train_scheduler
from ctgridit.core.dit import GridDiT, create_dit

TRAIN = make_train_scheduler()


def tiny_model(rows: int = 2, cols: int = 2, channels: int = 2, frame: int = 4, seed: int = 0) -> GridDiT:
    """A DiT-tiny/2 over ``rows x cols`` grids of ``frame x frame`` latents, with random (non-zero) weights."""
    model = create_dit("DiT-tiny/2", sample_height=rows * frame, sample_width=cols * frame, in_channels=channels,
                       grid_rows=rows, grid_cols=cols).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


class Recorder:
    """Wraps a model (or any ``f(x, t)``), counting calls and recording inputs."""

    def __init__(self, fn=None, keep: bool = False):
        self.fn = fn if fn is not None else (lambda x, t: 0.1 * x)
        self.keep = keep
        self.batches: list[int] = []
        self.inputs: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []

    def __call__(self, x, t, **inputs):
        assert t.shape == (x.shape[0],)
        assert t.unique().numel() == 1                  # one level for the whole batch
        self.batches.append(x.shape[0])
        if self.keep:
            self.inputs.append(x.detach().clone())
            self.timesteps.append(t.detach().clone())
        return self.fn(x, t, **inputs)
