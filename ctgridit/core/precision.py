"""The arithmetic a model runs in at inference: float32, or its matrix products in bfloat16 (autocast).

``auto`` is bfloat16 autocast on CPUs that multiply bfloat16 in hardware, with Intel AMX tiles or AVX-512 BF16
(the bundled denoiser's windows 1.7 to 1.9 times faster than in float32 on one core of a Xeon with AMX, 1.5 times
on one core of an AMD EPYC with AVX-512 BF16), and float32 everywhere else: on other CPUs bfloat16 would be
emulated and slower, and on GPUs the pipeline's own dtype decides (``ctgridit synth --dtype``). Autocast rounds only the products; the weights and the caller's tensors
stay float32, normalisation and the sinusoidal embedding of a fractional diffusion step run in float32, and the
model's last layer runs in float32 too (:class:`~ctgridit.core.dit.FinalLayer`), so the prediction the caller
reads is float32 (the bundled denoiser's output moves by about 0.2 HU RMS). Callers wrap the model calls only,
not resampling or other arithmetic around them, which autocast would round as well.
"""

from __future__ import annotations

import contextlib

import torch

from ctgridit.errors import CTGridItError

#: What ``--precision`` takes.
PRECISIONS = ("auto", "fp32", "bf16")


def hardware_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` is a CPU that multiplies bfloat16 in hardware: Intel AMX tiles (Sapphire Rapids and
    later) or AVX-512 BF16 dot products (Cooper Lake, AMD Zen 4 and later)."""
    if torch.device(device).type != "cpu":
        return False
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):     # private in torch 2.x: guarded
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and bool(probe()):
                return True
        except Exception:                                                      # noqa: BLE001 - no probe, no bf16
            pass
    return False


def resolve_precision(device: torch.device | str, precision: str = "auto") -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device`` (``auto``: bf16 on CPUs with bfloat16 in
    hardware). Asked for bf16 where autocast cannot give it (a GPU without bfloat16, or another kind of device), a
    CTGridItError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if hardware_bf16(device) else "fp32"
    if precision == "bf16" and not (device.type == "cpu" or (device.type == "cuda" and _cuda_bf16())):
        raise CTGridItError(f"this {device.type} device has no bfloat16 arithmetic", "--precision",
                            "use --precision fp32 or auto")
    return precision


def _cuda_bf16() -> bool:
    """Whether the current CUDA GPU does bfloat16 natively (Ampere and later)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:                                                          # torch before 2.4: no keyword
        return torch.cuda.get_device_capability()[0] >= 8


def inference_precision(device: torch.device | str, precision: str = "auto") -> contextlib.AbstractContextManager:
    """A context in which model calls run at ``precision`` on ``device`` (:func:`resolve_precision`); ``fp32``
    also turns off an autocast the caller may be in."""
    device = torch.device(device)
    if resolve_precision(device, precision) == "fp32":
        return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else \
            contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
