"""ImageNet DiT weights as the starting point of a :class:`~ctgridit.core.dit.GridDiT` (as the paper fine-tunes).

Two layouts are read, both offline from local files:

- DiT's own checkpoints (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``; a
  state dict, loaded with ``torch.load(weights_only=True)``);
- diffusers' ``DiTTransformer2DModel`` folders (``transformer/`` of
  ``facebook/DiT-XL-2-256``: ``config.json`` and safetensors weights).

The conversion (:func:`dit_state_dict`) maps names onto GridDiT's, which follow
DiT's, and makes four changes:

- the timestep MLP ``t_embedder.mlp.0/.2`` is diffusers' ``linear_1/2`` here;
- the class embedding goes, its null-class row (the unconditional label of
  classifier-free guidance) folded into the timestep MLP's last bias, since
  DiT adds both to the conditioning: the result is DiT's unconditional model;
- the learned variance half of the final layer goes (GridDiT predicts the
  noise only);
- the positional embedding is dropped (GridDiT computes its own, 3D by
  default) and the patch embedding's extra input channels (stage 2's
  condition, stage 1's masked condition) start at zero, so at first they
  change nothing.

Stride embeddings have no counterpart and keep their initial values.
diffusers' port computes the timestep features with frequencies shifted by
one (``downscale_freq_shift=1``), DiT with none; GridDiT computes them as DiT
does, so weights from either source give DiT's model.
With ``pos_embed="2d"`` and the same sizes, the converted model's forward equals
DiT's with the null class label (tested to 1e-5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ctgridit.core.dit import GridDiT

#: How a diffusers DiT folder says what it is.
DIFFUSERS_CLASS = "DiTTransformer2DModel"


def read_dit_weights(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """DiT weights from a DiT ``.pt`` checkpoint or a diffusers DiT folder, in DiT's own layout."""
    path = Path(source)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        if config.get("_class_name") != DIFFUSERS_CLASS:
            raise ValueError(f"{path} is not a diffusers {DIFFUSERS_CLASS} folder")
        from safetensors.torch import load_file

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path} has no safetensors weights")
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(load_file(str(file)))
        return diffusers_to_dit(weights, int(config["num_layers"]))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):   # a DiT training checkpoint
        state = state["ema"]
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise ValueError(f"{path} is not a DiT state dict (no x_embedder.proj.weight)")
    return state


def diffusers_to_dit(weights: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffusers' ``DiTTransformer2DModel`` weights renamed to DiT's layout.

    diffusers repeats the timestep and class embedders in every block (all
    equal in converted DiT weights); block 0's are taken.
    """
    out = {"x_embedder.proj.weight": weights["pos_embed.proj.weight"],
           "x_embedder.proj.bias": weights["pos_embed.proj.bias"]}
    emb = "transformer_blocks.0.norm1.emb."
    out["t_embedder.mlp.0.weight"] = weights[emb + "timestep_embedder.linear_1.weight"]
    out["t_embedder.mlp.0.bias"] = weights[emb + "timestep_embedder.linear_1.bias"]
    out["t_embedder.mlp.2.weight"] = weights[emb + "timestep_embedder.linear_2.weight"]
    out["t_embedder.mlp.2.bias"] = weights[emb + "timestep_embedder.linear_2.bias"]
    out["y_embedder.embedding_table.weight"] = weights[emb + "class_embedder.embedding_table.weight"]
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.qkv.{part}"] = torch.cat([weights[src + f"attn1.to_{x}.{part}"] for x in "qkv"])
            out[dst + f"attn.proj.{part}"] = weights[src + f"attn1.to_out.0.{part}"]
            out[dst + f"mlp.fc1.{part}"] = weights[src + f"ff.net.0.proj.{part}"]
            out[dst + f"mlp.fc2.{part}"] = weights[src + f"ff.net.2.{part}"]
            out[dst + f"adaLN_modulation.1.{part}"] = weights[src + f"norm1.linear.{part}"]
    for part in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{part}"] = weights[f"proj_out_1.{part}"]
        out[f"final_layer.linear.{part}"] = weights[f"proj_out_2.{part}"]
    return out


def dit_state_dict(dit: dict[str, torch.Tensor], model: GridDiT) -> dict[str, torch.Tensor]:
    """DiT-layout weights converted to a ``model.state_dict()`` (module docstring); ValueError if they do not fit."""
    cfg, own = model.config, model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, value in dit.items():
        if name in ("pos_embed", "y_embedder.embedding_table.weight") or name.startswith("final_layer.linear"):
            continue
        name = name.replace("t_embedder.mlp.0", "t_embedder.linear_1").replace("t_embedder.mlp.2", "t_embedder.linear_2")
        out[name] = value
    table = dit.get("y_embedder.embedding_table.weight")
    if table is not None:                                          # the null class (its last row) joins the timestep
        out["t_embedder.linear_2.bias"] = out["t_embedder.linear_2.bias"] + table[-1]
    p, c = cfg.patch_size, cfg.in_channels
    for part in ("weight", "bias"):                                # the eps half of (p, p, 2C) outputs
        value = dit[f"final_layer.linear.{part}"]
        learned = value.shape[0] // (p * p)
        if learned not in (c, 2 * c):
            raise ValueError(f"the final layer predicts {learned} channels per pixel, the model {c}")
        out[f"final_layer.linear.{part}"] = value.reshape(p, p, learned, *value.shape[1:])[:, :, :c].reshape(
            p * p * c, *value.shape[1:])
    weight = out["x_embedder.proj.weight"]                         # extra input channels start at zero
    wanted = own["x_embedder.proj.weight"].shape
    if weight.shape[1] < wanted[1] and weight.shape[0] == wanted[0] and weight.shape[2:] == wanted[2:]:
        out["x_embedder.proj.weight"] = torch.cat([weight, weight.new_zeros(wanted[0], wanted[1] - weight.shape[1],
                                                                            *wanted[2:])], dim=1)
    for name in own:                                               # what DiT has no counterpart for keeps its init
        if name.startswith("stride_embedder") and name not in out:
            out[name] = own[name]
    missing, extra = sorted(set(own) - set(out)), sorted(set(out) - set(own))
    wrong = sorted(k for k in set(own) & set(out) if own[k].shape != out[k].shape)
    if missing or extra or wrong:
        raise ValueError(f"DiT weights do not fit this model (missing {missing[:3]}, unknown {extra[:3]}, "
                         f"other shapes {[(k, tuple(out[k].shape), tuple(own[k].shape)) for k in wrong[:3]]})")
    return out


def load_dit_weights(model: GridDiT, source: str | os.PathLike) -> None:
    """Start ``model`` from the ImageNet DiT weights at ``source`` (a ``.pt`` file or a diffusers folder)."""
    model.load_state_dict(dit_state_dict(read_dit_weights(source), model), strict=True)


def is_dit_source(source: str | os.PathLike) -> bool:
    """Whether ``source`` looks like DiT weights (a ``.pt`` file or a diffusers DiT folder)."""
    path = Path(source)
    if path.is_file():
        return path.suffix in (".pt", ".pth")
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            return json.loads(config.read_text()).get("_class_name") == DIFFUSERS_CLASS
        except ValueError:
            return False
    return False
