"""The CT adapter: reading and writing CT volumes in HU with their geometry, and
the MONAI transforms that turn them into the frame sequences the generic core
works on."""

from ctgridit.ct.volume import CTVolume

__all__ = ["CTVolume"]
