"""Grid maths: the one place where frames become grids and grids become frames.

A *grid* is an ``R x C`` mosaic of frames in row-major order: cell ``(i, j)``
holds frame ``i * C + j`` (docs/METHOD.md section 1). A sequence of ``N`` frames is
cut into grids as follows, for a z/time stride ``s``:

- the sequence is padded at the end to a multiple of ``s * R * C`` frames
  (``P`` padded frames, recorded in :class:`GridLayout`);
- it is split into blocks of ``s * R * C`` consecutive frames; block ``b`` gives
  ``s`` grids, one per phase ``o < s``, and grid ``(b, o)`` holds the frames
  ``b*s*R*C + o + s*k`` for ``k = 0 .. R*C-1``, i.e. ``R*C`` frames that are
  consecutive after subsampling by ``s``;
- every frame is resized in-plane by ``1 / r`` (bicubic, antialiased).

:func:`grids_to_sequence` undoes all of this. With ``r = 1`` the round trip is
exact (bit for bit); with ``r > 1`` it is exact up to the in-plane resize.

Shapes follow torch: frames ``(N, C, H, W)``, grids ``(G, C, R*h, C*w)``.
Everything here is plain torch, usable for CT, video or anything else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

PAD_MODES = ("edge", "constant")


@dataclass(frozen=True)
class GridSpec:
    """How frames are laid out in a grid.

    Attributes:
        rows, cols: the grid shape ``R x C`` (default 2 x 2, the CT setting).
        stride: z/time subsampling ``s`` between neighbouring cells.
        factor: in-plane downsampling ``r`` of every frame.
    """

    rows: int = 2
    cols: int = 2
    stride: int = 1
    factor: int = 1

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "stride", "factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GridSpec.{name} must be a positive integer, got {value!r}")

    @property
    def cells(self) -> int:
        """Frames per grid, ``R * C``."""
        return self.rows * self.cols

    @property
    def block(self) -> int:
        """Consecutive frames that make ``stride`` grids."""
        return self.stride * self.cells

    def frame_size(self, height: int, width: int) -> tuple[int, int]:
        """In-plane size of a frame inside the grid, ``ceil(H / r) x ceil(W / r)``."""
        return -(-height // self.factor), -(-width // self.factor)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size of a grid built from ``H x W`` frames."""
        h, w = self.frame_size(height, width)
        return self.rows * h, self.cols * w

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GridLayout:
    """What :func:`sequence_to_grids` did, so that :func:`grids_to_sequence` can undo it."""

    spec: GridSpec
    num_frames: int
    frame_height: int
    frame_width: int

    @property
    def padded_frames(self) -> int:
        return padded_length(self.num_frames, self.spec)

    @property
    def padding(self) -> int:
        return self.padded_frames - self.num_frames

    @property
    def num_grids(self) -> int:
        return self.padded_frames // self.spec.cells

    def frame_indices(self) -> torch.Tensor:
        """``(G, R*C)`` long tensor: which frame of the padded sequence sits in each cell.

        Indices ``>= num_frames`` are padding.
        """
        s, cells = self.spec.stride, self.spec.cells
        blocks = self.padded_frames // self.spec.block
        b = torch.arange(blocks).view(blocks, 1, 1)
        o = torch.arange(s).view(1, s, 1)
        k = torch.arange(cells).view(1, 1, cells)
        return (b * self.spec.block + o + s * k).reshape(blocks * s, cells)

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "num_frames": self.num_frames,
                "frame_height": self.frame_height, "frame_width": self.frame_width}

    @classmethod
    def from_dict(cls, data: dict) -> "GridLayout":
        return cls(GridSpec(**data["spec"]), int(data["num_frames"]), int(data["frame_height"]), int(data["frame_width"]))


