"""The stage-2 degradation: a high-resolution frame -> the low-quality frame that conditions the SR model.

docs/METHOD.md section 4 (the paper's Listing 1, ``process_image_resize_noise_blur``)
turns a real HR frame into a surrogate of an upsampled stage-1 frame:

1. bicubic down by ``r`` then bicubic up by ``r`` back to ``H x W``, with
   :func:`ctgridit.core.grid.resize_frames` and the stage-1 cell size
   ``ceil(H / r) x ceil(W / r)`` (:meth:`GridSpec.frame_size`), so the
   condition loses exactly what a grid cell loses;
2. additive Gaussian noise, ``sigma ~ U[noise_sigma]`` on the 0..255 scale,
   i.e. ``sigma / 255 * (hi - lo)`` in ``value_range`` units (``2 * sigma / 255``
   for ``[-1, 1]``), independent per pixel and channel;
3. with probability ``blur_prob``, a Gaussian blur of kernel size ``k`` drawn
   uniformly from ``blur_kernels``.

Order: resize, noise, blur, as the name of the paper's function says
(docs/METHOD.md lists the same order). Blurring after the noise also smooths the
noise, so the blurred conditions are softer overall, like stage-1 output.

The blur follows OpenCV's ``cv2.GaussianBlur(img, (k, k), 0)``: with sigma 0
OpenCV derives ``sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8`` from the kernel
size (0.8 for ``k = 3``, 1.7 for 9, 2.6 for 15). It is a separable
convolution with a normalised 1D kernel (the sampled Gaussian, as OpenCV
computes it for ``k > 7``) and reflect padding without repeating the edge
(``dcb|abcd|cba``, OpenCV's default ``BORDER_REFLECT_101``), so frames must be
larger than ``k // 2`` pixels.

The output is clamped to ``value_range``. All randomness comes from the
``torch.Generator`` passed to the call, never from global state, so a
degradation is a pure function of the frame and the generator state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ctgridit.core.grid import GridSpec, resize_frames

#: Noise standard deviation range on the 0..255 scale (docs/METHOD.md section 4).
NOISE_SIGMA = (10.0, 15.0)
#: Probability of a blur and its kernel sizes (docs/METHOD.md section 4).
BLUR_PROB = 0.5
BLUR_KERNELS = (9, 11, 13, 15)
#: The pixel scale on which ``noise_sigma`` is given.
PIXEL_MAX = 255.0


def opencv_sigma(kernel_size: int) -> float:
    """OpenCV's Gaussian sigma for a kernel of ``kernel_size`` when sigma is 0 (module docstring)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    """A normalised 1D Gaussian ``(k,)`` centred on the middle tap."""
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(frame: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur a ``(C, H, W)`` frame with a ``k x k`` Gaussian of OpenCV's sigma, separable, reflect padding."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {kernel_size}")
    pad = kernel_size // 2
    if pad >= min(frame.shape[-2:]):
        raise ValueError(f"a {kernel_size}-tap blur needs frames larger than {pad} pixels, "
                         f"got {tuple(frame.shape[-2:])}")
    ch = frame.shape[0]
    kernel = gaussian_kernel1d(kernel_size, opencv_sigma(kernel_size)).to(frame)
    x = frame[None]                                                             # (1, C, H, W)
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect")                              # (1, C, H, W + 2p)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(ch, 1, 1, -1), groups=ch)   # (1, C, H, W)
    x = F.pad(x, (0, 0, pad, pad), mode="reflect")                              # (1, C, H + 2p, W)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(ch, 1, -1, 1), groups=ch)   # (1, C, H, W)
    return x[0]


class Degrade:
    """The stage-2 degradation of one frame (see the module docstring).

    Args:
        factor: the in-plane factor ``r`` of stage 1 (1: no resize).
        noise_sigma: ``(low, high)`` noise std on the 0..255 scale; ``(0, 0)`` for no noise.
        blur_prob: probability of blurring.
        blur_kernels: odd kernel sizes, one drawn uniformly when blurring.
        value_range: the range of the frames; the noise scale and the clamp use it.

    ``degrade(frame, generator) -> (degraded, info)``: ``frame`` is ``(C, H, W)``
    in ``value_range``; ``degraded`` has the same shape and dtype; ``info`` holds
    ``sigma`` (the noise std drawn, 0..255 scale) and ``blur_kernel`` (the
    kernel size, or ``None`` when not blurred). The generator draws, in order,
    the sigma, the blur decision, the kernel (always drawn, so the stream does
    not depend on the decision) and the noise.
    """

    def __init__(self, factor: int, noise_sigma: Sequence[float] = NOISE_SIGMA, blur_prob: float = BLUR_PROB,
                 blur_kernels: Sequence[int] = BLUR_KERNELS, value_range: Sequence[float] = (-1.0, 1.0)) -> None:
        self.spec = GridSpec(factor=factor)  # validates factor; gives the stage-1 cell size
        low, high = (float(v) for v in noise_sigma)
        if not 0 <= low <= high:
            raise ValueError(f"noise_sigma must be (low, high) with 0 <= low <= high, got {noise_sigma}")
        if not 0 <= blur_prob <= 1:
            raise ValueError(f"blur_prob must lie in [0, 1], got {blur_prob}")
        if not blur_kernels or any(int(k) != k or k < 1 or k % 2 == 0 for k in blur_kernels):
            raise ValueError(f"blur_kernels must be positive odd integers, got {blur_kernels}")
        if not value_range[0] < value_range[1]:
            raise ValueError(f"value_range must be an increasing pair, got {value_range}")
        self.noise_sigma = (low, high)
        self.blur_prob = float(blur_prob)
        self.blur_kernels = tuple(int(k) for k in blur_kernels)
        self.value_range = (float(value_range[0]), float(value_range[1]))

    @property
    def factor(self) -> int:
        return self.spec.factor

    def __call__(self, frame: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        if frame.ndim != 3 or not frame.is_floating_point():
            raise ValueError(f"expected a float frame (C, H, W), got {frame.dtype} {tuple(frame.shape)}")
        low, high = self.noise_sigma
        sigma = low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()
        blur = torch.rand((), generator=generator, dtype=torch.float64).item() < self.blur_prob
        kernel = self.blur_kernels[int(torch.randint(len(self.blur_kernels), (), generator=generator))]
        noise = torch.randn(frame.shape, generator=generator, dtype=frame.dtype)

        height, width = frame.shape[-2:]
        small = resize_frames(frame[None], self.spec.frame_size(height, width))   # (1, C, h, w)
        x = resize_frames(small, (height, width))[0]                               # (C, H, W)
        lo, hi = self.value_range
        x = x + noise.to(x.device) * (sigma / PIXEL_MAX * (hi - lo))
        if blur:
            x = gaussian_blur(x, kernel)
        return x.clamp(lo, hi), {"sigma": sigma, "blur_kernel": kernel if blur else None}
