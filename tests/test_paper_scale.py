"""The CT-RATE chain on a tiny CT-RATE-shaped folder made here, all on CPU processes:

prepare (the frame cache, resumable, a bad volume skipped) -> train a few steps from the cache with
2 processes -> sharded synthesis with 2 processes (the same files as one process) -> evaluate.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from ctgridit.ct.evaluate import frechet_distance
from ctgridit.ct.io import read_ct
from tests.conftest import REPO
from tests.conftest import run_cli
from tests.conftest import nested_path, write_csv

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
NAMES = ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ctrate_folder(tmp_path_factory):
    """Three CT-RATE volumes (int16 raw values, the CSV's rescale and spacing) cut from a real scan, and a
    fourth CSV row whose file is damaged."""
    from tests.conftest import data_file

    scan = read_ct(data_file("totalsegmentator/example_ct_sm.nii.gz"))
    root = tmp_path_factory.mktemp("ctrate")
    rows = []
    for k, name in enumerate(NAMES):
        hu = scan.array[k * 10: k * 10 + 100, :96, :]                         # three different crops
        path = nested_path(root / "data", name)
        path.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.rint(hu + 1024).astype(np.int16), scan.affine), str(path))
        rows.append({"VolumeName": name, "RescaleSlope": 1.0, "RescaleIntercept": -1024.0,
                     "XYSpacing": "[3.0, 3.0]", "ZSpacing": 3.0})
    bad = nested_path(root / "data", "train_4_a_1.nii.gz")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a volume")
    rows.append({**rows[0], "VolumeName": "train_4_a_1.nii.gz"})
    config = {
        "name": "tiny_ctrate", "output": "model", "frame_size": [32, 32],
        "grid": {"rows": 2, "cols": 2, "stride": 1, "factor": 2},
        "data": {"kind": "ctrate", "ctrate_root": str(root / "data"),
                 "ctrate_csv": str(write_csv(root / "metadata.csv", rows)),
                 "spacing": [9.0, 9.0, 3.0], "strides": [1, 3], "cache": "cache"},
        "codec": {"kind": "pixel", "channels": 1},
        "stage1": {"model": {"preset": "DiT-tiny/2"}, "conditioning": {"masked": True, "strides": True}},
        "stage2": {"model": {"preset": "DiT-tiny/2"}},
        "optim": {"steps": 4, "batch_size": 2, "lr": 1e-3},
        "checkpoint": {"dir": "ckpt", "every": 2},
        "sampling": {"stage1": {"num_steps": 2, "levels": 1}, "stage2": {"num_steps": 2}},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_the_whole_chain_on_cpu_processes(capsys, ctrate_folder, tmp_path):
    config = ctrate_folder / "config.yaml"
    # 1. prepare: the damaged volume is named and the run fails (exit 2), the others are kept; a second run
    #    prepares nothing again and still fails; training reads the volumes that are there
    code, out, err = run_cli(capsys, "prepare", config, "--quiet")
    assert code == 2 and "3 sequences" in out
    assert "error:" in err and "1 of 4 volumes could not be prepared: train_4_a_1.nii.gz" in err
    index = json.loads((ctrate_folder / "cache" / "cache.json").read_text())
    assert [e["name"] for e in index["sequences"]] == NAMES and index["failed"][0]["name"] == "train_4_a_1.nii.gz"
    code, out, _ = run_cli(capsys, "prepare", config, "--quiet")
    assert code == 2 and "(0 prepared now)" in out

    # 2. train from the cache with 2 processes
    audit = ctrate_folder / "audit"
    train = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(_free_port()), "-m", "ctgridit", "train", "stage1", "--config",
                            str(config), "--quiet", "--audit", str(audit)],
                           cwd=ctrate_folder, env=ENV, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    ranks = [json.loads((audit / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    model = ctrate_folder / "model"

    # 3. sharded synthesis equals one process
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(capsys, "synth", "--model", model, "--slices", "9", "--num", "3", "--out", f"{one}/",
                           "--quiet", "--seed", "5")
    assert code == 0, err
    shard = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(_free_port()), "-m", "ctgridit", "synth", "--model", str(model),
                            "--slices", "9", "-n", "3", "--out", f"{two}/", "--quiet", "--seed", "5"],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert shard.returncode == 0, shard.stderr[-3000:]
    files = sorted(p.name for p in one.iterdir())
    assert files == ["vol_00000.nii.gz", "vol_00001.nii.gz", "vol_00002.nii.gz"] == sorted(p.name for p in two.iterdir())
    for name in files:
        assert np.array_equal(nib.load(one / name).get_fdata(), nib.load(two / name).get_fdata()), name
    assert not np.array_equal(nib.load(one / files[0]).get_fdata(), nib.load(one / files[1]).get_fdata())

    # 4. evaluate against the real volumes, with a tiny feature network for 2.5D FID
    real = tmp_path / "real"
    real.mkdir()
    for name in NAMES:
        (real / name).symlink_to(next((ctrate_folder / "data").rglob(name)))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())
    torch.jit.save(torch.jit.script(net.eval()), tmp_path / "net.pt")
    report = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "evaluate", "--real", real, "--generated", one, "--features",
                             tmp_path / "net.pt", "--report", report)
    assert code == 0, err
    figures = json.loads(report.read_text())
    for key in ("hu_wasserstein", "lung_profile_l1", "continuity_ratio", "far_ssim_real", "fid_axial", "fid_25d"):
        assert np.isfinite(figures[key]), key
    assert figures["generated_volumes"] == 3 and figures["fid_25d"] > 0


def test_frechet_distance_is_exact_for_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert abs(frechet_distance(a, a)) < 1e-8
    shifted = a + np.array([1.0, 2.0, 0.0])
    assert abs(frechet_distance(a, shifted) - 5.0) < 1e-6                   # |mean difference|^2, same covariance
    scaled = a * 2.0                                       # |mu|^2 + Tr(S + 4S - 2 sqrt(4 S^2)) = |mu|^2 + Tr(S)
    expected = (a.mean(axis=0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert abs(frechet_distance(a, scaled) - expected) < 1e-6


def test_the_volume_seed_does_not_depend_on_the_split():
    from ctgridit.seeded_runs import sample_seed

    assert sample_seed(7, 0) == 7
    assert len({sample_seed(7, i) for i in range(1000)}) == 1000
