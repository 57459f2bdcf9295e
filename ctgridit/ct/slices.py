"""New slices for a real scan: thin slices between thick ones, and more slices beyond its ends.

The tasks behind ``ctgridit interpolate`` and ``ctgridit extend``, with a
masked-conditional stage-1 model at the scan's own resolution (``adapter.resolution:
native``; ``pipelines/configs/ct_interpolate.yaml`` trains one, ``ct_interpolate_1step.yaml`` to
``ct_interpolate_pair_thin.yaml`` fine-tune it into the bundled ``ctgridit/models/ct_interpolate``, whose
condition holds the two known slices each moved along their motion to the new slice's place, ``fill:
flow_pair``, and which moves them further and mixes them itself): 2 x 2 grids of tiles of
consecutive slices, some cells known and the others generated
(:meth:`~ctgridit.core.pipeline.GriDiTPipeline.fill`).

- **Interpolation** by ``factor = cells - 1`` (3 for a 2 x 2 model): every pair
  of neighbouring slices becomes the first and last cell of a grid and the two
  cells between are filled, so the output has ``factor * (n - 1) + 1`` slices,
  slice ``factor * k`` being input slice ``k`` exactly.
- **Interpolation by ``method="linear"`` or ``"cubic"``** instead: SciPy splines of each voxel's HU along z,
  the classical baselines, for any factor; ``"flow"``: each new slice is its two
  neighbours moved along the motion between them (TV-L1 optical flow of whole
  slices in the HU window -1000..1000, :mod:`ctgridit.core.motion`) and mixed
  by distance, for any factor: what the grid model with ``fill: flow`` or
  ``flow_pair`` starts from, here without a model.
- **Extension** by ``N`` slices up (towards the head) or down: ``method="flow"``
  moves the scan's last slice further along the motion from the one before it
  (TV-L1, as ``--method flow`` between two slices; the displacement grows with
  the distance). ``"gridit"`` mixes into that the slice model's own extension
  (the last row of known slices starts a grid whose second row is generated,
  again and again: the paper's extension step with ``m = 1``) by the share that
  makes the scan's own last 4 slices best when they are dropped and made again
  (:func:`extension_weight`); HU beyond the window are the moved slice's. Going
  down, the scan is turned over along z first, so both continue it as upwards.

Both work along the scan's **slice axis** (:func:`slice_axis`): its thickest
voxel axis, or, where voxels are about as thick along two or three axes, the
head-feet axis if it is one of them, else the third voxel axis as stored (the
DICOM slice direction); where neither is, the scan is refused.
For an axial scan that is the head-feet axis; a sagittal or coronal stack is
thinned (or continued) along its own slice axis, and "up" is then towards the
patient's left or back (the LPS direction of the axis, as "up" is towards the
head for an axial scan).

In-plane, MONAI's sliding window covers the slices with tiles of the model's
size overlapping by a quarter, blended with Gaussian weights; the scan is
oriented with its slice axis last for the model (LPS for an axial scan; axes
only, no resampling) and turned back. The
output keeps the input's in-plane grid and axis order; its slice spacing is
``spacing / factor`` (interpolation) and its origin that of the same physical
slice (the first input slice stays where it was; extension downwards moves the
origin to the new lowest slice where the scan's first slice is its lowest).
The input slices come back exactly, in HU; new voxels lie in the model's HU
window, except that, for a model with a fill (the bundled one), what the same
fill made from the slices in HU has beyond the window (bone, air) is added. A model with a motion
refiner (the bundled one, :mod:`ctgridit.core.motion_refiner`) corrects its flow fill before the DiT's
correction is added (:func:`refined_fill`): where each known slice is sampled, how the two are mixed, and a
residual; the slices in HU are moved and mixed as the refiner moves and mixes them, so bone beyond the window
follows its edge. A refiner trained in another HU window than the model's is refused. DDIM with ``steps``
steps: one step (the default; models trained to predict the clean tiles) is the model's posterior mean, the
best estimate in the mean-squared sense and the same for every seed; more steps draw a sample (sharper,
noisier) from a model trained on every noise level (the bundled one serves one step only: it was fine-tuned on
the last levels).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctgridit.core.motion_refiner import refiner_inputs
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.sampler import ProgressCallback
from ctgridit.core.precision import inference_precision, resolve_precision
from ctgridit.ct.tiled import over_grids
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW, unwindow_hu, window_hu
from ctgridit.errors import CTGridItError
from ctgridit.model_folders import BUNDLED_SLICE_MODEL, is_native, open_model

DIRECTIONS = ("up", "down")
#: Interpolation methods: the grid model, and the classical baselines along z (SciPy splines of degree 1 and 3,
#: and interpolation along the motion between neighbouring slices, TV-L1 optical flow).
METHODS = ("gridit", "linear", "cubic", "flow")
SPLINE_DEGREE = {"linear": 1, "cubic": 3}


@dataclass
class SliceResult:
    """The new volume and what the run did."""

    volume: CTVolume
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def load_slice_model(model: str | os.PathLike | None = None, device: str = "auto") -> GriDiTPipeline:
    """A model folder that can fill cells of grids of a scan's own tiles; ``None``: the bundled one."""
    pipeline = open_model(model, BUNDLED_SLICE_MODEL, "slice interpolation", device, kind="ct")
    check_slice_model(pipeline, model or BUNDLED_SLICE_MODEL)
    return pipeline


