"""New slices for real scans (``ctgridit.ct.slices``, ``ctgridit interpolate`` and ``ctgridit extend``).

Geometry and exactness are checked with a tiny untrained native-resolution
masked-conditional model (what it generates does not matter for them) on real
scans in two orientations: RAS (``example_ct_sm``) and LPS (``chest_crop``).
What the bundled model generates is measured by ``pipelines/eval_interpolate.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctgridit.cli import main
from ctgridit.core.codecs import PixelCodec
from ctgridit.core.diffusion import make_train_scheduler, sampling_scheduler
from ctgridit.core.dit import create_dit
from ctgridit.core.grid import GridSpec
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.core.settings import PipelineSettings, SamplingConfig, Stage1Sampling
from ctgridit.ct.io import read_ct, write_nifti
from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItError
from ctgridit.ct.slices import extend_volume, interpolate_volume
from tests.conftest import randomized


def native_pipeline(masked: bool = True, resolution: str = "native", gaps: list[int] | None = None,
                    fresh: bool = False, fill: str = "linear") -> GriDiTPipeline:
    """A 2 x 2 model of 16 x 16 tiles at the scan's own resolution, predicting clean tiles (one DDIM step);
    masked, it fills its condition by linear interpolation (or ``fill``) and adds its output to it, as
    pipelines/configs/ct_interpolate.yaml does. ``gaps``: the interpolation factors it says it fills;
    ``fresh``: DiT's initial weights (its last layer at zero: the output is the fill exactly)."""
    from ctgridit.core.conditioning import condition_channels

    stage1 = create_dit("DiT-tiny/2", sample_height=32, sample_width=32, in_channels=1,
                        **(dict(cond_channels=condition_channels(1, fill), cond_fill=fill, fill_residual=True)
                           if masked else {}))
    stage1 = stage1 if fresh else randomized(stage1, 0)
    sampling = SamplingConfig(Stage1Sampling(sampler="ddim", num_steps=1, gaps=gaps))
    config = PipelineSettings(GridSpec(rows=2, cols=2, factor=1), (16, 16), 1, sampling,
                              {"kind": "ct", "resolution": resolution, "window": [-1000, 1000]})
    return GriDiTPipeline(stage1, PixelCodec(1), sampling_scheduler(make_train_scheduler(clip_sample=True, prediction_type="sample"), "ddim"),
                          settings=config)


def test_a_residual_model_needs_a_clean_sample_scheduler():
    """Adding the output to the filled condition only makes sense for a model of the clean sample."""
    good = native_pipeline()
    with pytest.raises(ValueError, match="fill_residual"):
        GriDiTPipeline(good.stage1, good.codec, make_train_scheduler(clip_sample=True), settings=good.settings)


def slab(path, slices: int, layout: str = "as stored") -> CTVolume:
    """The first ``slices`` slices; ``layout`` "z flipped" stores them head first, "z first" makes the slice axis
    the first array axis (the same voxels in the world either way)."""
    volume = read_ct(path)
    array, affine = volume.array[:, :, :slices].copy(), volume.affine.copy()
    if layout == "z flipped":
        array = array[:, :, ::-1].copy()
        affine[:3, 3] = affine[:3, :3] @ [0, 0, slices - 1] + affine[:3, 3]
        affine[:3, 2] *= -1
    elif layout == "z first":
        array = np.transpose(array, (2, 0, 1)).copy()
        affine[:3, :3] = affine[:3, [2, 0, 1]]
    return CTVolume(array, affine, source=str(path))


def slice_axis(volume: CTVolume) -> int:
    return int(np.argmax(np.abs(volume.affine[2, :3])))


def take(array: np.ndarray, axis: int, index) -> np.ndarray:
    return np.take(array, index, axis=axis)


def world(affine: np.ndarray, index) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(index, dtype=float) + affine[:3, 3]


LAYOUTS = [("small_ct", "as stored"), ("chest_ct", "as stored"), ("small_ct", "z flipped"), ("chest_ct", "z first")]


@pytest.mark.parametrize("scan,layout", LAYOUTS)
def test_interpolation_keeps_every_slice_and_divides_the_spacing(scan, layout, request):
    volume = slab(request.getfixturevalue(scan), 7, layout)
    axis = slice_axis(volume)
    result = interpolate_volume(volume, 3, native_pipeline())
    out = result.volume
    expected_shape = list(volume.shape)
    expected_shape[axis] = 19
    assert list(out.shape) == expected_shape
    assert np.array_equal(take(out.array, axis, range(0, 19, 3)), volume.array.astype(np.float32))  # exactly
    new = take(out.array, axis, range(1, 19, 3))
    assert new.min() >= -1000 and new.max() <= 1000 and new.std() > 0             # generated, in the window
    others = [a for a in range(3) if a != axis]
    assert np.allclose(out.affine[:3, others], volume.affine[:3, others])          # same in-plane grid
    assert np.allclose(out.affine[:3, axis], volume.affine[:3, axis] / 3)          # slices three times closer
    assert np.allclose(out.affine[:3, 3], volume.affine[:3, 3])                    # origin unchanged
    for k in range(7):                                                             # same place in the world
        index, out_index = [5, 9, 3], [5, 9, 3]
        index[axis], out_index[axis] = k, 3 * k
        assert np.allclose(world(out.affine, out_index), world(volume.affine, index))
    assert result.details["slices"] == [7, 19]


@pytest.mark.parametrize("layout", ["as stored", "z flipped"])
def test_classical_interpolation_is_exact_where_it_must_be(small_ct, layout):
    """Linear: the midpoint of two slices is their mean; cubic (not-a-knot) reproduces a cubic along z exactly;
    both keep the slices and the geometry of the grid model's path."""
    volume = slab(small_ct, 6, layout)
    half = interpolate_volume(volume, 2, method="linear").volume
    assert np.array_equal(half.array[:, :, ::2], volume.array.astype(np.float32))
    assert np.allclose(half.array[:, :, 1::2], (volume.array[:, :, :-1] + volume.array[:, :, 1:]) / 2, atol=1e-3)
    assert np.allclose(half.affine[:3, 2], volume.affine[:3, 2] / 2)
    z = np.arange(6, dtype=float) * float(np.sign(volume.affine[2, 2]))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=volume.shape[:2])[..., None], rng.normal(size=volume.shape[:2])[..., None]
    cubic_volume = CTVolume((a * z ** 3 + b * z).astype(np.float32), volume.affine)
    out = interpolate_volume(cubic_volume, 3, method="cubic").volume
    fine = np.arange(16, dtype=float) / 3 * float(np.sign(volume.affine[2, 2]))
    assert np.allclose(out.array, a * fine ** 3 + b * fine, atol=1e-3)
    with pytest.raises(CTGridItError, match="at least 4"):
        interpolate_volume(slab(small_ct, 3), 3, method="cubic")


@pytest.mark.parametrize("layout", ["as stored", "z flipped"])
def test_flow_interpolation_keeps_the_slices_and_follows_a_shift(small_ct, layout):
    """method="flow": the input slices exactly, the geometry of the other methods, and where each slice is the
    one below shifted in-plane by 2 voxels, the new slice a third of the way is that content shifted by a
    third of it (closer than linear interpolation, which blends two copies)."""
    volume = slab(small_ct, 6, layout)
    out = interpolate_volume(volume, 3, method="flow").volume
    assert np.array_equal(out.array[:, :, ::3], volume.array.astype(np.float32))
    assert np.allclose(out.affine, interpolate_volume(volume, 3, method="linear").volume.affine)
    base = slab(small_ct, 1).array[:, :, 0]
    x = np.arange(base.shape[0], dtype=float)
    moved = lambda d: np.stack([np.interp(x - d, x, col) for col in base.T], axis=1)     # shifted along x
    steps = np.sign(volume.affine[2, 2]) * np.arange(3)
    shifted = CTVolume(np.stack([moved(2.0 * s) for s in steps], axis=2).astype(np.float32), volume.affine)
    made = interpolate_volume(shifted, 3, method="flow").volume.array[:, :, 1]
    linear = interpolate_volume(shifted, 3, method="linear").volume.array[:, :, 1]
    want = moved(2.0 * steps[1] / 3)
    inner = (slice(8, -8), slice(8, -8))
    assert np.mean((made - want)[inner] ** 2) < 0.3 * np.mean((linear - want)[inner] ** 2)


