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
slices, not reachable without the slice. Beside them what the slices alone allow: the fill from the forward flow
only (``--method flow`` before it moved each slice both ways), the same with finer TV-L1 settings, and the fill of
``--method flow`` (each slice moved along the forward and along the backward flow, the two averaged,
:meth:`~ctgridit.core.motion.TVL1.both_ways`).

``learned``: a small convolutional network (6 layers, 48 channels, dilations up to 4; ``--unet``: a 3-scale
U-Net, :class:`~ctgridit.core.motion_refiner.UNet`) that adds a correction to the fill from the forward flow,
given both moved slices, both known slices, the slices before and after them (4-slice context) and the position
in the gap, trained on LIDC-IDRI-0314 (a chest at 1 mm) resampled to the crops' 1.5 mm isotropic voxels, with
slices taken along ``--axes`` of its three axes (1: axial only) and factors 2 to 5 (``--more``: and the other
chest and limb scans no evaluation holds out, :data:`train_motion_refiner.MORE`; ``--augment``: crops flipped and reversed along the
slice axis); then applied to the crops and the thigh STS_019. A network at the test scans' own resolution, with
pixel-level outputs and more context than the slice model: if it gains little, the limit is not the slice model's
architecture.

    python pipelines/probe_interpolation.py learned --unet --crop 64 --iterations 4000 --more --augment  # 50 min

The probe's ``--warping`` (the U-Net correcting the motion instead of the intensities, docs/slices.md) became
the slice model's refiner: :class:`~ctgridit.core.motion_refiner.MotionRefiner`, trained the same way by
``pipelines/train_motion_refiner.py``, whose end prints its gains over the flow fill on the same scans.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from ctgridit.core.motion import TVL1, moved, warp
from ctgridit.core.motion_refiner import UNet
from ctgridit.ct.slices import slice_flows
from ctgridit.ct.io import read_ct
from train_motion_refiner import DATA, FACTORS, HELD_OUT, MORE, TRAIN, psnr, slices_of
from train_motion_refiner import resampled as resampled_slices

FINE = TVL1(finest=1, warps=3, iterations=10)


def frames(path: str) -> torch.Tensor:
    """``(Z, Y, X)`` slices of a scan in the window -1000..1000 HU, scaled to [-1, 1]."""
    return slices_of(read_ct(DATA / path).array.astype(np.float32))[:, 0]


def flows(reference: torch.Tensor, moving: torch.Tensor, motion: TVL1 = TVL1()) -> torch.Tensor:
    """The TV-L1 flow of ``moving`` onto ``reference``, 8 slices a call."""
    return torch.cat([motion.flow(reference[i:i + 8], moving[i:i + 8]) for i in range(0, len(reference), 8)])


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
            both, fine = slice_flows(before[:, None], after[:, None]), flows(before, after, FINE)   # as --method flow
            errors: dict[str, list] = {k: [] for k in ("flow, forward only", "flow, finer TV-L1",
                                                       "flow (as --method flow)", "oracle mix", "oracle choice")}
            for k, slices in real.items():
                w = k / factor
                weight = torch.full((len(before),), w)
                for label, flow in (("flow, forward only", both[:, :2]), ("flow, finer TV-L1", fine),
                                    ("flow (as --method flow)", both)):
                    first, last = moved(before[:, None], after[:, None], weight, flow)
                    errors[label].append(((1 - w) * first + w * last)[:, 0] - slices)
                from_first = warp_onto(slices, before)
                from_last = warp_onto(slices, after)
                errors["oracle mix"].append((1 - w) * from_first + w * from_last - slices)
                nearer = torch.where((from_first - slices).abs() < (from_last - slices).abs(), from_first, from_last)
                errors["oracle choice"].append(nearer - slices)
            print(f"{name.split('/')[-1]} factor {factor}: " + ", ".join(
                f"{label} {psnr(torch.stack(e)):.2f}" for label, e in errors.items()), flush=True)