def check_slice_model(pipeline: GriDiTPipeline, where=None) -> None:
    """One line for a model that cannot make new slices of a real scan (see :func:`load_slice_model`)."""
    grid = pipeline.settings.grid
    if not pipeline.masked:
        raise CTGridItError("is not a masked-conditional model (it cannot be given the known slices)", where,
                            "train one with stage1.conditioning.masked: true")
    if not is_native(pipeline) or grid.factor != 1:
        raise CTGridItError("does not work at the scan's own resolution (adapter.resolution native, factor 1)",
                            where, "use a native-resolution model (pipelines/configs/ct_interpolate.yaml)")
    if grid.rows < 2 or grid.cells < 3:
        raise CTGridItError(f"has {grid.rows} x {grid.cols} grids; new slices need at least two rows and three cells",
                            where, "use a model of 2 x 2 or larger grids")
    window = list(_window(pipeline))
    trained = None if pipeline.refiner is None else pipeline.refiner.config.window
    if trained is not None and [float(v) for v in trained] != window:
        raise CTGridItError(f"has a refiner trained on the HU window {trained} and works in {window}", where,
                            "bundle a refiner trained in the model's window (pipelines/train_motion_refiner.py)")


#: Bytes a new-slices task holds per voxel of its result, at its peak, for the memory check before reading
#: (:func:`interpolation_plan`): measured for the bundled slice model, 512 x 512 x 34 slices to 100 (factor 3), a
#: peak of 3.0 GB in all against 0.9 GB before the task (the frames, the fills in the window and in HU, the refined
#: ones, the flows, the DiT's windows, HU, the volume turned back); the classical methods need less.
WORK_BYTES = 84


def interpolation_plan(factor: int):
    """What interpolating by ``factor`` makes of a scan of a given shape: for
    :func:`~ctgridit.limits.planned_output`."""
    def plan(shape: tuple[int, ...]) -> tuple[int, str]:
        return WORK_BYTES * factor * int(np.prod(shape)), f"{factor} times as many slices out"
    return plan


def extension_plan(slices: int):
    """What extending by ``slices`` makes of a scan of a given shape (its thinnest axis taken as the slice axis:
    the most it can be)."""
    def plan(shape: tuple[int, ...]) -> tuple[int, str]:
        per_slice = int(np.prod(shape)) // max(1, min(shape))
        return WORK_BYTES * per_slice * (min(shape) + slices), f"{slices} more slices out"
    return plan


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise CTGridItError(f"unknown direction {direction!r}", "--direction", f"use one of {', '.join(DIRECTIONS)}")


def interpolate_volume(volume: CTVolume, factor: int = 3, model: str | os.PathLike | GriDiTPipeline | None = None,
                       device: str = "auto", seed: int = 0, steps: int | None = None,
                       progress: ProgressCallback | None = None, method: str = "gridit",
                       check: bool = True, precision: str = "auto") -> SliceResult:
    """``volume`` with ``factor - 1`` new slices between every two of its own (module docstring); ``method``
    ``"linear"`` or ``"cubic"`` interpolates each voxel's HU along z instead (any ``factor`` >= 2; not-a-knot
    cubic spline, which needs 4 slices). ``check``: for a model with a fill, weigh its correction of the fill
    by how much it helps on the scan's own slices (:func:`checked_weight`). ``precision``: the model's arithmetic
    (:mod:`ctgridit.core.precision`; ``auto``: bfloat16 on CPUs with AMX or AVX-512 BF16)."""
    if method not in METHODS:
        raise CTGridItError(f"unknown method {method!r}", "--method", f"use one of {', '.join(METHODS)}")
    start = time.perf_counter()
    if method == "flow":
        return _flow_interpolation(volume, factor, start)
    if method != "gridit":
        return _spline_interpolation(volume, factor, method, start)
    pipeline = _pipeline(model, device)
    precision = resolve_precision(pipeline.device, precision)
    cells = pipeline.settings.grid.cells
    factors = served_factors(pipeline)
    if factor not in factors:
        listed = ", ".join(map(str, factors[:-1])) + (" or " if len(factors) > 1 else "") + str(factors[-1])
        raise CTGridItError(f"this model interpolates by a factor of {listed} only (got {factor})",
                            model if model is not None and not isinstance(model, GriDiTPipeline) else "the slice model",
                            f"use --factor {listed}, or --method flow or cubic for other factors")
    frames, lps = _model_frames(volume, pipeline, minimum=2)
    n = len(frames)
    out = torch.zeros(factor * (n - 1) + 1, *frames.shape[1:])                   # (Z', 1, Y, X)
    out[::factor] = frames
    known = [1.0] + [0.0] * (cells - 2) + [1.0]
    checked, fill = None, None
    if pipeline.settings.sampling.stage1.gaps:
        filled, fill = _fill_gaps(pipeline, out, factor, steps, seed, progress, precision)
    else:
        filled = _fill_windows(pipeline, out, known, z_step=factor, steps=steps, seed=seed, progress=progress,
                               precision=precision)
    keep = torch.arange(0, len(out), factor)
    if fill is None:
        hu = _to_hu(filled, lps, pipeline, keep=keep)
    else:
        # the fill plus the shares of its refinement and of the model's correction of it that help on the scan's
        # own slices (checked_weight), in the window; plus what the slices in HU, moved and mixed as the fill and that
        # share of the refinement, have beyond the window, so that bone above it and air below it are kept
        from ctgridit.ct.transforms import frames_to_volume, volume_to_frames

        pixel = _pixel_size(lps)
        checked = checked_weight(pipeline, frames, steps, seed, progress, precision, pixel) if check else None
        weight, refined = (1.0, 1.0) if checked is None else (checked[0], 1.0 if checked[1] is None else checked[1])
        plain = fill_between(fill, frames, factor)
        in_hu = volume_to_frames(lps.as_tensor().float())
        moved_hu = fill_between(fill, in_hu, factor)                            # the slices in HU, moved as the fill
        if refined == 0:
            base = plain
        else:
            base, refined_hu = refined_fill(pipeline, fill, frames, plain, factor, pixel, precision, progress,
                                            hu=(in_hu, moved_hu))
            moved_hu.lerp_(refined_hu, refined)                                # ... and as the checked refinement
            del refined_hu
        del in_hu
        low, high = _window(pipeline)
        beyond = frames_to_volume(moved_hu)
        del moved_hu
        beyond -= beyond.clamp(low, high)                                       # what lies beyond the window
        beyond[..., keep] = 0                                                    # the input's own slices, exactly
        filled -= plain                                                          # the model's correction, in place
        if base is not plain:
            base -= plain                                                        # the refinement
            plain += refined * base
        plain += weight * filled
        del filled, base
        hu = _to_hu(plain, lps, pipeline, keep=keep)
        del plain
        hu += beyond
        del beyond
    spacing = _slice_spacing(lps)
    result = _back(hu, lps, volume, z_scale=1.0 / factor, shift=0)
    details = {"method": method, "factor": factor, "steps": _steps(pipeline, steps), "seed": seed,
               "slice_spacing_mm": [spacing, spacing / factor], "slices": [n, len(out)], "precision": precision,
               "refiner": pipeline.refiner is not None and fill is not None}
    if checked is not None:
        details["correction_weight"] = checked[0]
        if checked[1] is not None:
            details["refiner_weight"] = checked[1]
    return SliceResult(result, time.perf_counter() - start, details)


