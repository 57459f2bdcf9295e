"""What the tests share: the real CT scans of the shared data folder (skipped when absent), and the helpers and
fixtures more than one test file uses (tests never import each other)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ctgridit.data_folder import DATA_ENV, data_folder

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = data_folder()
#: The scaling factor of the tiny test VAE: not SD's 0.18215, so that a hard-coded factor would show.
VAE_SCALE = 0.37


def data_file(relative: str) -> Path:
    """A file of the shared CT data (:mod:`ctgridit.data_folder`), or skip the test with the reason."""
    path = DATA_DIR / relative
    if not path.exists():
        pytest.skip(f"shared CT data not found at {path} (set {DATA_ENV})")
    return path


@pytest.fixture
def dicom_dir() -> Path:
    return data_file("totalsegmentator/example_ct_dicom")


@pytest.fixture
def small_ct() -> Path:
    """A small real abdomen slab, 122 x 101 x 30 at 3 mm, RAS."""
    return data_file("totalsegmentator/example_ct_sm.nii.gz")


@pytest.fixture
def chest_ct() -> Path:
    """A real chest crop, 122 x 102 x 112 at 1.5 mm, LPS."""
    return data_file("totalsegmentator/chest_crop.nii.gz")


# ------------------------------------------------------------ the command line
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``ctgridit ARGS`` in-process; return (exit code, stdout, stderr)."""
    from ctgridit.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else int(stop.code)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, *phrases: str) -> None:
    """A refusal: exit code 2, one ``error:`` line holding every phrase, no traceback."""
    assert code == 2, f"exit code {code}, stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase.lower() in lines[0].lower(), f"{phrase!r} not in {lines[0]!r}"


#: The environment of a ctgridit started as a subprocess by a test: this checkout, one thread.
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start_cli(args: list, **kwargs) -> subprocess.Popen:
    """``python -m ctgridit ARGS`` as a subprocess (stdout and stderr as text pipes)."""
    return subprocess.Popen([sys.executable, "-m", "ctgridit", *map(str, args)], env=kwargs.pop("env", CLI_ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def handles_sigterm(pid: int) -> bool:
    """Whether the process catches SIGTERM yet (ctgridit's handlers are in place), from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.005)
    pytest.fail("the condition never came true")


def raw_nifti(path: Path, data, pixdim=(1.0, 1.0, 1.0), qform: int = 1, sform: int = 1,
              dims: tuple | None = None) -> Path:
    """A NIfTI-1 file written byte by byte, so that its header says exactly what the test wants."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    header["pixdim"][1:4] = pixdim
    header["vox_offset"] = 352
    header["qform_code"], header["sform_code"] = qform, sform
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]
    if dims is not None:
        header["dim"][1:1 + len(dims)] = dims
    path.write_bytes(header.binaryblock + b"\0" * 4 + data.tobytes(order="F"))
    return path


def no_files_left(folder: Path, before: set[str]) -> None:
    assert set(os.listdir(folder)) == before, f"left behind: {set(os.listdir(folder)) - before}"


# ------------------------------------------------------------ data and models
def nested_path(root: Path, name: str) -> Path:
    """Where CT-RATE puts a volume: train_1_a_1.nii.gz -> train/train_1/train_1_a/train_1_a_1.nii.gz."""
    split, patient, scan, _ = name.split("_", 3)
    return root / split / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name


def write_csv(path: Path, rows: list[dict], columns=None) -> Path:
    """A CT-RATE metadata CSV (its columns by default)."""
    from ctgridit.ct.ctrate import CSV_COLUMNS

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def copy_slices(files, target: Path, edit=None, names=None) -> Path:
    """Copy DICOM ``files`` into ``target``, editing each header with ``edit(ds, index)`` first."""
    import pydicom

    target.mkdir(parents=True, exist_ok=True)
    for index, src in enumerate(files):
        ds = pydicom.dcmread(src)
        if edit is not None:
            edit(ds, index)
        ds.save_as(target / (names[index] if names else src.name))
    return target


def tiny_vae(seed: int = 0, scaling_factor: float = VAE_SCALE):
    """A randomly initialised two-level AutoencoderKL: images H x W -> latents 4 x H/2 x W/2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor).eval()


def randomized(model, seed: int):
    """Non-zero weights everywhere (DiT's init zeroes the output, which would hide bugs); in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_config(folder: Path, scan: Path, **changes) -> Path:
    """A tiny CT training config in ``folder`` (32 x 32 frames, 2 x 2 grids, pixel codec)."""
    config = {
        "name": "tiny", "output": "model", "frame_size": [32, 32],
        "grid": {"rows": 2, "cols": 2, "stride": 1, "factor": 2},
        "data": {"kind": "ct", "paths": [str(scan)], "spacing": [12.0, 12.0, 3.0], "stride_range": [1, 2]},
        "codec": {"kind": "pixel", "channels": 1},
        "stage1": {"model": {"preset": "DiT-tiny/2"}}, "stage2": {"model": {"preset": "DiT-tiny/2"}},
        "optim": {"steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9},
        "checkpoint": {"dir": "ckpt", "every": 3, "keep_last": 5},
        "sampling": {"stage1": {"num_steps": 3}, "stage2": {"num_steps": 2}},
    }
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------ sequence plans
def interpolation_grids(plan) -> int:
    """Interpolation grids of a :class:`~ctgridit.core.sampler.SequencePlan` over all its levels (per sequence)."""
    return sum(plan.pairs(level) for level in range(plan.levels))


def total_frames(plan) -> int:
    """Frames of a plan's last phase before the surplus is dropped (at least ``plan.num_frames``)."""
    return plan.level_output(plan.levels - 1) if plan.levels else plan.step1_frames
