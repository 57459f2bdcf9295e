"""Train the slice model's motion refiner (:class:`ctgridit.core.motion_refiner.MotionRefiner`).

    OMP_NUM_THREADS=1 python pipelines/train_motion_refiner.py runs/motion_refiner   # 7,000 steps, 1.4 h on 1 core
    python pipelines/train_motion_refiner.py runs/motion_refiner --steps 10000      # continue further (the rate
                                                                                    # goes back up the cosine)
    python pipelines/train_motion_refiner.py runs/refiner2 --start ctgridit/models/ct_interpolate/refiner

The refiner corrects the fill of ``--method flow`` (each gap's two known slices moved along their TV-L1
motion both ways and mixed by distance, :func:`ctgridit.ct.slices.slice_flows`): where each known slice is
sampled, how the two are mixed, and a residual. Training data: LIDC-IDRI-0314 (a chest at 1 mm) resampled to
1.5 mm voxels, and the chest and limb scans no evaluation holds out (:data:`MORE`: LIDC-IDRI-0001, the elastix
lung crop, the sarcoma scans STS_001 to STS_017) at 1.5 mm in-plane and their own slice thickness; every second gap
of every factor 2 to 5 along their slice axis (the bundled refiner's data: two runs that took every gap and
STS_018 and STS_020 too, started from the bundled refiner at the full rate, ended at the flow's level on the
held-out scans; docs/slices.md). ``--chest-weight K`` draws the chest scans' gaps K times as often (by their
number of gaps the chests are about a quarter of the data). Batches of 16 crops of 64 x 64 pixels, flipped and
reversed along the slice axis at random; the loss is the squared error on the crops' inner 48 x 48
(the edges see moves from outside the crop); Adam at ``--lr`` (1e-3), cosine to 0 at ``--steps``.

``--scans`` adds your own thin scans (their slices along the file's third axis; every scan's gaps are held in
host memory); ``--device`` trains on a GPU where there is one (untried here: this machine has none).
The loop is :func:`ctgridit.training.refiner.train_refiner`: a checkpoint (weights, optimizer, schedule, step
and both random states) every ``--every`` steps in ``OUT/checkpoint.pt``, from which a run started again
continues exactly; ``OUT/model`` is the refiner (safetensors, its config records the 1.5 mm pixel it was
trained on), ``OUT/train_log.csv`` the loss.
At the end the refiner is measured on the held-out chest crops and the thigh STS_019 (what
``pipelines/eval_interpolate.py`` holds out): PSNR of the filled slices against the flow fill, factors 2 to 5.
``python pipelines/bundle_model.py ... --refiner OUT/model`` adds it to the bundled slice model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import zoom

from ctgridit.core.motion_refiner import MotionRefiner
from ctgridit.ct.io import read_ct
from ctgridit.ct.slices import gap_inputs, slice_flows
from ctgridit.ct.window import DEFAULT_WINDOW, window_hu
from ctgridit.data_folder import data_folder
from ctgridit.device import resolve_device
from ctgridit.training.refiner import train_refiner

DATA = data_folder()
TRAIN = "lidc_idri/LIDC-IDRI-0314.nii.gz"
MORE = ["lidc_idri/LIDC-IDRI-0001.nii.gz", "elastix/lung_crop_2.5mm.nii.gz",
        *(f"soft_tissue_sarcoma/STS_{i:03d}.nii.gz" for i in range(1, 18))]
CHESTS = [TRAIN, "lidc_idri/LIDC-IDRI-0001.nii.gz", "elastix/lung_crop_2.5mm.nii.gz"]
HELD_OUT = ["totalsegmentator/chest_crop.nii.gz", "totalsegmentator/chest_cta_crop.nii.gz",
            "soft_tissue_sarcoma/STS_019.nii.gz"]
FACTORS = (2, 3, 4, 5)
PIXEL_MM = 1.5


def slices_of(hu: np.ndarray) -> torch.Tensor:
    """``(Z, 1, Y, X)`` slices of HU voxels ``(X, Y, Z)`` in the slice model's window -1000..1000, as [-1, 1]."""
    return torch.from_numpy(window_hu(hu)).float().permute(2, 1, 0)[:, None].contiguous()


def resampled(path: str, thick: bool = False) -> torch.Tensor:
    """A scan's slices with 1.5 mm voxels (``thick``: in-plane only where its slices are thicker)."""
    scan = read_ct(DATA / path)                                      # (an absolute path stays as it is)
    spacing = np.linalg.norm(scan.affine[:3, :3], axis=0)
    target = np.array([PIXEL_MM, PIXEL_MM, max(PIXEL_MM, spacing[2]) if thick else PIXEL_MM])
    return slices_of(zoom(scan.array.astype(np.float32), spacing / target, order=1))


