"""ImageNet DiT weights in GridDiT: DiT's own layout and diffusers' DiTTransformer2DModel, no download.

The checkpoints are built here from random weights; a compact re-statement of
DiT's forward (Peebles & Xie's models.py: the same modules and order) is the
reference. Converted, GridDiT with the 2D embedding and the null class label
must give the same noise prediction.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ctgridit.core.dit import GridDiT, create_dit
from ctgridit.core.dit_import import dit_state_dict, load_dit_weights, read_dit_weights
from ctgridit.core.embeddings import grid_2d_pos_embed

D, HEADS, DEPTH, P, C, SIZE, CLASSES = 48, 2, 2, 2, 4, 8, 10


def random_dit_state(seed: int = 0, hidden: int = D, depth: int = DEPTH, learn_sigma: bool = True
                     ) -> dict[str, torch.Tensor]:
    """DiT's state dict (its names and shapes) with random values."""
    g = torch.Generator().manual_seed(seed)
    out_c = 2 * C if learn_sigma else C

    def rand(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    state = {"x_embedder.proj.weight": rand(hidden, C, P, P), "x_embedder.proj.bias": rand(hidden),
             "t_embedder.mlp.0.weight": rand(hidden, 256), "t_embedder.mlp.0.bias": rand(hidden),
             "t_embedder.mlp.2.weight": rand(hidden, hidden), "t_embedder.mlp.2.bias": rand(hidden),
             "y_embedder.embedding_table.weight": rand(CLASSES + 1, hidden),
             "pos_embed": rand(1, (SIZE // P) ** 2, hidden),
             "final_layer.linear.weight": rand(P * P * out_c, hidden), "final_layer.linear.bias": rand(P * P * out_c),
             "final_layer.adaLN_modulation.1.weight": rand(2 * hidden, hidden),
             "final_layer.adaLN_modulation.1.bias": rand(2 * hidden)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "attn.qkv.weight": rand(3 * hidden, hidden), b + "attn.qkv.bias": rand(3 * hidden),
                      b + "attn.proj.weight": rand(hidden, hidden), b + "attn.proj.bias": rand(hidden),
                      b + "mlp.fc1.weight": rand(4 * hidden, hidden), b + "mlp.fc1.bias": rand(4 * hidden),
                      b + "mlp.fc2.weight": rand(hidden, 4 * hidden), b + "mlp.fc2.bias": rand(hidden),
                      b + "adaLN_modulation.1.weight": rand(6 * hidden, hidden), b + "adaLN_modulation.1.bias": rand(6 * hidden)})
    return state


def reference_dit(state: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DiT's forward (models.py) written out: patchify, 2D sin-cos, timestep + class, adaLN-Zero blocks."""
    n = x.shape[0]
    h = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=P)   # (N, D, h, w)
    hp, wp = h.shape[-2:]
    h = h.flatten(2).transpose(1, 2) + grid_2d_pos_embed(D, hp, wp)                            # DiT's sin-cos
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.linear(F.silu(F.linear(temb, state["t_embedder.mlp.0.weight"], state["t_embedder.mlp.0.bias"])),
                    state["t_embedder.mlp.2.weight"], state["t_embedder.mlp.2.bias"])
    c = temb + state["y_embedder.embedding_table.weight"][y]

    def modulate(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    for i in range(DEPTH):
        b = f"blocks.{i}."
        mods = F.linear(F.silu(c), state[b + "adaLN_modulation.1.weight"], state[b + "adaLN_modulation.1.bias"])
        sm, scm, gm, sf, scf, gf = mods.chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (D,), eps=1e-6), sm, scm)
        qkv = F.linear(a, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]).reshape(n, -1, 3, HEADS, D // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5).softmax(-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(n, -1, D), state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = h + gm[:, None] * att
        m = modulate(F.layer_norm(h, (D,), eps=1e-6), sf, scf)
        m = F.linear(F.gelu(F.linear(m, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"]), approximate="tanh"),
                     state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
        h = h + gf[:, None] * m
    shift, scale = F.linear(F.silu(c), state["final_layer.adaLN_modulation.1.weight"],
                            state["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = F.linear(modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale), state["final_layer.linear.weight"],
                 state["final_layer.linear.bias"])
    out_c = h.shape[-1] // (P * P)
    h = h.reshape(n, hp, wp, P, P, out_c)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, out_c, hp * P, wp * P)


def image_model(**overrides) -> GridDiT:
    return GridDiT(sample_height=SIZE, sample_width=SIZE, in_channels=C, patch_size=P, hidden_size=D, depth=DEPTH,
                   num_heads=HEADS, grid_rows=1, grid_cols=1, pos_embed="2d", **overrides).eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, C, SIZE, SIZE, generator=g), torch.tensor([0, 400, 999])


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_checkpoint_equals_dits_unconditional_forward(tmp_path, learn_sigma):
    state = random_dit_state(learn_sigma=learn_sigma)
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state, path)
    model = image_model()
    load_dit_weights(model, path)
    x, t = inputs()
    with torch.no_grad():
        ours = model(x, t)
        reference = reference_dit(state, x, t, torch.full((3,), CLASSES))[:, :C]     # the null class, eps half
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_a_training_checkpoint_with_ema_is_read_too(tmp_path):
    state = random_dit_state()
    path = tmp_path / "0400000.pt"
    torch.save({"model": {}, "ema": state, "args": {"lr": 1e-4}}, path)
    assert set(read_dit_weights(path)) == set(state)


def test_extra_condition_channels_start_at_zero_and_the_3d_embedding_stays_computed(tmp_path):
    """Stage 2 (and masked stage 1) take more input channels: they start at zero, so the model is DiT's."""
    state = random_dit_state()
    path = tmp_path / "dit.pt"
    torch.save(state, path)
    stage2 = image_model(cond_channels=C)
    load_dit_weights(stage2, path)
    plain = image_model()
    load_dit_weights(plain, path)
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(stage2(x, t, cond=torch.randn_like(x)), plain(x, t))
    grid = create_dit("DiT-tiny/2", sample_height=16, sample_width=16, in_channels=C, hidden_size=D, depth=DEPTH,
                      num_heads=HEADS, num_strides=3)
    embedding = grid.pos_embedding.clone()
    big = random_dit_state()
    big["pos_embed"] = torch.zeros(1, 64, D)
    grid.load_state_dict(dit_state_dict(big, grid))
    assert torch.equal(grid.pos_embedding, embedding)                                  # never overwritten


def test_weights_of_another_size_are_refused(tmp_path):
    path = tmp_path / "dit.pt"
    torch.save(random_dit_state(hidden=96), path)
    with pytest.raises(ValueError, match="do not fit"):
        load_dit_weights(image_model(), path)


def test_the_full_dit_xl_2_512_layout_loads_strictly():
    """Shapes only (on the meta device): DiT-XL/2 at 512 px, learned sigma, 1000 classes, onto the paper's
    stage 1 (2 x 2 grid of 256 px frames in SD-VAE latents: 64 x 64) and stage 2 (condition channels)."""
    hidden, depth = 1152, 28
    with torch.device("meta"):
        shapes = {"x_embedder.proj.weight": (hidden, 4, 2, 2), "x_embedder.proj.bias": (hidden,),
                  "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
                  "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
                  "y_embedder.embedding_table.weight": (1001, hidden), "pos_embed": (1, 1024, hidden),
                  "final_layer.linear.weight": (32, hidden), "final_layer.linear.bias": (32,),
                  "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
                  "final_layer.adaLN_modulation.1.bias": (2 * hidden,)}
        for i in range(depth):
            b = f"blocks.{i}."
            shapes.update({b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
                           b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
                           b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
                           b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
                           b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
                           b + "adaLN_modulation.1.bias": (6 * hidden,)})
        state = {k: torch.empty(s) for k, s in shapes.items()}
        stage1 = create_dit("DiT-XL/2", sample_height=64, sample_width=64, in_channels=4, cond_channels=5)
        stage2 = create_dit("DiT-XL/2", sample_height=64, sample_width=64, in_channels=4, cond_channels=4,
                            grid_rows=1, grid_cols=1)
    for model in (stage1, stage2):
        converted = dit_state_dict(state, model)
        own = model.state_dict()
        assert set(converted) == set(own)
        assert all(converted[k].shape == own[k].shape for k in own)


def test_a_diffusers_dit_folder_is_read_like_dits_own(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=D // HEADS, in_channels=C,
                                out_channels=2 * C, num_layers=DEPTH, sample_size=SIZE, patch_size=P,
                                num_embeds_ada_norm=CLASSES, norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(0.1 * torch.randn_like(p))
        for block in dit.transformer_blocks[1:]:                     # as converted DiT weights: one embedder, repeated
            block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    for block in dit.transformer_blocks:     # diffusers' port shifts the timestep frequencies by one; DiT does not
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    dit.save_pretrained(tmp_path / "transformer")
    model = image_model()
    load_dit_weights(model, tmp_path / "transformer")
    x, t = inputs()
    with torch.no_grad():
        ours = model(x, t)
        theirs = dit(x, timestep=t, class_labels=torch.full((3,), CLASSES)).sample[:, :C]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
