"""Ways to break interpolate, extend, denoise, evaluate, prepare and train found by trying them as a hostile user
would, each reproduced here: one line ``error: ...`` and exit 2 (128 + signal when stopped), no traceback, nothing
half-written, all outputs of a command together or none."""

from __future__ import annotations

import json
import os
import signal
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from ctgridit.ct.io import write_nifti
from ctgridit.ct.volume import CTVolume
from ctgridit.errors import CTGridItWarning
from tests.conftest import (assert_refused, data_file, handles_sigterm, raw_nifti, run_cli, start_cli, wait_for,
                            write_config)


def _volume(path, hu: np.ndarray, affine: np.ndarray) -> str:
    write_nifti(CTVolume(hu.astype(np.float32), affine), path)
    return str(path)


def _smooth(shape, seed: int = 0) -> np.ndarray:
    """A smooth random HU volume with air around a body: what a real scan looks like to the checks."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    hu = gaussian_filter(rng.normal(0, 300, shape), 2) - 200
    hu[:2], hu[-2:] = -1000, -1000
    return hu


# ------------------------------------------------------- memory for the output
def _sparse_nifti(path, shape) -> str:
    """A valid int16 NIfTI header over a sparse data part: the file promises its voxels without holding them."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    header["qform_code"] = header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]
    with open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
        f.truncate(352 + 2 * int(np.prod(shape)))
    return str(path)


@pytest.mark.parametrize("args", [["interpolate", "--method", "linear", "--factor", "16"], ["extend", "--slices", "2000"]])
def test_a_result_that_cannot_fit_in_memory_is_refused_from_the_header(capsys, tmp_path, monkeypatch, args):
    """2048 x 2048 x 128 int16 (1 GB, sparse here) fits in 16 GB, its 16-times-thinner or 2,000-slice result does
    not: refused before a voxel is read (the read would take seconds and the output all memory)."""
    monkeypatch.setattr("ctgridit.limits.available_memory", lambda: 16 * 2**30)
    big = _sparse_nifti(tmp_path / "big.nii", (2048, 2048, 128))
    read = []
    monkeypatch.setattr("ctgridit.ct.io.nib.load", lambda *a, **k: (read.append(a), nib.loadsave.load(*a, **k))[1])
    code, _, err = run_cli(capsys, args[0], big, *args[1:], "--out", tmp_path / "out.nii.gz")
    assert_refused(code, err, "too large for this", "slices out", "big.nii")
    assert not (tmp_path / "out.nii.gz").exists()


def test_memory_that_runs_out_anyway_is_one_line(capsys, tmp_path, monkeypatch):
    """What an estimate misses (numpy's MemoryError, torch's allocator error) still ends in one line, exit 2."""
    scan = _volume(tmp_path / "s.nii.gz", _smooth((20, 20, 6)), np.eye(4))

    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:116] . DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("ctgridit.ct.slices.interpolate_volume", fail)
    code, _, err = run_cli(capsys, "interpolate", scan, "--method", "linear", "--out", tmp_path / "o.nii.gz")
    assert_refused(code, err, "ran out of memory")


# ------------------------------------------------------------------ slice axis
def _stack(path, spacing, axes) -> str:
    """A volume whose voxel axes run along the world axes ``axes`` (0 R-L, 1 A-P, 2 S-I) with ``spacing`` mm."""
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for column, (axis, size) in enumerate(zip(axes, spacing)):
        affine[axis, column] = size
    return _volume(path, _smooth((24, 20, 8)), affine)


def test_interpolate_thins_the_thick_axis_of_a_sagittal_stack(capsys, tmp_path):
    """Voxel axes A (1 mm), S (1 mm), R (5 mm): the 5 mm axis becomes 5/3 mm, the others are untouched."""
    scan = _stack(tmp_path / "sag.nii.gz", (1.0, 1.0, 5.0), (1, 2, 0))
    out = tmp_path / "thin.nii.gz"
    code, _, err = run_cli(capsys, "interpolate", scan, "--method", "linear", "--factor", "3", "--out", out, "--quiet")
    assert code == 0, err
    img = nib.load(out)
    assert img.shape == (24, 20, 22)
    np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 5 / 3), rtol=1e-5)
    original = np.asarray(nib.load(scan).dataobj)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, ::3], original)      # its own slices kept


