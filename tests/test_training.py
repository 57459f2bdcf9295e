"""The trainer: real loss decrease on real CT, exact resume, checkpoints, 2-process DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.errors import CTGridItError, CTGridItWarning
from ctgridit.training.checkpoint import list_checkpoints, load_checkpoint
from ctgridit.training.config import load_config
from ctgridit.training.trainer import StepBatches, loss_decrease, train
from tests.conftest import REPO, data_file, write_config

#: A model small enough to train a few hundred steps in a test on 2 CPU cores.
SMALL_MODEL = {"preset": "DiT-S/8", "overrides": {"depth": 2, "hidden_size": 96, "num_heads": 4}}


def test_small_ct_config_lowers_the_loss_on_real_ct(tmp_path):
    """The shipped small CT config (with a smaller model and fewer steps, for test time) learns real CT grids."""
    data_file("lung_pet_ct_dx/A0001_5mm_kernelL.nii.gz")
    config = load_config(REPO / "pipelines" / "configs" / "ct_small.yaml")
    config.output = str(tmp_path / "model")
    config.checkpoint.dir = str(tmp_path / "ckpt")
    config.checkpoint.every = 1000
    config.stage1.model.preset = SMALL_MODEL["preset"]
    config.stage1.model.overrides = SMALL_MODEL["overrides"]
    config.optim.batch_size = 4
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    torch.manual_seed(0)
    result = train(config, 1, steps=250, device="cpu", quiet=True)
    with open(tmp_path / "ckpt" / "stage1" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 251))
    first, last = loss_decrease(rows, window=25)
    assert last < 0.6 * first, f"loss {first:.4f} -> {last:.4f}"
    assert (tmp_path / "ckpt" / "stage1" / "loss.png").stat().st_size > 1000
    assert result.steps == 250
    pipeline = GriDiTPipeline.from_pretrained(tmp_path / "model")
    assert pipeline.settings.frame_size == (128, 128) and pipeline.stage2 is None
    assert pipeline.settings.adapter["spacing"] == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_gives_the_same_weights_as_straight_training(tmp_path, small_ct, schedule):
    straight, split = tmp_path / "straight", tmp_path / "split"
    for folder in (straight, split):
        folder.mkdir()
        path = write_config(folder, small_ct)
        raw = yaml.safe_load(path.read_text())
        raw["optim"].update(schedule=schedule, steps=6, **({"warmup_steps": 0} if schedule == "cosine" else {}))
        path.write_text(yaml.safe_dump(raw))
    train(load_config(straight / "config.yaml"), 1, steps=6, device="cpu", quiet=True)
    train(load_config(split / "config.yaml"), 1, steps=3, device="cpu", quiet=True)
    train(load_config(split / "config.yaml"), 1, steps=6, resume=True, device="cpu", quiet=True)
    a, b = straight / "ckpt" / "stage1" / "step_00000006", split / "ckpt" / "stage1" / "step_00000006"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)
    # the weights did move: training is not a no-op
    first = load_file(str(straight / "ckpt" / "stage1" / "step_00000003" / "model.safetensors"))
    assert any(not torch.equal(first[k], wa[k]) for k in wa)
    rows = list(csv.DictReader(open(split / "ckpt" / "stage1" / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    lrs = [float(r["lr"]) for r in rows]
    if schedule == "cosine":           # no warm-up here: from the peak down to 0 at the config's last step
        peak = 1e-3
        assert lrs == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(1, 7)], abs=1e-9)
        with pytest.raises(CTGridItError, match="reaches 0 at the config's optim.steps = 6"):
            train(load_config(split / "config.yaml"), 1, steps=8, resume=True, device="cpu", quiet=True)
        raw = yaml.safe_load((split / "config.yaml").read_text())
        raw["optim"]["schedule"] = "linear"                    # another curve spliced onto this one: refused
        (split / "config.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(CTGridItError, match="optim.schedule"):
            train(load_config(split / "config.yaml"), 1, steps=6, resume=True, device="cpu", quiet=True)
    else:
        assert lrs[-1] == lrs[-2] > 0


def test_stage2_trains_and_completes_the_model_folder(tmp_path, small_ct):
    """Either stage may be trained first: stage 2 alone is written without an index, stage 1's export keeps it."""
    write_config(tmp_path, small_ct)
    config = load_config(tmp_path / "config.yaml")
    train(config, 2, steps=2, device="cpu", quiet=True)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["codec", "scheduler", "stage2"]  # no index yet
    stage2 = load_file(str(tmp_path / "model" / "stage2" / "diffusion_pytorch_model.safetensors"))
    train(config, 1, steps=2, device="cpu", quiet=True)
    pipeline = GriDiTPipeline.from_pretrained(tmp_path / "model")
    assert all(torch.equal(stage2[k], v) for k, v in pipeline.stage2.state_dict().items())
    assert pipeline.stage2 is not None and pipeline.stage2.config.cond_channels == 1
    frames = pipeline.generate(5, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (1, 5, 1, 32, 32)
    # the same model from the two checkpoints alone (weights trained elsewhere come back as checkpoints), float16 too
    from safetensors.torch import save_file

    from ctgridit.training.trainer import checkpoint_pipeline

    s1, s2 = (tmp_path / "ckpt" / f"stage{s}" / "step_00000002" for s in (1, 2))
    save_file({k: v.half() for k, v in load_file(str(s2 / "ema.safetensors")).items()}, str(s2 / "ema.safetensors"))
    again = checkpoint_pipeline(s1, s2)
    for ours, theirs in ((again.stage1, pipeline.stage1), (again.stage2, pipeline.stage2)):
        for (k, v), w in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, w, rtol=1e-3, atol=1e-3, msg=k)


