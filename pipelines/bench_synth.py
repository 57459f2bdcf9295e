"""Synthesis benchmark: time and quality of a 201-slice volume with the bundled model.

    python pipelines/bench_synth.py                  # bundled model, 201 slices, seed 0, CPU
    python pipelines/bench_synth.py --model runs/ct_small/model --slices 201 --device cuda

Prints
- the time of stage 1 (grid sampler), decoding (latents to HU volume) and
  stage 2 (per-slice super-resolution), and the total;
- the time of a naive baseline of the same model size: every slice generated
  at full resolution by its own reverse diffusion (same DiT width, depth and
  patch, same number of steps), one after the other, without the grid, and
  the ratio baseline / ours;
- the checks of the issue on the volume: HU 1st and 99th percentile, mean
  absolute difference of neighbouring slices against the held-out real scan
  resampled to the model's spacing, the largest SSIM between slices more than
  30 apart (also for the stage-1 slices alone, upsampled: the anatomy without
  stage 2's fine detail), and the mean absolute difference from a second seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ctgridit.core.diffusion import make_sample_scheduler
from ctgridit.core.dit import GridDiT
from ctgridit.core.grid import resize_frames
from ctgridit.core.sampler import inpaint
from ctgridit.ct.adapter import sequence_to_volume
from ctgridit.ct.quality import max_far_ssim, neighbour_difference, reference_neighbour_difference
from ctgridit.synthesis import load_model, synthesize

HELD_OUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "lung_pet_ct_dx" / "A0002_8mm_B40f.nii.gz"
FAR = 30


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def naive_baseline(pipeline, num_slices: int, steps: int) -> float:
    """Seconds to generate ``num_slices`` full-resolution frames one by one with a DiT of stage 1's size."""
    s1 = pipeline.stage1.config
    h, w = pipeline.codec.latent_size(*pipeline.config.frame_size)
    model = GridDiT(sample_height=h, sample_width=w, in_channels=s1.in_channels, patch_size=s1.patch_size,
                    hidden_size=s1.hidden_size, depth=s1.depth, num_heads=s1.num_heads, mlp_ratio=s1.mlp_ratio,
                    grid_rows=1, grid_cols=1).to(pipeline.device).eval()
    scheduler = make_sample_scheduler(pipeline.scheduler, pipeline.config.sampling.stage1.sampler, steps)
    generator = torch.Generator().manual_seed(0)
    frame = torch.zeros(1, s1.in_channels, h, w, device=pipeline.device)
    began = time.perf_counter()
    with torch.no_grad():
        for _ in range(num_slices):
            inpaint(model, scheduler, frame, None, generator=generator)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--slices", type=int, default=201)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline-slices", type=int, default=None,
                        help="time the baseline on fewer slices and scale up (default: all)")
    parser.add_argument("--no-second-seed", action="store_true", help="skip the second-seed volume")
    args = parser.parse_args()

    pipeline = load_model(args.model, args.device)
    cfg = pipeline.config
    print(f"model: {args.model or 'bundled'}; stage 1 {pipeline.stage1.config.hidden_size}x{pipeline.stage1.config.depth}"
          f" patch {pipeline.stage1.config.patch_size}; frames {cfg.frame_size}; grid {cfg.grid.rows}x{cfg.grid.cols}"
          f" factor {cfg.grid.factor}; {cfg.sampling.stage1.sampler} {cfg.sampling.stage1.num_steps} +"
          f" {cfg.sampling.stage2.sampler} {cfg.sampling.stage2.num_steps} steps;"
          f" device {pipeline.device}; threads {torch.get_num_threads()}")
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        latents, t1 = timed(lambda: pipeline.sample_latents(args.slices, 1, generator))
        lr, t_dec1 = timed(lambda: pipeline.codec.decode(latents.flatten(0, 1)))
        hr, t2 = timed(lambda: pipeline.super_resolve(lr, generator))
        volume, t_dec2 = timed(lambda: sequence_to_volume(hr.clamp(-1, 1), cfg.adapter["spacing"], cfg.adapter["window"]))
    decode = t_dec1 + t_dec2
    total = t1 + decode + t2
    print(f"\n{args.slices} slices: stage 1 {t1:.1f} s, decoding {decode:.2f} s, stage 2 {t2:.1f} s, total {total:.1f} s")

    baseline_slices = args.baseline_slices or args.slices
    base = naive_baseline(pipeline, baseline_slices, cfg.sampling.stage1.num_steps) * args.slices / baseline_slices
    note = "" if baseline_slices == args.slices else f" (timed on {baseline_slices} slices, scaled)"
    print(f"naive baseline (every slice at full resolution, one by one, same DiT size, {cfg.sampling.stage1.num_steps} steps):"
          f" {base:.1f} s{note}; baseline / GriDiT = {base / total:.2f}x")

    hu = volume.array
    p1, p99 = np.percentile(hu, [1, 99])
    gen = neighbour_difference(hu)
    real = reference_neighbour_difference(HELD_OUT, cfg.adapter["spacing"], cfg.frame_size)
    print(f"\nshape {hu.shape}, spacing {volume.spacing} mm")
    print(f"HU p1 {p1:.0f} (< -800: {p1 < -800}), p99 {p99:.0f} (> 100: {p99 > 100})")
    print(f"neighbouring-slice mean |dHU|: generated {gen:.1f}, held-out real {real:.1f}, ratio {gen / real:.2f} "
          f"(0.5..2: {0.5 <= gen / real <= 2})")
    far = max_far_ssim(hu, FAR)
    print(f"largest SSIM between slices more than {FAR} apart: {far:.3f} (< 0.9: {far < 0.9})")
    coarse = sequence_to_volume(resize_frames(lr, cfg.frame_size).clamp(-1, 1), cfg.adapter["spacing"],
                                cfg.adapter["window"]).array
    print(f"  the same for the stage-1 slices upsampled, without stage 2's detail (anatomy only): "
          f"{max_far_ssim(coarse, FAR):.3f}")
    if not args.no_second_seed:
        other = synthesize(args.slices, 1, args.seed + 1, pipeline)[0].array
        print(f"mean |HU difference| seed {args.seed} vs {args.seed + 1}: {np.abs(other - hu).mean():.1f}")


if __name__ == "__main__":
    main()
