"""Empirical Wiener filtering in a sliding 3D DCT, with a denoiser's output as the pilot.

The second step of BM3D/BM4D (Dabov et al., 2007; Maggioni et al., 2013) without
the block matching: a first estimate (the *pilot*, here a GriDiT denoiser's
output) sets, for every coefficient of every block of a sliding orthonormal
DCT, the Wiener gain ``P^2 / (P^2 + sigma^2)`` that is then applied to the
*noisy* input's coefficient. Orthonormal, the DCT keeps white noise of standard
deviation ``sigma`` at ``sigma`` on every coefficient, so a pilot equal to the
clean signal gives the oracle Wiener filter of each block. The blocks overlap
(every ``step`` voxels) and their estimates are averaged with the weight
``1 / sum(gain^2)`` (BM3D's: blocks that keep less noise count more).

Why: a network's posterior mean removes noise well but loses or invents some
fine texture; re-weighting the input's own coefficients keeps what the input
shows wherever the pilot says there is signal. On held-out CT scans it adds
0.04 to 1.5 dB to the bundled denoiser (``pipelines/eval_denoise.py``).

The gain also shrinks each block's mean, towards zero: give values whose zero
means "no signal" (CT: HU + 1000, proportional to attenuation), or the result is
biased towards whatever zero is. Generic: any 3D numpy array (a CT volume, a
stack of video frames).

Which block size suits a scan depends on how fine its structures are in
voxels; :func:`choose_block` picks it per array by Stein's unbiased risk
estimate (:mod:`ctgridit.core.sure`) of the filter's error on a central part,
with the pilot held fixed (the filter is then linear in the input; the
estimate leaves out the pilot's own dependence on the noise, so its level is
low, but it ranked the two block sizes as the truth did on 17 of 18 held-out
CT rows, and the 18th differed by 0.02 dB).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import scipy.fft

#: Block size (voxels along each of the three axes) and step between blocks: measured on held-out CT
#: (x, y, z with z the slice axis): 8 x 8 x 4 every 2 voxels (docs/denoising.md).
BLOCK = (8, 8, 4)
STEP = (2, 2, 2)
#: The (block, step) pairs :func:`choose_block` picks from, the same number of block offsets each: 8 x 8 x 4 is
#: best on most held-out CT, 4 x 4 x 4 on scans whose structures are few voxels wide (a 1.5 mm chest).
CANDIDATES = ((BLOCK, STEP), ((4, 4, 4), (1, 1, 2)))


def dct_wiener(noisy: np.ndarray, pilot: np.ndarray, sigma: float, block: tuple[int, int, int] = BLOCK,
               step: tuple[int, int, int] = STEP, workers: int = -1,
               callback: Callable[[int, int], None] | None = None, diagonal: bool = False):
    """The empirical Wiener estimate of ``noisy`` (3D, white noise of standard deviation ``sigma`` in its
    units) with ``pilot`` (same shape) as the estimate of the signal; float32, ``noisy``'s shape.

    Blocks larger than an axis shrink to it; the array is padded by replication so that every voxel is
    covered by the same number of blocks. ``sigma <= 0`` returns ``noisy`` unchanged. ``callback(done, total)``
    is called after each of the ``total`` block offsets. ``diagonal``: also return, for every voxel, the
    derivative of its output by its own input with the pilot held fixed (the filter is then linear: the diagonal
    of its matrix, ``sum_k gain_k basis_k(voxel)^2`` aggregated as the estimates are), exact except on the
    outermost voxel layer, whose padded copies add to it.
    """
    noisy = np.asarray(noisy, dtype=np.float32)
    pilot = np.asarray(pilot, dtype=np.float32)
    if noisy.ndim != 3 or noisy.shape != pilot.shape:
        raise ValueError(f"noisy and pilot must be 3D arrays of one shape, got {noisy.shape} and {pilot.shape}")
    if not sigma > 0:
        return (noisy.copy(), np.ones_like(noisy)) if diagonal else noisy.copy()
    block = tuple(max(1, min(b, n)) for b, n in zip(block, noisy.shape))
    step = tuple(max(1, min(s, b)) for s, b in zip(step, block))
    pad = [(b, b) for b in block]
    y, p = np.pad(noisy, pad, mode="edge"), np.pad(pilot, pad, mode="edge")
    total = np.zeros_like(y)
    weights = np.zeros_like(y)
    derivative = np.zeros_like(y) if diagonal else None
    squared = [_dct_matrix(b) ** 2 for b in block]                          # (coefficient, voxel)
    variance = np.float32(sigma) ** 2
    axes = (1, 3, 5)
    offsets = list(np.ndindex(*(b // s for b, s in zip(block, step))))
    for done, offset in enumerate(offsets, 1):
        start = [o * s for o, s in zip(offset, step)]
        count = [(n - a) // b for n, a, b in zip(y.shape, start, block)]
        region = tuple(slice(a, a + c * b) for a, c, b in zip(start, count, block))
        shape = (count[0], block[0], count[1], block[1], count[2], block[2])
        coefficients = scipy.fft.dctn(y[region].reshape(shape), axes=axes, norm="ortho", workers=workers)
        signal = scipy.fft.dctn(p[region].reshape(shape), axes=axes, norm="ortho", workers=workers) ** 2
        gain = signal / np.maximum(signal + variance, np.finfo(np.float32).tiny)   # 0/0 where sigma^2 underflows
        weight = 1.0 / np.maximum((gain**2).sum(axis=axes, keepdims=True), 1e-6)
        estimate = scipy.fft.idctn(gain * coefficients, axes=axes, norm="ortho", workers=workers) * weight
        total[region] += estimate.reshape(total[region].shape)
        weights[region] += np.broadcast_to(weight, shape).reshape(total[region].shape)
        if diagonal:
            own = np.einsum("akblcm,ki,lj,mn->aibjcn", gain, *squared, optimize=True) * weight
            derivative[region] += own.reshape(total[region].shape)
        if callback is not None:
            callback(done, len(offsets))
    inner = tuple(slice(b, b + n) for b, n in zip(block, noisy.shape))
    out = (total[inner] / weights[inner]).astype(np.float32)
    return (out, (derivative[inner] / weights[inner]).astype(np.float32)) if diagonal else out


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II of length ``n`` as a matrix (coefficient, sample)."""
    return scipy.fft.dct(np.eye(n), axis=0, norm="ortho")


