"""GriDiTPipeline end to end: generation, the model folder, loading errors and progress (docs/METHOD.md sections 3-6)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctgridit.core.codecs import PixelCodec, VAECodec
from ctgridit.core.diffusion import make_train_scheduler, sampling_scheduler
from ctgridit.core.dit import GridDiT, create_dit
from ctgridit.core.grid import GridSpec
from ctgridit.core.loading import INDEX_FILE
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.settings import PipelineSettings, SamplingConfig, Stage1Sampling, Stage2Sampling
from ctgridit.core.sampler import plan_sequence
from ctgridit.errors import CTGridItError
from tests.conftest import interpolation_grids, randomized, tiny_vae

def bicubic(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling as the grid module does it (antialiased: PIL's kernel, a = -0.5)."""
    return F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)


SAMPLING = SamplingConfig(Stage1Sampling(sampler="ddim", num_steps=3, max_batch=4),
                          Stage2Sampling(sampler="ddim", num_steps=2, batch=5))


def stage1_model(channels: int, frame: int, rows: int = 2, cols: int = 2, seed: int = 0) -> GridDiT:
    return randomized(create_dit("DiT-tiny/2", sample_height=rows * frame, sample_width=cols * frame,
                                 in_channels=channels, grid_rows=rows, grid_cols=cols), seed)


def stage2_model(channels: int, frame: int, seed: int = 1, cond_channels: int | None = None) -> GridDiT:
    return randomized(create_dit("DiT-tiny/2", sample_height=frame, sample_width=frame, in_channels=channels,
                                 cond_channels=channels if cond_channels is None else cond_channels,
                                 grid_rows=1, grid_cols=1), seed)


def pixel_pipeline(with_stage2: bool = True, channels: int = 3) -> GriDiTPipeline:
    """2x2 grids of 8x8 frames (factor 2), super-resolved to 16x16, in pixel space."""
    config = PipelineSettings(GridSpec(rows=2, cols=2, factor=2), (16, 16), channels, SAMPLING,
                              adapter={"kind": "test", "spacing": [1.0, 1.0, 1.5]})
    stage2 = stage2_model(channels, 16) if with_stage2 else None
    scheduler = sampling_scheduler(make_train_scheduler(clip_sample=True), SAMPLING.stage1.sampler)  # x0 in [-1, 1]
    return GriDiTPipeline(stage1_model(channels, 8), PixelCodec(channels), scheduler, stage2, settings=config)


def vae_pipeline(with_stage2: bool = True) -> GriDiTPipeline:
    """The tiny VAE: 16x16 frames -> 8x8 low resolution -> 4x4 latents; stage 2 on 8x8 latents."""
    config = PipelineSettings(GridSpec(rows=2, cols=2, factor=2), (16, 16), 3, SAMPLING)
    stage2 = stage2_model(4, 8) if with_stage2 else None
    return GriDiTPipeline(stage1_model(4, 4), VAECodec.from_vae(tiny_vae()), sampling_scheduler(make_train_scheduler(), "ddim"), stage2,
                          settings=config)


def seed(n: int) -> torch.Generator:
    return torch.Generator().manual_seed(n)


# -------------------------------------------------------------- generation
@pytest.mark.parametrize("num_frames", [1, 4, 5, 9])
def test_pixel_pipeline_generates_exactly_n_frames(num_frames):
    pipe = pixel_pipeline()
    out = pipe.generate(num_frames, batch_size=2, generator=seed(0))
    assert out.shape == (2, num_frames, 3, 16, 16)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("num_frames", [1, 6])
def test_vae_pipeline_generates_exactly_n_frames(num_frames):
    pipe = vae_pipeline()
    out = pipe.generate(num_frames, batch_size=2, generator=seed(0))
    assert out.shape == (2, num_frames, 3, 16, 16)
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    latents = pipe.sample_latents(num_frames, batch_size=2, generator=seed(0))
    assert latents.shape == (2, num_frames, 4, 4, 4)


def test_single_channel_frames():
    out = pixel_pipeline(channels=1).generate(3, generator=seed(0))
    assert out.shape == (1, 3, 1, 16, 16)