def warp_onto(reference: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """``moving`` slices moved onto ``reference`` slices along the TV-L1 motion between them (finer settings)."""
    return warp(moving[:, None], flows(reference, moving, FINE))[:, 0]


def features(x: torch.Tensor, factor: int, every: int = 1, context: bool = True, both_ways: bool = False):
    """Network inputs ``(N, 7, Y, X)`` (both moved slices, both known ones, the ones before and after them, the
    position; without ``context`` not the ones before and after), the real slices and the flow fill, for every
    gap of ``factor`` (every ``every``-th gap); the fill of the forward flow, or with ``both_ways`` of the flow both
    ways (as ``--method flow``)."""
    before, after, real = gaps(x, factor)
    flow = slice_flows(before[:, None], after[:, None]) if both_ways else flows(before, after)
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


def resampled(path: str, thick: bool = False) -> torch.Tensor:
    """``(Z, Y, X)``: the training script's 1.5 mm slices (``thick``: in-plane only where thicker)."""
    return resampled_slices(path, thick)[:, 0]


def augmented(inputs: torch.Tensor, real: torch.Tensor, fill: torch.Tensor, rng, context: bool):
    """A training batch flipped left-right and front-back, and reversed along the slice axis (the two known slices,
    their moved versions and the outer ones swapped, the position ``w`` made ``1 - w``), each with probability 1/2."""
    for axis in (-1, -2):
        if rng.random() < 0.5:
            inputs, real, fill = (t.flip(axis) for t in (inputs, real, fill))
    if rng.random() < 0.5:
        order = [1, 0, 3, 2, 5, 4, 6] if context else [1, 0, 3, 2, 4]
        position = len(order) - 1
        inputs = inputs[:, order]
        inputs = torch.cat([inputs[:, :position], 1 - inputs[:, position:position + 1], inputs[:, position + 1:]], 1)
    return inputs, real, fill


def learned(axes: int, iterations: int, factors, context: bool = True, unet: bool = False,
            size: int = 48, more: bool = False, augment: bool = False, both_ways: bool = False,
            seed: int = 0, width: int = 32) -> None:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    x = resampled(TRAIN)                                                       # 1.5 mm isotropic
    sets = [features(x.permute(*order).contiguous(), f, every=2, context=context, both_ways=both_ways)
            for order in [(0, 1, 2), (1, 0, 2), (2, 0, 1)][:axes] for f in FACTORS]
    if more:
        for path in MORE:
            y = resampled(path, thick=True)
            sets += [features(y, f, every=2, context=context, both_ways=both_ways)
                     for f in FACTORS if len(y) > 2 * f + 1]
    print(f"training sets: {sum(len(s[0]) for s in sets)} slices ({time.perf_counter() - start:.0f} s)", flush=True)
    share = np.array([len(s[0]) for s in sets], dtype=np.float64)
    share /= share.sum()                                                       # sets by their number of slices
    channels = 7 if context else 5
    net = UNet(channels, width, 1) if unet else network(channels)
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    for step in range(iterations):
        inputs, real, fill = sets[rng.choice(len(sets), p=share)]
        pick = torch.from_numpy(rng.integers(0, len(inputs), 16))
        i, j = rng.integers(0, inputs.shape[-2] - size), rng.integers(0, inputs.shape[-1] - size)
        crop = lambda t: t[pick, :, i:i + size, j:j + size]                   # noqa: E731
        batch = (crop(inputs), crop(real), crop(fill))
        inputs_, real_, fill_ = augmented(*batch, rng, context) if augment else batch
        loss = (fill_ + net(inputs_) - real_).pow(2).mean()
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
                inputs, real, fill = features(x, factor, context=context, both_ways=both_ways)
                out = torch.cat([fill[i:i + 16] + net(inputs[i:i + 16]) for i in range(0, len(inputs), 16)])
                gain = psnr(out - real) - psnr(fill - real)
                row.append(f"factor {factor}: flow {psnr(fill - real):.2f}, learned {psnr(out - real):.2f} "
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
    parser.add_argument("--unet", action="store_true",
                        help="learned: a 3-scale U-Net (receptive field about 50 pixels) instead of the 6-layer net")
    parser.add_argument("--more", action="store_true", help="learned: train on the scans of MORE too")
    parser.add_argument("--augment", action="store_true",
                        help="learned: flip the training crops and reverse them along the slice axis")
    parser.add_argument("--both-ways", action="store_true",
                        help="learned: correct the fill from the flow both ways (as --method flow), not the forward's")
    parser.add_argument("--width", type=int, default=32, help="learned: the U-Net's channels at full size")
    parser.add_argument("--seed", type=int, default=0, help="learned: the seed of the weights and the crops")
    parser.add_argument("--crop", type=int, default=48, help="learned: training crop size in pixels")
    args = parser.parse_args()
    if args.probe == "oracle":
        oracle(args.factors)
    else:
        learned(args.axes, args.iterations, args.factors, not args.no_context, args.unet, args.crop, args.more,
                args.augment, args.both_ways, args.seed, args.width)


if __name__ == "__main__":
    main()
