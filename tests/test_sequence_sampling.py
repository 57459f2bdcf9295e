"""Grid-based autoregressive sampling (docs/METHOD.md section 6): :func:`sample_sequence` returns exactly ``N``
frames, moves the last ``m`` rows of grid ``k-1`` into the first rows of grid ``k`` (step 1), puts chunk ``a``
in the first and ``b`` in the last cells of an interpolation grid and weaves the new frames between them
(step 2), with one model forward per step and grid batch; :func:`plan_sequence` chooses the fewest grids;
the same seed gives the same sequence; progress is reported per phase."""

from __future__ import annotations

import math

import pytest
import torch

import ctgridit.core.sampler as sampler_module
from ctgridit.core.diffusion import make_sample_scheduler
from ctgridit.core.grid import tile, untile
from ctgridit.core.sampler import RePaint, model_forwards, plan_sequence, sample_sequence
from tests.sampler_fakes import TRAIN, Recorder, tiny_model
from tests.conftest import interpolation_grids, total_frames


# ------------------------------------------------------------- planning
def test_plan_for_201_frames_on_2x2():
    plan = plan_sequence(201, 2, 2, control_rows=1)
    assert (plan.control_rows, plan.chunk, plan.interpolate) == (1, 1, True)
    assert plan.iterations == 33
    assert plan.step1_frames == 4 + 32 * 2 == 68
    assert interpolation_grids(plan) == 67
    assert total_frames(plan) == 68 + 67 * 2 == 202 >= 201
    fewer = plan_sequence(3 * 66 - 2, 2, 2, control_rows=1)       # 196 frames: one grid less
    assert fewer.iterations == 32 and total_frames(fewer) == 196


@pytest.mark.parametrize("n,iterations,grids", [(1, 1, 0), (16, 1, 0), (17, 1, 2), (40, 1, 3), (41, 2, 4),
                                                (100, 6, 8)])
def test_plan_on_4x4_with_the_papers_chunk_of_a_row(n, iterations, grids):
    plan = plan_sequence(n, 4, 4, chunk=4)
    assert plan.control_rows == 3
    assert (plan.iterations, interpolation_grids(plan)) == (iterations, grids)
    assert total_frames(plan) >= n
    if grids:
        assert plan.level_inputs[0] <= plan.step1_frames and plan.level_inputs[0] % 4 == 0   # whole chunks
        assert total_frames(plan) == plan.level_inputs[0] + grids * 8
    if iterations > 1:                                              # the fewest grids
        fewer = sampler_module.SequencePlan(n, 4, 4, 3, 4, iterations - 1)
        assert fewer.step1_frames < plan.level_inputs[0]


@pytest.mark.parametrize("n,levels,iterations,inputs", [
    (201, 1, 33, (68,)), (201, 2, 11, (24, 68)), (201, 3, 4, (9, 24, 68)), (201, 4, 1, (4, 9, 24, 68)),
    (201, 5, 1, (4, 9, 24, 68)), (10, 2, 1, (4,)), (4, 2, 1, ()), (5, 1, 1, (3,)), (2, 1, 1, ())])
def test_hierarchical_plan_on_2x2(n, levels, iterations, inputs):
    """Each level takes the fewest frames that give enough for the next; levels are added only while
    more than one grid's frames are needed."""
    plan = plan_sequence(n, 2, 2, levels=levels)
    assert (plan.control_rows, plan.chunk) == (1, 1)
    assert (plan.iterations, plan.level_inputs) == (iterations, inputs)
    assert plan.step1_frames >= (inputs[0] if inputs else n)
    outputs = [plan.level_output(level) for level in range(plan.levels)]
    assert outputs == [3 * (f - 1) + 1 for f in inputs]                  # 2 new frames between neighbours
    assert all(out >= nxt for out, nxt in zip(outputs, [*inputs[1:], n]))
    assert total_frames(plan) >= n
    assert plan.strides == [3 ** (plan.levels - level) for level in range(plan.levels + 1)]


