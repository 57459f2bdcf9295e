"""Grid inpainting and grid-based autoregressive sampling (docs/METHOD.md section 6).

- :func:`inpaint` keeps the known cells exactly and noises them, at every step,
  to the level of the *next* model input with fresh noise;
- :func:`sample_sequence` returns exactly ``N`` frames, moves the last ``m`` rows
  of grid ``k-1`` into the first rows of grid ``k`` (step 1), puts chunk ``a`` in
  the first and ``b`` in the last cells of an interpolation grid and weaves the
  new frames between them (step 2), with one model forward per step and grid batch;
- a tiny model trained on a smooth moving-blob sequence continues it, which
  fails if the known cells were ignored or put in the wrong place.
"""

from __future__ import annotations

import math

import pytest
import torch

import ctgridit.core.sampler as sampler_module
from ctgridit.core.diffusion import (NoiseDraws, SequenceNoise, diffusion_loss, make_sample_scheduler, make_train_scheduler,
                                     scheduler_step, strength_timesteps)
from ctgridit.core.dit import GridDiT, create_dit
from ctgridit.core.grid import cell_mask, tile, untile
from ctgridit.core.sampler import inpaint, model_forwards, plan_sequence, repaint_schedule, sample_sequence

TRAIN = make_train_scheduler()


def tiny_model(rows: int = 2, cols: int = 2, channels: int = 2, frame: int = 4, seed: int = 0) -> GridDiT:
    """A DiT-tiny/2 over ``rows x cols`` grids of ``frame x frame`` latents, with random (non-zero) weights."""
    model = create_dit("DiT-tiny/2", sample_height=rows * frame, sample_width=cols * frame, in_channels=channels,
                       grid_rows=rows, grid_cols=cols).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


class Recorder:
    """Wraps a model (or any ``f(x, t)``), counting calls and recording inputs."""

    def __init__(self, fn=None, keep: bool = False):
        self.fn = fn if fn is not None else (lambda x, t: 0.1 * x)
        self.keep = keep
        self.batches: list[int] = []
        self.inputs: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []

    def __call__(self, x, t, **inputs):
        assert t.shape == (x.shape[0],)
        assert t.unique().numel() == 1                  # one level for the whole batch
        self.batches.append(x.shape[0])
        if self.keep:
            self.inputs.append(x.detach().clone())
            self.timesteps.append(t.detach().clone())
        return self.fn(x, t, **inputs)


