"""The CT adapter between the generic core's frame sequences and CT volumes.

A generated sequence ``(N, C, H, W)`` in [-1, 1] becomes a :class:`CTVolume`:
channels averaged (:func:`~ctgridit.core.grid.rgb_to_gray`), mapped back to HU
through the model's window, and stacked as axial slices in the canonical LPS
layout of :mod:`ctgridit.ct.transforms` (frame 0 the most inferior slice, rows
anterior to posterior, columns patient right to left). The affine carries the
model's voxel spacing and puts the volume's centre at the world origin, so 3D
Slicer shows it upright with the right proportions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ctgridit.core.grid import rgb_to_gray
from ctgridit.ct.transforms import frames_to_volume, unwindow_hu
from ctgridit.ct.volume import LPS_FLIP, CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW


def centred_lps_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """The RAS affine of an LPS-ordered ``(X, Y, Z)`` array with ``spacing`` mm, centred on the world origin."""
    lps = np.diag([*map(float, spacing), 1.0])
    lps[:3, 3] = -lps[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return LPS_FLIP @ lps


def sequence_to_volume(frames: torch.Tensor, spacing: Sequence[float],
                       window: Sequence[float] = DEFAULT_WINDOW, source: str | None = None) -> CTVolume:
    """``(N, C, H, W)`` frames in [-1, 1] -> a float32 HU :class:`CTVolume` of shape ``(W, H, N)``."""
    gray = rgb_to_gray(frames.detach().float().cpu()) if frames.shape[1] > 1 else frames.detach().float().cpu()
    hu = unwindow_hu(frames_to_volume(gray), window)[0]                # (X, Y, Z)
    array = hu.numpy()
    return CTVolume(array, centred_lps_affine(array.shape, spacing), source=source, source_dtype="int16")