def _flow_interpolation(volume: CTVolume, factor: int, start: float) -> SliceResult:
    from ctgridit.ct.transforms import frames_to_volume, volume_to_frames

    if factor < 2:
        raise CTGridItError(f"--factor must be at least 2, got {factor}")
    lps = _lps(volume, minimum=2)
    frames = volume_to_frames(lps.as_tensor().float())                           # (Z, 1, Y, X) HU
    windowed = window_hu(frames, DEFAULT_WINDOW)
    n = len(frames)
    out = fill_between(motion_fill(windowed[:-1], windowed[1:]), frames, factor)      # HU moved, flow of the window
    result = _back(frames_to_volume(out), lps, volume, z_scale=1.0 / factor, shift=0)
    spacing = _slice_spacing(lps)
    details = {"method": "flow", "factor": factor, "slice_spacing_mm": [spacing, spacing / factor],
               "slices": [n, len(out)]}
    return SliceResult(result, time.perf_counter() - start, details)


def _spline_interpolation(volume: CTVolume, factor: int, method: str, start: float) -> SliceResult:
    from scipy.interpolate import make_interp_spline

    if factor < 2:
        raise CTGridItError(f"--factor must be at least 2, got {factor}")
    degree = SPLINE_DEGREE[method]
    lps = _lps(volume, minimum=degree + 1)
    hu = lps.as_tensor().double().numpy()                                        # (1, X, Y, Z)
    n = hu.shape[-1]
    spline = make_interp_spline(np.arange(n) * factor, hu, k=degree, axis=3)
    out = torch.from_numpy(spline(np.arange(factor * (n - 1) + 1))).float()
    out[..., ::factor] = lps.as_tensor().float()                                 # the input's own slices, exactly
    result = _back(out, lps, volume, z_scale=1.0 / factor, shift=0)
    spacing = _slice_spacing(lps)
    details = {"method": method, "factor": factor, "slice_spacing_mm": [spacing, spacing / factor],
               "slices": [n, out.shape[-1]]}
    return SliceResult(result, time.perf_counter() - start, details)


