"""The grid Diffusion Transformer of both GriDiT stages (docs/METHOD.md sections 2-4).

:class:`GridDiT` is DiT (Peebles & Xie, 2023) with adaLN-Zero blocks
conditioned on the timestep (and optionally the grid's stride, below): no class
embedding and no classifier-free guidance, one forward per sampling step.

- Stage 1 (``cond_channels=0``): unconditional model of ``R x C`` grid latents,
  ``forward(sample, timestep) -> eps`` (the paper's).
- Stage 1, masked-conditional (``cond_channels = in_channels + 1``, our
  correction, docs/METHOD.md section 6): ``cond`` holds the clean latents of the
  known cells (zeros elsewhere) and the cell mask
  (:func:`ctgridit.core.conditioning.masked_condition`), concatenated to the
  noisy latent on channels as in stage 2; one model does unconditional
  generation, extension and interpolation.
- Stage 2 (``cond_channels > 0``): per-frame super-resolution; the latent of the
  upsampled low-resolution frame ``cond`` is concatenated to the noisy latent
  on channels and the patch embedding projects ``in + cond`` channels to the
  hidden size. Use ``grid_rows = grid_cols = 1`` (one frame).

Optional *stride labels* (``num_strides > 0``): the z/time stride ``s`` between
the frames of a grid, in frames of the output sequence, is embedded and added
to the timestep embedding like DiT's class label, so every block's adaLN sees
it. Label 0 means "stride not given" (trained by dropping labels, as DiT drops
class labels), ``1..num_strides`` the stride. The embedding starts at
``N(0, 0.02)`` like DiT's label embedding.

The network predicts what the training scheduler's ``prediction_type`` names
(the noise ``eps``, the paper's, or the clean sample or v; docs/METHOD.md
section 3), with ``in_channels`` output channels: there is no learned variance (DiT's ``learn_sigma=False``), so a
sampler uses a fixed-variance scheduler (DDPM ``variance_type="fixed_small"``,
DDIM, ...).

The positional embedding (``"3d"``: frame, row, column in grid layout, or
``"2d"``: DiT's plain sin-cos over the whole grid, the ablation) is computed
from the config and kept as the non-persistent buffer ``pos_embedding`` (the
name ``pos_embed`` is the config field): it is not a parameter,
not in ``state_dict()`` nor in saved weights, so loading a checkpoint can never
overwrite it (docs/METHOD.md section 8). For a hidden size not divisible by 6
(DiT-L, 1024) each of the three 3D parts gets ``2 * (D // 6)`` dims and the
last ``D % 6`` dims are zero.

Module names follow DiT's ``models.py`` (``x_embedder``, ``t_embedder``,
``blocks.i.attn.qkv``, ``adaLN_modulation``, ``final_layer``), so DiT weights
map onto them by name except for the timestep MLP (DiT's ``t_embedder.mlp.0``
and ``.2`` are diffusers' ``t_embedder.linear_1`` and ``.linear_2`` here). Sizes are named presets in
:data:`DIT_PRESETS`; build one with :func:`create_dit`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ctgridit.core.conditioning import FILLS, PAIR_FIELDS, condition_channels, pair_output
from ctgridit.core.embeddings import grid_2d_pos_embed, grid_3d_pos_embed

POS_EMBEDS = ("3d", "2d")
TIMESTEP_FREQ_DIM = 256   # size of the sinusoidal timestep features fed to the timestep MLP (DiT)
NORM_EPS = 1e-6           # LayerNorm epsilon of DiT
TIMESTEP_INIT_STD = 0.02  # std of the timestep-MLP weights at init (DiT)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` for tokens ``(N, T, D)`` and per-sample ``(N, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches of a latent to tokens, by a strided convolution."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, T, D)`` with ``T = (H/p) * (W/p)`` in row-major patch order."""
        x = self.proj(x)                                          # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)                       # (N, T, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, D)`` -> ``(N, T, D)``."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, heads, D/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)            # 3 x (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)               # (N, heads, T, D/heads)
        x = x.transpose(1, 2).reshape(n, t, d)                    # (N, T, D)
        return self.proj(x)                                       # (N, T, D)


