"""Adapters behind one interface (ctgridit/adapters.py): found by name, a new one added without editing ctgridit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from ctgridit.adapters import Adapter, adapter_names, get_adapter, register_adapter
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.errors import CTGridItError
from ctgridit.model_folders import model_kind
from ctgridit.training.config import load_config
from ctgridit.training.trainer import train
from tests.conftest import run_cli


class ToyAdapter(Adapter):
    """Bright squares that drift one pixel a frame over a dark 16 x 16 field; output: uint8 pictures."""

    name = "toy"

    def check_data(self, config) -> None:
        if config.data.paths:
            raise CTGridItError("a toy config reads no files (data.paths must be empty)", config.source)

    def training_sequences(self, config):
        sequences = []
        for start in range(3):
            frames = -torch.ones(12, 1, 16, 16)
            for t in range(12):
                x = (start * 3 + t) % 12
                frames[t, 0, 4:8, x:x + 4] = 1.0
            sequences.append(frames)
        return sequences

    def model_settings(self, config) -> dict:
        return {"kind": self.name, "drift_px_per_frame": 1}

    def to_output(self, frames, settings, source=None) -> np.ndarray:
        return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()


@pytest.fixture
def toy():
    register_adapter(ToyAdapter)
    yield ToyAdapter
    from ctgridit import adapters

    adapters._REGISTRY.pop("toy", None)


def toy_config(folder, **data) -> object:
    config = {"name": "toy", "output": "model", "frame_size": [16, 16],
              "grid": {"rows": 2, "cols": 2, "stride": 1, "factor": 1},
              "data": {"kind": "toy", **data}, "codec": {"kind": "pixel", "channels": 1},
              "stage1": {"model": {"preset": "DiT-tiny/2"}, "conditioning": {"masked": True}},
              "optim": {"steps": 3, "batch_size": 2, "lr": 1e-3},
              "checkpoint": {"dir": "ckpt", "every": 3}, "sampling": {"stage1": {"num_steps": 2, "levels": 0}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


def test_a_new_adapter_trains_and_writes_its_output_without_editing_ctgridit(tmp_path, toy):
    """The trainer reads the toy data through the registry, the model folder records the adapter and what it
    says of its data, and the folder's frames come back in the toy's own format."""
    assert "toy" in adapter_names() and isinstance(get_adapter("toy"), ToyAdapter)
    train(load_config(toy_config(tmp_path)), 1, device="cpu", quiet=True)
    folder = tmp_path / "model"
    assert model_kind(folder) == "toy"
    pipe = GriDiTPipeline.from_pretrained(folder)
    assert pipe.settings.adapter == {"kind": "toy", "drift_px_per_frame": 1}
    frames = pipe.generate(6, generator=torch.Generator().manual_seed(0))[0]
    pictures = get_adapter(model_kind(folder)).to_output(frames, pipe.settings.adapter)
    assert pictures.dtype == np.uint8 and pictures.shape == (6, 16, 16)


def test_unknown_adapters_and_adapters_without_a_cache_are_one_line(tmp_path, toy, capsys):
    load_config(toy_config(tmp_path))                                          # a registered kind loads
    config = toy_config(tmp_path)
    config.write_text(config.read_text().replace("kind: toy", "kind: toys"))
    with pytest.raises(CTGridItError, match="unknown data kind 'toys'.*register_adapter") as info:
        load_config(config)
    assert "\n" not in str(info.value) and str(config) in str(info.value)
    with pytest.raises(CTGridItError, match="reads no files"):
        load_config(toy_config(tmp_path, paths=["x.nii.gz"]))
    config = toy_config(tmp_path, cache="cache")
    code, _, err = run_cli(capsys, "prepare", config)
    assert code == 2 and "data of kind 'toy' is read directly" in err


def test_registering_checks_the_adapter(toy):
    class Other(Adapter):
        name = "toy"

    with pytest.raises(ValueError, match="taken"):
        register_adapter(Other)
    with pytest.raises(ValueError, match="subclass"):
        register_adapter(dict, "dict")
    assert register_adapter(ToyAdapter) is ToyAdapter                 # the same one again is fine


def test_synth_follows_the_model_folder_s_adapter(tmp_path, toy, capsys, monkeypatch):
    """synth asks the model folder (also the default one, $CTGRIDIT_MODEL) which adapter it writes with: a video
    model writes clips, a model of an adapter synth has no writer for is one line naming its adapter."""
    monkeypatch.setenv("CTGRIDIT_MODEL", "video_shapes")
    code, _, err = run_cli(capsys, "synth", "--frames", "8", "--out", tmp_path / "clip.gif", "--quiet")
    assert code == 0, err
    assert (tmp_path / "clip.gif").stat().st_size > 0
    train(load_config(toy_config(tmp_path)), 1, device="cpu", quiet=True)
    code, _, err = run_cli(capsys, "synth", "--model", tmp_path / "model", "--out", tmp_path / "v.nii.gz")
    assert code == 2 and "the 'toy' adapter" in err and "to_output" in err and not (tmp_path / "v.nii.gz").exists()