def test_stages_that_do_not_fit_leave_no_model_index_and_a_warning(tmp_path, small_ct):
    """Stage 1 retrained for another frame size: stage 2 (of the old size) is kept on disk, the folder has no index
    (it does not load) until stage 2 is trained with the same config; then it loads whole."""
    write_config(tmp_path, small_ct)
    train(load_config(tmp_path / "config.yaml"), 2, steps=1, device="cpu", quiet=True)
    write_config(tmp_path, small_ct, frame_size=[64, 64])
    config = load_config(tmp_path / "config.yaml")
    with pytest.warns(CTGridItWarning, match="do not make a model"):
        train(config, 1, steps=1, device="cpu", quiet=True)
    assert (tmp_path / "model" / "stage2").is_dir() and not (tmp_path / "model" / "model_index.json").exists()
    with pytest.raises(CTGridItError, match="not a ctgridit model folder"):
        GriDiTPipeline.from_pretrained(tmp_path / "model")
    train(config, 2, steps=1, device="cpu", quiet=True, force=True)
    assert GriDiTPipeline.from_pretrained(tmp_path / "model").stage2.config.sample_height == 64


def test_checkpoints_keep_the_last_k_and_load_without_pickle(tmp_path, small_ct):
    write_config(tmp_path, small_ct, checkpoint={"every": 1, "keep_last": 2})
    train(load_config(tmp_path / "config.yaml"), 1, steps=5, device="cpu", quiet=True)
    folder = tmp_path / "ckpt" / "stage1"
    assert [s for s, _ in list_checkpoints(folder)] == [4, 5]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]       # no half-written folder
    model, ema, state = load_checkpoint(folder / "step_00000005")
    assert state["step"] == 5 and set(model) == set(ema)
    # a state file that needs unpickling of arbitrary objects is refused
    torch.save({"step": 5, "evil": Path("x")}, folder / "step_00000005" / "state.pt")
    with pytest.raises(CTGridItError, match="cannot load the checkpoint"):
        load_checkpoint(folder / "step_00000005")


def test_step_batches_split_the_global_batch():
    world, batch, accum = 2, 3, 2
    ranks = [StepBatches(0, 4, accum, world, r, batch) for r in range(world)]
    lists = [list(r) for r in ranks]
    assert all(len(x) == 4 * accum for x in lists)
    for k in range(4 * accum):
        together = sorted(lists[0][k] + lists[1][k])
        assert together == list(range(k * world * batch, (k + 1) * world * batch))
    resumed = StepBatches(2, 4, accum, world, 1, batch)
    assert list(resumed) == lists[1][2 * accum:]


