"""Latent codecs: ``encode(x) -> z`` and ``decode(z) -> x`` for images ``x`` in ``[-1, 1]``.

Two implementations (docs/METHOD.md section 5):

- :class:`PixelCodec`, the identity, for small models and tests;
- :class:`VAECodec`, a diffusers ``AutoencoderKL`` (the Stable Diffusion VAE)
  with the scale factor of its config (0.18215 for SD). ``encode`` returns the
  scaled posterior mean, so encoding is deterministic.

Both process large batches in chunks of ``chunk_size`` images to bound memory.
A codec is a diffusers model (``config.json`` and safetensors weights), so a
:class:`~ctgridit.core.pipeline.GriDiTPipeline` registers, moves, saves and
loads it like its DiTs.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

#: Images per encoder/decoder call unless told otherwise.
DEFAULT_CHUNK = 16


class LatentCodec(ModelMixin, ConfigMixin):
    """The interface the pipeline uses; subclasses implement ``_encode``/``_decode``."""

    image_channels: int = 3
    latent_channels: int = 3
    downscale: int = 1              # image pixels per latent pixel along each side

    def __init__(self, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.chunk_size = chunk_size

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        if height % self.downscale or width % self.downscale:
            raise ValueError(f"image size {height}x{width} is not a multiple of the codec's {self.downscale}")
        return height // self.downscale, width // self.downscale

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, image_channels, H, W)`` in [-1, 1] -> ``(N, latent_channels, H/d, W/d)``."""
        return torch.cat([self._encode(part) for part in torch.split(x, self.chunk_size)]) if len(x) else x

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, latent_channels, h, w)`` -> ``(N, image_channels, h*d, w*d)``, roughly in [-1, 1]."""
        return torch.cat([self._decode(part) for part in torch.split(z, self.chunk_size)]) if len(z) else z

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelCodec(LatentCodec):
    """The identity: latents are the images themselves.

    It has no weights; an empty buffer, ``anchor``, carries its device and
    dtype (what a pipeline reports) and gives its folder the weights file that
    diffusers loads.
    """

    @register_to_config
    def __init__(self, channels: int = 3, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(chunk_size)
        self.image_channels = self.latent_channels = channels
        self.register_buffer("anchor", torch.zeros(0))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class VAECodec(LatentCodec):
    """A diffusers ``AutoencoderKL``; latents are ``scaling_factor * posterior mean``.

    Built from the autoencoder's config (``vae_config``, a dict, as in the
    codec's ``config.json``); :meth:`from_vae` wraps a loaded autoencoder and
    :meth:`from_autoencoder` loads one from its own folder.
    """

    @register_to_config
    def __init__(self, vae_config: dict, scaling_factor: float | None = None, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(chunk_size)
        self.vae = AutoencoderKL.from_config(vae_config).eval().requires_grad_(False)
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        self.image_channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_vae(cls, vae: AutoencoderKL, chunk_size: int = DEFAULT_CHUNK,
                 scaling_factor: float | None = None) -> "VAECodec":
        """A codec around the autoencoder ``vae`` (its weights, not a copy)."""
        with torch.device("meta"):               # the autoencoder built from the config is replaced at once
            codec = cls(dict(vae.config), float(vae.config.scaling_factor if scaling_factor is None
                                                else scaling_factor), chunk_size)
        codec.vae = vae.eval().requires_grad_(False)
        return codec

    @classmethod
    def from_autoencoder(cls, name_or_path: str | os.PathLike, subfolder: str | None = None,
                         chunk_size: int = DEFAULT_CHUNK, **kwargs) -> "VAECodec":
        """A codec around the ``AutoencoderKL`` folder ``name_or_path`` (a hub id where a network is available)."""
        return cls.from_vae(AutoencoderKL.from_pretrained(str(name_or_path), subfolder=subfolder, **kwargs),
                            chunk_size)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        posterior = self.vae.encode(x.to(p.device, p.dtype)).latent_dist
        return (posterior.mean * self.scaling_factor).to(x.dtype)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        return self.vae.decode(z.to(p.device, p.dtype) / self.scaling_factor).sample.to(z.dtype)
