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
from ctgridit.files import atomic_output

INDEX_FILE = "grids.json"


def grids_of(volume: CTVolume, spec: GridSpec, window: tuple[float, float] = DEFAULT_WINDOW):
    """``(G, 1, R*h, C*w)`` grids in [-1, 1] and their :class:`GridLayout`."""
    grids = Compose([Orient(), HUWindow(window), VolumeToGrids(spec, rgb=False)])(volume_to_metatensor(volume))
    layout = GridLayout.from_dict(grids.applied_operations[-1][TraceKeys.EXTRA_INFO]["layout"])
    return grids.as_tensor(), layout


def write_grid_images(volume: CTVolume, folder: str | os.PathLike, spec: GridSpec = GridSpec(),
                      window: tuple[float, float] = DEFAULT_WINDOW, force: bool = False) -> list[Path]:
    """Write every grid of ``volume`` as a PNG into ``folder``; return the paths."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise CTGridItError("exists and is not a folder", out, "give a folder name for the grid images")
    if out.is_dir() and any(out.glob("grid_*.png")) and not force:
        raise CTGridItError("folder already holds grid images", out, "pass --force to overwrite them or choose another folder")
    grids, layout = grids_of(volume, spec, window)
    out.mkdir(parents=True, exist_ok=True)
    pixels = np.rint((grids[:, 0].clamp(-1, 1).numpy() + 1) * 127.5).astype(np.uint8)  # (G, R*h, C*w)
    paths = []
    for i, image in enumerate(pixels):
        path = out / f"grid_{i:04d}.png"
        with atomic_output(path, force=True) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        paths.append(path)
    cells = [[int(k) if k < layout.num_frames else None for k in row] for row in layout.frame_indices().tolist()]
    index = {"spec": spec.to_dict(), "window_hu": list(window), "num_slices": layout.num_frames,
             "slice_order": "frame 0 is the most inferior axial slice (LPS); cells are row-major",
             "grids": [{"file": p.name, "slices": c} for p, c in zip(paths, cells)]}
    with atomic_output(out / INDEX_FILE, force=True) as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return paths
