"""Along-z quality measures of a CT volume, shared by the synthesis tests and benchmark.

- :func:`neighbour_difference`: mean |HU difference| of neighbouring axial
  slices (flicker when too high, frozen copies when too low);
- :func:`reference_neighbour_difference`: the same for a real scan prepared
  like training data (resampled to a spacing, cropped/padded in-plane);
- :func:`far_ssim`, :func:`max_far_ssim`: SSIM between slices more than
  ``far`` apart (repeats when high), on the HU window scaled to [0, 1];
- :func:`lung_fraction`, :func:`lung_extent`: where the lungs lie along z
  (a chest volume holds the whole lung field, with abdomen below and neck
  above);
- :func:`lung_regions`: how many separate lungs an axial slice shows (two in
  a mid-chest slice: dark regions inside a body outline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ctgridit.ct.window import DEFAULT_WINDOW, to_unit, unwindow_hu

#: Voxels below this inside the body count as lung (and airways).
LUNG_BELOW_HU = -500.0


def neighbour_difference(hu: np.ndarray) -> float:
    """Mean |HU difference| between slices ``k`` and ``k + 1`` of an ``(X, Y, Z)`` volume."""
    return float(np.abs(np.diff(hu, axis=2)).mean())


def reference_neighbour_difference(path: str | os.PathLike, spacing: Sequence[float],
                                   in_plane: Sequence[int], window: Sequence[float] = DEFAULT_WINDOW) -> float:
    """:func:`neighbour_difference` of a real scan resampled to ``spacing`` and windowed like training data."""
    from ctgridit.ct.sequences import load_ct_sequences

    frames = load_ct_sequences([path], spacing=spacing, window=window, in_plane=tuple(in_plane))[0]  # (Z, 1, Y, X)
    hu = unwindow_hu(frames, window)
    return float((hu[1:] - hu[:-1]).abs().mean())


def far_ssim(hu: np.ndarray, far: int = 30, window: Sequence[float] = DEFAULT_WINDOW) -> np.ndarray:
    """SSIM of every pair of axial slices more than ``far`` apart: ``(Z, Z)`` with NaN for nearer pairs.

    The same number as scikit-image's ``structural_similarity`` (7 x 7 uniform
    window, sample covariance, K1 0.01, K2 0.03, data range 1 on the HU window
    scaled to [0, 1], a 3-pixel border left out), computed for all pairs of a
    distance at once.
    """
    from scipy.ndimage import uniform_filter

    x = to_unit(np.asarray(hu, dtype=np.float64), window)                        # (X, Y, Z)
    n, size, pad = x.shape[2], 7, 3
    norm = size * size / (size * size - 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def smooth(a: np.ndarray) -> np.ndarray:
        return uniform_filter(a, size=(size, size, 1), mode="reflect")

    mean, square = smooth(x), smooth(x * x)
    var = norm * (square - mean * mean)
    out = np.full((n, n), np.nan)
    for d in range(far + 1, n):
        a, b = slice(0, n - d), slice(d, n)
        cov = norm * (smooth(x[:, :, a] * x[:, :, b]) - mean[:, :, a] * mean[:, :, b])
        ssim = ((2 * mean[:, :, a] * mean[:, :, b] + c1) * (2 * cov + c2)
                / ((mean[:, :, a] ** 2 + mean[:, :, b] ** 2 + c1) * (var[:, :, a] + var[:, :, b] + c2)))
        values = ssim[pad:-pad, pad:-pad].mean(axis=(0, 1))
        out[np.arange(n - d), np.arange(d, n)] = values
    return out


def max_far_ssim(hu: np.ndarray, far: int = 30, window: Sequence[float] = DEFAULT_WINDOW) -> float:
    """The largest SSIM between slices more than ``far`` apart (NaN when the volume is too short)."""
    values = far_ssim(hu, far, window)
    return float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")


def lung_fraction(hu: np.ndarray) -> np.ndarray:
    """Per axial slice of an ``(X, Y, Z)`` HU volume: the share of the body (:func:`~ctgridit.ct.fidelity.body_mask`)
    below -500 HU, i.e. lung and airways (0 for a slice without body)."""
    from ctgridit.ct.fidelity import body_mask

    body = body_mask(hu)
    lung = (hu < LUNG_BELOW_HU) & body
    return lung.sum(axis=(0, 1)) / np.maximum(body.sum(axis=(0, 1)), 1)


def lung_regions(hu: np.ndarray, min_share: float = 0.04) -> int:
    """Per axial slice of an ``(X, Y, Z)`` HU volume: the separate regions below -500 HU inside the body that hold
    at least ``min_share`` of the body's area each (lungs; airways and specks are smaller). A mid-chest slice
    shows 2."""
    from scipy import ndimage

    from ctgridit.ct.fidelity import body_mask

    body = body_mask(hu)
    lung = (hu < LUNG_BELOW_HU) & body
    counts = []
    for k in range(hu.shape[2]):
        labels, count = ndimage.label(lung[:, :, k])
        sizes = ndimage.sum_labels(lung[:, :, k], labels, index=np.arange(1, count + 1)) if count else []
        counts.append(int(np.sum(np.asarray(sizes) >= min_share * max(body[:, :, k].sum(), 1))))
    return np.asarray(counts)


@dataclass(frozen=True)
class LungExtent:
    """Where the lungs lie along z (:func:`lung_extent`)."""

    peak: float                 # the largest per-slice lung fraction
    first_fifth: float          # the smallest lung fraction in the first fifth of the slices, over the peak
    last_fifth: float           # the same in the last fifth
    length_mm: float            # from the first to the last slice with at least half the peak

    def checks(self) -> dict[str, bool]:
        """The synthesis issue's rules for a chest: lungs that peak at 0.25 of the body or more, fall below a
        third of the peak in the first and the last fifth of the slices, and stay at half the peak or more over
        100 to 250 mm."""
        return {"lung peak": self.peak >= 0.25, "lung ends": self.first_fifth < 1 / 3 and self.last_fifth < 1 / 3,
                "lung length": 100 <= self.length_mm <= 250}

    def chest_like(self) -> bool:
        """The whole lung field inside the volume, as in a CT-RATE chest scan (:meth:`checks`, all of them)."""
        return all(self.checks().values())


def lung_extent(hu: np.ndarray, slice_spacing: float) -> LungExtent:
    """:class:`LungExtent` of an ``(X, Y, Z)`` HU volume with slices ``slice_spacing`` mm apart."""
    fraction = lung_fraction(hu)
    peak = float(fraction.max())
    if peak <= 0:
        return LungExtent(0.0, 0.0, 0.0, 0.0)
    fifth = max(1, len(fraction) // 5)
    half = np.nonzero(fraction >= peak / 2)[0]
    return LungExtent(peak, float(fraction[:fifth].min() / peak), float(fraction[-fifth:].min() / peak),
                      float((half[-1] - half[0] + 1) * slice_spacing))
