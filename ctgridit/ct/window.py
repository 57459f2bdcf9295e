"""CT display and model windows: named HU ranges, parsed from the command line."""

from __future__ import annotations

from ctgridit.errors import CTGridItError

#: The model window of docs/METHOD.md section 1 (CT-RATE, GenerateCT): -1000..1000 HU.
DEFAULT_WINDOW: tuple[float, float] = (-1000.0, 1000.0)

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
    except ValueError:
        raise CTGridItError(f"window {text!r} is not understood",
                            hint=f"use MIN:MAX in HU (e.g. -1000:400) or one of {', '.join(WINDOW_PRESETS)}") from None
    if not high > low:
        raise CTGridItError(f"window {text!r} is empty", hint="MAX must be larger than MIN")
    return low, high
