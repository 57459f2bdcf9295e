"""PNG pictures of the grids the model sees, for ``ctgridit grid``.

The volume goes through the same transforms as training data (LPS orientation,
HU window to [-1, 1], :class:`~ctgridit.ct.transforms.VolumeToGrids`), and each
grid is written as an 8-bit grayscale PNG, ``grid_0000.png``, ... A
``grids.json`` beside them lists which slice sits in each cell (row-major;
``null`` marks depth padding), so a person can match cells to slices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from monai.transforms import Compose
from monai.utils import TraceKeys
from PIL import Image

from ctgridit.core.grid import GridLayout, GridSpec
from ctgridit.ct.transforms import HUWindow, Orient, VolumeToGrids, volume_to_metatensor
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW
from ctgridit.errors import CTGridItError
from ctgridit.files import atomic_folder, check_output_folder

INDEX_FILE = "grids.json"


def grids_of(volume: CTVolume, spec: GridSpec, window: tuple[float, float] = DEFAULT_WINDOW):
    """``(G, 1, R*h, C*w)`` grids in [-1, 1] and their :class:`GridLayout`."""
    grids = Compose([Orient(), HUWindow(window), VolumeToGrids(spec, rgb=False)])(volume_to_metatensor(volume))
    layout = GridLayout.from_dict(grids.applied_operations[-1][TraceKeys.EXTRA_INFO]["layout"])
    return grids.as_tensor(), layout


#: Grid cells smaller than this (pixels) show nothing.
MIN_CELL_PIXELS = 8


def check_grid(shape: tuple[int, int, int], spec: GridSpec) -> None:
    """Refuse a grid setting that shows nothing of an ``(X, Y, Z)`` volume: cells beyond its slices, or too small."""
    depth, span = shape[2], (spec.cells - 1) * spec.stride + 1
    if span > depth:
        raise CTGridItError(f"a {spec.rows}x{spec.cols} grid at stride {spec.stride} spans {span} slices, but the "
                            f"scan has {depth}", hint="use fewer rows or columns or a smaller --stride")
    cell = min(spec.frame_size(shape[0], shape[1]))
    if cell < MIN_CELL_PIXELS:
        raise CTGridItError(f"--factor {spec.factor} makes cells of {cell} pixels from {shape[0]} x {shape[1]} slices",
                            hint=f"use a factor that leaves at least {MIN_CELL_PIXELS} pixels")


def write_grid_images(volume: CTVolume, folder: str | os.PathLike, spec: GridSpec = GridSpec(),
                      window: tuple[float, float] = DEFAULT_WINDOW, force: bool = False) -> list[Path]:
    """Write every grid of ``volume`` as a PNG into ``folder``, all at once (atomically); return the paths.

    An existing non-empty ``folder`` is refused unless ``force``, and then replaced
    as a whole, so no grid of an earlier run stays beside the new ones.
    """
    out = check_output_folder(folder, force=force)
    check_grid(volume.shape, spec)
    grids, layout = grids_of(volume, spec, window)
    pixels = np.rint((grids[:, 0].clamp(-1, 1).numpy() + 1) * 127.5).astype(np.uint8)  # (G, R*h, C*w)
    names = [f"grid_{i:04d}.png" for i in range(len(pixels))]
    cells = [[int(k) if k < layout.num_frames else None for k in row] for row in layout.frame_indices().tolist()]
    index = {"spec": spec.to_dict(), "window_hu": list(window), "num_slices": layout.num_frames,
             "slice_order": "frame 0 is the most inferior axial slice (LPS); cells are row-major",
             "grids": [{"file": name, "slices": c} for name, c in zip(names, cells)]}
    with atomic_folder(out) as tmp:
        for name, image in zip(names, pixels):
            Image.fromarray(image).save(tmp / name, format="PNG")
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return [out / name for name in names]
