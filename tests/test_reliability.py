"""Ways to break ctgridit found by trying it as a hostile user would, each reproduced here.

Every case must end in one line ``error: ...``, exit code 2 (130/143/129 for
signals), no traceback, no output or temporary file left, nothing of the
user's lost. Test names say what each case checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (assert_refused, data_file, handles_sigterm, raw_nifti, run_cli, start_cli,
                            wait_for)

from tests.conftest import CLI_ENV as ENV


# ------------------------------------------------------------ option errors
@pytest.mark.parametrize("args,words", [
    (["synth", "--slices", "0"], "--slices"),
    (["synth", "--num", "0"], "--num"),
    (["grid", "IN", "--out", "g", "--rows", "0"], "--rows"),
    (["denoise", "IN", "--steps", "0"], "--steps"),
    (["add-noise", "IN", "--sigma", "abc", "--out", "n.nii.gz"], "--sigma"),
    (["add-noise", "IN", "--out", "n.nii.gz"], "--sigma"),
    (["train", "stage1"], "--config"),
    (["train", "stage2", "--config", "c.yaml", "--steps", "-1"], "--steps"),
    (["info"], "path"),
    (["convert", "IN"], "OUT"),
    (["preview", "IN"], "--out"),
    (["synth", "--bogus"], "--bogus"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_option_errors_are_one_line(capsys, args, words):
    code, out, err = run_cli(capsys, *args)
    assert_refused(code, err, words, "--help")


# -------------------------------------------------------------- one seed rule
@pytest.mark.parametrize("command", [["synth", "--out", "v.nii.gz"], ["denoise", "IN"],
                                     ["add-noise", "IN", "--sigma", "5", "--out", "n.nii.gz"]])
@pytest.mark.parametrize("seed", ["18446744073709551616", "1e30", "-1", "4294967296"])
def test_seeds_are_checked_alike_everywhere(capsys, command, seed):
    code, _, err = run_cli(capsys, *command, "--seed", seed)
    assert_refused(code, err, "--seed")


def test_the_largest_seed_is_accepted_and_the_api_checks_too():
    from ctgridit.errors import CTGridItError
    from ctgridit.seeds import SEED_MAX, check_seed

    assert check_seed(SEED_MAX) == SEED_MAX and check_seed(np.int64(7)) == 7
    for bad in (-1, SEED_MAX + 1, 1.5, "3"):
        with pytest.raises(CTGridItError, match="seed"):
            check_seed(bad)


# --------------------------------------------------------- noise settings
@pytest.mark.parametrize("args,words", [
    (["--sigma", "1e300"], "--sigma"), (["--sigma", "inf"], "--sigma"), (["--sigma", "nan"], "--sigma"),
    (["--sigma", "0"], "--sigma"), (["--model", "lowdose", "--sigma", "1e-6"], "gaussian"),
    (["--model", "pink", "--sigma", "5"], "noise model"),
])
def test_bad_noise_is_refused_up_front(capsys, small_ct, tmp_path, args, words):
    code, _, err = run_cli(capsys, "add-noise", small_ct, "--out", tmp_path / "n.nii.gz", *args)
    assert_refused(code, err, words)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------- synth lengths
@pytest.mark.parametrize("slices", ["1", "100000"])
def test_synth_refuses_volumes_readers_reject_or_that_never_end(capsys, tmp_path, slices):
    code, _, err = run_cli(capsys, "synth", "--slices", slices, "--out", tmp_path / "v.nii.gz")
    assert_refused(code, err, "--slices")


def test_readers_take_what_synth_may_write(tmp_path):
    """The smallest volume synth writes (MIN_SLICES slices) is one every reader takes; one slice fewer is not."""
    import nibabel as nib

    from ctgridit.ct.io import read_ct
    from ctgridit.errors import CTGridItError
    from ctgridit.limits import MIN_SLICES

    for depth, ok in ((MIN_SLICES, True), (MIN_SLICES - 1, False)):
        path = tmp_path / f"v{depth}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, depth), np.int16), np.eye(4)), path)
        if ok:
            assert read_ct(path).shape == (8, 8, depth)
        else:
            with pytest.raises(CTGridItError, match="2D"):
                read_ct(path)


# ---------------------------------------------------------- one device rule
def test_an_explicit_gpu_that_is_missing_is_refused_by_every_command(capsys, monkeypatch, tmp_path, small_ct):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["synth", "--slices", "4", "--out", tmp_path / "v.nii.gz", "--device", "cuda"],
                 ["denoise", small_ct, "--out", tmp_path / "d.nii.gz", "--device", "cuda"]):
        code, _, err = run_cli(capsys, *args)
        assert_refused(code, err, "no CUDA GPU")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------- never over an input
def test_denoise_and_convert_never_write_over_their_input(capsys, small_ct, tmp_path):
    scan, reference = tmp_path / "scan.nii.gz", tmp_path / "ref.nii.gz"
    scan.write_bytes(small_ct.read_bytes())
    reference.write_bytes(small_ct.read_bytes())
    before = scan.read_bytes()
    for args in (["denoise", scan, "--out", scan, "--force"],
                 ["denoise", scan, "--out", reference, "--reference", reference, "--force"],
                 ["convert", scan, scan, "--force"],
                 ["add-noise", scan, "--sigma", "5", "--out", scan, "--force"]):
        code, _, err = run_cli(capsys, *args)
        assert_refused(code, err, "is an input")
    assert scan.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ref.nii.gz", "scan.nii.gz"]


# ------------------------------------------------------ output names
def test_upper_case_nifti_names_are_written(capsys, small_ct, tmp_path):
    out = tmp_path / "C_UP.NII.GZ"
    code, _, err = run_cli(capsys, "convert", small_ct, out)
    assert code == 0, err
    from ctgridit.ct.io import read_ct

    assert read_ct(out).shape == read_ct(small_ct).shape


def test_an_output_under_a_file_names_the_file(capsys, small_ct, tmp_path):
    blocker = tmp_path / "c1.nii.gz"
    blocker.write_bytes(b"x")
    code, _, err = run_cli(capsys, "convert", small_ct, blocker / "sub.nii.gz")
    assert_refused(code, err, "c1.nii.gz", "is a file, not a folder")


# ------------------------------------------------------------- grid
@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_grid_into_an_impossible_folder_is_one_line(capsys, small_ct, tmp_path, where):
    out = (small_ct / "sub") if where == "under_file" else Path("/proc/ctgridit-test")
    code, _, err = run_cli(capsys, "grid", small_ct, "--out", out)
    assert_refused(code, err)


def test_grid_force_replaces_the_whole_folder(capsys, small_ct, tmp_path):
    out = tmp_path / "g1"
    assert run_cli(capsys, "grid", small_ct, "--out", out)[0] == 0
    first = sorted(os.listdir(out))
    code, _, err = run_cli(capsys, "grid", small_ct, "--out", out)
    assert_refused(code, err, "--force")
    assert run_cli(capsys, "grid", small_ct, "--out", out, "--stride", "3", "--rows", "3", "--force")[0] == 0
    second = sorted(os.listdir(out))
    import json

    index = json.loads((out / "grids.json").read_text())
    assert len(second) < len(first) and second == sorted([g["file"] for g in index["grids"]] + ["grids.json"])
    assert sorted(os.listdir(tmp_path)) == ["g1"]                       # nothing left beside it


@pytest.mark.parametrize("args,words", [(["--stride", "1000"], "3001 slices"), (["--rows", "100", "--cols", "100"], "slices"),
                                        (["--factor", "1000"], "--factor")])
def test_grid_settings_that_show_nothing_are_refused(capsys, small_ct, tmp_path, args, words):
    code, _, err = run_cli(capsys, "grid", small_ct, "--out", tmp_path / "g", *args)
    assert_refused(code, err, words)
    assert not (tmp_path / "g").exists()


# ------------------------------------------------- signals and Ctrl-C
def test_ctrl_c_during_startup_is_one_line_and_130(tmp_path):
    proc = start_cli(["info", tmp_path / "missing.nii.gz"])
    wait_for(lambda: handles_sigterm(proc.pid) or proc.poll() is not None)   # the first thing ctgridit does
    proc.send_signal(signal.SIGINT)                                      # ... then the heavy imports run
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "error: interrupted"


@pytest.mark.parametrize("signum,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_signal_while_writing_leaves_no_temporary_file(tmp_path, signum, code, word):
    """The signal arrives while the hidden temporary NIfTI exists; it must be gone after."""
    scan = data_file("lidc_idri/LIDC-IDRI-0314.nii.gz")                 # large enough to write for a while
    out = tmp_path / "out"
    out.mkdir()
    proc = start_cli(["convert", scan, out / "c.nii.gz"])
    wait_for(lambda: any(p.name.startswith(".c.nii.gz.") for p in out.iterdir()) or proc.poll() is not None)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the write finished before the signal arrived")
    assert proc.returncode == code and err.strip() == f"error: {word}", (proc.returncode, err)
    assert list(out.iterdir()) == []


def test_a_signal_while_a_zip_is_extracted_leaves_no_folder(tmp_path):
    import zipfile

    source = data_file("totalsegmentator/example_ct_dicom")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(source.iterdir()):
            z.write(f, f.name)
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "ctgridit", "info", str(archive)], env={**ENV, "TMPDIR": str(temp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(temp.iterdir()) or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the read finished before the signal arrived")
    assert proc.returncode == 143, err
    assert list(temp.iterdir()) == []


# ------------------------------------------------------------ DICOM headers
def test_two_series_of_equal_length_are_not_chosen_by_uid_order(capsys, tmp_path):
    from tests.conftest import copy_slices

    files = sorted(data_file("totalsegmentator/example_ct_dicom").iterdir())
    root = tmp_path / "philips"
    copy_slices(files[:5], root / "soft", lambda ds, i: (setattr(ds, "SeriesInstanceUID", "1.2.3.2"),
                                                        setattr(ds, "SeriesDescription", "Chest soft"),
                                                        setattr(ds, "ConvolutionKernel", "B")))
    copy_slices(files[:5], root / "bone", lambda ds, i: (setattr(ds, "SeriesInstanceUID", "1.2.3.1"),
                                                        setattr(ds, "SeriesDescription", "Chest bone"),
                                                        setattr(ds, "ConvolutionKernel", "YC")))
    code, _, err = run_cli(capsys, "info", root)
    assert_refused(code, err, "2 series with 5 slices", '"Chest soft"', "kernel YC", "--series")
    code, out, err = run_cli(capsys, "info", root, "--series", "1.2.3.2")
    assert code == 0, err


def test_a_dicom_header_claiming_huge_slices_is_refused_without_allocating(capsys, tmp_path):
    from tests.conftest import copy_slices

    files = sorted(data_file("totalsegmentator/example_ct_dicom").iterdir())
    root = tmp_path / "huge"
    copy_slices(files[:5], root, lambda ds, i: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535)))
    for command in (["info", root], ["convert", root, tmp_path / "c.nii.gz"], ["preview", root, "--out", tmp_path / "p.png"]):
        code, _, err = run_cli(capsys, *command)
        assert_refused(code, err)                            # compressed slices: the memory check; raw: the file size
        assert "too large" in err or "more than its file holds" in err, err
    assert sorted(os.listdir(tmp_path)) == ["huge"]


def test_memory_is_checked_before_decoding(monkeypatch, tmp_path):
    from ctgridit import limits
    from ctgridit.ct.io import read_ct
    from ctgridit.errors import CTGridItError

    monkeypatch.setattr(limits, "available_memory", lambda: 10_000_000)      # 10 MB free
    with pytest.raises(CTGridItError, match="too large.*of memory"):
        read_ct(data_file("totalsegmentator/example_ct_dicom"))


# --------------------------------------------------------------- zip bombs
def test_a_zip_that_would_extract_to_far_more_is_refused_before_extracting(capsys, tmp_path):
    import zipfile

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("zeros.dcm", "w", force_zip64=True) as member:
            block = b"\0" * 2**20
            for _ in range(300):                                           # 300 MB of zeros, a few hundred KB zipped
                member.write(block)
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ctgridit", "info", str(bomb)], env={**ENV, "TMPDIR": str(temp)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "would extract" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and list(temp.iterdir()) == []


# ------------------------------------------------ reading
def test_a_nifti_header_that_promises_more_than_the_file_holds(capsys, tmp_path):
    import gzip

    small = raw_nifti(tmp_path / "s.nii", np.zeros((8, 8, 4), np.int16))
    blob = bytearray(small.read_bytes())
    import nibabel as nib

    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(blob[:348])))
    header.set_data_shape((2048, 2048, 1024))
    blob[:348] = header.binaryblock
    (tmp_path / "huge.nii").write_bytes(bytes(blob))
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(bytes(blob)))
    began = time.perf_counter()
    for name in ("huge.nii", "huge.nii.gz"):
        code, _, err = run_cli(capsys, "info", tmp_path / name)
        assert_refused(code, err, name)
        assert "GB" in err and ("promises" in err or "too large" in err), err
    assert time.perf_counter() - began < 5                                # checked from the header, not read


@pytest.mark.parametrize("case,words", [
    ("complex", "complex-valued"), ("rgb", "colour (RGB)"), ("negative_dim", "impossible dimensions"),
    ("zero_spacing", "zero or invalid voxel size"),
])
def test_odd_voxel_types_and_headers_are_named(capsys, tmp_path, case, words):
    path = tmp_path / f"{case}.nii"
    if case == "complex":
        raw_nifti(path, np.zeros((8, 8, 4), np.complex64))
    elif case == "rgb":
        raw_nifti(path, np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]))
    elif case == "negative_dim":
        raw_nifti(path, np.zeros((8, 8, 4), np.int16), dims=(8, 8, -30))
    else:
        raw_nifti(path, np.zeros((8, 8, 4), np.int16), pixdim=(1.0, 1.0, 0.0), qform=0, sform=0)
    code, _, err = run_cli(capsys, "info", path)
    assert_refused(code, err, words)


def test_missing_orientation_and_negative_sizes_are_warnings(capsys, tmp_path):
    path = raw_nifti(tmp_path / "n.nii", np.zeros((8, 8, 4), np.int16), pixdim=(1.0, -2.0, 1.0), qform=0, sform=0)
    code, out, err = run_cli(capsys, "info", path)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("warning: ") for line in lines), err
    assert any("no orientation" in line for line in lines) and any("negative voxel sizes" in line for line in lines)


def test_a_sheared_affine_is_read_and_written_as_one_geometry(capsys, tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    sheared = np.eye(4)
    sheared[0, 1] = 0.35
    src = tmp_path / "shear.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.int16), sheared), src)
    out = tmp_path / "out.nii.gz"
    code, _, err = run_cli(capsys, "convert", src, out)
    assert code == 0 and "warning: " in err and "sheared" in err, err
    img = nib.load(out)
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)  # one geometry for every reader
    itk = sitk.ReadImage(str(out))
    direction = np.array(itk.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-5)


def test_values_int16_cannot_hold_are_not_lost_silently(capsys, tmp_path):
    import nibabel as nib

    probabilities = tmp_path / "p.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(0, 0.56, (16, 16, 8)).astype(np.float32), np.eye(4)), probabilities)
    code, _, err = run_cli(capsys, "convert", probabilities, tmp_path / "o1.nii.gz")
    assert code == 0 and "warning: " in err and "do not look like HU" in err, err
    wide = tmp_path / "w.nii.gz"
    data = np.zeros((16, 16, 8), np.float32)
    data[0, 0, 0] = 1e6
    nib.save(nib.Nifti1Image(data, np.eye(4)), wide)
    code, _, err = run_cli(capsys, "convert", wide, tmp_path / "o2.nii.gz")
    assert code == 0 and "1 voxels beyond the int16 range" in err, err


def test_a_fifo_is_refused_at_once(capsys, tmp_path):
    fifo = tmp_path / "x.nii.gz"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, "info", fifo)
    assert_refused(code, err, "not a regular file")


def test_a_truncated_metaimage_says_what_is_missing(capsys, tmp_path):
    import SimpleITK as sitk

    whole = tmp_path / "t.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 64, 64), np.int16)), str(whole))
    cut = tmp_path / "cut.mha"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    code, _, err = run_cli(capsys, "info", cut)
    assert_refused(code, err, "truncated", "bytes its header promises")
    assert "No such file" not in err


# ------------------------------------------------------- extreme voxels
def test_a_preview_of_extreme_voxels_is_readable(capsys, tmp_path):
    from PIL import Image

    path = raw_nifti(tmp_path / "thin.nii", np.zeros((32, 32, 8), np.int16), pixdim=(0.01, 0.01, 500.0))
    out = tmp_path / "p.png"
    code, _, err = run_cli(capsys, "preview", path, "--out", out)
    assert code == 0, err
    width, height = Image.open(out).size
    assert min(width, height) >= 96, (width, height)


# ---------------------------------------- model folders that lie
@pytest.fixture
def model_folder(tmp_path):
    import torch

    from ctgridit.core.codecs import PixelCodec
    from ctgridit.core.diffusion import make_train_scheduler, sampling_scheduler
    from ctgridit.core.dit import create_dit
    from ctgridit.core.grid import GridSpec
    from ctgridit.core.pipeline import GriDiTPipeline
    from ctgridit.core.settings import PipelineSettings

    torch.manual_seed(0)
    stage1 = create_dit("DiT-tiny/2", sample_height=16, sample_width=16, in_channels=1)
    config = PipelineSettings(GridSpec(2, 2, 1, 1), (8, 8), 1, adapter={"kind": "ct", "spacing": [3.0, 3.0, 3.0]})
    pipeline = GriDiTPipeline(stage1, PixelCodec(1), sampling_scheduler(make_train_scheduler(), "ddim"), settings=config)
    return pipeline.save_pretrained(tmp_path / "m")


@pytest.mark.parametrize("damage,words", [
    ("scheduler", "damaged"), ("sampler", "sampler"), ("depth", "depth"), ("extra_layer", "do not match"),
    ("bin_weights", "safetensors"), ("no_weights", "safetensors"),
])
def test_a_damaged_model_folder_is_one_line_before_any_work(capsys, model_folder, tmp_path, damage, words):
    import json

    stage = model_folder / "stage1"
    if damage == "scheduler":
        path = model_folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "beta_schedule": "nonsense"}))
    elif damage == "sampler":
        path = model_folder / "model_index.json"
        data = json.loads(path.read_text())
        data["settings"]["sampling"]["stage1"]["sampler"] = "bogus"
        path.write_text(json.dumps(data))
    elif damage in ("depth", "extra_layer"):
        path = stage / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "depth": -3 if damage == "depth" else 3}))
    elif damage == "bin_weights":
        (stage / "diffusion_pytorch_model.safetensors").rename(stage / "diffusion_pytorch_model.bin")
    else:
        (stage / "diffusion_pytorch_model.safetensors").unlink()
    out = tmp_path / "v.nii.gz"
    code, _, err = run_cli(capsys, "synth", "--slices", "4", "--model", model_folder, "--out", out, "--quiet")
    assert_refused(code, err, words)
    assert not out.exists() and "Defaulting" not in err


# ------------------------------------------------------------ configs
def _config(tmp_path: Path, **changes) -> Path:
    from tests.conftest import write_config

    return write_config(tmp_path, data_file("totalsegmentator/example_ct_sm.nii.gz"), **changes)


@pytest.mark.parametrize("changes,words", [
    ({"optim": {"steps": "abc"}}, "optim.steps"), ({"frame_size": 32}, "frame_size"),
    ({"optim": {"lr": "fast"}}, "optim.lr"), ({"data": {"window": [1000, -1000]}}, "data.window"),
    ({"checkpoint": {"every": 0}}, "checkpoint.every"), ({"data": {"paths": []}}, "data.paths is empty"),
    ({"data": {"paths": "scans"}}, "data.paths must be a list"), ({"optim": {"ema_decay": 1.5}}, "ema_decay"),
    ({"stage1": {"optim": {"batch_size": 0}}}, "batch_size"),
])
def test_bad_configs_are_refused_before_any_work(capsys, tmp_path, changes, words):
    path = _config(tmp_path, **changes)
    code, _, err = run_cli(capsys, "train", "stage1", "--config", path, "--quiet")
    assert_refused(code, err, words)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]                # no run folder left


@pytest.mark.parametrize("content", [b"", b"\x00\xff\xfe binary \x89PNG", b"- a\n- list\n"])
def test_empty_binary_or_odd_config_files(capsys, tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    code, _, err = run_cli(capsys, "train", "stage1", "--config", path)
    assert_refused(code, err, str(path))


def test_a_missing_vae_folder_is_not_downloaded(capsys, tmp_path):
    path = _config(tmp_path, codec={"kind": "vae", "path": "no/such/vae"})
    code, _, err = run_cli(capsys, "train", "stage1", "--config", path, "--quiet")
    assert_refused(code, err, "no such VAE folder", "codec.download")


# ------------------------------------------------- training runs
def test_a_run_does_not_land_on_an_earlier_one(capsys, tmp_path):
    path = _config(tmp_path, sampling={"stage1": {"levels": 0}})
    assert run_cli(capsys, "train", "stage1", "--config", path, "--quiet", "--steps", "3")[0] == 0
    code, _, err = run_cli(capsys, "train", "stage1", "--config", path, "--quiet", "--steps", "3")
    assert_refused(code, err, "earlier run", "--resume", "--force")
    from ctgridit.training.checkpoint import list_checkpoints

    before = list_checkpoints(tmp_path / "ckpt" / "stage1")
    assert run_cli(capsys, "train", "stage1", "--config", path, "--quiet", "--steps", "2", "--force")[0] == 0
    after = list_checkpoints(tmp_path / "ckpt" / "stage1")
    assert [s for s, _ in after] == [2] and [s for s, _ in before] == [3]   # no mixing of the two runs


def test_resume_skips_a_damaged_newest_checkpoint(capsys, tmp_path):
    path = _config(tmp_path, sampling={"stage1": {"levels": 0}})
    assert run_cli(capsys, "train", "stage1", "--config", path, "--quiet", "--steps", "6")[0] == 0
    newest = tmp_path / "ckpt" / "stage1" / "step_00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    code, out, err = run_cli(capsys, "train", "stage1", "--config", path, "--quiet", "--steps", "6", "--resume")
    assert code == 0, err
    assert "warning: skipped a damaged checkpoint" in err and "step_00000006" in err


def test_an_output_that_cannot_be_written_is_refused_before_training(capsys, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    path = _config(tmp_path, output=str(blocker / "model"), sampling={"stage1": {"levels": 0}})
    code, _, err = run_cli(capsys, "train", "stage1", "--config", path, "--quiet")
    assert_refused(code, err, "is a file, not a folder")
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_checkpoint_write_warns_and_keeps_training(monkeypatch, capsys, tmp_path):
    from ctgridit.errors import CTGridItError
    from ctgridit.training import trainer

    real = trainer.save_checkpoint
    calls = []

    def failing_once(folder, step, *args, **kwargs):
        calls.append(step)
        if step == 3:
            raise CTGridItError("could not write the folder (No space left on device)", folder)
        return real(folder, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", failing_once)
    path = _config(tmp_path, sampling={"stage1": {"levels": 0}})
    code, _, err = run_cli(capsys, "train", "stage1", "--config", path, "--quiet", "--steps", "6")
    assert code == 0, err
    assert calls == [3, 6] and "checkpoint of step 3 was not written" in err
    assert (tmp_path / "model" / "stage1").is_dir()


def test_odd_metaimage_headers_give_warning_lines_not_library_output(capsys, tmp_path):
    """A MetaImage with a negative spacing: whatever ITK says comes out as 'warning:' lines (or one error)."""
    import SimpleITK as sitk

    good = tmp_path / "g.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 16, 16), np.int16)), str(good))
    text = good.read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 -2 1")
    odd = tmp_path / "odd.mha"
    odd.write_bytes(text)
    proc = subprocess.run([sys.executable, "-m", "ctgridit", "info", str(odd)], env=ENV, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert all(line.startswith(("warning: ", "error: ")) for line in lines), proc.stderr
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr
