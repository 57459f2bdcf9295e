"""A trained GriDiT model as one diffusers pipeline and folder; generating and denoising sequences with it.

Folder layout, a diffusers pipeline folder (all loadable offline)::

    model/
      model_index.json   the modules' classes, and ``settings``: grid spec, frame size,
                         sampling defaults, adapter metadata (:class:`PipelineSettings`)
      stage1/            GridDiT (config.json + safetensors): the grid model
      stage2/            GridDiT with a condition input: per-frame super-resolution (optional)
      codec/             latent codec (config.json + safetensors; the SD VAE's weights for a VAE codec)
      scheduler/         the DDPM training scheduler config

:meth:`GriDiTPipeline.generate` (also the pipeline's ``__call__``) runs
docs/METHOD.md section 6 end to end: the grid autoregressive sampler in latent
space, decoding of the low-resolution frames, and stage 2 on every frame
(bicubic upsampling by ``r``, encoding as the condition, conditional
sampling), in batches. :meth:`GriDiTPipeline.denoise` runs section 7
(Algorithm 3) on a noisy sequence, with the same argument names.
"""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from safetensors import safe_open

from ctgridit.core.codecs import LatentCodec, PixelCodec
from ctgridit.core.conditioning import condition_channels
from ctgridit.core.denoise import DENOISE_STEPS, DenoiseLevels, denoise_frames
from ctgridit.core.diffusion import (NUM_TRAIN_TIMESTEPS, SAMPLERS, Generators, SequenceNoise, make_sample_scheduler,
                                     strength_timesteps)
from ctgridit.core.dit import GridDiT
from ctgridit.core.grid import GridSpec, cell_mask, resize_frames
from ctgridit.core.legacy_folders import is_legacy_folder, legacy_parts, legacy_settings
from ctgridit.core.sampler import (ProgressCallback, RePaint, Start, inpaint, level_strides, phase_callback,
                                   plan_sequence, sample_sequence, stride_labels)
from ctgridit.errors import CTGridItError
from ctgridit.files import atomic_folder

#: The file that makes a folder a diffusers pipeline folder.
INDEX_FILE = DiffusionPipeline.config_name
#: The weights file of a module folder (diffusers' name; safetensors only).
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


STAGE2_NOISE = ("independent", "shared", "smooth")


@dataclass
class Stage1Sampling:
    """How stage 1 makes the low-resolution frame latents (:func:`~ctgridit.core.sampler.sample_sequence`).

    Whether the known cells are given to the model (masked-conditional) or
    pasted in (replacement, the paper's) follows from the stage-1 model itself.
    """

    sampler: str = "ddim"
    num_steps: int = 50                   # best a divisor of the 1000 training steps
    control_rows: int | None = None       # m; None: rows - 1
    levels: int = 1                       # interpolation levels after extension (0: extension only)
    chunk: int | None = None              # k; None: 1 (frames in order, evenly spaced)
    max_batch: int = 16                   # grids per model call in step 2
    repaint_jump: int = 0                 # RePaint resampling (replacement mode): jump back this many steps ...
    repaint_times: int = 1                # ... this many times (1: none)

    @property
    def k(self) -> int:
        """The interpolation chunk in effect."""
        return 1 if self.chunk is None else self.chunk

    def stride_labels(self, cells: int, max_stride: int) -> list[int | None]:
        """The stride labels these settings give a model taking labels up to ``max_stride`` (ValueError beyond)."""
        return stride_labels(level_strides(cells, self.levels, self.k), max_stride)

    def check(self) -> None:
        _check_sampler(self.sampler, self.num_steps, "stage1")
        if self.levels < 0 or self.max_batch < 1 or self.repaint_jump < 0 or self.repaint_times < 1:
            raise ValueError("stage1: levels and repaint_jump must be >= 0, max_batch and repaint_times >= 1")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"stage1: chunk must be >= 1, got {self.chunk}")


