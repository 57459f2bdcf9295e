"""Synthesis benchmark: time and quality of 201-slice volumes of the bundled model (the synthesis issues).

    python pipelines/bench_synth.py                        # bundled model, 201 slices, CPU, 3 timing rounds
    python pipelines/bench_synth.py --picture docs.png     # also the three planes next to a real chest
    python pipelines/bench_synth.py --model runs/ctrate_xl/model --device cuda --seeds 0

Prints
- **time**, in alternating rounds: one 201-slice volume (seed 0) by GriDiT
  (stage 1, decoding, stage 2), then the naive baseline of the same size: every
  slice generated at full resolution by its own reverse diffusion with a DiT
  of stage 1's width, depth and patch and the same sampler and steps, one
  after the other (timed on ``--baseline-slices`` slices and scaled). The
  median and the range of each and of their ratio;
- **geometry**: slices, spacing, in-plane size and field of view;
- **quality** for every seed (``--seeds``, default 0 to 3), each against the
  issue's target: HU 1st and 99th percentile; mean |HU difference| of
  neighbouring slices against a real thin-slice chest (LIDC-IDRI-0314)
  resampled to the model's spacing; where the lungs lie
  (:class:`~ctgridit.ct.along_z.LungExtent`: peak lung fraction, its minimum
  in the first and last fifth over the peak, the length where it is at least
  half the peak); the largest SSIM between slices more than 45 mm apart, of
  the volume and of the stage-1 slices alone upsampled (the anatomy without
  stage 2's detail); how close each slice comes to the training scans (SSIM
  of the nearest training slice at the same spacing, median and max:
  :func:`~ctgridit.ct.evaluate.nearest_slice_ssim`); and how much the seeds
  differ. The same numbers for the four real chests come first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ctgridit.data_folder import data_folder
from ctgridit.core.diffusion import make_sample_scheduler
from ctgridit.core.dit import GridDiT
from ctgridit.core.grid import resize_frames
from ctgridit.core.sampler import inpaint
from ctgridit.ct.adapter import sequence_to_volume
from ctgridit.ct.along_z import lung_extent, max_far_ssim, neighbour_difference
from ctgridit.ct.evaluate import nearest_slice_ssim
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.synthesis import load_model

DATA = data_folder()
#: The real chests: the thin one the neighbour differences are measured against first.
CHESTS = [DATA / "lidc_idri" / "LIDC-IDRI-0314.nii.gz", DATA / "lidc_idri" / "LIDC-IDRI-0001.nii.gz",
          DATA / "lung_pet_ct_dx" / "A0001_5mm_kernelB.nii.gz", DATA / "lung_pet_ct_dx" / "A0002_8mm_B40f.nii.gz"]
FAR_MM = 45.0


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def naive_baseline(pipeline, num_slices: int) -> float:
    """Seconds to generate ``num_slices`` full-resolution frames one by one with a DiT of stage 1's size."""
    s1, cfg = pipeline.stage1.config, pipeline.settings.sampling.stage1
    h, w = pipeline.codec.latent_size(*pipeline.settings.frame_size)
    model = GridDiT(sample_height=h, sample_width=w, in_channels=s1.in_channels, patch_size=s1.patch_size,
                    hidden_size=s1.hidden_size, depth=s1.depth, num_heads=s1.num_heads, mlp_ratio=s1.mlp_ratio,
                    grid_rows=1, grid_cols=1).to(pipeline.device).eval()
    scheduler = make_sample_scheduler(pipeline.scheduler, cfg.sampler, cfg.num_steps)
    generator = torch.Generator().manual_seed(0)
    frame = torch.zeros(1, s1.in_channels, h, w, device=pipeline.device)
    began = time.perf_counter()
    with torch.no_grad():
        for _ in range(num_slices):
            inpaint(model, scheduler, frame, None, generator=generator)
    return time.perf_counter() - began


def generate(pipeline, num_slices: int, seed: int) -> tuple[CTVolume, CTVolume, dict[str, float]]:
    """One volume, the same volume's stage-1 slices upsampled (anatomy only), and the time of each phase."""
    cfg = pipeline.settings
    spacing, window = cfg.adapter["spacing"], cfg.adapter["window"]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents, t1 = timed(lambda: pipeline.sample_latents(num_slices, 1, generator))
        lr, t_dec1 = timed(lambda: pipeline.codec.decode(latents.flatten(0, 1)))
        hr, t2 = timed(lambda: pipeline.super_resolve(lr, generator, sequence_length=num_slices))
        volume, t_dec2 = timed(lambda: sequence_to_volume(hr.clamp(-1, 1), spacing, window))
    coarse = sequence_to_volume(resize_frames(lr, cfg.frame_size).clamp(-1, 1), spacing, window)
    times = {"stage 1": t1, "decoding": t_dec1 + t_dec2, "stage 2": t2}
    times["total"] = sum(times.values())
    return volume, coarse, times


def real_chest(pipeline, path: Path) -> CTVolume:
    """A real chest prepared like training data, at the model's spacing and size."""
    from ctgridit.ct.sequences import load_ct_sequences

    cfg = pipeline.settings
    frames = load_ct_sequences([path], spacing=cfg.adapter["spacing"], window=cfg.adapter["window"],
                               in_plane=tuple(cfg.frame_size))[0]
    return sequence_to_volume(frames, cfg.adapter["spacing"], cfg.adapter["window"], source=path.name)


