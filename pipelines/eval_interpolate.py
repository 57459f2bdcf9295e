"""Slice interpolation: gridit (``ctgridit interpolate``) against linear, cubic and flow interpolation along z.

    python pipelines/eval_interpolate.py                          # the bundled model, held-out scans, factors 2-5
    python pipelines/eval_interpolate.py --model runs/ct_interpolate/model --factors 3 --steps 1 10

On real scans kept out of the slice model's training (``pipelines/configs/ct_interpolate.yaml``): two chest
crops at 1.5 mm (TotalSegmentator chest and chest CT angiogram), a thigh at 3.27 mm (STS_019) and an upper
abdomen at 2 mm (TotalSegmentator's DICOM series, a folder no training config reads), every ``factor``-th
slice is kept (factors 2 to 5: 1.5 mm -> 3 to 7.5 mm) and the slices between each kept pair are made again
by each method; they are compared with the real ones: PSNR (dB, HU window -1000..1000, over the filled
slices, and inside the body) and SSIM (the 3D SSIM map of the whole volume, averaged over the filled
slices). gridit runs at the factors its model serves (``n/a`` elsewhere) with each number of DDIM
``--steps``: 1 is the model's posterior mean (best PSNR), more steps draw a sample. Linear and cubic
interpolate each voxel's HU along z (``ctgridit interpolate --method linear|cubic``: SciPy's
``make_interp_spline``, k = 1 and 3, not-a-knot); flow moves the two neighbouring slices along the motion
between them (``--method flow``, TV-L1 optical flow of whole slices), what a model with ``fill: flow``
starts from. A last table gives gridit's margin over cubic and over flow for every scan and factor.

Extension (``--extend N``, default 12): the last ``N`` slices of each held-out
scan are dropped and made again by ``ctgridit extend --direction up`` (and the
first ``N`` by ``--direction down``); PSNR per group of new slices, by distance
from the last real one, against holding the last real slice (what a scan padded
at its end shows), linear extrapolation from the last two real slices, and flow
extrapolation (``ctgridit extend --method flow``: the last real slice moved
further along the motion from the one before it). gridit's extension mixes that
with the slice model's as far as the model helps on the scan's own end.

Timing: the first 34 slices of the 512 x 512 LIDC-IDRI-0314 chest interpolated to
100 slices (the issue's 512 x 512 x 100 output; target at most 120 s on 2 CPU
cores), ``--repeats`` times; printed: median and range.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ctgridit.data_folder import data_folder
from ctgridit.ct.fidelity import body_mask, psnr, ssim_map
from ctgridit.core.precision import resolve_precision
from ctgridit.ct.io import read_ct
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.slices import extend_volume, interpolate_volume, load_slice_model, served_factors

DATA = data_folder()
HELD_OUT = ["totalsegmentator/chest_crop.nii.gz", "totalsegmentator/chest_cta_crop.nii.gz",
            "soft_tissue_sarcoma/STS_019.nii.gz", "totalsegmentator/example_ct_dicom"]
TIMING_SCAN = "lidc_idri/LIDC-IDRI-0314.nii.gz"
FACTORS = [2, 3, 4, 5]
TIMING_FACTOR = 3


def thicker(affine: np.ndarray, factor: int) -> np.ndarray:
    """The affine of every ``factor``-th slice (the slice axis is the third array axis of these scans)."""
    out = affine.copy()
    out[:3, 2] *= factor
    return out


def serves(pipeline, factor: int) -> bool:
    """Whether the slice model interpolates by ``factor`` (the gaps it was trained on; a 2 x 2 model without
    gaps: 3 only)."""
    return factor in served_factors(pipeline)


def scores(real: np.ndarray, made: np.ndarray, filled: np.ndarray, body: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of ``made`` against ``real`` over the ``filled`` slices (boolean per slice)."""
    where = np.zeros(real.shape, bool)
    where[:, :, filled] = True
    smap = ssim_map(real, made)
    return {"psnr": psnr(real, made, mask=where), "psnr_body": psnr(real, made, mask=where & body),
            "ssim": float(smap[where].mean())}


