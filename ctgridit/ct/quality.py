"""Along-z quality measures of a CT volume, shared by the synthesis tests and benchmark.

- :func:`neighbour_difference`: mean |HU difference| of neighbouring axial
  slices (flicker when too high, frozen copies when too low);
- :func:`reference_neighbour_difference`: the same for a real scan prepared
  like training data (resampled to a spacing, cropped/padded in-plane);
- :func:`max_far_ssim`: the largest SSIM between slices more than ``far`` apart
  (repeats when high), on the HU window scaled to [0, 1].
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ctgridit.ct.window import DEFAULT_WINDOW


def neighbour_difference(hu: np.ndarray) -> float:
    """Mean |HU difference| between slices ``k`` and ``k + 1`` of an ``(X, Y, Z)`` volume."""
    return float(np.abs(np.diff(hu, axis=2)).mean())


def reference_neighbour_difference(path: str | os.PathLike, spacing: Sequence[float],
                                   in_plane: Sequence[int], window: Sequence[float] = DEFAULT_WINDOW) -> float:
    """:func:`neighbour_difference` of a real scan resampled to ``spacing`` and windowed like training data."""
    from ctgridit.ct.training_data import load_ct_sequences
    from ctgridit.ct.transforms import unwindow_hu

    frames = load_ct_sequences([path], spacing=spacing, window=window, in_plane=tuple(in_plane))[0]  # (Z, 1, Y, X)
    hu = unwindow_hu(frames, window)
    return float((hu[1:] - hu[:-1]).abs().mean())


def max_far_ssim(hu: np.ndarray, far: int = 30, window: Sequence[float] = DEFAULT_WINDOW) -> float:
    """The largest SSIM between slices more than ``far`` apart (NaN when the volume is too short)."""
    from skimage.metrics import structural_similarity

    low, high = window
    scaled = (np.clip(hu, low, high) - low) / (high - low)
    n = hu.shape[2]
    return max((structural_similarity(scaled[:, :, i], scaled[:, :, j], data_range=1.0)
                for i in range(n) for j in range(i + far + 1, n)), default=float("nan"))
