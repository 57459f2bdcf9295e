"""CT volume denoising: the task behind ``ctgridit denoise``.

Three methods share one input/output path (:func:`denoise_volume`):

- ``gridit``: the paper's Algorithm 3 with a GriDiT model. Two kinds of model:

  - a **native-resolution denoiser** (``adapter.resolution: native`` in its
    settings; the bundled default, ``ctgridit/models/ct_denoise``): a
    stage-1 grid model of 2 x 2 tiles of consecutive slices at the scan's own
    voxel size. The scan is oriented LPS (axes only, no resampling), its noise
    estimated at full resolution (:func:`~ctgridit.core.frame_denoising.estimate_noise`)
    and the matching level ``t*`` chosen as below; then MONAI's sliding window
    covers it with tiles overlapping by about a quarter in-plane (the step off the patch grid,
    :func:`ctgridit.ct.tiled.in_plane_overlap`) and grids overlapping by half along z
    (:func:`ctgridit.ct.tiled.over_grids`), every window is denoised by the posterior mean at the exact level
    of the noise (one network call, :func:`~ctgridit.core.frame_denoising.posterior_mean`)
    and the windows are blended with Gaussian weights (no seams). A scan whose
    estimated noise is below the model's first level comes back unchanged.
  - a **fixed-grid model** (the synthesis model, e.g. ``--model`` with the
    bundled synthesis model), :meth:`~ctgridit.core.pipeline.GriDiTPipeline.denoise`. The model only knows its
    own voxel grid (its frame size at the spacing its settings record), so the scan is brought to it
  exactly as training data were (LPS orientation, resampling to the model's
  spacing, after a Gaussian anti-aliasing blur where it is coarser than the
  scan, ``sigma = (factor - 1) / 2`` voxels as scikit-image's ``rescale``;
  centre crop / pad in-plane), denoised there, and the *correction*
  (denoised minus input, in HU) is resampled back onto the scan's own grid and
  added to it. On a scan at the model's spacing that is the model's output
  itself; on a finer scan only structure at the model's resolution and coarser
  is cleaned, and the finer part of the input (noise included) passes through
  unchanged rather than being blurred away. Voxels outside the model's field
  of view and HU outside its window keep their input values.
- ``bilateral``, ``nlm`` and ``nlm3d``: scikit-image's bilateral filter and
  fast non-local means on every axial slice, and non-local means on the whole
  volume (3D patches), the classical baselines. Their strength follows the
  estimated noise ``sigma``; their settings (:data:`CLASSICAL`) were tuned on a
  scan that no evaluation uses.

The output has the input's shape and affine exactly, in float HU (written as
int16 by :func:`ctgridit.ct.io.write_nifti`).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctgridit.core.dct_wiener import (CANDIDATES, CHECK_SIZE, central_part, choose_block, dct_hard_threshold,
                                     dct_wiener)
from ctgridit.core.frame_denoising import (DENOISE_STEPS, denoise_grids, estimate_noise, start_level,
                                           timestep_noise, trained_level)
from ctgridit.core.grid import gray_to_rgb, rgb_to_gray
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.precision import inference_precision, resolve_precision
from ctgridit.core.sampler import ProgressCallback
from ctgridit.ct.tiled import in_plane_overlap, over_grids
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW, from_unit, to_unit, unwindow_hu, window_change, window_hu
from ctgridit.model_folders import BUNDLED_DENOISER, is_native, open_model
from ctgridit.seeds import check_seed

METHODS = ("gridit", "bilateral", "nlm", "nlm3d")


@dataclass
class DenoiseResult:
    """The denoised volume and what the run did (method, parameters, seconds)."""

    volume: CTVolume
    method: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def denoise_volume(volume: CTVolume, method: str = "gridit", strength: float | str = "auto",
                   model: str | os.PathLike | GriDiTPipeline | None = None, device: str = "auto", seed: int = 0,
                   steps: int = DENOISE_STEPS, progress: ProgressCallback | None = None,
                   noise: float | str = "auto", guard: bool = True, wiener: bool = True,
                   precision: str = "auto") -> DenoiseResult:
    """Denoise ``volume`` with ``method`` (module docstring); the result keeps its geometry.

    ``model``: a model folder or a loaded pipeline; default the bundled denoiser. ``noise``: the standard
    deviation in HU of the noise to remove, or ``"auto"`` (estimated); ``strength`` (gridit) sets the diffusion
    level instead, for experiments. ``guard``: blend gridit's output with the input by Stein's unbiased risk
    estimate (:mod:`ctgridit.core.sure`), so that it is not worse than the input. ``wiener`` (native-resolution
    denoisers): then use that output as the pilot of an empirical Wiener filter of the input
    (:mod:`ctgridit.core.dct_wiener`; not guarded itself: measured better than its pilot on every held-out row).
    ``precision``: the model's arithmetic (:mod:`ctgridit.core.precision`; ``auto``: bfloat16 on CPUs with AMX or
    AVX-512 BF16).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_seed(seed)
    if noise != "auto" and not float(noise) > 0:
        raise ValueError(f"noise must be 'auto' or a positive number of HU, got {noise!r}")
    began = time.perf_counter()
    estimated = noise_hu(volume.array)
    if method == "gridit":
        pipeline = model if isinstance(model, GriDiTPipeline) else load_denoiser(model, device)
        if noise != "auto" and not is_native(pipeline):
            from ctgridit.errors import CTGridItError

            raise CTGridItError("a noise level in HU needs a native-resolution denoiser (this model works on its "
                                "own voxel grid)", "--noise", "leave --noise at auto, or use the bundled denoiser")
        resolved = resolve_precision(pipeline.device, precision)
        run = functools.partial(_gridit_native if is_native(pipeline) else _gridit, precision=resolved)
        hu, details = run(volume, strength, pipeline, seed, steps, progress, noise)
        in_input = estimated if noise == "auto" else float(noise)            # the noise SURE counts as noise
        chain = None
        if guard and details["noise_removed_hu"] > 0 and in_input > 0:
            hu, details["sure"], chain = _guarded(volume, hu, details, run, pipeline, seed, steps, strength, noise,
                                                  in_input)
        details["precision"] = resolved
        if wiener and is_native(pipeline) and details["noise_removed_hu"] > 0 and in_input > 0:
            hu, details["wiener"] = _wiener(volume, hu, in_input, progress, chain)
        details.pop("levels")
        details["model"] = str(model) if model is not None and not isinstance(model, GriDiTPipeline) else \
            ("bundled denoiser" if model is None else "given pipeline")
    else:
        hu, details = classical_denoise(volume.array, method, progress=progress,
                                        sigma_hu=None if noise == "auto" else float(noise))
    details = {"noise_estimated_hu": estimated, **details}
    out = CTVolume(hu.astype(np.float32), volume.affine.copy(), source=volume.source, source_dtype="int16",
                   series_uid=volume.series_uid, notes=[*volume.notes, f"denoised with {method}"])
    return DenoiseResult(out, method, time.perf_counter() - began, details)