def _every_third_of_the_chest_crop():
    """The held-out 1.5 mm chest crop's first 61 slices (HU), every third of them as a 4.5 mm scan, and where the
    slices to make lie."""
    from tests.conftest import data_file

    volume = read_ct(data_file("totalsegmentator/chest_crop.nii.gz"))
    real = volume.array[:, :, :61].astype(np.float64)
    affine = volume.affine.copy()
    affine[:3, 2] *= 3
    where = np.zeros(real.shape, bool)
    where[:, :, np.arange(61) % 3 != 0] = True
    return real, CTVolume(real[:, :, ::3].copy(), affine), where


def test_the_bundled_model_beats_the_classical_interpolations_on_a_held_out_chest():
    """The bundled slice model on a scan it did not train on (the TotalSegmentator 1.5 mm chest crop, its first
    61 slices; every third kept): the filled slices are closer to the real ones than linear interpolation's (by
    more than 1.3 dB; measured +1.83) and than the flow alone it starts from (by more than 0.2 dB; measured +0.38
    with the motion refiner, +0.10 without)."""
    from ctgridit.ct.fidelity import psnr

    real, thick, where = _every_third_of_the_chest_crop()
    made = {m: psnr(real, interpolate_volume(thick, 3, method=m, device="cpu").volume.array, mask=where)
            for m in ("gridit", "linear", "flow")}
    assert made["gridit"] > made["linear"] + 1.3 and made["gridit"] > made["flow"] + 0.2, made


def test_bfloat16_runs_only_the_slice_models_calls_and_changes_little(monkeypatch):
    """``precision="bf16"`` (what ``auto`` is on CPUs with AMX or AVX-512 BF16): every call of the slice model, the
    check on the scan's own slices included, runs under autocast, the flow fill outside it; the filled slices' PSNR moves by
    less than 0.05 dB (the chest crop of the test above)."""
    from ctgridit.ct.fidelity import psnr
    from ctgridit.ct.slices import load_slice_model

    real, thick, where = _every_third_of_the_chest_crop()
    pipeline = load_slice_model(None, "cpu")
    seen, forward = [], pipeline.stage1.forward
    monkeypatch.setattr(pipeline.stage1, "forward",
                        lambda *a, **k: (seen.append(torch.is_autocast_enabled("cpu")), forward(*a, **k))[1])
    made = {}
    for p in ("fp32", "bf16"):
        seen.clear()
        result = interpolate_volume(thick, 3, pipeline, precision=p)
        assert len(seen) >= 2 and set(seen) == {p == "bf16"} and result.details["precision"] == p
        made[p] = result.volume.array
    assert not torch.is_autocast_enabled("cpu") and not np.array_equal(made["fp32"], made["bf16"])
    assert abs(psnr(real, made["bf16"], mask=where) - psnr(real, made["fp32"], mask=where)) < 0.05


def test_interpolation_refuses_what_the_model_cannot_do(small_ct):
    volume = slab(small_ct, 5)
    with pytest.raises(CTGridItError, match="factor of 3"):
        interpolate_volume(volume, 2, native_pipeline())
    with pytest.raises(CTGridItError, match="at least 2"):
        interpolate_volume(slab(small_ct, 1), 3, native_pipeline())
    with pytest.raises(CTGridItError, match="own resolution"):
        interpolate_volume(volume, 3, native_pipeline(resolution="fixed"))


