"""Denoising (docs/METHOD.md section 7): the noise rule, ``add-noise``, ``denoise`` on real scans, reports and bad input."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from ctgridit.core.frame_denoising import (estimate_noise, noise_timestep, posterior_mean, reverse_scheduler,
                                           timestep_noise)
from ctgridit.core.diffusion import PREDICTIONS, diffuse, level_of_noise, make_train_scheduler
from ctgridit.ct.io import read_ct
from ctgridit.ct.fidelity import body_mask, psnr, quality
from ctgridit.ct.noise import add_noise
from ctgridit.ct.volume import CTVolume
from ctgridit.ct.denoising import denoise_volume, noise_hu
from tests.conftest import data_file
from tests.conftest import assert_refused, no_files_left, run_cli

TRAIN = make_train_scheduler()
CLEAN_CHANGE_HU = 8.0     # mean |change| the denoiser may make to a clean scan


# ------------------------------------------------------------- the noise rule
@pytest.mark.parametrize("sigma", [0.02, 0.1, 0.3])
def test_noise_estimate_of_white_noise(sigma):
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-0.3, 0.3, 64).expand(64, 64)                 # smooth structure does not count
    frames = (ramp + sigma * torch.randn(6, 1, 64, 64, generator=g)).clamp(-1, 1)
    assert estimate_noise(frames) == pytest.approx(sigma, rel=0.08)


def test_noise_estimate_ignores_clipped_and_padded_blocks():
    g = torch.Generator().manual_seed(0)
    frames = 0.05 * torch.randn(4, 1, 64, 64, generator=g)
    frames[..., :40] = -1.0                                             # padding / air clipped at the window
    assert estimate_noise(frames) == pytest.approx(0.05, rel=0.1)


def test_more_noise_gives_a_later_level_and_the_level_matches_the_noise():
    sigmas = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5]
    levels = [noise_timestep(TRAIN, s) for s in sigmas]
    assert levels[0] == 0 and all(b > a for a, b in zip(levels, levels[1:]))
    for s, t in zip(sigmas[1:], levels[1:]):
        assert timestep_noise(TRAIN, t) >= s > timestep_noise(TRAIN, t - 1)


def test_the_level_of_a_noise_is_exact_between_the_steps_and_at_them():
    scheduler = make_train_scheduler()
    ratio = lambda t: timestep_noise(scheduler, t)
    for t in (0, 3, 11, 27, 999):
        assert level_of_noise(scheduler, ratio(t))[0] == pytest.approx(t, abs=1e-9)
    for hu in (20.0, 50.0, 100.0):                       # between two integer steps
        t, abar = level_of_noise(scheduler, hu / 1000)
        assert noise_timestep(scheduler, hu / 1000) - 1 < t < noise_timestep(scheduler, hu / 1000)
        assert ((1 - abar) / abar) ** 0.5 == pytest.approx(hu / 1000, rel=1e-12)
    with pytest.raises(ValueError, match="outside"):
        level_of_noise(scheduler, 1e3)


class _GaussianPixels:
    """The exact model of pixels drawn i.i.d. ``N(m, v)``: what it predicts at any (fractional) level, read from the
    same interpolation of ``1 / abar`` as :func:`level_of_noise`, in the scheduler's prediction type."""

    def __init__(self, scheduler, m: float, v: float) -> None:
        self.scheduler, self.m, self.v = scheduler, m, v

    def __call__(self, x, t, **_):
        ratio2 = 1.0 / self.scheduler.alphas_cumprod.double() - 1.0
        low = int(t[0].floor())
        s2 = float(ratio2[low] + (float(t[0]) - low) * (ratio2[min(low + 1, 999)] - ratio2[low]))
        a = 1.0 / (1.0 + s2)
        x0 = self.m + a ** 0.5 * self.v / (a * self.v + 1 - a) * (x.double() - a ** 0.5 * self.m)
        eps = (x.double() - a ** 0.5 * x0) / (1 - a) ** 0.5
        kind = self.scheduler.config.prediction_type
        return {"epsilon": eps, "sample": x0, "v_prediction": a ** 0.5 * eps - (1 - a) ** 0.5 * x0}[kind]


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_the_posterior_mean_of_an_exact_model_is_the_wiener_filter_at_any_noise(kind):
    """Told noise between two diffusion steps, one call at the exact level gives ``E[x | y]`` exactly; rounding the
    level up to the next integer step and filling it with fresh noise (the sampler's start) does worse."""
    from types import SimpleNamespace

    from ctgridit.core.codecs import PixelCodec
    from ctgridit.core.frame_denoising import denoise_grids

    scheduler = make_train_scheduler(prediction_type=kind)
    m, v, sigma = 0.1, 0.02 ** 2, 0.05                               # 20 HU of signal, 50 HU of noise
    g = torch.Generator().manual_seed(0)
    clean = m + v ** 0.5 * torch.randn(1, 1, 64, 64, generator=g, dtype=torch.float64)
    noisy = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    pipeline = SimpleNamespace(stage1=_GaussianPixels(scheduler, m, v), scheduler=scheduler, masked=False,
                               max_stride=0, codec=PixelCodec(1))
    wiener = m + v / (v + sigma ** 2) * (noisy - m)
    assert torch.allclose(posterior_mean(pipeline, noisy, sigma), wiener, atol=1e-10)
    t = noise_timestep(scheduler, sigma)
    assert torch.allclose(denoise_grids(pipeline, noisy, t, sigma, 1, g), wiener, atol=1e-10)
    fresh = denoise_grids(pipeline, noisy, t, 0.0, 1, g)             # the level filled with fresh noise
    assert float((fresh - clean).square().mean()) > float((wiener - clean).square().mean())