def _wiener(volume: CTVolume, pilot: np.ndarray, sigma: float, progress: ProgressCallback | None,
            chain: dict | None = None) -> tuple[np.ndarray, dict]:
    """The empirical Wiener filter of ``volume`` with ``pilot`` (HU) for noise ``sigma`` (HU)
    (:mod:`ctgridit.core.dct_wiener`): on HU + 1000 (proportional to attenuation, zero in air, so that the shrinkage
    of a block's mean pulls towards air's "no signal", not towards water's 0 HU, which would bias soft tissue), with
    the block size chosen by SURE (:func:`~ctgridit.core.dct_wiener.choose_block`), the blocks' last side (4 in
    every candidate) along the slice axis: the array axis of the thickest voxels, or the third as stored where it
    is about as thick as the thickest.

    ``chain`` (the guard's slab, probe and pilots, :func:`_guarded`): then the pilot is also tried averaged with
    the input's hard-thresholded estimate (:func:`~ctgridit.core.dct_wiener.dct_hard_threshold`), which keeps
    texture the model smooths (+0.2 to +0.5 dB on a held-out thigh, down to -0.12 dB on chests), and the one
    with the lower SURE of the whole chain (model, blend and Wiener step, :func:`_chain_sure`) is used."""
    axis = thick_axis(volume)

    def along(values: tuple[int, int, int]) -> tuple[int, int, int]:      # (in-plane, in-plane, slice) to array axes
        out = [values[0]] * 3
        out[axis] = values[2]
        return tuple(out)

    candidates = [(along(block), along(step)) for block, step in CANDIDATES]
    offset = 1000.0
    noisy, pilot = volume.array + offset, pilot + offset
    chosen, estimates = choose_block(noisy, pilot, sigma, candidates, along(CHECK_SIZE))
    block, step = candidates[chosen]
    hard = hard_step(step, axis, tuple(min(b, n) for b, n in zip(block, volume.shape)))
    details = {"sigma_hu": sigma, "block": list(block), "step": list(step), "hard_step": list(hard),
               "estimated_rmse_hu": {"x".join(map(str, b)): max(0.0, e) ** 0.5
                                     for (b, _), e in zip(candidates, estimates)}, "pilot": "model"}
    if chain is not None:
        risks = {mix: max(0.0, _chain_sure(chain, sigma, block, step, mix, hard)) for mix in (False, True)}  # reported
        details["chain_rmse_hu"] = {("model + hard thresholding" if mix else "model"): max(0.0, r) ** 0.5
                                    for mix, r in risks.items()}
        if risks[True] < risks[False]:
            pilot = (pilot + dct_hard_threshold(noisy, sigma, block, hard)) / 2
            details["pilot"] = "model + hard thresholding"
    out = dct_wiener(noisy, pilot, sigma, block, step,
                     callback=None if progress is None else (lambda done, total: progress("wiener", done, total)))
    return out - offset, details


