"""Training configuration: one YAML file describes a model and how to train both stages.

The file has these sections (every key has a default except where noted;
unknown keys are refused, so a typo never passes silently)::

    name: ct_small
    output: runs/ct_small/model        # the model folder synth/denoise load
    frame_size: [128, 128]             # full-resolution frame (H, W) in pixels
    grid: {rows: 2, cols: 2, stride: 1, factor: 2}
    data:
      kind: ct                         # the adapter: ct | ctrate | video | one registered (ctgridit.adapters)
      paths: [$CTGRIDIT_DATA/lidc_idri] # files or folders (relative to the config file; ctgridit.data_folder)
      spacing: [3.0, 3.0, 3.0]         # resample CT to this spacing (mm); null keeps it
      stride_range: [1, 3]             # random z/time stride per grid; null: grid.stride
      hold_out: [A0002_8mm_B40f.nii.gz]
    codec: {kind: pixel, channels: 1}  # or {kind: vae, path: /models/sd-vae-ft-mse}
    diffusion: {prediction: sample, min_snr: 5}   # what the models predict, and the loss weights
    stage1:
      model: {preset: DiT-S/4}
      optim: {steps: 20000}
      conditioning:                    # stage 1 only; see ConditioningConfig
        masked: true                   # known cells are model inputs (extension, interpolation)
        strides: true                  # the grid's stride is a model input
    stage2: {model: {preset: DiT-S/4}, optim: {steps: 20000}}
    # a stage may start from trained weights (fine-tuning): init: runs/x/checkpoints/stage1/step_00005000
    optim: {lr: 1.0e-4, batch_size: 8, ...}   # shared; a stage's optim overrides it
    checkpoint: {dir: runs/ct_small/checkpoints, every: 1000, keep_last: 3}
    logging: {every: 10, tensorboard: false}
    sampling:                          # stored in the model folder (SamplingConfig)
      stage1: {sampler: ddpm, num_steps: 50, levels: 2}
      stage2: {sampler: ddim, num_steps: 25, noise: smooth, noise_length: 8}

Relative paths are taken relative to the config file's folder; ``$CTGRIDIT_DATA`` in a path is the shared
data folder (:mod:`ctgridit.data_folder`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ctgridit.adapters import get_adapter
from ctgridit.core.conditioning import FILLS, TASKS, TaskMix
from ctgridit.core.diffusion import PREDICTIONS
from ctgridit.core.grid import GridSpec
from ctgridit.core.settings import SamplingConfig
from ctgridit.data_folder import expand as expand_data
from ctgridit.errors import CTGridItError
from ctgridit.training.datasets import InPlaneJitter

CODEC_KINDS = ("pixel", "vae")
PRECISIONS = ("no", "fp16", "bf16")
STAGES = (1, 2)


@dataclass
class DataConfig:
    kind: str = "ct"
    paths: list[str] = field(default_factory=list)          # ct: scans/DICOM folders; video: files/folders
    ctrate_root: str | None = None                          # ctrate: the folder of volumes ...
    ctrate_csv: str | None = None                           # ... and its metadata CSV
    spacing: list[float] | None = None                      # ct/ctrate: resample to (x, y, z) mm
    window: list[float] | None = None    # ct, ctrate: the HU window mapped to [-1, 1] (null: the CT adapter's)
    hold_out: list[str] = field(default_factory=list)       # scan names kept out of training
    stride_range: list[int] | None = None                   # [min, max] stride per grid
    strides: list[int] | None = None                        # or the strides to draw from, e.g. [1, 3, 9]
    # a scan serves only strides whose step (stride x spacing z) is at least its own slice spacing: thick scans
    # teach the coarse strides, never the fine ones from slices made by interpolation
    strides_from_thickness: bool = False
    jitter: dict[str, float] | None = None                  # stage-1 in-plane augmentation {scale, shift}
    options: dict[str, Any] = field(default_factory=dict)   # a registered adapter's own settings
    tile: int | None = None      # keep scans at their own in-plane size and train on random tiles of this size
    cache: str | None = None     # a folder of frames prepared by `ctgridit prepare CONFIG`; training reads it
    every: int = 1                                          # video: keep every n-th frame
    num_workers: int = 0                                    # DataLoader worker processes


@dataclass
class ModelConfig:
    preset: str = "DiT-S/4"
    pos_embed: str = "3d"
    overrides: dict[str, Any] = field(default_factory=dict)  # any other GridDiT config field


@dataclass
class CodecConfig:
    kind: str = "pixel"
    channels: int = 3                                       # pixel codec: image channels (1 for gray CT)
    path: str | None = None                                 # vae: local folder (or hub id) of an AutoencoderKL
    subfolder: str | None = None
    chunk_size: int = 16
    download: bool = False       # vae: a hub id may be downloaded (off: local folders only, as everything else)


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    steps: int = 1000                                       # optimizer steps
    batch_size: int = 8                                     # per process and micro-step
    grad_accum: int = 1                                     # micro-steps per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0                                   # linear warm-up, then the schedule
    schedule: str = "constant"                              # constant (DiT) | cosine | linear: decay to 0 at steps
    #                                                         (diffusers' schedules: their warm-up starts at lr 0)
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    mixed_precision: str = "no"                             # no | fp16 | bf16
    seed: int = 0


@dataclass
class ConditioningConfig:
    """Stage 1's inputs besides the noisy grid (docs/METHOD.md section 6, corrections).

    ``masked``: the model gets the clean known cells and the cell mask
    (:mod:`ctgridit.core.conditioning`); every training grid draws its task with
    these probabilities: nothing known, the first ``control_rows`` rows known
    (extension), the first and last ``chunk`` cells known (interpolation).
    ``strides``: the model gets the grid's stride (labels up to the largest
    training stride), dropped to "not given" with probability ``stride_dropout``.
    ``fill``: what the model sees in the unknown cells of its condition: ``zeros``
    , ``linear`` interpolation between the known cells or ``flow``, interpolation along the motion between
    them (TV-L1 optical flow, :mod:`ctgridit.core.motion`) (the model then learns a
    correction to the classical estimate; :func:`~ctgridit.core.conditioning.fill_unknown_cells`);
    ``residual``: with ``fill: linear`` or ``flow`` and ``diffusion.prediction: sample``, the model's
    output is added to the filled cells (it starts at the interpolation exactly).
    ``start_within``: grids with nothing known (the sampler's first grid) come
    from the first frames of a sequence, so generated sequences begin where
    training sequences begin.
    ``gaps``: interpolation grids span a gap of ``g`` frames drawn from these (e.g. ``[2, 3, 4, 5]``), the
    unknown cells at random frames inside it, the fill at their positions
    (:class:`~ctgridit.training.datasets.GridSampleDataset`): one model for every interpolation factor
    (``ctgridit interpolate --factor g``); null: the cells between the first and last, factor ``R*C - 1``.
    ``task_strides``: the strides each task is trained at, e.g.
    ``{unconditional: [9], extension: [9], interpolation: [1, 3]}`` (the sampler's
    own: it extends at the coarsest stride and interpolates at the finer ones);
    a task left out takes every stride; null: every task at every stride.
    Both off: the paper's unconditional model, sampled by replacement.
    """

    masked: bool = False
    unconditional: float = 0.2
    extension: float = 0.4
    interpolation: float = 0.4
    control_rows: int | None = None
    chunk: int = 1
    fill: str = "zeros"                  # zeros | linear | flow: the unknown cells of the condition
    residual: bool = False               # the output is the filled condition plus the network's correction
    strides: bool = False
    stride_dropout: float = 0.1
    start_within: int | None = None      # grids with nothing known start within this many frames of a scan's start
    task_strides: dict[str, list[int]] | None = None   # the strides each task is trained at (null: all)
    gaps: list[int] | None = None        # interpolation at any of these factors (frames per gap); null: R*C - 1

    @property
    def tasks(self) -> TaskMix:
        return TaskMix(self.unconditional, self.extension, self.interpolation, self.control_rows, self.chunk)


@dataclass
class PerformanceConfig:
    """Speed switches for GPUs; each ``None`` means "on where it helps" (CUDA), off on a CPU.

    ``tf32``: TF32 matrix products (Ampere and later). ``fused_adamw``: the
    fused AdamW kernel. ``vae_bf16``: the VAE encodes in bfloat16. ``compile``:
    ``torch.compile`` the model (off by default: minutes of compilation first).
    ``gradient_checkpointing``: recompute activations in the backward pass
    (less memory, about 30 % more time; off by default).
    """

    tf32: bool | None = None
    fused_adamw: bool | None = None
    vae_bf16: bool | None = None
    compile: bool = False
    gradient_checkpointing: bool = False


@dataclass
class StageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: dict[str, Any] = field(default_factory=dict)      # overrides of the shared optim section
    init: str | None = None      # warm start: a checkpoint folder (its EMA weights) or an exported stage folder
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)   # stage 1 only
    timesteps: list[int] | None = None   # train on these diffusion steps only, [low, high] (e.g. a denoiser)


@dataclass
class DiffusionConfig:
    """What both stages' models predict and how the loss weighs the noise levels (ctgridit.core.diffusion).

    ``prediction: epsilon`` is the paper's noise prediction; ``sample`` predicts the clean frames, which a
    pixel-space DiT with large patches learns much better (docs/METHOD.md section 3). ``min_snr``: Min-SNR
    loss weights (null: every level alike)."""

    prediction: str = "epsilon"
    min_snr: float | None = None


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every: int = 500
    keep_last: int = 3


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = False


@dataclass
class TrainConfig:
    name: str = "gridit"
    output: str = "model"
    frame_size: list[int] = field(default_factory=lambda: [256, 256])
    grid: dict[str, int] = field(default_factory=lambda: {"rows": 2, "cols": 2, "stride": 1, "factor": 2})
    data: DataConfig = field(default_factory=DataConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    sampling: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)   # extra metadata stored in the model folder
    source: str | None = None                               # the file this config was read from

    # ------------------------------------------------------------ derived
    @property
    def grid_spec(self) -> GridSpec:
        return GridSpec(**self.grid)

    @property
    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig.from_dict(self.sampling, self.grid_spec)

    @property
    def strides(self) -> list[int]:
        """The z/time strides of the training grids (``data.strides``, ``data.stride_range`` or ``grid.stride``)."""
        if self.data.strides:
            return sorted(set(int(s) for s in self.data.strides))
        low, high = self.data.stride_range or (self.grid_spec.stride, self.grid_spec.stride)
        return list(range(int(low), int(high) + 1))

    @property
    def jitter(self) -> InPlaneJitter | None:
        """The stage-1 augmentation of ``data.jitter`` (None: none)."""
        if self.data.jitter is None:
            return None
        try:
            return InPlaneJitter(**self.data.jitter)
        except TypeError as err:
            raise ValueError(f"data.jitter takes scale and shift ({err})") from err

    @property
    def max_stride_label(self) -> int:
        """The largest stride label stage 1 takes (0: no stride labels)."""
        return max(self.strides) if self.stage1.conditioning.strides else 0

    def stage(self, stage: int) -> StageConfig:
        if stage not in STAGES:
            raise CTGridItError(f"stage must be 1 or 2, got {stage}")
        return self.stage1 if stage == 1 else self.stage2

    def stage_optim(self, stage: int) -> OptimConfig:
        """The shared optim section with the stage's overrides applied."""
        overrides = self.stage(stage).optim
        unknown = set(overrides) - {f.name for f in dataclasses.fields(OptimConfig)}
        if unknown:
            raise CTGridItError(f"unknown key(s) {sorted(unknown)} in stage{stage}.optim", self.source)
        return dataclasses.replace(self.optim, **overrides)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def validate(self) -> "TrainConfig":
        get_adapter(self.data.kind, self.source).check_data(self)      # an unknown kind is one clear error
        if self.codec.kind not in CODEC_KINDS:
            raise CTGridItError(f"codec.kind must be one of {CODEC_KINDS}, got {self.codec.kind!r}", self.source)
        if self.diffusion.prediction not in PREDICTIONS:
            raise CTGridItError(f"diffusion.prediction must be one of {PREDICTIONS}, "
                                f"got {self.diffusion.prediction!r}", self.source)
        if self.diffusion.min_snr is not None and not self.diffusion.min_snr > 0:
            raise CTGridItError(f"diffusion.min_snr must be positive or null, got {self.diffusion.min_snr}",
                                self.source)
        if self.codec.kind == "vae" and not self.codec.path:
            raise CTGridItError("codec.kind is vae but codec.path is empty", self.source,
                                "give the local folder of an AutoencoderKL (e.g. the SD VAE)")
        if len(self.frame_size) != 2 or min(self.frame_size) < 1:
            raise CTGridItError(f"frame_size must be [H, W], got {self.frame_size}", self.source)
        self._validate_ranges()
        if self.logging.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError as err:
                raise CTGridItError("logging.tensorboard is on but the tensorboard package is not installed",
                                    self.source, "pip install tensorboard, or set logging.tensorboard: false") from err
        try:
            spec = self.grid_spec
            sampling = SamplingConfig.from_dict(self.sampling, spec)
        except (TypeError, ValueError) as err:
            raise CTGridItError(f"bad grid or sampling section ({err})", self.source) from err
        self._validate_conditioning(spec, sampling)
        for stage in STAGES:
            optim = self.stage_optim(stage)
            if optim.mixed_precision not in PRECISIONS:
                raise CTGridItError(f"optim.mixed_precision must be one of {PRECISIONS}", self.source)
            if min(optim.steps, optim.batch_size, optim.grad_accum) < 1:
                raise CTGridItError("optim.steps, batch_size and grad_accum must be >= 1", self.source)
        return self

    def _validate_ranges(self) -> None:
        """Values that have the right type but cannot work: every number in its range, before any work."""
        def refuse(problem: str) -> None:
            raise CTGridItError(problem, self.source)

        data = self.data
        if data.every < 1 or data.num_workers < 0:
            refuse("data.every must be >= 1 and data.num_workers >= 0")
        if self.checkpoint.every < 1 or self.checkpoint.keep_last < 1 or self.logging.every < 1:
            refuse("checkpoint.every, checkpoint.keep_last and logging.every must be >= 1")
        for stage in STAGES:
            optim = self.stage_optim(stage)
            numbers = dataclasses.asdict(optim)
            for key in ("steps", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "max_grad_norm",
                        "ema_decay", "seed"):
                problem = _type_problem(numbers[key], int if key in ("steps", "batch_size", "grad_accum",
                                                                       "warmup_steps", "seed") else float)
                if problem:
                    refuse(f"stage{stage} optim.{key} {problem}, got {numbers[key]!r}")
            if not (optim.lr > 0 and 0 <= optim.ema_decay < 1 and optim.weight_decay >= 0 and optim.warmup_steps >= 0
                    and optim.max_grad_norm >= 0 and len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas)):
                refuse(f"stage{stage} optim: lr must be > 0, ema_decay and betas in [0, 1), weight_decay, "
                       "warmup_steps and max_grad_norm >= 0")
            if optim.schedule not in LR_SCHEDULES:
                refuse(f"stage{stage} optim.schedule must be one of {', '.join(LR_SCHEDULES)}, got {optim.schedule!r}")
            if optim.schedule != "constant" and optim.warmup_steps >= optim.steps:
                refuse(f"stage{stage} optim: a {optim.schedule} schedule needs warmup_steps below steps "
                       f"({optim.warmup_steps} >= {optim.steps})")

    def _validate_conditioning(self, spec: GridSpec, sampling: SamplingConfig) -> None:
        """Stage 1's conditioning and strides against the grid and the sampling settings."""
        cond, s1 = self.stage1.conditioning, sampling.stage1
        try:
            self._check_strides()
            if cond.masked:
                cond.tasks.check(spec.rows, spec.cols)
                needed = [("unconditional", cond.unconditional), ("extension", cond.extension)]
                if s1.levels:
                    needed.append(("interpolation", cond.interpolation))
                missing = [name for name, weight in needed if weight <= 0]
                if missing:
                    raise ValueError(f"sampling needs the {' and '.join(missing)} task(s), trained with probability 0")
                if s1.repaint_times > 1:
                    raise ValueError("RePaint resampling is for replacement inpainting, not a masked-conditional model")
            if cond.fill not in FILLS:
                raise ValueError(f"fill must be one of {FILLS}, got {cond.fill!r}")
            if cond.fill != "zeros" and not cond.masked:
                raise ValueError(f"fill {cond.fill!r} fills the unknown cells of the masked condition: "
                                 "it needs masked: true")
            if cond.residual and (cond.fill == "zeros" or self.diffusion.prediction != "sample"):
                raise ValueError("residual adds the filled cells to a clean-sample prediction: it needs fill: linear "
                                 "or flow and diffusion.prediction: sample")
            if not 0.0 <= cond.stride_dropout < 1.0:
                raise ValueError(f"stride_dropout must be in [0, 1), got {cond.stride_dropout}")
            if cond.start_within is not None and cond.start_within < 1:
                raise ValueError(f"start_within must be >= 1, got {cond.start_within}")
            if cond.gaps is not None and (not cond.masked or cond.interpolation <= 0 or cond.chunk != 1
                                          or not cond.gaps or min(cond.gaps) < 2):
                raise ValueError(f"gaps {cond.gaps} need masked: true, an interpolation task with chunk 1 and "
                                 "gaps of at least 2 frames")
            self.jitter
            labels = s1.stride_labels(spec.cells, self.max_stride_label)
            self._check_task_strides(labels)
            if cond.strides:
                untrained = sorted({label for label in labels if label} - set(self.strides))
                if untrained:
                    raise ValueError(f"sampling uses strides {untrained}, which the training strides "
                                     f"{self.strides} do not include")
                if 0 in labels and cond.stride_dropout <= 0:
                    raise ValueError("sampling gives some grids no stride (chunk > 1), which needs stride_dropout > 0")
        except ValueError as err:
            raise CTGridItError(f"bad stage1.conditioning, data strides or sampling section ({err})",
                                self.source) from err
        if cond.masked and s1.levels and s1.k != cond.chunk:
            raise CTGridItError(f"sampling.stage1.chunk is {s1.k} but stage 1 is trained to interpolate "
                                f"with chunk {cond.chunk}", self.source, "make them equal")
        trained_m = spec.rows - 1 if cond.control_rows is None else cond.control_rows
        sampled_m = spec.rows - 1 if s1.control_rows is None else s1.control_rows
        if cond.masked and trained_m != sampled_m:
            raise CTGridItError(f"sampling.stage1.control_rows is {sampled_m} but stage 1 is trained to extend "
                                f"with control_rows {trained_m}", self.source, "make them equal")
        if self.stage2.conditioning != ConditioningConfig():
            raise CTGridItError("stage2.conditioning is for stage 1 only", self.source, "remove it")
        for stage in STAGES:
            steps = self.stage(stage).timesteps
            if steps is not None and not (isinstance(steps, list) and len(steps) == 2
                                          and all(type(v) is int for v in steps) and 0 <= steps[0] <= steps[1] < 1000):
                raise CTGridItError(f"stage{stage}.timesteps must be [low, high] within 0..999, got {steps}",
                                    self.source)
        if self.data.tile is not None and (type(self.data.tile) is not int or list(self.frame_size) != [self.data.tile] * 2):
            raise CTGridItError(f"data.tile {self.data.tile} must be an integer equal to both sides of frame_size "
                                f"{self.frame_size}", self.source, "frames are the tiles")

    def _check_task_strides(self, labels: list[int | None]) -> None:
        """``stage1.conditioning.task_strides``: known tasks, training strides, and the strides sampling asks of
        each task (``labels``: step 1's, then each interpolation level's)."""
        given = self.stage1.conditioning.task_strides
        if given is None:
            return
        if not self.stage1.conditioning.masked:
            raise ValueError("task_strides gives the strides of the masked-conditional tasks: it needs masked: true")
        unknown = set(given) - set(TASKS)
        if unknown:
            raise ValueError(f"task_strides names unknown task(s) {sorted(unknown)}; tasks are {list(TASKS)}")
        for task, strides in given.items():
            if not (isinstance(strides, list) and strides and all(type(v) is int for v in strides)):
                raise ValueError(f"task_strides.{task} must be a list of strides, got {strides!r}")
            if set(strides) - set(self.strides):
                raise ValueError(f"task_strides.{task} has strides {sorted(set(strides) - set(self.strides))} "
                                 f"that are not training strides {self.strides}")
        if not self.stage1.conditioning.strides:
            return
        asked = {"unconditional": labels[:1], "extension": labels[:1], "interpolation": labels[1:]}
        for task, needed in asked.items():
            missing = sorted({label for label in needed if label} - set(given.get(task, self.strides)))
            if missing:
                raise ValueError(f"sampling asks the {task} task for strides {missing}, which task_strides.{task} "
                                 f"{given[task]} leaves out")

    def _check_strides(self) -> None:
        """``data.strides`` or ``data.stride_range``: positive integers, a range in order, not both."""
        data = self.data
        if data.stride_range is not None and data.strides is not None:
            raise ValueError("give data.strides or data.stride_range, not both")
        if data.stride_range is not None:
            r = data.stride_range
            if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) and 1 <= r[0] <= r[1]):
                raise ValueError(f"data.stride_range must be [low, high], integers with 1 <= low <= high, got {r}")
        if data.strides is not None and not (isinstance(data.strides, list) and data.strides
                                             and all(type(v) is int and v >= 1 for v in data.strides)):
            raise ValueError(f"data.strides must be a list of positive integers, got {data.strides}")


