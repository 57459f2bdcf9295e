"""Denoising evaluation: gridit (the bundled denoiser) against the classical filters and BM4D on held-out real scans.

    python pipelines/eval_denoise.py                      # the held-out scans at 20, 50 and 100 HU
    python pipelines/eval_denoise.py --tune               # tune the classical filters on the tuning scan (STS_018)
    python pipelines/eval_denoise.py --model runs/ct_denoise/model --png eval.png

The evaluated scans are kept out of the denoiser's training
(``pipelines/configs/ct_denoise_v2.yaml``): the two reconstructions of a chest at
0.65 mm in-plane (Lung-PET-CT-Dx A0002, soft B40f and sharp B70f kernel), a second
chest at 0.70 mm (LIDC-IDRI-0001, 2.5 mm slices), a chest crop at 1.5 mm (TotalSegmentator) and two extremity scans at 0.98 mm
(STS_019, STS_020); each is cut to its central ``--crop`` block (default
32 slices of 256 x 256, as the issue's table). Gaussian noise of 20, 50 and 100
HU is added (``ctgridit add-noise``, seed 0) and every method is told that
noise, at equal information: gridit with ``--noise`` (its output blended with
the input by SURE), the classical filters and BM4D with the same sigma. BM4D
runs where the ``bm4d`` package is installed (``pip install bm4d``: its licence
forbids commercial use, so it is a reference here, never a dependency of
ctgridit). Printed: PSNR and SSIM (3D, HU window -1000..1000) against the scan
(which keeps its own noise), whole block and inside the body, and seconds (BM4D's results are kept in
``--bm4d-cache``, so a second run costs only the other methods).

``--tune`` searches the classical filters' settings (:data:`ctgridit.ct.denoising.CLASSICAL`)
on a scan no evaluation uses and prints the best (mean PSNR over 20, 50 and 100 HU).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from ctgridit.data_folder import data_folder
from ctgridit.ct.io import read_ct
from ctgridit.ct.preview import mid_planes
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.fidelity import body_mask, psnr, quality
from ctgridit.ct.noise import add_noise
from ctgridit.ct.window import DEFAULT_WINDOW, from_unit, to_unit, window_change
from ctgridit.core.precision import PRECISIONS
from ctgridit.ct.denoising import classical_denoise, denoise_volume, load_denoiser

DATA = data_folder()
HELD_OUT = ["lung_pet_ct_dx/A0002_8mm_B40f.nii.gz", "lung_pet_ct_dx/A0002_8mm_B70f.nii.gz",
            "lidc_idri/LIDC-IDRI-0001.nii.gz", "totalsegmentator/chest_crop.nii.gz", "soft_tissue_sarcoma/STS_019.nii.gz",
            "soft_tissue_sarcoma/STS_020.nii.gz"]
TUNING = "soft_tissue_sarcoma/STS_018.nii.gz"
NOISES = [20.0, 50.0, 100.0]
TUNING_SLICES = 12    # the middle slab of the tuning scan: the filters work slice by slice or locally
GRID = {"bilateral": {"color": [1.0, 2.0, 3.0], "spatial": [1.0, 2.0]},
        "nlm": {"h": [0.6, 0.8, 1.0, 1.2], "patch_size": [5, 7], "patch_distance": [6]},
        "nlm3d": {"h": [0.6, 0.8, 1.0], "patch_size": [3], "patch_distance": [2, 3]}}


def bm4d_filter(volume, sigma_hu: float, cache: Path | None = None):
    """BM4D on the whole block if the ``bm4d`` package is installed, else None; with ``cache`` (a file name
    that says which block, noise and seed), read from there if an earlier run left it, else saved there
    (BM4D takes 0.5 to 4 minutes a block on 2 cores; it is deterministic)."""
    if cache is not None and cache.is_file():
        return np.load(cache).astype(np.float64)
    try:
        import bm4d
    except ImportError:
        return None
    low, high = DEFAULT_WINDOW
    scaled = to_unit(volume.array.astype(np.float64))
    out = bm4d.bm4d(scaled, sigma_psd=sigma_hu / (high - low))
    result = volume.array + window_change(from_unit(np.asarray(out)), volume.array)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, result.astype(np.float32))
    return result


def central_block(scan: CTVolume, crop: tuple[int, int, int]) -> CTVolume:
    """The central ``crop`` (x, y, z voxels; each at most the scan's) of ``scan``, with its affine moved along."""
    starts = [max(0, (n - c) // 2) for n, c in zip(scan.shape, crop)]
    block = scan.array[tuple(slice(s, s + c) for s, c in zip(starts, crop))]
    affine = scan.affine.copy()
    affine[:3, 3] = scan.affine[:3, :3] @ np.array(starts, dtype=float) + scan.affine[:3, 3]
    return CTVolume(np.ascontiguousarray(block), affine, source=scan.source)


def evaluate(args) -> None:
    scans = [Path(s) for s in args.scans] if args.scans else [DATA / s for s in HELD_OUT]
    pipeline = load_denoiser(args.model, args.device) if "gridit" in args.methods else None
    header = (f"{'scan':20}{'mm':>15}{'noise':>7}  {'method':10}{'PSNR':>7}{'SSIM':>7}{'PSNR body':>10}"
              f"{'SSIM body':>10}{'s':>6}")
    print(header)
    print("-" * len(header))
    panels = []
    for n, scan in enumerate(scans):
        clean = central_block(read_ct(scan), tuple(args.crop))
        mask = body_mask(clean.array)
        mm = "x".join(f"{v:.2g}" for v in clean.spacing)
        for sigma in args.noises:
            noisy = add_noise(clean, sigma, "gaussian", seed=0)
            rows = [("input", noisy.array, 0.0, "")]
            for method in args.methods:
                result = denoise_volume(noisy, method, model=pipeline if method == "gridit" else None,
                                        device=args.device, noise=sigma, precision=args.precision)
                note = f"w {result.details['sure']['weight']:.2f}" if "sure" in result.details else ""
                if "wiener" in result.details:
                    note += f", Wiener {'x'.join(map(str, result.details['wiener']['block']))}"
                    note += ", pilot + hard thr." if result.details["wiener"]["pilot"] != "model" else ""
                rows.append((method, result.volume.array, result.seconds, note))
            began = time.perf_counter()
            cache = (Path(args.bm4d_cache) / f"{scan.name.split('.')[0]}_{'x'.join(map(str, args.crop))}_"
                     f"{sigma:g}HU_seed0.npy") if args.bm4d_cache else None
            cached = cache is not None and cache.is_file()
            reference = bm4d_filter(noisy, sigma, cache) if not args.no_bm4d else None
            if reference is not None:
                rows.append(("bm4d", reference, time.perf_counter() - began, "cached" if cached else ""))
            for name, array, seconds, note in rows:
                q = quality(clean.array, array, mask=mask)
                print(f"{scan.name.replace('.nii.gz', '')[:19]:20}{mm:>15}{sigma:>7g}  {name:10}{q['psnr']:>7.2f}"
                      f"{q['ssim']:>7.3f}{q['psnr_body']:>10.2f}{q['ssim_body']:>10.3f}{seconds:>6.1f}  {note}",
                      flush=True)
            if n == 0:
                panels.append([("clean", axial(clean, clean.array))] +
                              [(f"{name} {psnr(clean.array, array):.1f} dB" if name != "input" else f"noisy {sigma:g} HU",
                                axial(clean, array)) for name, array, _, _ in rows])
    if args.png and panels:
        save_panels(panels, args.png, scans[0].name)
        print(f"\nwrote {args.png}")


def tune(args) -> None:
    scan = read_ct(DATA / TUNING)
    middle = scan.shape[2] // 2
    slab = slice(middle - TUNING_SLICES // 2, middle + TUNING_SLICES // 2)
    clean = scan.array[:, :, slab].astype(np.float64)
    noisy = {s: add_noise(scan, s, seed=1).array[:, :, slab] for s in (20.0, 50.0, 100.0)}
    print(f"tuning on the middle {TUNING_SLICES} slices of {TUNING} (kept out of training and evaluation), "
          f"mean PSNR over 20, 50 and 100 HU")
    for method in args.methods:
        if method not in GRID:
            continue
        results = []
        for values in itertools.product(*GRID[method].values()):
            params = dict(zip(GRID[method], values))
            scores = []
            for array in noisy.values():
                scores.append(psnr(clean, classical_denoise(array, method, params)[0]))
            results.append((float(np.mean(scores)), params))
            print(f"  {method:9} {params}: {np.mean(scores):.2f} dB", flush=True)
        best = max(results, key=lambda r: r[0])
        print(f"best {method}: {best[1]} ({best[0]:.2f} dB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", nargs="*", default=None, help="scan paths (default: the held-out scans)")
    parser.add_argument("--methods", nargs="*", default=["gridit", "bilateral", "nlm3d"])
    parser.add_argument("--model", default=None, help="denoiser model folder (default: the bundled one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the model's arithmetic (auto: bfloat16 on CPUs with AMX or AVX-512 BF16)")
    parser.add_argument("--png", default=None, help="middle axial slices of the first scan, one row per noise")
    parser.add_argument("--crop", type=int, nargs=3, default=[256, 256, 32], help="central block, x y z voxels")
    parser.add_argument("--noises", type=float, nargs="*", default=NOISES, help="Gaussian noise to add, HU")
    parser.add_argument("--no-bm4d", action="store_true", help="leave BM4D out even where it is installed")
    parser.add_argument("--bm4d-cache", default="runs/bm4d_cache",
                        help="folder keeping BM4D's results between runs ('' to recompute every time)")
    parser.add_argument("--tune", action="store_true", help="tune the classical filters instead")
    args = parser.parse_args()
    (tune if args.tune else evaluate)(args)


def axial(scan, array):
    """The middle axial slice of ``array`` (on ``scan``'s grid) as displayed: anterior up, patient's right left."""
    return mid_planes(CTVolume(array, scan.affine))[0][1]


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
            ax.imshow(np.clip(image, -160, 240), cmap="gray", vmin=-160, vmax=240)  # soft-tissue window
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{title}: middle axial slice, soft-tissue window", fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