@pytest.mark.parametrize("factor", [2, 4, 5])
def test_a_model_of_several_gaps_puts_each_new_slice_at_its_own_position(small_ct, factor):
    """A model trained on gaps 2-5 (``gaps``) fills every factor it lists; a fresh residual model returns its
    condition, so each new slice is the linear mix of its two neighbours at its own position ``j / factor``:
    the linear interpolation along z of the scan in the model's HU window, exactly, where that of the scan in
    HU stays inside the window; beyond it (bone, air) the fill of the scan in HU is added: where both neighbours
    are beyond the window, the new slice is the linear interpolation in HU."""
    volume = slab(small_ct, 5)
    made = interpolate_volume(volume, factor, native_pipeline(gaps=[2, 3, 4, 5], fresh=True)).volume.array
    windowed = CTVolume(np.clip(volume.array, -1000, 1000), volume.affine)      # what the model sees
    linear = interpolate_volume(windowed, factor, method="linear").volume.array
    kept = np.arange(made.shape[2]) % factor == 0
    np.testing.assert_array_equal(made[:, :, kept], volume.array)
    in_hu = interpolate_volume(volume, factor, method="linear").volume.array
    inside = (np.abs(in_hu) < 1000) & ~kept
    np.testing.assert_allclose(made[inside], linear[inside], atol=0.1)
    a, b = volume.array[:, :, :-1], volume.array[:, :, 1:]
    beyond = np.repeat(((a > 1000) & (b > 1000)) | ((a < -1000) & (b < -1000)), factor, axis=2)
    beyond = np.concatenate([beyond, np.zeros_like(beyond[:, :, :1])], axis=2) & ~kept
    assert beyond.sum() > 50 and (np.abs(made[beyond]) > 1000).all()
    np.testing.assert_allclose(made[beyond], in_hu[beyond], atol=0.1)
    with pytest.raises(CTGridItError, match="factor of 2, 3, 4 or 5 only"):
        interpolate_volume(volume, 6, native_pipeline(gaps=[2, 3, 4, 5]))


@pytest.mark.parametrize("factor", [2, 5])
def test_a_fresh_flow_pair_model_gives_the_flow_interpolation(small_ct, factor):
    """A flow_pair model gets the two neighbouring slices each moved along the motion between the whole slices
    (channels after the frames', through the sliding windows); fresh (no displacement, no correction) it mixes
    them as ``--method flow`` does, so its new slices are the flow interpolation; its own are kept exactly."""
    volume = slab(small_ct, 5)
    windowed = CTVolume(np.clip(volume.array, -1000, 1000).astype(np.float32), volume.affine)   # the model's window
    made = interpolate_volume(windowed, factor, native_pipeline(gaps=[2, 3, 4, 5], fresh=True, fill="flow_pair"))
    flow = interpolate_volume(windowed, factor, method="flow").volume.array
    assert made.details["correction_weight"] == 1.0
    np.testing.assert_allclose(made.volume.array, flow, atol=0.5)
    linear = interpolate_volume(windowed, factor, method="linear").volume.array
    assert np.abs(flow - linear).max() > 50                                     # the flow is not the linear mix


def test_a_harmful_correction_is_turned_down_by_the_check_on_the_scans_own_slices(small_ct):
    """An untrained model's correction of its fill is noise: measured on left-out input slices it does not
    help, so ``checked_weight`` keeps almost none of it, and the output is the fill plus that share of the
    correction exactly; it is closer to the real slices than the unchecked output. A fresh model (no
    correction) is kept whole."""
    from ctgridit.ct.fidelity import psnr

    volume = read_ct(small_ct)
    real = volume.array[:, :, :25].astype(np.float64)
    thick = CTVolume(real[:, :, ::2].copy(), volume.affine @ np.diag([1, 1, 2, 1]))
    model = native_pipeline(gaps=[2, 3])
    checked = interpolate_volume(thick, 2, model)
    unchecked = interpolate_volume(thick, 2, model, check=False).volume.array
    windowed = CTVolume(np.clip(thick.array, -1000, 1000), thick.affine)
    fill = interpolate_volume(windowed, 2, method="linear").volume.array
    w = checked.details["correction_weight"]
    assert 0 <= w < 0.2
    new = np.arange(25) % 2 == 1
    inside = (np.abs(interpolate_volume(thick, 2, method="linear").volume.array) < 1000) & new   # nothing added
    np.testing.assert_allclose(checked.volume.array[inside], (fill + w * (unchecked - fill))[inside], atol=0.5)
    assert psnr(real[:, :, new], checked.volume.array[:, :, new]) > psnr(real[:, :, new], unchecked[:, :, new]) + 1
    assert interpolate_volume(thick, 2, native_pipeline(gaps=[2, 3], fresh=True)).details["correction_weight"] == 1.0


