"""ctgridit: GriDiT grid diffusion transformers for CT volumes (and other image sequences).

Layout (docs/ARCHITECTURE.md has the layers and what may import what)
------
- ``ctgridit.core``: the generic method (grid maths, models, sampler, the diffusers pipeline). Imports no
  medical library.
- ``ctgridit.adapters``: the adapter interface and registry; ``ctgridit.ct`` (CT and CT-RATE: I/O, geometry,
  MONAI transforms, and the CT tasks: synthesis, denoising, slices) and ``ctgridit.video`` implement it.
- ``ctgridit.training``: configs, datasets, caches, checkpoints and the trainer, for any adapter.
- ``ctgridit.cli``: the ``ctgridit`` command, a thin layer over the tasks; the rest of the root is shared
  infrastructure (errors, atomic files, seeds, signals, progress, devices, model folders, the data folder).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctgridit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
