"""Image quality against a clean reference: PSNR and SSIM in 3D, over the volume and inside the body.

Both volumes are clipped to the HU window and the data range is the window's
width (docs/METHOD.md section 7). SSIM is scikit-image's, computed on the whole 3D
volume (7-voxel cube windows; a smaller odd window when the volume is thinner);
inside the body it is the mean of the SSIM map over the body mask.
The body mask (:func:`body_mask`) is the largest connected region above
-500 HU in the reference, with its holes (lungs, airways) filled slice by slice.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ctgridit.ct.window import DEFAULT_WINDOW, to_unit

BODY_THRESHOLD_HU = -500.0


def body_mask(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean mask of the patient's body in an ``(X, Y, Z)`` HU volume (module docstring)."""
    above = hu > threshold
    labels, count = ndimage.label(above)
    if count == 0:
        return above
    sizes = ndimage.sum_labels(above, labels, index=np.arange(1, count + 1))
    body = labels == (1 + int(np.argmax(sizes)))
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    return body


def psnr(reference: np.ndarray, image: np.ndarray, window: Sequence[float] = DEFAULT_WINDOW,
         mask: np.ndarray | None = None) -> float:
    """PSNR in dB with data range the window width, over ``mask`` (default all voxels): infinite where the images
    are equal, NaN where the mask holds no voxel."""
    err = (to_unit(reference.astype(np.float64), window) - to_unit(image.astype(np.float64), window)) ** 2
    chosen = err[mask] if mask is not None else err
    if chosen.size == 0:
        return float("nan")
    mse = float(chosen.mean())
    return float("inf") if mse == 0 else -10.0 * np.log10(mse)


def ssim_map(reference: np.ndarray, image: np.ndarray, window: Sequence[float] = DEFAULT_WINDOW) -> np.ndarray:
    """The 3D SSIM map, data range the window width (module docstring)."""
    from skimage.metrics import structural_similarity

    ref = to_unit(reference.astype(np.float64), window)
    img = to_unit(image.astype(np.float64), window)
    win = min(7, *(n if n % 2 else n - 1 for n in ref.shape))
    if win < 3:
        raise ValueError(f"volume {ref.shape} is too thin for SSIM (needs 3 voxels along every axis)")
    return structural_similarity(ref, img, data_range=1.0, win_size=win, full=True)[1]


def quality(reference: np.ndarray, image: np.ndarray, window: Sequence[float] = DEFAULT_WINDOW,
            mask: np.ndarray | None = None) -> dict[str, float]:
    """``{"psnr", "ssim", "psnr_body", "ssim_body"}`` of ``image`` against ``reference``."""
    mask = body_mask(reference) if mask is None else mask
    smap = ssim_map(reference, image, window)
    return {"psnr": psnr(reference, image, window), "ssim": float(smap.mean()),
            "psnr_body": psnr(reference, image, window, mask),
            "ssim_body": float(smap[mask].mean()) if mask.any() else float("nan")}

#: Why a quality figure may not be a number (reports write ``null`` with the reason).
QUALITY_REASONS = {"psnr": "infinite: the image equals the reference", "psnr_body":
                   "none: the reference has no body voxels (or the body equals the reference: infinite)",
                   "ssim_body": "none: the reference has no body voxels"}
