"""Reading a GriDiT model folder safely: what makes a folder one, its settings, its stages with their weights checked.

diffusers loads the modules; ctgridit adds what a medical tool needs: local
safetensors files only, weights that match their config exactly (diffusers
leaves a missing tensor on the meta device and drops an unknown one), and a
one-line error naming the folder for anything wrong.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from ctgridit.core.dit import GridDiT
from ctgridit.core.legacy_folders import is_legacy_folder, legacy_settings
from ctgridit.core.settings import PipelineSettings
from ctgridit.errors import CTGridItError, shorten

#: The file that makes a folder a diffusers pipeline folder.
INDEX_FILE = DiffusionPipeline.config_name
#: The weights file of a module folder (diffusers' name; safetensors only).
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: The class a ctgridit model folder's ``model_index.json`` names, and the entries it may have besides ``_`` ones.
PIPELINE_CLASS = "GriDiTPipeline"
INDEX_ENTRIES = {"stage1", "stage2", "refiner", "codec", "scheduler", "settings"}


def is_model_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` has a model folder's settings (this layout's or an earlier one's); nothing is read."""
    folder = Path(folder)
    return (folder / INDEX_FILE).is_file() or is_legacy_folder(folder, INDEX_FILE)


def read_settings(folder: str | os.PathLike) -> PipelineSettings:
    """A model folder's settings (no weights loaded); a clear one-line error if it is not a model folder."""
    folder = Path(folder)
    if not is_model_folder(folder) or not (folder / "stage1").is_dir():
        raise CTGridItError(f"not a ctgridit model folder (no {INDEX_FILE} or stage1/)", folder,
                            "give a folder written by `ctgridit train` or GriDiTPipeline.save_pretrained")
    try:
        if is_legacy_folder(folder, INDEX_FILE):
            return PipelineSettings.from_dict(legacy_settings(folder))
        index = json.loads((folder / INDEX_FILE).read_text())
        if index.get("_class_name") != PIPELINE_CLASS:
            raise ValueError(f"{INDEX_FILE} is of a {index.get('_class_name')}, not a {PIPELINE_CLASS}")
        unknown = sorted(k for k in index if not k.startswith("_") and k not in INDEX_ENTRIES)
        if unknown:
            raise ValueError(f"{INDEX_FILE} names unknown part(s) {unknown}")
        return PipelineSettings.from_dict(index["settings"])
    except Exception as err:  # a damaged or hand-edited model_index.json
        raise CTGridItError(f"model folder is incomplete or damaged ({shorten(str(err), 240)})", folder,
                            "re-export it from the trainer") from err


def load_stage(folder: Path) -> GridDiT:
    """A stage folder's GridDiT, checked as :meth:`GriDiTPipeline.from_pretrained` checks it (one-line errors)."""
    try:
        with quiet_diffusers():
            model = GridDiT.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except Exception as err:  # no weights file, a damaged config, a wrong shape: diffusers raises many kinds
        raise CTGridItError(f"{folder.name}/ cannot be loaded ({shorten(str(err), 200)})", folder.parent,
                            "re-export the model folder from the trainer") from err
    check_weights(folder, model)
    return model


def check_weights(folder: Path, module: torch.nn.Module) -> None:
    """The weights file of a module folder holds exactly the module's saved tensors, each of its shape.

    diffusers refuses a shape that differs but leaves a missing tensor on the
    meta device and drops an unknown one with a log line; ctgridit refuses both.
    """
    _check_config_keys(folder, module)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CTGridItError(f"{folder.name}/ has no {WEIGHTS_FILE} (ctgridit loads safetensors weights only)",
                            folder.parent, "re-export the model folder from the trainer")
    with safe_open(str(weights), "pt") as saved:
        shapes = {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}
    own = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    problems = {"missing keys": sorted(set(own) - set(shapes)), "unexpected keys": sorted(set(shapes) - set(own)),
                "mismatched keys": sorted(k for k in set(own) & set(shapes) if own[k] != shapes[k])}
    found = {k: v for k, v in problems.items() if v}
    if found or any(p.is_meta for p in module.parameters()):
        counts = ", ".join(f"{len(v)} {k}" for k, v in found.items()) or "tensors not loaded"
        raise CTGridItError(f"{folder.name}/ weights do not match its config.json ({counts})", folder.parent,
                            "re-export the model folder from the trainer")


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers logs loading notices and shows loading bars of its own; ctgridit checks what matters and says it
    in one line."""
    from diffusers.utils import logging as diffusers_logging

    level, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        if bars:
            diffusers_logging.enable_progress_bar()


def _check_config_keys(folder: Path, module: torch.nn.Module) -> None:
    """A module folder's ``config.json`` holds only settings the module has (diffusers ignores others quietly)."""
    config = folder / "config.json"
    if not config.is_file() or not hasattr(module, "config"):
        return
    try:
        saved = json.loads(config.read_text())
    except ValueError as err:
        raise CTGridItError(f"{folder.name}/config.json is not JSON ({shorten(str(err), 120)})", folder.parent,
                            "re-export the model folder from the trainer") from err
    known = set(inspect.signature(type(module).__init__).parameters) - {"self"}
    unknown = sorted(k for k in saved if not k.startswith("_") and k not in known)
    if unknown:
        raise CTGridItError(f"{folder.name}/config.json has unknown setting(s) {unknown}", folder.parent,
                            "re-export the model folder from the trainer")