def test_extend_continues_the_slice_axis_of_a_coronal_stack(capsys, tmp_path):
    """A coronal stack (5 mm along A-P) grows along A-P, towards the back for 'up'; the others keep their size."""
    from ctgridit.ct.slices import slice_axis
    from ctgridit.ct.io import read_ct

    scan = _stack(tmp_path / "cor.nii.gz", (1.0, 1.0, 5.0), (0, 2, 1))
    assert slice_axis(read_ct(scan)) == 1
    tiny = _tiny_slice_model(tmp_path)
    out = tmp_path / "longer.nii.gz"
    code, _, err = run_cli(capsys, "extend", scan, "--slices", "2", "--model", tiny, "--out", out, "--quiet",
                           "--device", "cpu")
    assert code == 0, err
    assert nib.load(out).shape == (24, 20, 10)


def test_two_equally_thick_axes_besides_the_stored_slices_are_refused(capsys, tmp_path):
    """Voxels of 5 x 5 x 1 mm along R-L, A-P and S-I: neither the head-feet axis nor the stored slice axis is
    among the thickest."""
    scan = _stack(tmp_path / "odd.nii.gz", (5.0, 5.0, 1.0), (0, 1, 2))
    code, _, err = run_cli(capsys, "interpolate", scan, "--method", "linear", "--out", tmp_path / "o.nii.gz")
    assert_refused(code, err, "two axes are the thickest and neither", "odd.nii.gz")


def _tiny_slice_model(tmp_path):
    """A random native-resolution masked-conditional model folder (2 x 2 grids of 8 x 8 tiles)."""
    from ctgridit.core.codecs import PixelCodec
    from ctgridit.core.diffusion import make_train_scheduler, sampling_scheduler
    from ctgridit.core.dit import create_dit
    from ctgridit.core.grid import GridSpec
    from ctgridit.core.pipeline import GriDiTPipeline
    from ctgridit.core.settings import PipelineSettings, SamplingConfig, Stage1Sampling

    torch.manual_seed(0)
    stage1 = create_dit("DiT-tiny/2", sample_height=16, sample_width=16, in_channels=1, cond_channels=2)
    settings = PipelineSettings(GridSpec(2, 2, 1, 1), (8, 8), 1, SamplingConfig(Stage1Sampling(num_steps=1)),
                                {"kind": "ct", "resolution": "native", "window": [-1000, 1000]})
    pipe = GriDiTPipeline(stage1, PixelCodec(1), sampling_scheduler(make_train_scheduler(clip_sample=True), "ddim"),
                          settings=settings)
    return pipe.save_pretrained(tmp_path / "tiny_slices")


# ------------------------------------------------ denoising within its training
def test_a_strength_beyond_the_denoiser_s_training_is_refused(capsys, tmp_path):
    """The bundled denoiser learnt diffusion steps 0 to 60: --strength 1 (step 999) would destroy the scan."""
    scan = _volume(tmp_path / "n.nii.gz", _smooth((40, 40, 6)), np.eye(4))
    for strength in ("1", "0.5"):
        code, _, err = run_cli(capsys, "denoise", scan, "--strength", strength, "--out", tmp_path / "d.nii.gz")
        assert_refused(code, err, "beyond step 60", "--strength 0.060")
    assert not (tmp_path / "d.nii.gz").exists()


def test_noise_beyond_the_denoiser_s_training_is_lowered_with_a_warning(capsys, tmp_path):
    rng = np.random.default_rng(0)
    hu = _smooth((64, 64, 6)) + rng.normal(0, 400, (64, 64, 6))
    scan = _volume(tmp_path / "n.nii.gz", hu, np.eye(4))
    report = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "denoise", scan, "--out", tmp_path / "d.nii.gz", "--report", report, "--quiet")
    assert code == 0, err
    assert "warning: the noise is more than this model was trained to remove" in err
    assert json.loads(report.read_text())["t"] == 60


