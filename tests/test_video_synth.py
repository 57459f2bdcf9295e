"""Video through the same core, from the command line (issue 17).

A tiny video model is trained through ``ctgridit train stage1`` on GIF clips of
a square circling at a known speed (:mod:`ctgridit.video.shapes`): the bundled
moving-squares model (``ctgridit/models/video_shapes``, 16 minutes of training),
fine-tuned a few steps on new clips. Clips are sampled through ``ctgridit synth
--frames`` (4 x 4 grids, the paper's m = 3 control rows) and read back with
imageio: the frame count, size, the frame rate the model folder recorded from
its training clips, and the square's motion continued in the frames the
extension added. Every mismatch between a model's adapter and the output is
refused with one line, before any work.
"""

from __future__ import annotations

import json
import math
import os

import imageio.v3 as iio
import numpy as np
import pytest
import yaml

from ctgridit.cli import main
from ctgridit.model_folders import BUNDLED_VIDEO_MODEL
from ctgridit.video.io import frame_rate, read_frames, video_clips
from ctgridit.video.shapes import CirclingSquare, fit_phase, motion_errors, track_square, write_moving_squares
from tests.conftest import assert_refused, run_cli

MOTION = CirclingSquare()
FPS = 10.0
TRAIN_STEPS = 30


def tiny_config(clips, out, steps: int) -> dict:
    """pipelines/configs/video_shapes.yaml, shortened, starting from the bundled model's weights."""
    with open(os.path.join(os.path.dirname(__file__), "..", "pipelines", "configs", "video_shapes.yaml")) as f:
        config = yaml.safe_load(f)
    config.update(output=str(out / "model"), data={"kind": "video", "paths": [str(clips)]})
    config["optim"].update(steps=steps, warmup_steps=10, lr=2.0e-4)
    config["stage1"]["init"] = str(BUNDLED_VIDEO_MODEL / "stage1")
    config["checkpoint"] = {"dir": str(out / "checkpoints"), "every": 10_000, "keep_last": 1}
    return config


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    """A model folder trained through the CLI: the bundled model fine-tuned on 8 new clips at another frame rate."""
    root = tmp_path_factory.mktemp("video")
    write_moving_squares(root / "clips", clips=8, frames=24, motion=MOTION, fps=FPS)
    config = root / "video.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root / "clips", root, TRAIN_STEPS)))
    try:
        main(["train", "stage1", "--config", str(config), "--quiet"])
    except SystemExit as stop:
        assert not stop.code, f"training failed with exit code {stop.code}"
    return root / "model"


# ----------------------------------------------------------------- the data set
def test_moving_squares_follow_their_circle_and_record_their_rate(tmp_path):
    paths = write_moving_squares(tmp_path, clips=3, frames=20, motion=MOTION, fps=FPS, seed=1)
    assert video_clips([tmp_path]) == paths                       # a folder of clips stands for its clips
    drawn = np.random.default_rng(1).uniform(0, 2 * math.pi, 3)  # the phases write_moving_squares draws
    for path, phase in zip(paths, drawn):
        video = read_frames(path)
        assert np.array_equal(video, MOTION.clip(20, phase))      # GIF: few colours, stored exactly
        centres = track_square(video)
        assert abs(np.angle(np.exp(1j * (fit_phase(MOTION, centres) - phase)))) < 0.02
        rows, cols = MOTION.centre(np.arange(20), phase)
        assert np.hypot(centres[:, 0] - rows, centres[:, 1] - cols).max() < 0.2
        assert frame_rate(path) == pytest.approx(FPS)
    assert np.ptp(drawn) > 0.1                                    # clips start at different phases


def test_a_square_standing_still_is_not_on_the_circle():
    still = np.repeat(MOTION.clip(1, 0.0), 16, axis=0)
    centres = track_square(still)
    rows, cols = MOTION.centre(np.arange(16), fit_phase(MOTION, centres))
    assert np.hypot(centres[:, 0] - rows, centres[:, 1] - cols).max() > MOTION.radius


# ----------------------------------------------------------------- train and synth
def test_model_folder_is_a_video_model_with_the_clips_frame_rate(video_model):
    adapter = json.loads((video_model / "model_index.json").read_text())["settings"]["adapter"]
    assert adapter == {"kind": "video", "fps": pytest.approx(FPS)}


