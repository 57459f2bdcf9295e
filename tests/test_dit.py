"""The grid DiT of both stages and its fixed positional embeddings (docs/METHOD.md sections 2-4, 8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ctgridit.core.dit import DIT_PRESETS, GridDiT, create_dit
from ctgridit.core.embeddings import grid_2d_pos_embed, grid_3d_pos_embed, sincos_1d

HIDDEN = 48  # DiT-tiny/2


def direct_sincos(d: int, p: float) -> list[float]:
    """``[sin(p*w_k)]_k + [cos(p*w_k)]_k`` with ``w_k = 10000^(-2k/d)``, written out."""
    w = [10000 ** (-2 * k / d) for k in range(d // 2)]
    return [math.sin(p * wk) for wk in w] + [math.cos(p * wk) for wk in w]


def direct_3d(hidden: int, rows: int, cols: int, hp: int, wp: int) -> torch.Tensor:
    """docs/METHOD.md section 2 patch by patch, independent of the vectorised code."""
    part = hidden // 3
    out = []
    for py in range(rows * hp):
        for px in range(cols * wp):
            f = (py // hp) * cols + (px // wp)
            out.append(direct_sincos(part, f) + direct_sincos(part, py % hp) + direct_sincos(part, px % wp))
    return torch.tensor(out, dtype=torch.float32).unsqueeze(0)


def tiny(**overrides) -> GridDiT:
    config = dict(sample_height=16, sample_width=16, grid_rows=2, grid_cols=2)
    return create_dit("DiT-tiny/2", **{**config, **overrides})


def randomized(model: GridDiT, seed: int = 0) -> GridDiT:
    """Overwrite every parameter with noise, so that outputs are non-zero and depend on all weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def public_config(model: GridDiT) -> dict:
    """The config without diffusers' bookkeeping entries (``_name_or_path``, ...)."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def inputs(model: GridDiT, batch: int = 2, seed: int = 1) -> dict:
    """Random model inputs: ``sample``, distinct ``timestep`` per item and, for stage 2, ``cond``."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    size = (cfg.sample_height, cfg.sample_width)
    out = {"sample": torch.randn(batch, cfg.in_channels, *size, generator=g),
           "timestep": torch.randperm(1000, generator=g)[:batch]}
    if cfg.cond_channels:
        out["cond"] = torch.randn(batch, cfg.cond_channels, *size, generator=g)
    return out


