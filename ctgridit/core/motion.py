"""Motion between frames: batched TV-L1 optical flow and motion-compensated interpolation, in torch.

Linear interpolation between two frames blends them where they are: a structure
that moves between the frames (a vessel running obliquely through CT slices, an
object in a video) appears twice, faded, instead of once, half-way. Interpolating
along the motion removes that ghost; the grid model's ``fill: flow``
(:func:`~ctgridit.core.conditioning.fill_unknown_cells`) gives it this estimate
of every unknown cell and learns the correction (docs/METHOD.md section 7b).

The flow is TV-L1 (Zach, Pock and Bischof, 2007, with Wedel et al.'s
iterative warping, as scikit-image's ``optical_flow_tvl1``): a flow ``f`` with
``moving(x + f(x)) = reference(x)`` that minimises ``λ |moving(x + f) -
reference| + |∇f|`` (total variation), coarse to fine over an image pyramid.
It is written here in torch because it runs inside the model, on every grid of
every training batch and every sampling step, batched on the model's device
(scikit-image works on one NumPy pair at a time on the CPU, 2 orders of
magnitude slower for a batch of tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TVL1:
    """TV-L1 settings: ``attachment`` (λ, data term weight) and ``tightness`` (θ, coupling) as scikit-image's;
    ``warps`` per pyramid level, ``iterations`` per warp, levels from ``finest`` (1: the frames' own size, 2: half
    of it, the flow then upsampled) down to ``min_size`` pixels. The defaults are 25 times cheaper than
    scikit-image's (5 warps, 10 iterations, from full size) and as good on CT: on 64 x 64 tiles of the held-out
    1.5 mm chest crops, motion-compensated interpolation of the two slices between every third is +0.83 and
    +0.96 dB over linear (scikit-image's settings +0.81 and +0.89), 5 ms a tile on 2 CPU cores
    (``tests/test_motion.py`` checks that it finds known shifts)."""

    attachment: float = 15.0
    tightness: float = 0.3
    warps: int = 1
    iterations: int = 5
    min_size: int = 16
    finest: int = 2

    def flow(self, reference: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``(B, 2, H, W)`` flow (x, y displacements in pixels) of ``moving`` onto ``reference`` (both ``(B, H, W)``):
        ``warp(moving, flow) ≈ reference``."""
        if reference.shape != moving.shape or reference.ndim != 3:
            raise ValueError(f"reference and moving must be (B, H, W) of one shape, got {tuple(reference.shape)} "
                             f"and {tuple(moving.shape)}")
        pyramid = [(reference.float(), moving.float())]
        while min(pyramid[-1][0].shape[-2:]) // 2 >= self.min_size:
            pyramid.append(tuple(F.avg_pool2d(im[:, None], 2)[:, 0] for im in pyramid[-1]))
        flow = torch.zeros(reference.shape[0], 2, *pyramid[-1][0].shape[-2:], device=reference.device)
        for ref, mov in reversed(pyramid[min(self.finest, len(pyramid)) - 1:]):       # small frames: own size
            flow = self._refine(ref, mov, _resized(flow, ref.shape[-2:]))
        return _resized(flow, reference.shape[-2:]).to(reference.dtype)

    def both_ways(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """``(B, 4, H, W)``: the flow of ``second`` onto ``first`` (:meth:`flow`) and, after it, the flow of
        ``first`` onto ``second``, estimated in one batch: the motion :func:`moved` moves each frame along from both
        of its ends. On the held-out 1.5 mm chest crops the fill made so is 0.09 to 0.16 dB closer to the real
        slices than with the first flow alone (``pipelines/probe_interpolation.py oracle``)."""
        flows = self.flow(torch.cat([first, second]), torch.cat([second, first]))
        return torch.cat(flows.chunk(2), dim=1)

    def _refine(self, ref: torch.Tensor, mov: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """One pyramid level: warps of the linearised data term, each with TV steps (Chambolle's dual projection)."""
        step = 0.25                                                              # dual step τ (2D)
        lam_theta, tau_theta = self.attachment * self.tightness, step / self.tightness
        dual = torch.zeros(flow.shape[0], 2, 2, *flow.shape[-2:], device=flow.device)   # (B, flow comp, grad axis)
        for _ in range(self.warps):
            warped = warp(mov[:, None], flow)[:, 0]
            gy, gx = torch.gradient(warped, dim=(-2, -1))
            grad = torch.stack([gx, gy], dim=1)                                  # (B, 2, H, W)
            norm2 = (grad * grad).sum(1, keepdim=True).clamp(min=1e-12)
            rho0 = (warped - ref)[:, None] - (grad * flow).sum(1, keepdim=True)
            for _ in range(self.iterations):
                rho = rho0 + (grad * flow).sum(1, keepdim=True)
                shift = torch.where(rho.abs() < lam_theta * norm2, -rho / norm2, -lam_theta * torch.sign(rho))
                target = flow + shift * grad                                     # the data term's minimiser
                flow = target + self.tightness * _divergence(dual)
                for _ in range(2):                                               # TV: u = v + θ div p
                    g = _forward_gradient(flow)                                  # (B, 2, 2, H, W)
                    dual = (dual + tau_theta * g) / (1 + tau_theta * g.norm(dim=2, keepdim=True))
                    flow = target + self.tightness * _divergence(dual)
        return flow


def _resized(flow: torch.Tensor, size) -> torch.Tensor:
    """``flow`` ``(B, 2, h, w)`` resampled to ``size`` (bilinear), its displacements scaled to the new pixels."""
    if tuple(flow.shape[-2:]) == tuple(size):
        return flow
    scale = torch.tensor([size[-1] / flow.shape[-1], size[-2] / flow.shape[-2]], device=flow.device)
    return F.interpolate(flow, size=tuple(size), mode="bilinear", align_corners=False) * scale.view(1, 2, 1, 1)


def _forward_gradient(u: torch.Tensor) -> torch.Tensor:
    """``(B, K, H, W)`` -> ``(B, K, 2, H, W)``: forward differences along x and y (0 at the last column/row)."""
    gx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1))
    gy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return torch.stack([gx, gy], dim=2)


def _divergence(p: torch.Tensor) -> torch.Tensor:
    """``(B, K, 2, H, W)`` -> ``(B, K, H, W)``: the negative adjoint of :func:`_forward_gradient`."""
    px, py = p[:, :, 0], p[:, :, 1]
    dx = torch.cat([px[..., :, :1], px[..., :, 1:-1] - px[..., :, :-2], -px[..., :, -2:-1]], dim=-1)
    dy = torch.cat([py[..., :1, :], py[..., 1:-1, :] - py[..., :-2, :], -py[..., -2:-1, :]], dim=-2)
    return dx + dy


def warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``images`` ``(B, C, H, W)`` sampled at ``x + flow(x)`` (bilinear; edges repeated)."""
    b, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=flow.dtype),
                            torch.arange(w, device=images.device, dtype=flow.dtype), indexing="ij")
    x = (xs + flow[:, 0]) * (2 / max(w - 1, 1)) - 1
    y = (ys + flow[:, 1]) * (2 / max(h - 1, 1)) - 1
    return F.grid_sample(images, torch.stack([x, y], dim=-1).to(images.dtype), mode="bilinear",
                         padding_mode="border", align_corners=True)


def moved(before: torch.Tensor, after: torch.Tensor, weight: torch.Tensor,
          flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``before`` and ``after`` (``(B, C, H, W)``) each moved to fraction ``weight`` (``(B,)``; 0: ``before``, 1:
    ``after``) of the way between them along their motion ``flow`` (``after(x + flow) = before(x)``,
    :meth:`TVL1.flow`): ``before`` moved by ``weight · flow``, ``after`` moved back by ``(1 - weight) · flow``.
    A ``flow`` of 4 channels (:meth:`TVL1.both_ways`) also holds the motion the other way (``before(x + back) =
    after(x)``), each frame then the mean of it moved along the one and along the other."""
    w = weight.to(flow.dtype).view(-1, 1, 1, 1)
    forward, back = flow[:, :2], flow[:, 2:]
    first, last = warp(before, -w * forward), warp(after, (1 - w) * forward)
    if back.shape[1]:
        first = 0.5 * (first + warp(before, w * back))
        last = 0.5 * (last + warp(after, -(1 - w) * back))
    return first.to(before.dtype), last.to(after.dtype)


def between(before: torch.Tensor, after: torch.Tensor, weight: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Frames at fraction ``weight`` of the way from ``before`` to ``after`` along their motion ``flow``: the two
    :func:`moved` frames mixed by distance."""
    w = weight.to(flow.dtype).view(-1, 1, 1, 1)
    first, last = moved(before, after, weight, flow)
    return ((1 - w) * first + w * last).to(before.dtype)
