"""Denoising speed: a 512 x 512 x 100 real scan with 50 HU of noise through the bundled denoiser.

    python pipelines/bench_denoise.py                    # 2 rounds on the CPU
    python pipelines/bench_denoise.py --device cuda --rounds 5

The volume is the first 100 slices of LIDC-IDRI-0314 (512 x 512, 0.78 mm, 1 mm
slices) with Gaussian noise of 50 HU. Prints the seconds of every round of
``denoise_volume`` (reading and writing excluded), their median and range, the
number of model windows and the time per window, and the PSNR before and after.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from ctgridit.data_folder import data_folder
from ctgridit.ct.io import read_ct
from ctgridit.ct.fidelity import psnr
from ctgridit.ct.noise import add_noise
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.denoising import denoise_volume, load_denoiser

SCAN = data_folder() / "lidc_idri" / "LIDC-IDRI-0314.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="denoiser model folder (default: the bundled one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slices", type=int, default=100)
    args = parser.parse_args()

    scan = read_ct(SCAN)
    clean = CTVolume(np.ascontiguousarray(scan.array[:, :, :args.slices]), scan.affine)
    noisy = add_noise(clean, 50.0, seed=0)
    pipeline = load_denoiser(args.model, args.device)
    print(f"{' x '.join(map(str, clean.shape))} voxels, 50 HU Gaussian noise; model "
          f"{pipeline.stage1.config.hidden_size}x{pipeline.stage1.config.depth} patch {pipeline.stage1.config.patch_size}, "
          f"tiles {pipeline.settings.frame_size}; device {pipeline.device}; threads {torch.get_num_threads()}")
    calls = []
    forward = pipeline.stage1.forward
    pipeline.stage1.forward = lambda x, *a, **k: (calls.append(len(x)), forward(x, *a, **k))[1]
    seconds = []
    for _ in range(args.rounds):
        calls.clear()
        result = denoise_volume(noisy, "gridit", model=pipeline)
        seconds.append(result.seconds)
        print(f"  round: {result.seconds:.1f} s, {sum(calls)} windows in {len(calls)} model calls", flush=True)
    median = statistics.median(seconds)
    print(f"denoise: median {median:.1f} s (range {min(seconds):.1f} .. {max(seconds):.1f}), "
          f"{1000 * median / max(1, sum(calls)):.1f} ms per window; target 120 s: {median <= 120}")
    print(f"PSNR {psnr(clean.array, noisy.array):.2f} dB -> {psnr(clean.array, result.volume.array):.2f} dB "
          f"(t* {result.details['t']}, noise estimate {result.details['noise_estimated_hu']:.1f} HU)")


if __name__ == "__main__":
    main()
