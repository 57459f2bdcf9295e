"""ctgridit: GriDiT grid diffusion transformers for CT volumes (and other image sequences).

Layout
------
- ``ctgridit.core``: the generic method (grid maths, models, sampler). Imports no
  medical library.
- ``ctgridit.ct``: CT input/output, geometry and MONAI transforms (the CT adapter).
- ``ctgridit.cli``: the ``ctgridit`` command, a thin layer over the Python API.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctgridit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
