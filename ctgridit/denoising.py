"""CT volume denoising: the task behind ``ctgridit denoise``.

Three methods share one input/output path (:func:`denoise_volume`):

- ``gridit``: the paper's Algorithm 3 with a GriDiT model
  (:func:`ctgridit.core.denoise.denoise`). The model only knows its own voxel
  grid (the bundled one: 128 x 128 slices at 3 mm), so the scan is brought to it
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
- ``bilateral`` and ``nlm``: scikit-image's bilateral filter and fast non-local
  means on every axial slice, the classical baselines. Their strength follows
  the estimated noise ``sigma`` (window units): bilateral ``sigma_color =
  sigma``, ``sigma_spatial = 1.5`` voxels (the best of a small grid on the
  shared scans at sigma 50 and 100 HU); NLM ``h = 0.8 sigma``, 5 x 5
  patches, search distance 6.

The output has the input's shape and affine exactly, in float HU (written as
int16 by :func:`ctgridit.ct.io.write_nifti`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctgridit.core.denoise import DENOISE_STEPS, denoise, estimate_noise
from ctgridit.core.grid import gray_to_rgb, rgb_to_gray
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.sampler import ProgressCallback
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW

METHODS = ("gridit", "bilateral", "nlm")


@dataclass
class DenoiseResult:
    """The denoised volume and what the run did (method, parameters, seconds)."""

    volume: CTVolume
    method: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def denoise_volume(volume: CTVolume, method: str = "gridit", strength: float | str = "auto",
                   model: str | os.PathLike | GriDiTPipeline | None = None, device: str = "auto", seed: int = 0,
                   steps: int = DENOISE_STEPS, progress: ProgressCallback | None = None) -> DenoiseResult:
    """Denoise ``volume`` with ``method`` (module docstring); the result keeps its geometry."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    began = time.perf_counter()
    if method == "gridit":
        hu, details = _gridit(volume, strength, model, device, seed, steps, progress)
    else:
        hu, details = _classical(volume, method, progress)
    out = CTVolume(hu.astype(np.float32), volume.affine.copy(), source=volume.source, source_dtype="int16",
                   series_uid=volume.series_uid, notes=[*volume.notes, f"denoised with {method}"])
    return DenoiseResult(out, method, time.perf_counter() - began, details)


# ------------------------------------------------------------------ gridit
def _gridit(volume: CTVolume, strength, model, device: str, seed: int, steps: int,
            progress: ProgressCallback | None) -> tuple[np.ndarray, dict]:
    from monai.transforms import Compose

    from ctgridit.ct.transforms import (HU_AIR, CropOrPadInPlane, Orient, ResampleToSpacing, frames_to_volume,
                                        unwindow_hu, volume_to_frames, volume_to_metatensor, window_hu)
    from ctgridit.synthesis import load_model

    pipeline = model if isinstance(model, GriDiTPipeline) else load_model(model, device)
    cfg = pipeline.config
    window = cfg.adapter.get("window", DEFAULT_WINDOW)
    height, width = cfg.frame_size
    crop = CropOrPadInPlane((width, height), pad_value=HU_AIR)
    to_model = Compose([Orient(), ResampleToSpacing(cfg.adapter["spacing"]), crop])
    smooth = CTVolume(antialiased(volume, cfg.adapter["spacing"]), volume.affine)
    on_grid = to_model(volume_to_metatensor(smooth))                         # (1, X, Y, Z) HU, model grid
    frames = window_hu(volume_to_frames(on_grid.as_tensor().float()), window)  # (Z, 1, H, W)
    if cfg.channels == 3:
        frames = gray_to_rgb(frames)
    generator = torch.Generator().manual_seed(seed)
    clean, levels = denoise(pipeline, frames, strength, steps, generator, progress)
    clean = clean.float().cpu()
    if cfg.channels == 3:
        clean = rgb_to_gray(clean)
    low, high = window
    correction = unwindow_hu(frames_to_volume(clean), window) - on_grid.as_tensor().float().clamp(low, high)
    delta = on_grid.clone()
    delta.copy_(correction)                                                    # the model grid's metadata
    crop.pad_value = 0.0                                                       # no correction outside the field
    back = to_model.inverse(delta).as_tensor()[0].numpy()                      # (X, Y, Z), the scan's grid
    details = {"model": str(model) if model is not None and not isinstance(model, GriDiTPipeline) else "bundled",
               "strength": strength, "steps": steps, "seed": seed,
               "noise_sigma_hu": levels.sigma_hr * (high - low) / 2,
               "t_stage1": levels.t1, "t_stage2": levels.t2,
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
def _classical(volume: CTVolume, method: str, progress: ProgressCallback | None) -> tuple[np.ndarray, dict]:
    from skimage.restoration import denoise_bilateral, denoise_nl_means

    low, high = DEFAULT_WINDOW
    clipped = np.clip(volume.array.astype(np.float64), low, high)
    scaled = (clipped - low) / (high - low)                                    # [0, 1]
    slices = torch.from_numpy(np.moveaxis(scaled, 2, 0)[:, None].copy())       # (Z, 1, X, Y)
    sigma = estimate_noise(slices * 2 - 1)                                      # [-1, 1]: window limits
    sigma /= 2                                                                 # back to [0, 1] units
    out = np.empty_like(scaled)
    for k in range(scaled.shape[2]):
        if method == "bilateral":
            out[:, :, k] = denoise_bilateral(scaled[:, :, k], sigma_color=sigma, sigma_spatial=1.5)
        else:
            out[:, :, k] = denoise_nl_means(scaled[:, :, k], h=0.8 * sigma, sigma=sigma, patch_size=5,
                                            patch_distance=6, fast_mode=True)
        if progress is not None:
            progress(method, k + 1, scaled.shape[2])
    params = ({"sigma_color": sigma, "sigma_spatial": 1.5} if method == "bilateral"
              else {"h": 0.8 * sigma, "patch_size": 5, "patch_distance": 6})
    details = {"noise_sigma_hu": sigma * (high - low), **params}
    return volume.array.astype(np.float64) + (out * (high - low) + low - clipped), details