def test_plan_on_4x4_defaults_to_single_frame_chunks():
    plan = plan_sequence(201, 4, 4)
    assert (plan.control_rows, plan.chunk, plan.level_inputs) == (3, 1, (15,))
    assert plan.iterations == 1 and total_frames(plan) == 15 + 14 * 14 == 211
    assert plan.strides == [15, 1]
    assert plan_sequence(201, 4, 4, chunk=4).strides == [None, None]      # a row of 4: not evenly spaced


def test_plan_without_room_between_chunks_does_not_interpolate():
    plan = plan_sequence(9, 2, 2, control_rows=1, chunk=2)          # 2 + 2 chunks fill the 2x2 grid
    assert not plan.interpolate and interpolation_grids(plan) == 0
    assert plan.step1_frames == total_frames(plan) >= 9 and plan.iterations == 4
    assert plan.strides == [1]
    plan = plan_sequence(9, 2, 2, levels=0)
    assert plan.iterations == 4 and total_frames(plan) == 10


@pytest.mark.parametrize("bad", [0, 2, 3, -1])
def test_plan_refuses_bad_control_rows(bad):
    with pytest.raises(ValueError, match="control_rows"):
        plan_sequence(10, 2, 2, control_rows=bad)


def test_a_single_row_grid_samples_without_extension():
    out = sample_sequence(tiny_model(1, 4, frame=2), make_sample_scheduler(TRAIN, "ddim", 2), plan_sequence(3, 1, 4),
                          frame_shape=(2, 2, 2), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 2, 2, 2)


def test_plan_refuses_no_frames():
    with pytest.raises(ValueError, match="num_frames"):
        plan_sequence(0, 2, 2)
    with pytest.raises(ValueError, match="levels"):
        plan_sequence(10, 2, 2, levels=-1)