def test_diffuse_adds_only_the_missing_noise():
    z = torch.rand(2, 1, 16, 16)
    t = 40
    a = float(TRAIN.alphas_cumprod[t])
    matched = diffuse(TRAIN, z, t, noise_std=timestep_noise(TRAIN, t), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(matched, a ** 0.5 * z)                   # the input's noise is the level's noise
    fresh = diffuse(TRAIN, z, t, generator=torch.Generator().manual_seed(0)) - a ** 0.5 * z
    assert float(fresh.std()) == pytest.approx((1 - a) ** 0.5, rel=0.1)


@pytest.mark.parametrize("t", [0, 40, 999])
def test_diffuse_from_clean_is_the_schedulers_add_noise_and_its_jumps_compose(t):
    """From a clean sample, diffuse is diffusers' add_noise with the same noise; a jump from level s to t
    (RePaint) has the variance that makes q(x_s) then the jump equal to q(x_t)."""
    z = torch.rand(2, 1, 8, 8) * 2 - 1
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    ours = diffuse(TRAIN, z, t, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, TRAIN.add_noise(z, eps, torch.tensor([t])), rtol=0, atol=1e-6)
    s = t // 2
    a_t, a_s = float(TRAIN.alphas_cumprod[t]), float(TRAIN.alphas_cumprod[s])
    jumped = diffuse(TRAIN, torch.zeros(200_000), t, from_t=s, generator=torch.Generator().manual_seed(4))
    assert float(jumped.var()) == pytest.approx(1 - a_t / a_s, rel=0.02, abs=1e-6)
    assert torch.equal(diffuse(TRAIN, z, -1), z)


@pytest.mark.parametrize("t,steps,expected", [(0, 10, [0]), (7, 1, [7]), (9, 10, list(range(9, -1, -1))),
                                              (30, 4, [30, 20, 10, 0])])
def test_reverse_schedule_runs_from_the_level_to_zero(t, steps, expected):
    assert [int(x) for x in reverse_scheduler(TRAIN, t, steps).timesteps] == expected


# ----------------------------------------------------------------- add-noise
def test_gaussian_noise_has_its_sigma_and_keeps_the_geometry(capsys, small_ct, tmp_path):
    out = tmp_path / "noisy.nii.gz"
    code, _, err = run_cli(capsys, "add-noise", small_ct, "--sigma", "40", "--out", out, "--seed", "3")
    assert code == 0, err
    clean, noisy = read_ct(small_ct), read_ct(out)
    assert noisy.shape == clean.shape and np.allclose(noisy.affine, clean.affine)
    assert float(np.std(noisy.array - clean.array)) == pytest.approx(40, rel=0.03)
    again = tmp_path / "again.nii.gz"
    run_cli(capsys, "add-noise", small_ct, "--sigma", "40", "--out", again, "--seed", "3")
    assert np.array_equal(nib.load(str(out)).get_fdata(), nib.load(str(again)).get_fdata())


def test_lowdose_noise_is_sigma_in_water_more_in_bone_less_in_air(small_ct):
    clean = read_ct(small_ct)
    diff = add_noise(clean, 30, "lowdose", seed=0).array - clean.array
    hu = clean.array
    water, bone, air = np.abs(hu) < 60, hu > 400, hu < -950
    assert water.sum() > 1000 and bone.sum() > 100 and air.sum() > 1000
    assert float(diff[water].std()) == pytest.approx(30, rel=0.15)
    assert diff[bone].std() > 1.1 * diff[water].std() > 1.1 * diff[air].std()


def test_add_noise_refuses_bad_options(capsys, small_ct, tmp_path):
    before = set(os.listdir(tmp_path))
    code, _, err = run_cli(capsys, "add-noise", small_ct, "--sigma", "-5", "--out", tmp_path / "n.nii.gz")
    assert_refused(code, err, "sigma")
    code, _, err = run_cli(capsys, "add-noise", small_ct, "--sigma", "5", "--model", "speckle",
                           "--out", tmp_path / "n.nii.gz")
    assert_refused(code, err, "speckle", "gaussian")
    no_files_left(tmp_path, before)


# ------------------------------------------------------------------- metrics
def test_body_mask_and_metrics_on_a_real_scan(small_ct):
    clean = read_ct(small_ct).array
    mask = body_mask(clean)
    assert 0.2 < mask.mean() < 0.9
    assert not mask[0, 0, :].any()                                       # corners are outside the body
    flat = np.zeros((8, 8, 8))
    assert psnr(flat, flat + 20) == pytest.approx(40.0)                  # 20 log10(2000 / 20)
    half = flat.copy()
    half[:4] = 200                                                       # errors only where the mask is off
    assert psnr(flat, half, mask=np.arange(8)[:, None, None].repeat(8, 1).repeat(8, 2) >= 4) == float("inf")
    q = quality(clean, clean)
    assert q["ssim"] == pytest.approx(1.0) and q["psnr"] == float("inf")
    worse, better = (quality(clean, add_noise(read_ct(small_ct), s).array) for s in (100, 20))
    assert better["psnr"] > worse["psnr"] and better["ssim"] > worse["ssim"]
    assert better["ssim_body"] > worse["ssim_body"]


# -------------------------------------------------------------- denoise: gridit
@pytest.fixture(scope="module")
def noisy50(tmp_path_factory):
    from tests.conftest import data_file

    clean_path = data_file("totalsegmentator/example_ct_sm.nii.gz")
    folder = tmp_path_factory.mktemp("noisy")
    noisy = folder / "noisy50.nii.gz"
    from ctgridit.ct.io import write_nifti
    write_nifti(add_noise(read_ct(clean_path), 50, seed=0), noisy)
    return clean_path, noisy


def test_gridit_denoise_raises_psnr_and_ssim_and_keeps_the_geometry(capsys, noisy50, tmp_path):
    """The bundled model on a real scan with sigma 50 HU: the report shows the gain."""
    clean, noisy = noisy50
    out, report, png = tmp_path / "d.nii.gz", tmp_path / "report.json", tmp_path / "d.png"
    code, stdout, err = run_cli(capsys, "denoise", noisy, "--out", out, "--reference", clean, "--report", report,
                                "--preview", png, "--device", "cpu")
    assert code == 0, err
    data = json.loads(report.read_text())
    before, after = data["input_quality"], data["output_quality"]
    assert after["psnr"] > before["psnr"] + 1.0 and after["ssim"] > before["ssim"]
    assert after["psnr_body"] > before["psnr_body"]
    assert data["method"] == "gridit" and data["t"] >= 1 and data["tile"] == [64, 64]
    assert "PSNR" in stdout and f"{after['psnr']:.2f}" in stdout
    src, img = nib.load(str(noisy)), nib.load(str(out))
    assert img.shape == src.shape and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(img.header.get_zooms(), src.header.get_zooms(), atol=1e-6)
    assert png.stat().st_size > 1000


def test_auto_strength_follows_the_noise(small_ct):
    """More noise in the input -> a later diffusion level t*."""
    clean = read_ct(small_ct)
    runs = [denoise_volume(add_noise(clean, s, seed=1), "gridit", device="cpu").details for s in (20, 100)]
    assert runs[1]["t"] > runs[0]["t"] >= 1
    assert runs[1]["noise_removed_hu"] > 2 * runs[0]["noise_removed_hu"]


@pytest.mark.parametrize("scan", ["totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/chest_crop.nii.gz"])
def test_noise_estimate_adds_in_quadrature_on_real_scans(scan):
    """Gaussian noise of 50 and 100 HU on a real scan: the full-resolution estimate is within 10 % of
    sqrt(added^2 + the scan's own noise^2)."""
    clean = read_ct(data_file(scan))
    own = noise_hu(clean.array)
    assert 0 < own < 40
    for sigma in (50.0, 100.0):
        expected = np.hypot(sigma, own)
        assert noise_hu(add_noise(clean, sigma, seed=3).array) == pytest.approx(expected, rel=0.10)


def flat_volume(hu: float, sigma: float, shape=(150, 140, 12), spacing=0.7) -> CTVolume:
    """A uniform slab of ``hu`` with Gaussian noise ``sigma``: 0.7 mm voxels, so the 64-voxel tiles meet at
    several rows and columns."""
    array = np.full(shape, hu, np.float32) + np.random.default_rng(0).normal(0, sigma, shape).astype(np.float32)
    return CTVolume(array, np.diag([spacing, spacing, 2.0, 1.0]))


def test_a_flat_volume_stays_flat_across_tile_borders():
    """Seams would show as steps in the mean along rows, columns or slices where tiles and grids meet."""
    noisy = flat_volume(40.0, 30.0)
    result = denoise_volume(noisy, "gridit", device="cpu")
    out = result.volume.array
    assert result.details["t"] >= 1
    assert out.std() < 0.5 * noisy.array.std()                         # the noise is taken out ...
    for axis in range(3):                                               # ... evenly: no tile borders show
        profile = out.mean(axis=tuple(a for a in range(3) if a != axis))
        assert np.abs(profile - 40.0).max() < 3.0, (axis, profile)


@pytest.mark.parametrize("hu", [0.0, 40.0, -1000.0])
def test_a_noise_free_constant_volume_comes_back_unchanged(hu):
    """Nothing to take out (the noise estimate is 0): the output is the input."""
    clean = flat_volume(hu, 0.0, shape=(70, 66, 6))
    result = denoise_volume(clean, "gridit", device="cpu")
    assert result.details["noise_estimated_hu"] == 0 and result.details["t"] == 0
    np.testing.assert_array_equal(result.volume.array, clean.array)


def test_a_clean_real_scan_changes_by_a_few_hu(small_ct):
    """A real scan with only its own noise (about 11 HU): the denoiser takes out about that, not anatomy."""
    clean = read_ct(small_ct)
    out = denoise_volume(clean, "gridit", device="cpu").volume.array
    change = out - clean.array
    assert np.abs(change).mean() < CLEAN_CHANGE_HU and abs(change.mean()) < 2.0


def test_a_synthesis_model_denoises_on_its_own_grid(small_ct):
    """--model with the bundled synthesis model (3 x 3 x 1.5 mm, two stages): the scan goes to the model's grid and
    the correction comes back; on this 3 mm scan with 50 HU of noise it raises PSNR (by 0.8 dB, measured)."""
    from ctgridit.model_folders import BUNDLED_MODEL

    clean = read_ct(small_ct)
    noisy = add_noise(clean, 50, seed=0)
    result = denoise_volume(noisy, "gridit", model=str(BUNDLED_MODEL), device="cpu")
    assert result.details["t_stage1"] >= 1 and result.details["model_spacing"] == [3.0, 3.0, 1.5]
    assert result.volume.shape == noisy.shape
    assert psnr(clean.array, result.volume.array) > psnr(clean.array, noisy.array) + 0.5


def test_denoise_of_a_dicom_folder_keeps_its_geometry(capsys, dicom_dir, tmp_path):
    out = tmp_path / "d.nii.gz"
    code, _, err = run_cli(capsys, "denoise", dicom_dir, "--out", out, "--device", "cpu", "--quiet")
    assert code == 0, err
    src, result = read_ct(dicom_dir), read_ct(out)
    assert result.shape == src.shape
    np.testing.assert_allclose(result.affine, src.affine, atol=1e-4)
    assert np.abs(result.array - src.array).mean() < 50                  # a correction, not a new image


def test_default_output_name_is_next_to_the_input(capsys, noisy50, tmp_path):
    import shutil

    noisy = tmp_path / "scan.nii.gz"
    shutil.copy(noisy50[1], noisy)
    code, _, err = run_cli(capsys, "denoise", noisy, "--method", "bilateral", "--quiet")
    assert code == 0, err
    assert (tmp_path / "scan_denoised.nii.gz").is_file()


@pytest.mark.parametrize("method", ["bilateral", "nlm"])
def test_classical_baselines_through_the_same_path(noisy50, method):
    clean, noisy = (read_ct(p) for p in noisy50)
    result = denoise_volume(noisy, method)
    assert result.volume.shape == noisy.shape and np.array_equal(result.volume.affine, noisy.affine)
    assert psnr(clean.array, result.volume.array) > psnr(clean.array, noisy.array)
    assert result.details["noise_removed_hu"] == pytest.approx(50, rel=0.3)


# ----------------------------------------------------------------- bad input
def test_reference_of_another_shape_is_refused(capsys, noisy50, chest_ct, tmp_path):
    before = set(os.listdir(tmp_path))
    code, _, err = run_cli(capsys, "denoise", noisy50[1], "--out", tmp_path / "d.nii.gz", "--reference", chest_ct,
                           "--report", tmp_path / "r.json")
    assert_refused(code, err, "shape", "same grid")
    no_files_left(tmp_path, before)


@pytest.mark.parametrize("args,phrases", [
    (["--strength", "1.5"], ["strength"]),
    (["--strength", "lots"], ["strength"]),
    (["--method", "median"], ["median", "gridit"]),
    (["--report", "r.txt"], [".json"]),
    (["--precision", "fp16"], ["precision", "bf16"]),
])
def test_bad_options_are_refused(capsys, noisy50, tmp_path, args, phrases):
    before = set(os.listdir(tmp_path))
    code, _, err = run_cli(capsys, "denoise", noisy50[1], "--out", tmp_path / "d.nii.gz", *args)
    assert_refused(code, err, *phrases)
    no_files_left(tmp_path, before)


def test_missing_and_non_image_inputs_are_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "denoise", tmp_path / "nope.nii.gz")
    assert_refused(code, err, "no such file")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image")
    before = set(os.listdir(tmp_path))
    code, _, err = run_cli(capsys, "denoise", junk)
    assert code == 2 and "Traceback" not in err
    no_files_left(tmp_path, before)


@pytest.mark.parametrize("sigma", [20.0, 50.0])
def test_told_the_noise_added_the_output_is_never_worse_than_the_input(sigma):
    """A real chest the denoiser never saw (the TotalSegmentator chest crop, with its own noise), Gaussian noise
    added: told that noise, gridit's output beats the noisy input in PSNR and SSIM against the scan, whole and
    inside the body (SURE blends the model's output with the input: ctgridit.core.sure)."""
    from ctgridit.ct.fidelity import body_mask, quality

    clean = read_ct(data_file("totalsegmentator/chest_crop.nii.gz"))
    noisy = add_noise(clean, sigma, seed=0)
    result = denoise_volume(noisy, "gridit", device="cpu", noise=sigma)
    assert result.details["noise_removed_hu"] == pytest.approx(sigma) and 0 <= result.details["sure"]["weight"] <= 1
    mask = body_mask(clean.array)
    before, after = quality(clean.array, noisy.array, mask=mask), quality(clean.array, result.volume.array, mask=mask)
    for key in ("psnr", "ssim", "psnr_body", "ssim_body"):
        assert after[key] >= before[key], (key, before, after)


def test_the_noise_in_hu_and_the_strength_are_not_given_together(capsys, noisy50, tmp_path):
    code, _, err = run_cli(capsys, "denoise", noisy50[1], "--noise", "50", "--strength", "0.05",
                           "--out", tmp_path / "d.nii.gz")
    assert code == 2 and err.strip().startswith("error: --strength: give the noise in HU or the strength, not both")
    code, _, err = run_cli(capsys, "denoise", noisy50[1], "--noise", "-3", "--out", tmp_path / "d.nii.gz")
    assert code == 2 and "--noise" in err and not (tmp_path / "d.nii.gz").exists()