def thick_axis(volume: CTVolume) -> int:
    """The array axis the Wiener blocks' slice side and the guard's slab lie along: that of the thickest voxels, or
    the third as stored where it is about as thick (within 10 %) as the thickest."""
    sizes = np.linalg.norm(np.asarray(volume.affine, dtype=np.float64)[:3, :3], axis=0)
    return 2 if sizes[2] >= 0.9 * sizes.max() else int(np.argmax(sizes))


#: The central in-plane part of the guard's slab :func:`_chain_sure` runs the Wiener step on (voxels).
CHAIN_PART = (256, 256)


def chain_part(chain: dict) -> tuple[slice, ...]:
    """The part of the guard's slab (:func:`_guarded`) :func:`_chain_sure` estimates on: the central ``CHAIN_PART``
    across the slab, all of its planes."""
    size = list(CHAIN_PART)
    size.insert(chain["axis"], chain["y"].shape[chain["axis"]])
    return central_part(chain["y"].shape, tuple(size))


def hard_step(step, axis: int, block=None) -> tuple[int, ...]:
    """The step of the hard-thresholded estimate the pilot may be averaged with: the Wiener step's, every second
    block along the slice axis ``axis`` (half its offsets: -0.02 dB on the 1.5 mm chest crop and STS_019 at 100 HU
    against the same step, for half of its 30 s at 512 x 512 x 100; docs/denoising.md)."""
    out = list(step)
    out[axis] *= 2
    if block is not None:                                  # at most the block's side (thin volumes shrink it)
        out[axis] = min(out[axis], block[axis])
    return tuple(out)


