"""Progress bars for long work: one bar per phase, with steps, rate and time left.

:class:`PhaseProgress` is a callback ``(phase, done, total)`` as the sampler and
pipeline call it; each new phase closes the previous bar and opens a new one.
``enabled=False`` (``--quiet``) makes it silent.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

#: Human names of the phases the pipeline reports.
PHASE_NAMES = {
    "extend": "stage 1: extend (grids)",
    "interpolate": "stage 1: interpolate",
    "stage2": "stage 2: super-resolve",
    "denoise": "stage 1: denoise (grids)",
    "bilateral": "bilateral filter (slices)",
    "nlm": "non-local means (slices)",
    "nlm3d": "non-local means (3D)",
    "wiener": "Wiener filter (block offsets)",
    "check": "stage 1: check the correction",
    "refine": "refine the motion fill (batches)",
}


class PhaseProgress:
    """A ``(phase, done, total)`` callback that draws a tqdm bar per phase."""

    def __init__(self, enabled: bool = True, unit: str = "step"):
        self.enabled = enabled
        self.unit = unit
        self._phase: str | None = None
        self._bar: tqdm | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if phase != self._phase:
            self.close()
            self._phase = phase
            self._bar = tqdm(total=total, desc=PHASE_NAMES.get(phase, phase), unit=self.unit,
                             file=sys.stderr, dynamic_ncols=True, leave=True)
        bar = self._bar
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._phase = None, None

    def __enter__(self) -> "PhaseProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
