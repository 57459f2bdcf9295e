"""The video adapter: frame folders, GIF and MP4 round trips on a synthetic moving square,
the uint8 <-> [-1, 1] sequence round trip, and bad inputs refused with the path named."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ctgridit.video.io as video_io
from ctgridit.errors import CTGridItError, CTGridItWarning
from ctgridit.video import (VideoFiles, frames_to_sequence, read_frames, sequence_to_frames, write_frames,
                            write_video)

SQUARE = 8
BACKGROUND = (0, 0, 60)
COLOUR = (255, 200, 0)


def square_origin(t: int) -> tuple[int, int]:
    """Top-left (row, column) of the square in frame ``t``: it moves down 1 and right 2 per frame."""
    return 4 + t, 2 + 2 * t


def moving_square(frames: int = 24, height: int = 48, width: int = 64) -> np.ndarray:
    """A bright square moving diagonally over a dark background, uint8 (T, H, W, 3)."""
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = BACKGROUND
    for t in range(frames):
        row, col = square_origin(t)
        video[t, row:row + SQUARE, col:col + SQUARE] = COLOUR
    return video


def assert_square_tracked(video: np.ndarray) -> None:
    """The bright square's centre is where :func:`square_origin` put it, frame by frame."""
    for t, frame in enumerate(video):
        rows, cols = np.nonzero(frame[..., 0] > 128)
        row, col = square_origin(t)
        centre = (row + (SQUARE - 1) / 2, col + (SQUARE - 1) / 2)
        assert abs(rows.mean() - centre[0]) < 0.5 and abs(cols.mean() - centre[1]) < 0.5, f"frame {t}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse)) if mse else float("inf")


def leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", [(24, 48, 64), (7, 33, 45)])
def test_png_folder_round_trip_is_exact(tmp_path, shape):
    video = moving_square(*shape)
    assert write_frames(tmp_path / "frames", video) == tmp_path / "frames"
    names = leftovers(tmp_path / "frames")
    assert names[:2] == ["frame_00000.png", "frame_00001.png"] and len(names) == shape[0]
    np.testing.assert_array_equal(read_frames(tmp_path / "frames"), video)
    assert leftovers(tmp_path) == ["frames"]


def test_gif_round_trip_is_exact_for_few_colours_and_keeps_identical_frames(tmp_path):
    video = moving_square()
    video[10:14] = video[9]  # a pause: identical frames must not be merged
    write_video(tmp_path / "a.gif", video, fps=25)
    back = read_frames(tmp_path / "a.gif")
    np.testing.assert_array_equal(back, video)
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.info["loop"] == 0 and gif.info["duration"] == 40
    assert leftovers(tmp_path) == ["a.gif"]


def test_gif_of_many_colours_is_close(tmp_path):
    ramp = np.linspace(0, 255, 64)
    frame = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1)
    video = np.stack([np.roll(frame, 4 * t, axis=1) for t in range(6)]).astype(np.uint8)  # 64 x 64, > 256 colours
    write_video(tmp_path / "ramp.gif", video, fps=10)
    back = read_frames(tmp_path / "ramp.gif")
    assert back.shape == video.shape
    assert np.abs(back.astype(int) - video).mean() < 6 and psnr(back, video) > 30


def test_mp4_round_trip_is_close_with_same_count_size_and_order(tmp_path):
    video = moving_square()
    write_video(tmp_path / "a.mp4", video, fps=24)
    back = read_frames(tmp_path / "a.mp4")
    assert back.shape == video.shape
    assert psnr(back, video) > 30
    assert_square_tracked(back)
    assert leftovers(tmp_path) == ["a.mp4"]


def test_mp4_pads_odd_sizes_with_a_warning(tmp_path):
    video = moving_square(7, 33, 45)
    with pytest.warns(CTGridItWarning, match="34x46"):
        write_video(tmp_path / "odd.mp4", video, fps=30)
    back = read_frames(tmp_path / "odd.mp4")
    assert back.shape == (7, 34, 46, 3)
    assert psnr(back[:, :33, :45], video) > 30
    assert_square_tracked(back)


def test_square_is_found_where_it_was_drawn_after_every_format(tmp_path):
    video = moving_square()
    write_frames(tmp_path / "frames", video)
    write_video(tmp_path / "a.gif", video)
    for source in ("frames", "a.gif"):
        assert_square_tracked(read_frames(tmp_path / source))


