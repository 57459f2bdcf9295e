"""Model folders written before the pipeline was a diffusers pipeline: read, to be loaded (and saved anew).

The layout then: ``gridit.json`` (the settings, now ``settings`` in
``model_index.json``), ``stage1/``, ``stage2/`` and ``scheduler/`` as now, and
``codec/codec.json`` (``{"kind": "pixel", "channels", "chunk_size"}``, or
``{"kind": "vae", "chunk_size", "scaling_factor"}`` with the autoencoder in
``codec/vae/``) where a codec folder is now a diffusers model folder.
:meth:`~ctgridit.core.pipeline.GriDiTPipeline.from_pretrained` reads such a
folder; saving the pipeline writes the current layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler

from ctgridit.core.codecs import LatentCodec, PixelCodec, VAECodec

SETTINGS_FILE = "gridit.json"
CODEC_FILE = "codec.json"


def is_legacy_folder(folder: Path, index_file: str) -> bool:
    """Whether ``folder`` has the old settings file and no ``index_file`` (``model_index.json``)."""
    return (folder / SETTINGS_FILE).is_file() and not (folder / index_file).is_file()


def legacy_settings(folder: Path) -> dict:
    """The settings of an old folder (a ValueError if its file is not JSON). Folders of that layout were all CT
    models and may not record it: their ``adapter.kind`` is ``"ct"`` unless they say otherwise."""
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    if isinstance(settings, dict):
        settings.setdefault("adapter", {}).setdefault("kind", "ct")
    return settings


def legacy_codec(folder: Path) -> LatentCodec:
    """An old ``codec/`` folder's codec (no network access)."""
    config = json.loads((folder / CODEC_FILE).read_text())
    kind = config.pop("kind")
    if kind == "pixel":
        return PixelCodec(**config)
    if kind == "vae":
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True, use_safetensors=True)
        return VAECodec.from_vae(vae, config["chunk_size"], config["scaling_factor"])
    raise ValueError(f"unknown codec kind {kind!r} in {folder / CODEC_FILE}")


def legacy_parts(folder: Path) -> dict:
    """The codec and scheduler of an old folder, by the pipeline's names (its stage folders are as now)."""
    return {"codec": legacy_codec(folder / "codec"),
            "scheduler": DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)}
