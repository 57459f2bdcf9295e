"""Training the motion refiner (:class:`~ctgridit.core.motion_refiner.MotionRefiner`) on prepared gaps.

The caller prepares ``sets``: pairs ``(inputs, real)`` of :func:`~ctgridit.core.motion_refiner.refiner_inputs`
``(N, 11, H, W)`` and the real frames between ``(N, 1, H, W)`` (one set per sequence and gap, say). Each step
draws a set (in proportion to its size), ``BATCH`` of its gaps and one ``CROP`` x ``CROP`` window, flips the
crops along x and y and reverses them along the sequence at random (:func:`~ctgridit.core.motion_refiner.
flipped_inputs`, :func:`~ctgridit.core.motion_refiner.reversed_inputs`), and takes an Adam step (1e-3 along a
cosine to 0 at ``steps``; a run continued to more steps goes back up to where that longer cosine is) on the
squared error inside the crop's ``INNER``-pixel border (the border sees moves from outside it).

Every ``every`` steps the weights, optimizer, schedule, step and both random states go to ``checkpoint.pt``
(``weights_only`` loadable, written atomically, with the sizes of the sets) and ``train_log.csv`` gets the loss of
each step: a run started again over the same folder continues exactly where the last checkpoint was (on sets of
other sizes it is refused). The refiner is saved to ``model/``.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ctgridit.core.motion_refiner import MotionRefiner, flipped_inputs, reversed_inputs
from ctgridit.files import atomic_output

BATCH, CROP, INNER = 16, 64, 8


def cosine(step: int, steps: int) -> float:
    """The learning rate's factor at ``step`` of ``steps``: from 1 to 0 along half a cosine (0 beyond)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def refiner_batch(sets: Sequence[tuple[torch.Tensor, torch.Tensor]], rng: np.random.Generator,
                  batch: int = BATCH, crop: int = CROP) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch (module docstring): inputs ``(batch, 11, crop, crop)`` and the real frames."""
    share = np.array([len(s[0]) for s in sets], dtype=np.float64)
    inputs, real = sets[rng.choice(len(sets), p=share / share.sum())]
    pick = torch.from_numpy(rng.integers(0, len(inputs), batch))
    i, j = rng.integers(0, inputs.shape[-2] - crop + 1), rng.integers(0, inputs.shape[-1] - crop + 1)
    inputs, real = inputs[pick, :, i:i + crop, j:j + crop], real[pick, :, i:i + crop, j:j + crop]
    for axis in (-1, -2):
        if rng.random() < 0.5:
            inputs, real = flipped_inputs(inputs, axis), real.flip(axis)
    if rng.random() < 0.5:
        inputs = reversed_inputs(inputs)
    return inputs, real


def train_refiner(out: str | Path, sets: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
                  every: int = 250, width: int = 32, seed: int = 0, pixel_size: float = 1.0,
                  window: Sequence[float] | None = None, batch: int = BATCH, crop: int = CROP,
                  report: Callable[[str], None] = print, start: MotionRefiner | None = None,
                  device: str | torch.device = "cpu", lr: float = 1e-3) -> MotionRefiner:
    """Train (or continue training) a refiner in folder ``out`` to ``steps`` steps; returns it (module docstring).
    ``pixel_size`` and ``window``: the size of the pixels of ``sets`` and the intensities their -1 and 1 stand for,
    recorded in the refiner's config (``window`` None: the start's); ``start``: a refiner to
    start from (its weights and width; e.g. a bundled one) where ``out`` has no checkpoint yet (with one, the
    checkpoint's weights); ``device``: where the
    refiner trains (the sets stay in host memory, each batch is moved there); ``lr``: the peak rate."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    window = None if window is None else [float(v) for v in window]
    started = None if start is None else start.config.get("window")
    if window is not None and started is not None and [float(v) for v in started] != window:
        raise ValueError(f"the start was trained in the window {started}, the sets are in {window}")
    refiner = MotionRefiner(width=start.config.width if start else width, pixel_size=pixel_size,
                            window=window if window is not None else started)
    sizes = [len(s[0]) for s in sets]
    if start is not None:
        refiner.load_state_dict(start.state_dict())                  # replaced below by a checkpoint's weights
    refiner.to(device)
    optimizer = torch.optim.Adam(refiner.parameters(), lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine(step, steps))
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        if state.get("sizes", sizes) != sizes:
            raise ValueError(f"{checkpoint} was trained on sets of {state['sizes']} gaps, these have {sizes}: "
                             "continue with the same data, or train in a new folder")
        refiner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])                 # the step; the rate follows ``steps``
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        report(f"continued from step {step}")
    log = out / "train_log.csv"
    if log.exists():                     # the steps after the checkpoint (and a line cut short) are done again
        with log.open(newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [r for r in rows[1:] if len(r) == 3 and r[0].isdigit() and int(r[0]) <= step]
        with atomic_output(log) as tmp, tmp.open("w", newline="") as handle:
            csv.writer(handle).writerows(rows[:1] + [r for i, r in enumerate(kept) if int(r[0]) == i + 1])
    new_log = not log.exists()
    with log.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new_log:
            writer.writerow(["step", "loss", "elapsed_s"])
        start, first = time.perf_counter(), step
        while step < steps:
            inputs, real = (t.to(device) for t in refiner_batch(sets, rng, batch, crop))
            loss = (refiner(inputs) - real)[..., INNER:-INNER, INNER:-INNER].pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            writer.writerow([step, f"{loss.item():.6f}", f"{time.perf_counter() - start:.1f}"])
            if step % every == 0 or step == steps:
                handle.flush()
                state = {"model": refiner.state_dict(), "optimizer": optimizer.state_dict(),
                         "schedule": schedule.state_dict(), "rng": rng.bit_generator.state,
                         "torch_rng": torch.get_rng_state(), "step": step, "sizes": sizes}
                with atomic_output(checkpoint) as tmp:
                    torch.save(state, tmp)
                left = (time.perf_counter() - start) / (step - first) * (steps - step)
                report(f"step {step}/{steps}: loss {loss.item():.5f}, {left / 60:.0f} min left")
    refiner.to("cpu").save_pretrained(out / "model")
    return refiner