# ---------------------------------------------------------- outputs together
def test_a_stop_before_the_last_output_leaves_none(capsys, tmp_path, monkeypatch):
    """A signal while the preview is written: the volume (already complete) and the report do not appear."""
    scan = _volume(tmp_path / "n.nii.gz", _smooth((20, 20, 6)), np.eye(4))

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)                       # ctgridit's handler raises here

    monkeypatch.setattr("ctgridit.ct.preview.save_preview", stopped)
    code, _, err = run_cli(capsys, "denoise", scan, "--method", "bilateral", "--out", tmp_path / "d.nii.gz",
                           "--preview", tmp_path / "d.png", "--report", tmp_path / "r.json", "--quiet")
    assert code == 143 and err.strip() == "error: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.nii.gz"]


def test_a_signal_while_outputs_appear_waits_until_all_are_there(capsys, tmp_path, monkeypatch):
    """The renames run with the signals held: a SIGTERM that arrives during them ends the run after them, with its
    line and code, and every output is there."""
    scan = _volume(tmp_path / "n.nii.gz", _smooth((20, 20, 6)), np.eye(4))
    real, sent = os.replace, []

    def replace(src, dst):
        if not sent and os.path.dirname(dst) == str(tmp_path):        # the first output (not a library's cache)
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)                       # held: not delivered inside the commit
        real(src, dst)

    monkeypatch.setattr("ctgridit.files.os.replace", replace)
    code, _, err = run_cli(capsys, "denoise", scan, "--method", "bilateral", "--out", tmp_path / "d.nii.gz",
                           "--preview", tmp_path / "d.png", "--report", tmp_path / "r.json", "--quiet")
    assert sent, (code, err)
    assert code == 143 and err.strip() == "error: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.nii.gz", "d.png", "n.nii.gz", "r.json"]


# --------------------------------------------------------------- evaluate
@pytest.mark.parametrize("output,words", [("torch.zeros(())", "not one feature vector per slice"),
                                          ("torch.full((x.shape[0], 4), float('nan'))", "NaN")])
