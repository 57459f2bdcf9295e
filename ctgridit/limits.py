"""Sizes ctgridit refuses, because the result would be no CT, the work would never end, or memory would run out."""

import contextlib
import contextvars
from collections.abc import Callable, Iterator

#: A volume needs at least two slices to be 3D (readers refuse fewer), and ``synth`` makes at most this many
#: (3 m of 1.5 mm slices; longer runs are scripts, not a command).
MIN_SLICES = 2
MAX_SLICES = 2000
#: ``synth`` makes video clips of this many frames.
MIN_FRAMES = 1
MAX_FRAMES = 10_000

#: A zip of a DICOM series may hold at most this many files, this many bytes once extracted, and be
#: compressed at most this many times (DICOM compresses 2 to 5 times; a zip bomb thousands of times).
MAX_ZIP_FILES = 100_000
MAX_ZIP_BYTES = 16 * 2**30
MAX_ZIP_RATIO = 200


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gigabytes(n: float) -> str:
    """A byte count for people: ``8.0 GB``, ``740 MB``, ``3 KB``."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if unit == "GB" else f"{n / size:.0f} {unit}"
    return f"{int(n)} bytes"


#: What the running command will make from the volume it reads: ``(shape) -> (bytes, what)`` (:func:`planned_output`).
_OUTPUT: contextvars.ContextVar[Callable[[tuple[int, ...]], tuple[int, str]] | None] = \
    contextvars.ContextVar("ctgridit_planned_output", default=None)


@contextlib.contextmanager
def planned_output(plan: Callable[[tuple[int, ...]], tuple[int, str]]) -> Iterator[None]:
    """While reading an input inside this block, :func:`check_memory` also counts what the command will make of
    it: ``plan(shape)`` gives the bytes and a few words for the message (e.g. 16 times as many slices), so a
    result that cannot fit is refused from the header, before a voxel is read."""
    token = _OUTPUT.set(plan)
    try:
        yield
    finally:
        _OUTPUT.reset(token)


def check_memory(voxels: int, path, what: str = "the volume", shape: tuple[int, ...] | None = None) -> None:
    """Refuse to read ``voxels`` voxels (of ``shape``) when their float32 copies (about 3 of them while reading
    and converting), with what the command will make of them (:func:`planned_output`), would not fit in the
    available memory."""
    from ctgridit.errors import CTGridItError

    needed = 12 * int(voxels)
    plan = _OUTPUT.get()
    made, made_what = plan(tuple(shape)) if plan is not None and shape is not None else (0, "")
    free = available_memory()
    if free is not None and needed + made > free:
        if made:
            raise CTGridItError(f"{what} is too large for this: {voxels:,} voxels, and {made_what}, need about "
                                f"{gigabytes(needed + made)} of memory, {gigabytes(free)} are available", path,
                                "ask for less (fewer slices, a smaller factor), crop the scan, or use a machine "
                                "with more memory")
        raise CTGridItError(f"{what} is too large: {voxels:,} voxels need about {gigabytes(needed)} of memory, "
                            f"{gigabytes(free)} are available", path, "read it on a machine with more memory, or crop it")