def extend_volume(volume: CTVolume, slices: int, direction: str = "up",
                  model: str | os.PathLike | GriDiTPipeline | None = None, device: str = "auto", seed: int = 0,
                  steps: int | None = None, progress: ProgressCallback | None = None,
                  precision: str = "auto", method: str = "gridit", check: bool = True) -> SliceResult:
    """``volume`` continued by ``slices`` new slices ``direction`` (``"up"``: towards the head); ``precision`` as
    :func:`interpolate_volume`'s. ``method="flow"``: the scan's last slice moved further along the motion from the
    one before it (:func:`motion_extrapolation`). ``"gridit"``: that, mixed with the slice model's extension by
    the share that makes the scan's own last :data:`EXTEND_CHECK` slices best when they are dropped and made again
    (``check``; :func:`extension_weight`), in the model's window; beyond it (bone, air) the flow's."""
    check_direction(direction)
    if method not in EXTEND_METHODS:
        raise CTGridItError(f"unknown method {method!r}", "--method", f"use one of {', '.join(EXTEND_METHODS)}")
    if slices < 1:
        raise CTGridItError(f"--slices must be at least 1, got {slices}")
    start = time.perf_counter()
    from ctgridit.ct.transforms import volume_to_frames

    pipeline = None if method == "flow" else _pipeline(model, device)
    window = DEFAULT_WINDOW if pipeline is None else _window(pipeline)
    lps = _lps(volume, minimum=2 if pipeline is None else _known_cells(pipeline))
    hu = volume_to_frames(lps.as_tensor().float())                                # (Z, 1, Y, X)
    hu = hu if direction == "up" else hu.flip(0)                                  # continue upwards
    frames = window_hu(hu, window)
    details = {"method": method, "slices": [len(hu), len(hu) + slices], "direction": direction,
               "slice_spacing_mm": _slice_spacing(lps)}
    if pipeline is None:
        new, = motion_extrapolation(frames[-2:-1], frames[-1:], slices, [hu[-1:]])
    else:
        precision = resolve_precision(pipeline.device, precision)
        flowed, flowed_hu = motion_extrapolation(frames[-2:-1], frames[-1:], slices, [frames[-1:], hu[-1:]])
        weight = extension_weight(pipeline, frames, steps, seed, progress, precision) if check else 1.0
        if weight:
            flowed += weight * (model_extension(pipeline, frames, slices, steps, seed, progress, precision) - flowed)
        low, high = window
        new = unwindow_hu(flowed, window) + (flowed_hu - flowed_hu.clamp(low, high))  # beyond the window: the flow's
        details.update(steps=_steps(pipeline, steps), seed=seed, precision=precision, model_weight=weight)
    from ctgridit.ct.transforms import frames_to_volume

    seq = torch.cat([hu, new])                                                    # the input's own slices, exactly
    first = 0 if direction == "up" else slices                                    # where input slice 0 now is
    result = _back(frames_to_volume(seq if direction == "up" else seq.flip(0)), lps, volume, z_scale=1.0,
                   shift=-first)
    return SliceResult(result, time.perf_counter() - start, details)


#: Extension methods: the slice model mixed with the motion, and the motion alone.
EXTEND_METHODS = ("gridit", "flow")
#: The scan's own last slices :func:`extension_weight` drops and makes again.
EXTEND_CHECK = 4
#: New slices moved per call in :func:`motion_extrapolation`.
EXTRAPOLATION_BATCH = 16


