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

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import scipy.fft
import torch

#: Block size (voxels along each of the three axes) and step between blocks: measured on held-out CT
#: (x, y, z with z the slice axis): 8 x 8 x 4 every 2 voxels in-plane and every slice (docs/denoising.md: every
#: slice instead of every second, +0.03 to +0.06 dB on every held-out row measured, for twice the filter's time).
BLOCK = (8, 8, 4)
STEP = (2, 2, 1)
#: The (block, step) pairs :func:`choose_block` picks from, the same number of block offsets each (every voxel is
#: covered by 4 blocks along each axis): 8 x 8 x 4 is best on most held-out CT, 4 x 4 x 4 on scans whose
#: structures are few voxels wide (a 1.5 mm chest).
CANDIDATES = ((BLOCK, STEP), ((4, 4, 4), (1, 1, 1)))
#: Hard-thresholding level of :func:`dct_hard_threshold`, in noise standard deviations (BM3D's 2.7).
HARD_THRESHOLD = 2.7


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
    squared = [_dct_matrix(min(b, n)) ** 2 for b, n in zip(block, noisy.shape)]   # (coefficient, voxel)
    variance = np.float32(sigma) ** 2

    def wiener(blocks: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        coefficients = scipy.fft.dctn(blocks[0], axes=AXES, norm="ortho")
        gain = scipy.fft.dctn(blocks[1], axes=AXES, norm="ortho")
        np.square(gain, out=gain)                                              # in place: the filter is memory-bound
        denominator = gain + variance
        np.maximum(denominator, np.finfo(np.float32).tiny, out=denominator)   # 0/0 where sigma^2 underflows
        np.divide(gain, denominator, out=gain)
        weight = 1.0 / np.maximum(np.einsum("akblcm,akblcm->abc", gain, gain)[:, None, :, None, :, None], 1e-6)
        if diagonal:
            diagonal_values = np.einsum("akblcm,ki,lj,mn->aibjcn", gain, *squared, optimize=True)
        np.multiply(coefficients, gain, out=coefficients)
        values = [scipy.fft.idctn(coefficients, axes=AXES, norm="ortho", overwrite_x=True)]
        if diagonal:
            values.append(diagonal_values)
        return values, weight

    out = _sliding_blocks([noisy, pilot], block, step, wiener, callback, workers)
    return (out[0], out[1]) if diagonal else out[0]


def dct_hard_threshold(noisy: np.ndarray, sigma: float, block: tuple[int, int, int] = BLOCK,
                       step: tuple[int, int, int] = STEP, threshold: float = HARD_THRESHOLD, workers: int = -1
                       ) -> np.ndarray:
    """A first estimate of ``noisy`` (3D, white noise of standard deviation ``sigma``) that needs no pilot: the
    coefficients of each block's orthonormal DCT below ``threshold * sigma`` set to 0 (the block's mean kept),
    overlapping blocks averaged with the weight ``1 / kept coefficients`` (BM3D's first step, without the block
    matching). It keeps texture the network's posterior mean smooths away, and keeps more noise."""
    noisy = np.asarray(noisy, dtype=np.float32)
    if noisy.ndim != 3:
        raise ValueError(f"noisy must be a 3D array, got shape {noisy.shape}")
    if not sigma > 0:
        return noisy.copy()

    def hard(blocks: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        coefficients = scipy.fft.dctn(blocks[0], axes=AXES, norm="ortho")
        keep = np.abs(coefficients) > threshold * sigma
        keep[:, 0, :, 0, :, 0] = True
        weight = 1.0 / np.maximum(keep.sum(axis=AXES, keepdims=True), 1)
        np.multiply(coefficients, keep, out=coefficients)
        return [scipy.fft.idctn(coefficients, axes=AXES, norm="ortho", overwrite_x=True)], weight

    return _sliding_blocks([noisy], block, step, hard, workers=workers)[0]


#: The coefficient axes of the blocked arrays ``(count, block, count, block, count, block)``.
AXES = (1, 3, 5)


def _sliding_blocks(arrays: list[np.ndarray], block, step, estimate, callback=None, workers: int = -1
                    ) -> list[np.ndarray]:
    """The one loop of both filters: ``arrays`` (3D, one shape) padded by replication, cut at every offset of
    ``step`` into blocks (shrunk to an axis where larger), ``estimate(blocks)`` giving values per voxel of each
    block and the block's weight; each value averaged over the blocks covering a voxel with those weights.

    The blocks of one offset tile the array without overlapping, so ``workers`` threads (-1: as many as torch
    uses, ``torch.get_num_threads()``) each take a band of them along the first axis and add into parts of the
    sums no other thread touches: the result is the same for any number of threads, and the element-wise numpy
    steps the filter spends its time in (bound by memory traffic, one core each) run on every core."""
    shape0 = arrays[0].shape
    block = tuple(max(1, min(b, n)) for b, n in zip(block, shape0))
    step = tuple(max(1, min(s, b)) for s, b in zip(step, block))
    pad = [(b, b) for b in block]
    padded = [np.pad(a, pad, mode="edge") for a in arrays]
    offsets = list(np.ndindex(*(b // s for b, s in zip(block, step))))
    threads = max(1, torch.get_num_threads() if workers < 0 else workers)
    totals: list[np.ndarray] = []
    weights = np.zeros_like(padded[0])

    def band(start: list[int], count: list[int], rows: range) -> None:        # block rows `rows` of one offset
        first = start[0] + rows.start * block[0]
        region = (slice(first, first + len(rows) * block[0]),
                  *(slice(a, a + c * b) for a, c, b in zip(start[1:], count[1:], block[1:])))
        shape = (len(rows), block[0], count[1], block[1], count[2], block[2])
        values, weight = estimate([p[region].reshape(shape) for p in padded])
        if not totals:                                            # the first band, run alone, sizes the sums
            totals.extend(np.zeros_like(padded[0]) for _ in values)
        for total, value in zip(totals, values):                 # the values are the estimate's own: scaled in place
            total[region] += np.multiply(value, weight, out=value).reshape(total[region].shape)
        weights[region] += np.broadcast_to(weight, shape).reshape(weights[region].shape)

    with ThreadPoolExecutor(threads) as pool:
        for done, offset in enumerate(offsets, 1):
            start = [o * s for o, s in zip(offset, step)]
            count = [(n - a) // b for n, a, b in zip(padded[0].shape, start, block)]
            edges = np.linspace(0, count[0], min(threads, count[0]) + 1).round().astype(int)
            bands = [range(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
            if not totals:
                band(start, count, bands.pop(0))
            list(pool.map(lambda rows: band(start, count, rows), bands))
            if callback is not None:
                callback(done, len(offsets))
    inner = tuple(slice(b, b + n) for b, n in zip(block, shape0))
    return [(total[inner] / weights[inner]).astype(np.float32) for total in totals]


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II of length ``n`` as a matrix (coefficient, sample)."""
    return scipy.fft.dct(np.eye(n), axis=0, norm="ortho")


#: The central part :func:`choose_block` estimates the error on (voxels along each axis, at most the array's).
CHECK_SIZE = (128, 128, 16)


def central_part(shape: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    """The slices of the central ``size`` part of an array of ``shape`` (each side at most the array's; ``size``
    may name fewer axes than ``shape``, the rest taken whole)."""
    return tuple(slice(max(0, (n - c) // 2), max(0, (n - c) // 2) + c) for n, c in zip(shape, size))


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
    part = central_part(noisy.shape, size)
    y = np.ascontiguousarray(noisy[part], dtype=np.float32)
    fixed = np.ascontiguousarray(pilot[part], dtype=np.float32)
    inner = tuple(slice(1, n - 1) if n > 2 else slice(None) for n in y.shape)
    estimates = []
    for block, step in candidates:
        out, derivative = dct_wiener(y, fixed, sigma, block, step, diagonal=True)
        residual = float(np.mean((out[inner].astype(np.float64) - y[inner]) ** 2))
        estimates.append(residual - sigma**2 + 2 * sigma**2 * float(np.mean(derivative[inner], dtype=np.float64)))
    return int(np.argmin(estimates)), estimates