def test_a_noise_in_hu_needs_a_native_resolution_denoiser(capsys, noisy50, tmp_path):
    """--noise with the synthesis model (it works on its own grid): one line naming --noise, before any work."""
    from ctgridit.model_folders import BUNDLED_MODEL

    out = tmp_path / "d.nii.gz"
    code, _, err = run_cli(capsys, "denoise", noisy50[1], "--noise", "50", "--model", BUNDLED_MODEL, "--out", out)
    assert code == 2 and err.strip().startswith("error: --noise: a noise level in HU needs a native-resolution")
    assert not out.exists()


def test_without_the_guard_the_output_is_the_models(noisy50):
    """--no-guard: no SURE blend (the output is the model's own); with it, the weight is reported in [0, 1]."""
    noisy = read_ct(noisy50[1])
    plain = denoise_volume(noisy, "gridit", device="cpu", noise=50.0, guard=False, wiener=False)
    guarded = denoise_volume(noisy, "gridit", device="cpu", noise=50.0, wiener=False)
    assert "sure" not in plain.details and 0 <= guarded.details["sure"]["weight"] <= 1
    w = guarded.details["sure"]["weight"]
    np.testing.assert_allclose(guarded.volume.array, noisy.array + w * (plain.volume.array - noisy.array), atol=0.01)


