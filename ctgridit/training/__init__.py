"""Training data of both GriDiT stages: grids of frames (stage 1) and degraded/HR frame pairs (stage 2).

Every sample is a pure function of ``(seed, index)`` (see :mod:`ctgridit.training.datasets`),
so a trainer resumes exactly and splits a global batch across processes by choosing indices.
"""
