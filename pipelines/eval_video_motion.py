"""Does a moving-squares video model continue the motion? (issue 17)

    python pipelines/eval_video_motion.py --model runs/video_shapes/model --frames 48 --seeds 0 1 2 3 4 5 6 7

For every seed, one clip from ``ctgridit.video.synthesis`` (the path ``ctgridit
synth --frames`` takes): the square is tracked in every frame, the phase of its
circle is fitted on the first grid's frames (generated with nothing known), and
the frames the extension step added (the paper's m = 3 control rows, 4 new
frames per grid) are compared with where the circle puts them. Printed per seed:
the median distance (pixels) of the square from its circle in the first grid and
in the added frames, the same for a square that stopped at the last first-grid
frame (the "frozen" baseline), and how many frames have no square at all.
"""

from __future__ import annotations

import argparse

import numpy as np

from ctgridit.video.synthesis import load_video_model, synthesize_clips_iter
from ctgridit.video.frames import sequence_to_frames
from ctgridit.video.shapes import CirclingSquare, motion_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="*", default=list(range(8)))
    args = parser.parse_args()
    pipeline = load_video_model(args.model, "cpu")
    grid = pipeline.settings.grid
    first = grid.rows * grid.cols
    motion = CirclingSquare(size=pipeline.settings.frame_size[0])
    print(f"model {args.model}: {grid.rows} x {grid.cols} grids, {args.frames} frames, phase fitted on the first "
          f"{first}; median distance from the circle in pixels (radius {motion.radius:g})")
    rows = []
    for seed in args.seeds:
        _, clip = next(synthesize_clips_iter(args.frames, range(1), seed, pipeline))
        e = motion_errors(sequence_to_frames(clip), motion, first)
        rows.append(e)
        print(f"seed {seed}: first grid {e['first grid']:4.2f}, added frames {e['added']:4.2f}, frozen square "
              f"{e['frozen']:4.2f}, frames without a square {e['missing']}")
    print("median over seeds: " + ", ".join(f"{k} {np.median([r[k] for r in rows]):.2f}" for k in rows[0]))


if __name__ == "__main__":
    main()
