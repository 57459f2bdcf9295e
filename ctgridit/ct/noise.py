"""Noise for denoising experiments (``ctgridit add-noise``).

- ``gaussian``: white Gaussian noise of standard deviation ``sigma`` HU on every voxel.
- ``lowdose``: a projection-free low-dose approximation. Each voxel is treated
  as if a ray crossed ``path_mm`` of its material: its line integral is
  ``p = mu * path_mm`` with ``mu = MU_WATER * (1 + HU / 1000)`` (clipped at 0),
  the detected photon count is Poisson with mean ``I0 * exp(-p)``, and the
  voxel gets back the HU of ``-log(count / I0)``. ``I0`` is chosen so that
  water gets a noise of ``sigma`` HU; denser tissue (bone) gets more noise and
  air and lung less, as in a real low-dose scan. It is not a simulation of a
  scanner: there is no projection and back-projection, so the noise is white
  (uncorrelated between voxels) and there are no streaks.

Noise is added in float HU; the result keeps the input's geometry.
"""

from __future__ import annotations

import math

import numpy as np

from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItError
from ctgridit.seeds import check_seed

NOISE_MODELS = ("gaussian", "lowdose")
#: Linear attenuation of water at about 70 keV (1/mm).
MU_WATER = 0.0193
#: Path length of the low-dose approximation (mm).
PATH_MM = 20.0


#: The noise a user can ask for (HU): beyond these the result is no CT (or, for lowdose, no count).
SIGMA_MAX_HU = 5000.0
LOWDOSE_SIGMA_MIN_HU = 0.5


def check_noise(sigma: float, model: str = "gaussian") -> None:
    """Refuse an unknown noise model or a ``sigma`` that is not a sensible number of HU."""
    if model not in NOISE_MODELS:
        raise CTGridItError(f"unknown noise model {model!r}", hint=f"use one of {', '.join(NOISE_MODELS)}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and 0 < sigma <= SIGMA_MAX_HU):
        raise CTGridItError(f"--sigma must be a number of HU in (0, {SIGMA_MAX_HU:g}], got {sigma}",
                            hint="e.g. --sigma 50")
    if model == "lowdose" and sigma < LOWDOSE_SIGMA_MIN_HU:
        raise CTGridItError(f"lowdose noise below {LOWDOSE_SIGMA_MIN_HU:g} HU needs more photons than the "
                            f"simulation can count (got {sigma:g})", hint="use --model gaussian for so little noise")


def add_noise(volume: CTVolume, sigma: float, model: str = "gaussian", seed: int = 0,
              path_mm: float = PATH_MM) -> CTVolume:
    """``volume`` with noise of ``sigma`` HU (in water, for ``lowdose``): see the module docstring."""
    check_noise(sigma, model)
    rng = np.random.default_rng(check_seed(seed))
    hu = volume.array.astype(np.float64)
    if model == "gaussian":
        noisy = hu + rng.normal(0.0, sigma, hu.shape)
    else:
        p = np.clip(MU_WATER * (1.0 + hu / 1000.0), 0.0, None) * path_mm
        p_water = MU_WATER * path_mm
        i0 = np.exp(p_water) * (1000.0 / (p_water * sigma)) ** 2     # Var(-log N) ~ exp(p) / I0
        counts = np.maximum(rng.poisson(i0 * np.exp(-p)), 1)
        noisy = (-np.log(counts / i0) / p_water - 1.0) * 1000.0
    note = f"{model} noise, sigma {sigma:g} HU, seed {seed}"
    return CTVolume(noisy.astype(np.float32), volume.affine.copy(), source=volume.source,
                    source_dtype=volume.source_dtype, series_uid=volume.series_uid, notes=[*volume.notes, note])
