"""A picture of a CT volume: the axial, coronal and sagittal mid-planes side by side.

Each plane is resampled so that one screen pixel is the same physical size in
both directions (spacing-aware), so a 5 mm-slice scan does not look squashed.
Planes are shown the radiological way: axial with anterior at the top and the
patient's right on the left of the screen; coronal and sagittal with superior at
the top. Orientation letters mark the edges.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctgridit.ct.volume import CTVolume
from ctgridit.ct.window import DEFAULT_WINDOW, to_unit
from ctgridit.files import atomic_output

#: The longest physical side of the planes is drawn with this many pixels at
#: most, and at least the smaller number (small volumes are enlarged).
MAX_PLANE_PIXELS = 512
MIN_PLANE_PIXELS = 256
#: No plane is drawn smaller than this along either side (stretched if its voxels are extreme).
MIN_TILE_PIXELS = 96
LABEL_HEIGHT = 18
GAP = 6


def _to_uint8(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return np.rint(to_unit(plane, window) * 255).astype(np.uint8)


def mid_planes(volume: CTVolume) -> list[tuple[str, np.ndarray, tuple[float, float], tuple[str, str, str, str]]]:
    """``(name, plane, (row mm, column mm), edge letters top/bottom/left/right)`` for the three mid-planes.

    Planes are arrays indexed ``[row, column]`` as they are to be displayed.
    """
    lps = volume.reoriented("LPS")              # array axes: i -> L, j -> P, k -> S
    a = lps.array
    sx, sy, sz = lps.spacing
    nx, ny, nz = a.shape
    axial = a[:, :, nz // 2].T                  # rows: A -> P, columns: R -> L
    coronal = a[:, ny // 2, :].T[::-1]          # rows: S -> I, columns: R -> L
    sagittal = a[nx // 2, :, :].T[::-1]         # rows: S -> I, columns: A -> P
    return [
        ("axial", axial, (sy, sx), ("A", "P", "R", "L")),
        ("coronal", coronal, (sz, sx), ("S", "I", "R", "L")),
        ("sagittal", sagittal, (sz, sy), ("S", "I", "A", "P")),
    ]


def render_preview(volume: CTVolume, window: tuple[float, float] = DEFAULT_WINDOW,
                   title: str | None = None) -> Image.Image:
    """The three mid-planes of ``volume`` in ``window`` (HU) as one grayscale picture."""
    planes = mid_planes(volume)
    extents = [max(p.shape[0] * r, p.shape[1] * c) for _, p, (r, c), _ in planes]
    native = max(extents) / min(min(s) for *_, s, _ in planes)     # longest side at native resolution
    pixel_mm = max(extents) / float(np.clip(native, MIN_PLANE_PIXELS, MAX_PLANE_PIXELS))
    tiles = []
    for name, plane, (row_mm, col_mm), letters in planes:
        size = (round(plane.shape[1] * col_mm / pixel_mm), round(plane.shape[0] * row_mm / pixel_mm))
        if min(size) < MIN_TILE_PIXELS:                          # extreme voxels: readable, but not to scale
            size = tuple(max(MIN_TILE_PIXELS, s) for s in size)
            name += " (not to scale)"
        tile = Image.fromarray(_to_uint8(np.ascontiguousarray(plane), window)).resize(size, Image.BILINEAR)
        tiles.append((name, tile, letters))
    top = LABEL_HEIGHT * (2 if title else 1)
    width = sum(t.width for _, t, _ in tiles) + GAP * (len(tiles) + 1)
    height = max(t.height for _, t, _ in tiles) + top + GAP
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, 2), title, fill=255)
    x = GAP
    for name, tile, (t, b, l, r) in tiles:
        y = top
        canvas.paste(tile, (x, y))
        draw.text((x, top - LABEL_HEIGHT + 3), name, fill=255)
        draw.text((x + tile.width // 2 - 3, y + 1), t, fill=255)
        draw.text((x + tile.width // 2 - 3, y + tile.height - 12), b, fill=255)
        draw.text((x + 2, y + tile.height // 2 - 6), l, fill=255)
        draw.text((x + tile.width - 9, y + tile.height // 2 - 6), r, fill=255)
        x += tile.width + GAP
    return canvas


def save_preview(volume: CTVolume, path: str | os.PathLike, window: tuple[float, float] = DEFAULT_WINDOW,
                 title: str | None = None, force: bool = True) -> Path:
    """Render and write the preview PNG atomically."""
    image = render_preview(volume, window, title)
    with atomic_output(path, force=force) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def save_comparison(volumes: list[tuple[str, CTVolume]], path: str | os.PathLike,
                    window: tuple[float, float] = DEFAULT_WINDOW, force: bool = True) -> Path:
    """The previews of several volumes (``(title, volume)``), one row each, in one PNG written atomically."""
    rows = [render_preview(volume, window, title) for title, volume in volumes]
    canvas = Image.new("L", (max(r.width for r in rows), sum(r.height for r in rows)), 0)
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height
    with atomic_output(path, force=force) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
