"""Denoising evaluation: gridit (the bundled model) against bilateral and NLM on real scans.

    python pipelines/eval_denoise.py                      # three scans of ../shared/data/ct, sigma 20/50/100
    python pipelines/eval_denoise.py --all --png eval.png # every NIfTI scan there
    python pipelines/eval_denoise.py --model runs/ct_small/model --device cuda

For every scan and sigma: Gaussian noise (``ctgridit add-noise``, seed 0), then
each method through ``ctgridit.denoising.denoise_volume``; prints PSNR and SSIM
(3D, HU window -1000..1000, whole volume and body mask) and seconds per volume,
and writes a PNG with the middle axial slice of the first scan: clean, noisy
and each method, one row per sigma.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ctgridit.ct.io import read_ct
from ctgridit.ct.metrics import body_mask, quality
from ctgridit.ct.noise import add_noise
from ctgridit.denoising import METHODS, denoise_volume

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
DEFAULT_SCANS = ["totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/chest_crop.nii.gz",
                 "lung_pet_ct_dx/A0002_8mm_B40f.nii.gz"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", nargs="*", default=None, help="scan paths (default: three shared scans)")
    parser.add_argument("--all", action="store_true", help="every NIfTI scan of ../shared/data/ct")
    parser.add_argument("--sigmas", nargs="*", type=float, default=[20, 50, 100])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--png", default="denoise_eval.png")
    args = parser.parse_args()
    if args.all:
        scans = sorted(DATA.glob("*/*.nii.gz"))
    else:
        scans = [Path(s) for s in args.scans] if args.scans else [DATA / s for s in DEFAULT_SCANS]

    header = f"{'scan':26}{'sigma':>6}  {'method':10}{'PSNR':>7}{'SSIM':>7}{'PSNR body':>10}{'SSIM body':>10}{'s/vol':>7}"
    print(header)
    print("-" * len(header))
    panels: list[list[tuple[str, np.ndarray]]] = []
    for n, scan in enumerate(scans):
        clean = read_ct(scan)
        mask = body_mask(clean.array)
        mid = clean.shape[2] // 2
        for sigma in args.sigmas:
            noisy = add_noise(clean, sigma, seed=0)
            rows = [("input", quality(clean.array, noisy.array, mask=mask), 0.0, noisy.array)]
            for method in args.methods:
                result = denoise_volume(noisy, method, model=args.model, device=args.device)
                rows.append((method, quality(clean.array, result.volume.array, mask=mask), result.seconds,
                             result.volume.array))
            for name, q, seconds, _ in rows:
                print(f"{scan.name[:25]:26}{sigma:>6g}  {name:10}{q['psnr']:>7.2f}{q['ssim']:>7.3f}"
                      f"{q['psnr_body']:>10.2f}{q['ssim_body']:>10.3f}{seconds:>7.1f}", flush=True)
            if n == 0:
                panels.append([("clean", clean.array[:, :, mid]), (f"noisy {sigma:g} HU", noisy.array[:, :, mid])]
                              + [(f"{name} {q['psnr']:.1f} dB", arr[:, :, mid]) for name, q, _, arr in rows[1:]])
    if args.png and panels:
        save_panels(panels, args.png, scans[0].name)
        print(f"\nwrote {args.png}")


def save_panels(panels, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctgridit.files import atomic_output

    rows, cols = len(panels), len(panels[0])
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for r, row in enumerate(panels):
        for c, (label, image) in enumerate(row):
            ax = axes[r][c]
            ax.imshow(np.rot90(np.clip(image, -160, 240)), cmap="gray", vmin=-160, vmax=240)  # soft-tissue window
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{title}: middle axial slice, soft-tissue window", fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
