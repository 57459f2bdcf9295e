"""Reading and writing videos as uint8 RGB frames.

Conventions
-----------
- Frames are ``numpy.uint8`` arrays of shape ``(T, H, W, 3)``, RGB, frame 0
  first, row 0 at the top of the picture.
- A video is read from a folder of frame images (``.png .jpg .jpeg .bmp
  .webp``, in natural order: ``frame2`` before ``frame10``; hidden files are
  ignored), a video file (``.mp4 .avi .mov .mkv .webm``, decoded by FFmpeg
  through imageio's ``pyav`` plugin) or a ``.gif`` (decoded by Pillow).
- Grayscale, palette and RGBA images become RGB; an alpha channel is dropped,
  not composited. 16-bit grayscale images are scaled to 8 bits
  (``round(v / 257)``); 32-bit integer and float images are refused.
- Videos are written as ``.mp4`` (H.264, ``yuv420p``, constant frame rate),
  ``.gif`` (one adaptive palette per frame, looping forever) or a folder of
  PNG files, always atomically: a failed write leaves nothing behind.

Problems with the user's files raise :class:`~ctgridit.errors.CTGridItError`
naming the file; wrong arguments from a caller raise :class:`ValueError`.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import re
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import imageio.v3 as iio
import numpy as np
from PIL import GifImagePlugin, Image, ImageSequence

from ctgridit.errors import CTGridItError, CTGridItWarning
from ctgridit.files import atomic_folder, atomic_output

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
GIF_SUFFIX = ".gif"

DEFAULT_FPS = 24.0
RESAMPLE = Image.Resampling.LANCZOS  # antialiased when shrinking, sharp when enlarging
MP4_CODEC = "libx264"
MP4_PIXEL_FORMAT = "yuv420p"  # what every player decodes; needs an even width and height
MP4_CRF = 18  # x264 constant quality: 0 lossless, 23 default, 18 near transparent
GIF_LOOP = 0  # loop forever
FRAME_DIGITS = 5  # frame_00000.png; more digits when there are more frames
FRAME_PATTERN = re.compile(r"frame_\d+\.png")

Size = int | tuple[int, int]


# --------------------------------------------------------------------------- reading


def read_frames(path: str | os.PathLike, size: Size | None = None, max_frames: int | None = None,
                every: int = 1) -> np.ndarray:
    """Read a video as uint8 RGB frames ``(T, H, W, 3)``.

    Args:
        path: a folder of frame images, a video file or a GIF (see the module doc).
        size: resize every frame: ``(H, W)`` exactly, or an int for the short
            side (the long side keeps the aspect ratio, rounded). Lanczos
            resampling. ``None`` keeps the size.
        max_frames: keep at most this many frames, counted after subsampling.
        every: temporal subsampling, keep frames ``0, every, 2 * every, ...``.

    Raises:
        CTGridItError: the path is missing, not a supported format, empty,
            unreadable, or its frames differ in size.
    """
    _check_read_options(size, max_frames, every)
    source = Path(path)
    stop = None if max_frames is None else (max_frames - 1) * every + 1
    return _stack(_source_frames(source, stop, every), source, size)


def video_clips(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The clips that ``paths`` name: each path itself, except a folder of video files (and no frame
    images), which stands for its ``.mp4 .avi .mov .mkv .webm .gif`` files in natural order."""
    clips: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            entries = _folder_files(path)
            videos = [p for p in entries if p.suffix.lower() in VIDEO_SUFFIXES + (GIF_SUFFIX,)]
            if videos and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries):
                clips += sorted(videos, key=natural_key)
                continue
        clips.append(path)
    return clips


def frame_rate(path: str | os.PathLike) -> float | None:
    """Frames per second a video file or GIF records (a GIF: from its first frame's duration); None for a
    folder of frame images or a file that records none."""
    source = Path(path)
    try:
        if source.suffix.lower() == GIF_SUFFIX:
            with Image.open(source) as gif:
                duration = gif.info.get("duration")
            return 1000.0 / duration if duration else None
        if source.suffix.lower() in VIDEO_SUFFIXES:
            fps = iio.immeta(source, plugin="pyav").get("fps")
            return float(fps) if fps else None
    except (OSError, ValueError, av.error.FFmpegError) as err:
        raise CTGridItError("cannot read the frame rate", source, "check that the file is a complete video") from err
    return None