def _autocast_of_every_model_call(pipeline, monkeypatch) -> list[bool]:
    seen = []
    forward = pipeline.stage1.forward
    monkeypatch.setattr(pipeline.stage1, "forward",
                        lambda *a, **k: (seen.append(torch.is_autocast_enabled("cpu")), forward(*a, **k))[1])
    return seen


def test_bfloat16_arithmetic_changes_the_output_by_a_fraction_of_a_hu(noisy50, monkeypatch):
    """``precision="bf16"`` runs the model's products in bfloat16 (autocast; ``auto`` picks it on CPUs with AMX or
    AVX-512 BF16): every model call, the SURE guard's included, runs under it and no other; the output differs from float32's,
    so it ran, but by a fraction of a HU against the 41 HU it removes here (measured 0.17 HU RMS, 1.6 HU at most,
    PSNR within 0.002 dB)."""
    from ctgridit.ct.denoising import load_denoiser

    clean, noisy = read_ct(noisy50[0]), read_ct(noisy50[1])
    pipeline = load_denoiser(None, "cpu")
    seen = _autocast_of_every_model_call(pipeline, monkeypatch)
    runs = {}
    for p in ("fp32", "bf16"):
        seen.clear()
        runs[p] = denoise_volume(noisy, "gridit", model=pipeline, noise=50.0, precision=p)
        assert len(seen) > 3 and set(seen) == {p == "bf16"}                  # the guard's runs too
    assert [runs[p].details["precision"] for p in runs] == ["fp32", "bf16"]
    assert not torch.is_autocast_enabled("cpu")                               # nothing leaks out
    change = runs["bf16"].volume.array - runs["fp32"].volume.array
    removed = runs["fp32"].volume.array - noisy.array
    assert 0 < np.sqrt(np.mean(change ** 2)) < 0.02 * np.sqrt(np.mean(removed ** 2)) and np.abs(change).max() < 5
    assert abs(psnr(clean.array, runs["bf16"].volume.array) - psnr(clean.array, runs["fp32"].volume.array)) < 0.02