@dataclass
class Stage2Sampling:
    """How stage 2 super-resolves every frame (:meth:`GriDiTPipeline.super_resolve`).

    ``noise`` is one of :data:`STAGE2_NOISE`: ``"independent"`` draws per frame
    (the paper's; the detail flickers from slice to slice), ``"shared"`` one draw
    per sequence (the same detail in every slice: streaks along z), ``"smooth"``
    noise that changes over about ``noise_length`` frames (:class:`SequenceNoise`;
    stage 2 then runs as DDIM at eta 1, which is the DDPM step, whatever
    ``sampler`` says).
    """

    sampler: str = "ddim"
    num_steps: int = 25
    batch: int = 16                       # frames per stage-2 call
    # Start from the upsampled condition diffused to the last ``strength`` of the schedule (SDEdit) instead of
    # pure noise (1.0, the paper): stage 2 then adds detail to the stage-1 frame instead of redrawing it.
    strength: float = 1.0
    noise: str = "independent"
    noise_length: float = 8.0             # "smooth" only

    def check(self) -> None:
        _check_sampler(self.sampler, self.num_steps, "stage2")
        if self.batch < 1 or not 0.0 < self.strength <= 1.0:
            raise ValueError(f"stage2: batch must be >= 1 and strength in (0, 1], got {self.batch} and {self.strength}")
        if self.noise not in STAGE2_NOISE:
            raise ValueError(f"stage2: noise must be one of {STAGE2_NOISE}, got {self.noise!r}")
        if self.noise == "smooth" and not self.noise_length > 0:
            raise ValueError(f"stage2: smooth noise needs noise_length > 0, got {self.noise_length}")


def _check_sampler(sampler: str, num_steps: int, where: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"{where}: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"{where}: num_steps must be an integer in 1..{NUM_TRAIN_TIMESTEPS}, got {num_steps!r}")


#: The flat sampling keys of model folders written before the stage-1/stage-2 split, and where they went.
LEGACY_SAMPLING = {"num_steps": ("stage1", "num_steps"), "control_rows": ("stage1", "control_rows"),
                   "chunk": ("stage1", "chunk"), "max_batch": ("stage1", "max_batch"),
                   "stage2_steps": ("stage2", "num_steps"), "stage2_batch": ("stage2", "batch"),
                   "stage2_strength": ("stage2", "strength")}


@dataclass
class SamplingConfig:
    """Defaults for :meth:`GriDiTPipeline.generate`, one part per stage (the settings' ``sampling``)."""

    stage1: Stage1Sampling = field(default_factory=Stage1Sampling)
    stage2: Stage2Sampling = field(default_factory=Stage2Sampling)

    def __post_init__(self) -> None:
        if isinstance(self.stage1, dict):
            self.stage1 = Stage1Sampling(**self.stage1)
        if isinstance(self.stage2, dict):
            self.stage2 = Stage2Sampling(**self.stage2)
        self.stage1.check()
        self.stage2.check()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, grid: GridSpec | None = None) -> "SamplingConfig":
        """Read ``{"stage1": {...}, "stage2": {...}}``, or the flat keys of older model folders.

        Older folders: ``sampler`` applied to both stages, ``interpolate: true``
        is one interpolation level, ``stage2_shared_noise`` the ``"shared"`` noise
        and ``stage2_noise_length > 0`` the ``"smooth"`` one; an unset chunk on a
        ``grid`` of 3 rows or more was a row (``cols``), as it was then. Unknown
        keys are a ValueError.
        """
        data = dict(data)
        if not set(data) - {"stage1", "stage2"}:
            return cls(**data)
        stage1: dict = {}
        stage2: dict = {}
        parts = {"stage1": stage1, "stage2": stage2}
        if "sampler" in data:
            stage1["sampler"] = stage2["sampler"] = data.pop("sampler")
        if "interpolate" in data:
            stage1["levels"] = int(bool(data.pop("interpolate")))
        shared, length = data.pop("stage2_shared_noise", False), float(data.pop("stage2_noise_length", 0.0))
        stage2["noise"] = "shared" if shared else "smooth" if length > 0 else "independent"
        if length > 0:
            stage2["noise_length"] = length
        for key in list(data):
            if key in LEGACY_SAMPLING:
                part, name = LEGACY_SAMPLING[key]
                parts[part][name] = data.pop(key)
        if data:
            raise ValueError(f"unknown sampling key(s) {sorted(data)}")
        if stage1.get("chunk") is None and stage1.get("levels", 1) and grid is not None and grid.rows >= 3:
            stage1["chunk"] = grid.cols
        return cls(Stage1Sampling(**stage1), Stage2Sampling(**stage2))


