"""The arithmetic a model runs in at inference: float32, or bfloat16 autocast where the hardware has it.

``auto`` runs the network's matrix products in bfloat16 (``torch.autocast``) on CPUs with Intel AMX tiles, which
do them in hardware (the bundled denoiser's windows 1.7 to 1.9 times faster than in float32 on one core of this
project's Xeon, ``pipelines/bench_denoise.py``), and in float32 everywhere else, where bfloat16 would be
emulated and slower. Autocast keeps what needs the range or the precision in float32 (the inputs, the
sinusoidal embedding of a fractional diffusion step, normalisation, the output the caller reads), so the model's
weights and the caller's tensors stay float32; only the products are rounded (about 0.5 % relative change in a
prediction). On a CUDA GPU ``auto`` leaves the pipeline's own dtype alone (``--dtype`` casts it there).
"""

from __future__ import annotations

import contextlib

import torch

#: What ``--precision`` takes.
PRECISIONS = ("auto", "fp32", "bf16")


def hardware_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CPU with AMX tiles (Sapphire Rapids and
    later), or a CUDA GPU that supports bfloat16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)               # private in torch 2.x: guarded
    try:
        return bool(probe()) if probe is not None else False
    except Exception:                                                          # noqa: BLE001 - no probe, no AMX
        return False


def resolve_precision(device: torch.device | str, precision: str = "auto") -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device`` (``auto``: bf16 on CPUs with AMX)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cpu" and hardware_bf16(device) else "fp32"


def inference_precision(device: torch.device | str, precision: str = "auto") -> contextlib.AbstractContextManager:
    """A context in which the model calls run at ``precision`` on ``device`` (:func:`resolve_precision`)."""
    device = torch.device(device)
    if resolve_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
