"""A trained GriDiT model as one diffusers pipeline and folder; generating and denoising sequences with it.

Folder layout, a diffusers pipeline folder (all loadable offline)::

    model/
      model_index.json   the modules' classes, and ``settings``: grid spec, frame size,
                         sampling defaults, adapter metadata (:class:`~ctgridit.core.settings.PipelineSettings`)
      stage1/            GridDiT (config.json + safetensors): the grid model
      stage2/            GridDiT with a condition input: per-frame super-resolution (optional)
      refiner/           MotionRefiner: a learned correction of the motion fill a slice model starts from (optional)
      codec/             latent codec (config.json + safetensors; the SD VAE's weights for a VAE codec)
      scheduler/         the scheduler stage 1 samples with (DDIM or DDPM over the training noise schedule)

It keeps diffusers' contract: ``pipe(num_frames)`` returns a
:class:`GriDiTPipelineOutput` (``output_type`` and ``return_dict`` as in
diffusers), ``from_pretrained(path, torch_dtype=...)`` and
``save_pretrained(path)`` take diffusers' arguments, and ``pipe.scheduler =
DDPMScheduler.from_config(pipe.scheduler.config)`` changes how stage 1 samples.
:meth:`GriDiTPipeline.generate` runs docs/METHOD.md section 6 end to end (the
grid autoregressive sampler in latent space, decoding of the low-resolution
frames, and stage 2 on every frame) and returns the frames in [-1, 1];
:meth:`GriDiTPipeline.denoise` runs section 7 (Algorithm 3) on a noisy
sequence, with the same argument names. Reading folders safely is
:mod:`ctgridit.core.loading`; the settings are :mod:`ctgridit.core.settings`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.utils import BaseOutput

from ctgridit.core.codecs import LatentCodec, PixelCodec
from ctgridit.core.conditioning import condition_channels
from ctgridit.core.diffusion import (Generators, SequenceNoise, make_sample_scheduler, sampler_name,
                                     sampling_scheduler, strength_timesteps)
from ctgridit.core.dit import GridDiT
from ctgridit.core.frame_denoising import DENOISE_STEPS, DenoiseLevels, denoise_frames
from ctgridit.core.grid import cell_mask, resize_frames
from ctgridit.core.legacy_folders import is_legacy_folder, legacy_parts, legacy_settings
from ctgridit.core.loading import INDEX_FILE, check_weights, is_model_folder, load_stage, quiet_diffusers, read_settings
from ctgridit.core.motion_refiner import MotionRefiner
from ctgridit.core.sampler import ProgressCallback, RePaint, Start, inpaint, phase_callback, plan_sequence, sample_sequence
from ctgridit.core.settings import SCHEDULER_LAYOUT, PipelineSettings
from ctgridit.errors import CTGridItError, shorten
from ctgridit.files import atomic_folder

#: What ``pipe(...)`` can return (``output_type``), as in diffusers.
OUTPUT_TYPES = ("pt", "np", "latent")


@dataclass
class GriDiTPipelineOutput(BaseOutput):
    """What ``pipe(...)`` returns: ``frames``, ``(B, N, C, H, W)`` torch values in [0, 1] (``output_type="pt"``),
    ``(B, N, H, W, C)`` numpy float32 in [0, 1] (``"np"``), or stage 1's ``(B, N, c, h, w)`` latents (``"latent"``)."""

    frames: torch.Tensor | np.ndarray