def test_sequence_round_trip_is_exact_on_every_uint8_value():
    video = np.arange(256 * 4 * 3, dtype=np.int64).reshape(4, 16, 16, 3) % 256
    video = video.astype(np.uint8)
    sequence = frames_to_sequence(video)
    assert sequence.dtype == torch.float32 and sequence.shape == (4, 3, 16, 16)
    assert sequence.min() == -1 and sequence.max() == 1
    assert sequence[0, 1, 0, 0] == video[0, 0, 0, 1] / 127.5 - 1  # channel order: RGB -> C
    np.testing.assert_array_equal(sequence_to_frames(sequence), video)


def test_sequence_to_frames_clamps_and_rounds():
    sequence = torch.tensor([-3.0, -1.0, 0.0, 0.999, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert sequence_to_frames(sequence)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_video_adapter_load_and_save(tmp_path):
    video = moving_square()
    write_frames(tmp_path / "frames", video)
    adapter = VideoFiles(every=2, max_frames=5, fps=12)
    sequence = adapter.load(tmp_path / "frames")
    assert sequence.shape == (5, 3, 48, 64)
    np.testing.assert_array_equal(sequence_to_frames(sequence), video[0:10:2])
    adapter.save(sequence, tmp_path / "out")
    adapter.save(sequence, tmp_path / "out.gif")
    np.testing.assert_array_equal(read_frames(tmp_path / "out"), video[0:10:2])
    np.testing.assert_array_equal(read_frames(tmp_path / "out.gif"), video[0:10:2])


# --------------------------------------------------------------------------- reading options


def test_natural_order_and_non_frames_ignored(tmp_path):
    names = ["frame10.png", "frame2.png", "Frame1.png", "frame1b.png", "frame002a.png"]  # 1, 1b, 2, 002a, 10
    for value, name in zip((40, 30, 0, 10, 20), names):
        Image.new("RGB", (4, 3), (value, value, value)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".hidden.png").write_bytes(b"macOS resource fork")
    (tmp_path / "sub.png").mkdir()
    frames = read_frames(tmp_path)
    assert frames[:, 0, 0, 0].tolist() == [0, 10, 30, 20, 40]


def test_grayscale_rgba_and_16_bit_frames_become_rgb(tmp_path):
    Image.new("L", (5, 4), 100).save(tmp_path / "0.png")
    Image.new("RGBA", (5, 4), (1, 2, 3, 0)).save(tmp_path / "1.png")
    Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(tmp_path / "2.png")
    frames = read_frames(tmp_path)
    assert frames.shape == (3, 4, 5, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0].tolist() == [[100] * 3, [1, 2, 3], [255] * 3]


def test_resize_subsample_and_limit(tmp_path):
    write_video(tmp_path / "a.mp4", moving_square())
    assert read_frames(tmp_path / "a.mp4", size=24).shape == (24, 24, 32, 3)  # short side
    assert read_frames(tmp_path / "a.mp4", size=(30, 20), every=5).shape == (5, 30, 20, 3)
    assert read_frames(tmp_path / "a.mp4", every=5, max_frames=2).shape == (2, 48, 64, 3)
    half = read_frames(tmp_path / "a.mp4", size=24, every=3)
    rows, cols = np.nonzero(half[0, ..., 0] > 128)  # square of frame 0 at rows 4..11, columns 2..9
    assert abs(rows.mean() - 3.75) < 0.5 and abs(cols.mean() - 2.75) < 0.5


@pytest.mark.parametrize("options", [dict(size=0), dict(size=(10,)), dict(size=True), dict(every=0),
                                     dict(max_frames=0), dict(every=1.5)])
def test_bad_read_options_are_value_errors(tmp_path, options):
    with pytest.raises(ValueError):
        read_frames(tmp_path, **options)


# --------------------------------------------------------------------------- bad inputs


def refused(call, path, *phrases: str) -> CTGridItError:
    with pytest.raises(CTGridItError) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for phrase in phrases:
        assert phrase in message
    return caught.value


def test_missing_empty_and_unsupported_inputs(tmp_path):
    refused(lambda: read_frames(tmp_path / "nope.mp4"), tmp_path / "nope.mp4", "no such file")
    (tmp_path / "empty").mkdir()
    refused(lambda: read_frames(tmp_path / "empty"), tmp_path / "empty", "no frame images")
    (tmp_path / "a.txt").write_text("text")
    refused(lambda: read_frames(tmp_path / "a.txt"), tmp_path / "a.txt", "unsupported")
    Image.new("RGB", (4, 4)).save(tmp_path / "one.png")
    refused(lambda: read_frames(tmp_path / "one.png"), tmp_path / "one.png", "single image")


@pytest.mark.parametrize("name, content", [("garbage.mp4", os.urandom(4096)), ("empty.mkv", b""),
                                           ("bad.gif", b"GIF89a broken"), ("half.mp4", None)])
def test_corrupt_videos_are_refused(tmp_path, name, content):
    if content is None:  # the first half of a real file
        write_video(tmp_path / "whole.mp4", moving_square())
        content = (tmp_path / "whole.mp4").read_bytes()[:1500]
    (tmp_path / name).write_bytes(content)
    refused(lambda: read_frames(tmp_path / name), tmp_path / name, "cannot")


def test_corrupt_and_mixed_size_frames_name_the_file(tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "f0.png")
    Image.new("RGB", (8, 7)).save(tmp_path / "f1.png")
    refused(lambda: read_frames(tmp_path), tmp_path / "f1.png", "7x8", "6x8")
    (tmp_path / "f1.png").write_bytes(b"\x89PNG broken")
    refused(lambda: read_frames(tmp_path), tmp_path / "f1.png", "cannot read")


def test_existing_outputs_are_kept_without_force(tmp_path):
    video = moving_square(3)
    for name in ("a.mp4", "a.gif"):
        (tmp_path / name).write_bytes(b"keep")
        refused(lambda: write_video(tmp_path / name, video), tmp_path / name, "exists")
        assert (tmp_path / name).read_bytes() == b"keep"
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "frame_00000.png").write_bytes(b"keep")
    refused(lambda: write_frames(tmp_path / "frames", video), tmp_path / "frames", "exists")
    write_frames(tmp_path / "frames", video, force=True)
    assert len(leftovers(tmp_path / "frames")) == 3
    (tmp_path / "frames" / "mine.txt").write_text("user data")
    refused(lambda: write_frames(tmp_path / "frames", video, force=True), tmp_path / "frames", "other than")
    assert (tmp_path / "frames" / "mine.txt").exists()
    refused(lambda: write_video(tmp_path / "a.avi", video), tmp_path / "a.avi", "cannot write")
    assert leftovers(tmp_path) == ["a.gif", "a.mp4", "frames"]


def test_failed_writes_leave_nothing_behind(tmp_path, monkeypatch):
    video = moving_square(6)
    calls = {"n": 0}

    def fail_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", fail_on_third)
    refused(lambda: write_frames(tmp_path / "frames", video), tmp_path / "frames", "No space left")
    monkeypatch.undo()

    real_getdata = video_io.GifImagePlugin.getdata
    calls["n"] = 0

    def getdata_fails_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_getdata(*args, **kwargs)

    monkeypatch.setattr(video_io.GifImagePlugin, "getdata", getdata_fails_on_third)
    refused(lambda: write_video(tmp_path / "a.gif", video), tmp_path / "a.gif", "No space left")
    monkeypatch.setattr(video_io, "MP4_CODEC", "no_such_codec")
    with pytest.raises(ValueError, match="no_such_codec"):
        write_video(tmp_path / "a.mp4", video)
    assert leftovers(tmp_path) == []


def test_bad_frames_and_fps_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        write_video(tmp_path / "a.mp4", moving_square().astype(np.float32))
    with pytest.raises(ValueError):
        write_video(tmp_path / "a.mp4", moving_square()[..., :1])
    with pytest.raises(ValueError):
        write_video(tmp_path / "a.mp4", moving_square(), fps=0)
    with pytest.raises(ValueError):
        sequence_to_frames(torch.zeros(2, 1, 4, 4))
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- dependencies


def test_import_pulls_in_no_medical_library():
    code = ("import sys, ctgridit.video, ctgridit.video.synthesis, ctgridit.video.shapes; "
            "print([m for m in ('monai', 'nibabel', 'SimpleITK', 'pydicom', 'ctgridit.ct') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
