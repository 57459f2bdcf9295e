"""Training data throughput: grids (stage 1) and frame pairs (stage 2) per second per core, from raw
volumes and from a prepared cache, side by side.

    python pipelines/bench_data.py                                   # shared chest scans, 1 core
    python pipelines/bench_data.py --config pipelines/configs/ctrate_xl.yaml --cache /data/cache

Without ``--config``, the benchmark prepares the shared chest scans of
``../shared/data/ct`` as the CT-RATE setting does (0.75 x 0.75 x 1.5 mm,
512 x 512 frames, 2 x 2 grids of 256 x 256) into a temporary cache. Raw: every
item reads, rescales, orients and resamples its whole volume, as a lazy loader
without a cache must. Cached: every item reads its frames from the memory map.
One process, one thread (``torch.set_num_threads(1)``): the figures are per core.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ctgridit.data_folder import data_folder
from ctgridit.training.config import TrainConfig, load_config
from ctgridit.training.trainer import build_dataset, build_sequences, prepare, source_sequences

DATA = data_folder()


def rate(dataset, seconds: float, limit: int) -> float:
    """Items per second over at least ``seconds`` (and at most ``limit`` items)."""
    dataset[0]
    began, n = time.perf_counter(), 0
    while n < limit and (n < 3 or time.perf_counter() - began < seconds):
        dataset[1 + n]
        n += 1
    return n / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a training config (default: the CT-RATE setting on shared scans)")
    parser.add_argument("--cache", default=None, help="the cache folder (default: data.cache, else a temporary one)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time each measurement at least this long")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.config:
        config = load_config(args.config)
    else:
        config = TrainConfig(name="bench", frame_size=[512, 512], grid={"rows": 2, "cols": 2, "stride": 1, "factor": 2})
        config.data.kind, config.data.spacing = "ct", [0.75, 0.75, 1.5]
        config.data.paths = [str(DATA / "lidc_idri"), str(DATA / "lung_pet_ct_dx")]
        config.data.stride_range = [1, 3]
    config.data.cache = args.cache or config.data.cache or tempfile.mkdtemp(prefix="ctgridit-cache-")
    began = time.perf_counter()
    report = prepare(config, workers=1, quiet=True)
    print(f"cache {config.data.cache}: {report.done} sequences ({report.prepared} prepared now, "
          f"{time.perf_counter() - began:.0f} s)")
    raw, cached = source_sequences(config), build_sequences(config)
    print(f"{'items':14}{'raw /s':>10}{'cached /s':>11}{'speed-up':>10}   (one core; target >= 100 grids/s cached)")
    for stage, name in ((1, "grids"), (2, "frame pairs")):
        r = rate(build_dataset(config, stage, raw, 1, 0), args.seconds, 50)
        c = rate(build_dataset(config, stage, cached, 1, 0), args.seconds, 100_000)
        print(f"{name:14}{r:>10.2f}{c:>11.1f}{c / r:>9.0f}x")


if __name__ == "__main__":
    main()