#: The central part :func:`choose_block` estimates the error on (voxels along each axis, at most the array's).
CHECK_SIZE = (128, 128, 16)


def choose_block(noisy: np.ndarray, pilot: np.ndarray, sigma: float,
                 candidates=CANDIDATES, size: tuple[int, int, int] = CHECK_SIZE) -> tuple[int, list[float]]:
    """The index in ``candidates`` (``(block, step)`` pairs) of the Wiener filter with the lowest SURE on the
    central ``size`` part of ``noisy`` (module docstring), and every candidate's estimated mean squared error.

    The divergence is the exact diagonal of the filter with the pilot fixed (:func:`dct_wiener`); the estimate
    leaves out the part's outermost voxel layer, where that diagonal is not exact (along an axis of 2 voxels or
    fewer it keeps them, slightly biased).
    """
    if not sigma > 0:
        return 0, [0.0] * len(candidates)
    part = tuple(slice(max(0, (n - c) // 2), max(0, (n - c) // 2) + c) for n, c in zip(noisy.shape, size))
    y = np.ascontiguousarray(noisy[part], dtype=np.float32)
    fixed = np.ascontiguousarray(pilot[part], dtype=np.float32)
    inner = tuple(slice(1, n - 1) if n > 2 else slice(None) for n in y.shape)
    estimates = []
    for block, step in candidates:
        out, derivative = dct_wiener(y, fixed, sigma, block, step, diagonal=True)
        residual = float(np.mean((out[inner].astype(np.float64) - y[inner]) ** 2))
        estimates.append(residual - sigma**2 + 2 * sigma**2 * float(np.mean(derivative[inner], dtype=np.float64)))
    return int(np.argmin(estimates)), estimates
