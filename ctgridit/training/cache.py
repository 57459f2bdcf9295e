"""A cache of prepared training frames: ``ctgridit prepare`` writes it, training reads it.

Preparing a CT volume (reading, rescaling, orienting, resampling to the
training spacing, windowing) takes seconds to minutes; a training step needs
four slices of it. So the data are prepared once, in parallel and resumably,
into a folder of memory-mapped arrays, one per sequence:

    cache/
      cache.json          what was prepared from what: the data settings, and per sequence
                          its name, file, frame count, frame size and own slice spacing;
                          the sequences that failed, with the reason
      seq_000000.npy      int16 frames (N, C, H, W): round(x * SCALE) for x in [-1, 1]
      ...

A grid then reads only its four frames from the memory map
(:meth:`CachedSequences.frames`). Frames are stored as int16 at a step of
1 / 16384 of the [-1, 1] range (0.06 HU for the default window): exact enough,
half the size of float32. numpy's ``.npy`` format is the container (a header
and the raw array: any tool reads it).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ctgridit.errors import CTGridItError
from ctgridit.files import atomic_output

INDEX_FILE = "cache.json"
SCALE = 16384
VERSION = 1


@dataclass(frozen=True)
class PrepareReport:
    """What :func:`prepare_cache` did."""

    done: int          # sequences in the cache
    prepared: int      # of which prepared by this run (the others were there already)
    failed: list       # (name, reason) of the sequences that could not be prepared


def frames_to_int16(frames: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` frames in [-1, 1] as the cache's int16."""
    return np.rint(frames.clamp(-1, 1).numpy().astype(np.float32) * SCALE).astype(np.int16)