def test_bfloat16_leaves_the_resampling_to_a_synthesis_models_grid_in_float32(small_ct):
    """With a synthesis model the scan is resampled to the model's grid and the correction back; autocast would
    round that resampling's grid too (up to 2.6 voxels off, review of b31f119). Only the model calls run in
    bfloat16, so the output stays close to float32's: 1.2 HU RMS against the 63 HU removed, PSNR -0.006 dB
    (measured; the stages' several sampling steps carry the rounding further than the one-step denoiser)."""
    from ctgridit.model_folders import BUNDLED_MODEL

    noisy = add_noise(read_ct(small_ct), 50, seed=0)
    runs = {p: denoise_volume(noisy, "gridit", model=str(BUNDLED_MODEL), device="cpu", precision=p, guard=False)
            for p in ("fp32", "bf16")}
    change = runs["bf16"].volume.array - runs["fp32"].volume.array
    removed = runs["fp32"].volume.array - noisy.array
    assert 0 < np.sqrt(np.mean(change ** 2)) < 0.05 * np.sqrt(np.mean(removed ** 2))


def test_auto_precision_is_bfloat16_only_on_a_cpu_with_bfloat16_in_hardware(monkeypatch):
    from ctgridit.core import precision
    from ctgridit.core.precision import inference_precision, resolve_precision
    from ctgridit.errors import CTGridItError

    assert resolve_precision("cpu", "fp32") == "fp32" and resolve_precision("cpu", "bf16") == "bf16"
    for amx in (True, False):
        for avx512 in (True, False):
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx512=avx512: avx512)
            assert resolve_precision("cpu") == ("bf16" if amx or avx512 else "fp32")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")                 # a torch without the probes
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not precision.hardware_bf16("cpu") and resolve_precision("cpu") == "fp32"
    assert resolve_precision("cuda") == "fp32" and resolve_precision("meta") == "fp32"   # GPUs: their own dtype
    with pytest.raises(CTGridItError, match="bfloat16"):
        resolve_precision("meta", "bf16")
    with inference_precision("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with inference_precision("cpu", "fp32"):                              # fp32 overrides an outer autocast
            assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("cpu", "fp16")


def test_the_last_layer_gives_float32_under_bfloat16_autocast():
    from ctgridit.ct.denoising import load_denoiser

    model = load_denoiser(None, "cpu").stage1
    x, t = torch.randn(2, 1, 128, 128), torch.full((2,), 20.0)
    with torch.no_grad():
        exact = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x, t)
    assert fast.dtype == torch.float32 and len(torch.unique(fast)) > 0.9 * fast.numel()   # not on a bf16 grid
    assert 0 < float((fast - exact).norm() / exact.norm()) < 0.02