def _chain_sure(chain: dict, sigma: float, block, step, mix: bool, hard=None) -> float:
    """SURE (:mod:`ctgridit.core.sure`) of the whole denoiser on the guard's slab: the Wiener step on the slab and on
    the slab plus the guard's probe, each with the blended model output the guard got for it as pilot (averaged with
    the hard-thresholded estimate of that input if ``mix``, in blocks every ``hard`` voxels, default ``step``), so
    that the divergence counts the model's dependence on the noise too (the pilot held fixed, SURE comes out about 2
    times low and favours the model's pilot); on the slab's central ``CHAIN_PART`` across it (:func:`chain_part`)."""
    from ctgridit.core.sure import sure_mse

    part = chain_part(chain)
    outputs = []
    for y, pilot in ((chain["y"], chain["pilot"]), (chain["y_moved"], chain["pilot_moved"])):
        y, pilot = y[part] + 1000.0, pilot[part] + 1000.0
        if mix:
            pilot = (pilot + dct_hard_threshold(y, sigma, block, step if hard is None else hard)) / 2
        outputs.append(torch.from_numpy(dct_wiener(y, pilot, sigma, block, step).astype(np.float64)) - 1000.0)
    y = torch.from_numpy(chain["y"][part])
    divergence = float((chain["probe"][part] * (outputs[1] - outputs[0])).mean() / chain["eps"])
    return sure_mse(y, outputs[0], sigma, divergence)


#: The slices of the slab the divergence of the gridit denoiser is estimated on (two more runs over it).
GUARD_SLICES = 8