def prepare_cache(sequences, folder: str | os.PathLike, settings: dict, workers: int = 1,
                  progress: Callable[[int, int], None] | None = None,
                  report_failure: Callable[[str, str], None] | None = None) -> PrepareReport:
    """Write every sequence of a lazy loader into the cache ``folder`` (module docstring).

    ``sequences`` has ``__len__``, ``name(i)`` and ``load(i) -> (frames, slice spacing)``
    and must be picklable for ``workers > 1`` (each worker prepares whole
    sequences). ``settings`` (the data settings that made the frames) is
    recorded; a cache made with other settings is refused. Sequences already
    in the cache are skipped, so an interrupted run continues where it
    stopped, unless their file is damaged (:func:`intact`: truncated, or not the
    recorded shape), which is prepared again; a sequence that fails is reported
    and skipped, never the run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = _read_index(folder)
    if index is not None and index["settings"] != settings:
        raise CTGridItError("holds frames prepared with other data settings", folder,
                            "prepare into another folder (or delete this one)")
    entries = {e["name"]: e for e in (index or {}).get("sequences", [])}
    names = [sequences.name(i) for i in range(len(sequences))]
    todo = [i for i, name in enumerate(names) if name not in entries or not intact(folder, entries[name])]
    for i in todo:
        entries.pop(names[i], None)                              # a damaged entry counts as not prepared
    failed: list[tuple[str, str]] = []
    done = len(names) - len(todo)

    def record(i: int, result) -> None:
        nonlocal done
        if isinstance(result, str):
            failed.append((names[i], result))
            if report_failure is not None:
                report_failure(names[i], result)
        else:
            entries[names[i]] = result
            _write_index(folder, settings, [entries[n] for n in names if n in entries], failed)
        done += 1
        if progress is not None:
            progress(done, len(names))

    if workers <= 1:
        for i in todo:
            record(i, _prepare_one(sequences, i, folder))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_prepare_one, sequences, i, folder): i for i in todo}
            for future in as_completed(futures):
                record(futures[future], future.result())
    _write_index(folder, settings, [entries[n] for n in names if n in entries], failed)
    return PrepareReport(len(names) - len(failed), len(todo) - len(failed), failed)


def intact(folder: Path, entry: dict) -> bool:
    """Whether a cache entry's file is there whole: an int16 ``.npy`` of the recorded frame count and shape, its
    data all in the file (a truncated file cannot be memory-mapped)."""
    try:
        data = np.load(folder / entry["file"], mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return False
    return data.dtype == np.int16 and list(data.shape) == [int(entry["num_frames"]), *map(int, entry["shape"])]


def _prepare_one(sequences, i: int, folder: Path):
    """Prepare sequence ``i`` into ``seq_{i}.npy``: its index entry, or the reason it failed (a string)."""
    torch.set_num_threads(1)
    name = sequences.name(i)
    try:
        frames, spacing = sequences.load(i)
        data = frames_to_int16(frames)
        file = f"seq_{i:06d}.npy"
        with atomic_output(folder / file, force=True) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, data)
    except CTGridItError as err:
        return err.one_line()
    except Exception as err:  # one bad volume must not end a run over thousands
        return f"{type(err).__name__}: {err}"
    return {"name": name, "file": file, "num_frames": int(data.shape[0]), "shape": list(data.shape[1:]),
            "slice_spacing": float(spacing)}


def _read_index(folder: Path) -> dict | None:
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CTGridItError(f"the cache index cannot be read ({err})", path, "prepare the cache again") from err
    if index.get("version") != VERSION:
        raise CTGridItError(f"cache version {index.get('version')}, this ctgridit reads {VERSION}", folder,
                            "prepare the cache again")
    return index


def _write_index(folder: Path, settings: dict, entries: list[dict], failed: list) -> None:
    index = {"version": VERSION, "scale": SCALE, "settings": settings, "sequences": entries,
             "failed": [{"name": n, "reason": r} for n, r in failed]}
    with atomic_output(folder / INDEX_FILE, force=True) as tmp:
        tmp.write_text(json.dumps(index, indent=1))


class CachedSequences:
    """A prepared cache as a lazy :class:`~ctgridit.training.datasets.FrameSequences` loader.

    ``settings``, if given, must equal those the cache was prepared with.
    Items and :meth:`frames` are float32 ``(N, C, H, W)`` in [-1, 1];
    ``num_frames`` and ``slice_spacings`` come from the index alone.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict | None = None) -> None:
        self.folder = Path(folder)
        index = _read_index(self.folder)
        if index is None:
            raise CTGridItError("is not a prepared cache (no cache.json)", self.folder,
                                "run `ctgridit prepare CONFIG` first")
        if settings is not None and index["settings"] != settings:
            raise CTGridItError("was prepared with other data settings than the config's", self.folder,
                                "run `ctgridit prepare CONFIG` again into another folder")
        self.entries = index["sequences"]
        if not self.entries:
            raise CTGridItError("holds no prepared sequence", self.folder, "check `ctgridit prepare`'s report")
        damaged = [e["file"] for e in self.entries if not intact(self.folder, e)]
        if damaged:
            raise CTGridItError(f"holds {len(damaged)} damaged file(s) ({', '.join(damaged[:3])}"
                                f"{', ...' if len(damaged) > 3 else ''}): truncated or not the recorded shape",
                                self.folder, "run `ctgridit prepare CONFIG` again: it prepares them anew")
        self.scale = float(index["scale"])
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, i: int) -> str:
        return self.entries[i]["name"]

    def num_frames(self, i: int) -> int:
        return int(self.entries[i]["num_frames"])

    @property
    def slice_spacings(self) -> list[float]:
        return [float(e["slice_spacing"]) for e in self.entries]

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:                                  # opened once per process (workers have their own)
            self._maps[i] = np.load(self.folder / self.entries[i]["file"], mmap_mode="r")
        return self._maps[i]

    def frames(self, i: int, indices) -> torch.Tensor:
        """Frames ``indices`` (a slice or a list) of sequence ``i``, read from the memory map only."""
        return torch.from_numpy(np.asarray(self._map(i)[indices], dtype=np.float32) / self.scale)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.frames(i, slice(None))

    def __getstate__(self) -> dict:                             # DataLoader workers open their own maps
        return {**self.__dict__, "_maps": {}}
