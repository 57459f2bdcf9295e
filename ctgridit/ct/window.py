"""HU windows, the one place of their arithmetic: named ranges, parsing, and the mapping to and from them.

:func:`to_unit` clips HU to a window and scales it to [0, 1] (pictures,
quality measures, classical filters); :func:`window_hu` maps it onto the
model's range [-1, 1] and :func:`unwindow_hu` back. They work on NumPy arrays
and torch tensors alike.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

from ctgridit.errors import CTGridItError

#: The model window of docs/METHOD.md section 1 (CT-RATE, GenerateCT): -1000..1000 HU.
DEFAULT_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
#: The range of the values the generic core works on.
MODEL_RANGE: tuple[float, float] = (-1.0, 1.0)

Array = TypeVar("Array")  # a NumPy array or a torch tensor


def to_unit(hu: Array, window: Sequence[float] = DEFAULT_WINDOW) -> Array:
    """HU clipped to ``window`` and scaled to [0, 1]."""
    low, high = window
    return (hu.clip(low, high) - low) / (high - low)


def from_unit(unit: Array, window: Sequence[float] = DEFAULT_WINDOW) -> Array:
    """The inverse of :func:`to_unit` on the window."""
    low, high = window
    return unit * (high - low) + low


def window_hu(hu: Array, window: Sequence[float] = DEFAULT_WINDOW,
              output_range: Sequence[float] = MODEL_RANGE) -> Array:
    """Clip HU to ``window`` and map it linearly onto ``output_range`` (the model's [-1, 1])."""
    a, b = output_range
    return to_unit(hu, window) * (b - a) + a


def unwindow_hu(x: Array, window: Sequence[float] = DEFAULT_WINDOW,
                output_range: Sequence[float] = MODEL_RANGE) -> Array:
    """The inverse of :func:`window_hu` on the window; ``x`` is first clipped to ``output_range``."""
    a, b = output_range
    return from_unit((x.clip(a, b) - a) / (b - a), window)

def window_change(filtered_hu: Array, hu: Array, window: Sequence[float] = DEFAULT_WINDOW) -> Array:
    """What a filter working on the window changed: ``filtered_hu`` minus ``hu`` clipped to ``window``.
    Added to the unclipped ``hu`` it keeps what lies outside the window as it was."""
    low, high = window
    return filtered_hu - hu.clip(low, high)


#: Usual radiology windows as (min, max) HU; level/width in the comments.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "wide": DEFAULT_WINDOW,            # the model's window
    "lung": (-1350.0, 150.0),          # level -600, width 1500
    "mediastinum": (-160.0, 240.0),    # level 40, width 400
    "soft": (-125.0, 225.0),           # level 50, width 350
    "bone": (-450.0, 1050.0),          # level 300, width 1500
}


def parse_window(text: str) -> tuple[float, float]:
    """A preset name (``lung``) or ``MIN:MAX`` in HU (``-1000:400``) to ``(min, max)``."""
    key = text.strip().lower()
    if key in WINDOW_PRESETS:
        return WINDOW_PRESETS[key]
    try:
        low, high = (float(v) for v in key.split(":"))
    except ValueError as err:
        raise CTGridItError(f"window {text!r} is not understood",
                            hint=f"use MIN:MAX in HU (e.g. -1000:400) or one of {', '.join(WINDOW_PRESETS)}") from err
    if not high > low:
        raise CTGridItError(f"window {text!r} is empty", hint="MAX must be larger than MIN")
    return low, high