def cells_of(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return untile(grid, rows, cols)


# ---------------------------------------------------------------- inpaint
SCHEDULES = [("ddpm", 0, 1), ("ddim", 0, 1), ("ddim", 2, 3), ("ddpm", 3, 2)]


@pytest.mark.parametrize("sampler,jump,times", SCHEDULES)
def test_inpaint_keeps_known_cells_exactly(sampler, jump, times):
    model = Recorder(tiny_model())
    scheduler = make_sample_scheduler(TRAIN, sampler, 8)
    g = torch.Generator().manual_seed(0)
    known = torch.randn(3, 2, 8, 8, generator=g)
    flags = [1, 0, 0, 1]
    mask = cell_mask(flags, 2, 2, 4, 4)
    out = inpaint(model, scheduler, known, mask, generator=torch.Generator().manual_seed(1),
                  repaint_jump=jump, repaint_times=times)
    assert out.shape == known.shape
    got, ref = cells_of(out, 2, 2), cells_of(known, 2, 2)
    assert torch.equal(got[:, [0, 3]], ref[:, [0, 3]])          # bit for bit
    for cell in (1, 2):
        assert torch.isfinite(got[:, cell]).all()
        assert not torch.equal(got[:, cell], ref[:, cell])
        assert (got[:, cell] - ref[:, cell]).abs().max() > 1e-3
    assert len(model.batches) == model_forwards(8, jump, times)
    if jump:
        assert len(model.batches) > 8                            # resampling really happened


def test_inpaint_without_mask_is_plain_sampling():
    model = Recorder(tiny_model())
    scheduler = make_sample_scheduler(TRAIN, "ddim", 5)
    shape_only = torch.full((2, 2, 8, 8), 7.0)
    out = inpaint(model, scheduler, shape_only, None, generator=torch.Generator().manual_seed(0))
    assert out.shape == shape_only.shape and torch.isfinite(out).all()
    assert not torch.isclose(out, shape_only).any()
    assert model.batches == [2] * 5


def known_levels(sampler: str, num_steps: int, clean: torch.Tensor, mask: torch.Tensor, jump: int = 0,
                 times: int = 1):
    """Run inpaint with a recording model; return the recorded inputs, timesteps and the mask as bool."""
    model = Recorder(lambda x, t: 0.1 * x, keep=True)
    scheduler = make_sample_scheduler(TRAIN, sampler, num_steps)
    inpaint(model, scheduler, clean, mask, generator=torch.Generator().manual_seed(3),
            repaint_jump=jump, repaint_times=times)
    return model.inputs, [int(t[0]) for t in model.timesteps], mask.expand_as(clean).bool()


@pytest.mark.parametrize("sampler,num_steps", [("ddim", 10), ("ddpm", 10), ("ddpm", 7)])
def test_known_cells_are_at_the_level_of_the_next_model_input(sampler, num_steps):
    """With a huge clean value the known region's level ``sqrt(abar)`` can be read off to 1e-4.

    The known part fed to the model at label ``t`` must be at ``abar_t`` (so after the step
    ``t -> t'`` it is at ``abar_t'``, not at ``abar_t`` as in the reference implementation).
    ``ddpm`` with 7 steps (7 does not divide 1000) checks the scheduler's real next timestep is used.
    """
    g = torch.Generator().manual_seed(0)
    clean = 1e4 + torch.randn(2, 4, 64, 64, generator=g)
    mask = cell_mask([1, 1, 0, 0], 2, 2, 32, 32)
    inputs, labels, known = known_levels(sampler, num_steps, clean, mask)
    assert labels == [int(t) for t in make_sample_scheduler(TRAIN, sampler, num_steps).timesteps]
    z = clean[known].double()
    for x, t in zip(inputs, labels):
        sqrt_a = (x[known].double() * z).sum() / (z * z).sum()
        expected = TRAIN.alphas_cumprod[t].double().sqrt()
        assert abs(sqrt_a / expected - 1) < 1e-3, (t, float(sqrt_a), float(expected))


@pytest.mark.parametrize("sampler,jump,times", [("ddim", 0, 1), ("ddpm", 0, 1), ("ddim", 2, 2)])
def test_known_cells_get_fresh_standard_noise(sampler, jump, times):
    """``x_known = sqrt(abar_t) z + sqrt(1 - abar_t) eps``: eps is N(0, 1) and new at every step."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 4, 64, 64, generator=g)
    mask = cell_mask([1, 1, 0, 0], 2, 2, 32, 32)
    inputs, labels, known = known_levels(sampler, 10, clean, mask, jump, times)
    z = clean[known]
    eps = []
    for x, t in zip(inputs, labels):
        a = float(TRAIN.alphas_cumprod[t])
        e = (x[known] - a ** 0.5 * z) / (1 - a) ** 0.5
        assert abs(float(e.mean())) < 0.05, t
        assert abs(float(e.std()) - 1) < 0.03, t
        eps.append(e)
    assert len(eps) == model_forwards(10, jump, times)
    for i in range(len(eps)):
        for j in range(i + 1, len(eps)):
            corr = float(torch.corrcoef(torch.stack([eps[i], eps[j]]))[0, 1])
            assert abs(corr) < 0.05, (i, j, corr)             # fresh noise at every step


# ------------------------------------------------------------ SDEdit start and shared noise
@pytest.mark.parametrize("sampler,steps,strength,kept", [("ddpm", 10, 1.0, 10), ("ddpm", 10, 0.5, 5),
                                                         ("ddim", 50, 0.3, 15), ("ddpm", 10, 0.01, 1)])
def test_strength_keeps_the_last_part_of_the_schedule(sampler, steps, strength, kept):
    scheduler = make_sample_scheduler(TRAIN, sampler, steps)
    timesteps = strength_timesteps(scheduler, strength)
    assert timesteps == [int(t) for t in scheduler.timesteps][steps - kept:]


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_strength_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="strength"):
        strength_timesteps(make_sample_scheduler(TRAIN, "ddpm", 10), bad)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpaint_from_init_starts_at_the_level_of_its_first_step(sampler):
    """SDEdit: the first model input is ``init`` diffused to the first kept level, and only those steps run."""
    g = torch.Generator().manual_seed(0)
    init = 1e4 + torch.randn(2, 2, 8, 8, generator=g)
    model = Recorder(lambda x, t: 0.1 * x, keep=True)
    scheduler = make_sample_scheduler(TRAIN, sampler, 10)
    inpaint(model, scheduler, torch.zeros_like(init), None, init=init, strength=0.4, generator=g)
    labels = [int(t[0]) for t in model.timesteps]
    assert labels == [int(t) for t in scheduler.timesteps][6:]
    x = model.inputs[0].double()
    sqrt_a = (x * init).sum() / (init.double() ** 2).sum()
    assert abs(sqrt_a / TRAIN.alphas_cumprod[labels[0]].double().sqrt() - 1) < 1e-3


def test_inpaint_with_low_strength_stays_near_init_and_needs_one():
    model = tiny_model()
    init = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    scheduler = make_sample_scheduler(TRAIN, "ddpm", 50)
    g = torch.Generator().manual_seed(2)
    near = inpaint(model, scheduler, init, None, init=init, strength=0.04, generator=g)
    far = inpaint(model, scheduler, init, None, init=init, strength=1.0, generator=g)
    assert (near - init).abs().mean() < 0.25 * (far - init).abs().mean()
    with pytest.raises(ValueError, match="init"):
        inpaint(model, scheduler, init, None, strength=0.5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generators_seeded_alike_give_batch_items_the_same_noise(sampler):
    """A list of generators (diffusers' convention) reaches the initial noise and every scheduler step."""
    model = tiny_model()
    scheduler = make_sample_scheduler(TRAIN, sampler, 5)
    shape = torch.zeros(3, 2, 8, 8)
    same = inpaint(model, scheduler, shape, None, generator=[torch.Generator().manual_seed(7) for _ in range(3)])
    assert torch.allclose(same[0], same[1], atol=1e-5) and torch.allclose(same[0], same[2], atol=1e-5)
    other = inpaint(model, scheduler, shape, None, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    assert torch.allclose(other[0], same[0], atol=1e-5)
    assert not torch.allclose(other[1], other[0], atol=1e-2)


# ------------------------------------------------------------ schedules
@pytest.mark.parametrize("num_steps,jump,times", [(1, 0, 1), (10, 0, 5), (10, 3, 1), (10, 2, 3), (25, 5, 4),
                                                  (7, 3, 2), (4, 10, 3), (50, 10, 10)])
def test_repaint_schedule_walk(num_steps, jump, times):
    walk = repaint_schedule(num_steps, jump, times)
    assert walk[0] == 0 and walk[-1] == num_steps
    assert all(abs(b - a) == 1 for a, b in zip(walk, walk[1:]))
    assert min(walk) >= 0 and max(walk) == num_steps and walk.count(num_steps) == 1
    forwards = sum(1 for a, b in zip(walk, walk[1:]) if b > a)
    assert forwards == model_forwards(num_steps, jump, times)
    if jump <= 0 or times <= 1:
        assert walk == list(range(num_steps + 1))
    else:
        jumps = len(range(jump, num_steps, jump))
        assert forwards == num_steps + (times - 1) * jump * jumps
        assert sum(1 for a, b in zip(walk, walk[1:]) if b < a) == (times - 1) * jump * jumps


# ------------------------------------------------------------- planning
def test_plan_for_201_frames_on_2x2():
    plan = plan_sequence(201, 2, 2, control_rows=1)
    assert (plan.control_rows, plan.chunk, plan.interpolate) == (1, 1, True)
    assert plan.iterations == 33
    assert plan.step1_frames == 4 + 32 * 2 == 68
    assert plan.interpolation_grids == 67
    assert plan.total_frames == 68 + 67 * 2 == 202 >= 201
    fewer = plan_sequence(3 * 66 - 2, 2, 2, control_rows=1)       # 196 frames: one grid less
    assert fewer.iterations == 32 and fewer.total_frames == 196


@pytest.mark.parametrize("n,iterations,grids", [(1, 1, 0), (16, 1, 0), (17, 1, 2), (40, 1, 3), (41, 2, 4),
                                                (100, 6, 8)])
def test_plan_on_4x4_with_the_papers_chunk_of_a_row(n, iterations, grids):
    plan = plan_sequence(n, 4, 4, chunk=4)
    assert plan.control_rows == 3
    assert (plan.iterations, plan.interpolation_grids) == (iterations, grids)
    assert plan.total_frames >= n
    if grids:
        assert plan.level_inputs[0] <= plan.step1_frames and plan.level_inputs[0] % 4 == 0   # whole chunks
        assert plan.total_frames == plan.level_inputs[0] + grids * 8
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
    assert plan.total_frames >= n
    assert plan.strides == [3 ** (plan.levels - level) for level in range(plan.levels + 1)]


def test_plan_on_4x4_defaults_to_single_frame_chunks():
    plan = plan_sequence(201, 4, 4)
    assert (plan.control_rows, plan.chunk, plan.level_inputs) == (3, 1, (15,))
    assert plan.iterations == 1 and plan.total_frames == 15 + 14 * 14 == 211
    assert plan.strides == [15, 1]
    assert plan_sequence(201, 4, 4, chunk=4).strides == [None, None]      # a row of 4: not evenly spaced


def test_plan_without_room_between_chunks_does_not_interpolate():
    plan = plan_sequence(9, 2, 2, control_rows=1, chunk=2)          # 2 + 2 chunks fill the 2x2 grid
    assert not plan.interpolate and plan.interpolation_grids == 0
    assert plan.step1_frames == plan.total_frames >= 9 and plan.iterations == 4
    assert plan.strides == [1]
    plan = plan_sequence(9, 2, 2, levels=0)
    assert plan.iterations == 4 and plan.total_frames == 10


@pytest.mark.parametrize("bad", [0, 2, 3, -1])
def test_plan_refuses_bad_control_rows(bad):
    with pytest.raises(ValueError, match="control_rows"):
        plan_sequence(10, 2, 2, control_rows=bad)


def test_a_single_row_grid_samples_without_extension():
    out = sample_sequence(tiny_model(1, 4, frame=2), make_sample_scheduler(TRAIN, "ddim", 2), num_frames=3,
                          frame_shape=(2, 2, 2), rows=1, cols=4, generator=torch.Generator().manual_seed(0))
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
    out = sample_sequence(None, make_sample_scheduler(TRAIN, "ddim", 2), num_frames=n, frame_shape=(2, 2, 3),
                          rows=rows, cols=cols, batch_size=batch, control_rows=m, max_batch=max_batch)
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
    assert sum(c[0].shape[0] for c in step2_calls) == batch * plan.interpolation_grids
    assert all(c[0].shape[0] <= max_batch for c in step2_calls)
    new_between: dict[tuple[int, int], torch.Tensor] = {}
    for known, flags, out_grid in step2_calls:
        assert flags == [1] * k + [0] * gap + [1] * k
        known_labels = fake.labels(known)
        for row_known, row_out in zip(known_labels, fake.labels(out_grid)):
            a = row_known[:k]
            hits = [(b, p) for b in range(batch) for p in range(plan.interpolation_grids)
                    if torch.equal(step1[b, p * k:(p + 1) * k], a)]
            assert len(hits) == 1, "chunk a is not a chunk of the step-1 sequence"
            b, p = hits[0]
            assert torch.equal(row_known[cells - k:], step1[b, (p + 1) * k:(p + 2) * k])   # b = the next chunk
            assert (b, p) not in new_between
            new_between[(b, p)] = row_out[k:k + gap]
    assert len(new_between) == batch * plan.interpolation_grids

    # the output: a_0, new_0, a_1, new_1, ..., then the rest of step 1; exactly n frames
    for b in range(batch):
        if plan.interpolate:
            parts = []
            for p in range(plan.interpolation_grids):
                parts += [step1[b, p * k:(p + 1) * k], new_between[(b, p)]]
            parts.append(step1[b, plan.interpolation_grids * k:])
            expected = torch.cat(parts)
        else:
            expected = step1[b]
        assert len(expected) == plan.total_frames
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
    out = sample_sequence(model, make_sample_scheduler(TRAIN, "ddpm", 3), num_frames=48, frame_shape=(2, 2, 2),
                          rows=rows, cols=cols, batch_size=2, control_rows=m, max_batch=3, chunk=4,
                          generator=torch.Generator().manual_seed(0))
    plan = plan_sequence(48, rows, cols, control_rows=m, chunk=4)
    assert (plan.iterations, plan.interpolation_grids) == (2, 4) and out.shape == (2, 48, 2, 2, 2)
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
    assert plan.total_frames == 52                                          # a_4 is dropped: exactly 48


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
    out = sample_sequence(model, make_sample_scheduler(TRAIN, "ddim", steps), num_frames=n, frame_shape=(2, 2, 2),
                          rows=rows, cols=cols, batch_size=batch, control_rows=m, max_batch=max_batch,
                          generator=torch.Generator().manual_seed(0), repaint_jump=jump, repaint_times=times)
    assert out.shape == (batch, n, 2, 2, 2)
    plan = plan_sequence(n, rows, cols, control_rows=m)
    per_grid = model_forwards(steps, jump, times)
    grids2 = batch * plan.interpolation_grids
    assert len(model.batches) == (plan.iterations + math.ceil(grids2 / max_batch)) * per_grid
    expected = [batch] * (plan.iterations * per_grid)
    for start in range(0, grids2, max_batch):
        expected += [min(max_batch, grids2 - start)] * per_grid
    assert model.batches == expected                                      # never a doubled (guidance) batch


def test_same_seed_same_sequence_other_seed_other_sequence():
    model = tiny_model()
    scheduler = make_sample_scheduler(TRAIN, "ddpm", 4)

    def run(seed):
        return sample_sequence(model, scheduler, num_frames=9, frame_shape=(2, 4, 4), rows=2, cols=2,
                               batch_size=2, control_rows=1, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 9, 2, 4, 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])                               # the sequences of a batch differ


def test_progress_callback_counts_forwards_per_phase():
    seen: dict[str, list[tuple[int, int]]] = {}
    sample_sequence(tiny_model(), make_sample_scheduler(TRAIN, "ddim", 3), num_frames=12, frame_shape=(2, 4, 4),
                    rows=2, cols=2, control_rows=1, max_batch=2, callback=lambda ph, d, t: seen.setdefault(ph, []).append((d, t)))
    plan = plan_sequence(12, 2, 2, control_rows=1)
    assert set(seen) == {"extend", "interpolate"}
    assert seen["extend"] == [(i, plan.iterations * 3) for i in range(1, plan.iterations * 3 + 1)]
    total = math.ceil(plan.interpolation_grids / 2) * 3
    assert seen["interpolate"] == [(i, total) for i in range(1, total + 1)]


# ------------------------------------- it really continues a sequence
PERIOD, SIZE = 24, 8


def blob_frame(f: float) -> torch.Tensor:
    """Frame ``f`` of a fixed smooth sequence: a Gaussian blob going round a circle, ``(1, 8, 8)`` in [-1, 1]."""
    angle = 2 * math.pi * f / PERIOD
    cy, cx = 3.5 + 2.2 * math.sin(angle), 3.5 + 2.2 * math.cos(angle)
    y = torch.arange(SIZE, dtype=torch.float32).view(SIZE, 1)
    x = torch.arange(SIZE, dtype=torch.float32).view(1, SIZE)
    return (2 * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 1.2 ** 2)) - 1).unsqueeze(0)