def test_same_seed_same_output_other_seed_other_output():
    pipe = pixel_pipeline()
    a, b, c = (pipe.generate(5, batch_size=1, generator=seed(s)) for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_without_stage2_the_output_is_bicubic_upsampling_of_stage1():
    pipe = pixel_pipeline(with_stage2=False)
    out = pipe.generate(6, batch_size=2, generator=seed(3))
    lr = pipe.codec.decode(pipe.sample_latents(6, batch_size=2, generator=seed(3)).flatten(0, 1))  # (12, 3, 8, 8)
    up = bicubic(lr, (16, 16)).clamp(-1, 1)
    assert out.shape == (2, 6, 3, 16, 16)
    assert float((up.abs() < 0.99).float().mean()) > 0.5                # not a saturated, trivial comparison
    torch.testing.assert_close(out, up.view(2, 6, 3, 16, 16), rtol=1e-5, atol=1e-5)
    for mode in ("nearest", "bilinear"):
        other = F.interpolate(lr, size=(16, 16), mode=mode).clamp(-1, 1)
        assert not torch.allclose(out, other.view(2, 6, 3, 16, 16), atol=1e-3), mode


def test_stage2_is_conditioned_on_the_upsampled_stage1_frames():
    pipe = pixel_pipeline()
    conds = []
    forward = pipe.stage2.forward

    def recording(sample, timestep, cond=None):
        conds.append(cond.clone())
        return forward(sample, timestep, cond)

    pipe.stage2.forward = recording
    out = pipe.generate(7, batch_size=2, generator=seed(5))
    lr = pipe.codec.decode(pipe.sample_latents(7, batch_size=2, generator=seed(5)).flatten(0, 1))
    up = bicubic(lr, (16, 16))
    steps = SAMPLING.stage2.num_steps
    chunks = [len(c) for c in torch.split(up, SAMPLING.stage2.batch)]
    assert [len(c) for c in conds] == [n for n in chunks for _ in range(steps)]
    per_chunk = [conds[i * steps] for i in range(len(chunks))]
    torch.testing.assert_close(torch.cat(per_chunk), up, rtol=1e-5, atol=1e-5)
    # and the output is stage 2's, not the bicubic frames
    assert not torch.allclose(out.flatten(0, 1), up.clamp(-1, 1), atol=1e-2)


def with_sampling(pipe: GriDiTPipeline, stage1: dict | None = None, **stage2) -> GriDiTPipeline:
    """``pipe`` with the sampling settings changed: ``stage1`` a dict of stage-1 changes, keywords stage 2's."""
    old = pipe.settings.sampling
    pipe.settings.sampling = SamplingConfig(dataclasses.replace(old.stage1, **(stage1 or {})),
                                          dataclasses.replace(old.stage2, **stage2))
    return pipe


def test_shared_stage2_noise_is_one_draw_per_sequence():
    """Equal low-resolution frames give equal frames within a sequence, different ones across sequences,
    across stage-2 chunks too (8 frames per sequence, chunks of 5)."""
    pipe = with_sampling(pixel_pipeline(), sampler="ddpm", noise="shared")
    lr = torch.rand(1, 3, 8, 8, generator=seed(0)).mul(2).sub(1).expand(16, 3, 8, 8)
    out = pipe.super_resolve(lr, seed(1), sequence_length=8).view(2, 8, 3, 16, 16)
    for sequence in out:
        torch.testing.assert_close(sequence, sequence[:1].expand_as(sequence), rtol=1e-5, atol=1e-5)
    assert (out[0, 0] - out[1, 0]).abs().mean() > 1e-2
    independent = with_sampling(pixel_pipeline(), sampler="ddpm").super_resolve(lr, seed(1), sequence_length=8)
    assert (independent[0] - independent[1]).abs().mean() > 1e-2
    with pytest.raises(ValueError, match="whole sequences"):
        pipe.super_resolve(lr[:15], seed(1), sequence_length=8)


def test_smooth_stage2_noise_varies_slowly_along_a_sequence():
    """Equal low-resolution frames: with noise of length 3 neighbouring outputs are closer than frames
    far apart (which are as far apart as with independent noise); chunk borders (chunks of 5) do not show."""
    lr = torch.rand(1, 3, 8, 8, generator=seed(0)).mul(2).sub(1).expand(24, 3, 8, 8)
    pipe = with_sampling(pixel_pipeline(), sampler="ddpm", noise="smooth", noise_length=3.0, batch=5)
    out = pipe.super_resolve(lr, seed(1), sequence_length=24)
    torch.testing.assert_close(out, pipe.super_resolve(lr, seed(1), sequence_length=24))   # seeded
    gap = lambda x, h: float((x[h:] - x[:-h]).abs().mean())                                 # noqa: E731
    independent = with_sampling(pixel_pipeline(), sampler="ddpm").super_resolve(lr, seed(1), sequence_length=24)
    assert gap(out, 1) < 0.5 * gap(out, 12), (gap(out, 1), gap(out, 12))
    assert gap(out, 12) > 0.7 * gap(independent, 12)
    borders = [float((out[k] - out[k - 1]).abs().mean()) for k in (5, 10, 15, 20)]
    inside = [float((out[k] - out[k - 1]).abs().mean()) for k in (2, 7, 12, 17)]
    assert max(borders) < 2 * max(inside), (borders, inside)


def test_stage2_strength_starts_from_the_condition():
    """With strength 0.2 of 10 steps stage 2 runs only the last 2 steps, and its first input is the
    upsampled frame diffused to that level (its projection on the frame is ``sqrt(abar_t)``)."""
    lr = torch.rand(6, 3, 8, 8, generator=seed(0)).mul(2).sub(1)
    up = bicubic(lr, (16, 16))
    pipe = with_sampling(pixel_pipeline(), sampler="ddpm", num_steps=10, strength=0.2, batch=6)
    calls = []
    forward = pipe.stage2.forward
    pipe.stage2.forward = lambda x, t, cond: (calls.append((int(t[0]), x.clone())), forward(x, t, cond))[1]
    pipe.super_resolve(lr, seed(1))
    assert [t for t, _ in calls] == [199, 99]
    first = calls[0][1].double()
    sqrt_a = float((first * up).sum() / (up.double() ** 2).sum())
    assert abs(sqrt_a / float(pipe.scheduler.alphas_cumprod[199]) ** 0.5 - 1) < 0.05


# ------------------------------------------------------------- progress
def test_progress_reports_every_phase_up_to_its_total():
    pipe = pixel_pipeline()
    events: dict[str, list[tuple[int, int]]] = {}
    pipe.generate(9, batch_size=2, generator=seed(0), progress=lambda ph, d, t: events.setdefault(ph, []).append((d, t)))
    plan = plan_sequence(9, 2, 2, control_rows=1)
    steps, s2 = SAMPLING.stage1.num_steps, SAMPLING.stage2.num_steps
    interp_batches = -(-2 * interpolation_grids(plan) // SAMPLING.stage1.max_batch)
    expected_totals = {"extend": plan.iterations * steps, "interpolate": interp_batches * steps,
                       "stage2": -(-2 * 9 // SAMPLING.stage2.batch) * s2}
    assert set(events) == set(expected_totals)
    for phase, seen in events.items():
        done = [d for d, _ in seen]
        assert {t for _, t in seen} == {expected_totals[phase]}, phase
        assert all(b > a for a, b in zip(done, done[1:])), phase     # monotonic
        assert done[-1] == expected_totals[phase], phase              # ends at total
        assert done == list(range(1, expected_totals[phase] + 1)), phase


# ----------------------------------------------------------- save / load
@pytest.mark.parametrize("make", [pixel_pipeline, vae_pipeline], ids=["pixel", "vae"])
def test_save_and_load_give_the_same_output(tmp_path, make):
    pipe = make()
    expected = pipe.generate(5, batch_size=2, generator=seed(7))
    folder = pipe.save_pretrained(tmp_path / "model")
    for part in (INDEX_FILE, "stage1", "stage2", "codec", "scheduler"):
        assert (folder / part).exists(), part
    assert [p.name for p in tmp_path.iterdir()] == ["model"]             # no temporary folder left
    loaded = GriDiTPipeline.from_pretrained(folder)
    assert loaded.settings.to_dict() == pipe.settings.to_dict()
    assert loaded.settings.adapter == pipe.settings.adapter
    assert type(loaded.codec) is type(pipe.codec)
    assert torch.equal(loaded.generate(5, batch_size=2, generator=seed(7)), expected)


def test_a_model_folder_is_a_diffusers_pipeline_folder(tmp_path):
    """model_index.json names every module's class and holds the settings; diffusers' own loader reads it."""
    from diffusers import DiffusionPipeline

    pipe = vae_pipeline(with_stage2=False)
    folder = pipe.save_pretrained(tmp_path / "model")
    index = json.loads((folder / INDEX_FILE).read_text())
    assert index["_class_name"] == "GriDiTPipeline"
    assert index["stage1"] == ["ctgridit.core.dit", "GridDiT"] and index["stage2"] == [None, None]
    assert index["codec"] == ["ctgridit.core.codecs", "VAECodec"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]                # what stage 1 samples with
    assert index["settings"] == pipe.settings.to_dict()
    for part in ("stage1", "codec"):
        assert (folder / part / "diffusion_pytorch_model.safetensors").is_file(), part
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    plain = DiffusionPipeline.from_pretrained.__func__(GriDiTPipeline, folder, local_files_only=True)  # diffusers' own
    assert type(plain) is GriDiTPipeline and plain.stage2 is None
    assert torch.equal(plain.generate(5, generator=seed(1)), pipe.generate(5, generator=seed(1)))


def as_old_folder(folder):
    """Rewrite a model folder as ctgridit wrote them before the pipeline was a diffusers pipeline."""
    from ctgridit.core.legacy_folders import CODEC_FILE, SETTINGS_FILE

    from diffusers import DDPMScheduler

    index = json.loads((folder / INDEX_FILE).read_text())
    settings = index["settings"]
    del settings["layout"]                                     # then: no layout, the training scheduler saved
    (folder / SETTINGS_FILE).write_text(json.dumps(settings))
    (folder / INDEX_FILE).unlink()
    training = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"), timestep_spacing="leading")
    shutil.rmtree(folder / "scheduler")
    training.save_pretrained(folder / "scheduler")
    kind = index["codec"][1]
    config = json.loads((folder / "codec" / "config.json").read_text())
    if kind == "VAECodec":
        from diffusers import AutoencoderKL

        vae = VAECodec.from_pretrained(folder / "codec", local_files_only=True).vae
        shutil.rmtree(folder / "codec")
        vae.save_pretrained(str(folder / "codec" / "vae"))
        old = {"kind": "vae", "chunk_size": config["chunk_size"], "scaling_factor": config["scaling_factor"]}
        assert isinstance(vae, AutoencoderKL)
    else:
        shutil.rmtree(folder / "codec")
        (folder / "codec").mkdir()
        old = {"kind": "pixel", "chunk_size": config["chunk_size"], "channels": config["channels"]}
    (folder / "codec" / CODEC_FILE).write_text(json.dumps(old))
    return folder


@pytest.mark.parametrize("make", [pixel_pipeline, vae_pipeline], ids=["pixel", "vae"])
def test_model_folders_of_earlier_versions_load_and_save_anew(tmp_path, make):
    pipe = make()
    expected = pipe.generate(5, generator=seed(2))
    old = as_old_folder(pipe.save_pretrained(tmp_path / "old"))
    loaded = GriDiTPipeline.from_pretrained(old)
    settings = pipe.settings.to_dict()
    settings["adapter"].setdefault("kind", "ct")                 # folders of that layout were all CT models
    assert loaded.settings.to_dict() == settings and loaded.stage2 is not None
    assert torch.equal(loaded.generate(5, generator=seed(2)), expected)
    new = loaded.save_pretrained(tmp_path / "new")
    assert (new / INDEX_FILE).is_file() and not (new / "gridit.json").exists()
    assert torch.equal(GriDiTPipeline.from_pretrained(new).generate(5, generator=seed(2)), expected)


def test_generation_and_denoising_are_methods_of_the_pipeline():
    from ctgridit.core.frame_denoising import denoise_frames

    pipe = pixel_pipeline()
    frames = pipe.generate(5, generator=seed(4), num_steps=2)                       # (1, 5, 3, 16, 16) in [-1, 1]
    out = pipe(5, generator=seed(4), num_inference_steps=2)                         # diffusers' call and output
    assert torch.equal(out.frames, (frames + 1) / 2) and torch.equal(out[0], out.frames)
    as_np = pipe(5, generator=seed(4), num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(as_np, tuple) and as_np[0].shape == (1, 5, 16, 16, 3)
    np.testing.assert_allclose(as_np[0], out.frames.permute(0, 1, 3, 4, 2).numpy())
    latents = pipe(5, generator=seed(4), num_inference_steps=2, output_type="latent").frames
    assert latents.shape == (1, 5, 3, 8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(5, output_type="pil")
    noisy = (pipe.generate(5, generator=seed(5))[0] + 0.1 * torch.randn(5, 3, 16, 16, generator=seed(6))).clamp(-1, 1)
    frames, levels = pipe.denoise(noisy, strength="auto", num_steps=2, generator=seed(7))
    again, same = denoise_frames(pipe, noisy, "auto", 2, seed(7))
    assert torch.equal(frames, again) and levels == same and levels.t1 > 0


def test_settings_changed_after_construction_are_saved(tmp_path):
    pipe = pixel_pipeline()
    pipe.settings.sampling.stage1.num_steps = 7
    loaded = GriDiTPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"), torch_dtype=torch.float16)
    assert loaded.settings.sampling.stage1.num_steps == 7 and loaded.dtype == torch.float16


def test_save_replaces_a_model_folder_but_nothing_else(tmp_path):
    """As diffusers, saving over a model folder replaces it (atomically: nothing of the old one is mixed in); a
    folder that holds anything else is refused, and so are pickles and the hub."""
    pipe = pixel_pipeline(with_stage2=False)
    folder = pipe.save_pretrained(tmp_path / "model")
    assert not (folder / "stage2").exists()
    pixel_pipeline().save_pretrained(folder)
    assert (folder / "stage2").is_dir() and GriDiTPipeline.from_pretrained(folder).stage2 is not None
    (folder / "MODEL.md").write_text("the card")
    pipe.save_pretrained(folder)
    assert not (folder / "stage2").exists()                                   # replaced, not merged
    assert (folder / "MODEL.md").read_text() == "the card"                    # other files kept, as diffusers does
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(CTGridItError, match="not a model folder"):
        pipe.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"
    with pytest.raises(ValueError, match="safetensors"):
        pipe.save_pretrained(tmp_path / "other", safe_serialization=False)
    with pytest.raises(ValueError, match="variant"):
        pipe.save_pretrained(tmp_path / "other", variant="fp16")
    with pytest.raises(ValueError, match="local"):
        pipe.save_pretrained(tmp_path / "other", push_to_hub=True)
    with pytest.raises(TypeError):
        pipe.save_pretrained(tmp_path / "other", overwrite=True)
    with pytest.raises(CTGridItError, match="local safetensors"):
        GriDiTPipeline.from_pretrained(folder, use_safetensors=False)


def test_assigning_a_scheduler_changes_how_stage_1_samples(tmp_path):
    """pipe.scheduler is what stage 1 samples with: a DDPM scheduler made from its config samples as the DDPM
    settings do (and not as DDIM), and saving records it, so the folder loads with it."""
    from diffusers import DDIMScheduler, DDPMScheduler

    pipe = pixel_pipeline()
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    ddim = pipe.sample_latents(5, generator=seed(3))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ddpm = pipe.sample_latents(5, generator=seed(3))
    assert not torch.allclose(ddpm, ddim)
    base = pixel_pipeline()
    as_set = GriDiTPipeline(base.stage1, base.codec, sampling_scheduler(make_train_scheduler(clip_sample=True), "ddpm"),
                            base.stage2, settings=base.settings)
    assert isinstance(as_set.scheduler, DDPMScheduler) and as_set.settings.sampling.stage1.sampler == "ddpm"
    assert torch.equal(as_set.sample_latents(5, generator=seed(3)), ddpm)
    loaded = GriDiTPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    assert isinstance(loaded.scheduler, DDPMScheduler) and loaded.settings.sampling.stage1.sampler == "ddpm"
    assert torch.equal(loaded.sample_latents(5, generator=seed(3)), ddpm)


def test_pipeline_settings_round_trip():
    config = pixel_pipeline().settings
    again = PipelineSettings.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.lr_frame_size == (8, 8)


LEGACY_SAMPLING = {"sampler": "ddpm", "num_steps": 50, "stage2_steps": 10, "control_rows": None, "interpolate": False,
                   "chunk": None, "max_batch": 16, "stage2_batch": 32, "stage2_strength": 0.5,
                   "stage2_shared_noise": False, "stage2_noise_length": 8.0}


def test_model_folders_with_the_old_flat_sampling_settings_still_load():
    """The bundled model's gridit.json before the stage-1/stage-2 split, and the other old noise switches."""
    config = SamplingConfig.from_dict(LEGACY_SAMPLING)
    assert config.stage1 == Stage1Sampling(sampler="ddpm", num_steps=50, levels=0, max_batch=16)
    assert config.stage2 == Stage2Sampling(sampler="ddpm", num_steps=10, batch=32, strength=0.5, noise="smooth",
                                           noise_length=8.0)
    shared = SamplingConfig.from_dict({**LEGACY_SAMPLING, "stage2_shared_noise": True, "interpolate": True})
    assert (shared.stage2.noise, shared.stage1.levels) == ("shared", 1)
    assert SamplingConfig.from_dict({"stage2_noise_length": 0.0}).stage2.noise == "independent"
    assert SamplingConfig.from_dict({}) == SamplingConfig()
    assert SamplingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown sampling key"):
        SamplingConfig.from_dict({**LEGACY_SAMPLING, "warp": 9})
    # an old 4 x 4 folder interpolated between rows of 4 (its chunk default then): it still does
    old_4x4 = {**LEGACY_SAMPLING, "interpolate": True}
    assert SamplingConfig.from_dict(old_4x4, GridSpec(4, 4)).stage1.chunk == 4
    assert SamplingConfig.from_dict(old_4x4, GridSpec(2, 2)).stage1.chunk is None
    assert SamplingConfig.from_dict({"stage1": {"levels": 1}}, GridSpec(4, 4)).stage1.chunk is None


def test_bundled_model_folder_loads_with_its_settings():
    from ctgridit.model_folders import BUNDLED_MODEL

    pipe = GriDiTPipeline.from_pretrained(BUNDLED_MODEL)                     # ct_chest: masked, strides 1, 3, 9
    assert pipe.masked and pipe.max_stride == 9
    assert pipe.settings.sampling.stage1.levels == 2 and pipe.settings.sampling.stage2.noise == "smooth"


def masked_pipeline(levels: int, num_strides: int) -> GriDiTPipeline:
    stage1 = randomized(create_dit("DiT-tiny/2", sample_height=16, sample_width=16, in_channels=1, cond_channels=2,
                                   num_strides=num_strides), 0)
    sampling = SamplingConfig(Stage1Sampling(sampler="ddpm", num_steps=2, levels=levels), Stage2Sampling(num_steps=2))
    config = PipelineSettings(GridSpec(rows=2, cols=2, factor=1), (8, 8), 1, sampling)
    return GriDiTPipeline(stage1, PixelCodec(1), sampling_scheduler(make_train_scheduler(clip_sample=True), "ddpm"),
                          settings=config)


def test_masked_stride_aware_pipeline_round_trips_and_refuses_strides_it_never_learnt(tmp_path):
    pipe = masked_pipeline(levels=1, num_strides=3)
    expected = pipe.generate(11, batch_size=2, generator=seed(3))
    assert expected.shape == (2, 11, 1, 8, 8)
    loaded = GriDiTPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "model"))
    assert loaded.masked and loaded.max_stride == 3
    assert torch.equal(loaded.generate(11, batch_size=2, generator=seed(3)), expected)
    with pytest.raises(ValueError, match="strides up to 3"):
        masked_pipeline(levels=2, num_strides=3)                                  # stride 9 was never learnt
    with pytest.raises(ValueError, match="strides up to 3"):
        pipe.generate(40, generator=seed(0), levels=2)


# ------------------------------------------------------------- bad folders
def test_loading_a_random_folder_fails_clearly(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CTGridItError) as info:
        GriDiTPipeline.from_pretrained(tmp_path)
    message = str(info.value)
    assert "not a ctgridit model folder" in message and str(tmp_path) in message
    assert "\n" not in message
    with pytest.raises(CTGridItError, match="not a ctgridit model folder"):
        GriDiTPipeline.from_pretrained(tmp_path / "missing")


@pytest.fixture
def saved(tmp_path):
    return pixel_pipeline().save_pretrained(tmp_path / "model")


def test_loading_a_truncated_checkpoint_fails_clearly(saved):
    weights = next((saved / "stage1").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CTGridItError, match="incomplete or damaged") as info:
        GriDiTPipeline.from_pretrained(saved)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["codec", "scheduler", "config", "json"])
def test_loading_a_damaged_folder_fails_clearly(saved, damage):
    if damage in ("codec", "scheduler"):
        shutil.rmtree(saved / damage)
    elif damage == "config":
        index = json.loads((saved / INDEX_FILE).read_text())
        index["settings"]["sampling"]["no_such_option"] = 1
        (saved / INDEX_FILE).write_text(json.dumps(index))
    else:
        (saved / INDEX_FILE).write_text("{not json")
    with pytest.raises(CTGridItError, match="incomplete or damaged"):
        GriDiTPipeline.from_pretrained(saved)


def test_mismatched_stage2_is_refused(saved):
    base = pixel_pipeline()
    codec, scheduler, config, stage1 = base.codec, base.scheduler, base.settings, base.stage1
    for wrong in (stage2_model(3, 8),                       # the low-resolution size, not the full one
                  stage2_model(3, 16, cond_channels=1),     # condition channels differ from the codec's
                  stage2_model(1, 16, cond_channels=3)):    # noise channels differ from the codec's
        with pytest.raises(ValueError, match="stage 2"):
            GriDiTPipeline(stage1, codec, scheduler, wrong, settings=config)
    # a folder whose stage 2 does not fit is a damaged folder, reported as such
    shutil.rmtree(saved / "stage2")
    stage2_model(3, 8).save_pretrained(saved / "stage2")
    with pytest.raises(CTGridItError, match="stage 2"):
        GriDiTPipeline.from_pretrained(saved)


def test_mismatched_stage1_is_refused():
    base = pixel_pipeline()
    codec, scheduler, config = base.codec, base.scheduler, base.settings
    for wrong, words in ((stage1_model(3, 8, rows=1, cols=4), "grid"),
                         (stage1_model(3, 4), "latents"),
                         (stage1_model(1, 8), "channels")):
        with pytest.raises(ValueError, match=words):
            GriDiTPipeline(wrong, codec, scheduler, settings=config)


@pytest.mark.parametrize("noise", ["independent", "shared", "smooth"])
def test_stage_2_without_a_generator_draws_from_the_global_generator(noise):
    """One seeding rule for every stage-2 noise setting: no generator means torch's global generator (as in
    diffusers), so torch.manual_seed decides the noise; no hidden fixed seed."""
    pipe = pixel_pipeline()
    pipe.settings.sampling.stage2.noise = noise
    lr = torch.rand(4, 3, 8, 8, generator=seed(0)) * 2 - 1
    torch.manual_seed(11)
    first = pipe.super_resolve(lr, sequence_length=4)
    torch.manual_seed(11)
    assert torch.equal(pipe.super_resolve(lr, sequence_length=4), first)
    torch.manual_seed(12)
    assert not torch.equal(pipe.super_resolve(lr, sequence_length=4), first)
