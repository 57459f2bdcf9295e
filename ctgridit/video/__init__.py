"""The video adapter: videos and frame folders <-> the frame sequences of the core.

- :mod:`ctgridit.video.io` reads a folder of frame images, a video file or a GIF
  as uint8 RGB frames ``(T, H, W, 3)`` and writes them as ``.mp4``, ``.gif`` or
  a folder of PNGs.
- :mod:`ctgridit.video.sequence` turns those frames into the core's sequence
  ``(T, 3, H, W)`` in ``[-1, 1]`` and back; :class:`VideoAdapter` does
  ``load(path) -> sequence`` and ``save(sequence, path)``.

It never imports the CT adapter or a medical library (monai, nibabel, SimpleITK, pydicom).
"""

from ctgridit.video.io import read_frames, write_frames, write_video
from ctgridit.video.sequence import VideoAdapter, frames_to_sequence, sequence_to_frames

__all__ = ["read_frames", "write_video", "write_frames", "frames_to_sequence", "sequence_to_frames",
           "VideoAdapter"]