@pytest.mark.parametrize("name", ["clip.gif", "clip.mp4", "frames"])
def test_synth_writes_a_clip_imageio_reads_back(capsys, video_model, tmp_path, name):
    out, preview = tmp_path / name, tmp_path / "sheet.png"
    code, stdout, err = run_cli(capsys, "synth", "--model", video_model, "--frames", 22, "--out", out,
                                "--preview", preview, "--seed", 3, "--quiet")
    assert code == 0, err
    frames = iio.imread(out) if out.suffix else np.stack([iio.imread(p) for p in sorted(out.iterdir())])
    assert frames.shape == (22, MOTION.size, MOTION.size, 3)
    if out.suffix:
        assert frame_rate(out) == pytest.approx(FPS)
    else:
        assert sorted(p.name for p in out.iterdir())[:2] == ["frame_00000.png", "frame_00001.png"]
    sheet = iio.imread(preview)
    assert sheet.ndim == 3 and sheet.shape[1] > sheet.shape[0]    # the frames side by side


@pytest.mark.parametrize("seed", [0, 1])
def test_synth_clips_continue_the_motion(capsys, video_model, tmp_path, seed):
    """The square of a clip from ``ctgridit synth`` keeps circling in the frames the extension added (2 grids of
    4 new frames after the first 16): near the circle fitted on the first grid, far nearer than a square that
    stopped there."""
    out = tmp_path / "clip.gif"
    code, _, err = run_cli(capsys, "synth", "--model", video_model, "--frames", 24, "--out", out, "--seed", seed,
                           "--quiet")
    assert code == 0, err
    errors = motion_errors(iio.imread(out), MOTION, first=16)
    assert errors["missing"] == 0, errors
    assert errors["first grid"] < 2.0 and errors["added"] < 1.0, errors
    assert errors["added"] < errors["frozen"] / 3, errors


def test_a_bundled_model_is_named_by_its_folder_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                   # no folder of that name here
    code, _, err = run_cli(capsys, "synth", "--model", "video_shapes", "--frames", 17, "--out", "c.gif", "--quiet")
    assert code == 0, err
    assert iio.imread(tmp_path / "c.gif").shape == (17, MOTION.size, MOTION.size, 3)
    assert_refused(*run_cli(capsys, "synth", "--model", "no_such_model", "--out", "d.gif")[::2], "no_such_model")


def test_synth_clips_are_reproducible_and_numbered(capsys, video_model, tmp_path):
    for name in ("a.gif", "b.gif"):
        assert run_cli(capsys, "synth", "--model", video_model, "--frames", 17, "-n", 2, "--out", tmp_path / name,
                       "--quiet")[0] == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["a_000.gif", "a_001.gif", "b_000.gif", "b_001.gif"]
    a0, a1, b0 = (iio.imread(tmp_path / n) for n in ("a_000.gif", "a_001.gif", "b_000.gif"))
    assert np.array_equal(a0, b0) and not np.array_equal(a0, a1)


# ----------------------------------------------------------------- mismatches
def test_mismatched_outputs_and_options_are_refused_before_any_work(capsys, video_model, tmp_path):
    cases = [
        (["--model", video_model, "--frames", 8, "--out", tmp_path / "v.nii.gz"], "not NIfTI"),
        (["--model", video_model, "--slices", 8, "--out", tmp_path / "v.mp4"], "--slices is for CT"),
        (["--model", video_model, "--out", tmp_path / "v.avi"], "cannot write .avi"),
        (["--out", tmp_path / "v.mp4"], "not video"),                               # the bundled CT model
        (["--frames", 8, "--out", tmp_path / "v.nii.gz"], "--frames is for video"),
        (["--model", video_model, "--frames", 8, "--out", tmp_path / "v.gif", "--preview", tmp_path / "p.jpg"],
         ".png"),
    ]
    for args, phrase in cases:
        assert_refused(*run_cli(capsys, "synth", *args)[::2], phrase)
    assert os.listdir(tmp_path) == []


def test_existing_clip_and_frames_folder_need_force(capsys, video_model, tmp_path):
    (tmp_path / "c.gif").write_bytes(b"mine")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "notes.txt").write_text("mine")
    assert_refused(*run_cli(capsys, "synth", "--model", video_model, "--out", tmp_path / "c.gif")[::2], "exists")
    assert_refused(*run_cli(capsys, "synth", "--model", video_model, "--out", tmp_path / "frames")[::2], "exists")
    code, _, err = run_cli(capsys, "synth", "--model", video_model, "--frames", 8, "--out", tmp_path / "frames",
                           "--force", "--quiet")
    assert_refused(code, err, "other than frame_")                  # --force never deletes the user's files
    assert (tmp_path / "c.gif").read_bytes() == b"mine" and (tmp_path / "frames" / "notes.txt").exists()
