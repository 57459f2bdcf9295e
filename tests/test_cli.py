"""The command line: results on real scans, and every bad input refused the same way:
one line on stderr naming the file, exit code 2, no traceback, no output left behind."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import assert_refused, data_file, no_files_left, run_cli


# ----------------------------------------------------------------- bad inputs
def _save(img, path: Path) -> Path:
    nib.save(img, str(path))
    return path


@pytest.fixture
def bad_inputs(tmp_path, small_ct) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase the error must contain)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    text = bad / "notes.txt"
    text.write_text("not an image\n")
    fake = bad / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    truncated = bad / "truncated.nii.gz"
    raw = small_ct.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    empty_dir = bad / "empty_dicom"
    empty_dir.mkdir()
    nan = np.zeros((16, 16, 8), np.float32)
    nan[3, 4, 5] = np.nan
    inf = np.zeros((16, 16, 8), np.float32)
    inf[1, 1, 1] = np.inf
    return {
        "missing": (bad / "nope.nii.gz", "no such"),
        "text": (text, "not a readable"),
        "fake_nifti": (fake, "not a readable"),
        "truncated": (truncated, "corrupt"),
        "2d": (_save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), bad / "flat.nii.gz"), "2d"),
        "4d": (_save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), bad / "four.nii.gz"), "4d"),
        "nan": (_save(nib.Nifti1Image(nan, np.eye(4)), bad / "nan.nii.gz"), "nan"),
        "inf": (_save(nib.Nifti1Image(inf, np.eye(4)), bad / "inf.nii.gz"), "inf"),
        "empty_dicom": (empty_dir, "dicom"),
    }


BAD_NAMES = ["missing", "text", "fake_nifti", "truncated", "2d", "4d", "nan", "inf", "empty_dicom"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_info_refuses_bad_input(capsys, bad_inputs, name):
    path, phrase = bad_inputs[name]
    code, out, err = run_cli(capsys, "info", path)
    assert_refused(code, err, str(path.name), phrase)
    assert out == ""


@pytest.mark.parametrize("name", BAD_NAMES)
def test_convert_refuses_bad_input_and_writes_nothing(capsys, bad_inputs, tmp_path, name):
    path, phrase = bad_inputs[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_cli(capsys, "convert", path, out_dir / "x.nii.gz")
    assert_refused(code, err, str(path.name), phrase)
    no_files_left(out_dir, set())


@pytest.mark.parametrize("command", ["preview", "grid"])
@pytest.mark.parametrize("name", ["missing", "truncated", "2d", "nan", "empty_dicom"])
def test_picture_commands_refuse_bad_input(capsys, bad_inputs, tmp_path, command, name):
    path, phrase = bad_inputs[name]
    out = tmp_path / ("p.png" if command == "preview" else "grids")
    code, _, err = run_cli(capsys, command, path, "--out", out)
    assert_refused(code, err, str(path.name), phrase)
    assert not out.exists() or not any(out.iterdir())


# -------------------------------------------------------------- bad outputs
def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:          # root ignores permission bits; /sys refuses new files
        return Path("/sys")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("command", ["convert", "preview", "synth"])
def test_unwritable_output_is_refused(capsys, small_ct, tmp_path, command):
    folder = _unwritable_folder(tmp_path)
    target = folder / ("x.png" if command == "preview" else "x.nii.gz")
    args = {"convert": ["convert", small_ct, target], "preview": ["preview", small_ct, "--out", target],
            "synth": ["synth", "--slices", "8", "--out", target]}[command]
    code, _, err = run_cli(capsys, *args)
    assert_refused(code, err, "not writable", str(folder))
    assert not target.exists()


@pytest.mark.parametrize("command", ["convert", "preview", "synth"])
def test_existing_output_needs_force(capsys, small_ct, tmp_path, command):
    target = tmp_path / ("x.png" if command == "preview" else "x.nii.gz")
    target.write_bytes(b"precious")
    args = {"convert": ["convert", small_ct, target], "preview": ["preview", small_ct, "--out", target],
            "synth": ["synth", "--slices", "8", "--out", target]}[command]
    code, _, err = run_cli(capsys, *args)
    assert_refused(code, err, "exists", "--force", target.name)
    assert target.read_bytes() == b"precious"
    assert set(os.listdir(tmp_path)) == {target.name}


def test_output_in_missing_folder_is_refused(capsys, small_ct, tmp_path):
    target = tmp_path / "no" / "such" / "x.nii.gz"
    code, _, err = run_cli(capsys, "convert", small_ct, target)
    assert_refused(code, err, "does not exist")


def test_convert_force_overwrites(capsys, small_ct, tmp_path):
    target = tmp_path / "x.nii.gz"
    target.write_bytes(b"old")
    code, _, err = run_cli(capsys, "convert", small_ct, target, "--force")
    assert code == 0, err
    assert nib.load(str(target)).shape == (122, 101, 30)


def test_bad_window_is_refused(capsys, small_ct, tmp_path):
    code, _, err = run_cli(capsys, "preview", small_ct, "--out", tmp_path / "p.png", "--window", "banana")
    assert_refused(code, err, "window", "lung")
    assert not (tmp_path / "p.png").exists()


# --------------------------------------------------------------- good inputs
def test_info_json_on_dicom_folder(capsys, dicom_dir):
    code, out, err = run_cli(capsys, "info", "--json", dicom_dir)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["shape"] == [512, 512, 20]
    assert summary["spacing"] == pytest.approx([0.977, 0.977, 2.0], abs=1e-3)
    assert summary["orientation"] == "LPS"
    hu = summary["hu"]
    assert hu["min"] <= hu["p1"] <= hu["p50"] <= hu["p99"] <= hu["max"]
    assert -1100 < hu["min"] < -900 and hu["max"] > 1000     # air and bone in HU, rescale applied
    assert "series_uid" in summary


def test_info_text_on_nifti(capsys, small_ct):
    code, out, _ = run_cli(capsys, "info", small_ct)
    assert code == 0
    assert "122 x 101 x 30" in out and "RAS" in out and "int16" in out


def test_convert_dicom_gives_the_same_hu(capsys, dicom_dir, tmp_path):
    import SimpleITK as sitk

    out = tmp_path / "ct.nii.gz"
    code, _, err = run_cli(capsys, "convert", dicom_dir, out)
    assert code == 0, err
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    ref = reader.Execute()
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(written.dataobj), sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    # the written file places voxels where the DICOM does (ITK reads it back in LPS)
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(back.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), ref.GetDirection(), atol=1e-6)


def test_preview_is_spacing_aware(capsys, tmp_path):
    from PIL import Image

    # A0002: 0.646 mm in-plane, 8 mm slices: 331 x 331 x 240 mm. The coronal plane
    # must be drawn 240/331 as tall as wide, not 30/512.
    src = data_file("lung_pet_ct_dx/A0002_8mm_B40f.nii.gz")
    out = tmp_path / "p.png"
    code, _, err = run_cli(capsys, "preview", src, "--out", out, "--window", "lung")
    assert code == 0, err
    from ctgridit.ct.io import read_ct
    from ctgridit.ct.preview import mid_planes, render_preview

    image = Image.open(out)
    assert image.mode == "L" and image.width > 3 * 200
    planes = mid_planes(read_ct(src))
    name, coronal, (row_mm, col_mm), _ = planes[1]
    assert name == "coronal"
    assert coronal.shape == (30, 512)
    ratio = coronal.shape[0] * row_mm / (coronal.shape[1] * col_mm)
    assert ratio == pytest.approx(240 / 331, rel=0.01)
    assert image.size == render_preview(read_ct(src), (-1350, 150), title="A0002_8mm_B40f.nii.gz").size


def test_help_of_every_command_has_an_example():
    for command in ["info", "convert", "grid", "preview", "synth", "train stage1", "train stage2"]:
        done = subprocess.run([sys.executable, "-m", "ctgridit", *command.split(), "--help"],
                              capture_output=True, text=True)
        assert done.returncode == 0
        assert "Example: ctgridit " + command in done.stdout


def test_entry_point_error_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ctgridit", "info", str(tmp_path / "missing.nii.gz")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "missing.nii.gz" in done.stderr


def test_grid_writes_what_the_model_sees(capsys, chest_ct, tmp_path):
    from PIL import Image

    from ctgridit.ct.io import read_ct

    out = tmp_path / "grids"
    code, stdout, err = run_cli(capsys, "grid", chest_ct, "--out", out, "--rows", "2", "--cols", "3", "--stride", "2")
    assert code == 0, err
    files = sorted(out.glob("grid_*.png"))
    # 112 slices, blocks of stride * R * C = 12 -> 120 padded slices -> 20 grids of 6 cells
    assert len(files) == 20 and str(len(files)) in stdout
    index = json.loads((out / "grids.json").read_text())
    assert index["grids"][1]["slices"] == [1, 3, 5, 7, 9, 11]          # phase 1 of block 0
    assert index["grids"][-1]["slices"][-1] is None                     # depth padding is marked
    vol = read_ct(chest_ct).reoriented("LPS")
    x, y, _ = vol.shape
    grid = np.asarray(Image.open(files[1]))
    assert grid.shape == (2 * y, 3 * x)
    # cell (0, 2) of grid 1 is slice 5 in the radiological view, windowed -1000..1000 HU to 0..255
    expected = np.rint((np.clip(vol.array[:, :, 5].T, -1000, 1000) + 1000) / 2000 * 255)
    assert np.abs(grid[:y, 2 * x:].astype(float) - expected).max() <= 1


def test_grid_refuses_to_overwrite_without_force(capsys, small_ct, tmp_path):
    out = tmp_path / "grids"
    assert run_cli(capsys, "grid", small_ct, "--out", out)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run_cli(capsys, "grid", small_ct, "--out", out)
    assert_refused(code, err, "--force")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_debug_shows_the_traceback_behind_the_one_line(capsys, tmp_path, monkeypatch):
    """--debug (or CTGRIDIT_DEBUG=1) prints the traceback and its cause before the same error line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    code, _, err = run_cli(capsys, "train", "stage1", "--config", bad)
    assert_refused(code, err, "not a valid YAML")
    code, _, err = run_cli(capsys, "--debug", "train", "stage1", "--config", bad)
    assert code == 2 and "Traceback" in err and "yaml" in err and "direct cause" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "not a valid YAML" in err.strip().splitlines()[-1]
    monkeypatch.setenv("CTGRIDIT_DEBUG", "1")
    code, _, err = run_cli(capsys, "train", "stage1", "--config", bad)
    assert code == 2 and "Traceback" in err