def test_the_wiener_stage_filters_the_input_with_the_guarded_output_as_pilot(noisy50):
    """By default the guarded output pilots the empirical Wiener filter of the input at the noise told
    (ctgridit.core.dct_wiener, on HU + 1000), which brings it closer to the clean scan; of the two pilots, the one
    the whole chain's SURE ranks first is used, and it is truly the better one here (the average with the
    hard-thresholded estimate: 38.54 against 38.13 dB)."""
    from ctgridit.core.dct_wiener import dct_hard_threshold, dct_wiener

    noisy, clean = read_ct(noisy50[1]), read_ct(noisy50[0])
    pilot = denoise_volume(noisy, "gridit", device="cpu", noise=50.0, wiener=False)
    final = denoise_volume(noisy, "gridit", device="cpu", noise=50.0)
    assert final.details["wiener"]["sigma_hu"] == 50.0 and "wiener" not in pilot.details
    block, step = final.details["wiener"]["block"], final.details["wiener"]["step"]
    assert block[2] == 4                                                       # 3 mm slices along the third axis
    estimates = final.details["wiener"]["estimated_rmse_hu"]
    assert "x".join(map(str, block)) == min(estimates, key=estimates.get)       # the block SURE estimates best
    chain = final.details["wiener"]["chain_rmse_hu"]                            # the pilot the whole chain's SURE
    assert final.details["wiener"]["pilot"] == min(chain, key=chain.get)        # estimates best
    guides = {"model": pilot.volume.array + 1000}
    hard = final.details["wiener"]["hard_step"]                                # every second block along the slices
    assert hard == [s * (1 + (i == 2)) for i, s in enumerate(step)]
    guides["model + hard thresholding"] = (guides["model"] + dct_hard_threshold(noisy.array + 1000, 50.0, block,
                                                                                 hard)) / 2
    outputs = {name: dct_wiener(noisy.array + 1000, guide, 50.0, block, step) - 1000   # on HU + 1000
               for name, guide in guides.items()}
    np.testing.assert_allclose(final.volume.array, outputs[final.details["wiener"]["pilot"]], atol=0.01)
    truth = {name: psnr(clean.array, out) for name, out in outputs.items()}
    assert truth[final.details["wiener"]["pilot"]] >= max(truth.values()) - 0.02   # the better pilot, or as good
    assert psnr(clean.array, final.volume.array) > psnr(clean.array, pilot.volume.array) + 0.1


