"""The trainer of both GriDiT stages, on one CPU, one GPU or many (DDP through accelerate).

One loop serves stage 1 (grids, unconditional) and stage 2 (frames, conditioned
on their degraded version): the DDPM epsilon objective, AdamW, linear warm-up
then a constant learning rate, gradient accumulation and clipping, an EMA of the
weights, and mixed precision (bf16/fp16 where available) as in DiT and the
paper. Launch it the same way everywhere::

    ctgridit train stage1 --config cfg.yaml                     # one process
    torchrun --nproc_per_node 4 -m ctgridit train stage1 --config cfg.yaml
    accelerate launch -m ctgridit train stage1 --config cfg.yaml

Determinism and exact resume: every training sample is a pure function of
``(seed, index)`` (:mod:`ctgridit.training.datasets`), and the batch of optimizer
step ``s`` is fixed: micro-step ``a`` of process ``r`` takes the indices
``((s * A + a) * W + r) * B + j`` for ``j < B`` (``A`` accumulation steps,
``W`` processes, ``B`` per-process batch), so the global batch is split between
processes without overlap. The diffusion noise and timesteps of that
micro-batch come from a generator seeded the same way. Resuming from a
checkpoint therefore replays exactly the steps an uninterrupted run would make.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from ctgridit.adapters import get_adapter
from ctgridit.core.codecs import LatentCodec, PixelCodec, VAECodec
from ctgridit.core.conditioning import condition_channels, masked_condition
from ctgridit.core.diffusion import diffusion_loss, make_train_scheduler, sampling_scheduler
from ctgridit.core.dit import GridDiT, create_dit
from ctgridit.core.grid import cell_mask
from ctgridit.core.loading import INDEX_FILE, load_stage, quiet_diffusers
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.settings import SCHEDULER_LAYOUT, PipelineSettings
from ctgridit.errors import CTGridItError, CTGridItWarning, shorten
from ctgridit.files import atomic_folder, atomic_output
from ctgridit.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ctgridit.training.config import TrainConfig, config_from_dict
from ctgridit.training.datasets import GridSampleDataset, SRPairDataset, sample_seed
from ctgridit.training.metrics import MetricsLog


# ------------------------------------------------------------------ building
def build_codec(config: TrainConfig) -> LatentCodec:
    codec = config.codec
    if codec.kind == "pixel":
        return PixelCodec(codec.channels, codec.chunk_size)
    if not codec.download and not Path(codec.path).is_dir():
        raise CTGridItError("no such VAE folder (ctgridit reads models from local folders)", codec.path,
                            "give the local folder of a diffusers AutoencoderKL, or set codec.download: true for a hub id")
    try:
        with quiet_diffusers():
            return VAECodec.from_autoencoder(codec.path, subfolder=codec.subfolder, chunk_size=codec.chunk_size,
                                             local_files_only=not codec.download)
    except Exception as err:  # a folder that is not a VAE: diffusers raises many kinds
        raise CTGridItError(f"cannot load the VAE ({shorten(str(err), 200)})", codec.path,
                            "give the local folder of a diffusers AutoencoderKL") from err


def data_settings(config: TrainConfig) -> dict:
    """The data settings that decide the prepared frames (recorded in, and checked against, a cache)."""
    data = config.data
    return {"kind": data.kind, "paths": list(data.paths), "ctrate_root": data.ctrate_root,
            "ctrate_csv": data.ctrate_csv, "spacing": data.spacing, "window": data.window and list(data.window),
            "hold_out": sorted(data.hold_out), "in_plane": None if data.tile else list(config.frame_size),
            "every": data.every}


def source_sequences(config: TrainConfig):
    """The configured data as a lazy loader with ``name(i)`` and ``load(i)`` (what ``prepare`` caches), from the
    data kind's adapter (:meth:`~ctgridit.adapters.Adapter.prepare_sequences`)."""
    return get_adapter(config.data.kind, config.source).prepare_sequences(config)


def prepare(config: TrainConfig, workers: int = 1, quiet: bool = False):
    """``ctgridit prepare``: write the configured data into the cache folder ``data.cache`` (resumable)."""
    from ctgridit.training.cache import prepare_cache

    if not config.data.cache:
        raise CTGridItError("the config names no cache folder (data.cache)", config.source,
                            "add data.cache: a folder with room for the prepared frames")
    sequences = source_sequences(config)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sequences), desc="prepare", unit="volume", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    def failure(name: str, reason: str) -> None:
        warnings.warn(f"skipped {name}: {reason}", CTGridItWarning)

    try:
        return prepare_cache(sequences, config.data.cache, data_settings(config), workers, progress, failure)
    finally:
        if bar is not None:
            bar.close()


