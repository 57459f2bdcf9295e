"""The settings of a GriDiT model folder: grid, frame size, sampling defaults of both stages, adapter metadata.

They are ``settings`` in the folder's ``model_index.json`` (:class:`PipelineSettings`);
:class:`SamplingConfig` also reads the flat sampling keys of folders written before the
stage-1/stage-2 split (:data:`LEGACY_SAMPLING`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ctgridit.core.diffusion import NUM_TRAIN_TIMESTEPS, SAMPLERS
from ctgridit.core.grid import GridSpec
from ctgridit.core.sampler import level_strides, stride_labels

STAGE2_NOISE = ("independent", "shared", "smooth")
#: The folder layout from which ``scheduler/`` holds stage 1's sampler, not the training scheduler.
SCHEDULER_LAYOUT = 2
def _whole(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_types(data: dict) -> None:
    """The settings' values of the right kinds, said plainly (rather than a constructor's complaint)."""
    grid, size = data.get("grid"), data.get("frame_size")
    if not (isinstance(grid, dict) and set(grid) <= {"rows", "cols", "stride", "factor"}
            and all(_whole(v) for v in grid.values())):
        raise ValueError(f"settings.grid must hold rows, cols, stride and factor as positive integers, got {grid!r}")
    if not (isinstance(size, list) and len(size) == 2 and all(_whole(v) for v in size)):
        raise ValueError(f"settings.frame_size must be [height, width] in pixels, got {size!r}")
    if not _whole(data.get("channels", 3)):
        raise ValueError(f"settings.channels must be a positive integer, got {data.get('channels')!r}")
    for key, kind in (("sampling", dict), ("adapter", dict), ("timesteps", dict), ("layout", int)):
        if key in data and not isinstance(data[key], kind):
            raise ValueError(f"settings.{key} must be a{'n integer' if kind is int else ' JSON object'}, "
                             f"got {data[key]!r}")


#: The keys of a model folder's settings.
SETTINGS_KEYS = {"grid", "frame_size", "channels", "sampling", "adapter", "layout", "timesteps"}


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
    gaps: list[int] | None = None         # interpolation factors the model fills (None: cells - 1 only)

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
        if self.gaps is not None and (not self.gaps or min(self.gaps) < 2):
            raise ValueError(f"stage1: gaps must be interpolation factors of at least 2, got {self.gaps}")


@dataclass
class Stage2Sampling:
    """How stage 2 super-resolves every frame (:meth:`~ctgridit.core.pipeline.GriDiTPipeline.super_resolve`).

    ``noise`` is one of :data:`STAGE2_NOISE`: ``"independent"`` draws per frame
    (the paper's; the detail flickers from slice to slice), ``"shared"`` one draw
    per sequence (the same detail in every slice: streaks along z), ``"smooth"``
    noise that changes over about ``noise_length`` frames (:class:`~ctgridit.core.diffusion.SequenceNoise`;
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
    """Defaults for :meth:`~ctgridit.core.pipeline.GriDiTPipeline.generate`, one part per stage (the settings' ``sampling``)."""

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
    """What a model folder records besides its modules (``settings`` in ``model_index.json``).

    ``layout`` is the folder layout's version: from :data:`SCHEDULER_LAYOUT` on, the folder's ``scheduler/`` is the
    scheduler stage 1 samples with; folders written before hold the training scheduler there, and their sampler is
    the one ``sampling.stage1.sampler`` names (:meth:`~ctgridit.core.pipeline.GriDiTPipeline.from_pretrained`).
    """

    grid: GridSpec
    frame_size: tuple[int, int]           # full-resolution frame (H, W) in pixels
    channels: int = 3                     # image channels the codec sees
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    adapter: dict[str, Any] = field(default_factory=dict)   # e.g. CT spacing and HU window; opaque here
    layout: int = 1
    # the diffusion steps a stage was trained on, [low, high], where not all (a denoiser: its low levels only)
    timesteps: dict[str, list[int]] = field(default_factory=dict)

    @property
    def lr_frame_size(self) -> tuple[int, int]:
        return self.grid.frame_size(*self.frame_size)

    def to_dict(self) -> dict:
        return {"grid": self.grid.to_dict(), "frame_size": list(self.frame_size), "channels": self.channels,
                "sampling": self.sampling.to_dict(), "adapter": self.adapter, "layout": self.layout,
                "timesteps": self.timesteps}

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineSettings":
        """Read ``settings``; a key it does not know is a ValueError (a typo or a foreign folder, not ignored)."""
        if not isinstance(data, dict):
            raise ValueError("settings must be a JSON object")
        unknown = set(data) - SETTINGS_KEYS
        if unknown:
            raise ValueError(f"unknown settings key(s) {sorted(unknown)}")
        _check_types(data)
        grid = GridSpec(**data["grid"])
        return cls(grid, tuple(data["frame_size"]), int(data.get("channels", 3)),
                   SamplingConfig.from_dict(data.get("sampling", {}), grid), dict(data.get("adapter", {})),
                   int(data.get("layout", 1)), {k: list(v) for k, v in dict(data.get("timesteps", {})).items()})
