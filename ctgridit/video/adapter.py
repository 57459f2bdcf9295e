"""The video adapter (:mod:`ctgridit.adapters`): video files and frame folders as training data, uint8 RGB frames
as output, played at the training clips' own frame rate."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ctgridit.adapters import Adapter
from ctgridit.errors import CTGridItError
from ctgridit.video.frames import VideoFiles, sequence_to_frames
from ctgridit.video.io import DEFAULT_FPS, Size, frame_rate, video_clips


class VideoSequences:
    """Videos as a lazy :class:`~ctgridit.training.datasets.FrameSequences`: item ``i`` is ``paths[i]`` read as
    ``(T, 3, H, W)`` in [-1, 1].

    Each path is a video file, a GIF, a folder of frame images or a folder of
    clips (:func:`~ctgridit.video.io.video_clips`), read with
    :class:`~ctgridit.video.frames.VideoFiles` (``size``: ``(H, W)``, or an
    int for the short side, which then must give one size for all videos;
    ``every``: temporal subsampling; ``max_frames``: a cap after subsampling).
    It has no ``num_frames``, so a dataset decodes each video once when built.
    ``list(VideoSequences(...))`` loads them all into memory.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], size: Size | None = None, every: int = 1,
                 max_frames: int | None = None) -> None:
        self.paths = video_clips(paths)
        self.files = VideoFiles(size=size, max_frames=max_frames, every=every)

    @property
    def frame_rates(self) -> list[float | None]:
        """Frames per second of each clip after the subsampling (None where the file records none)."""
        return [None if (fps := frame_rate(p)) is None else fps / self.files.every for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.files.load(self.paths[i])                                      # (T, 3, H, W)


class VideoAdapter(Adapter):
    """Videos (files, GIFs, frame folders, folders of clips) as training data; uint8 RGB frames as output."""

    name = "video"
    title = "video"
    trained_on = "videos"

    def check_data(self, config) -> None:
        if not config.data.paths:
            raise CTGridItError("data.paths is empty: a video config needs the videos to train on", config.source)

    def training_sequences(self, config) -> VideoSequences:
        return VideoSequences(config.data.paths, size=tuple(config.frame_size), every=config.data.every)

    def model_settings(self, config) -> dict[str, Any]:
        """The frame rate clips play at: the median of the training clips' own rates after ``data.every`` (the
        default rate where no clip records one); ``adapter.fps`` in the config overrides it."""
        rates = [r for r in VideoSequences(config.data.paths, every=config.data.every).frame_rates if r is not None]
        return {"kind": self.name, "fps": float(statistics.median(rates)) if rates else DEFAULT_FPS}

    def to_output(self, frames: torch.Tensor, settings: dict[str, Any], source: str | None = None) -> np.ndarray:
        """uint8 ``(T, H, W, 3)`` RGB frames."""
        return sequence_to_frames(frames)