def build_sequences(config: TrainConfig):
    """The training sequences ``(N, C, H, W)`` in [-1, 1] of the configured data (a list or a lazy loader): the
    prepared cache where the config names one, else the data kind's adapter reads them."""
    if config.data.cache:
        from ctgridit.training.cache import CachedSequences

        return CachedSequences(config.data.cache, data_settings(config))
    return get_adapter(config.data.kind, config.source).training_sequences(config)


def build_dataset(config: TrainConfig, stage: int, sequences, channels: int, seed: int):
    spec = config.grid_spec
    if stage == 1:
        cond = config.stage1.conditioning
        return GridSampleDataset(sequences, spec, strides=config.strides, seed=seed, channels=channels,
                                 sequence_strides=sequence_strides(config, sequences),
                                 tasks=cond.tasks if cond.masked else None,
                                 stride_dropout=cond.stride_dropout if cond.strides else None,
                                 start_within=cond.start_within, jitter=config.jitter, crop=config.data.tile,
                                 task_strides=cond.task_strides if cond.masked else None,
                                 gaps=cond.gaps if cond.masked else None)
    return SRPairDataset(sequences, spec.factor, seed=seed, channels=channels)


def sequence_strides(config: TrainConfig, sequences) -> list[list[int]] | None:
    """With ``data.strides_from_thickness``: for each sequence the strides whose step (``stride x`` the
    configured z spacing) is at least the sequence's own slice spacing; None (all strides) otherwise."""
    if not config.data.strides_from_thickness:
        return None
    own = getattr(sequences, "slice_spacings", None)
    if own is None or not config.data.spacing:
        raise CTGridItError("data.strides_from_thickness needs CT data resampled to data.spacing", config.source)
    step = float(config.data.spacing[2])
    return [[s for s in config.strides if s * step >= thickness - 1e-3] for thickness in own]


def build_model(config: TrainConfig, stage: int, codec: LatentCodec) -> GridDiT:
    spec, model = config.grid_spec, config.stage(stage).model
    if stage == 1:
        lh, lw = codec.latent_size(*spec.frame_size(*config.frame_size))
        masked, fill = config.stage1.conditioning.masked, config.stage1.conditioning.fill
        shape = dict(sample_height=spec.rows * lh, sample_width=spec.cols * lw, grid_rows=spec.rows,
                     grid_cols=spec.cols, cond_channels=condition_channels(codec.latent_channels, fill) if masked else 0,
                     num_strides=config.max_stride_label,
                     **({"cond_fill": fill, "fill_residual": config.stage1.conditioning.residual} if masked else {}))
    else:
        lh, lw = codec.latent_size(*config.frame_size)
        shape = dict(sample_height=lh, sample_width=lw, grid_rows=1, grid_cols=1,
                     cond_channels=codec.latent_channels)
    try:
        return create_dit(model.preset, in_channels=codec.latent_channels, pos_embed=model.pos_embed,
                          **shape, **model.overrides)
    except (TypeError, ValueError) as err:
        raise CTGridItError(f"bad stage{stage}.model section ({err})", config.source) from err


def pipeline_settings(config: TrainConfig, codec: LatentCodec) -> PipelineSettings:
    """What the model folder records besides its modules: grid, frame size, sampling, and what the data kind's
    adapter records about the data (:meth:`~ctgridit.adapters.Adapter.model_settings`; the config's ``adapter``
    section added over it)."""
    adapter = get_adapter(config.data.kind, config.source).model_settings(config)
    adapter.update(config.adapter)
    trained = {f"stage{s}": list(config.stage(s).timesteps) for s in (1, 2) if config.stage(s).timesteps}
    sampling = config.sampling_config
    cond = config.stage1.conditioning
    if cond.masked and cond.gaps:                                       # the factors the slice model fills
        sampling = dataclasses.replace(sampling, stage1=dataclasses.replace(sampling.stage1, gaps=sorted(cond.gaps)))
    return PipelineSettings(config.grid_spec, tuple(config.frame_size), codec.image_channels,
                            sampling, adapter, SCHEDULER_LAYOUT, trained)


