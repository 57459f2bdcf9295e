"""The one rule for random seeds, in every command and API function.

A seed is an integer from 0 to 2**32 - 1. PyTorch's CPU generator and NumPy's
legacy seeding keep 32 bits, so a larger seed would silently give the same
result as a smaller one (0 and 2**32 made identical volumes); negative seeds
are refused rather than wrapped. The same seed gives the same result.
"""

from __future__ import annotations

import operator

from ctgridit.errors import CTGridItError

SEED_MAX = 2**32 - 1


def check_seed(seed) -> int:
    """``seed`` as an int in ``0..SEED_MAX``, or a one-line error."""
    try:
        value = operator.index(seed)
    except TypeError as err:
        raise CTGridItError(f"the seed must be an integer, got {seed!r}", hint=f"use 0 .. {SEED_MAX}") from err
    if not 0 <= value <= SEED_MAX:
        raise CTGridItError(f"the seed must lie in 0 .. {SEED_MAX}, got {value}", hint="e.g. --seed 0")
    return value
