"""A video data set with known motion, made offline: a square circling over a dark background.

Each clip shows one bright square whose centre moves on a circle, one turn every
``period`` frames, starting at a random phase. Because the trajectory is known
exactly, a generated clip can be checked: :func:`track_square` finds the
square's centre in every frame, :func:`fit_phase` finds where on the circle a
clip is, and the frames a model adds must continue along the same circle
(``tests/test_video_synth.py``, ``pipelines/make_moving_squares.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctgridit.video.io import write_video

BACKGROUND = (0, 0, 60)
COLOUR = (255, 200, 0)


@dataclass(frozen=True)
class CirclingSquare:
    """The motion: frames of ``size x size`` pixels, a ``square``-pixel square whose centre circles the frame
    centre at ``radius`` pixels, one turn per ``period`` frames (counter-clockwise on screen)."""

    size: int = 16
    square: int = 6
    radius: float = 4.0
    period: int = 16

    def centre(self, t: np.ndarray | float, phase: float) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) of the square's centre in frame ``t`` of a clip starting at ``phase`` (radians)."""
        angle = phase + 2 * math.pi * np.asarray(t, dtype=float) / self.period
        middle = (self.size - 1) / 2
        return middle - self.radius * np.sin(angle), middle + self.radius * np.cos(angle)

    def clip(self, frames: int, phase: float) -> np.ndarray:
        """uint8 ``(frames, size, size, 3)``: a square of side ``square`` at its exact (sub-pixel) position,
        antialiased (each pixel's colour weighted by how much of it the square covers)."""
        rows, cols = self.centre(np.arange(frames), phase)
        grid = np.arange(self.size) + 0.5                                     # pixel centres
        half = self.square / 2

        def cover(centre: np.ndarray) -> np.ndarray:                          # (T, size): 1D overlap
            lo, hi = centre[:, None] + 0.5 - half, centre[:, None] + 0.5 + half
            return np.clip(np.minimum(hi, grid + 0.5) - np.maximum(lo, grid - 0.5), 0, 1)

        weight = cover(rows)[:, :, None] * cover(cols)[:, None, :]          # (T, size, size)
        video = (1 - weight[..., None]) * np.array(BACKGROUND) + weight[..., None] * np.array(COLOUR)
        return np.round(video).astype(np.uint8)


def track_square(video: np.ndarray) -> np.ndarray:
    """``(T, 2)`` centre (row, column) of each frame's square: the centroid of the red channel's excess over
    the background, as a fraction of the square's red (pixels under a quarter left out); NaN where none."""
    red = np.asarray(video)[..., 0].astype(float)                               # (T, H, W)
    weight = (red - BACKGROUND[0]) / (COLOUR[0] - BACKGROUND[0])
    weight[weight < 0.25] = 0
    rows, cols = np.indices(weight.shape[1:]) + 0.0
    total = weight.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(weight * rows).sum(axis=(1, 2)) / total, (weight * cols).sum(axis=(1, 2)) / total], 1)


def fit_phase(motion: CirclingSquare, centres: np.ndarray, frames: np.ndarray | None = None) -> float:
    """The phase whose trajectory best fits the tracked ``centres`` of ``frames`` (default ``0 .. T-1``)."""
    frames = np.arange(len(centres)) if frames is None else np.asarray(frames)
    middle = (motion.size - 1) / 2
    angles = np.arctan2(middle - centres[:, 0], centres[:, 1] - middle) - 2 * math.pi * frames / motion.period
    ok = np.isfinite(angles)
    return float(np.angle(np.exp(1j * angles[ok]).mean()))


def motion_errors(video: np.ndarray, motion: CirclingSquare, first: int) -> dict[str, float]:
    """Does a clip continue the motion of its first ``first`` frames? Median distances (pixels) of the tracked
    square from the circle fitted on those frames: in them (``"first grid"``), in the frames after them
    (``"added"``), and for a square that stopped at frame ``first - 1`` (``"frozen"``, the baseline); and how
    many frames have no square (``"missing"``)."""
    centres = track_square(video)
    phase = fit_phase(motion, centres[:first])
    rows, cols = motion.centre(np.arange(len(video)), phase)
    error = np.hypot(centres[:, 0] - rows, centres[:, 1] - cols)
    frozen = np.hypot(centres[first - 1, 0] - rows[first:], centres[first - 1, 1] - cols[first:])
    return {"first grid": float(np.nanmedian(error[:first])), "added": float(np.nanmedian(error[first:])),
            "frozen": float(np.nanmedian(frozen)), "missing": int(np.isnan(error).sum())}


def write_moving_squares(folder: str | os.PathLike, clips: int, frames: int, motion: CirclingSquare = CirclingSquare(),
                         fps: float = 8.0, seed: int = 0, force: bool = False) -> list[Path]:
    """``clips`` GIFs ``square_000.gif``, ... of ``frames`` frames at random phases (lossless: few colours)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    phases = np.random.default_rng(seed).uniform(0, 2 * math.pi, clips)
    return [write_video(out / f"square_{i:03d}.gif", motion.clip(frames, phase), fps=fps, force=force)
            for i, phase in enumerate(phases)]