# ------------------------------------------------- layout (labelled fake)
class LabelInpaint:
    """Stands in for :func:`inpaint`: fills every unknown cell with a fresh unique constant label.

    Records ``(known, mask flags, output)`` of every call, so the test can check what
    the sampler put where without any diffusion.
    """

    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        self.next_label = 1
        self.calls: list[tuple[torch.Tensor, list[int] | None, torch.Tensor]] = []

    def __call__(self, model, scheduler, known, mask, **kwargs):
        b, cells = known.shape[0], self.rows * self.cols
        labels = torch.arange(self.next_label, self.next_label + b * cells, dtype=known.dtype).view(b, cells)
        self.next_label += b * cells
        filled = tile(labels.view(b, cells, 1, 1, 1).expand(b, cells, *known.shape[1:2],
                                                            known.shape[2] // self.rows, known.shape[3] // self.cols),
                      self.rows, self.cols)
        flags = None
        if mask is not None:
            flags = [int(v) for v in untile(mask, self.rows, self.cols)[:, 0, 0, 0].tolist()]
            filled = mask * known + (1 - mask) * filled
        self.calls.append((known.clone(), flags, filled.clone()))
        return filled

    def labels(self, grid: torch.Tensor) -> torch.Tensor:
        """``(B, R*C)`` labels of the cells of a grid batch (every cell must be constant)."""
        cells = untile(grid, self.rows, self.cols)
        first = cells.flatten(2)[..., 0]
        assert torch.equal(cells, first[..., None, None, None].expand_as(cells)), "a cell is not one label"
        return first


def frame_labels(frames: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` labels of ``(B, N, c, h, w)`` constant frames."""
    first = frames.flatten(2)[..., 0]
    assert torch.equal(frames, first[..., None, None, None].expand_as(frames))
    return first


LAYOUTS = [(2, 2, 1, n) for n in (1, 4, 5, 6, 201)] + [(4, 4, 3, n) for n in (1, 16, 17, 100)] + \
          [(3, 2, 1, 23), (3, 3, 2, 30)]


@pytest.mark.parametrize("rows,cols,m,n", LAYOUTS)
def test_sequence_layout(monkeypatch, rows, cols, m, n):
    fake = LabelInpaint(rows, cols)
    monkeypatch.setattr(sampler_module, "inpaint", fake)
    batch, max_batch = 3, 4
    out = sample_sequence(None, make_sample_scheduler(TRAIN, "ddim", 2), plan_sequence(n, rows, cols, control_rows=m),
                          frame_shape=(2, 2, 3), batch_size=batch, max_batch=max_batch)
    assert out.shape == (batch, n, 2, 2, 3)
    got = frame_labels(out)
    plan = plan_sequence(n, rows, cols, control_rows=m)
    k, cells, gap = plan.chunk, rows * cols, rows * cols - 2 * plan.chunk
    calls = fake.calls

    # step 1: an unconditional grid, then grids whose first m rows are grid k-1's last m rows
    step1_calls, step2_calls = calls[:plan.iterations], calls[plan.iterations:]
    assert step1_calls[0][1] is None
    step1 = [fake.labels(step1_calls[0][2])]                            # (B, R*C)
    for (known, flags, out_grid), (_, _, previous) in zip(step1_calls[1:], step1_calls):
        assert flags == [1] * (m * cols) + [0] * ((rows - m) * cols)
        prev_cells, known_cells = untile(previous, rows, cols), untile(known, rows, cols)
        assert torch.equal(known_cells[:, :m * cols], prev_cells[:, cells - m * cols:])   # the row shift
        assert torch.equal(fake.labels(out_grid)[:, :m * cols], fake.labels(previous)[:, cells - m * cols:])
        step1.append(fake.labels(out_grid)[:, m * cols:])
    step1 = torch.cat(step1, dim=1)                                     # (B, L) labels in sequence order
    assert step1.shape[1] == plan.step1_frames
    if plan.interpolate:
        step1 = step1[:, :plan.level_inputs[0]]                         # what interpolation takes

    # step 2: chunk a in the first k cells, chunk b (the next one) in the last k cells
    assert sum(c[0].shape[0] for c in step2_calls) == batch * interpolation_grids(plan)
    assert all(c[0].shape[0] <= max_batch for c in step2_calls)
    new_between: dict[tuple[int, int], torch.Tensor] = {}
    for known, flags, out_grid in step2_calls:
        assert flags == [1] * k + [0] * gap + [1] * k
        known_labels = fake.labels(known)
        for row_known, row_out in zip(known_labels, fake.labels(out_grid)):
            a = row_known[:k]
            hits = [(b, p) for b in range(batch) for p in range(interpolation_grids(plan))
                    if torch.equal(step1[b, p * k:(p + 1) * k], a)]
            assert len(hits) == 1, "chunk a is not a chunk of the step-1 sequence"
            b, p = hits[0]
            assert torch.equal(row_known[cells - k:], step1[b, (p + 1) * k:(p + 2) * k])   # b = the next chunk
            assert (b, p) not in new_between
            new_between[(b, p)] = row_out[k:k + gap]
    assert len(new_between) == batch * interpolation_grids(plan)

    # the output: a_0, new_0, a_1, new_1, ..., then the rest of step 1; exactly n frames
    for b in range(batch):
        if plan.interpolate:
            parts = []
            for p in range(interpolation_grids(plan)):
                parts += [step1[b, p * k:(p + 1) * k], new_between[(b, p)]]
            parts.append(step1[b, interpolation_grids(plan) * k:])
            expected = torch.cat(parts)
        else:
            expected = step1[b]
        assert len(expected) == total_frames(plan)
        assert torch.equal(got[b], expected[:n])
    assert len(set(got.flatten().tolist())) == batch * n              # no frame twice, sequences distinct


def test_layout_with_the_real_inpaint(monkeypatch):
    """With a real model: the known cells passed to inpaint reappear bit for bit where they belong
    (the paper's 4 x 4 layout: chunks of a row)."""
    rows, cols, m = 4, 4, 3
    real = sampler_module.inpaint
    calls = []

    def recording(model, scheduler, known, mask, **kwargs):
        out = real(model, scheduler, known, mask, **kwargs)
        calls.append((known.clone(), mask, out.clone()))
        return out

    monkeypatch.setattr(sampler_module, "inpaint", recording)
    model = tiny_model(rows, cols, frame=2)
    out = sample_sequence(model, make_sample_scheduler(TRAIN, "ddpm", 3),
                          plan_sequence(48, rows, cols, control_rows=m, chunk=4), frame_shape=(2, 2, 2),
                          batch_size=2, max_batch=3,
                          generator=torch.Generator().manual_seed(0))
    plan = plan_sequence(48, rows, cols, control_rows=m, chunk=4)
    assert (plan.iterations, interpolation_grids(plan)) == (2, 4) and out.shape == (2, 48, 2, 2, 2)
    g0, g1 = calls[0][2], calls[1][2]
    assert torch.equal(untile(calls[1][0], rows, cols)[:, :12], untile(g0, rows, cols)[:, 4:])
    assert torch.equal(untile(g1, rows, cols)[:, :12], untile(g0, rows, cols)[:, 4:])    # pasted exactly
    step1 = torch.cat([untile(g0, rows, cols), untile(g1, rows, cols)[:, 12:]], dim=1)    # (2, 20, ...)
    interp = untile(torch.cat([c[2] for c in calls[2:]]), rows, cols).view(2, 4, 16, 2, 2, 2)
    for p in range(4):
        base = p * 12                                                   # a_p, 8 new, a_{p+1}, ...
        assert torch.equal(out[:, base:base + 4], step1[:, 4 * p:4 * p + 4])
        assert torch.equal(out[:, base + 4:base + 12], interp[:, p, 4:12])
        assert torch.equal(interp[:, p, :4], step1[:, 4 * p:4 * p + 4])
        assert torch.equal(interp[:, p, 12:], step1[:, 4 * p + 4:4 * p + 8])
    assert total_frames(plan) == 52                                          # a_4 is dropped: exactly 48


# ------------------------------------------------- counts and determinism
@pytest.mark.parametrize("rows,cols,m,n,batch,max_batch,steps,jump,times", [
    (2, 2, 1, 201, 1, 16, 2, 0, 1),
    (4, 4, 3, 100, 2, 5, 3, 0, 1),
    (4, 4, 3, 17, 3, 4, 2, 0, 1),
    (2, 2, 1, 5, 2, 16, 4, 2, 2),
    (2, 2, 1, 4, 2, 16, 3, 0, 1),
])
def test_one_forward_per_step_per_grid_batch(rows, cols, m, n, batch, max_batch, steps, jump, times):
    model = Recorder(tiny_model(rows, cols, frame=2))
    out = sample_sequence(model, make_sample_scheduler(TRAIN, "ddim", steps),
                          plan_sequence(n, rows, cols, control_rows=m), frame_shape=(2, 2, 2),
                          batch_size=batch, max_batch=max_batch,
                          generator=torch.Generator().manual_seed(0), repaint=RePaint(jump, times))
    assert out.shape == (batch, n, 2, 2, 2)
    plan = plan_sequence(n, rows, cols, control_rows=m)
    per_grid = model_forwards(steps, jump, times)
    grids2 = batch * interpolation_grids(plan)
    assert len(model.batches) == (plan.iterations + math.ceil(grids2 / max_batch)) * per_grid
    expected = [batch] * (plan.iterations * per_grid)
    for start in range(0, grids2, max_batch):
        expected += [min(max_batch, grids2 - start)] * per_grid
    assert model.batches == expected                                      # never a doubled (guidance) batch


def test_same_seed_same_sequence_other_seed_other_sequence():
    model = tiny_model()
    scheduler = make_sample_scheduler(TRAIN, "ddpm", 4)

    def run(seed):
        return sample_sequence(model, scheduler, plan_sequence(9, 2, 2, control_rows=1), frame_shape=(2, 4, 4),
                               batch_size=2, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 9, 2, 4, 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])                               # the sequences of a batch differ


def test_progress_callback_counts_forwards_per_phase():
    seen: dict[str, list[tuple[int, int]]] = {}
    sample_sequence(tiny_model(), make_sample_scheduler(TRAIN, "ddim", 3), plan_sequence(12, 2, 2, control_rows=1),
                    frame_shape=(2, 4, 4), max_batch=2, callback=lambda ph, d, t: seen.setdefault(ph, []).append((d, t)))
    plan = plan_sequence(12, 2, 2, control_rows=1)
    assert set(seen) == {"extend", "interpolate"}
    assert seen["extend"] == [(i, plan.iterations * 3) for i in range(1, plan.iterations * 3 + 1)]
    total = math.ceil(interpolation_grids(plan) / 2) * 3
    assert seen["interpolate"] == [(i, total) for i in range(1, total + 1)]


