"""uint8 video frames <-> the frame sequences of the generic core, and video files <-> sequences (:class:`VideoFiles`).

Conventions
-----------
- Frames: ``numpy.uint8`` ``(T, H, W, 3)``, RGB (as :mod:`ctgridit.video.io`
  reads and writes them).
- Sequence: ``torch.float32`` ``(T, 3, H, W)`` in ``[-1, 1]``, with
  ``x = v / 127.5 - 1`` for a pixel value ``v`` (docs/METHOD.md section 1).
- The inverse clamps to ``[-1, 1]`` and rounds to the nearest integer, so
  ``frames -> sequence -> frames`` is exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctgridit.video.io import DEFAULT_FPS, Size, check_frames, read_frames, write_frames, write_video

HALF_RANGE = 127.5  # uint8 0..255 <-> [-1, 1]


def frames_to_sequence(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, H, W)`` in ``[-1, 1]``."""
    frames = check_frames(frames)
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    return pixels.to(torch.float32) / HALF_RANGE - 1


def sequence_to_frames(sequence: torch.Tensor) -> np.ndarray:
    """float ``(T, 3, H, W)`` in ``[-1, 1]`` -> uint8 ``(T, H, W, 3)`` (clamped, rounded)."""
    if not (torch.is_tensor(sequence) and sequence.is_floating_point() and sequence.ndim == 4
            and sequence.shape[1] == 3):
        what = getattr(sequence, "dtype", type(sequence).__name__)
        raise ValueError(f"sequence must be a float tensor (T, 3, H, W), got {what} "
                         f"{tuple(getattr(sequence, 'shape', ()))}")
    values = ((sequence.detach().float().clamp(-1, 1) + 1) * HALF_RANGE).round()
    return values.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (T, H, W, 3)


@dataclass
class VideoFiles:
    """Videos on disk <-> core sequences ``(T, 3, H, W)`` in ``[-1, 1]``: ``load(path)`` and ``save(sequence, path)``.

    Attributes:
        size: resize on load, ``(H, W)`` or the short side (see
            :func:`~ctgridit.video.io.read_frames`); ``None`` keeps the size.
        max_frames: load at most this many frames (after subsampling).
        every: temporal subsampling on load.
        fps: frame rate written by :meth:`save` unless it is given one.
    """

    size: Size | None = None
    max_frames: int | None = None
    every: int = 1
    fps: float = DEFAULT_FPS

    def load(self, path: str | os.PathLike) -> torch.Tensor:
        """Read a folder of frame images, a video file or a GIF as a sequence."""
        frames = read_frames(path, size=self.size, max_frames=self.max_frames, every=self.every)
        return frames_to_sequence(frames)

    def save(self, sequence: torch.Tensor, path: str | os.PathLike, fps: float | None = None,
             force: bool = False) -> Path:
        """Write a sequence as ``.mp4`` or ``.gif``, or, for a path without suffix, a folder of PNGs."""
        frames = sequence_to_frames(sequence)
        if Path(path).suffix:
            return write_video(path, frames, fps=self.fps if fps is None else fps, force=force)
        return write_frames(path, frames, force=force)