@pytest.mark.parametrize("scan,layout", LAYOUTS)
@pytest.mark.parametrize("direction", ["up", "down"])
def test_extension_keeps_the_scan_and_adds_slices_at_the_right_end(scan, layout, direction, request):
    volume = slab(request.getfixturevalue(scan), 6, layout)
    axis = slice_axis(volume)
    result = extend_volume(volume, 5, direction, native_pipeline())
    out = result.volume
    assert out.shape[axis] == 11 and result.details["slices"] == [6, 11]
    assert np.allclose(out.affine[:3, :3], volume.affine[:3, :3])
    superior = float(volume.affine[2, axis]) > 0               # does the array's slice index run towards the head?
    first = 0 if (direction == "up") == superior else 5        # where input slice 0 lies in the output
    assert np.array_equal(take(out.array, axis, range(first, first + 6)), volume.array.astype(np.float32))
    at, zero = [0, 0, 0], [0, 0, 0]
    at[axis] = first
    assert np.allclose(world(out.affine, at), world(volume.affine, zero))
    heights = [world(out.affine, [k if a == axis else 0 for a in range(3)])[2] for k in range(11)]
    original = [world(volume.affine, [k if a == axis else 0 for a in range(3)])[2] for k in range(6)]
    new = sorted(set(np.round(heights, 3)) - set(np.round(original, 3)))
    assert len(new) == 5
    assert (min(new) > max(original)) if direction == "up" else (max(new) < min(original))   # above / below


def shifting_stack(small_ct, slices: int) -> CTVolume:
    """One real slice, each slice above it shifted 2 voxels further along x (a structure running obliquely)."""
    volume = slab(small_ct, 2)
    assert volume.affine[2, 2] > 0                                  # the array's slices run towards the head
    base = volume.array[:, :, 0]
    x = np.arange(base.shape[0], dtype=float)
    moved = [np.stack([np.interp(x - 2.0 * s, x, col) for col in base.T], axis=1) for s in range(slices)]
    return CTVolume(np.stack(moved, axis=2).astype(np.float32), volume.affine)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_extension_moves_the_last_slice_along_the_motion_and_mixes_the_model_as_far_as_it_helps(
        small_ct, monkeypatch, direction):
    """--method flow continues a shift; gridit mixes in the model's extension by the share best on the scan's own
    last 4 slices: none of a model that holds the last slice (a fresh residual model: its fill), all of one that
    knows the answer."""
    from ctgridit.ct import slices
    from ctgridit.ct.transforms import volume_to_frames
    from ctgridit.ct.window import window_hu

    whole = shifting_stack(small_ct, 13)
    up = direction == "up"
    kept, new = (slice(0, 10), slice(10, 13)) if up else (slice(3, 13), slice(0, 3))
    volume = CTVolume(whole.array[:, :, kept].copy(), whole.affine if up else whole.affine @ np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3], [0, 0, 0, 1]]))
    inner = (slice(12, -12), slice(12, -12))

    def error(made: np.ndarray) -> float:
        return float(np.mean((made[:, :, new] - whole.array[:, :, new])[inner] ** 2))

    flowed = extend_volume(volume, 3, direction, method="flow").volume.array
    assert np.array_equal(flowed[:, :, kept], volume.array)
    held = np.repeat(volume.array[:, :, -1:] if up else volume.array[:, :, :1], 3, axis=2)
    assert error(flowed) < 0.2 * float(np.mean((held - whole.array[:, :, new])[inner] ** 2))
    fresh = native_pipeline(fresh=True)
    mixed = extend_volume(volume, 3, direction, model=fresh)
    assert mixed.details["model_weight"] < 0.2
    assert np.array_equal(mixed.volume.array[:, :, kept], volume.array)
    assert error(mixed.volume.array) < 0.3 * error(extend_volume(volume, 3, direction, fresh, check=False).volume.array)
    truth = window_hu(volume_to_frames(slices._lps(whole, 2).as_tensor().float()))          # (Z, 1, Y, X), LPS
    truth = truth if up else truth.flip(0)                                                 # continued upwards
    monkeypatch.setattr(slices, "model_extension", lambda _p, frames, n, *a, **k: truth[len(frames):len(frames) + n])
    knowing = extend_volume(volume, 3, direction, model=fresh)
    assert knowing.details["model_weight"] > 0.99
    assert error(knowing.volume.array) < 0.1 * error(flowed)
    short = CTVolume(volume.array[:, :, :5].copy(), volume.affine)                        # too few to check
    assert extend_volume(short, 2, direction, model=fresh).details["model_weight"] is None


