"""Latent codecs: ``encode(x) -> z`` and ``decode(z) -> x`` for images ``x`` in ``[-1, 1]``.

Two implementations (docs/METHOD.md section 5):

- :class:`PixelCodec`, the identity, for small models and tests;
- :class:`VAECodec`, a diffusers ``AutoencoderKL`` (the Stable Diffusion VAE)
  loaded from a local folder or a hub id, with the scale factor of its config
  (0.18215 for SD). ``encode`` returns the scaled posterior mean, so encoding
  is deterministic.

Both process large batches in chunks of ``chunk_size`` images to bound memory.
A codec saves itself into a folder (``codec.json`` plus, for the VAE, the
diffusers weights) and :func:`load_codec` rebuilds it offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CODEC_FILE = "codec.json"
#: Images per encoder/decoder call unless told otherwise.
DEFAULT_CHUNK = 16


class LatentCodec:
    """The interface the pipeline uses; subclasses implement ``_encode``/``_decode``."""

    kind: str = ""
    image_channels: int = 3
    latent_channels: int = 3
    downscale: int = 1              # image pixels per latent pixel along each side

    def __init__(self, chunk_size: int = DEFAULT_CHUNK):
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

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LatentCodec":
        return self

    def config(self) -> dict:
        return {"kind": self.kind, "chunk_size": self.chunk_size}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CODEC_FILE).write_text(json.dumps(self.config(), indent=2))


class PixelCodec(LatentCodec):
    """The identity: latents are the images themselves."""

    kind = "pixel"

    def __init__(self, channels: int = 3, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(chunk_size)
        self.image_channels = self.latent_channels = channels

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def config(self) -> dict:
        return {**super().config(), "channels": self.image_channels}


class VAECodec(LatentCodec):
    """A diffusers ``AutoencoderKL``; latents are ``scaling_factor * posterior mean``."""

    kind = "vae"

    def __init__(self, vae, chunk_size: int = DEFAULT_CHUNK, scaling_factor: float | None = None):
        super().__init__(chunk_size)
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        self.image_channels = cfg.in_channels
        self.latent_channels = cfg.latent_channels
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, subfolder: str | None = None,
                        chunk_size: int = DEFAULT_CHUNK, **kwargs) -> "VAECodec":
        """Load from a local folder (or a hub id where a network is available)."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(name_or_path), subfolder=subfolder, **kwargs)
        return cls(vae, chunk_size)

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        p = self._param()
        posterior = self.vae.encode(x.to(p.device, p.dtype)).latent_dist
        return (posterior.mean * self.scaling_factor).to(x.dtype)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        p = self._param()
        return self.vae.decode(z.to(p.device, p.dtype) / self.scaling_factor).sample.to(z.dtype)

    def to(self, device=None, dtype=None) -> "VAECodec":
        # pass only what is asked: diffusers warns about any dtype keyword, even None
        self.vae.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        return self

    def config(self) -> dict:
        return {**super().config(), "scaling_factor": self.scaling_factor}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        super().save_pretrained(folder)
        self.vae.save_pretrained(str(Path(folder) / "vae"))


def load_codec(folder: str | os.PathLike) -> LatentCodec:
    """Rebuild a codec saved with ``save_pretrained`` (no network access)."""
    folder = Path(folder)
    config = json.loads((folder / CODEC_FILE).read_text())
    kind = config.pop("kind")
    if kind == "pixel":
        return PixelCodec(**config)
    if kind == "vae":
        codec = VAECodec.from_pretrained(folder / "vae", chunk_size=config["chunk_size"], local_files_only=True)
        codec.scaling_factor = float(config["scaling_factor"])
        return codec
    raise ValueError(f"unknown codec kind {kind!r} in {folder / CODEC_FILE}")
