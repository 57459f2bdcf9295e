"""Video synthesis: the task behind ``ctgridit synth --frames N`` for a model folder trained on videos.

:func:`synthesize_clips_iter` runs the same sampler as CT synthesis
(:func:`ctgridit.seeded_runs.generate_iter`) and :func:`save_clip` writes the
frames through the video adapter: ``.mp4``, ``.gif`` or a folder of PNG
frames, at the frame rate the model folder records (the training clips' own
rate, ``settings.adapter.fps`` in ``model_index.json``). :func:`save_contact_sheet` is the
picture of a clip (its frames side by side).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.sampler import ProgressCallback
from ctgridit.errors import CTGridItError
from ctgridit.files import atomic_output
from ctgridit.seeded_runs import check_dtype, generate_iter
from ctgridit.limits import MAX_FRAMES, MIN_FRAMES
from ctgridit.model_folders import BUNDLED_VIDEO_MODEL, open_model
from ctgridit.video.io import DEFAULT_FPS
from ctgridit.video.frames import VideoFiles, sequence_to_frames



def load_video_model(model: str | os.PathLike | None, device: str = "auto") -> GriDiTPipeline:
    """A video model folder on ``device``; ``None``: the bundled moving-squares model (``video_shapes``)."""
    return open_model(model, BUNDLED_VIDEO_MODEL, "video synthesis", device, kind="video")


def clip_frame_rate(pipeline: GriDiTPipeline) -> float:
    """Frames per second of the model's training clips (the video adapter's default if it records none)."""
    return float(pipeline.settings.adapter.get("fps", DEFAULT_FPS))


def synthesize_clips_iter(num_frames: int, indices=range(1), seed: int = 0,
                          model: str | os.PathLike | GriDiTPipeline | None = None, steps: int | None = None,
                          device: str = "auto", dtype: str = "fp32",
                          progress: ProgressCallback | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index, frames)`` for the clips ``indices`` of a run with ``seed``: ``(T, 3, H, W)`` in [-1, 1]."""
    if not MIN_FRAMES <= num_frames <= MAX_FRAMES:
        raise CTGridItError(f"need {MIN_FRAMES} to {MAX_FRAMES} frames, got {num_frames}")
    check_dtype(dtype)
    pipeline = model if isinstance(model, GriDiTPipeline) else load_video_model(model, device)
    if pipeline.settings.channels != 3:
        raise CTGridItError(f"a video model makes RGB frames, this one makes {pipeline.settings.channels} channels",
                            hint="give a model trained on videos")
    yield from generate_iter(pipeline, num_frames, indices, seed, steps, dtype, progress)


def save_clip(frames: torch.Tensor, path: str | os.PathLike, fps: float, force: bool = False) -> Path:
    """Write ``(T, 3, H, W)`` frames as ``.mp4`` / ``.gif``, or, for a name without suffix, a folder of PNGs."""
    return VideoFiles(fps=fps).save(frames, Path(path), force=force)


def save_contact_sheet(frames: torch.Tensor, path: str | os.PathLike, columns: int = 8, scale: int = 0,
                       force: bool = False) -> Path:
    """A PNG of the frames side by side, ``columns`` per row, in order (frame 0 top left), 2-pixel gaps.

    ``scale`` enlarges small frames (nearest neighbour); 0 picks one that makes rows about 1024 pixels wide.
    """
    pictures = sequence_to_frames(frames)                                            # (T, H, W, 3)
    t, h, w, _ = pictures.shape
    columns = max(1, min(columns, t))
    rows = -(-t // columns)
    gap = 2
    sheet = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i, picture in enumerate(pictures):
        r, c = divmod(i, columns)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = picture
    scale = scale or max(1, 1024 // sheet.shape[1])
    image = Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)
    with atomic_output(path, force=force) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
