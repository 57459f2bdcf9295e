"""Choosing the torch device from ``--device auto|cpu|cuda|cuda:N|mps``."""

from __future__ import annotations

import os

import torch

from ctgridit.errors import CTGridItError


def resolve_device(name: str = "auto") -> torch.device:
    """The device to run on; ``auto`` takes CUDA, then MPS, then the CPU.

    An explicit accelerator that is not available is an error (the same rule
    for synthesis, denoising and training): ``auto`` is the way to say "a GPU
    if there is one".
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CTGridItError(f"unknown device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CTGridItError(f"--device {name}: no CUDA GPU is visible", hint="use --device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CTGridItError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) visible",
                                hint="use cuda:0 .. cuda:N-1")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CTGridItError(f"--device {name}: MPS is not available", hint="use --device auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CTGridItError(f"unsupported device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process when started by torchrun (or accelerate), else ``(0, 1)``."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def process_device(name: str = "auto") -> str:
    """``name`` for this process: under torchrun with several GPUs, ``auto`` and ``cuda`` mean this
    process's own GPU (``cuda:LOCAL_RANK``)."""
    _, world = process_rank()
    if world > 1 and name in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return name
