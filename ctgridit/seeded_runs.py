"""Sampling sequences from a model folder, whatever its adapter: what ``synth`` shares between CT and video.

:func:`generate_iter` gives the frames of sequences ``indices`` of a run with a
seed, one sequence at a time; the CT task (:mod:`ctgridit.ct.synthesis`) turns
them into HU volumes, the video task (:mod:`ctgridit.video.synthesis`) into clips.
Sequence ``i`` comes from its own CPU generator (:func:`sample_seed`), so a run
split over processes writes the same files as one process, and the same seed
gives the same output on any device (up to floating-point differences).
It never imports an adapter.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.sampler import ProgressCallback
from ctgridit.errors import CTGridItError
from ctgridit.seeds import check_seed

#: Precisions ``--dtype`` offers.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_seed(seed: int, index: int) -> int:
    """The seed of sequence ``index`` of a run with ``seed``: ``seed`` itself for the first, a fixed
    mixing of both for the others. It depends on nothing else (not the batch, not the number of processes)."""
    return (check_seed(seed) + index * 2654435761) % 2**32


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise CTGridItError(f"unknown precision {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def generate_iter(pipeline: GriDiTPipeline, num_frames: int, indices: Iterable[int] = range(1), seed: int = 0,
                  steps: int | None = None, dtype: str = "fp32",
                  progress: ProgressCallback | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index, frames)`` for the sequences ``indices`` of a run with ``seed``: float32 ``(N, C, H, W)`` in
    [-1, 1], one at a time, as each is done. ``steps`` overrides stage 1's sampling steps."""
    check_seed(seed)
    wanted = check_dtype(dtype)
    if wanted != pipeline.dtype:
        pipeline.to(dtype=wanted)
    for index in indices:
        generator = torch.Generator().manual_seed(sample_seed(seed, index))
        frames = pipeline.generate(num_frames, batch_size=1, generator=generator, num_steps=steps, progress=progress)
        yield index, frames[0].float()
