"""Noise or clean-sample prediction for a pixel-space grid DiT: which one can learn a tiny data set?

    python pipelines/compare_prediction.py --steps 1000

The data set is one moving-squares clip (``ctgridit.video.shapes``): its 16
different 4 x 4 grids of 16 x 16 RGB frames, which a model that learns at all
should reproduce. The same grid DiT (DiT-S/4 cut to depth 3, hidden 96: the
``video_shapes.yaml`` model; a 4 x 4 x 3 patch is 48 numbers) is trained
unconditionally with the same seed, steps and batch three times: predicting the
noise with the paper's plain MSE; predicting the noise with Min-SNR-5 weights;
predicting the clean grid with Min-SNR-5 weights (``diffusion: {prediction:
sample, min_snr: 5}``). The last two weigh every level alike, so they differ only
in what the network outputs. Printed for each:

- the error of its noise estimate at several diffusion levels (for the x0 model,
  the noise its x0 implies), on training grids: what is left in a sample when
  the last steps do not remove the noise;
- for 8 grids sampled with DDPM (1000 steps) and DDIM (50 steps), the mean
  absolute difference from the nearest training grid (pixel values in [-1, 1]);
  for scale, the training grids are 0.117 from their nearest other one.

``--pictures DIR`` writes the sampled grids as PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ctgridit.core.diffusion import (
    diffusion_loss,
    make_sample_scheduler,
    make_train_scheduler,
    scheduler_step,
)
from ctgridit.core.dit import create_dit
from ctgridit.core.grid import tile
from ctgridit.video.shapes import CirclingSquare

LEVELS = (10, 100, 300, 500, 700, 900)
SETTINGS = [("epsilon", None), ("epsilon", 5.0), ("sample", 5.0)]   # (prediction, min_snr)


def clip_grids() -> torch.Tensor:
    """The 16 different 4 x 4 grids ``(16, 3, 64, 64)`` in [-1, 1] of one clip (period 16, phase 0)."""
    video = CirclingSquare().clip(32, 0.0)                                         # (32, 16, 16, 3) uint8
    frames = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 127.5 - 1      # (32, 3, 16, 16)
    return torch.stack([tile(frames[k:k + 16], 4, 4) for k in range(16)])


def noise_error(model, scheduler, grids: torch.Tensor, t: int, generator: torch.Generator) -> float:
    """Mean squared error of the noise the model's output implies, at level ``t``, on training grids."""
    idx = torch.randint(0, len(grids), (64,), generator=generator)
    noise = torch.randn((64, *grids.shape[1:]), generator=generator)
    level = torch.full((64,), t)
    noisy = scheduler.add_noise(grids[idx], noise, level)
    with torch.no_grad():
        out = model(noisy, level)
    if scheduler.config.prediction_type == "sample":
        abar = float(scheduler.alphas_cumprod[t])
        out = (noisy - abar ** 0.5 * out) / (1 - abar) ** 0.5
    return float((out - noise).square().mean())


def sample(model, train, sampler: str, steps: int, count: int = 8) -> torch.Tensor:
    scheduler = make_sample_scheduler(train, sampler, steps)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(count, 3, 64, 64, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler_step(scheduler, model(x, int(t)), int(t), x, generator)
    return x


def nearest(samples: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of each sample from its nearest training grid."""
    return (torch.cdist(samples.flatten(1), grids.flatten(1), p=1) / grids[0].numel()).min(dim=1).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pictures", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    grids = clip_grids()
    others = torch.cdist(grids.flatten(1), grids.flatten(1), p=1) / grids[0].numel()
    others.fill_diagonal_(float("inf"))
    print(f"one clip: {len(grids)} grids of {tuple(grids.shape[1:])}; nearest other training grid "
          f"{float(others.min(dim=1).values.mean()):.3f} on average; {args.steps} steps, batch 16, lr {args.lr}")
    for prediction, min_snr in SETTINGS:
        torch.manual_seed(0)
        model = create_dit("DiT-S/4", sample_height=64, sample_width=64, in_channels=3, depth=3, hidden_size=96,
                           num_heads=4, grid_rows=4, grid_cols=4)
        train = make_train_scheduler(clip_sample=True, prediction_type=prediction)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
        generator, start, losses = torch.Generator().manual_seed(1), time.perf_counter(), []
        for _ in range(args.steps):
            batch = grids[torch.randint(0, len(grids), (16,), generator=generator)]
            loss = diffusion_loss(model, train, batch, generator=generator, min_snr=min_snr)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss))
        model.eval()
        print(f"\n{prediction} prediction (min_snr {min_snr}): trained in {time.perf_counter() - start:.0f} s, "
              f"loss of the last 100 steps {np.mean(losses[-100:]):.4f}")
        errors = {t: noise_error(model, train, grids, t, torch.Generator().manual_seed(2)) for t in LEVELS}
        print("  noise error by level: " + ", ".join(f"t={t}: {e:.4f}" for t, e in errors.items()))
        for sampler, steps in (("ddpm", 1000), ("ddim", 50)):
            out = sample(model, train, sampler, steps)
            d = nearest(out, grids)
            print(f"  {sampler} {steps} steps: nearest training grid {float(d.median()):.3f} median "
                  f"({float(d.min()):.3f} .. {float(d.max()):.3f}) over {len(d)} samples")
            if args.pictures:
                import imageio.v3 as iio

                args.pictures.mkdir(parents=True, exist_ok=True)
                image = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)   # (8, 64, 64, 3)
                row = torch.cat(list(image), dim=1).repeat_interleave(3, 0).repeat_interleave(3, 1)
                iio.imwrite(args.pictures / f"{prediction}_{min_snr}_{sampler}.png", row.numpy())


if __name__ == "__main__":
    main()
