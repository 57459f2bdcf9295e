"""The gate before a long run: does a stage-1 checkpoint draw chests? (issue 27)

    python pipelines/gate_stage1.py runs/ct_chest_coarse/checkpoints/stage1/step_00001000 --picture gate.png
    python pipelines/gate_stage1.py runs/ct_chest/model --seeds 0 1 2 3      # an exported model folder

For every seed it samples stage 1 alone (DDIM, the model's steps), from the
checkpoint's EMA weights:

- one **unconditional grid** (the sampler's first grid), and prints the lung
  fraction of the body (voxels below -500 HU inside the body) of each cell;
- a **sequence grown by extension** from it (``--frames`` frames at the
  model's coarsest stride, no interpolation), and prints its lung fraction
  frame by frame, the peak, and how many separate lungs the frame at the peak
  shows (:func:`~ctgridit.ct.along_z.lung_regions`).

A route passes the gate when mid-chest cells show two dark lungs inside a
body outline: on every seed, the peak lung fraction of the sequence is at least
0.2 and the frame at the peak shows two lungs. ``--picture`` writes the cells
of every sequence (one row per seed, lung window), upsampled to the frame size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ctgridit.core.grid import resize_frames
from ctgridit.ct.adapter import sequence_to_volume
from ctgridit.ct.along_z import lung_fraction, lung_regions

PASS_PEAK = 0.2


def load(path: Path):
    """A pipeline from a stage-1 checkpoint folder or an exported model folder (stage 1 is all the gate uses)."""
    if (path / "ema.safetensors").is_file():
        from ctgridit.training.trainer import checkpoint_pipeline

        return checkpoint_pipeline(path)
    from ctgridit.core.pipeline import GriDiTPipeline

    return GriDiTPipeline.from_pretrained(path)


def to_hu(pipeline, latents: torch.Tensor) -> np.ndarray:
    """``(N, c, h, w)`` stage-1 latents -> an ``(X, Y, N)`` HU volume at the full frame size (bicubic)."""
    frames = resize_frames(pipeline.codec.decode(latents), pipeline.settings.frame_size).clamp(-1, 1)
    adapter = pipeline.settings.adapter
    return sequence_to_volume(frames, adapter["spacing"], adapter["window"]).array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a stage-1 checkpoint folder (step_XXXXXXXX) or a model folder")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--frames", type=int, default=24, help="frames of the extension sequence (coarsest stride)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    parser.add_argument("--picture", default=None, help="PNG of every sequence's cells, one row per seed")
    args = parser.parse_args()

    pipeline = load(args.model)
    stride = coarsest_stride(pipeline)
    mm = pipeline.settings.adapter["spacing"][2] * stride
    print(f"{args.model}: stage 1 extends at stride {stride} ({mm:g} mm between frames)")
    rows, passed = [], True
    for seed in args.seeds:
        generator = torch.Generator().manual_seed(seed)
        began = time.perf_counter()
        latents = sample_step1(pipeline, args.frames, generator, args.steps)
        hu = to_hu(pipeline, latents)
        fraction, regions = lung_fraction(hu), lung_regions(hu)
        peak = int(np.argmax(fraction))
        ok = fraction[peak] >= PASS_PEAK and regions[peak] == 2
        passed &= ok
        print(f"seed {seed}: first grid cells {' '.join(f'{v:.2f}' for v in fraction[:4])} | sequence "
              f"{' '.join(f'{v:.2f}' for v in fraction)} | peak {fraction[peak]:.2f} at frame {peak} "
              f"({peak * mm:.0f} mm), {regions[peak]} lung(s) there | {'pass' if ok else 'FAIL'} "
              f"({time.perf_counter() - began:.0f} s)")
        rows.append(hu)
    print(f"gate: {'PASS' if passed else 'FAIL'} (every seed: peak lung fraction >= {PASS_PEAK} and two lungs there)")
    if args.picture:
        save_rows(rows, args.picture)
        print(f"picture: {args.picture}")


def coarsest_stride(pipeline) -> int:
    """The stride of step 1 (extension) in frames of the output: ``(R*C - 1)^levels``."""
    from ctgridit.core.sampler import level_strides

    cfg = pipeline.settings.sampling.stage1
    return level_strides(pipeline.settings.grid.cells, cfg.levels, cfg.k)[0] or 1


def sample_step1(pipeline, frames: int, generator: torch.Generator, steps: int | None) -> torch.Tensor:
    """Stage 1's step 1 alone: ``frames`` frames by extension at the model's coarsest stride, ``(N, c, h, w)``."""
    from ctgridit.core.diffusion import make_sample_scheduler
    from ctgridit.core.sampler import plan_sequence, sample_sequence

    cfg, grid = pipeline.settings.sampling.stage1, pipeline.settings.grid
    scheduler = make_sample_scheduler(pipeline.scheduler, cfg.sampler, steps or cfg.num_steps)
    plan = plan_sequence(frames, grid.rows, grid.cols, cfg.control_rows, levels=0)
    lh, lw = pipeline.codec.latent_size(*pipeline.settings.lr_frame_size)
    model, label = pipeline.stage1, coarsest_stride(pipeline)
    if pipeline.max_stride:                          # step 1's grids carry the coarsest stride as their label
        def model(x, t, stride=None, **inputs):
            return pipeline.stage1(x, t, stride=torch.full_like(t, label), **inputs)
        model.config = pipeline.stage1.config        # the condition is made as the model's config says
    with torch.no_grad():
        latents = sample_sequence(model, scheduler, plan, frame_shape=(pipeline.codec.latent_channels, lh, lw),
                                  conditional=pipeline.masked, generator=generator, device=pipeline.device,
                                  dtype=pipeline.dtype)
    return latents[0]


def save_rows(volumes: list[np.ndarray], path: str) -> None:
    """One row per volume of its axial slices side by side (lung window -1000..200 HU), as a PNG."""
    from PIL import Image

    rows = []
    for hu in volumes:
        unit = np.clip((hu + 1000.0) / 1200.0, 0, 1)                        # (X, Y, N)
        rows.append(np.concatenate([unit[:, :, k].T for k in range(unit.shape[2])], axis=1))
    width = max(r.shape[1] for r in rows)
    picture = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows], axis=0)
    Image.fromarray((picture * 255).astype(np.uint8)).save(path)


if __name__ == "__main__":
    main()