def extension_rows(name: str, volume: CTVolume, pipeline, extend: int, steps: int) -> list[tuple]:
    """Drop ``extend`` slices at either end of ``volume`` (RAS: the last array slices are the top) and make them
    again: gridit's extension, the last real slice held, linear extrapolation and flow extrapolation; PSNR per group
    of 4 new slices."""
    if not volume.affine[2, 2] > 0 or np.count_nonzero(volume.affine[:3, 2]) != 1:
        print(f"(extension: {name} skipped, its array's third axis does not run towards the head)")
        return []
    hu = volume.array.astype(np.float64)
    n = hu.shape[2]
    rows = []
    for direction in ("up", "down"):
        kept = slice(0, n - extend) if direction == "up" else slice(extend, n)
        real = hu[:, :, n - extend:] if direction == "up" else hu[:, :, :extend][:, :, ::-1]   # nearest first
        part = CTVolume(hu[:, :, kept].copy(), volume.affine if direction == "up" else volume.affine @ np.array(
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, extend], [0, 0, 0, 1]]), source=name)
        made = extend_volume(part, extend, direction, pipeline, steps=steps).volume.array.astype(np.float64)
        gridit = made[:, :, n - extend:] if direction == "up" else made[:, :, :extend][:, :, ::-1]
        last, before = (hu[:, :, n - extend - 1], hu[:, :, n - extend - 2]) if direction == "up" else (
            hu[:, :, extend], hu[:, :, extend + 1])
        held = np.repeat(last[:, :, None], extend, axis=2)
        linear = np.clip(last[:, :, None] + (last - before)[:, :, None] * np.arange(1, extend + 1), -1024, 3071)
        flowed = extend_volume(part, extend, direction, method="flow").volume.array.astype(np.float64)
        flowed = flowed[:, :, n - extend:] if direction == "up" else flowed[:, :, :extend][:, :, ::-1]
        for method, image in (("gridit", gridit), ("hold last slice", held), ("linear extrapolation", linear),
                              ("flow extrapolation", flowed)):
            groups = [psnr(real[:, :, g:g + 4], image[:, :, g:g + 4]) for g in range(0, extend, 4)]
            rows.append((Path(name).name, direction, method, groups))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model folder (default: the bundled one), or a training checkpoint folder (step_...)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--scans", type=int, default=len(HELD_OUT), help="evaluate the first SCANS held-out scans")
    parser.add_argument("--factors", type=int, nargs="+", default=FACTORS, help="keep every FACTOR-th slice")
    parser.add_argument("--extend", type=int, default=12, help="slices to extend by (0: skip the extension table)")
    args = parser.parse_args()
    if args.model is not None and (Path(args.model) / "ema.safetensors").is_file():   # a checkpoint, while it trains
        from ctgridit.training.trainer import checkpoint_pipeline

        pipeline = checkpoint_pipeline(args.model)
    else:
        pipeline = load_slice_model(args.model, "cpu")
    HELD = HELD_OUT[:args.scans]
    rows = []
    for name in HELD:
        volume = read_ct(DATA / name)
        for factor in args.factors:
            n = (volume.shape[2] - 1) // factor * factor + 1                   # whole gaps only
            real = volume.array[:, :, :n].astype(np.float64)
            thick = CTVolume(real[:, :, ::factor].copy(), thicker(volume.affine, factor), source=name)
            filled = np.arange(n) % factor != 0
            body = body_mask(real)
            made, seconds = {}, {}
            for m in ("linear", "cubic", "flow"):
                start = time.perf_counter()
                made[m] = interpolate_volume(thick, factor, method=m).volume.array.astype(np.float64)
                seconds[m] = time.perf_counter() - start
            for steps in args.steps:
                label = f"gridit, {steps} step{'s' if steps > 1 else ''}"
                if not serves(pipeline, factor):
                    made[label] = None
                    continue
                start = time.perf_counter()
                made[label] = interpolate_volume(thick, factor, pipeline, steps=steps).volume.array.astype(np.float64)
                seconds[label] = time.perf_counter() - start
            for method, image in made.items():
                s = scores(real, image, filled, body) if image is not None else None
                rows.append((Path(name).name.replace(".nii.gz", ""), factor,
                             f"{real.shape[0]}x{real.shape[1]}x{n}", method, s, seconds.get(method)))
    print("| scan | factor | size | method | PSNR dB | PSNR body dB | SSIM | s |\n|---|---|---|---|---|---|---|---|")
    for scan, factor, size, method, s, sec in rows:
        figures = "n/a | n/a | n/a" if s is None else f"{s['psnr']:.2f} | {s['psnr_body']:.2f} | {s['ssim']:.4f}"
        print(f"| {scan} | {factor} | {size} | {method} | {figures} | {'' if sec is None else f'{sec:.1f}'} |")
    psnrs = {(r[0], r[1], r[3]): r[4]["psnr"] for r in rows if r[4] is not None}
    scans = list(dict.fromkeys(r[0] for r in rows))
    label = f"gridit, {args.steps[0]} step{'s' if args.steps[0] > 1 else ''}"
    print(f"\n{label} against cubic / against flow, dB (target: +2 / +1 everywhere)")
    print("| scan | " + " | ".join(f"factor {f}" for f in args.factors) + " |\n|---|" + "---|" * len(args.factors))
    for scan in scans:
        cells = [f"{psnrs[(scan, f, label)] - psnrs[(scan, f, 'cubic')]:+.2f} / "
                 f"{psnrs[(scan, f, label)] - psnrs[(scan, f, 'flow')]:+.2f}" if (scan, f, label) in psnrs else "n/a"
                 for f in args.factors]
        print(f"| {scan} | " + " | ".join(cells) + " |")
    if args.extend:
        extended = [row for name in HELD for row in extension_rows(name, read_ct(DATA / name), pipeline,
                                                                    args.extend, args.steps[0])]
        groups = [f"{g + 1}-{min(g + 4, args.extend)}" for g in range(0, args.extend, 4)]
        print(f"\nextension by {args.extend} slices: PSNR dB of the new slices {', '.join(groups)} from the scan's end")
        print("| scan | direction | method | " + " | ".join(groups) + " |\n|---|---|---|" + "---|" * len(groups))
        for scan, direction, method, values in extended:
            print(f"| {scan} | {direction} | {method} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
        for method in dict.fromkeys(r[2] for r in extended):
            mean = np.mean([r[3] for r in extended if r[2] == method], axis=0)
            print(f"{method}: mean PSNR by group " + ", ".join(f"{v:.2f}" for v in mean))
    if args.no_timing:
        return
    lidc = read_ct(DATA / TIMING_SCAN)
    kept = -(-99 // TIMING_FACTOR) + 1                                          # (kept - 1) * factor + 1 >= 100
    thick = CTVolume(lidc.array[:, :, :kept].copy(), lidc.affine, source=TIMING_SCAN)    # timing only
    times = {"auto": [], "fp32": []} if resolve_precision(pipeline.device) != "fp32" else {"auto": []}
    for round_ in range(args.repeats):                  # as shipped and, alternating, in float32 (the baseline)
        order = list(times) if round_ % 2 == 0 else list(times)[::-1]
        for precision in order:
            start = time.perf_counter()
            out = interpolate_volume(thick, TIMING_FACTOR, pipeline, steps=args.steps[0], precision=precision).volume
            times[precision].append(time.perf_counter() - start)
            print(f"  round ({precision}): {out.shape[0]} x {out.shape[1]} x {out.shape[2]} in "
                  f"{times[precision][-1]:.1f} s")
    shipped = times["auto"]
    print(f"interpolate {thick.shape} -> {out.shape}, {args.steps[0]} step(s), precision "
          f"{resolve_precision(pipeline.device)}: median {np.median(shipped):.1f} s (range {min(shipped):.1f} .. "
          f"{max(shipped):.1f}); target 120 s: {np.median(shipped) <= 120}")
    if "fp32" in times:
        print(f"  in float32: median {np.median(times['fp32']):.1f} s (range {min(times['fp32']):.1f} .. "
              f"{max(times['fp32']):.1f})")


if __name__ == "__main__":
    main()