def test_bad_config_is_refused(tmp_path, small_ct, capsys):
    from ctgridit.cli import main

    path = write_config(tmp_path, small_ct)
    raw = yaml.safe_load(path.read_text())
    raw["optim"]["learning_rate"] = 1e-4                      # a typo of lr
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CTGridItError, match="learning_rate"):
        load_config(path)
    with pytest.raises(SystemExit) as stop:
        main(["train", "stage1", "--config", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "learning_rate" in err and "Traceback" not in err
    raw["optim"].pop("learning_rate")
    raw["optim"]["schedule"] = "exponential"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CTGridItError, match="optim.schedule must be one of constant, cosine, linear"):
        load_config(path)
    raw["optim"].update(schedule="cosine", warmup_steps=6, steps=6)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(CTGridItError, match="needs warmup_steps below steps"):
        load_config(path)


MASKED = {"model": {"preset": "DiT-tiny/2"}, "conditioning": {"masked": True, "strides": True}}


def test_masked_stride_aware_stage1_trains_resumes_and_samples_hierarchically(tmp_path, small_ct):
    """Config switches on masked conditioning and stride labels: the exported stage 1 takes the known cells,
    the mask and strides up to 9; resuming is exact; the model folder samples with two interpolation levels."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    for folder in (straight, split):
        folder.mkdir()
        write_config(folder, small_ct, stage1=MASKED, data={"stride_range": None, "strides": [1, 3, 9]},
                     sampling={"stage1": {"num_steps": 2, "levels": 2}, "stage2": {"num_steps": 2}})
    train(load_config(straight / "config.yaml"), 1, steps=4, device="cpu", quiet=True)
    train(load_config(split / "config.yaml"), 1, steps=2, device="cpu", quiet=True)
    train(load_config(split / "config.yaml"), 1, steps=4, resume=True, device="cpu", quiet=True)
    a = load_file(str(straight / "model" / "stage1" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(split / "model" / "stage1" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["stride_embedder.weight"].shape[0] == 10                   # labels 0 (not given) .. 9
    pipe = GriDiTPipeline.from_pretrained(straight / "model")
    assert pipe.masked and pipe.max_stride == 9 and pipe.stage1.config.cond_channels == 2
    assert pipe.settings.sampling.stage1.levels == 2
    labels, calls = [], []
    forward = pipe.stage1.forward
    pipe.stage1.forward = lambda x, t, cond=None, stride=None: (calls.append(cond), labels.extend(stride.tolist()),
                                                                 forward(x, t, cond=cond, stride=stride))[2]
    frames = pipe.sample_latents(30, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (1, 30, 1, 16, 16)
    assert sorted(set(labels)) == [1, 3, 9] and all(c is not None and c.shape[1] == 2 for c in calls)


def test_a_clean_sample_model_records_what_it_predicts_and_samples(tmp_path, small_ct):
    """``diffusion: {prediction: sample}``: the model folder's scheduler says so (every sampler reads the model
    through it), the Min-SNR loss trains, and the folder samples a sequence."""
    write_config(tmp_path, small_ct, diffusion={"prediction": "sample", "min_snr": 5.0})
    result = train(load_config(tmp_path / "config.yaml"), 1, steps=3, device="cpu", quiet=True)
    assert result.last_loss is not None and result.last_loss > 0
    pipe = GriDiTPipeline.from_pretrained(tmp_path / "model")
    assert pipe.scheduler.config.prediction_type == "sample"
    frames = pipe.sample_latents(6, generator=torch.Generator().manual_seed(0))
    assert frames.shape == (1, 6, 1, 16, 16) and bool(frames.abs().le(1).all())


def test_stages_of_one_folder_must_predict_the_same(tmp_path, small_ct):
    """The model folder has one scheduler for both stages: a stage 2 on another prediction is refused first."""
    write_config(tmp_path, small_ct, diffusion={"prediction": "sample"})
    train(load_config(tmp_path / "config.yaml"), 1, steps=1, device="cpu", quiet=True)
    write_config(tmp_path, small_ct, diffusion={"prediction": "epsilon"})
    with pytest.raises(CTGridItError, match="predicts 'sample'") as info:
        train(load_config(tmp_path / "config.yaml"), 2, steps=1, device="cpu", quiet=True)
    assert "\n" not in str(info.value) and not (tmp_path / "ckpt" / "stage2").exists()


def test_diffusion_loss_counts_only_the_cells_to_generate():
    """A prediction that is exact on the unknown cells and wrong on the known ones has weighted loss 0."""
    from ctgridit.core.diffusion import diffusion_loss, make_train_scheduler
    from ctgridit.core.grid import cell_mask

    scheduler = make_train_scheduler()
    clean = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = cell_mask([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0]], 2, 2, 4, 4)          # (3, 1, 8, 8)

    def exact_on_unknown(noisy, t):
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (noisy - a.sqrt() * clean) / (1 - a).sqrt()
        return eps + 5.0 * mask

    g = lambda: torch.Generator().manual_seed(1)                                          # noqa: E731
    assert float(diffusion_loss(exact_on_unknown, scheduler, clean, generator=g(), weight=1 - mask)) < 1e-8
    assert float(diffusion_loss(exact_on_unknown, scheduler, clean, generator=g())) > 1.0

    offsets = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)                            # an error per sample

    def off_on_unknown(noisy, t):
        return exact_on_unknown(noisy, t) - 5.0 * mask + offsets * (1 - mask)

    loss = float(diffusion_loss(off_on_unknown, scheduler, clean, generator=g(), weight=1 - mask))
    assert abs(loss - (1 + 4 + 9) / 3) < 1e-4                   # every sample counts alike, whatever its cells


@pytest.mark.parametrize("fill", ["linear", "flow"])
def test_fill_and_residual_reach_the_stage1_model(tmp_path, small_ct, fill):
    """stage1.conditioning.fill / residual become the model's cond_fill / fill_residual (and so its config.json)."""
    from ctgridit.training.trainer import build_codec, build_model

    conditioning = {"masked": True, "strides": True, "fill": fill, "residual": True}
    path = write_config(tmp_path, small_ct, stage1={**MASKED, "conditioning": conditioning},
                        diffusion={"prediction": "sample"}, data={"stride_range": None, "strides": [1, 3, 9]},
                        sampling={"stage1": {"num_steps": 3, "levels": 1}})
    config = load_config(path)
    model = build_model(config, 1, build_codec(config))
    assert model.config.cond_fill == fill and model.config.fill_residual


