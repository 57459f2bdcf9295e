"""Render the moving-squares video data set (ctgridit.video.shapes): GIF clips of a square circling at known speed.

    python pipelines/make_moving_squares.py runs/moving_squares          # 64 clips of 48 frames, 16 x 16, 8 fps
    ctgridit train stage1 --config pipelines/configs/video_shapes.yaml
    ctgridit synth --model runs/video_shapes/model --frames 48 --out clip.gif --preview clip.png

The clips are made offline and exactly (no download, no compression loss), so a
model trained on them can be checked: the square of a generated clip must keep
circling at one turn per 16 frames (tests/test_video_synth.py).
"""

from __future__ import annotations

import argparse

from ctgridit.video.shapes import CirclingSquare, write_moving_squares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite clips of an earlier run")
    args = parser.parse_args()
    paths = write_moving_squares(args.folder, args.clips, args.frames, CirclingSquare(), args.fps, args.seed,
                                 force=args.force)
    print(f"wrote {len(paths)} clips of {args.frames} frames to {args.folder}")


if __name__ == "__main__":
    main()