def _build(cls, data: Any, where: str, source: str | None):
    """A dataclass from a mapping, refusing unknown keys and recursing into dataclass fields."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise CTGridItError(f"section {where or 'top level'} must be a mapping", source)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields) - {"source"}
    if unknown:
        raise CTGridItError(f"unknown key(s) {sorted(unknown)} in {where or 'the top level'}", source,
                            f"allowed: {', '.join(n for n in fields if n != 'source')}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}".strip(".")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key, source)
        else:
            problem = _type_problem(value, hint)
            if problem:
                raise CTGridItError(f"{key} {problem}, got {value!r}"[:300], source)
            values[name] = value
    return cls(**values)


def _type_problem(value: Any, hint) -> str | None:
    """Why ``value`` does not fit the type ``hint`` (None if it does): the field types of the config sections."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be text"
    if origin is list:
        if not isinstance(value, list):
            return "must be a list"
        for item in value:
            problem = _type_problem(item, args[0]) if args else None
            if problem:
                return f"must be a list whose items {problem.removeprefix('must be ')}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else "must be a mapping"
    return None


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and check a training config; relative paths become relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise CTGridItError("no such config file", path, "give a YAML file such as pipelines/configs/ct_small.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as err:
        raise CTGridItError(f"not a valid YAML text file ({' '.join(str(err).split())[:200]})", path,
                            "give a training config such as pipelines/configs/ct_small.yaml") from err
    if not raw:
        raise CTGridItError("the config is empty", path, "start from one in pipelines/configs/")
    config = config_from_dict(raw, str(path))
    _resolve_paths(config, path.parent)
    return config.validate()


def config_from_dict(data: dict, source: str | None = None) -> TrainConfig:
    """A training config from a mapping (a YAML file's, or the one a checkpoint stores): unknown keys refused,
    missing ones at their defaults; not validated."""
    config = _build(TrainConfig, data, "", source)
    config.source = source
    return config


def _resolve_paths(config: TrainConfig, base: Path) -> None:
    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        p = Path(os.path.expanduser(expand_data(value)))
        return str(p if p.is_absolute() else (base / p).resolve())

    config.output = resolve(config.output)
    config.checkpoint.dir = resolve(config.checkpoint.dir)
    config.data.paths = [resolve(p) for p in config.data.paths]
    config.data.ctrate_root = resolve(config.data.ctrate_root)
    config.data.ctrate_csv = resolve(config.data.ctrate_csv)
    config.data.cache = resolve(config.data.cache)
    for stage in (config.stage1, config.stage2):
        stage.init = resolve(stage.init)
    if config.codec.kind == "vae" and config.codec.path and (base / config.codec.path).exists():
        config.codec.path = resolve(config.codec.path)