# ------------------------------------------------------------------- batches
class StepBatches:
    """Index lists of one process for optimizer steps ``start .. stop - 1`` (see the module docstring)."""

    def __init__(self, start: int, stop: int, accum: int, world: int, rank: int, batch: int):
        self.start, self.stop, self.accum, self.world, self.rank, self.batch = start, stop, accum, world, rank, batch

    def indices(self, step: int, micro: int) -> list[int]:
        first = ((step * self.accum + micro) * self.world + self.rank) * self.batch
        return list(range(first, first + self.batch))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            for micro in range(self.accum):
                yield self.indices(step, micro)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def collate(items: list[dict]) -> dict:
    batch = {"x": torch.stack([it["x"] for it in items]), "index": [it["index"] for it in items],
             "id": [it["id"] for it in items]}
    for key in ("cond", "known", "positions"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    if "stride_label" in items[0]:
        batch["stride_label"] = torch.tensor([it["stride_label"] for it in items])
    return batch


def model_inputs(batch: dict, codec: LatentCodec, spec, device: torch.device, fill: str = "zeros") -> dict:
    """The clean latents of a batch and what goes with them into :func:`diffusion_loss`.

    Stage 2: the degraded frame's latent as ``cond``. Stage 1 with masked
    conditioning: the known cells' latents and the mask as ``cond``
    (:func:`~ctgridit.core.conditioning.masked_condition`, the unknown cells filled with ``fill``) and the loss on the
    other cells; with stride labels, the labels.
    """
    x = codec.encode(batch["x"].to(device))
    inputs: dict = {"clean": x}
    if "cond" in batch:
        inputs["cond"] = codec.encode(batch["cond"].to(device))
    if "known" in batch:
        mask = cell_mask(batch["known"], spec.rows, spec.cols, x.shape[-2] // spec.rows,
                         x.shape[-1] // spec.cols).to(device=device, dtype=x.dtype)      # (B, 1, H, W)
        positions = batch["positions"].to(device) if "positions" in batch else None
        inputs.update(cond=masked_condition(x, mask, fill, spec.rows, spec.cols, positions), weight=1 - mask)
    if "stride_label" in batch:
        inputs["stride"] = batch["stride_label"].to(device)
    return inputs


def weights_digest(model: torch.nn.Module) -> str:
    """A SHA-256 of all parameters, to compare the weights of processes."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------- trainer
@dataclasses.dataclass
class TrainResult:
    stage: int
    steps: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    output: str


def train(config: TrainConfig, stage: int, resume: bool = False, steps: int | None = None,
          device: str = "auto", quiet: bool = False, audit_dir: str | None = None, force: bool = False) -> TrainResult:
    """Train ``stage`` (1 or 2) of ``config``; write checkpoints and export the model folder.

    ``steps`` overrides the config's total number of optimizer steps: the run
    stops there (a decaying learning rate still reaches 0 at the config's
    ``optim.steps``, so a run paused early and resumed is the same run).
    Resuming a run that is already at ``steps`` trains nothing and exports
    the model folder from that checkpoint; a newest checkpoint that cannot
    be read is skipped for the one before, with a warning. Starting again
    where a run left checkpoints needs ``force`` (they are deleted first, so
    old and new never mix). The output and checkpoint folders are checked
    to be writable before any work.
    ``audit_dir``: every process writes the sample ids it trained on and a
    digest of its final weights there (used by the multi-process test).
    """
    optim = config.stage_optim(stage)
    total = steps or optim.steps
    _check_prediction(config, stage)
    accelerator, ckpt_dir = _launch(config, stage, device, resume, force)
    world, rank = accelerator.num_processes, accelerator.process_index

    codec = build_codec(config).to(accelerator.device)
    scheduler = make_train_scheduler(clip_sample=config.codec.kind == "pixel",
                                     prediction_type=config.diffusion.prediction)
    dataset = build_dataset(config, stage, build_sequences(config), codec.image_channels, optim.seed)
    state = _TrainState.build(config, stage, accelerator, codec, ckpt_dir if resume else None)
    if state.start > total:
        raise CTGridItError(f"the checkpoint is at step {state.start}, beyond the requested {total} steps",
                            state.found, "ask for at least as many steps")
    if optim.schedule != "constant" and total > optim.steps:
        raise CTGridItError(f"{total} steps asked for, but the {optim.schedule} learning rate reaches 0 at the "
                            f"config's optim.steps = {optim.steps}", config.source,
                            "raise optim.steps in the config (the decay then ends there), or ask for fewer steps")

    batches = StepBatches(state.start, total, optim.grad_accum, world, rank, optim.batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=config.data.num_workers,
                        persistent_workers=config.data.num_workers > 0)
    audit: list = []
    log = None
    try:
        log = _StepLog(config, stage, state.start, total, optim.grad_accum * world * optim.batch_size,
                       accelerator.is_main_process, quiet)
        micro_batches = iter(loader)
        state.model.train()
        for step in range(state.start, total):
            loss = state.step(step, micro_batches, codec, scheduler, audit if audit_dir else None)
            done = step + 1
            log.add(done, accelerator.reduce(loss, "mean"), state.lr_schedule.get_last_lr()[0])
            if done % config.checkpoint.every == 0 or done == total:
                _checkpoint(accelerator, config, stage, done, state.model, state.ema, state.optimizer,
                            state.lr_schedule, state.names, ckpt_dir)
                log.plot()
    finally:                                      # also when stopped: the bar ends before the error line
        if log is not None:
            log.close()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(state.model)
    if accelerator.is_main_process:
        export_stage(config, stage, unwrapped, state.ema, codec, scheduler)
    if audit_dir:
        _write_audit(audit_dir, rank, world, audit, unwrapped)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(stage, total - state.start, log.first_loss, log.last_loss, log.elapsed(), config.output)


def _lr_schedule(optimizer, optim) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant (DiT's schedule), or diffusers' cosine or linear decay to 0 at the last step
    (a fine-tuning run that anneals a model trained at a constant rate)."""
    if optim.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0)
    from diffusers.optimization import get_scheduler
    return get_scheduler(optim.schedule, optimizer, num_warmup_steps=optim.warmup_steps,
                         num_training_steps=optim.steps)


@dataclasses.dataclass
class _TrainState:
    """What one optimizer step changes: the (prepared) model, optimizer, learning-rate schedule and EMA, with the
    step they start from (a restored checkpoint's, or 0) and what a step needs from the config."""

    config: TrainConfig
    stage: int
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    ema: object
    names: list[str]
    start: int = 0
    found: Path | None = None

    @classmethod
    def build(cls, config: TrainConfig, stage: int, accelerator, codec: LatentCodec,
              restore_from: Path | None) -> "_TrainState":
        """The stage's model (the same initial weights on every process, or a warm start), its optimizer and
        learning-rate schedule and EMA; restored from the newest checkpoint in ``restore_from``."""
        from diffusers.training_utils import EMAModel

        optim = config.stage_optim(stage)
        torch.manual_seed(optim.seed)
        model = build_model(config, stage, codec)
        optimizer = speed_up(config, stage, accelerator.device, model, codec)
        lr_schedule = _lr_schedule(optimizer, optim)
        if restore_from is None and config.stage(stage).init:
            warm_start(model, config.stage(stage).init)
        ema = EMAModel(model.parameters(), decay=optim.ema_decay)
        names = [n for n, _ in model.named_parameters()]
        start, found = (_restore(restore_from, model, optimizer, lr_schedule, ema, names, config, stage)
                        if restore_from is not None else (0, None))
        model, optimizer = accelerator.prepare(model, optimizer)
        if config.performance.compile:
            model = torch.compile(model)
        ema.to(accelerator.device)
        return cls(config, stage, accelerator, model, optimizer, lr_schedule, ema, names, start, found)

    def step(self, step: int, micro_batches, codec: LatentCodec, scheduler, audit: list | None) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches (gradients synchronised on the last); returns the
        step's loss, on the device. ``audit`` collects the sample ids of every micro-batch."""
        config, accelerator, model = self.config, self.accelerator, self.model
        optim = config.stage_optim(self.stage)
        world, rank = accelerator.num_processes, accelerator.process_index
        timesteps = tuple(config.stage(self.stage).timesteps) if config.stage(self.stage).timesteps else None
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(optim.grad_accum):
            batch = next(micro_batches)
            if audit is not None:
                audit.append([step, micro, batch["index"], [list(i) for i in batch["id"]]])
            inputs = model_inputs(batch, codec, config.grid_spec, accelerator.device,
                                  config.stage1.conditioning.fill if self.stage == 1 else "zeros")
            generator = torch.Generator(accelerator.device).manual_seed(
                sample_seed(optim.seed + 1, (step * optim.grad_accum + micro) * world + rank))
            sync = micro == optim.grad_accum - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                loss = diffusion_loss(model, scheduler, generator=generator, timesteps=timesteps,
                                      min_snr=config.diffusion.min_snr, **inputs) / optim.grad_accum
                accelerator.backward(loss)
            step_loss += loss.detach()
        if optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.ema.step(accelerator.unwrap_model(model).parameters())
        return step_loss


def _launch(config: TrainConfig, stage: int, device: str, resume: bool, force: bool):
    """Everything before the work: the device and folders checked, this process's Accelerator (one process per
    GPU, or one CPU DDP run), an old run's checkpoints deleted with ``force``, CPU threads shared out.
    Returns the Accelerator and the stage's checkpoint folder."""
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda"):
        raise CTGridItError(f"device must be auto, cpu or cuda for training, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CTGridItError("--device cuda: no CUDA GPU is visible", hint="use --device auto or cpu")
    ckpt_dir = Path(config.checkpoint.dir) / f"stage{stage}"
    _check_run_folders(config, ckpt_dir, resume, force)
    # without GPUs, "auto" is the CPU for every process: a torchrun of several processes is then one CPU DDP run
    # (accelerate would otherwise start as many unrelated single-process trainings writing the same checkpoints)
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=config.stage_optim(stage).mixed_precision, cpu=on_cpu)
    world = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise CTGridItError(f"{launched} processes were launched but training runs in {world}",
                            hint="launch with torchrun or accelerate launch, one process per GPU, or --device cpu")
    if force and not resume and accelerator.is_main_process and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)                                     # start over: no old checkpoint to mix in
    accelerator.wait_for_everyone()
    if accelerator.device.type == "cpu" and world > 1:
        # several CPU processes on one machine: share the cores instead of oversubscribing them
        # (OpenMP threads that outnumber the cores make every matrix product many times slower)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return accelerator, ckpt_dir


