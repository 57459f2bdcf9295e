"""The generic GriDiT core: grid maths, models, codecs, diffusion and sampling.

It works on sequences of frames ``(N, C, H, W)`` scaled to ``[-1, 1]`` and knows
nothing of CT or video; adapters turn their data into such sequences and back.
This package must never import a medical-imaging library (monai, nibabel,
SimpleITK, pydicom): a test checks it.
"""

from ctgridit.core.grid import GridSpec, GridLayout, grids_to_sequence, sequence_to_grids, tile, untile

__all__ = ["GridSpec", "GridLayout", "tile", "untile", "sequence_to_grids", "grids_to_sequence"]