class GriDiTPipeline(DiffusionPipeline):
    """Stage 1, stage 2, codec and scheduler, with the settings that tie them together: a diffusers pipeline.

    Its folder is a diffusers folder (``model_index.json`` with the settings
    under ``settings``); ``to``, ``device``, ``dtype``, ``components`` and the
    loading of every module are diffusers'. ctgridit adds to saving and loading
    only what a medical tool needs: local safetensors files only, weights that
    match their config exactly, one-line errors, atomic writes, and the folders
    of earlier versions (:mod:`~ctgridit.core.legacy_folders`).

    ``scheduler`` is what stage 1 samples with, as given (a DDPMScheduler or a
    DDIMScheduler; ``sampling.stage1.sampler`` in the settings follows it), also
    when assigned later; saving writes it as the folder's ``scheduler/``. Stage 2
    samples with the sampler its own settings name, over the same noise
    schedule. Folders written before that layout held the training scheduler
    there: :meth:`from_pretrained` makes their sampler from it as their settings say.
    """

    _optional_components = ["stage2", "refiner"]

    def __init__(self, stage1: GridDiT, codec: LatentCodec, scheduler: SchedulerMixin, stage2: GridDiT | None = None,
                 settings: PipelineSettings | dict | None = None, refiner: MotionRefiner | None = None):
        super().__init__()
        if settings is None:
            raise ValueError("a GriDiTPipeline needs its settings (grid, frame size, sampling, adapter)")
        self.settings = settings if isinstance(settings, PipelineSettings) else PipelineSettings.from_dict(settings)
        self.settings.sampling.stage1.sampler = sampler_name(scheduler)           # the scheduler decides
        self.register_modules(stage1=stage1, codec=codec, scheduler=scheduler, stage2=stage2, refiner=refiner)
        self.register_to_config(settings=self.settings.to_dict())
        self._check()

    # ---------------------------------------------------------------- checks
    def _check(self) -> None:
        grid = self.settings.grid
        lh, lw = self.codec.latent_size(*self.settings.lr_frame_size)
        s1, c = self.stage1.config, self.codec.latent_channels
        fill = s1.get("cond_fill", "zeros")
        if s1.in_channels != c or s1.cond_channels not in (0, condition_channels(c, fill)):
            raise ValueError(f"stage 1 takes {s1.in_channels} latent channels (cond_channels={s1.cond_channels}), "
                             f"the codec gives {c}: stage 1 must be unconditional (cond_channels 0) or "
                             f"masked-conditional (cond_channels {condition_channels(c, fill)})")
        if self.refiner is not None and fill not in ("flow", "flow_pair"):
            raise ValueError(f"a refiner corrects the motion fill, and stage 1 has none (its fill is {fill!r})")
        if fill == "flow_pair" and not isinstance(self.codec, PixelCodec):
            raise ValueError("a flow_pair stage 1 moves its known frames in pixel space: it needs the pixel codec")
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

    @torch.no_grad()
    def __call__(self, num_frames: int, batch_size: int = 1, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, stage2_steps: int | None = None, levels: int | None = None,
                 output_type: str = "pt", return_dict: bool = True,
                 progress: ProgressCallback | None = None) -> GriDiTPipelineOutput | tuple:
        """diffusers' call: :meth:`generate` (``num_inference_steps`` stage 1's steps), returned as a
        :class:`GriDiTPipelineOutput` in ``output_type`` (``"pt"``, ``"np"``, ``"latent"``: stage 1 only), or as
        the tuple ``(frames,)`` with ``return_dict=False``."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "latent":
            frames = self.sample_latents(num_frames, batch_size, generator, num_inference_steps, levels, progress)
        else:
            frames = (self.generate(num_frames, batch_size, generator, num_inference_steps, stage2_steps, levels,
                                    progress) + 1) / 2                                       # [-1, 1] -> [0, 1]
            if output_type == "np":
                frames = frames.permute(0, 1, 3, 4, 2).float().cpu().numpy()
        return GriDiTPipelineOutput(frames=frames) if return_dict else (frames,)

    @torch.no_grad()
    def denoise(self, frames: torch.Tensor, strength: float | str = "auto", num_steps: int = DENOISE_STEPS,
                generator: Generators = None, progress: ProgressCallback | None = None,
                levels: DenoiseLevels | None = None) -> tuple[torch.Tensor, DenoiseLevels]:
        """One noisy sequence of ``(N, C, H, W)`` frames in [-1, 1] at the model's frame size, denoised
        (Algorithm 3, :func:`~ctgridit.core.frame_denoising.denoise_frames`), and the levels chosen. ``strength``:
        ``"auto"`` (levels from the estimated noise) or a number in (0, 1]; ``num_steps`` reverse steps;
        ``levels``: those of an earlier run, kept."""
        return denoise_frames(self, frames, strength, num_steps, generator, progress, levels)

    @torch.no_grad()
    def sample_latents(self, num_frames: int, batch_size: int = 1, generator: torch.Generator | None = None,
                       num_steps: int | None = None, levels: int | None = None,
                       progress: ProgressCallback | None = None) -> torch.Tensor:
        """Stage 1 only: ``(B, N, c, h, w)`` low-resolution frame latents."""
        cfg, grid = self.settings.sampling.stage1, self.settings.grid
        scheduler = self.stage1_scheduler(num_steps or cfg.num_steps)
        lh, lw = self.codec.latent_size(*self.settings.lr_frame_size)
        plan = plan_sequence(num_frames, grid.rows, grid.cols, cfg.control_rows,
                             cfg.levels if levels is None else levels, cfg.chunk)
        return sample_sequence(self.stage1, scheduler, plan, frame_shape=(self.codec.latent_channels, lh, lw),
                               batch_size=batch_size, max_batch=cfg.max_batch, conditional=self.masked,
                               max_stride=self.max_stride, generator=generator, device=self.device, dtype=self.dtype,
                               repaint=RePaint(cfg.repaint_jump, cfg.repaint_times), callback=progress)

    def stage1_scheduler(self, num_steps: int) -> SchedulerMixin:
        """A fresh copy of ``self.scheduler`` (what stage 1 samples with) with ``num_steps`` timesteps set."""
        sampler_name(self.scheduler)                                              # one kind we can step
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler

    @torch.no_grad()
    def fill(self, grids: torch.Tensor, known: list[float], num_steps: int | None = None,
             generator: torch.Generator | None = None, callback: Callable[[int, int], None] | None = None,
             positions: list[float] | None = None, filled: bool = False) -> torch.Tensor:
        """Stage 1 on given grids: the cells flagged 0 in ``known`` (row-major, 1 = known) generated from the
        others, which come back exactly; ``(B, C, R*h, C*w)`` frames in [-1, 1] in and out.

        Needs a masked-conditional stage 1 (the known cells are its input; the
        paper's unconditional model cannot take them) and frames at its own
        low-resolution size. DDIM with ``num_steps`` (default the model's
        stage-1 steps); one step from pure noise of a clean-sample model is its
        estimate of the posterior mean of the missing cells (no fresh noise in
        the result), more steps draw a sample. ``positions``: where the cells lie along the sequence (a model
        trained with ``gaps``; default consecutive frames). ``filled``: the cells to generate hold the model's
        fill already, made by the caller (e.g. on whole frames), and its condition takes them as they are; for a
        ``flow_pair`` model ``grids`` then carries the fill's channels after the frames' (the two moved frames and
        the weight, :func:`~ctgridit.core.conditioning.moved_cells`), and the condition takes those.
        """
        if not self.masked:
            raise ValueError("filling given grids needs a masked-conditional stage 1; this model is unconditional")
        grid = self.settings.grid
        if len(known) != grid.cells:
            raise ValueError(f"known must flag the {grid.cells} cells of a {grid.rows}x{grid.cols} grid, got {len(known)}")
        if not 0 < sum(known) < grid.cells:
            raise ValueError("known must flag some cells known and some to fill")
        channels = self.codec.image_channels
        extra = grids[:, channels:].to(self.device, self.dtype) if filled and grids.shape[1] > channels else None
        grids = grids[:, :channels]
        z = self.codec.encode(grids.to(self.device, self.dtype))                              # (B, c, R*h', C*w')
        mask = cell_mask(torch.tensor(known).expand(len(z), -1), grid.rows, grid.cols, z.shape[-2] // grid.rows,
                         z.shape[-1] // grid.cols).to(self.device, self.dtype)               # (B, 1, H, W)
        scheduler = make_sample_scheduler(self.scheduler, "ddim", num_steps or self.settings.sampling.stage1.num_steps)
        where = None if positions is None else torch.tensor([positions], dtype=z.dtype, device=z.device)
        z = inpaint(self.stage1, scheduler, z, mask, conditional=True, generator=generator,
                    inputs={"stride": 1 if self.max_stride else None}, callback=callback, positions=where,
                    filled=filled if extra is None else extra)
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
        how their noise relates (:class:`~ctgridit.core.settings.Stage2Sampling`). All noise comes from
        ``generator``, or from torch's global generator without one (as diffusers' pipelines do), for every
        noise setting. Without a stage-2 model the bicubic upsampling is the result.
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
        where = generator.device if generator is not None else "cpu"
        if cfg.noise == "shared":
            seeds = torch.randint(0, 2**62, (len(up) // per_sequence,), generator=generator, device=where).tolist()
        elif cfg.noise == "smooth":
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=where))
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
                noise = [torch.Generator(device=where).manual_seed(seeds[(start + j) // per_sequence])
                         for j in range(len(chunk))]
            else:
                noise = generator
            report = phase_callback(progress, "stage2", i * per_chunk, len(starts) * per_chunk)
            z = inpaint(self.stage2, scheduler, torch.zeros_like(cond), None, inputs={"cond": cond}, generator=noise,
                        start=Start(cond, cfg.strength), callback=report)
            out.append(self.codec.decode(z))
        return torch.cat(out)

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None,
                        push_to_hub: bool = False) -> Path:
        """``DiffusionPipeline.save_pretrained`` with the arguments a model folder ctgridit reads can have: one
        safetensors file per module (no ``variant``, no shards), a local folder (no ``push_to_hub``).

        Written atomically: into a hidden sibling, then renamed over the folder. Over a model folder it
        replaces the modules and the index (a module the pipeline no longer has goes) and keeps any other file
        (a model card, notes), as diffusers leaves them; any other non-empty folder is refused. The settings are
        written as they are now (``pipe.settings`` may have changed since the pipeline was made), with the
        scheduler stage 1 samples with. Returns the folder."""
        target = Path(save_directory)
        if not safe_serialization or variant is not None or max_shard_size is not None:
            raise ValueError("ctgridit saves one safetensors file per module (safe_serialization=True, no variant, "
                             "no max_shard_size)")
        if push_to_hub:
            raise ValueError("ctgridit saves to local folders only (push_to_hub)")
        if target.exists() and not (target.is_dir() and (is_model_folder(target) or not any(target.iterdir()))):
            raise CTGridItError("exists and is not a model folder: saving would replace it", target,
                                "choose another folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.settings.sampling.stage1.sampler = sampler_name(self.scheduler)
        self.settings.layout = SCHEDULER_LAYOUT
        self.register_to_config(settings=self.settings.to_dict())
        ours = {INDEX_FILE, *self.components}
        with atomic_folder(target) as tmp, quiet_diffusers():
            super().save_pretrained(tmp, safe_serialization=True)
            for other in (target.iterdir() if target.is_dir() else []):        # a card, notes: kept
                if other.name not in ours and not (tmp / other.name).exists():
                    (shutil.copytree if other.is_dir() else shutil.copy2)(other, tmp / other.name)
        return target

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "GriDiTPipeline":
        """``DiffusionPipeline.from_pretrained`` of a local folder (its arguments, e.g. ``torch_dtype``; default:
        each module's own, float32 for ctgridit's), safetensors only; a one-line error where it is not a model
        folder, is damaged or has weights that do not match their config. Folders of earlier versions load too
        (:mod:`~ctgridit.core.legacy_folders`).
        """
        folder = Path(pretrained_model_name_or_path)
        for key in ("local_files_only", "use_safetensors"):
            if kwargs.get(key, True) is not True:
                raise CTGridItError(f"ctgridit loads local safetensors folders only ({key}={kwargs[key]!r})", folder,
                                    f"leave {key} out")
            kwargs[key] = True
        dtype = kwargs.pop("torch_dtype", None)
        settings = read_settings(folder)                           # not a model folder, or bad settings: one line
        legacy = is_legacy_folder(folder, INDEX_FILE)
        try:
            with quiet_diffusers():
                if legacy:
                    stage2 = load_stage(folder / "stage2") if (folder / "stage2").is_dir() else None
                    pipeline = cls(load_stage(folder / "stage1"), stage2=stage2, settings=legacy_settings(folder),
                                   **legacy_parts(folder))
                else:
                    pipeline = super().from_pretrained(str(folder), **kwargs)
        except CTGridItError:
            raise
        except Exception as err:  # anything in a damaged folder (a bad scheduler config raises NotImplementedError)
            raise CTGridItError(f"model folder is incomplete or damaged ({shorten(str(err), 240)})", folder,
                                "re-export it from the trainer") from err
        for name, module in pipeline.components.items():
            # (an old folder's stages were checked by load_stage; its autoencoder is in codec/vae/, loaded whole)
            if isinstance(module, torch.nn.Module) and not legacy:
                check_weights(folder / name, module)
        if settings.layout < SCHEDULER_LAYOUT and "scheduler" not in kwargs:  # scheduler/ holds the training one
            pipeline.scheduler = sampling_scheduler(pipeline.scheduler, settings.sampling.stage1.sampler)
            pipeline.settings.sampling.stage1.sampler = settings.sampling.stage1.sampler
            pipeline.settings.layout = SCHEDULER_LAYOUT
            pipeline.register_to_config(settings=pipeline.settings.to_dict())
        return pipeline if dtype is None else pipeline.to(dtype)