def _restore(ckpt_dir: Path, model, optimizer, lr_schedule, ema, names: list[str], config: TrainConfig,
             stage: int) -> tuple[int, Path]:
    """Load the newest readable checkpoint into the model, optimizer, schedule, EMA and torch's RNG (after checking
    it was trained for the same model, :func:`_check_same_model`): returns its step and folder."""
    found, (weights, ema_weights, state) = newest_readable_checkpoint(ckpt_dir)
    _check_same_model(found, config, stage)
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_scheduler"])
    ema.load_state_dict({**state["ema"], "shadow_params": [ema_weights[n] for n in names]})
    torch.set_rng_state(state["rng_torch"])
    return int(state["step"]), found


#: What defines a stage's network and what it predicts: a resumed run must keep them (loss weights, task
#: probabilities, learning rate, steps and data may change between runs).
SAME_ON_RESUME = ("frame_size", "grid", "codec", "diffusion.prediction", "stage{stage}.model", "optim.schedule",
                  "stage{stage}.optim.schedule",
                  "stage{stage}.conditioning.masked", "stage{stage}.conditioning.strides",
                  "stage{stage}.conditioning.fill", "stage{stage}.conditioning.residual")


def _check_same_model(found: Path, config: TrainConfig, stage: int) -> None:
    """Refuse to resume from checkpoint ``found`` if the config it stores differs from this run's in
    :data:`SAME_ON_RESUME` (read like a config file: settings an older checkpoint lacks are at their defaults)."""
    stored_file = found / "config.json"
    if not stored_file.is_file():
        return
    stored = config_from_dict(json.loads(stored_file.read_text()), str(stored_file))
    mine, theirs = _leaves(config.to_dict()), _leaves(stored.to_dict())
    for part in (p.format(stage=stage) for p in SAME_ON_RESUME):
        for name in sorted(n for n in mine.keys() | theirs.keys() if n == part or n.startswith(part + ".")):
            if mine.get(name) != theirs.get(name):
                raise CTGridItError(f"the checkpoint was trained with {name} = {theirs.get(name)!r}, this config "
                                    f"says {mine.get(name)!r}", found,
                                    "resume with the config it was trained with, or start over with --force")


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{dotted name: value}`` (tuples as lists; an empty mapping has no leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


class _StepLog:
    """The losses of the optimizer steps: kept on the device until a logging or checkpoint step (one host sync
    then), written to the metrics log and shown on the progress bar by the main process."""

    def __init__(self, config: TrainConfig, stage: int, start: int, total: int, samples_per_step: int,
                 main: bool, quiet: bool) -> None:
        self.config, self.stage, self.start, self.total = config, stage, start, total
        self.samples_per_step, self.main = samples_per_step, main
        self.metrics = MetricsLog(Path(config.checkpoint.dir) / f"stage{stage}", start,
                                  config.logging.tensorboard) if main else None
        self.first_loss = self.last_loss = None
        self.pending: list[tuple[int, torch.Tensor, float, float]] = []
        self.began = time.perf_counter()
        self.progress = None
        if main and not quiet:                    # last: a stop while the rest is made leaves no bar open
            from tqdm.auto import tqdm

            self.progress = tqdm(total=total, initial=start, desc=f"train stage {stage}", unit="step",
                                 dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def add(self, done: int, loss: torch.Tensor, lr: float) -> None:
        """Step ``done``'s loss (mean over processes, still on the device) and learning rate."""
        self.pending.append((done, loss, lr, self.elapsed()))
        config = self.config
        if done % config.logging.every == 0 or done == self.total or done % config.checkpoint.every == 0:
            self.flush()
        if self.progress is not None:
            self.progress.update(1)

    def flush(self) -> None:
        losses = torch.stack([loss for _, loss, _, _ in self.pending]).tolist()   # one host sync per logging step
        self.first_loss = losses[0] if self.first_loss is None else self.first_loss
        self.last_loss = losses[-1]
        if self.main:
            for (logged, _, lr, elapsed), loss in zip(self.pending, losses):
                rate = (logged - self.start) * self.samples_per_step / max(elapsed, 1e-9)
                self.metrics.log(logged, loss, lr, rate, elapsed)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{self.pending[-1][2]:.2e}")
        self.pending.clear()

    def plot(self) -> None:
        if self.main:
            self.metrics.plot(f"{self.config.name}: stage {self.stage}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.main:
            self.metrics.close()


def speed_up(config: TrainConfig, stage: int, device: torch.device, model: GridDiT,
             codec: LatentCodec) -> torch.optim.AdamW:
    """Apply the config's speed switches (:func:`performance`, gradient checkpointing) to the process, the model
    and the codec, and make the stage's optimizer (fused where switched on): what training and
    ``pipelines/bench_train.py`` both run."""
    fast = performance(config, device)
    if fast["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if fast["vae_bf16"] and isinstance(codec, VAECodec):
        codec.to(dtype=torch.bfloat16)
    if config.performance.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optim = config.stage_optim(stage)
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                             betas=tuple(optim.betas), **({"fused": True} if fast["fused_adamw"] else {}))


def performance(config: TrainConfig, device: torch.device) -> dict[str, bool]:
    """The speed switches in effect: the config's, with ``None`` meaning on for CUDA (see PerformanceConfig)."""
    cuda = device.type == "cuda"
    perf = config.performance
    return {name: (cuda if getattr(perf, name) is None else bool(getattr(perf, name)) and cuda)
            for name in ("tf32", "fused_adamw", "vae_bf16")}


def _check_prediction(config: TrainConfig, stage: int) -> None:
    """Both stages share the model folder's scheduler (it says what the models predict): refuse, before any
    work, a stage whose ``diffusion.prediction`` differs from the other stage already in the folder."""
    other = Path(config.output) / f"stage{3 - stage}"
    saved = Path(config.output) / "scheduler" / "scheduler_config.json"
    if not (other.is_dir() and saved.is_file()):
        return
    found = json.loads(saved.read_text()).get("prediction_type", "epsilon")
    if found != config.diffusion.prediction:
        raise CTGridItError(f"holds a stage {3 - stage} that predicts {found!r}; this config's diffusion.prediction "
                            f"is {config.diffusion.prediction!r}", config.output,
                            "train both stages with the same diffusion.prediction, or write to another output")


def _check_run_folders(config: TrainConfig, ckpt_dir: Path, resume: bool, force: bool) -> None:
    """Before any work: the folders a run writes are writable, and a new run does not silently land on an old one."""
    for folder in (Path(config.output), ckpt_dir):
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        if not existing.is_dir():
            raise CTGridItError("is a file, not a folder", existing, "fix output or checkpoint.dir in the config")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            raise CTGridItError(f"cannot be written ({err.strerror})", existing,
                                "fix output or checkpoint.dir in the config, or its permissions") from err
    if not resume and not force and list_checkpoints(ckpt_dir):
        raise CTGridItError("holds the checkpoints of an earlier run", ckpt_dir,
                            "pass --resume to continue it, or --force to start over (they are deleted)")


def newest_readable_checkpoint(folder: Path):
    """``(path, (weights, EMA weights, state))`` of the newest checkpoint that loads; warn for any skipped."""
    found = list_checkpoints(folder)
    if not found:
        raise CTGridItError("no checkpoint to resume from", folder, "train without --resume first")
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CTGridItError as err:
            warnings.warn(f"skipped a damaged checkpoint ({err.one_line()}); trying the one before", CTGridItWarning)
    raise CTGridItError(f"none of the {len(found)} checkpoints can be read", folder,
                        "train again without --resume (with --force)")


def warm_start(model: GridDiT, source: str | os.PathLike) -> None:
    """Load the weights of ``source`` into ``model`` before training (fine-tuning a trained stage).

    ``source`` is a checkpoint folder (its EMA weights are taken) or an exported
    stage folder (``diffusion_pytorch_model.safetensors``); its weights must be
    those of the same architecture, name for name and shape for shape, except
    that a model with stride labels may start from one without them (trained at
    one stride): its stride embedding then starts at zero, so it begins as
    exactly that model for every label and learns the strides from there; and
    a deeper model may start from a shallower one: its first blocks take the
    source's, the others start as the identity (adaLN-Zero), which holds for a
    freshly built ``model`` (its new blocks still at their zero-initialised
    gates), so it begins as exactly the source and learns with more capacity
    from there; and a ``flow_pair`` model may start from a ``flow`` model
    (:func:`_paired`). Or
    ImageNet DiT weights, DiT's own ``.pt`` or a diffusers DiT folder
    (:mod:`ctgridit.core.dit_import`), for either stage.
    """
    from safetensors.torch import load_file

    from ctgridit.core.dit_import import is_dit_source, load_dit_weights

    if is_dit_source(source):
        try:
            load_dit_weights(model, source)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CTGridItError(f"cannot start from these DiT weights ({shorten(str(err), 240)})", source,
                                "give DiT weights of the model's size and patch") from err
        return
    folder = Path(source)
    files = [folder / "ema.safetensors", folder / "diffusion_pytorch_model.safetensors"]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        raise CTGridItError("no weights to start from (neither ema.safetensors nor "
                            "diffusion_pytorch_model.safetensors)", folder, "fix the stage's init path")
    try:
        weights = load_file(str(found))
    except (OSError, RuntimeError, ValueError) as err:
        raise CTGridItError(f"cannot read the weights ({' '.join(str(err).split())[:200]})", found) from err
    own = model.state_dict()
    weights.update(_paired(weights, own, model))
    grown = {STRIDE_EMBEDDING} - set(weights) if STRIDE_EMBEDDING in own else set()
    weights.update({name: torch.zeros_like(own[name]) for name in grown})
    weights.update({name: own[name] for name in _added_blocks(weights, own)})
    extra, missing = sorted(set(weights) - set(own)), sorted(set(own) - set(weights))
    wrong = sorted(k for k in set(weights) & set(own) if weights[k].shape != own[k].shape)
    if extra or missing or wrong:
        raise CTGridItError(f"the weights do not fit this model (unknown: {extra[:3]}, missing: {missing[:3]}, "
                            f"other shape: {wrong[:3]})", found, "start from a model of the same architecture")
    model.load_state_dict(weights)


def _paired(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor], model: GridDiT) -> dict[str, torch.Tensor]:
    """A ``flow`` model's input and output layers (``weights``) made to fit a ``flow_pair`` model (``own``): the
    patch embedding takes each of the two moved frames with half the fill's weights (the fill is their mix; at
    mid-gap exactly) and the weight channel with none; the last layer's correction keeps the source's weights and
    the displacements and weight change start at zero, so the model starts as its source's correction added to
    the flow fill. Nothing for other pairs of models."""
    config = model.config
    embed, last = "x_embedder.proj.weight", "final_layer.linear"
    if getattr(config, "cond_fill", "zeros") != "flow_pair" or embed not in weights:
        return {}
    c = config.in_channels
    if weights[embed].shape[1] != 2 * c + 1 or own[embed].shape[1] != 3 * c + 2:
        return {}
    source = weights[embed]
    grown = torch.zeros_like(own[embed])
    grown[:, :c], grown[:, c:2 * c], grown[:, 2 * c:3 * c] = source[:, :c], source[:, c:2 * c] / 2, source[:, c:2 * c] / 2
    grown[:, 3 * c + 1:] = source[:, 2 * c:]                                   # the mask
    out = {embed: grown}
    p, channels = config.patch_size, model.out_channels
    for name in (f"{last}.weight", f"{last}.bias"):
        rows = weights[name].reshape(p * p, c, *weights[name].shape[1:])
        wide = torch.zeros(p * p, channels, *rows.shape[2:], dtype=rows.dtype)
        wide[:, :c] = rows
        out[name] = wide.reshape(p * p * channels, *rows.shape[2:])
    return out


#: The stride labels' embedding of a GridDiT, which a warm start may add (:func:`warm_start`).
STRIDE_EMBEDDING = "stride_embedder.weight"


def _added_blocks(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """The parameter names of the transformer blocks ``own`` (a model's state) has beyond the last block of
    ``weights`` (a shallower model's), where it has more: a warm start keeps them as built, adaLN-Zero, so each
    new block starts as the identity and the deeper model starts as exactly the shallower one (growing a model
    in depth, as progressive stacking does, keeps what it learnt)."""
    def depth(state) -> int:
        return len({name.split(".")[1] for name in state if name.startswith("blocks.")})

    return [name for name in own if name.startswith("blocks.") and int(name.split(".")[1]) >= depth(weights)] \
        if depth(own) > depth(weights) > 0 else []


def _checkpoint(accelerator, config: TrainConfig, stage: int, step: int, model, ema, optimizer, lr_schedule,
                names: list[str], folder: Path) -> None:
    """Write a checkpoint; if that fails (a full disk...), say so and go on: the earlier checkpoints are kept."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ema_state = ema.state_dict()
        shadow = dict(zip(names, ema_state.pop("shadow_params")))
        state: dict[str, Any] = {"step": step, "stage": stage, "optimizer": optimizer.state_dict(),
                                 "lr_scheduler": lr_schedule.state_dict(), "ema": ema_state,
                                 "rng_torch": torch.get_rng_state(), "world_size": accelerator.num_processes}
        try:
            save_checkpoint(folder, step, accelerator.unwrap_model(model).state_dict(), shadow, state,
                            config.to_dict(), config.checkpoint.keep_last)
        except CTGridItError as err:
            warnings.warn(f"the checkpoint of step {step} was not written ({err.one_line()}); training goes on and "
                          "the earlier checkpoints are kept", CTGridItWarning)
    accelerator.wait_for_everyone()


def export_stage(config: TrainConfig, stage: int, model: GridDiT, ema, codec: LatentCodec, scheduler) -> Path:
    """Write ``stage{N}/`` (EMA weights), ``codec/`` and ``scheduler/`` into the model folder, each atomically
    (the other stage's folder and any other file are kept), then its ``model_index.json``.

    The index (diffusers' own, from the pipeline these parts make) is written
    when the folder has a stage 1 that fits with the rest; stage 2 trained first
    waits for stage 1's export. Where the stages do not fit, a warning says so
    and the folder has no index (it does not load) until the other stage is
    trained with this config.
    """
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    export = GridDiT.from_config(model.config)
    ema.copy_to(export.parameters())
    with atomic_folder(out / f"stage{stage}") as tmp:
        export.save_pretrained(str(tmp), safe_serialization=True)
    with atomic_folder(out / "codec") as tmp, quiet_diffusers():
        codec.save_pretrained(str(tmp), safe_serialization=True)
    sampler = sampling_scheduler(scheduler, config.sampling_config.stage1.sampler)   # what stage 1 samples with
    with atomic_folder(out / "scheduler") as tmp:
        sampler.save_pretrained(str(tmp))
    other = f"stage{3 - stage}"
    try:
        stages = {f"stage{stage}": export, **({other: load_stage(out / other)} if (out / other).is_dir() else {})}
        if "stage1" not in stages:
            return out
        pipeline = GriDiTPipeline(**stages, codec=codec, scheduler=sampler, settings=pipeline_settings(config, codec))
    except (CTGridItError, ValueError) as err:
        (out / INDEX_FILE).unlink(missing_ok=True)
        problem = err.one_line() if isinstance(err, CTGridItError) else str(err)
        warnings.warn(f"{out}: stage {stage} was written, but the folder's stages do not make a model ({problem}); "
                      f"train the other stage with this config", CTGridItWarning)
        return out
    with atomic_output(out / INDEX_FILE, force=True) as tmp:
        tmp.write_text(pipeline.to_json_string())
    return out


def checkpoint_pipeline(checkpoint: str | os.PathLike, stage2: str | os.PathLike | None = None) -> GriDiTPipeline:
    """A stage-1 checkpoint folder (``.../stage1/step_XXXXXXXX``) as a pipeline of its EMA weights: what a model
    folder exported at that step would sample, to look at a run while it trains; with ``stage2`` (a stage-2
    checkpoint folder of the same config) the whole model, e.g. from checkpoints trained elsewhere. A folder needs
    only ``config.json`` and ``ema.safetensors``."""
    config, stage1 = _checkpoint_model(checkpoint, 1)
    codec = build_codec(config)
    second = _checkpoint_model(stage2, 2)[1] if stage2 is not None else None
    scheduler = make_train_scheduler(clip_sample=config.codec.kind == "pixel",
                                     prediction_type=config.diffusion.prediction)
    return GriDiTPipeline(stage1=stage1, codec=codec, stage2=second,
                          scheduler=sampling_scheduler(scheduler, config.sampling_config.stage1.sampler),
                          settings=pipeline_settings(config, codec))


def _checkpoint_model(checkpoint: str | os.PathLike, stage: int) -> tuple[TrainConfig, torch.nn.Module]:
    """The config and the EMA model (float32, eval mode) of a stage-``stage`` checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(checkpoint)
    try:
        config = config_from_dict(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
        weights = load_file(str(folder / "ema.safetensors"))
    except (OSError, ValueError) as err:
        raise CTGridItError(f"not a readable stage-{stage} checkpoint ({shorten(str(err), 200)})", folder,
                            f"give a folder such as runs/NAME/checkpoints/stage{stage}/step_00001000") from err
    model = build_model(config, stage, build_codec(config))
    try:
        model.load_state_dict({k: v.float() for k, v in weights.items()})
    except RuntimeError as err:
        raise CTGridItError(f"the weights do not fit the checkpoint's stage-{stage} config ({shorten(str(err), 200)})",
                            folder, f"give a stage-{stage} checkpoint") from err
    return config, model.eval()


def _write_audit(folder: str, rank: int, world: int, samples: list, model: torch.nn.Module) -> None:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "samples": samples, "weights_sha256": weights_digest(model)}))


def loss_decrease(log_rows: list[dict], window: int = 20) -> tuple[float, float]:
    """Mean loss of the first and the last ``window`` logged steps."""
    losses = [float(r["loss"]) for r in log_rows]
    window = max(1, min(window, len(losses) // 2))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window

