"""Fixed sin-cos positional embeddings for the grid DiT (docs/METHOD.md section 2).

All embeddings here are pure functions of the configuration: the model computes
them once and keeps them as a non-persistent buffer, never as a trained or saved
parameter, so that loading a checkpoint cannot overwrite them.

Conventions:

- ``sincos(d, p) = [sin(p * w_0), ..., sin(p * w_{d/2-1}), cos(p * w_0), ..., cos(p * w_{d/2-1})]``
  with ``w_k = 10000^(-2k/d)`` (diffusers' ``get_1d_sincos_pos_embed_from_grid``,
  the function of DiT and MAE).
- Patches are numbered row-major over the *grid* latent: token ``t`` is the
  patch at grid-patch row ``t // W_patches`` and column ``t % W_patches``, the
  order of ``Conv2d -> flatten(2) -> transpose`` in the DiT patch embedding.
- Results are ``(1, T, D)`` float32 tensors.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``(M, dim)`` float32 sin-cos embedding of ``M`` (possibly fractional) positions.

    Computed in float64 and rounded once to float32. ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"a sin-cos embedding needs an even size, got {dim}")
    pos = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
    return get_1d_sincos_pos_embed_from_grid(dim, pos, dtype=torch.float64).float()


def grid_3d_pos_embed(hidden: int, rows: int, cols: int, hp: int, wp: int, *,
                      pad_remainder: bool = False) -> torch.Tensor:
    """The GriDiT 3D (frame, row, column) embedding of a ``rows x cols`` grid latent.

    The grid latent has ``rows * hp`` x ``cols * wp`` patches (``hp x wp`` per
    frame). The patch at grid-patch row ``py`` and column ``px`` lies in frame
    ``f = (py // hp) * cols + (px // wp)`` (row-major cells, as
    :mod:`ctgridit.core.grid`) at in-frame position ``y = py % hp``,
    ``x = px % wp``; its embedding is
    ``concat(sincos(D/3, f), sincos(D/3, y), sincos(D/3, x))``.

    Args:
        hidden: the embedding size ``D``; must be divisible by 6 (three even parts).
        rows, cols: the grid shape ``R x C``.
        hp, wp: patches per frame, vertically and horizontally.
        pad_remainder: for a ``D`` not divisible by 6 (DiT-L's 1024), give each
            part ``2 * (D // 6)`` dims and leave the last ``D % 6`` dims zero,
            instead of raising.

    Returns:
        ``(1, rows*hp*cols*wp, D)`` float32, row-major patch order.
    """
    if hidden % 6 and not pad_remainder:
        raise ValueError(f"the 3D positional embedding needs a hidden size divisible by 6, got {hidden} "
                         "(or pass pad_remainder=True to zero the remaining dims)")
    part = 2 * (hidden // 6)
    if part == 0:
        raise ValueError(f"hidden size {hidden} is too small for a 3D positional embedding (needs >= 6)")
    py, px = torch.meshgrid(torch.arange(rows * hp), torch.arange(cols * wp), indexing="ij")
    py, px = py.reshape(-1), px.reshape(-1)                        # (T,), row-major patches
    frame = (py // hp) * cols + px // wp                           # (T,)
    emb = torch.cat([sincos_1d(part, frame), sincos_1d(part, py % hp), sincos_1d(part, px % wp),
                     torch.zeros(py.numel(), hidden - 3 * part)], dim=1)  # (T, D)
    return emb.unsqueeze(0)                                        # (1, T, D)


def grid_2d_pos_embed(hidden: int, h_patches: int, w_patches: int) -> torch.Tensor:
    """DiT's plain 2D sin-cos embedding over the whole grid latent (the ablation ``pos_embed="2d"``).

    As in DiT (and MAE), the embedding of the patch at row ``y``, column ``x``
    is ``concat(sincos(D/2, x), sincos(D/2, y))``; frames are not told apart.

    Returns:
        ``(1, h_patches*w_patches, D)`` float32, row-major patch order; ``D``
        must be divisible by 4.
    """
    if hidden % 4:
        raise ValueError(f"the 2D positional embedding needs a hidden size divisible by 4, got {hidden}")
    y, x = torch.meshgrid(torch.arange(h_patches), torch.arange(w_patches), indexing="ij")
    emb = torch.cat([sincos_1d(hidden // 2, x), sincos_1d(hidden // 2, y)], dim=1)  # (T, D)
    return emb.unsqueeze(0)                                        # (1, T, D)