def describe(name: str, volume: CTVolume, coarse: CTVolume | None, reference: float, far: int,
             training: np.ndarray | None = None) -> dict:
    """Print one line of the quality figures of ``volume`` against the targets; return whether each holds."""
    hu = volume.array
    p1, p99 = np.percentile(hu, [1, 99])
    lungs = lung_extent(hu, volume.spacing[2])
    ratio = neighbour_difference(hu) / reference
    far_ssim = max_far_ssim(hu, far)
    anatomy = f", stage 1 alone {max_far_ssim(coarse.array, far):.2f}" if coarse is not None else ""
    nearest = ""
    if training is not None:
        values = nearest_slice_ssim(hu, training)
        nearest = f" | nearest training slice SSIM median {np.median(values):.2f} max {values.max():.2f}"
    held = {"HU": p1 < -800 and p99 > 100, "neighbours": 0.5 <= ratio <= 2.0, **lungs.checks(),
            "far SSIM": far_ssim < 0.75}
    missed = [k for k, ok in held.items() if not ok]
    print(f"{name:15s} HU p1 {p1:6.0f} p99 {p99:5.0f} | neighbours {ratio:4.2f}x the real chest | lungs: peak "
          f"{lungs.peak:.2f}, ends {lungs.first_fifth:.2f} / {lungs.last_fifth:.2f} of the peak, "
          f"{lungs.length_mm:3.0f} mm at half the peak | far SSIM {far_ssim:.2f}{anatomy}{nearest} | "
          + ("all targets met" if not missed else "misses: " + ", ".join(missed)))
    return held


def print_times(args, ours: list[float], base: list[float], ratios: list[float], phases: list[dict]) -> None:
    median = statistics.median
    print(f"\n{args.slices} slices, {args.rounds} alternating rounds (median, range):")
    print(f"  GriDiT   {median(ours):6.1f} s  ({min(ours):.1f} .. {max(ours):.1f}); phases of the median round: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(phases, key=lambda p: p['total'])[len(phases) // 2].items()))
    print(f"  baseline {median(base):6.1f} s  ({min(base):.1f} .. {max(base):.1f}), timed on "
          f"{args.baseline_slices} slices and scaled")
    print(f"  baseline / GriDiT {median(ratios):.2f}x ({min(ratios):.2f} .. {max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--slices", type=int, default=201)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (GriDiT, then the baseline)")
    parser.add_argument("--baseline-slices", type=int, default=20,
                        help="time the baseline on this many slices and scale up")
    parser.add_argument("--picture", default=None, help="write the three planes of seed 0 next to the real chest")
    args = parser.parse_args()

    pipeline = load_model(args.model, args.device)
    cfg, s1, s2 = pipeline.settings, pipeline.settings.sampling.stage1, pipeline.settings.sampling.stage2
    print(f"model: {args.model or 'bundled'}; stage 1 {pipeline.stage1.config.hidden_size}x{pipeline.stage1.config.depth}"
          f" patch {pipeline.stage1.config.patch_size} ({'masked-conditional' if pipeline.masked else 'unconditional'},"
          f" strides up to {pipeline.max_stride}); frames {cfg.frame_size} at {cfg.adapter['spacing']} mm; grid "
          f"{cfg.grid.rows}x{cfg.grid.cols} factor {cfg.grid.factor}; stage 1 {s1.sampler} {s1.num_steps} steps, "
          f"{s1.levels} interpolation level(s); stage 2 {s2.sampler} {s2.num_steps} steps at "
          f"strength {s2.strength}; device {pipeline.device}; threads {torch.get_num_threads()}")

    ours, base, phases = [], [], []
    generate(pipeline, 8, 0)                                                  # warm-up
    for _ in range(args.rounds):
        _, _, times = generate(pipeline, args.slices, 0)
        ours.append(times["total"])
        phases.append(times)
        base.append(naive_baseline(pipeline, args.baseline_slices) * args.slices / args.baseline_slices)
    ratios = [b / o for b, o in zip(base, ours)]
    if args.rounds:
        print_times(args, ours, base, ratios, phases)

    spacing = cfg.adapter["spacing"]
    shape = (*cfg.frame_size[::-1], args.slices)
    print(f"\ngeometry: {shape[0]} x {shape[1]} x {shape[2]} voxels of {spacing[0]:g} x {spacing[1]:g} x "
          f"{spacing[2]:g} mm: {shape[0] * spacing[0]:g} x {shape[1] * spacing[1]:g} mm field of view, "
          f"{args.slices} slices over {(args.slices - 1) * spacing[2]:g} mm")
    reals = [real_chest(pipeline, path) for path in CHESTS]
    real = reals[0]
    reference = neighbour_difference(real.array)
    training = np.concatenate([r.array for r in reals], axis=2)                 # the model's training slices
    far = int(np.ceil(FAR_MM / spacing[2]))
    print(f"\nquality ({args.slices} slices; far = more than {FAR_MM:.0f} mm, i.e. {far} slices, apart; neighbours "
          f"against {real.source}; nearest training slice among the {training.shape[2]} slices of the four chests):")
    for chest in reals:
        describe(chest.source.split(".")[0], chest, None, reference, far)
    volumes, held = [], []
    for seed in args.seeds:
        volume, coarse, _ = generate(pipeline, args.slices, seed)
        held.append(describe(f"seed {seed}", volume, coarse, reference, far, training))
        volumes.append(volume)
    for i in range(1, len(volumes)):
        print(f"mean |HU difference| seed {args.seeds[0]} vs {args.seeds[i]}: "
              f"{np.abs(volumes[i].array - volumes[0].array).mean():.0f}")
    if held:
        print("targets met on every seed: " + ", ".join(f"{k} {'yes' if all(h[k] for h in held) else 'NO'}"
                                                       for k in held[0]))
    if args.picture and volumes:
        from ctgridit.ct.preview import save_comparison

        save_comparison([(f"generated, seed {args.seeds[0]}", volumes[0]), (f"real chest, {real.source.split('.')[0]}", real)],
                        args.picture)
        print(f"picture: {args.picture}")


if __name__ == "__main__":
    main()