def _check_read_options(size: Size | None, max_frames: int | None, every: int) -> None:
    pair = isinstance(size, (tuple, list)) and len(size) == 2 and all(_positive_int(s) for s in size)
    if not (size is None or _positive_int(size) or pair):
        raise ValueError(f"size must be a positive int or a (height, width) pair, got {size!r}")
    if max_frames is not None and not _positive_int(max_frames):
        raise ValueError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    if not _positive_int(every):
        raise ValueError(f"every must be a positive integer, got {every!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _source_frames(source: Path, stop: int | None, every: int) -> Iterator[tuple[Path, np.ndarray]]:
    """The selected frames of ``source``, each with the file it comes from."""
    if source.is_dir():
        return ((image, _read_image(image)) for image in _frame_files(source)[:stop:every])
    if not source.exists():
        raise CTGridItError("no such file or folder", source, "check the path")
    suffix = source.suffix.lower()
    if suffix == GIF_SUFFIX:
        decoded = _gif_frames(source)
    elif suffix in VIDEO_SUFFIXES:
        decoded = _video_frames(source)
    elif suffix in IMAGE_SUFFIXES:
        raise CTGridItError("is a single image, not a video", source, "give the folder that holds the frame images")
    else:
        raise CTGridItError(f"unsupported video format {suffix or '(no suffix)'}", source,
                            f"give a folder of frame images or a {', '.join(VIDEO_SUFFIXES + (GIF_SUFFIX,))} file")
    return ((source, frame) for frame in itertools.islice(decoded, 0, stop, every))


def _frame_files(folder: Path) -> list[Path]:
    """The frame images of ``folder`` in natural order."""
    files = [p for p in _folder_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise CTGridItError(f"no frame images ({', '.join(IMAGE_SUFFIXES)}) in the folder", folder,
                            "give a folder of frame images or a video file")
    return sorted(files, key=natural_key)


def _folder_files(folder: Path) -> list[Path]:
    """The files of ``folder``, hidden ones left out."""
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()]
    except OSError as err:
        raise CTGridItError(f"cannot list the folder ({err.strerror or err})", folder,
                            "check its permissions") from err


def natural_key(path: Path) -> tuple[list[str | int], str]:
    """Sort key that orders numbers by value: ``frame2 < frame10``, case-insensitive.

    Names that differ only in leading zeros or case (``f1``, ``F01``) keep a fixed order.
    """
    parts = re.split(r"(\d+)", path.name.lower())  # text, number, text, number, ..., text
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], path.name


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return _image_to_rgb(image, path)
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's errors for broken files
        raise CTGridItError("cannot read the image", path, "check that the file is a complete image") from err


def _image_to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """An 8-bit RGB array ``(H, W, 3)`` from any Pillow image (see the module doc)."""
    if image.mode.startswith("I;16"):
        gray = np.rint(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        raise CTGridItError(f"has {image.mode} pixels (32-bit), not 8 or 16 bits", path,
                            "save the frames as 8-bit images")
    return np.asarray(image.convert("RGB"))


def _gif_frames(path: Path) -> Iterator[np.ndarray]:
    """The frames of a GIF as Pillow composes them (disposal and local palettes applied)."""
    try:
        with Image.open(path) as gif:
            for frame in ImageSequence.Iterator(gif):
                yield np.asarray(frame.convert("RGB"))
    except (OSError, EOFError, SyntaxError, ValueError) as err:
        raise CTGridItError("cannot read the GIF", path, "check that the file is a complete GIF") from err


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    """The frames of a video file, decoded by FFmpeg, in presentation order."""
    try:
        with iio.imopen(path, "r", plugin="pyav") as video:
            yield from video.iter(format="rgb24")
    except (OSError, ValueError, av.error.FFmpegError) as err:
        raise CTGridItError("cannot be decoded as a video", path,
                            "check that the file is a complete, valid video") from err


def _stack(frames: Iterable[tuple[Path, np.ndarray]], source: Path, size: Size | None) -> np.ndarray:
    """Check that all frames have one size, resize them, stack them to ``(T, H, W, 3)``."""
    out: list[np.ndarray] = []
    first_shape = None
    for where, frame in frames:
        first_shape = first_shape or frame.shape
        if frame.shape != first_shape:
            raise CTGridItError(f"frame of {frame.shape[0]}x{frame.shape[1]} pixels, the first frame is "
                                f"{first_shape[0]}x{first_shape[1]}", where,
                                "all frames must have the same size")
        out.append(_resize(frame, size))
    if not out:
        raise CTGridItError("contains no frames", source, "give a video with at least one frame")
    return np.stack(out)


def _resize(frame: np.ndarray, size: Size | None) -> np.ndarray:
    """Resize one uint8 ``(H, W, 3)`` frame to ``size`` (see :func:`read_frames`)."""
    height, width = frame.shape[:2]
    target = _target_size(height, width, size)
    if target == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize(target[::-1], RESAMPLE))


def _target_size(height: int, width: int, size: Size | None) -> tuple[int, int]:
    """The ``(H, W)`` a frame of ``height x width`` gets for ``size``."""
    if size is None:
        return height, width
    if not isinstance(size, int):
        return tuple(size)
    scale = size / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