# ----------------------------------------------------------------- embeddings
def test_sincos_1d_is_the_documented_formula():
    got = sincos_1d(8, torch.tensor([0.0, 1.0, 5.0]))
    want = torch.tensor([direct_sincos(8, p) for p in (0.0, 1.0, 5.0)], dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (3, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        sincos_1d(7, torch.arange(3))


@pytest.mark.parametrize("rows,cols,hp,wp", [(2, 2, 2, 2), (4, 4, 2, 2), (2, 2, 2, 3), (2, 3, 3, 2), (1, 1, 4, 4)])
def test_3d_embedding_matches_direct_formula(rows, cols, hp, wp):
    got = grid_3d_pos_embed(HIDDEN, rows, cols, hp, wp)
    assert got.shape == (1, rows * hp * cols * wp, HIDDEN) and got.dtype == torch.float32
    torch.testing.assert_close(got, direct_3d(HIDDEN, rows, cols, hp, wp), rtol=0, atol=1e-6)


def test_3d_embedding_decomposes_into_frame_row_column():
    rows, cols, hp, wp = 2, 3, 2, 3                                 # non-square frames, 6 frames
    emb = grid_3d_pos_embed(HIDDEN, rows, cols, hp, wp)[0].reshape(rows * hp, cols * wp, HIDDEN)
    part = HIDDEN // 3
    frame, inframe = slice(0, part), slice(part, HIDDEN)
    # two patches of frame 4 = cell (1, 1): rows 2..3, columns 3..5
    a, b = emb[2, 3], emb[3, 5]
    assert torch.equal(a[frame], b[frame]) and not torch.allclose(a[inframe], b[inframe])
    # in-frame position (1, 2) in frames 0, 1 and 5
    p0, p1, p5 = emb[1, 2], emb[1, 5], emb[3, 8]
    for other in (p1, p5):
        assert torch.equal(p0[inframe], other[inframe]) and not torch.allclose(p0[frame], other[frame])
    torch.testing.assert_close(emb[3, 8, frame], sincos_1d(part, torch.tensor([5.0]))[0])


def test_3d_embedding_needs_hidden_divisible_by_6():
    with pytest.raises(ValueError, match="divisible by 6"):
        grid_3d_pos_embed(64, 2, 2, 2, 2)
    emb = grid_3d_pos_embed(64, 2, 2, 2, 2, pad_remainder=True)     # DiT-L style: 3 x 20 dims + 4 zeros
    assert emb.shape == (1, 16, 64)
    torch.testing.assert_close(emb[..., :60], direct_3d(60, 2, 2, 2, 2), rtol=0, atol=1e-6)
    assert torch.count_nonzero(emb[..., 60:]) == 0


def test_2d_embedding_is_dit_sincos_over_the_grid():
    emb = grid_2d_pos_embed(HIDDEN, 2, 3)[0]
    want = [direct_sincos(HIDDEN // 2, x) + direct_sincos(HIDDEN // 2, y) for y in range(2) for x in range(3)]
    torch.testing.assert_close(emb, torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_2d_pos_embed(42, 2, 2)


# ------------------------------------------------- positional embedding in the model
def test_pos_embedding_is_a_config_buffer_not_a_parameter(tmp_path):
    model = tiny()
    assert torch.equal(model.pos_embedding, grid_3d_pos_embed(HIDDEN, 2, 2, 4, 4))
    assert all("pos" not in name for name, _ in model.named_parameters())
    assert all("pos" not in key for key in model.state_dict())
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert all("pos" not in key for key in load_file(tmp_path / "diffusion_pytorch_model.safetensors"))


def test_pos_embedding_survives_loading(tmp_path):
    model = tiny(grid_rows=4, grid_cols=4)
    want = model.pos_embedding.clone()
    model.save_pretrained(tmp_path)
    assert torch.equal(GridDiT.from_pretrained(tmp_path).pos_embedding, want)
    # a foreign checkpoint with a (2D, trained, ...) pos_embed loaded non-strictly cannot touch it
    bogus = {**model.state_dict(), "pos_embed": torch.randn_like(want), "pos_embedding": torch.randn_like(want)}
    result = model.load_state_dict(bogus, strict=False)
    assert set(result.unexpected_keys) == {"pos_embed", "pos_embedding"} and not result.missing_keys
    assert torch.equal(model.pos_embedding, want)


def test_2d_option_differs_from_3d():
    model_2d, model_3d = tiny(pos_embed="2d"), tiny()
    assert torch.equal(model_2d.pos_embedding, grid_2d_pos_embed(HIDDEN, 8, 8))
    assert not torch.allclose(model_2d.pos_embedding, model_3d.pos_embedding)
    model_3d.load_state_dict(randomized(model_2d).state_dict())     # same weights, different embedding
    with torch.no_grad():
        out_2d, out_3d = model_2d(**inputs(model_2d)), model_3d(**inputs(model_3d))
    assert out_2d.shape == out_3d.shape and not torch.allclose(out_2d, out_3d)
    with pytest.raises(ValueError, match="pos_embed"):
        tiny(pos_embed="1d")


# -------------------------------------------------------------------- save / load
@pytest.mark.parametrize("overrides", [{}, {"cond_channels": 4, "grid_rows": 1, "grid_cols": 1}],
                         ids=["stage1", "stage2"])
def test_save_load_round_trip_is_exact(tmp_path, overrides):
    model = randomized(tiny(**overrides)).eval()
    model.save_pretrained(tmp_path)
    loaded = GridDiT.from_pretrained(tmp_path).eval()
    assert public_config(loaded) == public_config(model)
    x = inputs(model)
    with torch.no_grad():
        out, again = model(**x), loaded(**x)
    assert torch.count_nonzero(out) > 0 and torch.equal(out, again)


# ------------------------------------------------------------------------ forward
@pytest.mark.parametrize("rows,cols,frame_h,frame_w", [(1, 1, 16, 16), (2, 2, 8, 8), (4, 4, 4, 4),
                                                       (2, 3, 8, 8), (2, 2, 8, 12), (2, 3, 6, 4)])
def test_output_shape_for_grid_shapes_and_non_square_frames(rows, cols, frame_h, frame_w):
    model = tiny(sample_height=rows * frame_h, sample_width=cols * frame_w, grid_rows=rows, grid_cols=cols)
    x = inputs(model, batch=3)
    assert model.frame_size == (frame_h, frame_w)
    assert model.pos_embedding.shape == (1, rows * cols * frame_h * frame_w // 4, HIDDEN)
    with torch.no_grad():
        assert model(**x).shape == x["sample"].shape


def test_scalar_timestep_is_broadcast():
    model = randomized(tiny())
    sample = inputs(model)["sample"]
    with torch.no_grad():
        assert torch.equal(model(sample, 250), model(sample, torch.tensor([250, 250])))
    with pytest.raises(ValueError, match="timestep"):
        model(sample, torch.tensor([1, 2, 3]))


def test_stage2_uses_and_requires_its_condition():
    model = randomized(tiny(cond_channels=4, grid_rows=1, grid_cols=1))
    assert model.x_embedder.proj.in_channels == 8 and model.final_layer.linear.out_features == 2 * 2 * 4
    x = inputs(model)
    with torch.no_grad():
        out = model(**x)
        assert out.shape == x["sample"].shape
        assert not torch.allclose(out, model(x["sample"], x["timestep"], cond=torch.zeros_like(x["cond"])))
    with pytest.raises(ValueError, match="conditional.*cond"):
        model(x["sample"], x["timestep"])
    with pytest.raises(ValueError, match="cond must have shape"):
        model(x["sample"], x["timestep"], cond=x["cond"][:, :2])


def test_stage1_refuses_a_condition_and_wrong_sizes():
    model = tiny()
    x = inputs(model)
    with pytest.raises(ValueError, match="unconditional"):
        model(**x, cond=x["sample"])
    with pytest.raises(ValueError, match="sample must be"):
        model(x["sample"][..., :8], x["timestep"])


def test_stride_labels_reach_the_prediction_and_are_checked(tmp_path):
    model = randomized(tiny(num_strides=9))
    assert model.stride_embedder.weight.shape == (10, HIDDEN)
    fresh = tiny(num_strides=9).stride_embedder.weight.detach()
    assert 0.01 < float(fresh.std()) < 0.03                       # DiT's label init, N(0, 0.02)
    x = inputs(model, batch=3)
    with torch.no_grad():
        one, three = model(**x, stride=1), model(**x, stride=torch.tensor([3, 3, 3]))
        assert not torch.allclose(one, three)
        assert torch.equal(model(**x), model(**x, stride=0))                      # None is "not given" (0)
        mixed = model(**x, stride=torch.tensor([1, 3, 1]))
        torch.testing.assert_close(mixed[1], three[1])
        torch.testing.assert_close(mixed[0], one[0])
    for bad in (10, -1, torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="stride"):
            model(**x, stride=bad)
    with pytest.raises(ValueError, match="no stride label"):
        tiny()(**x, stride=1)
    model.save_pretrained(tmp_path)
    loaded = GridDiT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**x, stride=3), three)


def test_masked_conditional_stage1_takes_the_known_cells_and_the_mask():
    """A stage-1 grid model with cond_channels = latent channels + 1 (masked conditioning)."""
    from ctgridit.core.conditioning import condition_channels, masked_condition
    from ctgridit.core.grid import cell_mask

    model = randomized(tiny(cond_channels=condition_channels(4)))
    x = inputs(model, batch=2)
    mask = cell_mask([1, 1, 0, 0], 2, 2, 8, 8)
    known = torch.randn(x["sample"].shape, generator=torch.Generator().manual_seed(3))
    cond = masked_condition(known, mask)
    assert cond.shape == (2, 5, 16, 16)
    assert torch.equal(cond[:, 4:], mask.expand(2, 1, 16, 16)) and torch.equal(cond[:, :4, 8:], torch.zeros(2, 4, 8, 16))
    with torch.no_grad():
        given = model(x["sample"], x["timestep"], cond=cond)
        other = model(x["sample"], x["timestep"], cond=masked_condition(-known, mask))
    assert not torch.allclose(given, other)


@pytest.mark.parametrize("flags,expected", [
    ([1, 0, 0, 1], [10, 20, 30, 40]),                       # interpolation: weighted by distance in frames
    ([1, 1, 0, 0], [10, 20, 20, 20]),                       # extension: the last known frame held
    ([0, 0, 1, 1], [30, 30, 30, 40]),                       # known only after: the nearest held
    ([0, 0, 0, 0], [0, 0, 0, 0]),                           # nothing known: zeros
    ([1, 0, 0, 0, 0, 1, 0, 0, 1], [0, 2, 4, 6, 8, 10, 20, 30, 40]),   # 3 x 3, two gaps of different length
])
def test_unknown_cells_are_filled_by_linear_interpolation_in_frame_order(flags, expected):
    from ctgridit.core.conditioning import fill_unknown_cells
    from ctgridit.core.grid import cell_mask, tile

    side = int(len(flags) ** 0.5)
    values = torch.tensor([0., 0, 0, 0, 0, 10, 0, 0, 40] if side == 3 else [10., 20, 30, 40])
    cells = values.view(1, -1, 1, 1, 1).expand(2, -1, 3, 2, 2)           # 2 items, 3 channels, 2 x 2 cells
    mask = cell_mask([flags, flags], side, side, 2, 2)
    filled = fill_unknown_cells(tile(cells, side, side) * mask, mask, side, side)
    want = tile(torch.tensor(expected, dtype=torch.float32).view(1, -1, 1, 1, 1).expand_as(cells), side, side)
    torch.testing.assert_close(filled, want)


def test_the_fill_follows_the_cells_positions_when_given():
    """Two new slices at 1/5 and 2/5 of a gap (a gap made five times finer): the known slices mixed 4:1 and 3:2,
    not at the thirds the cell index would give."""
    from ctgridit.core.conditioning import fill_unknown_cells
    from ctgridit.core.grid import cell_mask, tile

    cells = torch.tensor([10., 0, 0, 60]).view(1, -1, 1, 1, 1).expand(2, -1, 1, 2, 2)
    mask = cell_mask([[1, 0, 0, 1]] * 2, 2, 2, 2, 2)
    positions = torch.tensor([[0.0, 0.2, 0.4, 1.0], [0.0, 0.5, 0.5, 1.0]])
    filled = fill_unknown_cells(tile(cells, 2, 2) * mask, mask, 2, 2, positions=positions)
    want = torch.tensor([[10., 20, 30, 60], [10., 35, 35, 60]]).view(2, -1, 1, 1, 1).expand_as(cells)
    torch.testing.assert_close(filled, tile(want, 2, 2))


def test_a_linear_fill_model_sees_the_interpolated_cells(tmp_path):
    """cond_fill="linear": the condition made for the model (model_condition, once per grid) holds the
    interpolated cells, so the output depends on the known cells only, not on what the caller put in the others;
    forward takes the condition as given; the setting travels with the weights."""
    from ctgridit.core.conditioning import condition_channels, masked_condition, model_condition
    from ctgridit.core.grid import cell_mask

    model = randomized(tiny(cond_channels=condition_channels(4), cond_fill="linear"))
    x = inputs(model, batch=2)
    mask = cell_mask([1, 0, 0, 1], 2, 2, 8, 8)
    known = torch.randn(x["sample"].shape, generator=torch.Generator().manual_seed(3))
    other = known + (1 - mask) * 5.0                                       # differs on the unknown cells only
    cond = model_condition(model, known, mask)
    torch.testing.assert_close(cond, masked_condition(known, mask, "linear", 2, 2), rtol=0, atol=0)
    with torch.no_grad():
        given = model(x["sample"], x["timestep"], cond=cond)
        assert torch.equal(model(x["sample"], x["timestep"], cond=model_condition(model, other, mask)), given)
        unfilled = model(x["sample"], x["timestep"], cond=masked_condition(known, mask))     # taken as given
        assert not torch.allclose(unfilled, given)
    model.save_pretrained(tmp_path)
    loaded = GridDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.cond_fill == "linear"
    with torch.no_grad():
        assert torch.equal(loaded(x["sample"], x["timestep"], cond=model_condition(loaded, known, mask)), given)


def test_the_fill_runs_once_per_grid_not_at_every_step(monkeypatch):
    """The flow fill (TV-L1 between the known cells) is made before the reverse diffusion loop: one flow
    estimate for a 10-step walk, whatever the number of steps."""
    from ctgridit.core.conditioning import condition_channels
    from ctgridit.core.diffusion import make_sample_scheduler, make_train_scheduler
    from ctgridit.core.grid import cell_mask
    from ctgridit.core.motion import TVL1
    from ctgridit.core.sampler import inpaint

    model = randomized(tiny(cond_channels=condition_channels(4), cond_fill="flow"))
    calls = []
    flow = TVL1.flow
    monkeypatch.setattr(TVL1, "flow", lambda self, a, b: (calls.append(1), flow(self, a, b))[1])
    mask = cell_mask([1, 0, 0, 1], 2, 2, 8, 8)
    known = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    scheduler = make_sample_scheduler(make_train_scheduler(), "ddim", 10)
    with torch.no_grad():
        inpaint(model, scheduler, known, mask, conditional=True, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1


@pytest.mark.parametrize("fill", ["linear", "flow"])
def test_a_fill_residual_model_starts_at_the_interpolation_and_adds_its_correction(fill):
    """fill_residual: the output is the filled condition plus the network's output; a new model (last layer at
    zero, DiT's init) outputs the interpolation of the known cells exactly (linear, or along their motion)."""
    from ctgridit.core.conditioning import condition_channels, fill_unknown_cells, masked_condition
    from ctgridit.core.grid import cell_mask
    from ctgridit.core.motion import TVL1

    fresh = tiny(cond_channels=condition_channels(4), cond_fill=fill, fill_residual=True)
    x = inputs(fresh, batch=2)
    mask = cell_mask([1, 0, 0, 1], 2, 2, 8, 8).expand(2, 1, 16, 16)
    known = torch.randn(x["sample"].shape, generator=torch.Generator().manual_seed(3))
    cond = masked_condition(known, mask, fill, 2, 2)
    filled = fill_unknown_cells(known * mask, mask, 2, 2, TVL1() if fill == "flow" else None)
    if fill == "flow":
        assert not torch.allclose(filled, fill_unknown_cells(known * mask, mask, 2, 2))
    with torch.no_grad():
        assert torch.equal(fresh(x["sample"], x["timestep"], cond=cond), filled)
        trained = randomized(fresh)
        plain = randomized(tiny(cond_channels=condition_channels(4), cond_fill=fill))
        assert torch.allclose(trained(x["sample"], x["timestep"], cond=cond),
                              filled + plain(x["sample"], x["timestep"], cond=cond))


@pytest.mark.parametrize("overrides,match", [
    ({"fill_residual": True, "cond_channels": 5}, "fill_residual"),
    ({"cond_fill": "nearest", "cond_channels": 5}, "cond_fill"),
    ({"cond_fill": "linear", "cond_channels": 4}, "masked-conditional"),
    ({"cond_fill": "flow_pair", "cond_channels": 5}, "masked-conditional"),
    ({"sample_height": 18, "grid_rows": 4}, "whole frames"),        # 18 rows are not 4 frames
    ({"sample_height": 6, "grid_rows": 2}, "patches"),              # frames of 3 rows, patch 2
    ({"num_heads": 5}, "num_heads"),
    ({"cond_channels": -1}, "cond_channels"),
    ({"num_strides": -2}, "num_strides"),
])
def test_inconsistent_configs_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_fresh_model_predicts_zero_then_learns():
    torch.manual_seed(0)
    model = tiny()
    x = inputs(model)
    assert torch.count_nonzero(model(**x)) == 0                     # adaLN-Zero and a zero final layer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.mse_loss(model(**x), torch.randn_like(x["sample"])).backward()
    optimizer.step()
    with torch.no_grad():
        assert torch.count_nonzero(model(**x)) > 0


def test_attention_runs_through_sdpa(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    model = tiny()
    with torch.no_grad():
        model(**inputs(model))
    assert calls == [(2, 2, 64, HIDDEN // 2)] * model.config.depth  # (N, heads, T, D/heads), once per block


def test_gradient_checkpointing_gives_the_same_gradients():
    x = inputs(tiny())
    grads = []
    for checkpointing in (False, True):
        model = randomized(tiny())
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(**x).square().mean().backward()
        grads.append(model.x_embedder.proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------ presets
def test_presets_have_dit_sizes():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name, (depth, hidden, heads) in sizes.items():
        for patch in (2, 4, 8):
            assert DIT_PRESETS[f"DiT-{name}/{patch}"] == dict(depth=depth, hidden_size=hidden, num_heads=heads,
                                                             patch_size=patch)
    assert "DiT-tiny/2" in DIT_PRESETS
    with pytest.raises(ValueError, match="unknown DiT preset"):
        create_dit("DiT-XXL/2", sample_height=32, sample_width=32)


@pytest.mark.parametrize("preset", sorted(DIT_PRESETS))
@pytest.mark.parametrize("pos_embed", ["3d", "2d"])
def test_every_preset_builds(preset, pos_embed):
    with torch.device("meta"):                                      # no memory, no init cost
        model = create_dit(preset, sample_height=64, sample_width=64, pos_embed=pos_embed)
    hidden = DIT_PRESETS[preset]["hidden_size"]
    assert model.pos_embedding.shape == (1, (64 // DIT_PRESETS[preset]["patch_size"]) ** 2, hidden)
    assert len(model.blocks) == DIT_PRESETS[preset]["depth"]


def test_dit_xl_2_has_the_paper_parameter_count():
    with torch.device("meta"):
        model = create_dit("DiT-XL/2", sample_height=32, sample_width=32, grid_rows=1, grid_cols=1)
    count = sum(p.numel() for p in model.parameters())
    # DiT's 675,129,632 less what GriDiT drops: the class table (1001 x 1152), the pos_embed
    # parameter (256 x 1152) and the learned-sigma half of the output layer (1152 x 16 + 16)
    assert count == 675_129_632 - 1001 * 1152 - 256 * 1152 - (1152 * 16 + 16)
    assert abs(count / 675e6 - 1) < 0.01


def test_small_preset_runs_on_cpu():
    model = create_dit("DiT-S/8", sample_height=32, sample_width=32, grid_rows=2, grid_cols=2)
    x = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        assert model(x, 10).shape == x.shape


def test_a_flow_pair_model_starts_at_the_flow_fill_and_moves_each_moved_slice_in_its_own_cell():
    """cond_fill="flow_pair" with fill_residual: the condition holds the two known cells moved along their motion
    to each cell and the weight of the second; a new model (last layer at zero) outputs their mix, the flow fill;
    a displacement output moves each moved cell within its own cell (its edge repeated, never its neighbour's)."""
    from ctgridit.core.conditioning import (PAIR_FIELDS, PAIR_SHIFT, condition_channels, fill_unknown_cells,
                                            masked_condition, moved_cells)
    from ctgridit.core.grid import cell_mask, untile
    from ctgridit.core.motion import TVL1

    fresh = tiny(cond_channels=condition_channels(4, "flow_pair"), cond_fill="flow_pair", fill_residual=True)
    assert fresh.out_channels == 4 + PAIR_FIELDS
    x = inputs(fresh, batch=2)
    mask = cell_mask([1, 0, 0, 1], 2, 2, 8, 8).expand(2, 1, 16, 16)
    known = torch.randn(x["sample"].shape, generator=torch.Generator().manual_seed(3)).cumsum(-1)
    positions = torch.tensor([[0.0, 0.2, 0.7, 1.0]])
    cond = masked_condition(known, mask, "flow_pair", 2, 2, positions)
    first, last, weight = moved_cells(known * mask, mask, 2, 2, TVL1(), positions)
    assert cond.shape == (2, 10, 16, 16)
    torch.testing.assert_close(untile(weight, 2, 2)[:, :, 0, 0, 0], torch.tensor([[0.0, 0.2, 0.7, 0.0]] * 2))
    filled = fill_unknown_cells(known * mask, mask, 2, 2, TVL1(), positions)
    assert not torch.allclose(first, last)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x["sample"], x["timestep"], cond=cond), filled, atol=1e-5, rtol=0)
        bias = fresh.final_layer.linear.bias.view(-1, 4 + PAIR_FIELDS)   # (p * p, channels)
        bias[:, 4] = 1 / PAIR_SHIFT                                       # the first moved cell: one pixel along x
        bias[:, 8] = -30.0                                                # and only it (weight of the second ~0)
        out = untile(fresh(x["sample"], x["timestep"], cond=cond), 2, 2)
    want = untile(first, 2, 2)
    torch.testing.assert_close(out[..., :-1], want[..., 1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., -1], want[..., -1], atol=1e-4, rtol=0)   # its own edge, not the next cell