def motion_extrapolation(before: torch.Tensor, last: torch.Tensor, slices: int,
                         images: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each of ``images`` (default ``[last]``; ``(1, 1, Y, X)`` each: the last slice, in any units) moved 1, 2, ...
    ``slices`` slices further along the motion from ``before`` to ``last`` (both ``(1, 1, Y, X)`` in the HU window;
    :func:`slice_flows` both ways, :func:`~ctgridit.core.motion.moved` past its end: the displacement grows with
    the distance, as ``--method flow`` moves slices between two): a list of ``(slices, 1, Y, X)``."""
    from ctgridit.core.motion import moved

    flow = slice_flows(before, last)
    out = []
    for image in [last] if images is None else images:
        made = torch.empty(slices, *image.shape[1:], dtype=image.dtype)
        for i in range(0, slices, EXTRAPOLATION_BATCH):
            n = min(EXTRAPOLATION_BATCH, slices - i)
            copies = image.expand(n, -1, -1, -1)
            made[i:i + n] = moved(copies, copies, 1.0 + torch.arange(i + 1, i + n + 1, dtype=torch.float32),
                                  flow.expand(n, -1, -1, -1))[1]
        out.append(made)
    return out


def _known_cells(pipeline: GriDiTPipeline) -> int:
    """The known slices a grid of the slice model's extension starts from (its first rows)."""
    grid = pipeline.settings.grid
    return grid.cols * (grid.rows - 1)


def model_extension(pipeline: GriDiTPipeline, frames: torch.Tensor, slices: int, steps: int | None, seed: int,
                    progress: ProgressCallback | None, precision: str, phase: str = "extend") -> torch.Tensor:
    """``(slices, 1, Y, X)``: the slice model's continuation of ``frames`` (``(Z, 1, Y, X)``, in its window, upwards):
    the last row of known slices starts a grid whose next row is generated, again and again (the paper's extension
    step with ``m = 1``)."""
    grid = pipeline.settings.grid
    m, new = _known_cells(pipeline), grid.cols                                   # known and new cells per grid
    known = [1.0] * m + [0.0] * new
    rounds = -(-slices // new)
    seq = torch.cat([frames, torch.zeros(rounds * new, *frames.shape[1:])])
    for r in range(rounds):
        at = len(frames) + r * new - m                                            # the grid's first frame
        report = None if progress is None else (
            lambda _phase, done, total, r=r: progress(phase, r * total + done, rounds * total))
        filled = _fill_windows(pipeline, seq[at:at + m + new], known, z_step=m + new, steps=steps,
                               seed=seed + r, progress=report, precision=precision)
        seq[at + m:at + m + new] = filled[m:]
    return seq[len(frames):len(frames) + slices]


def extension_weight(pipeline: GriDiTPipeline, frames: torch.Tensor, steps: int | None, seed: int,
                     progress: ProgressCallback | None = None, precision: str = "fp32") -> float | None:
    """How much of the slice model's extension to mix into the motion's (:func:`motion_extrapolation`), measured on
    the scan's own end: its last :data:`EXTEND_CHECK` slices of ``frames`` (in the model's window, the end to
    continue last) dropped and made again by both; the share in [0, 1] with the least squared error. On the
    held-out scans of ``pipelines/eval_interpolate.py`` the motion alone is 2.8 dB closer than the model alone
    over the first 4 new slices, and the best share differs from scan to scan and end to end. The share is fitted on
    the nearest 4 slices and used at every distance. None for a scan too short to check (fewer than
    ``EXTEND_CHECK`` + 2 slices for a 2 x 2 model): then the motion alone."""
    known = frames[:-EXTEND_CHECK]
    if len(known) < max(2, _known_cells(pipeline)):
        return None
    real = frames[-EXTEND_CHECK:]
    flowed, = motion_extrapolation(known[-2:-1], known[-1:], EXTEND_CHECK)
    made = model_extension(pipeline, known, EXTEND_CHECK, steps, seed, progress, precision, phase="check")
    return checked_shares(real, flowed, {"model": made})["model"]


# ------------------------------------------------------------------ helpers
def _pipeline(model, device: str) -> GriDiTPipeline:
    if isinstance(model, GriDiTPipeline):
        check_slice_model(model)
        return model
    return load_slice_model(model, device)


def _steps(pipeline: GriDiTPipeline, steps: int | None) -> int:
    return steps or pipeline.settings.sampling.stage1.num_steps


#: Axis codes that put each world axis (LPS: 0 left, 1 posterior, 2 superior) last, where the tasks work along it.
SLICE_LAST = {0: "PSL", 1: "LSP", 2: "LPS"}
#: Axes whose voxels are within this factor of the thickest count as equally thick.
SAME_THICKNESS = 0.9


def slice_axis(volume: CTVolume) -> int:
    """The world axis (0 left-right, 1 front-back, 2 head-feet) ``interpolate`` and ``extend`` work along: the scan's
    thickest voxel axis; where two or three are about as thick (within 10 %), the head-feet axis if it is one of
    them (axial slices), else the third voxel axis as stored (the DICOM slice direction). Refused where neither
    is among the thickest: which slices to work on is not clear."""
    affine = np.asarray(volume.affine, dtype=np.float64)[:3, :3]
    sizes = np.linalg.norm(affine, axis=0)                                        # voxel size along each array axis
    worlds = [int(np.argmax(np.abs(affine[:, a]))) for a in range(3)]             # their world axes (RAS = LPS order)
    thick = [a for a in range(3) if sizes[a] >= SAME_THICKNESS * sizes.max()]
    if len(thick) == 1:
        return worlds[thick[0]]
    if 2 in (worlds[a] for a in thick):
        return 2
    if 2 in thick:
        return worlds[2]
    raise CTGridItError(f"has voxels of {sizes.round(3).tolist()} mm: two axes are the thickest and neither is the "
                        "head-feet axis nor the stored slice axis, so which slices to work on is not clear",
                        volume.source, "resample it so that one axis is the thickest")


def _lps(volume: CTVolume, minimum: int):
    """The scan with its slice axis (:func:`slice_axis`) last, axes only, no resampling (LPS for an axial scan):
    a ``(1, A, B, Z)`` HU MetaTensor of ``minimum`` slices or more."""
    from ctgridit.ct.transforms import Orient, volume_to_metatensor

    lps = Orient(SLICE_LAST[slice_axis(volume)])(volume_to_metatensor(volume))
    if lps.shape[-1] < minimum:
        raise CTGridItError(f"has {lps.shape[-1]} slice(s); this needs at least {minimum}", volume.source,
                            "give a scan with more slices")
    return lps


def _window(pipeline: GriDiTPipeline) -> tuple[float, float]:
    """The HU window a slice model works in (its adapter's, default -1000..1000)."""
    low, high = pipeline.settings.adapter.get("window", DEFAULT_WINDOW)
    return float(low), float(high)


def _model_frames(volume: CTVolume, pipeline: GriDiTPipeline, minimum: int):
    """The scan oriented LPS, as ``(Z, 1, Y, X)`` frames in the model's window, and the LPS MetaTensor (HU)."""
    from ctgridit.ct.transforms import volume_to_frames

    lps = _lps(volume, minimum)
    window = _window(pipeline)
    return window_hu(volume_to_frames(lps.as_tensor().float()), window), lps


def _slice_spacing(lps) -> float:
    return float(np.linalg.norm(np.asarray(lps.affine, dtype=np.float64)[:3, 2]))


def _pixel_size(lps) -> float:
    """The in-plane voxel size (mm; the mean of the two in-plane axes')."""
    return float(np.linalg.norm(np.asarray(lps.affine, dtype=np.float64)[:3, :2], axis=0).mean())


def _fill_windows(pipeline: GriDiTPipeline, frames: torch.Tensor, known: list[float], z_step: int,
                  steps: int | None, seed: int, progress: ProgressCallback | None,
                  positions: list[float] | None = None, filled: bool = False, precision: str = "fp32") -> torch.Tensor:
    """``(Z, 1, Y, X)`` frames with the cells flagged 0 in ``known`` generated, in windows of ``cells`` frames
    starting every ``z_step`` frames along z (the known frames come back blended from exact copies);
    ``positions``: where a window's cells lie along z (default consecutive frames); ``filled``: the frames to
    generate hold the model's fill already (:func:`_whole_slice_fill`); ``precision``: the model calls' (only
    theirs: the resampling and the bundled model's whole-slice flow fill stay outside; a model that makes its
    fill per window makes it inside, where its pooling, interpolation and grid sampling stay float32 anyway)."""
    grid = pipeline.settings.grid
    generator = torch.Generator().manual_seed(seed)

    def fill(grids: torch.Tensor) -> torch.Tensor:
        with inference_precision(pipeline.device, precision):
            out = pipeline.fill(grids, known, steps, generator, positions=positions, filled=filled)
        return out.float()

    return over_grids(frames, grid.rows, grid.cols, tuple(pipeline.settings.frame_size), z_step, fill, progress,
                      "fill").clamp(-1, 1)


def _whole_slice_fill(pipeline: GriDiTPipeline, before: torch.Tensor, after: torch.Tensor):
    """The model's condition fill for new slices between ``before`` and ``after`` (``(B, 1, Y, X)`` frames in
    its window), made on whole slices: a function of the fraction ``weight`` of the way (and, optionally, of the
    same slices in other units to move instead, such as HU), by its ``cond_fill``
    (``flow``: TV-L1 between the whole slices, estimated once, as ``--method flow``; ``linear``: their mix);
    None for a model without a fill. Made per window instead, the flow sees only a 64 x 64 tile of each slice:
    on the thigh STS_019 (3.27 mm, factor 3) that fill alone is 1.3 dB below the whole-slice flow."""
    kind = getattr(pipeline.stage1.config, "cond_fill", "zeros")
    if kind == "linear":
        return lambda weight, b=before, a=after: (1 - weight) * b + weight * a
    return motion_fill(before, after) if kind in ("flow", "flow_pair") else None


def motion_fill(before: torch.Tensor, after: torch.Tensor):
    """``fill(weight, b=before, a=after)``: ``b`` and ``a`` moved ``weight`` of the way along the motion between
    ``before`` and ``after`` (:func:`slice_flows`, estimated once) and mixed by distance; ``fill.moved(weight)``:
    the two moved slices (of ``before`` and ``after``) before they are mixed."""
    from ctgridit.core.motion import between, moved

    flow = slice_flows(before, after)

    def fill(weight: float, b: torch.Tensor = before, a: torch.Tensor = after) -> torch.Tensor:
        return between(b, a, torch.full((len(b),), float(weight)), flow)

    fill.moved = lambda weight: moved(before, after, torch.full((len(before),), float(weight)), flow)
    fill.flow = flow
    return fill


def fill_between(fill, images: torch.Tensor, factor: int) -> torch.Tensor:
    """``(factor (n - 1) + 1, 1, Y, X)``: the ``n`` ``images`` at every ``factor``-th place and between each two
    ``fill(k / factor, before, after)`` (a :func:`_whole_slice_fill` or :func:`motion_fill`, whose motion moves these
    images, in the model's window or in HU)."""
    out = torch.zeros(factor * (len(images) - 1) + 1, *images.shape[1:], dtype=images.dtype)
    out[::factor] = images
    for k in range(1, factor):
        out[k::factor] = fill(k / factor, images[:-1], images[1:])
    return out


#: Gaps per call of the refiner.
REFINER_BATCH = 8


def refined_fill(pipeline: GriDiTPipeline, fill, images: torch.Tensor, plain: torch.Tensor, factor: int,
                 pixel: float, precision: str = "fp32", progress: ProgressCallback | None = None,
                 hu: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``plain``, the :func:`fill_between` of a :func:`motion_fill` and ``images``, each new slice corrected by the
    slice model's refiner (:class:`~ctgridit.core.motion_refiner.MotionRefiner`: where each of its two known slices
    is sampled, how they are mixed, a residual; the mean of the gap taken both ways, ``symmetric``), given the
    slices before and after the two as context; its U-Net works at the pixel size it was trained on (``pixel`` mm
    in-plane resized to it). ``plain`` itself for a model without a refiner. ``hu``: the same ``images`` in HU and
    their plain fill; given, the result is ``(refined, refined in HU)``, the second the slices in HU moved and mixed
    as the refiner moves and mixes the first (without its residual, which is in the window)."""
    refiner = pipeline.refiner
    if refiner is None or not hasattr(fill, "flow"):
        return plain if hu is None else (plain, hu[1])
    out = plain.clone()
    out_hu = None if hu is None else hu[1].clone()
    scale = pixel / refiner.config.pixel_size
    gaps = len(images) - 1
    calls = [(k, i) for k in range(1, factor) for i in range(0, gaps, REFINER_BATCH)]
    device = pipeline.device
    for done, (k, i) in enumerate(calls):
        batch = slice(i, min(i + REFINER_BATCH, gaps))
        inputs = gap_inputs(images, fill.flow, k / factor, batch)
        pair = None if hu is None else torch.cat([hu[0][:-1][batch], hu[0][1:][batch]], 1).to(device)
        with torch.no_grad(), inference_precision(device, precision):
            made = refiner.symmetric(inputs.to(device), scale, pair)
        made, made_hu = (made, None) if hu is None else made
        places = slice(k + factor * i, k + factor * (i + len(inputs)), factor)
        out[places] = made.float().cpu().clamp(-1, 1)
        if hu is not None:
            out_hu[places] = made_hu.float().cpu()
        if progress is not None:
            progress("refine", done + 1, len(calls))
    return out if hu is None else (out, out_hu)


def gap_inputs(images: torch.Tensor, flow: torch.Tensor, weight: float, gaps: slice = slice(None)) -> torch.Tensor:
    """The refiner's inputs (:func:`~ctgridit.core.motion_refiner.refiner_inputs`) for new slices at fraction
    ``weight`` of the way across the ``gaps`` between consecutive ``images`` (``(n, 1, Y, X)``): each gap's two
    slices, the slices before and after them as context (the end slices repeated at the ends), and their
    :func:`slice_flows` (``flow``, one per gap)."""
    before, after = images[:-1][gaps], images[1:][gaps]
    outer_before = torch.cat([images[:1], images[:-2]])[gaps]
    outer_after = torch.cat([images[2:], images[-1:]])[gaps]
    return refiner_inputs(before, after, outer_before, outer_after, flow[gaps], torch.full((len(before),), weight))


#: Slice pairs per TV-L1 call.
FLOW_BATCH = 8


def slice_flows(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """TV-L1 optical flow between each pair of ``(B, 1, Y, X)`` whole slices in the HU window, both ways
    (:meth:`~ctgridit.core.motion.TVL1.both_ways`, ``(B, 4, Y, X)``), ``FLOW_BATCH`` pairs per call: what
    ``--method flow`` and the slice model's fill move the slices along."""
    from ctgridit.core.motion import TVL1

    return torch.cat([TVL1().both_ways(before[i:i + FLOW_BATCH, 0], after[i:i + FLOW_BATCH, 0])
                      for i in range(0, len(before), FLOW_BATCH)])


def served_factors(pipeline: GriDiTPipeline) -> list[int]:
    """The interpolation factors a slice model serves: those it was trained on (``gaps``), else ``cells - 1``
    (the cells between a grid's first and last)."""
    return list(pipeline.settings.sampling.stage1.gaps or [pipeline.settings.grid.cells - 1])


def _fill_gaps(pipeline: GriDiTPipeline, out: torch.Tensor, factor: int, steps: int | None, seed: int,
               progress: ProgressCallback | None, precision: str = "fp32") -> tuple[torch.Tensor, Any]:
    """``out`` (the input slices at every ``factor``-th place) with the slices between made by a model trained
    on several gaps: every gap becomes grids whose first and last cells are its two input slices and whose
    cells between are new slices at their fractional positions (``cells - 2`` at a time; a last group short of
    that repeats its last slice, and repeats are averaged). The condition's fill of the new slices is made on
    whole slices first (:func:`_whole_slice_fill`); returned with that fill (None for a model without one)."""
    cells = pipeline.settings.grid.cells
    inner, gaps = cells - 2, (len(out) - 1) // factor
    offsets = list(range(1, factor))
    groups = [offsets[i:i + inner] for i in range(0, len(offsets), inner)]
    groups = [g + [g[-1]] * (inner - len(g)) for g in groups]
    known = [1.0] + [0.0] * inner + [1.0]
    total = torch.zeros_like(out)
    count = torch.zeros(len(out))
    before, after = out[0:-1:factor], out[factor::factor]
    fill = _whole_slice_fill(pipeline, before, after)
    pair = getattr(pipeline.stage1.config, "cond_fill", "zeros") == "flow_pair"
    c = out.shape[1]
    for number, group in enumerate(groups):
        # a flow_pair model's condition channels after the frames': the two moved slices and the weight
        stack = torch.zeros(cells * gaps, 3 * c + 1 if pair else c, *out.shape[2:])
        stack[0::cells, :c], stack[cells - 1::cells, :c] = before, after
        if pair:
            for at, frames in ((0, before), (cells - 1, after)):
                stack[at::cells, c:2 * c], stack[at::cells, 2 * c:3 * c] = frames, frames
        for j, offset in enumerate(group):
            weight = offset / factor
            if pair:                                      # the slices moved once, and their mix from them
                first, last = fill.moved(weight)
                stack[1 + j::cells, :c] = (1 - weight) * first + weight * last
                stack[1 + j::cells, c:2 * c], stack[1 + j::cells, 2 * c:3 * c] = first, last
                stack[1 + j::cells, 3 * c] = weight
            elif fill is not None:
                stack[1 + j::cells, :c] = fill(weight)
        report = None if progress is None else (
            lambda _phase, done, n, number=number: progress("fill", number * n + done, len(groups) * n))
        filled = _fill_windows(pipeline, stack, known, z_step=cells, steps=steps, seed=seed + number,
                               progress=report, positions=[0.0, *(o / factor for o in group), 1.0],
                               filled=fill is not None, precision=precision)
        for j, offset in enumerate(group):
            total[offset::factor] += filled[1 + j::cells]
            count[offset::factor] += 1
    made = count > 0
    result = out.clone()
    result[made] = total[made] / count[made].view(-1, 1, 1, 1)
    return result, fill


#: Pairs of the scan's own slices :func:`checked_weight` measures the model's correction on (the middle ones).
CHECK_PAIRS = 8


def checked_weight(pipeline: GriDiTPipeline, frames: torch.Tensor, steps: int | None, seed: int,
                   progress: ProgressCallback | None = None, precision: str = "fp32",
                   pixel: float = 1.0) -> tuple[float, float | None] | None:
    """How much of the model's correction of its fill to keep, and of its refiner's, measured on the scan
    itself: every second input slice of a middle slab (``CHECK_PAIRS`` gaps) is left out and made again from its
    two neighbours at twice the input spacing (the smallest factor the model serves, 2 for the bundled one), by
    the fill alone, by the fill refined (:func:`refined_fill`; ``pixel``: the scan's in-plane voxel size, mm) and
    by the model; the weights ``w`` and ``v`` in [0, 1] that make ``fill + v (refined - fill) + w (model - fill)``
    closest to the left-out slices (least squares within those bounds, SciPy's ``lsq_linear``) are returned as
    ``(w, v)``, ``v`` None for a model without a refiner. On the upper-abdomen scan of the evaluation the
    model's correction is harmful (the model 0.7 dB below its own fill at factor 2) and is turned down; where
    it helps it is kept. No correction (or refinement) gives 1; a scan too short to check (fewer than ``factor +
    1`` slices), None."""

    n, factor = len(frames), min(served_factors(pipeline))
    if n < factor + 1:
        return None
    pairs = min(CHECK_PAIRS, (n - 1) // factor)
    first = (n - (factor * pairs + 1)) // 2
    slab = frames[first:first + factor * pairs + 1]
    out = torch.zeros_like(slab)
    out[::factor] = slab[::factor]
    report = None if progress is None else (lambda _phase, done, total: progress("check", done, total))
    model, fill = _fill_gaps(pipeline, out, factor, steps, seed, report, precision)
    if fill is None:
        return None
    plain = fill_between(fill, slab[::factor], factor)
    new = torch.arange(len(slab)) % factor != 0
    changes = {"correction": model}
    if pipeline.refiner is not None:
        changes["refiner"] = refined_fill(pipeline, fill, slab[::factor], plain, factor, pixel, precision)
    weights = checked_shares(slab[new], plain[new], {name: made[new] for name, made in changes.items()})
    return weights["correction"], weights.get("refiner")


def checked_shares(real: torch.Tensor, base: torch.Tensor, changed: dict[str, torch.Tensor]) -> dict[str, float]:
    """The shares in [0, 1] of each change (``changed[name] - base``) whose sum added to ``base`` is nearest to
    ``real`` in the least-squares sense (bounded least squares); a change that changes nothing (rms below 1e-5 of
    the window) is kept whole."""
    from scipy.optimize import lsq_linear

    error = (real - base).double().flatten()
    weights, columns = {}, []
    for name, made in changed.items():
        change = (made - base).double().flatten()
        if float(change @ change) <= 1e-10 * change.numel():
            weights[name] = 1.0
            error -= change
        else:
            columns.append((name, change))
    if columns:
        fit = lsq_linear(torch.stack([c for _, c in columns], 1).numpy(), error.numpy(), bounds=(0, 1), method="bvls")
        weights.update({name: float(w) for (name, _), w in zip(columns, fit.x)})
    return weights


def _to_hu(frames: torch.Tensor, lps, pipeline: GriDiTPipeline, keep: torch.Tensor) -> torch.Tensor:
    """``(1, X, Y, Z')`` HU: the model's frames out of its window, the input's own slices (at ``keep``) exactly."""
    from ctgridit.ct.transforms import frames_to_volume

    window = _window(pipeline)
    hu = unwindow_hu(frames_to_volume(frames), window)                           # (1, X, Y, Z')
    hu[..., keep] = lps.as_tensor().float()
    return hu


def _back(hu: torch.Tensor, lps, volume: CTVolume, z_scale: float, shift: int) -> CTVolume:
    """The LPS result turned back to the input's axis order, with the slice axis scaled by ``z_scale`` and
    the origin moved by ``shift`` (new) slices along it."""
    import nibabel as nib
    from monai.data import MetaTensor

    from ctgridit.ct.transforms import Orient, metatensor_to_volume

    affine = torch.as_tensor(np.asarray(lps.affine, dtype=np.float64)).clone()
    affine[:3, 2] *= z_scale
    affine[:3, 3] += shift * affine[:3, 2]
    meta = {k: v for k, v in lps.meta.items() if k not in ("affine", "original_affine")}
    out = MetaTensor(hu, affine=affine, meta=meta)
    codes = "".join(nib.aff2axcodes(volume.affine))
    back = Orient(codes)(out)
    return metatensor_to_volume(back, like=volume)