def test_the_commands_write_nifti_and_refuse_bad_input_in_one_line(tmp_path, small_ct, dicom_dir, capsys):
    model = tmp_path / "model"
    native_pipeline().save_pretrained(model)
    thick = tmp_path / "thick.nii.gz"
    write_nifti(slab(small_ct, 4), thick)
    out = tmp_path / "thin.nii.gz"

    def run(*args) -> int:
        with pytest.raises(SystemExit) as info:
            main([*map(str, args)])
        return info.value.code

    assert run("interpolate", thick, "--out", out, "--model", model, "-q") == 0
    thin = read_ct(out)
    assert thin.shape[2] == 10 and np.allclose(thin.spacing[2], read_ct(thick).spacing[2] / 3)
    assert np.array_equal(thin.array[:, :, ::3], read_ct(thick).array)
    assert run("interpolate", thick, "--out", out, "--model", model, "-q") == 2         # exists: no overwrite
    assert "--force" in capsys.readouterr().err
    assert run("interpolate", thick, "--method", "cubic", "--out", tmp_path / "cubic.nii.gz", "-q") == 0
    assert read_ct(tmp_path / "cubic.nii.gz").shape[2] == 10
    assert run("interpolate", thick, "--out", tmp_path / "bundled.nii.gz", "-q") == 0     # the bundled model
    assert np.array_equal(read_ct(tmp_path / "bundled.nii.gz").array[:, :, ::3], read_ct(thick).array)
    assert run("interpolate", thick, "--factor", 2, "--out", tmp_path / "x.nii.gz", "--model", model) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "factor" in err
    assert not (tmp_path / "x.nii.gz").exists()
    plain = tmp_path / "plain"
    native_pipeline(masked=False).save_pretrained(plain)
    assert run("extend", thick, "--slices", 3, "--out", tmp_path / "y.nii.gz", "--model", plain) == 2
    assert "masked-conditional" in capsys.readouterr().err
    assert run("extend", thick, "--slices", 3, "--direction", "sideways", "--model", model) == 2
    assert "direction" in capsys.readouterr().err
    longer = tmp_path / "longer.nii.gz"
    assert run("extend", dicom_dir, "--slices", 3, "--direction", "down", "--out", longer, "--model", model,
               "-q") == 0
    assert read_ct(longer).shape[2] == read_ct(dicom_dir).shape[2] + 3
    flowed = tmp_path / "flowed.nii.gz"
    assert run("extend", thick, "--slices", 2, "--method", "flow", "--out", flowed) == 0
    assert "slices" in capsys.readouterr().out
    assert np.array_equal(read_ct(flowed).array[:, :, :4], read_ct(thick).array)
    assert run("extend", thick, "--slices", 2, "--method", "cubic", "--out", tmp_path / "z.nii.gz") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "gridit, flow" in err
    assert not (tmp_path / "z.nii.gz").exists()