def _reordered(volume: CTVolume, order) -> CTVolume:
    """``volume`` with its array axes in ``order`` (the affine's columns along): the same scan, stored otherwise."""
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, list(order)]
    return CTVolume(np.ascontiguousarray(np.transpose(volume.array, order)), affine, source=volume.source)


def test_no_wiener_on_the_command_line(capsys, noisy50, tmp_path):
    """The output line says the Wiener step ran, at the noise told; --no-wiener leaves the guarded output."""
    code, out, _ = run_cli(capsys, "denoise", noisy50[1], "--noise", "50", "--out", tmp_path / "w.nii.gz")
    assert code == 0 and "Wiener-filtered at 50.0 HU" in out
    code, out, _ = run_cli(capsys, "denoise", noisy50[1], "--noise", "50", "--no-wiener", "--out", tmp_path / "n.nii.gz")
    assert code == 0 and "Wiener" not in out and "SURE" in out
    assert not np.array_equal(read_ct(tmp_path / "w.nii.gz").array, read_ct(tmp_path / "n.nii.gz").array)


@pytest.mark.parametrize("scan, mix, order", [("totalsegmentator/example_ct_sm.nii.gz", False, (0, 1, 2)),
                                              ("totalsegmentator/example_ct_sm.nii.gz", True, (0, 1, 2)),
                                              ("soft_tissue_sarcoma/STS_019.nii.gz", False, (2, 1, 0))])
def test_the_whole_chain_sure_estimates_the_error_on_the_guard_slab(scan, mix, order):
    """SURE of model, blend and Wiener step together (the guard's two model runs, the pilot of each input its own):
    within 5 % of the true mean squared error on the slab's part (measured 0.03 to 4.6 % on 18 held-out rows), with
    or without the hard-thresholded estimate in the pilot, and with the scan stored slice axis first (the slab is
    then cut along its thick voxels: a 0.98 x 0.98 x 3.27 mm thigh); with the pilot held fixed instead it comes out
    far low."""
    from ctgridit.ct.denoising import _chain_sure, _gridit_native, _guarded, chain_part
    from ctgridit.core.dct_wiener import dct_hard_threshold, dct_wiener
    from ctgridit.ct.denoising import load_denoiser

    clean = _reordered(read_ct(data_file(scan)), order)
    noisy = add_noise(clean, 50.0, seed=0)
    pipeline = load_denoiser(None, "cpu")
    hu, details = _gridit_native(noisy, "auto", pipeline, 0, 1, None, 50.0)
    _, _, chain = _guarded(noisy, hu, details, _gridit_native, pipeline, 0, 1, "auto", 50.0, 50.0)
    axis = order.index(2)                                        # the thickest voxels', or the third as stored
    assert chain["axis"] == axis and chain["y"].shape[axis] == 8
    block, step = [8] * 3, [2] * 3
    block[axis], step[axis] = 4, 2
    estimate = _chain_sure(chain, 50.0, block, step, mix)
    part = chain_part(chain)
    truth = np.take(clean.array, range(chain["first"], chain["first"] + 8), axis=axis)[part]
    y, guide = chain["y"][part] + 1000, chain["pilot"][part] + 1000
    if mix:
        guide = (guide + dct_hard_threshold(y, 50.0, block, step)) / 2
    error = float(np.mean((dct_wiener(y, guide, 50.0, block, step) - 1000 - truth) ** 2))
    assert abs(estimate - error) < 0.05 * error                             # measured 1.0, 1.5 and 0.9 %
    out, diagonal = dct_wiener(y, guide, 50.0, block, step, diagonal=True)      # the pilot held fixed
    fixed = float(np.mean((out - y) ** 2)) - 50.0**2 + 2 * 50.0**2 * float(np.mean(diagonal))
    assert fixed < 0.5 * error                                                  # measured below 0
