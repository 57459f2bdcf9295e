"""Training checkpoints: written atomically, the last K kept, loaded without unpickling.

A checkpoint is a folder ``step_00001000/`` holding

- ``model.safetensors``: the trained weights;
- ``ema.safetensors``: the exponential moving average of the weights;
- ``state.pt``: optimizer, learning-rate scheduler, EMA counters, step and RNG
  states: tensors, numbers, strings, lists and dicts only, so it loads with
  ``torch.load(weights_only=True)``;
- ``config.json``: the training config it was made with.

The folder is written into a hidden sibling and renamed when complete
(:func:`ctgridit.files.atomic_folder`), so a crash never leaves a half
checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ctgridit.errors import CTGridItError
from ctgridit.files import atomic_folder

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(folder: str | Path, step: int, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                    state: dict[str, Any], config: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` into ``folder`` and delete all but the newest ``keep_last``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / checkpoint_name(step)
    with atomic_folder(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for _, old in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """``(model weights, EMA weights, state)`` of one checkpoint folder, without unpickling objects; its
    ``config.json``, where there is one, must be a JSON object (it is what a resumed run is checked against)."""
    path = Path(path)
    try:
        model = load_file(str(path / "model.safetensors"))
        ema = load_file(str(path / "ema.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if (path / "config.json").exists() and not isinstance(json.loads((path / "config.json").read_text()), dict):
            raise ValueError("config.json is not a JSON object")
    except Exception as err:  # missing, truncated (SafetensorError), not plain data: the user's file, not a bug
        raise CTGridItError(f"cannot load the checkpoint ({' '.join(str(err).split())[:200]})", path,
                            "delete it to resume from the one before") from err
    return model, ema, state