def test_default_output_names_sit_next_to_the_input(tmp_path, small_ct):
    model = tmp_path / "model"
    native_pipeline().save_pretrained(model)
    thick = tmp_path / "scan.nii.gz"
    write_nifti(slab(small_ct, 3), thick)
    with pytest.raises(SystemExit) as info:
        main(["interpolate", str(thick), "--model", str(model), "-q"])
    assert info.value.code == 0 and (tmp_path / "scan_x3.nii.gz").exists()
    with pytest.raises(SystemExit) as info:
        main(["extend", str(thick), "--slices", "2", "--model", str(model), "-q"])
    assert info.value.code == 0 and (tmp_path / "scan_up2.nii.gz").exists()


def flat_slices_and_a_refiner_adding_50_hu(levels: np.ndarray) -> tuple[CTVolume, GriDiTPipeline]:
    """Slices of one HU value each (``levels``; 1 mm pixels, 2 mm apart), and a fresh flow_pair slice model with a
    refiner (2 mm pixels) whose only output is a residual of 0.05 of the window (50 HU)."""
    from ctgridit.core.motion_refiner import MotionRefiner

    volume = CTVolume(np.broadcast_to(levels, (20, 24, len(levels))).copy(), np.diag([1.0, 1.0, 2.0, 1.0]))
    pipeline = native_pipeline(gaps=[2, 3], fresh=True, fill="flow_pair")
    refiner = MotionRefiner(width=8, pixel_size=2.0)
    with torch.no_grad():
        refiner.net.out.bias[5] = 0.05
    pipeline.register_modules(refiner=refiner)
    return volume, pipeline


@pytest.mark.parametrize("factor", [2, 3])
def test_the_refiner_corrects_each_new_slice_of_the_flow_fill_at_its_place(factor):
    """A slice model with a refiner (``refined_fill``): on slices that do not move (each of one HU value, so the
    flow is zero and the moved slices are the known ones), a refiner that adds 0.05 of the window to the flow
    fill puts new slice ``j`` of each gap at the linear mix at ``j / factor`` plus 50 HU, and keeps the scan's
    own slices exactly; a fresh DiT adds nothing, the check keeps its (zero) correction whole. The refiner works
    at its own pixel size: 2 mm pixels here, the scan's 1 mm resized for it."""
    levels = np.array([-600.0, -350.0, 0.0, 120.0, 400.0])
    volume, pipeline = flat_slices_and_a_refiner_adding_50_hu(levels)
    result = interpolate_volume(volume, factor, pipeline, check=False)
    made = result.volume.array
    assert result.details["refiner"]
    np.testing.assert_array_equal(made[:, :, ::factor], volume.array)
    linear = np.interp(np.arange(made.shape[2]) / factor, np.arange(5), levels)
    new = np.arange(made.shape[2]) % factor != 0
    np.testing.assert_allclose(made[:, :, new], np.broadcast_to(linear[new] + 50, made[:, :, new].shape), atol=0.5)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_bone_beyond_the_window_moves_with_the_refiners_moves(monkeypatch, share):
    """The refiner's moves and shares apply to what lies beyond the model's window too. Eleven slices that do not
    move in the window (a bar of bone clipped to 1000 HU), the bar 1500 to 2500 HU in HU, a different level in each
    slice; a refiner that samples both known slices 2 pixels to the side (0.1 of its 10-pixel unit at its 2 mm
    pixels is 2 of the scan's 1 mm ones). Kept whole (``check=False``), each new slice ``w`` of the way across a gap
    is its two slices' mix ``(1 - w, w)`` in HU moved 2 pixels, bar and bone levels included (ten gaps: two
    batches of the refiner; factor 3: the pair's order matters). Kept by half (the check's refiner weight pinned
    at 0.5), the window holds the mean of the plain and the refined fill, and beyond it lies what the mean of the
    two fills in HU has beyond it."""
    from ctgridit.core.motion_refiner import MotionRefiner
    from ctgridit.ct import slices

    levels = 1500.0 + 100.0 * np.arange(11)
    known = np.full((20, 24, 11), 40.0)
    known[8:12] = levels
    volume = CTVolume(known, np.diag([1.0, 1.0, 2.0, 1.0]))
    pipeline = native_pipeline(gaps=[2, 3], fresh=True, fill="flow_pair")
    refiner = MotionRefiner(width=8, pixel_size=2.0)
    with torch.no_grad():
        refiner.net.out.bias[[0, 2]] = 0.1
    pipeline.register_modules(refiner=refiner)
    if share != 1.0:
        monkeypatch.setattr(slices, "checked_weight", lambda *args, **kwargs: (1.0, share))
    made = interpolate_volume(volume, 3, pipeline, check=share != 1.0, precision="fp32").volume.array
    np.testing.assert_array_equal(made[:, :, ::3], known)
    shifted = np.full_like(known, 40.0)
    shifted[10:14] = levels                       # LPS x is RAS x reversed: 2 pixels along x of the frames is +2 here
    for j in (1, 2):
        w = j / 3
        plain = (1 - w) * known[..., :-1] + w * known[..., 1:]
        moved = (1 - w) * shifted[..., :-1] + w * shifted[..., 1:]
        window = (1 - share) * np.clip(plain, -1000, 1000) + share * np.clip(moved, -1000, 1000)
        in_hu = (1 - share) * plain + share * moved
        np.testing.assert_allclose(made[:, :, j::3], window + in_hu - np.clip(in_hu, -1000, 1000), atol=0.5)


