"""Sizes ctgridit refuses, because the result would be no CT or the work would never end."""

#: A volume needs at least two slices to be 3D (readers refuse fewer), and ``synth`` makes at most this many
#: (3 m of 1.5 mm slices; longer runs are scripts, not a command).
MIN_SLICES = 2
MAX_SLICES = 2000
