"""How much is there to gain over the flow interpolation? Two probes on the held-out 1.5 mm chest crops.

    python pipelines/probe_interpolation.py oracle                  # about 2 min on 2 CPU cores
    python pipelines/probe_interpolation.py learned --axes 1        # about 13 min on 1 core (--axes 3: 17 min)

Issue 31 asks the slice model for 1 dB over ``--method flow`` (the two known slices moved along their TV-L1
motion and mixed, :mod:`ctgridit.core.motion`). These probes measure what a better estimate of the motion, and
what a learned correction of the flow fill, can give, on the chest crops that
``pipelines/eval_interpolate.py`` evaluates (every ``factor``-th slice kept, PSNR of the others in the HU window
-1000..1000, the same as its table).

``oracle``: the known slices moved by motions estimated *with the slice to make* (TV-L1 from the real slice to
each known one, settings finer than the shipped ones), then mixed by distance (``oracle mix``), or, per voxel,
the moved slice nearer to the real one (``oracle choice``): upper bounds of a method that moves the two known
slices, not reachable without the slice. Beside them what the slices alone allow: the flow fill (as
``--method flow``), the same with finer TV-L1 settings, and the mean of the fill made from the forward flow and
the one made from the backward flow (``both directions``).

``learned``: a small convolutional network (6 layers, 48 channels, dilations up to 4) that adds a correction to
the flow fill, given both moved slices, both known slices, the slices before and after them (4-slice context)
and the position in the gap, trained on LIDC-IDRI-0314 (a chest at 1 mm) resampled to the crops' 1.5 mm
isotropic voxels, with slices taken along ``--axes`` of its three axes (1: axial only) and factors 2 to 5; then
applied to the crops. A network at the test scans' own resolution, with pixel-level outputs and more context than
the slice model: if it gains little, the limit is not the slice model's architecture.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from ctgridit.core.motion import TVL1, moved
from ctgridit.ct.io import read_ct
from ctgridit.data_folder import data_folder

DATA = data_folder()
HELD_OUT = ["totalsegmentator/chest_crop.nii.gz", "totalsegmentator/chest_cta_crop.nii.gz"]
TRAIN = "lidc_idri/LIDC-IDRI-0314.nii.gz"
FACTORS = (2, 3, 4, 5)
FINE = TVL1(finest=1, warps=3, iterations=10)


def frames(path: str) -> torch.Tensor:
    """``(Z, Y, X)`` slices of a scan in the window -1000..1000 HU, scaled to [-1, 1]."""
    return window(read_ct(DATA / path).array.astype(np.float32))


def window(hu: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(hu, -1000, 1000) / 1000).float().permute(2, 1, 0).contiguous()


def flows(reference: torch.Tensor, moving: torch.Tensor, motion: TVL1 = TVL1()) -> torch.Tensor:
    return torch.cat([motion.flow(reference[i:i + 8], moving[i:i + 8]) for i in range(0, len(reference), 8)])


def psnr(error: torch.Tensor) -> float:
    return float(20 * np.log10(2 / float(error.double().pow(2).mean().sqrt())))


def gaps(x: torch.Tensor, factor: int):
    """The known slices (every ``factor``-th) before and after each gap, and the real slices in it by offset."""
    n = (x.shape[0] - 1) // factor * factor + 1
    x = x[:n]
    return x[0:n - 1:factor], x[factor:n:factor], {k: x[k:n:factor] for k in range(1, factor)}


def oracle(factors) -> None:
    for name in HELD_OUT:
        x = frames(name)
        for factor in factors:
            before, after, real = gaps(x, factor)
            forward, fine, backward = flows(before, after), flows(before, after, FINE), flows(after, before)
            errors: dict[str, list] = {k: [] for k in ("flow (as --method flow)", "flow, finer TV-L1",
                                                       "both directions", "oracle mix", "oracle choice")}
            for k, slices in real.items():
                w = k / factor
                weight = torch.full((len(before),), w)
                for label, flow in (("flow (as --method flow)", forward), ("flow, finer TV-L1", fine)):
                    first, last = moved(before[:, None], after[:, None], weight, flow)
                    errors[label].append(((1 - w) * first + w * last)[:, 0] - slices)
                first, last = moved(before[:, None], after[:, None], weight, forward)
                back_last, back_first = moved(after[:, None], before[:, None], 1 - weight, backward)
                both = 0.5 * ((1 - w) * (first + back_first) + w * (last + back_last))
                errors["both directions"].append(both[:, 0] - slices)
                from_first = warp_onto(slices, before)
                from_last = warp_onto(slices, after)
                errors["oracle mix"].append((1 - w) * from_first + w * from_last - slices)
                nearer = torch.where((from_first - slices).abs() < (from_last - slices).abs(), from_first, from_last)
                errors["oracle choice"].append(nearer - slices)
            print(f"{name.split('/')[-1]} factor {factor}: " + ", ".join(
                f"{label} {psnr(torch.stack(e)):.2f}" for label, e in errors.items()), flush=True)


def warp_onto(reference: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """``moving`` slices moved onto ``reference`` slices along the TV-L1 motion between them (finer settings)."""
    from ctgridit.core.motion import warp

    return warp(moving[:, None], flows(reference, moving, FINE))[:, 0]


def features(x: torch.Tensor, factor: int, every: int = 1, context: bool = True):
    """Network inputs ``(N, 7, Y, X)`` (both moved slices, both known ones, the ones before and after them, the
    position; without ``context`` not the ones before and after), the real slices and the flow fill, for every
    gap of ``factor`` (every ``every``-th gap)."""
    before, after, real = gaps(x, factor)
    flow = flows(before, after)
    outer_before, outer_after = torch.cat([before[:1], before[:-1]]), torch.cat([after[1:], after[-1:]])
    out = []
    for k, slices in real.items():
        w = k / factor
        first, last = moved(before[:, None], after[:, None], torch.full((len(before),), w), flow)
        outer = [outer_before[:, None], outer_after[:, None]] if context else []
        inputs = torch.cat([first, last, before[:, None], after[:, None], *outer, torch.full_like(first, w)], 1)
        out.append((inputs[::every], slices[::every, None], ((1 - w) * first + w * last)[::every]))
    return [torch.cat(t) for t in zip(*out)]


def network(channels: int = 7, width: int = 48) -> nn.Module:
    layers, dilations = [], (1, 2, 4, 2, 1)
    for i, d in enumerate(dilations):
        layers += [nn.Conv2d(channels if i == 0 else width, width, 3, padding=d, dilation=d), nn.GELU()]
    layers.append(nn.Conv2d(width, 1, 3, padding=1))
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


def learned(axes: int, iterations: int, factors, context: bool = True) -> None:
    from scipy.ndimage import zoom

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    scan = read_ct(DATA / TRAIN)
    spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)
    x = window(zoom(scan.array.astype(np.float32), spacing / 1.5, order=1))      # 1.5 mm isotropic
    sets = [features(x.permute(*order).contiguous(), f, every=2, context=context)
            for order in [(0, 1, 2), (1, 0, 2), (2, 0, 1)][:axes] for f in FACTORS]
    print(f"training sets: {sum(len(s[0]) for s in sets)} slices ({time.perf_counter() - start:.0f} s)", flush=True)
    net = network(7 if context else 5)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    size = 48
    for step in range(iterations):
        inputs, real, fill = sets[rng.integers(len(sets))]
        pick = torch.from_numpy(rng.integers(0, len(inputs), 16))
        i, j = rng.integers(0, inputs.shape[-2] - size), rng.integers(0, inputs.shape[-1] - size)
        crop = lambda t: t[pick, :, i:i + size, j:j + size]                   # noqa: E731
        loss = (crop(fill) + net(crop(inputs)) - crop(real)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0:
            print(f"step {step}: loss {loss.item():.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
    with torch.no_grad():
        for name in HELD_OUT:
            x = frames(name)
            row = []
            for factor in factors:
                inputs, real, fill = features(x, factor, context=context)
                made = fill + torch.cat([net(inputs[i:i + 16]) for i in range(0, len(inputs), 16)])
                gain = psnr(made - real) - psnr(fill - real)
                row.append(f"factor {factor}: flow {psnr(fill - real):.2f}, learned {psnr(made - real):.2f} "
                           f"({gain:+.2f})")
            print(f"{name.split('/')[-1]}: " + "; ".join(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["oracle", "learned"])
    parser.add_argument("--axes", type=int, default=1, choices=[1, 2, 3],
                        help="learned: slices of the training chest along this many of its axes")
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--no-context", action="store_true",
                        help="learned: without the slices before and after the two known ones")
    parser.add_argument("--factors", type=int, nargs="+", default=list(FACTORS))
    args = parser.parse_args()
    if args.probe == "oracle":
        oracle(args.factors)
    else:
        learned(args.axes, args.iterations, args.factors, not args.no_context)


if __name__ == "__main__":
    main()