def padded_length(num_frames: int, spec: GridSpec) -> int:
    """The sequence length after padding to whole blocks of ``stride * R * C`` frames."""
    if num_frames < 1:
        raise ValueError("a sequence needs at least one frame")
    return -(-num_frames // spec.block) * spec.block


# --------------------------------------------------------------------- mosaic
def tile(cells: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Arrange ``(..., R*C, Ch, h, w)`` cells into ``(..., Ch, R*h, C*w)`` grids, row-major."""
    if cells.shape[-4] != rows * cols:
        raise ValueError(f"expected {rows * cols} cells on dim -4, got shape {tuple(cells.shape)}")
    *lead, _, ch, h, w = cells.shape
    x = cells.reshape(*lead, rows, cols, ch, h, w)              # (..., R, C, Ch, h, w)
    x = x.movedim(-3, -5)                                        # (..., Ch, R, C, h, w)
    x = x.transpose(-3, -2)                                      # (..., Ch, R, h, C, w)
    return x.reshape(*lead, ch, rows * h, cols * w)              # (..., Ch, R*h, C*w)


def untile(grids: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Split ``(..., Ch, R*h, C*w)`` grids into ``(..., R*C, Ch, h, w)`` cells, row-major."""
    *lead, ch, gh, gw = grids.shape
    if gh % rows or gw % cols:
        raise ValueError(f"grid of {gh}x{gw} pixels does not split into {rows}x{cols} cells")
    h, w = gh // rows, gw // cols
    x = grids.reshape(*lead, ch, rows, h, cols, w)               # (..., Ch, R, h, C, w)
    x = x.transpose(-3, -2)                                      # (..., Ch, R, C, h, w)
    x = x.movedim(-5, -3)                                        # (..., R, C, Ch, h, w)
    return x.reshape(*lead, rows * cols, ch, h, w)               # (..., R*C, Ch, h, w)


def cell_mask(known: torch.Tensor | list, rows: int, cols: int, cell_height: int, cell_width: int) -> torch.Tensor:
    """A float mask that is 1 on the known cells: ``(1, R*h, C*w)`` for ``R*C`` row-major flags,
    ``(B, 1, R*h, C*w)`` for a ``(B, R*C)`` batch of them."""
    flags = torch.as_tensor(known, dtype=torch.float32)
    lead = tuple(flags.shape[:-1]) if flags.ndim > 1 else ()
    flags = flags.reshape(*lead, rows * cols, 1, 1, 1)
    return tile(flags.expand(*lead, rows * cols, 1, cell_height, cell_width), rows, cols)


# --------------------------------------------------------------- resampling
def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of ``(N, C, H, W)`` frames to ``size``; identity if equal."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    dtype = frames.dtype
    x = frames if frames.is_floating_point() else frames.float()
    out = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.to(dtype) if dtype.is_floating_point else out


def pad_sequence(frames: torch.Tensor, length: int, mode: str = "edge", value: float = 0.0) -> torch.Tensor:
    """Pad ``(N, ...)`` frames at the end to ``length`` by repeating the last frame or with ``value``."""
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    extra = length - frames.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {frames.shape[0]} frames to {length}")
    if extra == 0:
        return frames
    if mode == "edge":
        fill = frames[-1:].expand(extra, *frames.shape[1:])
    else:
        fill = torch.full((extra, *frames.shape[1:]), value, dtype=frames.dtype, device=frames.device)
    return torch.cat([frames, fill], dim=0)


# ---------------------------------------------------------- sequence <-> grids
def sequence_to_grids(frames: torch.Tensor, spec: GridSpec = GridSpec(), pad_mode: str = "edge",
                      pad_value: float = 0.0) -> tuple[torch.Tensor, GridLayout]:
    """Cut ``(N, C, H, W)`` frames into ``(G, C, R*h, C*w)`` grids (see the module docstring)."""
    if frames.ndim != 4:
        raise ValueError(f"frames must be (N, C, H, W), got shape {tuple(frames.shape)}")
    n, ch, height, width = frames.shape
    layout = GridLayout(spec, n, height, width)
    padded = pad_sequence(frames, layout.padded_frames, pad_mode, pad_value)
    small = resize_frames(padded, spec.frame_size(height, width))
    idx = layout.frame_indices()                                   # (G, R*C)
    cells = small[idx.reshape(-1)].reshape(*idx.shape, ch, *small.shape[-2:])  # (G, R*C, C, h, w)
    return tile(cells, spec.rows, spec.cols), layout


def grids_to_sequence(grids: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """Undo :func:`sequence_to_grids`: ``(G, C, R*h, C*w)`` grids to ``(N, C, H, W)`` frames."""
    spec = layout.spec
    if grids.ndim != 4 or grids.shape[0] != layout.num_grids:
        raise ValueError(f"expected {layout.num_grids} grids (G, C, H, W), got shape {tuple(grids.shape)}")
    cells = untile(grids, spec.rows, spec.cols)                    # (G, R*C, C, h, w)
    idx = layout.frame_indices().reshape(-1)
    flat = cells.reshape(-1, *cells.shape[2:])                     # (G*R*C, C, h, w)
    ordered = torch.empty_like(flat)
    ordered[idx] = flat                                           # back to sequence order
    frames = ordered[: layout.num_frames]
    return resize_frames(frames, (layout.frame_height, layout.frame_width))


def gray_to_rgb(frames: torch.Tensor) -> torch.Tensor:
    """Repeat a single channel ``(N, 1, H, W)`` to three ``(N, 3, H, W)`` (for RGB codecs)."""
    if frames.shape[-3] != 1:
        raise ValueError(f"expected one channel, got {frames.shape[-3]}")
    return frames.expand(*frames.shape[:-3], 3, *frames.shape[-2:]).contiguous()


def rgb_to_gray(frames: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`gray_to_rgb`: the mean of the channels, ``(N, 1, H, W)``.

    Written as ``c0 + mean(c - c0)`` so that equal channels give ``c0`` bit for bit.
    """
    first = frames.narrow(-3, 0, 1)
    return first + (frames - first).mean(dim=-3, keepdim=True)
