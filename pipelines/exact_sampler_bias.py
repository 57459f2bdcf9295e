"""How far each sampling mode is from the true conditional, with a perfect model.

Uses the exact noise predictor of a Gaussian sequence (``tests/gaussian_model.py``),
so it runs as a module from the root of a checkout, where ``tests`` can be
imported: ``python -m pipelines.exact_sampler_bias``. Two settings:

- *ramp* (the figure in docs/synthesis.md): 2 x 2 grid of 2 x 2 frames, cell ``i`` is
  ``u + v * i`` plus white noise 0.02 (``u, v ~ N(0, 1)``); the known row is 0
  and 0.15, so the new cells should average 0.30 and 0.45;
- *CT-like*: a level, a slow trend and an AR(1) part with neighbour correlation
  0.95 plus white noise (``tests/test_sampler_exact.py``), extension and
  interpolation on 2 x 2 grids: the error of the mean in units of the
  conditional standard deviation, and the spread against the conditional one.

For every mode it prints the model forwards per grid too.
"""

from __future__ import annotations

import argparse
import time

import torch

from ctgridit.core.conditioning import known_cells
from ctgridit.core.diffusion import make_sample_scheduler, make_train_scheduler
from ctgridit.core.grid import cell_mask, tile, untile
from ctgridit.core.sampler import RePaint, inpaint, model_forwards
from tests.gaussian_model import ExactModel, GaussianSequence

TRAIN = make_train_scheduler()
MODES = [("masked-conditional", True, "ddpm", 0, 1), ("masked-conditional", True, "ddim", 0, 1),
         ("replacement (paper)", False, "ddpm", 0, 1), ("replacement (paper)", False, "ddim", 0, 1),
         ("replacement + RePaint j5 x10", False, "ddpm", 5, 10),
         ("replacement + RePaint j5 x40", False, "ddpm", 5, 40)]


def run(dist: GaussianSequence, context: torch.Tensor, flags: list[float], conditional: bool, sampler: str,
        steps: int, jump: int, times: int, seed: int = 0) -> torch.Tensor:
    mask = cell_mask(flags, dist.rows, dist.cols, dist.h, dist.w).double()
    model = ExactModel(dist, TRAIN.alphas_cumprod, conditional=conditional)
    return inpaint(model, make_sample_scheduler(TRAIN, sampler, steps), context, mask, conditional=conditional,
                   generator=torch.Generator().manual_seed(seed), repaint=RePaint(jump, times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    n = args.samples

    ramp = GaussianSequence(rows=2, cols=2, h=2, w=2, level=1.0, trend=1.0, white=0.02)
    cells = torch.tensor([0.0, 0.15, 0.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1, 1).expand(n, 4, 1, 2, 2)
    truth, _ = ramp.conditional([0, 1], ramp.flatten(tile(cells[:1], 2, 2))[:, :8])
    print(f"ramp, known row 0 and 0.15, {args.steps} steps, {n} samples: "
          f"truth {truth.view(2, 4).mean(dim=1).tolist()[0]:.2f} and {truth.view(2, 4).mean(dim=1).tolist()[1]:.2f}")
    print(f"{'mode':32s} {'sampler':7s} {'cell 2':>7s} {'cell 3':>7s} {'forwards':>8s} {'s':>5s}")
    for name, conditional, sampler, jump, times in MODES:
        began = time.perf_counter()
        out = run(ramp, tile(cells, 2, 2), [1, 1, 0, 0], conditional, sampler, args.steps, jump, times)
        new = untile(out, 2, 2)[:, 2:].mean(dim=(0, 2, 3, 4)).tolist()
        print(f"{name:32s} {sampler:7s} {new[0]:7.2f} {new[1]:7.2f} {model_forwards(args.steps, jump, times):8d} "
              f"{time.perf_counter() - began:5.1f}")

    ct = GaussianSequence(rows=2, cols=2, h=1, w=2, level=0.5, trend=0.1, white=0.1, ar=0.3, rho=0.95)
    context = ct.sample(1, torch.Generator().manual_seed(0))
    print(f"\nCT-like sequence (neighbour correlation {ct.covariance()[0, 2] / ct.covariance()[0, 0]:.2f}), "
          f"{args.steps} steps: |mean error| / conditional std (max over cells), std / conditional std")
    print(f"{'mode':32s} {'sampler':7s} {'extension':>20s} {'interpolation':>20s}")
    for name, conditional, sampler, jump, times in MODES:
        row = []
        for task in ("extension", "interpolation"):
            flags = known_cells(task, 2, 2)
            known = [c for c, f in enumerate(flags) if f]
            k, u = ct.split(known)
            mean, cov = ct.conditional(known, ct.flatten(context)[:, k])
            out = ct.flatten(run(ct, context.expand(n, -1, -1, -1), flags, conditional, sampler, args.steps,
                                 jump, times))[:, u]
            std = cov.diagonal().sqrt()
            error = float(((out.mean(dim=0) - mean[0]).abs() / std).max())
            spread = float((out.std(dim=0) / std).mean())
            row.append(f"{error:8.2f} / {spread:5.2f}x")
        print(f"{name:32s} {sampler:7s} {row[0]:>20s} {row[1]:>20s}")


if __name__ == "__main__":
    main()
