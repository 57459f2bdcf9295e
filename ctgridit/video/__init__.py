"""The video adapter: videos and frame folders <-> the frame sequences of the core.

- :mod:`ctgridit.video.io` reads a folder of frame images, a video file or a GIF
  as uint8 RGB frames ``(T, H, W, 3)`` and writes them as ``.mp4``, ``.gif`` or
  a folder of PNGs.
- :mod:`ctgridit.video.frames` turns those frames into the core's sequence
  ``(T, 3, H, W)`` in ``[-1, 1]`` and back; :class:`VideoFiles` does
  ``load(path) -> sequence`` and ``save(sequence, path)``.
- :mod:`ctgridit.video.adapter` is the adapter the trainer and ``synth`` find
  by the name ``video`` (:mod:`ctgridit.adapters`).
- :mod:`ctgridit.video.synthesis` is ``ctgridit synth`` for video models.

It never imports the CT adapter or a medical library (monai, nibabel, SimpleITK, pydicom).
"""

from ctgridit.video.io import read_frames, write_frames, write_video
from ctgridit.video.frames import VideoFiles, frames_to_sequence, sequence_to_frames

__all__ = ["read_frames", "write_video", "write_frames", "frames_to_sequence", "sequence_to_frames", "VideoFiles"]
