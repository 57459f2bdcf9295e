"""Sizes ctgridit refuses, because the result would be no CT or the work would never end."""

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


def check_memory(voxels: int, path, what: str = "the volume") -> None:
    """Refuse to read ``voxels`` voxels when their float32 copies (about 3 of them while reading and
    converting) would not fit in the available memory."""
    from ctgridit.errors import CTGridItError

    needed = 12 * int(voxels)
    free = available_memory()
    if free is not None and needed > free:
        raise CTGridItError(f"{what} is too large: {voxels:,} voxels need about {gigabytes(needed)} of memory, "
                            f"{gigabytes(free)} are available", path, "read it on a machine with more memory, or crop it")