BLOB = torch.stack([blob_frame(f) for f in range(PERIOD)])               # (P, 1, 8, 8), periodic


def blob_frames(starts: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count, 1, 8, 8)``: ``count`` consecutive frames from each start."""
    return BLOB[(starts.view(-1, 1) + torch.arange(count).view(1, -1)) % PERIOD]


def new_model() -> GridDiT:
    return create_dit("DiT-tiny/2", sample_height=16, sample_width=16, in_channels=1, grid_rows=2, grid_cols=2,
                      hidden_size=64, depth=3, num_heads=4)


@pytest.fixture(scope="module")
def blob_models():
    """A stage-1 model trained on 2x2 grids of consecutive blob frames (fixed seed), and an untrained one."""
    torch.manual_seed(0)
    model = new_model()
    scheduler = make_train_scheduler(clip_sample=True)                    # pixel space: x0 is in [-1, 1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(900):
        starts = torch.randint(0, PERIOD, (32,), generator=g)
        loss = diffusion_loss(model, scheduler, tile(blob_frames(starts, 4), 2, 2), generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(1)
    return model.eval(), new_model().eval(), scheduler, loss.item()


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


@pytest.mark.slow
def test_trained_model_continues_the_sequence(blob_models):
    model, untrained, train_scheduler, last_loss = blob_models
    assert last_loss < 0.1
    scheduler = make_sample_scheduler(train_scheduler, "ddim", 20)
    starts = torch.arange(0, PERIOD, 2)                                  # 12 different phases
    # grid k-1 holds frames s..s+3; grid k has its last row (s+2, s+3) first and must continue with s+4, s+5
    truth = blob_frames(starts + 2, 4)
    known = tile(truth, 2, 2)
    mask = cell_mask([1, 1, 0, 0], 2, 2, SIZE, SIZE)
    with torch.no_grad():
        out = inpaint(model, scheduler, known * mask, mask, generator=torch.Generator().manual_seed(1),
                      repaint_jump=2, repaint_times=4)
        free = inpaint(model, scheduler, known, None, generator=torch.Generator().manual_seed(1),
                       repaint_jump=2, repaint_times=4)
        blind = inpaint(untrained, scheduler, known * mask, mask, generator=torch.Generator().manual_seed(1))
    new = untile(out, 2, 2)[:, 2:]                                       # (B, 2, 1, 8, 8)
    assert torch.equal(untile(out, 2, 2)[:, :2], truth[:, :2])
    target = truth[:, 2:]                                                # frames s+4, s+5
    err = mse(new, target)
    far = mse(new, blob_frames(starts + 4 + PERIOD // 2, 2))            # the opposite side of the circle
    backwards = mse(new, blob_frames(starts, 2))                        # s, s+1: the sequence run backwards
    ignored = mse(untile(free, 2, 2)[:, 2:], target)                    # what the model makes without context
    untrained_err = mse(untile(blind, 2, 2)[:, 2:], target)
    assert err < 0.05, err
    assert err < 0.25 * far, (err, far)
    assert err < 0.25 * backwards, (err, backwards)
    assert err < 0.25 * ignored, (err, ignored)
    assert err < 0.1 * untrained_err, (err, untrained_err)
    per_item = ((new - target) ** 2).mean(dim=(1, 2, 3, 4))
    assert (per_item < 0.15).all(), per_item                             # every phase, not on average


@pytest.mark.slow
def test_trained_model_extends_a_sequence_frame_by_frame(blob_models):
    """sample_sequence alone (no interpolation): consecutive frames advance by about one step.

    Taking the wrong rows of grid ``k-1`` (its first row) makes the phase go back and forth,
    ignoring them makes it jump, and swapping new frames makes steps of -1 and +3.
    """
    model, _, train_scheduler, _ = blob_models
    scheduler = make_sample_scheduler(train_scheduler, "ddpm", 20)
    with torch.no_grad():
        frames = sample_sequence(model, scheduler, num_frames=10, frame_shape=(1, SIZE, SIZE), rows=2, cols=2,
                                 batch_size=8, control_rows=1, levels=0,
                                 generator=torch.Generator().manual_seed(2), repaint_jump=2, repaint_times=4)
    assert frames.shape == (8, 10, 1, SIZE, SIZE)
    # the phase of every frame: the nearest frame of the true sequence
    dist = ((frames.unsqueeze(2) - BLOB.view(1, 1, PERIOD, 1, SIZE, SIZE)) ** 2).mean(dim=(3, 4, 5))
    best, phase = dist.min(dim=2)                                       # (B, N)
    assert float(best.mean()) < 0.05, best                              # frames look like frames of the sequence
    step = (phase[:, 1:] - phase[:, :-1] + PERIOD // 2) % PERIOD - PERIOD // 2   # signed, in [-12, 12)
    assert float(((step >= 0) & (step <= 2)).float().mean()) >= 0.9, phase
    assert 0.6 < float(step.float().mean()) < 1.4, phase
    assert float((step == 1).float().mean()) >= 0.5, phase


# ------------------------------------------------ noise along sequences
def test_sequence_noise_is_standard_and_correlates_by_distance():
    noise = SequenceNoise(seed=3, sequence_length=60, correlation_length=2.0)
    x = noise.frames(0, 120).draw(torch.zeros(120, 1, 32, 32)).flatten(1)          # two sequences of 60
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02

    def corr(i, j):
        return float(torch.corrcoef(torch.stack([x[i], x[j]]))[0, 1])

    for lag, expected in [(1, math.exp(-1 / 16)), (3, math.exp(-9 / 16)), (6, math.exp(-36 / 16)), (20, 0.0)]:
        measured = sum(corr(k, k + lag) for k in range(10, 30)) / 20
        assert abs(measured - expected) < 0.06, (lag, measured, expected)
    assert abs(sum(corr(59 - k, 60 + k) for k in range(5)) / 5) < 0.06         # the next sequence: independent


def test_sequence_noise_joins_up_across_batches_and_is_seeded():
    like = torch.zeros(20, 2, 4, 4)
    whole = SequenceNoise(seed=1, sequence_length=10, correlation_length=1.5).frames(0, 20)
    first, again = whole.draw(like), whole.draw(like)                             # draws 0 and 1
    assert not torch.allclose(first, again)
    a, b = SequenceNoise(1, 10, 1.5).frames(0, 7), SequenceNoise(1, 10, 1.5).frames(7, 13)
    for expected in (first, again):                                              # batch by batch, draw by draw
        torch.testing.assert_close(torch.cat([a.draw(like[:7]), b.draw(like[7:])]), expected)
    assert not torch.allclose(SequenceNoise(2, 10, 1.5).frames(0, 20).draw(like), first)
    with pytest.raises(ValueError, match="for 20 frames"):
        whole.draw(like[:3])
    with pytest.raises(ValueError, match="length > 0"):
        SequenceNoise(1, 10, 0.0)


class GivenNoise(NoiseDraws):
    """NoiseDraws that hand out fixed tensors, to compare scheduler_step with DDPM's own step."""

    def __init__(self, *draws: torch.Tensor):
        super().__init__(SequenceNoise(0, 1, 1.0), 0, draws[0].shape[0])
        self.draws = list(draws)

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        return self.draws.pop(0)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_at_eta_1_with_given_noise_is_the_ddpm_step(clip):
    """scheduler_step with noise along sequences runs DDIM at eta 1; with DDPM's own noise it equals DDPM's
    step, with a clipping scheduler too (x0 beyond [-1, 1] here, so clipping acts at every step)."""
    train = make_train_scheduler(clip_sample=clip)
    ddpm, ddim = make_sample_scheduler(train, "ddpm", 10), make_sample_scheduler(train, "ddim", 10)
    assert list(ddpm.timesteps) == list(ddim.timesteps)
    g = torch.Generator().manual_seed(0)
    x, eps = 3 * torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    worst_unclipped = 0.0
    for t in [int(t) for t in ddpm.timesteps[:-1]]:                              # the last step adds no noise
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        expected = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        got = scheduler_step(ddim, eps, t, x, GivenNoise(z))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        plain = ddim.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample     # without use_clipped_model_output
        worst_unclipped = max(worst_unclipped, float((plain - expected).abs().max()))
    assert (worst_unclipped > 0.05) == clip, worst_unclipped
    draws = SequenceNoise(0, 3, 1.0).frames(0, 3)
    assert not torch.allclose(scheduler_step(ddim, eps, 500, x, draws), ddim.step(eps, 500, x).prev_sample)
    with pytest.raises(ValueError, match="needs the DDIM scheduler"):
        scheduler_step(ddpm, eps, 500, x, draws)