def _guarded(volume: CTVolume, hu: np.ndarray, details: dict, run, pipeline: GriDiTPipeline, seed: int, steps: int,
             strength, noise, sigma: float) -> tuple[np.ndarray, dict, dict]:
    """``hu`` blended with the input by SURE (:mod:`ctgridit.core.sure`) for input noise ``sigma`` (HU): the
    residual and the divergence of the same denoiser (same levels, same seed) on the middle slab of the volume,
    the weight applied to the whole. Also returned: the slab, the probe and the blended output for the slab and
    for the slab plus the probe (HU), from which :func:`_wiener` estimates the whole chain's error."""
    from ctgridit.core.sure import mc_divergence, sure_mse, sure_weight

    # the slab is GUARD_SLICES of the model's frames: planes along the array axis that runs head-feet (the model
    # works on axial frames after reorienting), which is the slice axis of axially stored scans
    axis = int(np.argmax(np.abs(np.asarray(volume.affine, dtype=np.float64)[2, :3])))
    first = max(0, (volume.shape[axis] - GUARD_SLICES) // 2)
    planes = range(first, min(first + GUARD_SLICES, volume.shape[axis]))
    slab = torch.from_numpy(np.take(volume.array, planes, axis=axis).astype(np.float64))
    runs = []

    def denoise(block: torch.Tensor) -> torch.Tensor:
        part = CTVolume(block.numpy().astype(np.float32), volume.affine, source=volume.source)
        out = torch.from_numpy(run(part, strength, pipeline, seed, steps, None, noise, details["levels"])[0])
        runs.append((block, out))
        return out

    out = denoise(slab)
    divergence = mc_divergence(denoise, slab, sigma, torch.Generator().manual_seed(seed), denoised=out)
    weight = sure_weight(slab, out, sigma, divergence)
    blended = volume.array + weight * (hu - volume.array)
    mixed = slab + weight * (out - slab)
    (moved, moved_out) = runs[1]
    eps = float((moved - slab).abs().max())                                   # the probe's step as taken
    chain = {"axis": axis, "first": first, "y": slab.numpy(), "pilot": mixed.numpy(), "y_moved": moved.numpy(), "eps": eps,
             "pilot_moved": (moved + weight * (moved_out - moved)).numpy(), "probe": torch.sign(moved - slab)}
    return blended, {"weight": weight, "divergence": divergence, "slab_slices": int(slab.shape[axis]),
                     "estimated_rmse_hu": {"input": sigma,
                                           "denoiser": max(0.0, sure_mse(slab, out, sigma, divergence)) ** 0.5,
                                           "output": max(0.0, sure_mse(slab, mixed, sigma,
                                                                       (1 - weight) + weight * divergence)) ** 0.5}}, chain


def read_reference(path: str | os.PathLike, volume: CTVolume) -> CTVolume:
    """The clean scan at ``path`` a denoising run is measured against: refused unless on ``volume``'s grid."""
    from ctgridit.ct.io import read_ct
    from ctgridit.errors import CTGridItError

    clean = read_ct(path)
    if clean.shape != volume.shape:
        raise CTGridItError(f"has shape {clean.shape}, the input {volume.shape}", path,
                            "give the clean scan of the same grid as the input")
    if not np.allclose(clean.affine, volume.affine, atol=1e-3):
        raise CTGridItError("is not on the input's voxel grid (its affine differs)", path,
                            "give the clean scan the noisy input was made from")
    return clean


def denoise_summary(volume: CTVolume, result: DenoiseResult, clean: CTVolume | None = None) -> dict[str, Any]:
    """What a run did (method, seconds, grid, the method's details) and, with the clean scan, PSNR and SSIM of
    the input and the output (3D, the HU window, whole volume and body mask): the ``--report`` of ``denoise``."""
    from ctgridit.ct.fidelity import body_mask, quality

    summary = {"method": result.method, "seconds": round(result.seconds, 3), "shape": list(volume.shape),
               "spacing_mm": list(volume.spacing), **result.details}
    if clean is not None:
        mask = body_mask(clean.array)
        summary["window_hu"] = list(DEFAULT_WINDOW)
        summary["input_quality"] = quality(clean.array, volume.array, mask=mask)
        summary["output_quality"] = quality(clean.array, result.volume.array, mask=mask)
    return summary


# ------------------------------------------------------------------ models


def load_denoiser(model: str | os.PathLike | None = None, device: str = "auto") -> GriDiTPipeline:
    """A CT model folder to denoise with; ``None`` means the bundled denoiser."""
    from ctgridit.errors import CTGridItError

    pipeline = open_model(model, BUNDLED_DENOISER, "denoising", device, kind="ct")
    if not is_native(pipeline) and "spacing" not in pipeline.settings.adapter:
        raise CTGridItError("the model folder records neither its voxel spacing nor that it works at the scan's "
                            "own resolution (settings.adapter in model_index.json)", model or BUNDLED_DENOISER,
                            "export it again from the trainer")
    return pipeline


# ------------------------------------------------------------------ gridit
def _gridit_native(volume: CTVolume, strength, pipeline: GriDiTPipeline, seed: int, steps: int,
                   progress: ProgressCallback | None, noise: float | str = "auto", pinned=None,
                   precision: str = "fp32") -> tuple[np.ndarray, dict]:
    from ctgridit.core.frame_denoising import noise_timestep

    from ctgridit.ct.transforms import Orient, frames_to_volume, volume_to_frames, volume_to_metatensor

    cfg = pipeline.settings
    window = cfg.adapter.get("window", DEFAULT_WINDOW)
    low, high = window
    half = (high - low) / 2
    orient = Orient()
    lps = orient(volume_to_metatensor(volume))                                 # (1, X, Y, Z) HU, axes only
    hu = lps.as_tensor().float()
    frames = window_hu(volume_to_frames(hu), window)                          # (Z, 1, Y, X) in [-1, 1]
    if pinned is not None:                                                     # the levels of an earlier run
        t, own = pinned
    elif noise != "auto":                                                      # told: remove that much
        own = float(noise) / half
        t = trained_level(pipeline.scheduler, noise_timestep(pipeline.scheduler, own), "auto",
                          cfg.timesteps.get("stage1"), volume.source)
    else:
        sigma = estimate_noise(frames)
        t, own = start_level(pipeline.scheduler, strength, sigma)
        t = trained_level(pipeline.scheduler, t, strength, cfg.timesteps.get("stage1"), volume.source)
    rows, cols = cfg.grid.rows, cfg.grid.cols
    z_step = max(1, cfg.grid.cells // 2)                                       # grids overlap by half along z
    patch = int(pipeline.stage1.config.patch_size)
    generator = torch.Generator().manual_seed(seed)
    if t > 0:
        def denoise(grids: torch.Tensor) -> torch.Tensor:                   # only the model in `precision`
            with inference_precision(pipeline.device, precision):
                out = denoise_grids(pipeline, grids.to(pipeline.device, pipeline.dtype), t, own, steps, generator)
            return out.float()

        clean = over_grids(frames, rows, cols, tuple(cfg.frame_size), z_step, denoise, progress,
                           "denoise", patch=patch).clamp(-1, 1)                              # (Z, 1, Y, X)
    else:
        clean = frames                                                         # no noise to take out
    correction = window_change(unwindow_hu(frames_to_volume(clean), window), hu, window)
    delta = lps.clone()
    delta.copy_(correction)
    back = orient.inverse(delta).as_tensor()[0].numpy()                       # (X, Y, Z), the scan's own axes
    level = timestep_noise(pipeline.scheduler, t)
    removed = (level if strength != "auto" and noise == "auto" else min(own, level)) if t > 0 else 0.0
    details = {"strength": strength, "steps": steps, "seed": seed, "noise_removed_hu": removed * half,
               "t": t, "tile": list(cfg.frame_size), "levels": (t, own),
               "window_overlap": [*(round(in_plane_overlap(n, patch), 3) for n in cfg.frame_size),
                                  1 - z_step / cfg.grid.cells]}
    return volume.array.astype(np.float64) + back, details


def _gridit(volume: CTVolume, strength, pipeline: GriDiTPipeline, seed: int, steps: int,
            progress: ProgressCallback | None, noise: float | str = "auto", pinned=None,
            precision: str = "fp32") -> tuple[np.ndarray, dict]:
    from monai.transforms import Compose

    from ctgridit.ct.transforms import (HU_AIR, Orient, ResampleToSpacing, crop_or_pad_in_plane,
                                        frames_to_volume, volume_to_frames, volume_to_metatensor)

    cfg = pipeline.settings
    window = cfg.adapter.get("window", DEFAULT_WINDOW)
    height, width = cfg.frame_size
    to_model = Compose([Orient(), ResampleToSpacing(cfg.adapter["spacing"]),
                        crop_or_pad_in_plane((width, height), pad_value=HU_AIR)])
    smooth = CTVolume(antialiased(volume, cfg.adapter["spacing"]), volume.affine)
    on_grid = to_model(volume_to_metatensor(smooth))                         # (1, X, Y, Z) HU, model grid
    frames = window_hu(volume_to_frames(on_grid.as_tensor().float()), window)  # (Z, 1, H, W)
    if cfg.channels == 3:
        frames = gray_to_rgb(frames)
    generator = torch.Generator().manual_seed(seed)
    if noise != "auto" and pinned is None:
        from ctgridit.errors import CTGridItError

        raise CTGridItError("a noise level in HU needs a native-resolution denoiser (this model works on its own "
                            "grid)", volume.source, "leave --noise at auto, or use the bundled denoiser")
    with inference_precision(pipeline.device, precision):          # the models only; resampling stays float32
        clean, levels = pipeline.denoise(frames, strength, steps, generator, progress, pinned)
    clean = clean.float().cpu()
    if cfg.channels == 3:
        clean = rgb_to_gray(clean)
    low, high = window
    correction = window_change(unwindow_hu(frames_to_volume(clean), window), on_grid.as_tensor().float(), window)
    delta = on_grid.clone()
    delta.copy_(correction)                                                    # the model grid's metadata
    back = to_model.inverse(delta).as_tensor()[0].numpy()      # (X, Y, Z), the scan's grid; 0 outside the field
    details = {"strength": strength, "steps": steps, "seed": seed,
               "noise_removed_hu": levels.sigma_hr * (high - low) / 2 if max(levels.t1, levels.t2) > 0 else 0.0,
               "t_stage1": levels.t1, "t_stage2": levels.t2, "levels": levels,
               "model_grid": list(on_grid.shape[1:]), "model_spacing": list(cfg.adapter["spacing"])}
    return volume.array.astype(np.float64) + back, details


def antialiased(volume: CTVolume, spacing) -> np.ndarray:
    """``volume``'s HU blurred along every array axis that the model's ``spacing`` (LPS x, y, z) makes coarser."""
    from scipy.ndimage import gaussian_filter

    sigmas = []
    for axis in range(3):
        world = int(np.argmax(np.abs(volume.affine[:3, axis])))              # the world axis this array axis runs along
        factor = float(spacing[world]) / volume.spacing[axis]
        sigmas.append(max(0.0, (factor - 1) / 2))
    hu = volume.array.astype(np.float32)
    return gaussian_filter(hu, sigmas) if any(sigmas) else hu


# --------------------------------------------------------------- classical
#: Classical filter settings, relative to the estimated noise ``sigma`` (window units) where they say so;
#: tuned on a scan kept out of every evaluation (``python pipelines/eval_denoise.py --tune``).
CLASSICAL = {
    "bilateral": {"color": 1.0, "spatial": 2.0},                      # sigma_color = color * sigma, voxels
    "nlm": {"h": 0.8, "patch_size": 5, "patch_distance": 6},          # h = h * sigma, per slice
    "nlm3d": {"h": 0.8, "patch_size": 3, "patch_distance": 3},        # h = h * sigma, the whole volume
}


def classical_filter(scaled: np.ndarray, method: str, sigma: float, params: dict | None = None,
                     progress: ProgressCallback | None = None) -> np.ndarray:
    """``method`` on an ``(X, Y, Z)`` volume scaled to [0, 1] with noise ``sigma`` (same units)."""
    from skimage.restoration import denoise_bilateral, denoise_nl_means

    p = {**CLASSICAL[method], **(params or {})}
    if method == "nlm3d":
        out = denoise_nl_means(scaled, h=p["h"] * sigma, sigma=sigma, patch_size=p["patch_size"],
                               patch_distance=p["patch_distance"], fast_mode=True, channel_axis=None)
        if progress is not None:
            progress(method, 1, 1)
        return out
    out = np.empty_like(scaled)
    for k in range(scaled.shape[2]):
        if method == "bilateral":
            out[:, :, k] = denoise_bilateral(scaled[:, :, k], sigma_color=p["color"] * sigma,
                                             sigma_spatial=p["spatial"])
        else:
            out[:, :, k] = denoise_nl_means(scaled[:, :, k], h=p["h"] * sigma, sigma=sigma,
                                            patch_size=p["patch_size"], patch_distance=p["patch_distance"],
                                            fast_mode=True)
        if progress is not None:
            progress(method, k + 1, scaled.shape[2])
    return out


def noise_hu(hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> float:
    """The noise standard deviation of an ``(X, Y, Z)`` HU array in HU, estimated slice by slice at full
    resolution (:func:`~ctgridit.core.frame_denoising.estimate_noise`, blocks clipped by the window left out)."""
    low, high = window
    slices = torch.from_numpy(np.moveaxis(window_hu(np.asarray(hu, np.float32), window), 2, 0)[:, None].copy())
    return estimate_noise(slices) * (high - low) / 2


def classical_denoise(hu: np.ndarray, method: str, params: dict | None = None,
                      progress: ProgressCallback | None = None, sigma_hu: float | None = None
                      ) -> tuple[np.ndarray, dict]:
    """A classical filter on an ``(X, Y, Z)`` HU array at the noise ``sigma_hu`` (default: its estimated noise):
    the filtered HU (what lies outside the window is kept as it was) and the details (noise, settings)."""
    hu = hu.astype(np.float64)
    low, high = DEFAULT_WINDOW
    sigma_hu = noise_hu(hu) if sigma_hu is None else float(sigma_hu)
    out = classical_filter(to_unit(hu), method, sigma_hu / (high - low), params, progress=progress)
    details = {"noise_removed_hu": sigma_hu, **CLASSICAL[method], **(params or {})}
    return hu + window_change(from_unit(out), hu), details