def test_a_refiner_trained_in_another_window_is_refused():
    """A refiner records the HU window it was trained in; one that differs from the slice model's is refused in one
    line, one that agrees (or records none, as older ones) is used."""
    from ctgridit.core.motion_refiner import MotionRefiner

    volume, pipeline = flat_slices_and_a_refiner_adding_50_hu(np.array([-600.0, -350.0, 0.0]))
    pipeline.register_modules(refiner=MotionRefiner(width=8, pixel_size=2.0, window=[-1000, 2000]))
    with pytest.raises(CTGridItError, match=r"refiner trained on the HU window \[-1000, 2000\]"):
        interpolate_volume(volume, 2, pipeline)
    pipeline.register_modules(refiner=MotionRefiner(width=8, pixel_size=2.0, window=[-1000.0, 1000.0]))
    assert interpolate_volume(volume, 2, pipeline).details["refiner"]


@pytest.mark.parametrize("above", [True, False])
def test_the_refinement_is_kept_as_far_as_it_helps_on_the_scans_own_slices(above):
    """The check on the scan's own slices (every second one left out and made again) weighs the refiner's change
    of the fill as it weighs the model's correction: a refiner that adds 50 HU is kept whole where the left-out
    slices lie 50 HU above the mix of their neighbours, and dropped where they lie 50 HU below (least squares
    within [0, 1]); a fresh DiT's (zero) correction is kept whole either way."""
    offset = 50.0 if above else -50.0
    levels = np.array([-600.0, -450.0 + offset, -300.0, -100.0 + offset, 100.0])
    volume, pipeline = flat_slices_and_a_refiner_adding_50_hu(levels)
    result = interpolate_volume(volume, 2, pipeline)
    assert result.details["correction_weight"] == 1.0
    assert result.details["refiner_weight"] == pytest.approx(1.0 if above else 0.0, abs=2e-3)    # bfloat16
    linear = np.interp(np.arange(9) / 2, np.arange(5), levels)
    np.testing.assert_allclose(result.volume.array[:, :, 1::2],
                               np.broadcast_to(linear[1::2] + (50 if above else 0), (20, 24, 4)), atol=0.5)
