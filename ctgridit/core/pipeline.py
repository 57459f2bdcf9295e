"""A trained GriDiT model as one folder, and sequence generation with it.

Folder layout (all loadable offline)::

    model/
      gridit.json        grid spec, frame size, sampling defaults, adapter metadata
      stage1/            GridDiT (config.json + safetensors): the grid model
      stage2/            GridDiT with a condition input: per-frame super-resolution (optional)
      codec/             latent codec (codec.json, plus vae/ for the SD VAE)
      scheduler/         the DDPM training scheduler config

:meth:`GriDiTPipeline.generate` runs GRIDIT.md section 6 end to end: the grid
autoregressive sampler in latent space, decoding of the low-resolution frames,
and stage 2 on every frame (bicubic upsampling by ``r``, encoding as the
condition, conditional sampling), in batches.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from ctgridit.core.codecs import LatentCodec, load_codec
from ctgridit.core.diffusion import SequenceNoise, make_sample_scheduler, strength_timesteps
from ctgridit.core.dit import GridDiT
from ctgridit.core.grid import GridSpec, resize_frames
from ctgridit.core.sampler import ProgressCallback, inpaint, phase_callback, sample_sequence
from ctgridit.errors import CTGridItError
from ctgridit.files import atomic_folder

CONFIG_FILE = "gridit.json"


@dataclass
class SamplingConfig:
    """Defaults for :meth:`GriDiTPipeline.generate`; each can be overridden per call."""

    sampler: str = "ddim"
    num_steps: int = 50
    stage2_steps: int = 25
    control_rows: int | None = None       # m; None: rows - 1
    interpolate: bool = True
    chunk: int | None = None              # k; None: cols for >= 3 rows, else 1
    max_batch: int = 16                   # grids per model call in step 2
    stage2_batch: int = 16                # frames per stage-2 call
    # Stage 2 from the upsampled condition diffused to the last ``stage2_strength`` of the schedule (SDEdit)
    # instead of pure noise (1.0, the paper): it then adds detail to the stage-1 frame instead of redrawing it.
    stage2_strength: float = 1.0
    # One noise draw shared by all frames of a sequence in stage 2 (each sequence its own): the detail stage 2
    # adds is then the same from slice to slice instead of flickering. False: independent noise per frame.
    stage2_shared_noise: bool = False
    # Without shared noise: > 0 gives stage 2 noise that changes smoothly along a sequence (SequenceNoise, a
    # Gaussian moving average over about this many frames; stage 2 then runs as DDIM at eta 1, i.e. DDPM):
    # detail that varies from slice to slice without flickering. 0: independent noise per frame.
    stage2_noise_length: float = 0.0


@dataclass
class PipelineConfig:
    """What ``gridit.json`` holds."""

    grid: GridSpec
    frame_size: tuple[int, int]           # full-resolution frame (H, W) in pixels
    channels: int = 3                     # image channels the codec sees
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    adapter: dict[str, Any] = field(default_factory=dict)   # e.g. CT spacing and HU window; opaque here

    @property
    def lr_frame_size(self) -> tuple[int, int]:
        return self.grid.frame_size(*self.frame_size)

    def to_dict(self) -> dict:
        return {"grid": self.grid.to_dict(), "frame_size": list(self.frame_size), "channels": self.channels,
                "sampling": asdict(self.sampling), "adapter": self.adapter}

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        return cls(GridSpec(**data["grid"]), tuple(data["frame_size"]), int(data.get("channels", 3)),
                   SamplingConfig(**data.get("sampling", {})), dict(data.get("adapter", {})))


class GriDiTPipeline:
    """Stage 1, stage 2, codec and scheduler, with the config that ties them together."""

    def __init__(self, stage1: GridDiT, codec: LatentCodec, scheduler: DDPMScheduler, config: PipelineConfig,
                 stage2: GridDiT | None = None):
        self.stage1, self.stage2, self.codec, self.scheduler, self.config = stage1, stage2, codec, scheduler, config
        self._check()

    # ---------------------------------------------------------------- checks
    def _check(self) -> None:
        grid = self.config.grid
        lh, lw = self.codec.latent_size(*self.config.lr_frame_size)
        s1 = self.stage1.config
        if s1.in_channels != self.codec.latent_channels or s1.cond_channels != 0:
            raise ValueError(f"stage 1 takes {s1.in_channels} latent channels (cond_channels={s1.cond_channels}), "
                             f"the codec gives {self.codec.latent_channels} and stage 1 must be unconditional")
        if (s1.grid_rows, s1.grid_cols) != (grid.rows, grid.cols):
            raise ValueError(f"stage 1 is a {s1.grid_rows}x{s1.grid_cols} grid model, the config says {grid.rows}x{grid.cols}")
        if (s1.sample_height, s1.sample_width) != (grid.rows * lh, grid.cols * lw):
            raise ValueError(f"stage 1 takes {s1.sample_height}x{s1.sample_width} latents, the grid of "
                             f"{self.config.lr_frame_size} frames gives {grid.rows * lh}x{grid.cols * lw}")
        if self.stage2 is not None:
            hh, hw = self.codec.latent_size(*self.config.frame_size)
            s2 = self.stage2.config
            if ((s2.sample_height, s2.sample_width) != (hh, hw) or s2.cond_channels != self.codec.latent_channels
                    or s2.in_channels != self.codec.latent_channels):
                raise ValueError("stage 2 does not match the full-resolution frame latent and codec")

    @property
    def device(self) -> torch.device:
        return next(self.stage1.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.stage1.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GriDiTPipeline":
        dtype = None if dtype == self.dtype else dtype      # diffusers warns on any dtype keyword
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for model in (self.stage1, self.stage2):
            if model is not None:
                model.to(**moves)
        self.codec.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, num_frames: int, batch_size: int = 1, generator: torch.Generator | None = None,
                 num_steps: int | None = None, stage2_steps: int | None = None,
                 progress: ProgressCallback | None = None) -> torch.Tensor:
        """``batch_size`` sequences of exactly ``num_frames`` frames, ``(B, N, C, H, W)`` in [-1, 1]."""
        latents = self.sample_latents(num_frames, batch_size, generator, num_steps, progress)  # (B, N, c, h, w)
        b, n = latents.shape[:2]
        lr = self.codec.decode(latents.flatten(0, 1))                                        # (B*N, C, H/r, W/r)
        hr = self.super_resolve(lr, generator, stage2_steps, progress, sequence_length=n)        # (B*N, C, H, W)
        return hr.clamp(-1, 1).reshape(b, n, *hr.shape[1:])

    @torch.no_grad()
    def sample_latents(self, num_frames: int, batch_size: int = 1, generator: torch.Generator | None = None,
                       num_steps: int | None = None, progress: ProgressCallback | None = None) -> torch.Tensor:
        """Stage 1 only: ``(B, N, c, h, w)`` low-resolution frame latents."""
        cfg, grid = self.config.sampling, self.config.grid
        scheduler = make_sample_scheduler(self.scheduler, cfg.sampler, num_steps or cfg.num_steps)
        lh, lw = self.codec.latent_size(*self.config.lr_frame_size)
        return sample_sequence(self.stage1, scheduler, num_frames=num_frames,
                               frame_shape=(self.codec.latent_channels, lh, lw), rows=grid.rows, cols=grid.cols,
                               batch_size=batch_size, control_rows=cfg.control_rows, interpolate=cfg.interpolate,
                               chunk=cfg.chunk, max_batch=cfg.max_batch, generator=generator, device=self.device,
                               dtype=self.dtype, callback=progress)

    @torch.no_grad()
    def super_resolve(self, lr_frames: torch.Tensor, generator: torch.Generator | None = None,
                      num_steps: int | None = None, progress: ProgressCallback | None = None,
                      sequence_length: int | None = None) -> torch.Tensor:
        """Stage 2 on ``(M, C, H/r, W/r)`` frames: bicubic up by ``r``, then the conditional DiT.

        Frames are consecutive runs of ``sequence_length`` frames of one sequence
        (default: all ``M`` are one sequence); with ``stage2_shared_noise`` the
        frames of a sequence share one noise draw, with ``stage2_noise_length``
        their noise changes smoothly along it (:class:`SequenceNoise`). Without a
        stage-2 model the bicubic upsampling is the result.
        """
        up = resize_frames(lr_frames, self.config.frame_size)                                # (M, C, H, W)
        if self.stage2 is None:
            return up
        cfg = self.config.sampling
        length = sequence_length or len(up)
        if len(up) % length:
            raise ValueError(f"{len(up)} frames are not whole sequences of {length}")
        smooth_noise = not cfg.stage2_shared_noise and cfg.stage2_noise_length > 0
        # SequenceNoise reaches the step as DDIM's variance_noise (DDIM at eta 1 is the DDPM step)
        scheduler = make_sample_scheduler(self.scheduler, "ddim" if smooth_noise else cfg.sampler,
                                          num_steps or cfg.stage2_steps)
        seeds = smooth = None
        draw = torch.Generator().manual_seed(0) if generator is None else generator
        if cfg.stage2_shared_noise:
            seeds = torch.randint(0, 2**62, (len(up) // length,), generator=draw, device=draw.device).tolist()
        elif smooth_noise:
            seed = int(torch.randint(0, 2**62, (1,), generator=draw, device=draw.device))
            smooth = SequenceNoise(seed, length, cfg.stage2_noise_length)
        starts = range(0, len(up), cfg.stage2_batch)
        per_chunk = len(strength_timesteps(scheduler, cfg.stage2_strength))
        out = []
        for i, start in enumerate(starts):
            chunk = up[start:start + cfg.stage2_batch].to(self.device, self.dtype)
            cond = self.codec.encode(chunk)                                                  # (m, c, h, w)
            if smooth is not None:
                noise = smooth.frames(start, len(chunk))
            elif seeds is not None:
                noise = [torch.Generator(device=draw.device).manual_seed(seeds[(start + j) // length])
                         for j in range(len(chunk))]
            else:
                noise = generator
            report = phase_callback(progress, "stage2", i * per_chunk, len(starts) * per_chunk)
            z = inpaint(self.stage2, scheduler, torch.zeros_like(cond), None, cond=cond, generator=noise,
                        init=cond, strength=cfg.stage2_strength, callback=report)
            out.append(self.codec.decode(z))
        return torch.cat(out)

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the model folder atomically (into a hidden sibling, then renamed)."""
        target = Path(folder)
        if target.exists() and not overwrite:
            raise CTGridItError("model folder exists", target, "pass overwrite=True or choose another folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(target) as tmp:
            self.stage1.save_pretrained(tmp / "stage1", safe_serialization=True)
            if self.stage2 is not None:
                self.stage2.save_pretrained(tmp / "stage2", safe_serialization=True)
            self.codec.save_pretrained(tmp / "codec")
            self.scheduler.save_pretrained(tmp / "scheduler")
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        return target

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "GriDiTPipeline":
        """Load a model folder offline; a clear one-line error if it is not one."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / "stage1").is_dir():
            raise CTGridItError(f"not a ctgridit model folder (no {CONFIG_FILE} or stage1/)", folder,
                                "give a folder written by `ctgridit train` or GriDiTPipeline.save_pretrained")
        try:
            config = PipelineConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
            stage1 = GridDiT.from_pretrained(str(folder / "stage1"), local_files_only=True)
            stage2 = (GridDiT.from_pretrained(str(folder / "stage2"), local_files_only=True)
                      if (folder / "stage2").is_dir() else None)
            codec = load_codec(folder / "codec")
            scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
            pipeline = cls(stage1.eval(), codec, scheduler, config, stage2.eval() if stage2 is not None else None)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise CTGridItError(f"model folder is incomplete or damaged ({err})".replace("\n", " "), folder,
                                "re-export it from the trainer") from None
        return pipeline.to(device, dtype)