def test_a_feature_network_that_returns_nonsense_is_one_line(capsys, tmp_path, output, words):
    real, generated = tmp_path / "real", tmp_path / "gen"
    for folder, seed in ((real, 0), (generated, 1)):
        folder.mkdir()
        for i in range(2):
            _volume(folder / f"v{i}.nii.gz", _smooth((24, 24, 12), seed * 10 + i), np.diag([2.0, 2.0, 5.0, 1.0]))
    import importlib.util

    source = f"import torch\n\n\nclass N(torch.nn.Module):\n    def forward(self, x):\n        return {output}\n"
    (tmp_path / "bad_net.py").write_text(source)
    spec = importlib.util.spec_from_file_location("bad_net", tmp_path / "bad_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)                                  # TorchScript reads the source from the file
    torch.jit.save(torch.jit.script(module.N()), tmp_path / "net.pt")
    code, _, err = run_cli(capsys, "evaluate", "--real", real, "--generated", generated, "--features",
                           tmp_path / "net.pt")
    assert_refused(code, err, words, "net.pt")


def test_reports_are_strict_json_with_the_reason_for_what_is_not_a_number(capsys, tmp_path):
    """An output equal to its reference has an infinite PSNR and no body; volumes shorter than 45 mm have no far
    SSIM: strict JSON has null there, and the notes say why."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a report"))

    air = _volume(tmp_path / "air.nii.gz", np.full((16, 16, 4), -1000.0), np.eye(4))
    code, _, err = run_cli(capsys, "denoise", air, "--reference", air, "--report", tmp_path / "d.json",
                           "--out", tmp_path / "d.nii.gz", "--quiet")
    assert code == 0, err
    report = strict((tmp_path / "d.json").read_text())
    assert report["input_quality"]["psnr"] is None and report["input_quality"]["psnr_body"] is None
    assert "equals the reference" in report["notes"]["input_quality.psnr"]
    assert "no body" in report["notes"]["input_quality.psnr_body"]
    assert "does not look like" not in err                             # all air is HU: no false alarm
    folder = tmp_path / "short"
    folder.mkdir()
    _volume(folder / "a.nii.gz", _smooth((24, 24, 6)), np.eye(4))
    code, _, err = run_cli(capsys, "evaluate", "--real", folder, "--generated", folder, "--report",
                           tmp_path / "e.json")
    assert code == 0, err
    figures = strict((tmp_path / "e.json").read_text())
    assert figures["far_ssim_real"] is None and "shorter than the far distance" in figures["notes"]["far_ssim_real"]
    assert "RuntimeWarning" not in err and "Mean of empty slice" not in err


def test_library_warnings_are_warning_lines(capsys, tmp_path, monkeypatch):
    from ctgridit.ct import summary

    real = summary.describe

    def noisy(volume):
        warnings.warn("Mean of empty slice", RuntimeWarning)
        return real(volume)

    monkeypatch.setattr(summary, "describe", noisy)
    scan = _volume(tmp_path / "s.nii.gz", _smooth((8, 8, 4)), np.eye(4))
    code, _, err = run_cli(capsys, "info", scan)
    assert code == 0 and err.strip() == "warning: RuntimeWarning: Mean of empty slice"


def test_values_that_are_not_hu_are_named(capsys, tmp_path):
    """A uint8 picture (0 to 255) read as CT: every command that reads it says so once."""
    data = (np.random.default_rng(0).random((16, 16, 6)) * 255).astype(np.uint8)
    path = raw_nifti(tmp_path / "grey.nii", data)
    code, _, err = run_cli(capsys, "info", path)
    assert code == 0 and err.count("does not look like CT in HU") == 1
    code, _, err = run_cli(capsys, "interpolate", path, "--method", "linear", "--out", tmp_path / "o.nii.gz",
                           "--quiet")
    assert code == 0 and "does not look like CT in HU" in err


# ------------------------------------------------------------ prepare, train
def _cached_config(tmp_path):
    return write_config(tmp_path, data_file("totalsegmentator/example_ct_sm.nii.gz"),
                        data={"cache": "cache", "stride_range": [1, 1]}, sampling={"stage1": {"levels": 0}})


def test_prepare_redoes_a_truncated_cache_entry_and_train_refuses_one(capsys, tmp_path):
    config = _cached_config(tmp_path)
    assert run_cli(capsys, "prepare", config, "--quiet")[0] == 0
    entry = tmp_path / "cache" / "seq_000000.npy"
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])
    code, _, err = run_cli(capsys, "train", "stage1", "--config", config, "--steps", "1", "--quiet")
    assert_refused(code, err, "damaged", "seq_000000.npy", "prepare")
    code, out, err = run_cli(capsys, "prepare", config, "--quiet")
    assert code == 0 and "(1 prepared now)" in out, err
    assert entry.read_bytes() == whole


def test_resume_skips_a_checkpoint_whose_config_is_damaged(capsys, tmp_path):
    config = _cached_config(tmp_path)
    assert run_cli(capsys, "prepare", config, "--quiet")[0] == 0
    assert run_cli(capsys, "train", "stage1", "--config", config, "--steps", "6", "--quiet")[0] == 0
    (tmp_path / "ckpt" / "stage1" / "step_00000006" / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "train", "stage1", "--config", config, "--steps", "6", "--resume", "--quiet")
    assert code == 0, err
    assert "warning: skipped a damaged checkpoint" in err and "Traceback" not in err


def test_prepare_with_two_workers_gives_the_same_cache(capsys, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, workers in ((one, "1"), (two, "2")):
        folder.mkdir()
        config = write_config(folder, data_file("totalsegmentator/example_ct_sm.nii.gz"),
                              data={"cache": "cache", "paths": [str(data_file("totalsegmentator/example_ct_sm.nii.gz")),
                                                                str(data_file("totalsegmentator/chest_crop.nii.gz"))]})
        code, out, err = run_cli(capsys, "prepare", config, "--quiet", "--workers", workers)
        assert code == 0 and "2 sequences" in out, err
    for name in ("seq_000000.npy", "seq_000001.npy"):
        assert (one / "cache" / name).read_bytes() == (two / "cache" / name).read_bytes()


# ------------------------------------------------------------- model folders
@pytest.mark.parametrize("where,words", [("component", "unknown part(s) ['evil']"),
                                         ("settings", "unknown settings key(s) ['colour']"),
                                         ("stage", "unknown setting(s) ['dropout']"),
                                         ("type", "settings.frame_size must be [height, width]")])
def test_a_model_folder_with_unknown_or_odd_entries_is_refused(capsys, tmp_path, where, words):
    folder = _tiny_slice_model(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    if where == "component":
        index["evil"] = ["subprocess", "Popen"]
    elif where == "settings":
        index["settings"]["colour"] = "blue"
    elif where == "type":
        index["settings"]["frame_size"] = [8, 8, 3]
    else:
        config = json.loads((folder / "stage1" / "config.json").read_text())
        (folder / "stage1" / "config.json").write_text(json.dumps({**config, "dropout": 0.1}))
    (folder / "model_index.json").write_text(json.dumps(index))
    scan = _volume(tmp_path / "s.nii.gz", _smooth((20, 20, 6)), np.eye(4))
    code, _, err = run_cli(capsys, "interpolate", scan, "--model", folder, "--out", tmp_path / "o.nii.gz")
    assert_refused(code, err, words)


# --------------------------------------------------------------- smaller
@pytest.mark.parametrize("args,subject", [
    (["interpolate", "IN", "--factor", "6"], "the slice model"), (["interpolate", "IN", "--method", "bogus"], "--method"),
    (["extend", "IN", "--slices", "2", "--direction", "sideways"], "--direction"),
    (["denoise", "IN", "--strength", "0"], "--strength"),
])
def test_option_errors_name_their_subject(capsys, tmp_path, args, subject):
    scan = _volume(tmp_path / "s.nii.gz", _smooth((20, 20, 6)), np.eye(4))
    args = [scan if a == "IN" else a for a in args]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "o.nii.gz")
    assert_refused(code, err)
    assert err.startswith(f"error: {subject}: "), err


def test_resume_with_force_names_the_config(capsys, tmp_path):
    config = _cached_config(tmp_path)
    code, _, err = run_cli(capsys, "train", "stage1", "--config", config, "--resume", "--force")
    assert_refused(code, err, str(config), "give one of them")


def test_a_strength_for_a_classical_filter_is_said_to_be_unused(capsys, tmp_path):
    scan = _volume(tmp_path / "s.nii.gz", _smooth((20, 20, 6)), np.eye(4))
    code, _, err = run_cli(capsys, "denoise", scan, "--method", "bilateral", "--strength", "0.05", "--out",
                           tmp_path / "o.nii.gz", "--quiet")
    assert code == 0 and "warning: --strength 0.05 applies to --method gridit" in err


def test_a_truncated_nifti_says_how_much_voxel_data_it_holds(capsys, tmp_path):
    path = raw_nifti(tmp_path / "cut.nii", np.zeros((8, 8, 8), np.int16))
    path.write_bytes(path.read_bytes()[:352])
    code, _, err = run_cli(capsys, "info", path)
    assert_refused(code, err, "holds only 0 bytes of voxel data after its 352-byte header")


# -------------------------------------------------------- signals in the tasks
def _stop_when_busy(args, busy, tmp_path):
    """Start ``ctgridit ARGS``, send SIGTERM once ``busy()`` is true; the exit code and stderr."""
    proc = start_cli(args, cwd=tmp_path)
    wait_for(lambda: handles_sigterm(proc.pid) and busy() or proc.poll() is not None, timeout=180)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


def _hidden(folder):
    return [p.name for p in folder.rglob(".*")]


@pytest.mark.parametrize("command", ["extend", "denoise", "synth", "train"])
def test_sigterm_during_the_newer_commands_stops_cleanly(capsys, tmp_path, command):
    """SIGTERM while each works: exit 143 with one line, no temporary file; synth keeps the volumes it finished."""
    out = tmp_path / "out"
    out.mkdir()
    scan = data_file("totalsegmentator/example_ct_sm.nii.gz")
    if command == "train":
        config = _cached_config(tmp_path)
        assert run_cli(capsys, "prepare", config, "--quiet")[0] == 0
        args = ["train", "stage1", "--config", config, "--steps", "100000"]
        busy = lambda: (tmp_path / "ckpt" / "stage1" / "train_log.csv").exists()  # noqa: E731
    elif command == "synth":
        args = ["synth", "--slices", "8", "-n", "50", "--out", f"{out}/"]
        busy = lambda: any(out.glob("vol_*.nii.gz"))  # noqa: E731
    elif command == "extend":
        args = ["extend", scan, "--slices", "40", "--out", out / "e.nii.gz"]
        busy = lambda: True  # noqa: E731
    else:
        args = ["denoise", scan, "--out", out / "d.nii.gz"]
        busy = lambda: True  # noqa: E731
    code, err = _stop_when_busy(args, busy, tmp_path)
    if code == 0:
        pytest.skip("the command finished before the signal arrived")
    assert code == 143 and err.strip().splitlines()[-1] == "error: terminated", err
    assert "Traceback" not in err and _hidden(out) == [] and _hidden(tmp_path / "ckpt" if command == "train" else out) == []
    if command == "synth":
        done = sorted(out.glob("vol_*.nii.gz"))
        assert done and all(nib.load(p).shape[2] == 8 for p in done)          # whole volumes only


# ------------------------------------------------------ DICOM and zip inputs
@pytest.mark.parametrize("packed", [False, True])
def test_interpolate_and_extend_read_dicom_folders_and_zips(capsys, tmp_path, packed):
    import zipfile

    source = data_file("totalsegmentator/example_ct_dicom")
    if packed:
        archive = tmp_path / "series.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for f in sorted(source.iterdir()):
                z.write(f, f.name)
        source = archive
    code, _, err = run_cli(capsys, "interpolate", source, "--method", "linear", "--factor", "2", "--out",
                           tmp_path / "thin.nii.gz", "--quiet")
    assert code == 0, err
    assert nib.load(tmp_path / "thin.nii.gz").shape == (512, 512, 39)
    code, _, err = run_cli(capsys, "extend", source, "--slices", "2", "--out", tmp_path / "long.nii.gz", "--quiet",
                           "--model", _tiny_slice_model(tmp_path), "--device", "cpu")
    assert code == 0, err
    assert nib.load(tmp_path / "long.nii.gz").shape == (512, 512, 22)


def test_no_warning_leaks_from_reading(tmp_path):
    """The helper volumes of these tests are HU (air below 0): reading them says nothing."""
    from ctgridit.ct.io import read_ct

    with warnings.catch_warnings():
        warnings.simplefilter("error", CTGridItWarning)
        read_ct(_volume(tmp_path / "v.nii.gz", _smooth((8, 8, 4)), np.eye(4)))


def test_a_progress_bar_left_open_never_draws_below_the_error_line(capsys):
    """A stop that lands before the code owning a bar can close it (CI saw one): the error line still comes last."""
    from tqdm.auto import tqdm

    from ctgridit.cli import _error_line

    bar = tqdm(total=10, desc="train stage 1")
    bar.update(1)
    _error_line("terminated")
    del bar                                                   # what the garbage collector would do at exit
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: terminated", err