class Mlp(nn.Module):
    """DiT's token MLP: ``Linear -> GELU (tanh approximation) -> Linear``."""

    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, D)`` -> ``(N, T, D)``."""
        x = self.act(self.fc1(x))                                 # (N, T, D*mlp_ratio)
        return self.fc2(x)                                        # (N, T, D)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning on the timestep embedding ``c``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens ``(N, T, D)`` and conditioning ``(N, D)`` -> ``(N, T, D)``."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)              # 6 x (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))   # (N, T, D)
        return x                                                  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map of each token to its ``p x p x C`` patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens ``(N, T, D)`` and conditioning ``(N, D)`` -> ``(N, T, p*p*C)``. The last product runs in the
        weights' own dtype also under autocast, so a bfloat16-autocast run still gives its prediction in float32 (a
        clean-sample prediction rounded to bfloat16 would sit on a 3.9 HU grid near +-1000 HU); it is a small layer."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)            # (N, T, D)
        if x.device.type not in ("cpu", "cuda"):                 # autocast("mps") raises before torch 2.5
            return self.linear(x.to(self.linear.weight.dtype))
        with torch.autocast(x.device.type, enabled=False):
            return self.linear(x.to(self.linear.weight.dtype))    # (N, T, p*p*C)


class GridDiT(ModelMixin, ConfigMixin):
    """DiT over grid latents, unconditional (stage 1) or conditioned on a latent (stage 2).

    Args:
        sample_height, sample_width: the latent size ``H x W`` of a whole grid
            (``R * h`` x ``C * w`` for frames of ``h x w`` latent pixels).
        in_channels: channels of the noisy latent, and of the predicted noise.
        cond_channels: channels of the condition latent; 0 for stage 1.
        patch_size: ``p``; each frame's size must be divisible by it.
        hidden_size, depth, num_heads, mlp_ratio: the transformer (see
            :data:`DIT_PRESETS`).
        grid_rows, grid_cols: the grid shape ``R x C`` (1 x 1 for stage 2).
        pos_embed: ``"3d"`` (GriDiT) or ``"2d"`` (DiT's, the ablation).
        num_strides: the largest stride label the model takes (0: none, the
            paper's model).
        cond_fill: masked-conditional stage 1 only, what the unknown cells of
            the condition it is trained and sampled with hold: ``"zeros"``,
            ``"linear"`` (linear interpolation between the known ones,
            :func:`~ctgridit.core.conditioning.fill_unknown_cells`) or ``"flow"``
            (interpolation along the motion between them, :mod:`ctgridit.core.motion`).
            The caller fills the condition once per grid
            (:func:`~ctgridit.core.conditioning.model_condition`); ``forward``
            takes it as given.
        fill_residual: with a filled condition, the output is the filled
            latents plus the network's output: a model of the clean sample
            then starts from the interpolation and learns only a correction
            (the network's last layer starts at zero). With ``cond_fill``
            ``"flow_pair"`` the network also moves each of the two moved
            known latents and changes their mix
            (:func:`~ctgridit.core.conditioning.pair_output`).

    Raises:
        ValueError: for a grid that does not split into whole frames, frames
            that do not split into whole patches, or inconsistent sizes.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, sample_height: int, sample_width: int, in_channels: int = 4, cond_channels: int = 0,
                 patch_size: int = 2, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, grid_rows: int = 2, grid_cols: int = 2, pos_embed: str = "3d",
                 num_strides: int = 0, cond_fill: str = "zeros", fill_residual: bool = False) -> None:
        super().__init__()
        _check_config(sample_height, sample_width, in_channels, cond_channels, patch_size, hidden_size,
                      num_heads, grid_rows, grid_cols, pos_embed, num_strides, depth, mlp_ratio, cond_fill)
        if fill_residual and cond_fill == "zeros":
            raise ValueError("fill_residual adds the filled condition to the output: it needs cond_fill 'linear' "
                             "or 'flow'")
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(in_channels + cond_channels, hidden_size, patch_size)
        self.time_proj = Timesteps(TIMESTEP_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.t_embedder = TimestepEmbedding(TIMESTEP_FREQ_DIM, hidden_size)
        # row 0: stride not given; row s: stride s
        self.stride_embedder = nn.Embedding(num_strides + 1, hidden_size) if num_strides else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.register_buffer("pos_embedding", self.build_pos_embed(), persistent=False)
        self.initialize_weights()

    @property
    def out_channels(self) -> int:
        """Channels of the network's last layer: ``in_channels``, and for a ``flow_pair`` model with
        ``fill_residual`` the displacements and weight of :func:`~ctgridit.core.conditioning.pair_output` too."""
        cfg = self.config
        return cfg.in_channels + (PAIR_FIELDS if cfg.fill_residual and cfg.cond_fill == "flow_pair" else 0)

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(h, w)``: the latent size of one frame of the grid."""
        return self.config.sample_height // self.config.grid_rows, self.config.sample_width // self.config.grid_cols

    def build_pos_embed(self) -> torch.Tensor:
        """The fixed ``(1, T, D)`` positional embedding of this config (see the module docstring)."""
        cfg, p = self.config, self.config.patch_size
        if cfg.pos_embed == "2d":
            return grid_2d_pos_embed(cfg.hidden_size, cfg.sample_height // p, cfg.sample_width // p)
        h, w = self.frame_size
        return grid_3d_pos_embed(cfg.hidden_size, cfg.grid_rows, cfg.grid_cols, h // p, w // p, pad_remainder=True)

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears and patch embedding, N(0, 0.02) timestep MLP and stride embedding,
        adaLN and output at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=TIMESTEP_INIT_STD)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=TIMESTEP_INIT_STD)
        if self.stride_embedder is not None:
            nn.init.normal_(self.stride_embedder.weight, std=TIMESTEP_INIT_STD)
        for zeroed in [*(block.adaLN_modulation[-1] for block in self.blocks),
                       self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(zeroed.weight)
            nn.init.zeros_(zeroed.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                cond: torch.Tensor | None = None, stride: torch.Tensor | int | None = None) -> torch.Tensor:
        """Predict what the training scheduler's ``prediction_type`` names (the noise, the clean sample or v).

        Args:
            sample: the noisy latent ``(N, in_channels, H, W)``.
            timestep: diffusion steps, ``(N,)`` or a scalar for the whole batch.
            cond: conditional models only, the condition ``(N, cond_channels, H, W)``.
            stride: models with ``num_strides > 0`` only: the grid's stride label,
                ``(N,)`` or a scalar in ``0..num_strides`` (0 or None: not given).

        Returns:
            ``(N, in_channels, H, W)``; with ``fill_residual`` the filled condition plus the network's output.
        """
        cond = self._condition(sample, cond)                      # (N, C_cond, H, W) or None
        x = sample if cond is None else torch.cat([sample, cond], dim=1)   # (N, C_in + C_cond, H, W)
        t = self._timesteps(timestep, sample)                     # (N,)
        x = self.x_embedder(x) + self.pos_embedding.to(x.dtype)   # (N, T, D)
        c = self.t_embedder(self.time_proj(t).to(x.dtype))        # (N, D)
        if self.stride_embedder is not None:
            c = c + self.stride_embedder(self._strides(stride, sample)).to(c.dtype)  # (N, D)
        elif stride is not None:
            raise ValueError("this model takes no stride label (num_strides=0): do not pass stride")
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c)  # (N, T, D)
            else:
                x = block(x, c)                                   # (N, T, D)
        x = self.final_layer(x, c)                                # (N, T, p*p*C_in)
        out = self.unpatchify(x)                                  # (N, C_out, H, W)
        if not self.config.fill_residual:
            return out
        if self.config.cond_fill == "flow_pair":
            return pair_output(cond, out, self.config.grid_rows, self.config.grid_cols)
        return out + cond[:, :-1]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, p*p*C)`` tokens in row-major patch order -> ``(N, C, H, W)``."""
        cfg, p = self.config, self.config.patch_size
        hp, wp = cfg.sample_height // p, cfg.sample_width // p
        x = x.reshape(x.shape[0], hp, wp, p, p, -1)               # (N, H/p, W/p, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)                     # (N, C, H/p, p, W/p, p)
        return x.reshape(x.shape[0], x.shape[1], hp * p, wp * p)  # (N, C, H, W)

    def _condition(self, sample: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor | None:
        """Check the inputs; the condition in the sample's dtype (filled by the caller, as ``cond_fill`` says)."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.sample_height, cfg.sample_width)
        if sample.ndim != 4 or tuple(sample.shape[1:]) != expected:
            raise ValueError(f"sample must be (N, {', '.join(map(str, expected))}), got {tuple(sample.shape)}")
        if cfg.cond_channels == 0:
            if cond is not None:
                raise ValueError("this model is unconditional (cond_channels=0): do not pass cond")
            return None
        expected_cond = (sample.shape[0], cfg.cond_channels, cfg.sample_height, cfg.sample_width)
        if cond is None:
            raise ValueError(f"this model is conditional (cond_channels={cfg.cond_channels}): "
                             f"pass the condition latent cond of shape {expected_cond}")
        if tuple(cond.shape) != expected_cond:
            raise ValueError(f"cond must have shape {expected_cond}, got {tuple(cond.shape)}")
        return cond.to(sample.dtype)

    def _strides(self, stride: torch.Tensor | int | None, sample: torch.Tensor) -> torch.Tensor:
        """``stride`` (None, a scalar or ``(N,)``) as an ``(N,)`` long tensor, checked to lie in ``0..num_strides``."""
        n, top = sample.shape[0], self.config.num_strides
        s = torch.as_tensor(0 if stride is None else stride)
        if s.ndim == 0:
            s = s.expand(n)
        if tuple(s.shape) != (n,):
            raise ValueError(f"stride must be a scalar or of shape ({n},), got {tuple(s.shape)}")
        if s.device.type == "cpu" and bool(((s < 0) | (s > top)).any()):   # (on a GPU the lookup checks it)
            raise ValueError(f"stride labels must lie in 0..{top} (0: not given), got {sorted(set(s.tolist()))}")
        return s.to(device=sample.device, dtype=torch.long)

    @staticmethod
    def _timesteps(timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        """A scalar or ``(N,)`` timestep as an ``(N,)`` tensor on the sample's device."""
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            return t.expand(sample.shape[0])
        if tuple(t.shape) != (sample.shape[0],):
            raise ValueError(f"timestep must be a scalar or of shape ({sample.shape[0]},), got {tuple(t.shape)}")
        return t


def _check_config(sample_height: int, sample_width: int, in_channels: int, cond_channels: int, patch_size: int,
                  hidden_size: int, num_heads: int, grid_rows: int, grid_cols: int, pos_embed: str,
                  num_strides: int = 0, depth: int = 1, mlp_ratio: float = 4.0, cond_fill: str = "zeros") -> None:
    """Raise a ValueError naming the first inconsistency of a :class:`GridDiT` config."""
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
    if min(sample_height, sample_width, in_channels, patch_size, hidden_size, num_heads, grid_rows, grid_cols,
           depth) < 1 or not mlp_ratio > 0:
        raise ValueError("sizes, channels, depth, heads, MLP ratio and grid shape must be positive")
    if cond_channels < 0 or num_strides < 0:
        raise ValueError(f"cond_channels and num_strides must be >= 0, got {cond_channels} and {num_strides}")
    if sample_height % grid_rows or sample_width % grid_cols:
        raise ValueError(f"a {sample_height}x{sample_width} latent does not split into a "
                         f"{grid_rows}x{grid_cols} grid of whole frames")
    frame_h, frame_w = sample_height // grid_rows, sample_width // grid_cols
    if frame_h % patch_size or frame_w % patch_size:
        raise ValueError(f"frames of {frame_h}x{frame_w} latent pixels do not split into "
                         f"{patch_size}x{patch_size} patches")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if cond_fill not in FILLS:
        raise ValueError(f"cond_fill must be one of {FILLS}, got {cond_fill!r}")
    wanted = condition_channels(in_channels, cond_fill)
    if cond_fill != "zeros" and cond_channels != wanted:
        raise ValueError(f"cond_fill {cond_fill!r} is for a masked-conditional model "
                         f"(cond_channels = {wanted} for in_channels {in_channels}), got cond_channels {cond_channels}")


#: DiT sizes of Peebles and Xie (depth, width, heads); each comes with patch 2, 4 and 8.
DIT_SIZES: dict[str, dict[str, int]] = {
    "DiT-XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "DiT-L": dict(depth=24, hidden_size=1024, num_heads=16),
    "DiT-B": dict(depth=12, hidden_size=768, num_heads=12),
    "DiT-S": dict(depth=12, hidden_size=384, num_heads=6),
}
DIT_PRESETS: dict[str, dict[str, int]] = {
    **{f"{name}/{patch}": dict(size, patch_size=patch) for name, size in DIT_SIZES.items() for patch in (2, 4, 8)},
    "DiT-tiny/2": dict(depth=2, hidden_size=48, num_heads=2, patch_size=2),  # for tests and smoke runs
}


def create_dit(preset: str, **config_overrides) -> GridDiT:
    """Build a :class:`GridDiT` of a named size; ``config_overrides`` (at least
    ``sample_height`` and ``sample_width``) complete or override the preset."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}")
    return GridDiT(**{**DIT_PRESETS[preset], **config_overrides})