@pytest.mark.parametrize("changes,match", [
    ({"sampling": {"stage1": {"levels": 3}}}, "strides up to 9"),                  # stride 27 never trained
    ({"sampling": {"stage1": {"levels": 1, "chunk": 2}}}, "chunk"),
    ({"sampling": {"stage1": {"sampler": "bogus"}}}, "sampler"),
    ({"sampling": {"stage2": {"noise": "pink"}}}, "noise"),
    ({"stage1": {**MASKED, "conditioning": {"masked": True, "control_rows": 2}}}, "control_rows"),
    ({"stage1": {**MASKED, "conditioning": {"masked": True, "extension": -1}}}, "probabilities"),
    ({"stage1": {**MASKED, "conditioning": {"strides": True, "stride_dropout": 1.5}}}, "stride_dropout"),
    ({"data": {"stride_range": None, "strides": [1, 9]}, "sampling": {"stage1": {"levels": 2}}}, r"strides \[3\]"),
    ({"data": {"stride_range": [3, 2], "strides": None}}, "stride_range"),
    ({"stage1": {**MASKED, "conditioning": {"masked": True, "unconditional": 0}}}, "unconditional"),
    ({"stage1": {**MASKED, "conditioning": {"masked": True, "fill": "cubic"}}}, "fill must be one of"),
    ({"stage1": {**MASKED, "conditioning": {"fill": "linear"}}}, "needs masked: true"),
    ({"stage1": {**MASKED, "conditioning": {"masked": True, "fill": "linear", "residual": True}}},
     "prediction: sample"),                                                        # the epsilon objective
    ({"stage1": {**MASKED, "conditioning": {**MASKED["conditioning"], "task_strides": {"extension": [1]}}}},
     r"extension task for strides \[3\]"),                                      # step 1 extends at stride 3
    ({"stage1": {**MASKED, "conditioning": {**MASKED["conditioning"], "task_strides": {"interpolation": [27]}}}},
     "not training strides"),
    ({"stage1": {**MASKED, "conditioning": {**MASKED["conditioning"], "task_strides": {"extend": [3]}}}},
     "unknown task"),
    ({"stage1": {"model": {"preset": "DiT-tiny/2"}, "conditioning": {"task_strides": {"extension": [3]}}}},
     "task_strides .* needs masked: true"),
    ({"sampling": {"stage1": {"repaint_jump": 2, "repaint_times": 3}}}, "RePaint"),
    ({"stage2": {"conditioning": {"masked": True}}}, "stage 1 only"),
    ({"diffusion": {"prediction": "x0"}}, "diffusion.prediction"),
    ({"diffusion": {"min_snr": 0}}, "diffusion.min_snr"),
])
def test_bad_conditioning_or_sampling_is_refused_before_training(tmp_path, small_ct, changes, match):
    base = {"stage1": MASKED, "data": {"stride_range": None, "strides": [1, 3, 9]},
            "sampling": {"stage1": {"num_steps": 3, "levels": 1}}}
    path = write_config(tmp_path, small_ct, **{**base, **changes})
    with pytest.raises(CTGridItError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ckpt").exists()


def test_thick_scans_serve_only_strides_at_least_their_thickness(tmp_path, small_ct):
    from ctgridit.training.trainer import build_dataset, build_sequences

    path = write_config(tmp_path, small_ct, data={"spacing": [12.0, 12.0, 1.5], "stride_range": None,
                                                  "strides": [1, 2, 3], "strides_from_thickness": True},
                        sampling={"stage1": {"levels": 0}})
    config = load_config(path)
    dataset = build_dataset(config, 1, build_sequences(config), 1, 0)       # the 3 mm slab at 1.5 mm
    assert dataset.servers == {2: [0], 3: [0]}
    config.data.strides_from_thickness = False
    assert sorted(build_dataset(config, 1, build_sequences(config), 1, 0).servers) == [1, 2, 3]


def test_control_rows_given_or_defaulted_are_the_same(tmp_path, small_ct):
    path = write_config(tmp_path, small_ct, stage1=MASKED, data={"stride_range": None, "strides": [1, 3]},
                        sampling={"stage1": {"control_rows": 1}})
    assert load_config(path).sampling_config.stage1.control_rows == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_hold_identical_weights_and_split_the_batch(tmp_path, small_ct):
    """Without GPUs, torchrun with the default --device auto is one 2-process CPU DDP run (the reliability
    issue, case 37: it used to start two unrelated trainings writing the same checkpoints)."""
    import torch

    write_config(tmp_path, small_ct, optim={"steps": 4, "batch_size": 2})
    audit = tmp_path / "audit"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    device = [] if not torch.cuda.is_available() else ["--device", "cpu"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "ctgridit", "train", "stage1", "--config", str(tmp_path / "config.yaml"), *device,
         "--quiet", "--audit", str(audit)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((audit / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    for entries in zip(ranks[0]["samples"], ranks[1]["samples"]):
        (step, micro, idx0, ids0), (step1, micro1, idx1, ids1) = entries
        assert (step, micro) == (step1, micro1)
        assert sorted(idx0 + idx1) == list(range(step * 4, step * 4 + 4))     # global batch 4 = 2 x 2
        assert not set(idx0) & set(idx1)
    assert len(ranks[0]["samples"]) == 4
    # the exported weights are those of the EMA after 4 synchronised steps, loadable as a model folder
    assert GriDiTPipeline.from_pretrained(tmp_path / "model").stage1 is not None


def test_resuming_a_finished_run_only_exports(tmp_path, small_ct):
    write_config(tmp_path, small_ct)
    config = load_config(tmp_path / "config.yaml")
    train(config, 1, steps=3, device="cpu", quiet=True)
    (tmp_path / "model" / "stage1" / "diffusion_pytorch_model.safetensors").unlink()
    result = train(config, 1, steps=3, resume=True, device="cpu", quiet=True)
    assert result.first_loss is None and result.steps == 0
    exported = load_file(str(tmp_path / "model" / "stage1" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(tmp_path / "ckpt" / "stage1" / "step_00000003" / "ema.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    with pytest.raises(CTGridItError, match="beyond the requested"):
        train(config, 1, steps=2, resume=True, device="cpu", quiet=True)


def test_resuming_with_another_model_or_objective_is_refused(tmp_path, small_ct):
    """A resumed run must define the same model and prediction as its checkpoint (learning rate, steps and loss
    weights may change); settings an older checkpoint did not record count as their defaults."""
    write_config(tmp_path, small_ct)
    train(load_config(tmp_path / "config.yaml"), 1, steps=3, device="cpu", quiet=True)
    for changes, name in [({"diffusion": {"prediction": "sample"}}, "diffusion.prediction = 'epsilon'"),
                          ({"stage1": {"model": {"preset": "DiT-tiny/2", "overrides": {"depth": 3}}}},
                           "stage1.model.overrides.depth = None")]:
        write_config(tmp_path, small_ct, **changes)
        with pytest.raises(CTGridItError, match=name) as info:
            train(load_config(tmp_path / "config.yaml"), 1, steps=6, resume=True, device="cpu", quiet=True)
        assert "\n" not in str(info.value)
    stored = tmp_path / "ckpt" / "stage1" / "step_00000003" / "config.json"
    older = json.loads(stored.read_text())
    del older["diffusion"], older["stage1"]["conditioning"]["fill"]     # written before these settings existed
    stored.write_text(json.dumps(older))
    write_config(tmp_path, small_ct, optim={"lr": 5e-4}, diffusion={"min_snr": 5.0})   # training choices may change
    assert train(load_config(tmp_path / "config.yaml"), 1, steps=4, resume=True, device="cpu", quiet=True).steps == 1


def _trained_base(tmp_path, small_ct):
    """A tiny run of 3 steps in ``tmp_path / "base"``: its folder and its last checkpoint, to warm-start from."""
    base = tmp_path / "base"
    base.mkdir()
    write_config(base, small_ct)
    train(load_config(base / "config.yaml"), 1, steps=3, device="cpu", quiet=True)
    return base, base / "ckpt" / "stage1" / "step_00000003"


def test_fine_tuning_starts_from_the_weights_of_another_run(tmp_path, small_ct):
    """stage.init (the bundled model's second phase): training starts from a trained stage's EMA weights."""
    from ctgridit.core.codecs import PixelCodec
    from ctgridit.training.trainer import build_model, warm_start

    base, source = _trained_base(tmp_path, small_ct)
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    write_config(tuned, small_ct, stage1={"model": {"preset": "DiT-tiny/2"}, "init": str(source)},
                 data={"stride_range": [1, 1]})
    config = load_config(tuned / "config.yaml")
    codec = PixelCodec(channels=1)

    # the warm start alone gives the source run's exported (EMA) model
    model = build_model(config, 1, codec).eval()
    warm_start(model, source)
    reference = GriDiTPipeline.from_pretrained(base / "model").stage1
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        out = model(x, t)
        torch.testing.assert_close(out, reference(x, t), rtol=0, atol=0)
        assert out.abs().sum() > 0
    # an exported stage folder works as well
    warm_start(model, base / "model" / "stage1")

    # training from it: the first step starts from those weights (EMA at start = source), then moves on
    train(config, 1, steps=2, device="cpu", quiet=True)
    first = load_file(str(tuned / "ckpt" / "stage1" / "step_00000002" / "model.safetensors"))
    ema = load_file(str(source / "ema.safetensors"))
    assert first.keys() == ema.keys()
    close = [torch.allclose(first[k], ema[k], atol=0.05) for k in ema]
    assert all(close)                                                 # two small steps away from the source
    assert any(not torch.equal(first[k], ema[k]) for k in ema)        # ... but trained

    # a source of another architecture, or no weights at all, is refused with the file named
    other = tmp_path / "other"
    other.mkdir()
    write_config(other, small_ct, stage1={"model": {"preset": "DiT-S/8", "overrides": {"depth": 1,
                                                                                      "hidden_size": 96,
                                                                                      "num_heads": 4}}})
    with pytest.raises(CTGridItError, match="do not fit"):
        warm_start(build_model(load_config(other / "config.yaml"), 1, codec), source)
    with pytest.raises(CTGridItError, match="no weights"):
        warm_start(model, tmp_path)


def test_a_deeper_model_grows_out_of_a_shallower_one(tmp_path, small_ct):
    """A warm start into a model with more blocks: the first blocks take the source's, the new ones start as the
    identity (adaLN-Zero), so the grown model is exactly the source; training then moves the new blocks too. A
    shallower model than the source is refused."""
    from ctgridit.core.codecs import PixelCodec
    from ctgridit.training.trainer import build_model, warm_start

    base, source = _trained_base(tmp_path, small_ct)
    deep = tmp_path / "deep"
    deep.mkdir()
    depth = 2                                                              # DiT-tiny/2's
    write_config(deep, small_ct, stage1={"init": str(source), "model": {"preset": "DiT-tiny/2",
                                                                        "overrides": {"depth": depth + 2}}})
    config = load_config(deep / "config.yaml")
    model = build_model(config, 1, PixelCodec(channels=1)).eval()
    warm_start(model, source)
    reference = GriDiTPipeline.from_pretrained(base / "model").stage1
    assert len(model.blocks) == len(reference.blocks) + 2
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), reference(x, t), rtol=0, atol=1e-6)
    train(config, 1, steps=2, device="cpu", quiet=True)
    trained = load_file(str(deep / "ckpt" / "stage1" / "step_00000002" / "model.safetensors"))
    gate = f"blocks.{depth + 1}.adaLN_modulation.1.weight"
    assert trained[gate].abs().sum() > 0                                   # the new blocks learn
    shallow = tmp_path / "shallow"
    shallow.mkdir()
    write_config(shallow, small_ct, stage1={"model": {"preset": "DiT-tiny/2", "overrides": {"depth": 1}}})
    smaller = build_model(load_config(shallow / "config.yaml"), 1, PixelCodec(channels=1))
    with pytest.raises(CTGridItError, match="do not fit"):
        warm_start(smaller, source)


def test_a_stride_aware_model_grows_out_of_one_trained_at_one_stride(tmp_path, small_ct):
    """The bundled chest model's phases: stage 1 learnt at one stride without labels, then warm-started with
    stride labels. The new embedding starts at zero, so the grown model is the source for every label."""
    from ctgridit.core.codecs import PixelCodec
    from ctgridit.training.trainer import build_model, checkpoint_pipeline, warm_start

    coarse, grown = tmp_path / "coarse", tmp_path / "grown"
    for folder in (coarse, grown):
        folder.mkdir()
    write_config(coarse, small_ct, stage1={"model": {"preset": "DiT-tiny/2"}, "conditioning": {"masked": True}},
                 data={"stride_range": [3, 3]}, sampling={"stage1": {"num_steps": 3, "levels": 0}})
    train(load_config(coarse / "config.yaml"), 1, steps=3, device="cpu", quiet=True)
    source = coarse / "ckpt" / "stage1" / "step_00000003"
    write_config(grown, small_ct, stage1={**MASKED, "init": str(source)},
                 data={"stride_range": None, "strides": [1, 3]}, sampling={"stage1": {"num_steps": 3, "levels": 1}})
    model = build_model(load_config(grown / "config.yaml"), 1, PixelCodec(channels=1)).eval()
    warm_start(model, source)
    assert model.config.num_strides == 3 and not model.stride_embedder.weight.any()
    before = GriDiTPipeline.from_pretrained(coarse / "model").stage1
    looked_at = checkpoint_pipeline(source)                     # what the gate samples while a run trains
    assert looked_at.masked and looked_at.settings.sampling.stage1.levels == 0
    assert all(torch.equal(a, b) for a, b in zip(looked_at.stage1.state_dict().values(), before.state_dict().values()))
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    cond = torch.cat([x.clamp(-1, 1), torch.ones_like(x)], dim=1)
    with torch.no_grad():
        for label in (1, 3):
            torch.testing.assert_close(model(x, t, cond=cond, stride=label), before(x, t, cond=cond), rtol=0, atol=0)
    train(load_config(grown / "config.yaml"), 1, steps=2, device="cpu", quiet=True)        # and it trains on
    assert load_file(str(grown / "ckpt" / "stage1" / "step_00000002" / "model.safetensors"))[
        "stride_embedder.weight"].any()


def test_configs_name_the_shared_data_through_one_setting(tmp_path, monkeypatch, small_ct):
    """$CTGRIDIT_DATA in a config's paths is the shared data folder (ctgridit/data_folder.py), its default beside
    the checkout; every bundled model's config names its scans that way, so moving the data is one variable."""
    from ctgridit.data_folder import DEFAULT_DATA

    path = write_config(tmp_path, small_ct, data={"paths": ["$CTGRIDIT_DATA/totalsegmentator/example_ct_sm.nii.gz"]})
    monkeypatch.delenv("CTGRIDIT_DATA", raising=False)
    assert load_config(path).data.paths == [str(DEFAULT_DATA / "totalsegmentator" / "example_ct_sm.nii.gz")]
    monkeypatch.setenv("CTGRIDIT_DATA", str(small_ct.parent.parent))
    assert load_config(path).data.paths == [str(small_ct.resolve())]
    for config in (REPO / "pipelines" / "configs").glob("*.yaml"):
        paths = (yaml.safe_load(config.read_text()).get("data") or {}).get("paths") or []
        assert all("shared/data" not in p for p in paths), config.name


def test_a_flow_pair_model_grows_out_of_a_flow_model(tmp_path):
    """A warm start of a flow_pair model from a flow model (the bundled slice model's): the patch embedding takes
    each moved slice with half the fill's weights and the new output fields start at zero, so at mid-gap (the fill
    is then the moved slices' mean) the grown model is exactly its source: the flow fill plus the same correction."""
    from ctgridit.core.conditioning import condition_channels, masked_condition
    from ctgridit.core.dit import create_dit
    from ctgridit.core.grid import cell_mask
    from ctgridit.training.trainer import warm_start
    from tests.conftest import randomized

    shape = dict(sample_height=32, sample_width=32, in_channels=1, grid_rows=2, grid_cols=2, fill_residual=True)
    flow = randomized(create_dit("DiT-tiny/2", cond_channels=2, cond_fill="flow", **shape), 0)
    flow.save_pretrained(tmp_path)
    pair = create_dit("DiT-tiny/2", cond_channels=condition_channels(1, "flow_pair"), cond_fill="flow_pair", **shape)
    warm_start(pair, tmp_path)
    mask = cell_mask([1, 0, 0, 1], 2, 2, 16, 16).expand(2, 1, 32, 32)
    known = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)).cumsum(-1) / 8
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([990, 999])
    middle = torch.tensor([[0.0, 0.5, 0.5, 1.0]])
    with torch.no_grad():
        grown = pair(x, t, cond=masked_condition(known, mask, "flow_pair", 2, 2, middle))
        source = flow(x, t, cond=masked_condition(known, mask, "flow", 2, 2, middle))
        unknown = (1 - mask).bool().expand_as(grown)
        torch.testing.assert_close(grown[unknown], source[unknown], rtol=0, atol=1e-4)
        off = torch.tensor([[0.0, 0.2, 0.9, 1.0]])                            # elsewhere: close, not equal
        assert not torch.allclose(pair(x, t, cond=masked_condition(known, mask, "flow_pair", 2, 2, off)),
                                  flow(x, t, cond=masked_condition(known, mask, "flow", 2, 2, off)), atol=1e-4)
