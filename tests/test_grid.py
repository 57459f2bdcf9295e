"""Property tests of the grid maths (ctgridit.core.grid) over random shapes, grids, strides and lengths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ctgridit.core.grid import (
    GridLayout,
    GridSpec,
    cell_mask,
    gray_to_rgb,
    grids_to_sequence,
    padded_length,
    rgb_to_gray,
    sequence_to_grids,
    tile,
    untile,
)

GRID_SHAPES = [(1, 1), (2, 2), (4, 4), (2, 3), (3, 2), (1, 4)]
EXAMPLES = 60

grid_shapes = st.sampled_from(GRID_SHAPES)
strides = st.integers(1, 4)
lengths = st.integers(1, 40)
sizes = st.integers(1, 9)


def frames_with_index(n: int, ch: int, h: int, w: int) -> torch.Tensor:
    """Random ``(N, Ch, H, W)`` frames whose pixel (0, 0) of channel 0 holds the frame index."""
    frames = torch.rand(n, ch, h, w)
    frames[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return frames


@settings(max_examples=EXAMPLES, deadline=None)
@given(grid=grid_shapes, stride=strides, n=lengths, ch=st.integers(1, 3), h=sizes, w=sizes)
def test_round_trip_is_bit_exact_without_resize(grid, stride, n, ch, h, w):
    spec = GridSpec(*grid, stride=stride)
    frames = torch.randn(n, ch, h, w)
    grids, layout = sequence_to_grids(frames, spec)
    assert grids.shape == (layout.num_grids, ch, grid[0] * h, grid[1] * w)
    assert torch.equal(grids_to_sequence(grids, layout), frames)


@settings(max_examples=EXAMPLES, deadline=None)
@given(grid=grid_shapes, stride=strides, n=lengths, factor=st.integers(2, 4), h=st.integers(4, 12),
       w=st.integers(4, 12))
def test_round_trip_shape_with_resize(grid, stride, n, factor, h, w):
    spec = GridSpec(*grid, stride=stride, factor=factor)
    frames = torch.rand(n, 1, h, w)
    grids, layout = sequence_to_grids(frames, spec)
    small_h, small_w = -(-h // factor), -(-w // factor)
    assert grids.shape == (layout.num_grids, 1, grid[0] * small_h, grid[1] * small_w)
    assert grids_to_sequence(grids, layout).shape == frames.shape


@settings(max_examples=EXAMPLES, deadline=None)
@given(grid=grid_shapes, stride=strides, n=lengths)
def test_cells_are_row_major_and_consecutive_after_stride(grid, stride, n):
    rows, cols = grid
    spec = GridSpec(rows, cols, stride=stride)
    grids, layout = sequence_to_grids(frames_with_index(n, 1, 2, 3), spec, pad_mode="constant", pad_value=-1.0)
    cells = untile(grids, rows, cols)[:, :, 0, 0, 0]          # (G, R*C): frame index of each cell
    block = stride * rows * cols
    for g in range(layout.num_grids):
        first = (g // stride) * block + g % stride            # block b, phase o
        for i in range(rows):
            for j in range(cols):
                expected = first + (i * cols + j) * stride    # cell (i, j) holds frame i*C + j of the strided run
                assert cells[g, i * cols + j] == (expected if expected < n else -1.0)


@settings(max_examples=EXAMPLES, deadline=None)
@given(grid=grid_shapes, stride=strides, n=lengths)
def test_padding_count(grid, stride, n):
    spec = GridSpec(*grid, stride=stride)
    layout = GridLayout(spec, n, 2, 2)
    assert layout.padded_frames == padded_length(n, spec)
    assert layout.padded_frames % (stride * spec.cells) == 0
    assert 0 <= layout.padding < stride * spec.cells
    assert layout.num_grids * spec.cells == layout.padded_frames
    indices = layout.frame_indices()
    assert sorted(indices.reshape(-1).tolist()) == list(range(layout.padded_frames))  # every frame exactly once


@settings(max_examples=EXAMPLES, deadline=None)
@given(grid=grid_shapes, n=lengths)
def test_edge_padding_repeats_the_last_frame(grid, n):
    spec = GridSpec(*grid)
    frames = frames_with_index(n, 1, 2, 2)
    grids, layout = sequence_to_grids(frames, spec, pad_mode="edge")
    cell_frames = untile(grids, *grid).reshape(-1, 1, 2, 2)[layout.frame_indices().reshape(-1).argsort()]
    assert torch.equal(cell_frames[n:], frames[-1:].expand(layout.padding, 1, 2, 2))


def cell_slices(row: int, col: int, cell_height: int, cell_width: int) -> tuple[slice, slice]:
    """The (height, width) slices of cell ``(row, col)`` in a grid of ``h x w`` cells: the layout, stated directly."""
    return slice(row * cell_height, (row + 1) * cell_height), slice(col * cell_width, (col + 1) * cell_width)


@settings(max_examples=EXAMPLES, deadline=None)
@given(grid=grid_shapes, lead=st.integers(1, 3), ch=st.integers(1, 3), h=sizes, w=sizes)
def test_tile_untile_are_inverse(grid, lead, ch, h, w):
    rows, cols = grid
    cells = torch.randn(lead, rows * cols, ch, h, w)
    grids = tile(cells, rows, cols)
    assert grids.shape == (lead, ch, rows * h, cols * w)
    assert torch.equal(untile(grids, rows, cols), cells)
    for i in range(rows):
        for j in range(cols):
            ys, xs = cell_slices(i, j, h, w)
            assert torch.equal(grids[..., ys, xs], cells[:, i * cols + j])


@settings(max_examples=EXAMPLES, deadline=None)
@given(grid=grid_shapes, h=sizes, w=sizes, data=st.data())
def test_cell_mask_marks_known_cells(grid, h, w, data):
    rows, cols = grid
    known = data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    mask = cell_mask(known, rows, cols, h, w)
    assert mask.shape == (1, rows * h, cols * w)
    for k, flag in enumerate(known):
        ys, xs = cell_slices(k // cols, k % cols, h, w)
        assert torch.equal(mask[:, ys, xs], torch.full((1, h, w), float(flag)))


def test_gray_rgb_round_trip():
    frames = torch.rand(3, 1, 4, 5)
    rgb = gray_to_rgb(frames)
    assert rgb.shape == (3, 3, 4, 5)
    assert torch.equal(rgb_to_gray(rgb), frames)  # exact: equal channels give the channel back


@pytest.mark.parametrize("field", ["rows", "cols", "stride", "factor"])
def test_spec_rejects_non_positive(field):
    with pytest.raises(ValueError, match=field):
        GridSpec(**{field: 0})


def test_layout_dict_round_trip():
    layout = GridLayout(GridSpec(4, 4, 2, 2), 37, 64, 48)
    assert GridLayout.from_dict(layout.to_dict()) == layout