# --------------------------------------------------------------------------- writing


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = DEFAULT_FPS,
                force: bool = False) -> Path:
    """Write uint8 RGB frames ``(T, H, W, 3)`` as an ``.mp4`` or ``.gif`` file, atomically.

    - ``.mp4``: H.264 in ``yuv420p`` at constant quality ``MP4_CRF``. H.264
      4:2:0 needs an even width and height: odd sizes are padded by one
      row/column at the bottom/right, repeating the edge, with a
      :class:`CTGridItWarning`; the file then reads back one pixel larger.
    - ``.gif``: every frame keeps its own adaptive palette (256 colours,
      median cut, no dithering), so frames with at most 256 colours are
      stored exactly; smooth gradients get some banding (about 34 dB).
      Identical frames are all kept. GIF delays are whole 1/100 s: the rate
      is rounded (24 fps plays at 25 fps) and most viewers slow down delays
      under 2/100 s (above 50 fps).

    Use :func:`write_frames` for a folder of PNG files.
    """
    out = Path(path)
    frames = check_frames(frames)
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    suffix = out.suffix.lower()
    if suffix == ".mp4":
        frames = _pad_to_even(frames, out)
        writer = _write_mp4
    elif suffix == GIF_SUFFIX:
        writer = _write_gif
    else:
        raise CTGridItError(f"cannot write {suffix or 'a file without suffix'} videos", out,
                            "use .mp4 or .gif, or write a folder of PNG frames")
    with atomic_output(out, force=force) as tmp:
        writer(tmp, frames, fps)
    return out


def check_frames(frames: np.ndarray) -> np.ndarray:
    """Return ``frames`` if it is a non-empty uint8 ``(T, H, W, 3)`` array, else raise ValueError."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
            or frames.shape[-1] != 3 or 0 in frames.shape:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"frames must be a non-empty uint8 array (T, H, W, 3), got {type(frames).__name__} "
                         f"{getattr(frames, 'dtype', '')} {shape}")
    return frames


def _pad_to_even(frames: np.ndarray, out: Path) -> np.ndarray:
    height, width = frames.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if not (pad_h or pad_w):
        return frames
    warnings.warn(CTGridItWarning(f"{out}: H.264 needs an even frame size; {height}x{width} frames padded to "
                                  f"{height + pad_h}x{width + pad_w} by repeating the last row/column"),
                  stacklevel=3)
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _write_mp4(tmp: Path, frames: np.ndarray, fps: float) -> None:
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(MP4_CODEC, rate=Fraction(float(fps)).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = MP4_PIXEL_FORMAT
        stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def _write_gif(tmp: Path, frames: np.ndarray, fps: float) -> None:
    """Write every frame, identical ones included (``Image.save`` would merge those).

    Uses Pillow's documented frame-level GIF helpers ``getheader`` / ``getdata``.
    """
    duration_ms = 10 * max(1, round(100 / fps))  # GIF delays are whole centiseconds
    with open(tmp, "wb") as fp:
        for index, frame in enumerate(frames):
            image = Image.fromarray(frame).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
            if index == 0:
                header, _ = GifImagePlugin.getheader(image, info={"loop": GIF_LOOP})
                fp.write(b"".join(header))
            fp.write(b"".join(GifImagePlugin.getdata(image, duration=duration_ms, include_color_table=True)))
        fp.write(b";")  # GIF trailer


def write_frames(folder: str | os.PathLike, frames: np.ndarray, force: bool = False) -> Path:
    """Write uint8 RGB frames ``(T, H, W, 3)`` as ``folder/frame_00000.png, ...``, atomically.

    The folder counterpart of :func:`ctgridit.files.atomic_output` (which
    handles single files): the PNG files are written to a hidden staging
    folder next to ``folder``, which is renamed to ``folder`` once all are
    written and removed on any error. An existing non-empty ``folder`` is
    replaced only with ``force`` and only if it holds nothing but
    ``frame_*.png`` files, so that a mistyped path never deletes other data.
    Frames are numbered from 0 with at least ``FRAME_DIGITS`` digits.
    """
    out = Path(folder)
    frames = check_frames(frames)
    check_frames_folder(out, force)
    digits = max(FRAME_DIGITS, len(str(len(frames) - 1)))
    with atomic_folder(out) as staging:
        for index, frame in enumerate(frames):
            Image.fromarray(frame).save(staging / f"frame_{index:0{digits}d}.png", format="PNG")
    return out


def check_frames_folder(out: Path, force: bool = False) -> None:
    """Refuse, before any work, a PNG frames folder :func:`write_frames` would refuse."""
    if out.exists() and not out.is_dir():
        raise CTGridItError("is a file, not a folder", out, "give a folder name for the PNG frames")
    if not out.parent.is_dir():
        raise CTGridItError("output folder does not exist", out.parent, "create it first")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CTGridItError("output folder exists and is not empty", out,
                                "pass --force to replace it or choose another name")
        if not all(FRAME_PATTERN.fullmatch(p.name) for p in out.iterdir()):
            raise CTGridItError("output folder holds files other than frame_*.png; not replaced", out,
                                "choose another folder")
