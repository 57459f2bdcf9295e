"""CT volume synthesis: the task behind ``ctgridit synth``.

:func:`synthesize` loads a model folder (the bundled one by default), runs the
grid autoregressive sampler and stage 2 (:class:`~ctgridit.core.pipeline.GriDiTPipeline`)
and turns the frames into HU volumes with the model's voxel spacing
(:mod:`ctgridit.ct.adapter`). All randomness comes from one CPU generator
seeded with ``seed``, so the same seed gives the same volumes on any device
(up to floating-point differences between devices).
"""

from __future__ import annotations

import os
from typing import Iterator

from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.sampler import ProgressCallback
from ctgridit.ct.adapter import CTAdapter, volume_spacing
from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItError
from ctgridit.limits import MAX_SLICES, MIN_SLICES
from ctgridit.model_folders import default_model_dir, open_model
from ctgridit.seeded_runs import check_dtype, generate_iter
from ctgridit.seeds import check_seed


def load_model(model: str | os.PathLike | None = None, device: str = "auto") -> GriDiTPipeline:
    """A CT synthesis model folder on ``device``; ``None`` means :func:`~ctgridit.model_folders.default_model_dir`."""
    pipeline = open_model(model, default_model_dir(), "synthesis", device, kind="ct")
    volume_spacing(pipeline.settings.adapter, model or default_model_dir())          # refused before any sampling
    return pipeline


def synthesize_iter(num_slices: int = 201, indices=range(1), seed: int = 0,
                    model: str | os.PathLike | GriDiTPipeline | None = None, steps: int | None = None,
                    device: str = "auto", dtype: str = "fp32",
                    progress: ProgressCallback | None = None) -> Iterator[tuple[int, CTVolume]]:
    """``(index, volume)`` for the volumes ``indices`` of a run with ``seed``, one at a time, as each is done.

    Volume ``i`` comes from its own generator (:func:`~ctgridit.seeded_runs.sample_seed`), so a run
    split over processes (each taking some indices) writes the same volumes
    as one process, and the same seed gives the same volumes.
    """
    if not MIN_SLICES <= num_slices <= MAX_SLICES:
        raise CTGridItError(f"need {MIN_SLICES} to {MAX_SLICES} slices, got {num_slices}")
    check_dtype(dtype)
    check_seed(seed)
    pipeline = model if isinstance(model, GriDiTPipeline) else load_model(model, device)
    adapter = CTAdapter()
    for index, frames in generate_iter(pipeline, num_slices, indices, seed, steps, dtype, progress):
        yield index, adapter.to_output(frames, pipeline.settings.adapter,
                                       source=f"ctgridit synth, seed {seed}, volume {index}")


def synthesize(num_slices: int = 201, num: int = 1, seed: int = 0, model: str | os.PathLike | GriDiTPipeline | None = None,
               steps: int | None = None, device: str = "auto",
               progress: ProgressCallback | None = None) -> list[CTVolume]:
    """Generate ``num`` CT volumes of ``num_slices`` axial slices (HU, model spacing): volumes ``0 .. num - 1``
    of :func:`synthesize_iter`."""
    if num < 1:
        raise CTGridItError(f"need at least one volume, got {num}")
    return [volume for _, volume in synthesize_iter(num_slices, range(num), seed, model, steps, device,
                                                    progress=progress)]
