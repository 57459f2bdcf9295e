"""The reliability issue: ways to break ctgridit found by trying, each reproduced here.

Every case must end in one line ``error: ...``, exit code 2 (130/143/129 for
signals), no traceback, no output or temporary file left, nothing of the
user's lost. Test names carry the number of the case in the issue.
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

from tests.conftest import REPO, data_file
from tests.test_cli import assert_refused, run_cli

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------ 23: option errors
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
def test_23_option_errors_are_one_line(capsys, args, words):
    code, out, err = run_cli(capsys, *args)
    assert_refused(code, err, words, "--help")


# -------------------------------------------------------------- 3: one seed rule
@pytest.mark.parametrize("command", [["synth", "--out", "v.nii.gz"], ["denoise", "IN"],
                                     ["add-noise", "IN", "--sigma", "5", "--out", "n.nii.gz"]])
@pytest.mark.parametrize("seed", ["18446744073709551616", "1e30", "-1", "4294967296"])
def test_3_seeds_are_checked_alike_everywhere(capsys, command, seed):
    code, _, err = run_cli(capsys, *command, "--seed", seed)
    assert_refused(code, err, "--seed")


def test_3_the_largest_seed_is_accepted_and_the_api_checks_too():
    from ctgridit.errors import CTGridItError
    from ctgridit.seeds import SEED_MAX, check_seed

    assert check_seed(SEED_MAX) == SEED_MAX and check_seed(np.int64(7)) == 7
    for bad in (-1, SEED_MAX + 1, 1.5, "3"):
        with pytest.raises(CTGridItError, match="seed"):
            check_seed(bad)


# --------------------------------------------------------- 4, 28: noise settings
@pytest.mark.parametrize("args,words", [
    (["--sigma", "1e300"], "--sigma"), (["--sigma", "inf"], "--sigma"), (["--sigma", "nan"], "--sigma"),
    (["--sigma", "0"], "--sigma"), (["--model", "lowdose", "--sigma", "1e-6"], "gaussian"),
    (["--model", "pink", "--sigma", "5"], "noise model"),
])
def test_4_28_bad_noise_is_refused_up_front(capsys, small_ct, tmp_path, args, words):
    code, _, err = run_cli(capsys, "add-noise", small_ct, "--out", tmp_path / "n.nii.gz", *args)
    assert_refused(code, err, words)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------- 20, 33: synth lengths
@pytest.mark.parametrize("slices", ["1", "100000"])
def test_20_33_synth_refuses_volumes_readers_reject_or_that_never_end(capsys, tmp_path, slices):
    code, _, err = run_cli(capsys, "synth", "--slices", slices, "--out", tmp_path / "v.nii.gz")
    assert_refused(code, err, "--slices")


def test_20_readers_take_what_synth_may_write(tmp_path):
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


# ---------------------------------------------------------- 38: one device rule
def test_38_an_explicit_gpu_that_is_missing_is_refused_by_every_command(capsys, monkeypatch, tmp_path, small_ct):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["synth", "--slices", "4", "--out", tmp_path / "v.nii.gz", "--device", "cuda"],
                 ["denoise", small_ct, "--out", tmp_path / "d.nii.gz", "--device", "cuda"]):
        code, _, err = run_cli(capsys, *args)
        assert_refused(code, err, "no CUDA GPU")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------- 13: never over an input
def test_13_denoise_and_convert_never_write_over_their_input(capsys, small_ct, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(small_ct.read_bytes())
    before = scan.read_bytes()
    for args in (["denoise", scan, "--out", scan, "--force"],
                 ["denoise", scan, "--out", tmp_path / "d.nii.gz", "--report", scan, "--force"],
                 ["convert", scan, scan, "--force"],
                 ["add-noise", scan, "--sigma", "5", "--out", scan, "--force"]):
        code, _, err = run_cli(capsys, *args)
        assert_refused(code, err, "is an input")
    assert scan.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["scan.nii.gz"]


# ------------------------------------------------------ 22, 32: output names
def test_22_upper_case_nifti_names_are_written(capsys, small_ct, tmp_path):
    out = tmp_path / "C_UP.NII.GZ"
    code, _, err = run_cli(capsys, "convert", small_ct, out)
    assert code == 0, err
    from ctgridit.ct.io import read_ct

    assert read_ct(out).shape == read_ct(small_ct).shape


def test_32_an_output_under_a_file_names_the_file(capsys, small_ct, tmp_path):
    blocker = tmp_path / "c1.nii.gz"
    blocker.write_bytes(b"x")
    code, _, err = run_cli(capsys, "convert", small_ct, blocker / "sub.nii.gz")
    assert_refused(code, err, "c1.nii.gz", "is a file, not a folder")


# ------------------------------------------------------------- 2, 10, 34: grid
@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_2_grid_into_an_impossible_folder_is_one_line(capsys, small_ct, tmp_path, where):
    out = (small_ct / "sub") if where == "under_file" else Path("/proc/ctgridit-test")
    code, _, err = run_cli(capsys, "grid", small_ct, "--out", out)
    assert_refused(code, err)


def test_10_grid_force_replaces_the_whole_folder(capsys, small_ct, tmp_path):
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
def test_34_grid_settings_that_show_nothing_are_refused(capsys, small_ct, tmp_path, args, words):
    code, _, err = run_cli(capsys, "grid", small_ct, "--out", tmp_path / "g", *args)
    assert_refused(code, err, words)
    assert not (tmp_path / "g").exists()


# ------------------------------------------------- 9, 21: signals and Ctrl-C
def _start(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ctgridit", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_21_ctrl_c_during_startup_is_one_line_and_130(tmp_path):
    proc = _start(["info", tmp_path / "missing.nii.gz"])
    time.sleep(0.15)                                                     # inside the imports
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "error: interrupted"


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.005)
    pytest.fail("the condition never came true")


@pytest.mark.parametrize("signum,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hung up"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_9_a_signal_while_writing_leaves_no_temporary_file(tmp_path, signum, code, word):
    """The signal arrives while the hidden temporary NIfTI exists; it must be gone after."""
    scan = data_file("lidc_idri/LIDC-IDRI-0314.nii.gz")                 # large enough to write for a while
    out = tmp_path / "out"
    out.mkdir()
    proc = _start(["convert", scan, out / "c.nii.gz"])
    _wait_for(lambda: any(p.name.startswith(".c.nii.gz.") for p in out.iterdir()) or proc.poll() is not None)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the write finished before the signal arrived")
    assert proc.returncode == code and err.strip() == f"error: {word}", (proc.returncode, err)
    assert list(out.iterdir()) == []


def test_9_a_signal_while_a_zip_is_extracted_leaves_no_folder(tmp_path):
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
    _wait_for(lambda: any(temp.iterdir()) or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the read finished before the signal arrived")
    assert proc.returncode == 143, err
    assert list(temp.iterdir()) == []
