"""Train the slice model's motion refiner (:class:`ctgridit.core.motion_refiner.MotionRefiner`).

    python pipelines/train_motion_refiner.py runs/motion_refiner                  # 7,000 steps, about 85 min, 1 core
    python pipelines/train_motion_refiner.py runs/motion_refiner --steps 10000    # continue the same run further

The refiner corrects the fill of ``--method flow`` (each gap's two known slices moved along their TV-L1
motion both ways and mixed by distance, :func:`ctgridit.ct.slices.slice_flows`): where each known slice is
sampled, how the two are mixed, and a residual. Training data: LIDC-IDRI-0314 (a chest at 1 mm) resampled to
1.5 mm voxels, and the chest and limb scans no evaluation holds out (:data:`MORE`: LIDC-IDRI-0001, the
elastix lung crop, the sarcoma scans STS_001 to STS_017) at 1.5 mm in-plane and their own slice thickness;
every second gap of every factor 2 to 5 along their slice axis. Batches of 16 crops of 64 x 64 pixels, flipped
and reversed along the slice axis at random; the loss is the squared error on the crops' inner 48 x 48
(the edges see moves from outside the crop); Adam 1e-3, cosine to ``--steps``.

A checkpoint (weights, optimizer, schedule, step and both random states) is written every ``--every`` steps
to ``OUT/checkpoint.pt`` and a run started again continues from it exactly; ``OUT/model`` is the refiner
(safetensors, its config records the 1.5 mm pixel it was trained on), ``OUT/train_log.csv`` the loss.
At the end the refiner is measured on the held-out chest crops and the thigh STS_019 (what
``pipelines/eval_interpolate.py`` holds out): PSNR of the filled slices against the flow fill, factors 2 to 5.
``python pipelines/bundle_model.py ... --refiner OUT/model`` adds it to the bundled slice model.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import zoom

from ctgridit.core.motion_refiner import MotionRefiner, flipped_inputs, refiner_inputs, reversed_inputs
from ctgridit.ct.io import read_ct
from ctgridit.ct.slices import slice_flows
from ctgridit.data_folder import data_folder
from ctgridit.files import atomic_output

DATA = data_folder()
TRAIN = "lidc_idri/LIDC-IDRI-0314.nii.gz"
MORE = ["lidc_idri/LIDC-IDRI-0001.nii.gz", "elastix/lung_crop_2.5mm.nii.gz",
        *(f"soft_tissue_sarcoma/STS_{i:03d}.nii.gz" for i in range(1, 18))]
HELD_OUT = ["totalsegmentator/chest_crop.nii.gz", "totalsegmentator/chest_cta_crop.nii.gz",
            "soft_tissue_sarcoma/STS_019.nii.gz"]
FACTORS = (2, 3, 4, 5)
PIXEL_MM = 1.5
BATCH, CROP, INNER = 16, 64, 8


def window(hu: np.ndarray) -> torch.Tensor:
    """``(Z, Y, X)`` slices in the window -1000..1000 HU scaled to [-1, 1] (the third array axis is the slices')."""
    return torch.from_numpy(np.clip(hu, -1000, 1000) / 1000).float().permute(2, 1, 0).contiguous()


def resampled(path: str, thick: bool = False) -> torch.Tensor:
    """A scan's slices with 1.5 mm voxels (``thick``: in-plane only where its slices are thicker)."""
    scan = read_ct(DATA / path)
    spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)
    target = np.array([PIXEL_MM, PIXEL_MM, max(PIXEL_MM, spacing[2]) if thick else PIXEL_MM])
    return window(zoom(scan.array.astype(np.float32), spacing / target, order=1))


def gaps(x: torch.Tensor, factor: int, every: int = 1):
    """The refiner's inputs for every ``every``-th gap between the ``factor``-th slices of ``x`` ``(Z, Y, X)``,
    the real slices between, and the flow fill: ``(N, 11, Y, X)``, ``(N, 1, Y, X)``, ``(N, 1, Y, X)``."""
    n = (x.shape[0] - 1) // factor * factor + 1
    before, after = x[0:n - 1:factor, None], x[factor:n:factor, None]
    flow = slice_flows(before, after)
    outer_before, outer_after = torch.cat([before[:1], before[:-1]]), torch.cat([after[1:], after[-1:]])
    out = []
    for k in range(1, factor):
        weight = torch.full((len(before),), k / factor)
        inputs = refiner_inputs(before, after, outer_before, outer_after, flow, weight)
        fill = (1 - k / factor) * inputs[:, :1] + k / factor * inputs[:, 1:2]
        out.append((inputs[::every], x[k:n:factor, None][::every], fill[::every]))
    return [torch.cat(t) for t in zip(*out)]


def training_sets() -> list[tuple[torch.Tensor, torch.Tensor]]:
    sets = []
    for path, thick in [(TRAIN, False)] + [(p, True) for p in MORE]:
        x = resampled(path, thick)
        sets += [gaps(x, f, every=2)[:2] for f in FACTORS if len(x) > 2 * f + 1]
    return sets


def batch(sets, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    share = np.array([len(s[0]) for s in sets], dtype=np.float64)
    inputs, real = sets[rng.choice(len(sets), p=share / share.sum())]
    pick = torch.from_numpy(rng.integers(0, len(inputs), BATCH))
    i, j = rng.integers(0, inputs.shape[-2] - CROP), rng.integers(0, inputs.shape[-1] - CROP)
    inputs, real = inputs[pick, :, i:i + CROP, j:j + CROP], real[pick, :, i:i + CROP, j:j + CROP]
    for axis in (-1, -2):
        if rng.random() < 0.5:
            inputs, real = flipped_inputs(inputs, axis), real.flip(axis)
    if rng.random() < 0.5:
        inputs = reversed_inputs(inputs)
    return inputs, real


def psnr(error: torch.Tensor) -> float:
    return float(20 * np.log10(2 / float(error.double().pow(2).mean().sqrt())))


def held_out(refiner: MotionRefiner) -> None:
    with torch.no_grad():
        for name in HELD_OUT:
            x = window(read_ct(DATA / name).array.astype(np.float32))
            row = []
            for factor in FACTORS:
                inputs, real, fill = gaps(x, factor)
                out = torch.cat([refiner(inputs[i:i + 16]) for i in range(0, len(inputs), 16)])
                row.append(f"factor {factor}: flow {psnr(fill - real):.2f}, refined {psnr(out - real):.2f} "
                           f"({psnr(out - real) - psnr(fill - real):+.2f})")
            print(f"{name.split('/')[-1]}: " + "; ".join(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--every", type=int, default=250, help="steps between checkpoints")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "checkpoint.pt"
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    refiner = MotionRefiner(width=args.width, pixel_size=PIXEL_MM)
    optimizer = torch.optim.Adam(refiner.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        refiner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        schedule.T_max = args.steps
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"continued from step {step}", flush=True)
    start = time.perf_counter()
    sets = training_sets()
    print(f"training sets: {sum(len(s[0]) for s in sets)} slices ({time.perf_counter() - start:.0f} s)", flush=True)
    log = args.out / "train_log.csv"
    new_log = not log.exists()
    with log.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new_log:
            writer.writerow(["step", "loss", "elapsed_s"])
        start = time.perf_counter()
        first = step
        while step < args.steps:
            inputs, real = batch(sets, rng)
            loss = (refiner(inputs) - real)[..., INNER:-INNER, INNER:-INNER].pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            writer.writerow([step, f"{loss.item():.6f}", f"{time.perf_counter() - start:.1f}"])
            if step % args.every == 0 or step == args.steps:
                handle.flush()
                state = {"model": refiner.state_dict(), "optimizer": optimizer.state_dict(),
                         "schedule": schedule.state_dict(), "rng": rng.bit_generator.state,
                         "torch_rng": torch.get_rng_state(), "step": step}
                with atomic_output(checkpoint) as tmp:
                    torch.save(state, tmp)
                done = step - first
                left = (time.perf_counter() - start) / done * (args.steps - step)
                print(f"step {step}/{args.steps}: loss {loss.item():.5f}, {left / 60:.0f} min left", flush=True)
    refiner.save_pretrained(args.out / "model")
    held_out(refiner.eval())


if __name__ == "__main__":
    main()