@dataclass
class PipelineSettings:
    """What a model folder records besides its modules (``settings`` in ``model_index.json``)."""

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
                "sampling": self.sampling.to_dict(), "adapter": self.adapter}

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineSettings":
        grid = GridSpec(**data["grid"])
        return cls(grid, tuple(data["frame_size"]), int(data.get("channels", 3)),
                   SamplingConfig.from_dict(data.get("sampling", {}), grid), dict(data.get("adapter", {})))


class GriDiTPipeline(DiffusionPipeline):
    """Stage 1, stage 2, codec and scheduler, with the settings that tie them together: a diffusers pipeline.

    Its folder is a diffusers folder (``model_index.json`` with the settings
    under ``settings``); ``to``, ``device``, ``dtype``, ``components`` and the
    loading of every module are diffusers'. ctgridit adds to saving and loading
    only what a medical tool needs: local safetensors files only, weights that
    match their config exactly, one-line errors, atomic writes, and the folders
    of earlier versions (:mod:`~ctgridit.core.legacy_folders`).
    """

    _optional_components = ["stage2"]

    def __init__(self, stage1: GridDiT, codec: LatentCodec, scheduler: DDPMScheduler, stage2: GridDiT | None = None,
                 settings: PipelineSettings | dict | None = None):
        super().__init__()
        if settings is None:
            raise ValueError("a GriDiTPipeline needs its settings (grid, frame size, sampling, adapter)")
        self.settings = settings if isinstance(settings, PipelineSettings) else PipelineSettings.from_dict(settings)
        self.register_modules(stage1=stage1, codec=codec, scheduler=scheduler, stage2=stage2)
        self.register_to_config(settings=self.settings.to_dict())
        self._check()

    # ---------------------------------------------------------------- checks
    def _check(self) -> None:
        grid = self.settings.grid
        lh, lw = self.codec.latent_size(*self.settings.lr_frame_size)
        s1, c = self.stage1.config, self.codec.latent_channels
        if s1.in_channels != c or s1.cond_channels not in (0, condition_channels(c)):
            raise ValueError(f"stage 1 takes {s1.in_channels} latent channels (cond_channels={s1.cond_channels}), "
                             f"the codec gives {c}: stage 1 must be unconditional (cond_channels 0) or "
                             f"masked-conditional (cond_channels {condition_channels(c)})")
        if (s1.grid_rows, s1.grid_cols) != (grid.rows, grid.cols):
            raise ValueError(f"stage 1 is a {s1.grid_rows}x{s1.grid_cols} grid model, the config says {grid.rows}x{grid.cols}")
        if (s1.sample_height, s1.sample_width) != (grid.rows * lh, grid.cols * lw):
            raise ValueError(f"stage 1 takes {s1.sample_height}x{s1.sample_width} latents, the grid of "
                             f"{self.settings.lr_frame_size} frames gives {grid.rows * lh}x{grid.cols * lw}")
        if self.stage2 is not None:
            hh, hw = self.codec.latent_size(*self.settings.frame_size)
            s2 = self.stage2.config
            if ((s2.sample_height, s2.sample_width) != (hh, hw) or s2.cond_channels != self.codec.latent_channels
                    or s2.in_channels != self.codec.latent_channels):
                raise ValueError("stage 2 does not match the full-resolution frame latent and codec")
        self.settings.sampling.stage1.stride_labels(grid.cells, self.max_stride)   # labels the model knows
        if s1.get("fill_residual", False) and self.scheduler.config.prediction_type != "sample":
            raise ValueError("stage 1 adds its output to the filled condition (fill_residual), which only a model of "
                             f"the clean sample does; its scheduler says {self.scheduler.config.prediction_type!r}")

    @property
    def masked(self) -> bool:
        """Whether stage 1 is masked-conditional (given the known cells) rather than unconditional."""
        return self.stage1.config.cond_channels > 0

    @property
    def max_stride(self) -> int:
        """The largest stride label stage 1 takes (0: none)."""
        return self.stage1.config.num_strides

    def to(self, *args, **kwargs) -> "GriDiTPipeline":
        """``DiffusionPipeline.to``, without the notice diffusers logs on every dtype cast (it names no module)."""
        with quiet_diffusers():
            return super().to(*args, **kwargs)

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, num_frames: int, batch_size: int = 1, generator: torch.Generator | None = None,
                 num_steps: int | None = None, stage2_steps: int | None = None, levels: int | None = None,
                 progress: ProgressCallback | None = None) -> torch.Tensor:
        """``batch_size`` sequences of exactly ``num_frames`` frames, ``(B, N, C, H, W)`` in [-1, 1].

        ``num_steps``, ``stage2_steps`` and ``levels`` override the model's sampling settings.
        """
        latents = self.sample_latents(num_frames, batch_size, generator, num_steps, levels, progress)  # (B, N, c, h, w)
        b, n = latents.shape[:2]
        lr = self.codec.decode(latents.flatten(0, 1))                                        # (B*N, C, H/r, W/r)
        hr = self.super_resolve(lr, generator, stage2_steps, progress, sequence_length=n)        # (B*N, C, H, W)
        return hr.clamp(-1, 1).reshape(b, n, *hr.shape[1:])

    __call__ = generate

    @torch.no_grad()
    def denoise(self, frames: torch.Tensor, strength: float | str = "auto", num_steps: int = DENOISE_STEPS,
                generator: Generators = None, progress: ProgressCallback | None = None
                ) -> tuple[torch.Tensor, DenoiseLevels]:
        """One noisy sequence of ``(N, C, H, W)`` frames in [-1, 1] at the model's frame size, denoised
        (Algorithm 3, :func:`~ctgridit.core.denoise.denoise_frames`), and the levels chosen. ``strength``:
        ``"auto"`` (levels from the estimated noise) or a number in (0, 1]; ``num_steps`` reverse steps."""
        return denoise_frames(self, frames, strength, num_steps, generator, progress)

    @torch.no_grad()
    def sample_latents(self, num_frames: int, batch_size: int = 1, generator: torch.Generator | None = None,
                       num_steps: int | None = None, levels: int | None = None,
                       progress: ProgressCallback | None = None) -> torch.Tensor:
        """Stage 1 only: ``(B, N, c, h, w)`` low-resolution frame latents."""
        cfg, grid = self.settings.sampling.stage1, self.settings.grid
        scheduler = make_sample_scheduler(self.scheduler, cfg.sampler, num_steps or cfg.num_steps)
        lh, lw = self.codec.latent_size(*self.settings.lr_frame_size)
        plan = plan_sequence(num_frames, grid.rows, grid.cols, cfg.control_rows,
                             cfg.levels if levels is None else levels, cfg.chunk)
        return sample_sequence(self.stage1, scheduler, plan, frame_shape=(self.codec.latent_channels, lh, lw),
                               batch_size=batch_size, max_batch=cfg.max_batch, conditional=self.masked,
                               max_stride=self.max_stride, generator=generator, device=self.device, dtype=self.dtype,
                               repaint=RePaint(cfg.repaint_jump, cfg.repaint_times), callback=progress)

    @torch.no_grad()
    def fill(self, grids: torch.Tensor, known: list[float], num_steps: int | None = None,
             generator: torch.Generator | None = None, callback: Callable[[int, int], None] | None = None
             ) -> torch.Tensor:
        """Stage 1 on given grids: the cells flagged 0 in ``known`` (row-major, 1 = known) generated from the
        others, which come back exactly; ``(B, C, R*h, C*w)`` frames in [-1, 1] in and out.

        Needs a masked-conditional stage 1 (the known cells are its input; the
        paper's unconditional model cannot take them) and frames at its own
        low-resolution size. DDIM with ``num_steps`` (default the model's
        stage-1 steps); one step from pure noise of a clean-sample model is its
        estimate of the posterior mean of the missing cells (no fresh noise in
        the result), more steps draw a sample.
        """
        if not self.masked:
            raise ValueError("filling given grids needs a masked-conditional stage 1; this model is unconditional")
        grid = self.settings.grid
        if len(known) != grid.cells:
            raise ValueError(f"known must flag the {grid.cells} cells of a {grid.rows}x{grid.cols} grid, got {len(known)}")
        if not 0 < sum(known) < grid.cells:
            raise ValueError("known must flag some cells known and some to fill")
        z = self.codec.encode(grids.to(self.device, self.dtype))                              # (B, c, R*h', C*w')
        mask = cell_mask(torch.tensor(known).expand(len(z), -1), grid.rows, grid.cols, z.shape[-2] // grid.rows,
                         z.shape[-1] // grid.cols).to(self.device, self.dtype)               # (B, 1, H, W)
        scheduler = make_sample_scheduler(self.scheduler, "ddim", num_steps or self.settings.sampling.stage1.num_steps)
        z = inpaint(self.stage1, scheduler, z, mask, conditional=True, generator=generator,
                    inputs={"stride": 1 if self.max_stride else None}, callback=callback)
        out = self.codec.decode(z).clamp(-1, 1)
        if isinstance(self.codec, PixelCodec):                    # the known cells exactly (a VAE cannot promise it)
            out = torch.where(mask.bool(), grids.to(out), out)
        return out

    @torch.no_grad()
    def super_resolve(self, lr_frames: torch.Tensor, generator: torch.Generator | None = None,
                      num_steps: int | None = None, progress: ProgressCallback | None = None,
                      sequence_length: int | None = None) -> torch.Tensor:
        """Stage 2 on ``(M, C, H/r, W/r)`` frames: bicubic up by ``r``, then the conditional DiT.

        Frames are consecutive runs of ``sequence_length`` frames of one sequence
        (default: all ``M`` are one sequence); the stage-2 ``noise`` setting says
        how their noise relates (:class:`Stage2Sampling`). Without a stage-2
        model the bicubic upsampling is the result.
        """
        up = resize_frames(lr_frames, self.settings.frame_size)                                # (M, C, H, W)
        if self.stage2 is None:
            return up
        cfg = self.settings.sampling.stage2
        per_sequence = sequence_length or len(up)
        if len(up) % per_sequence:
            raise ValueError(f"{len(up)} frames are not whole sequences of {per_sequence}")
        # SequenceNoise reaches the step as DDIM's variance_noise (DDIM at eta 1 is the DDPM step)
        scheduler = make_sample_scheduler(self.scheduler, "ddim" if cfg.noise == "smooth" else cfg.sampler,
                                          num_steps or cfg.num_steps)
        seeds = smooth = None
        draw = torch.Generator().manual_seed(0) if generator is None else generator
        if cfg.noise == "shared":
            seeds = torch.randint(0, 2**62, (len(up) // per_sequence,), generator=draw, device=draw.device).tolist()
        elif cfg.noise == "smooth":
            seed = int(torch.randint(0, 2**62, (1,), generator=draw, device=draw.device))
            smooth = SequenceNoise(seed, per_sequence, cfg.noise_length)
        starts = range(0, len(up), cfg.batch)
        per_chunk = len(strength_timesteps(scheduler, cfg.strength))
        out = []
        for i, start in enumerate(starts):
            chunk = up[start:start + cfg.batch].to(self.device, self.dtype)
            cond = self.codec.encode(chunk)                                                  # (m, c, h, w)
            if smooth is not None:
                noise = smooth.frames(start, len(chunk))
            elif seeds is not None:
                noise = [torch.Generator(device=draw.device).manual_seed(seeds[(start + j) // per_sequence])
                         for j in range(len(chunk))]
            else:
                noise = generator
            report = phase_callback(progress, "stage2", i * per_chunk, len(starts) * per_chunk)
            z = inpaint(self.stage2, scheduler, torch.zeros_like(cond), None, inputs={"cond": cond}, generator=noise,
                        start=Start(cond, cfg.strength), callback=report)
            out.append(self.codec.decode(z))
        return torch.cat(out)

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """``DiffusionPipeline.save_pretrained`` (safetensors), atomically: into a hidden sibling, then renamed.
        The settings are written as they are now (``pipe.settings`` may have changed since the pipeline was made).
        """
        target = Path(folder)
        if target.exists() and not overwrite:
            raise CTGridItError("model folder exists", target, "pass overwrite=True or choose another folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.register_to_config(settings=self.settings.to_dict())
        with atomic_folder(target) as tmp, quiet_diffusers():
            super().save_pretrained(tmp, safe_serialization=True)
        return target

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> "GriDiTPipeline":
        """``DiffusionPipeline.from_pretrained`` of a local folder, safetensors only, in ``dtype`` (default: each
        module's own, float32 for ctgridit's); a one-line error where it is not a model folder, is damaged or has
        weights that do not match their config. Folders of earlier versions load too
        (:mod:`~ctgridit.core.legacy_folders`).
        """
        folder = Path(folder)
        read_settings(folder)                                      # not a model folder, or bad settings: one line
        legacy = is_legacy_folder(folder, INDEX_FILE)
        try:
            with quiet_diffusers():
                if legacy:
                    stage2 = load_stage(folder / "stage2") if (folder / "stage2").is_dir() else None
                    pipeline = cls(load_stage(folder / "stage1"), stage2=stage2, settings=legacy_settings(folder),
                                   **legacy_parts(folder))
                else:
                    pipeline = super().from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        except CTGridItError:
            raise
        except Exception as err:  # anything in a damaged folder (a bad scheduler config raises NotImplementedError)
            raise CTGridItError(f"model folder is incomplete or damaged ({shorten(str(err), 240)})", folder,
                                "re-export it from the trainer") from None
        for name, module in pipeline.components.items():
            # (an old folder's stages were checked by load_stage; its autoencoder is in codec/vae/, loaded whole)
            if isinstance(module, torch.nn.Module) and not legacy:
                check_weights(folder / name, module)
        return pipeline if dtype is None else pipeline.to(dtype)


def is_model_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` has a model folder's settings (this layout's or an earlier one's); nothing is read."""
    folder = Path(folder)
    return (folder / INDEX_FILE).is_file() or is_legacy_folder(folder, INDEX_FILE)


def read_settings(folder: str | os.PathLike) -> PipelineSettings:
    """A model folder's settings (no weights loaded); a clear one-line error if it is not a model folder."""
    folder = Path(folder)
    if not is_model_folder(folder) or not (folder / "stage1").is_dir():
        raise CTGridItError(f"not a ctgridit model folder (no {INDEX_FILE} or stage1/)", folder,
                            "give a folder written by `ctgridit train` or GriDiTPipeline.save_pretrained")
    try:
        if is_legacy_folder(folder, INDEX_FILE):
            return PipelineSettings.from_dict(legacy_settings(folder))
        index = json.loads((folder / INDEX_FILE).read_text())
        if index.get("_class_name") != GriDiTPipeline.__name__:
            raise ValueError(f"{INDEX_FILE} is of a {index.get('_class_name')}, not a {GriDiTPipeline.__name__}")
        return PipelineSettings.from_dict(index["settings"])
    except Exception as err:  # a damaged or hand-edited model_index.json
        raise CTGridItError(f"model folder is incomplete or damaged ({shorten(str(err), 240)})", folder,
                            "re-export it from the trainer") from None


def load_stage(folder: Path) -> GridDiT:
    """A stage folder's GridDiT, checked as :meth:`GriDiTPipeline.from_pretrained` checks it (one-line errors)."""
    try:
        with quiet_diffusers():
            model = GridDiT.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except Exception as err:  # no weights file, a damaged config, a wrong shape: diffusers raises many kinds
        raise CTGridItError(f"{folder.name}/ cannot be loaded ({shorten(str(err), 200)})", folder.parent,
                            "re-export the model folder from the trainer") from None
    check_weights(folder, model)
    return model


def check_weights(folder: Path, module: torch.nn.Module) -> None:
    """The weights file of a module folder holds exactly the module's saved tensors, each of its shape.

    diffusers refuses a shape that differs but leaves a missing tensor on the
    meta device and drops an unknown one with a log line; ctgridit refuses both.
    """
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CTGridItError(f"{folder.name}/ has no {WEIGHTS_FILE} (ctgridit loads safetensors weights only)",
                            folder.parent, "re-export the model folder from the trainer")
    with safe_open(str(weights), "pt") as saved:
        shapes = {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}
    own = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    problems = {"missing keys": sorted(set(own) - set(shapes)), "unexpected keys": sorted(set(shapes) - set(own)),
                "mismatched keys": sorted(k for k in set(own) & set(shapes) if own[k] != shapes[k])}
    found = {k: v for k, v in problems.items() if v}
    if found or any(p.is_meta for p in module.parameters()):
        counts = ", ".join(f"{len(v)} {k}" for k, v in found.items()) or "tensors not loaded"
        raise CTGridItError(f"{folder.name}/ weights do not match its config.json ({counts})", folder.parent,
                            "re-export the model folder from the trainer")


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers logs loading notices and shows loading bars of its own; ctgridit checks what matters and says it
    in one line."""
    from diffusers.utils import logging as diffusers_logging

    level, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        if bars:
            diffusers_logging.enable_progress_bar()


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut at a word boundary to at most ``width`` characters."""
    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" ...")