def gaps(x: torch.Tensor, factor: int, every: int = 1):
    """For every ``every``-th gap between the ``factor``-th slices of ``x`` ``(Z, 1, Y, X)``: the refiner's inputs
    (:func:`~ctgridit.ct.slices.gap_inputs`, as ``interpolate`` makes them), the real slices between and the flow
    fill: ``(N, 11, Y, X)``, ``(N, 1, Y, X)``, ``(N, 1, Y, X)``."""
    n = (x.shape[0] - 1) // factor * factor + 1
    known = x[0:n:factor]
    flow = slice_flows(known[:-1], known[1:])
    out = []
    for k in range(1, factor):
        inputs = gap_inputs(known, flow, k / factor)
        fill = (1 - k / factor) * inputs[:, :1] + k / factor * inputs[:, 1:2]
        out.append((inputs[::every], x[k:n:factor][::every], fill[::every]))
    return [torch.cat(t) for t in zip(*out)]


def training_sets(chest_weight: int = 1, scans: list[Path] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each training scan's gaps at each factor; the chest scans' sets ``chest_weight`` times (drawn that many times
    as often as their number of gaps alone would have them: by gaps, the chests are about a quarter of the data);
    ``scans``: more scans (paths) to train on, as :data:`MORE`'s."""
    sets = []
    for path, thick in [(TRAIN, False)] + [(p, True) for p in [*MORE, *scans]]:
        x = resampled(path, thick)
        made = [gaps(x, f, every=2)[:2] for f in FACTORS if len(x) > 2 * f + 1]
        sets += made * (chest_weight if path in CHESTS else 1)
    return sets


def psnr(error: torch.Tensor) -> float:
    return float(20 * np.log10(2 / float(error.double().pow(2).mean().sqrt())))


def held_out(refiner: MotionRefiner) -> None:
    """The refiner's gain over the flow fill on the held-out scans at their own pixel size, the refiner run as
    ``interpolate`` runs it (the U-Net on the slices resized to 1.5 mm pixels; the mean of each gap taken both
    ways), without the DiT and the check; the fill is moved in the window -1000..1000 as the slice model's is
    (about 0.1 dB above ``--method flow``, which moves the slices in HU)."""
    with torch.no_grad():
        for name in HELD_OUT:
            scan = read_ct(DATA / name)
            x = slices_of(scan.array.astype(np.float32))
            scale = float(np.linalg.norm(scan.affine[:3, :2], axis=0).mean()) / PIXEL_MM
            row = []
            for factor in FACTORS:
                inputs, real, fill = gaps(x, factor)
                out = torch.cat([refiner.symmetric(inputs[i:i + 16], scale) for i in range(0, len(inputs), 16)])
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
    parser.add_argument("--scans", type=Path, nargs="+", default=[],
                        help="more thin scans to train on (NIfTI files or DICOM folders; say, your own chests)")
    parser.add_argument("--device", default="auto", help="where to train: auto (a GPU if there is one), cpu, cuda")
    parser.add_argument("--lr", type=float, default=1e-3, help="the peak learning rate (Adam, cosine to 0)")
    parser.add_argument("--chest-weight", type=int, default=1,
                        help="draw the chest scans' gaps this many times as often (default 1: by their number)")
    parser.add_argument("--start", type=Path, default=None,
                        help="start from this refiner folder (e.g. ctgridit/models/ct_interpolate/refiner)")
    parser.add_argument("--evaluate", action="store_true",
                        help="only measure OUT/model on the held-out scans (the end of a training run)")
    args = parser.parse_args()
    if args.evaluate:
        held_out(MotionRefiner.from_pretrained(args.out / "model").eval())
        return
    start = time.perf_counter()
    missing = [str(p) for p in args.scans if not p.exists()]
    if missing:
        parser.error(f"no such scan: {', '.join(missing)}")
    sets = training_sets(args.chest_weight, [p.resolve() for p in args.scans])
    distinct = {id(s[0]): s for s in sets}.values()                  # the chest sets repeated count once
    print(f"training sets: {sum(len(s[0]) for s in distinct)} slices ({time.perf_counter() - start:.0f} s)", flush=True)
    start = MotionRefiner.from_pretrained(args.start) if args.start else None
    try:
        refiner = train_refiner(args.out, sets, args.steps, args.every, args.width, args.seed, PIXEL_MM, DEFAULT_WINDOW,
                                report=lambda line: print(line, flush=True), start=start,
                                device=resolve_device(args.device), lr=args.lr)
    except ValueError as err:                                          # data or window not the checkpoint's
        raise SystemExit(f"error: {args.out}: {err}") from None
    held_out(refiner.eval())


if __name__ == "__main__":
    main()
