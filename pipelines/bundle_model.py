"""Save a trained model folder into the package as a bundled model (float16 weights), with its model card.

    python pipelines/bundle_model.py runs/ct_chest/model --bench bench.txt        # the synthesis model
    python pipelines/bundle_model.py runs/ct_denoise_v4/model --denoiser --bench eval.txt
    python pipelines/bundle_model.py runs/ct_interpolate_pair_thin/model --slices --bench eval.txt
    python pipelines/bundle_model.py ctgridit/models/ct_interpolate --slices --refiner runs/motion_refiner/model
    python pipelines/bundle_model.py ctgridit/models/ct_interpolate --slices --refiner runs/lr4b/model \
        --refiner-runs runs/motion_refiner runs/lr4long runs/lr4b --bench eval.txt
    python pipelines/bundle_model.py runs/video_shapes/model --video --bench motion.txt

The bundled synthesis model lives in ``ctgridit/models/ct_chest/`` and is what
``ctgridit synth`` uses without ``--model``. Weights are stored as float16
safetensors (half the size; they load as float32). The model card ``MODEL.md``
records the data, the training config and steps of each stage (from the
checkpoints' logs), how to reproduce the weights, and the benchmark output
given with ``--bench`` (the output of ``pipelines/bench_synth.py``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from ctgridit.core.motion_refiner import MotionRefiner
from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.ct.slices import check_slice_model
from ctgridit.files import atomic_output
from ctgridit.model_folders import BUNDLED_DENOISER, BUNDLED_MODEL, BUNDLED_SLICE_MODEL, BUNDLED_VIDEO_MODEL
from ctgridit.training.trainer import loss_decrease

REPO = Path(__file__).resolve().parents[1]


def stage_summary(log: Path, until: int | None = None) -> str:
    """Steps, first and last loss and hours of a training log (up to step ``until`` where a later phase started
    from that step)."""
    rows = list(csv.DictReader(log.open())) if log.exists() else []
    if until is not None:
        rows = [r for r in rows if int(r["step"]) <= until]
    if not rows:
        return "no log"
    first, last = loss_decrease(rows, window=50)
    hours = float("nan")
    if "elapsed_s" in rows[-1]:                      # the clock starts again at every resume: add up the runs
        elapsed = [float(r["elapsed_s"]) for r in rows]
        hours = (sum(a for a, b in zip(elapsed, elapsed[1:]) if b < a) + elapsed[-1]) / 3600
    return f"{rows[-1]['step']} steps, loss {first:.3f} (first 50) -> {last:.3f} (last 50), {hours:.1f} h"


def gpu_phase(continued: Path | None) -> str:
    """The card's line for phase 3, both stages continued on a GPU (``pipelines/train_chest_gpu.sh``), if any."""
    if continued is None:
        return ""
    gpu = training_config("ct_chest_gpu.yaml")
    return f"""
  - phase 3, both stages continued from the weights above on one GPU (`pipelines/train_chest_gpu.sh`,
    `pipelines/configs/ct_chest_gpu.yaml`: the same tasks and data, batch {gpu["optim"]["batch_size"]}, bf16, side by side for a
    fixed wall-clock budget): stage 1 {stage_summary(continued / 'stage1' / 'train_log.csv')};
    stage 2 {stage_summary(continued / 'stage2' / 'train_log.csv')}."""


def gpu_commands(continued: Path | None) -> str:
    if continued is None:
        return ""
    return """
bash pipelines/train_chest_gpu.sh OUT 390 cuda        # on a GPU machine, from the weights just bundled
python pipelines/bundle_model.py --stages OUT/stage1 OUT/stage2 --continued OUT"""


def steps_option(log: Path, configured: int) -> str:
    """`` --steps N`` where the log of a run went on past the ``configured`` steps (a resumed, longer run)."""
    rows = list(csv.DictReader(log.open())) if log.exists() else []
    last = int(rows[-1]["step"]) if rows else configured
    return f" --steps {last}" if last != configured else ""


def measured(bench: str | None, command: str | None = None) -> str:
    """A card's last block: the benchmark output given with ``--bench`` and the ``command`` that printed it."""
    if not bench:
        return ""
    by = f" with `{command}`" if command else ""
    return f"\nMeasured{by} (2 CPU cores):\n\n```\n{bench.strip()}\n```\n"


def card(pipeline: GriDiTPipeline, checkpoints: Path, bench: str | None, continued: Path | None = None) -> str:
    """The card of the bundled chest model (``ct_chest``): phase 1 in ``runs/ct_chest_coarse``, phase 2 and stage 2
    in ``checkpoints`` (``runs/ct_chest/checkpoints``)."""
    cfg = pipeline.settings
    s1, s2 = cfg.sampling.stage1, cfg.sampling.stage2
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (pipeline.stage1, pipeline.stage2)]
    height, width = cfg.frame_size
    spacing = cfg.adapter["spacing"]
    cells = cfg.lr_frame_size
    coarse, grown = training_config("ct_chest_coarse.yaml"), training_config("ct_chest.yaml")
    phase1_steps = int(grown["stage1"]["init"].rsplit("_", 1)[1])
    phase1_log = REPO / "runs" / "ct_chest_coarse" / "checkpoints" / "stage1" / "train_log.csv"
    cond = grown["stage1"]["conditioning"]
    text = f"""# ct_chest: the chest CT model bundled with ctgridit

A demonstration chest CT model, small enough to run on a laptop CPU: 201 axial
slices of {height} x {width} voxels of {spacing[0]:g} x {spacing[1]:g} mm (a {width * spacing[0]:g} mm field of view),
{spacing[2]:g} mm apart ({200 * spacing[2]:g} mm, the extent of a CT-RATE chest volume), from the
upper abdomen through the lungs to the lower neck. `ctgridit synth` uses it by default.

- **Stage 1** ({params[0]:.1f} M parameters): a masked-conditional, stride-aware DiT
  (width {pipeline.stage1.config.hidden_size}, depth {pipeline.stage1.config.depth}, patch {pipeline.stage1.config.patch_size}) over {cfg.grid.rows} x {cfg.grid.cols} grids of {cells[0]} x {cells[1]} cells
  (slices downsampled {cfg.grid.factor} times: 12 mm pixels), pixel space, predicting the clean grid.
  It draws a first grid of slices {pipeline.max_stride * spacing[2]:g} mm apart at the lower end of a chest,
  extends it upwards two slices at a time, then {s1.levels} levels of interpolation fill the
  slices between ({s1.sampler.upper()}, {s1.num_steps} steps).
- **Stage 2** ({params[1]:.1f} M parameters): a DiT (patch {pipeline.stage2.config.patch_size}) that super-resolves each slice
  to {height} x {width}, starting from the upsampled stage-1 slice at strength {s2.strength}
  ({s2.sampler.upper()} {s2.num_steps} steps, noise that changes smoothly over about {s2.noise_length:g} slices),
  trained on diffusion steps {grown["stage2"]["timesteps"][0]} to {grown["stage2"]["timesteps"][1]} only.
- **Data**: the four chest patients of this project's `shared/data/ct`, resampled to
  {spacing[0]:g} x {spacing[1]:g} x {spacing[2]:g} mm, HU window -1000..1000, one reconstruction kernel each:
  LIDC-IDRI-0314 (1 mm slices), LIDC-IDRI-0001 (2.5 mm), Lung-PET-CT-Dx A0001 (5 mm) and
  A0002 (8 mm). A scan serves only strides at least as long as its own slice
  spacing: all four teach the first grid and extension at {pipeline.max_stride * spacing[2]:g} mm, the
  thinner ones the interpolation levels. No chest is held out (there are four);
  how close the slices stay to the training scans is measured below.
- **Training** (batch {grown["optim"]["batch_size"]}, AdamW, learning rate {grown["optim"]["lr"]:g} after {grown["optim"]["warmup_steps"]} warm-up steps,
  EMA {grown["optim"]["ema_decay"]}, clean-sample prediction with Min-SNR-{grown["diffusion"]["min_snr"]:g} weights, 2 CPU cores):
  - stage 1, phase 1 (`pipelines/configs/ct_chest_coarse.yaml`): only the first grid
    and extension at stride {coarse["data"]["strides"][0]} ({coarse["stage1"]["conditioning"]["unconditional"]:g} / {coarse["stage1"]["conditioning"]["extension"]:g}), no in-plane
    augmentation: {stage_summary(phase1_log, phase1_steps)};
  - stage 1, phase 2 (`pipelines/configs/ct_chest.yaml`, from phase 1): interpolation at
    strides {cond["task_strides"]["interpolation"]} beside the first grid and extension at {cond["task_strides"]["extension"]}
    ({cond["unconditional"]:g} / {cond["extension"]:g} / {cond["interpolation"]:g}):
    {stage_summary(checkpoints / 'stage1' / 'train_log.csv')};
  - stage 2 (`pipelines/configs/ct_chest.yaml`): {stage_summary(checkpoints / 'stage2' / 'train_log.csv')}.{gpu_phase(continued)}
- **What it is not**: a research-grade model. Four patients cannot teach the
  variability of chest CT: expect the anatomy of the training patients, mixed
  and varied. Train `pipelines/configs/ctrate_xl.yaml` on CT-RATE with GPUs for a
  real model.

Reproduce (from the repository root, with the shared data at `$CTGRIDIT_DATA`, default
`../shared/data/ct`):

```bash
ctgridit prepare pipelines/configs/ct_chest_coarse.yaml
ctgridit train stage1 --config pipelines/configs/ct_chest_coarse.yaml --steps {phase1_steps}
ctgridit train stage1 --config pipelines/configs/ct_chest.yaml
ctgridit train stage2 --config pipelines/configs/ct_chest.yaml{steps_option(checkpoints / 'stage2' / 'train_log.csv', grown["stage2"]["optim"]["steps"])}
python pipelines/bundle_model.py runs/ct_chest/model{gpu_commands(continued)}
```

Training is deterministic for a given machine and library versions (every
sample is a function of the seed and its index; `--resume` continues exactly).
""" + TRIED
    return text + measured(bench, "python pipelines/bench_synth.py --picture docs/synth_chest.png")


#: What was tried on the way to the bundled chest model (issue 27), for its card.
TRIED = """
## What was tried

Each route trained on 2 CPU cores but the last; "lung peak" is the largest share of the body
below -500 HU in one slice (real chests here: 0.31 to 0.39).

| route | training | what it gave |
|---|---|---|
| `ct_small` (the model bundled before) | 3 mm slices, 2 x 2 grids of 64 x 64, noise prediction, three scans | a volume of 603 mm, lungs over 276 mm running into an end slice |
| 1.5 mm, strides 1, 3, 9 at once, noise prediction (`ct_bundled.yaml`) | 5,000 + 1,500 steps of batch 16, in-plane jitter | lung peak 0.06 to 0.11; stage-1 cells a patchwork of 4 x 4-pixel tokens |
| the same fine-tuned to predict the clean grid (`ct_bundled_x0.yaml`) | + 2,500 + 800 steps | lung peak 0.14 to 0.20; still a patchwork; at t = 600 no better than the average grid |
| the same + Min-SNR-5 | + 1,000 steps | sharper cells (error at t = 300 0.040 -> 0.035), stage-1 lung peak 0.21 / 0.14 |
| **one problem at a time**: the first grid and extension at stride 9 only, clean grid + Min-SNR-5, batch 32, four patients, no jitter (`ct_chest_coarse.yaml`) | 500 steps (13 min alone on the machine) | passes the gate (`pipelines/gate_stage1.py`): two dark lungs in a body on every seed, still patchy |
| the same | 1,000 steps | whole chests along 24 frames at 13.5 mm on seeds 0-3: abdomen, lung bases, lungs with the heart, apex, shoulders; peak 0.33 to 0.44 |
| then interpolation at strides 3 and 1 beside it (`ct_chest.yaml`), stage 2 | phases 1 and 2 above (about 6 h of wall clock) | whole chests; every target met on seeds 0-3 but far-slice SSIM (met on 1 of 4: 0.77, 0.86, 0.70, 0.81); nearest training slice SSIM median 0.81-0.83; seeds 0 and 3 nearly alike |
| both stages continued on one GPU (phase 3, `train_chest_gpu.sh`) | 6,950 + 7,550 steps of batch 64 in 6.5 min | this model: far SSIM met on 3 of 4 seeds, seeds far apart (220-281 HU), slice texture nearer the real scans; but each seed is close to one training patient (nearest training slice SSIM median 0.92-0.94, max up to 0.98) |
"""


#: The denoiser's earlier phases, as their logs recorded them (their run folders are gone).
DENOISER_PHASES = {"ct_denoise_v2": "12000 steps, loss 0.996 (first 50) -> 0.169 (last 50), 2.8 h",
                   "ct_denoise_v3": "4000 steps, loss 0.167 (first 50) -> 0.163 (last 50), 0.8 h"}


def denoiser_card(pipeline: GriDiTPipeline, checkpoints: Path, bench: str | None) -> str:
    cfg = pipeline.settings
    tile = cfg.frame_size
    params = sum(p.numel() for p in pipeline.stage1.parameters()) / 1e6
    run = training_config("ct_denoise_v2.yaml")
    anneal = training_config("ct_denoise_v3.yaml")
    chest = training_config("ct_denoise_v4.yaml")
    text = f"""# ct_denoise: the denoiser bundled with ctgridit

GriDiT's Algorithm 3 at the scan's own resolution: a stage-1 grid DiT
({params:.1f} M parameters, patch {pipeline.stage1.config.patch_size}) over {cfg.grid.rows} x {cfg.grid.cols} grids of {tile[0]} x {tile[1]}
tiles of consecutive slices, pixel space, no stage 2. `ctgridit denoise` covers a
scan with overlapping windows of it (MONAI's sliding window, Gaussian blending, the in-plane step off the
patch grid), takes the noise given with `--noise` or estimates it at full resolution, and takes the
posterior mean at the exact (fractional) diffusion level of that noise in one network call, blended with
the input by SURE, and uses that as the pilot of an empirical Wiener filter of the input in sliding DCT blocks
(8 x 8 x 4 or 4 x 4 x 4 voxels, chosen per scan by SURE; the pilot averaged with a hard-thresholded estimate of
the input where SURE of the whole chain says so)
(see `ctgridit/ct/denoising.py`, `ctgridit/core/frame_denoising.py`, `ctgridit/core/dct_wiener.py`).

- **Data**: random tiles of every scan of this project's `shared/data/ct` at its
  own voxel size (0.78 to 3 mm in-plane), HU window -1000..1000: chest (LIDC-IDRI-0314,
  Lung-PET-CT-Dx A0001, both kernels), abdomen-pelvis and chest angiography crops
  (TotalSegmentator), lung crops (elastix) and 17 extremity scans (Soft-tissue-Sarcoma)
  for soft-tissue and bone texture. Held out: A0002 (both kernels, 0.65 mm), LIDC-IDRI-0001 (0.70 mm),
  the TotalSegmentator chest crop and its abdomen slab, STS_018 (tunes the classical filters), STS_019
  and STS_020: `pipelines/eval_denoise.py` evaluates on them.
- **Training**, on diffusion steps 0 to {run["stage1"]["timesteps"][1]} only (noise up to about 210 HU), batch
  {run["optim"]["batch_size"]}, AdamW, EMA 0.999, 2 CPU cores:
  - `pipelines/configs/ct_denoise_v2.yaml`, from scratch at a constant learning rate of {run["optim"]["lr"]:g}:
    {DENOISER_PHASES["ct_denoise_v2"]};
  - `pipelines/configs/ct_denoise_v3.yaml`, annealed from its EMA weights, the learning rate decaying from
    {anneal["optim"]["lr"]:g} to 0 along a cosine (other random tiles):
    {DENOISER_PHASES["ct_denoise_v3"]}. On the held-out rows +0.01 to +0.05 dB over the 12,000-step weights;
  - `pipelines/configs/ct_denoise_v4.yaml`, fine-tuned from those weights with the chest scans drawn more often
    (the chest and abdomen scans not held out and 6 of the 17 extremity scans: about half the tiles from chests
    instead of a third), the learning rate from {chest["optim"]["lr"]:g} to 0 along a cosine, bfloat16 autocast:
    {stage_summary(checkpoints / 'stage1' / 'train_log.csv', until=chest["optim"]["steps"])}. On the held-out
    rows: the 1.5 mm chest crop +0.05 dB at 100 HU (31.49 -> 31.54) and +0.02 at 50 HU, STS_019 +0.03 at 100 HU,
    every other row within 0.01 dB.
- **History**: the first bundled denoiser (`pipelines/configs/ct_denoise.yaml`, 6,000 steps) had also seen
  LIDC-IDRI-0001; this one holds it out, so the evaluation has two fine-pixel chests no model saw. On the
  rows compared (A0002 B40f at 20, 50 and 100 HU, B70f at 20 HU) the two agree within 0.01 dB.

Reproduce (from the repository root, with `../shared/data/ct` present):

```bash
ctgridit train stage1 --config pipelines/configs/ct_denoise_v2.yaml
ctgridit train stage1 --config pipelines/configs/ct_denoise_v3.yaml
ctgridit train stage1 --config pipelines/configs/ct_denoise_v4.yaml
python pipelines/bundle_model.py runs/ct_denoise_v4/model --denoiser
```
"""
    return text + measured(bench, "python pipelines/eval_denoise.py")


#: The earlier phases of the slice model, as their logs recorded them (their run folders are gone).
PHASES = {"ct_interpolate": "3000 steps, loss 0.034 (first 50) -> 0.013 (last 50), 0.7 h",
          "ct_interpolate_1step": "4000 steps, loss 0.016 (first 50) -> 0.018 (last 50), 0.7 h",
          "ct_interpolate_flow": "2000 steps, loss 0.014 (first 50) -> 0.014 (last 50), 0.4 h",
          "ct_interpolate_gaps": "2000 steps, loss 0.017 (first 50) -> 0.017 (last 50), 0.6 h",
          "ct_interpolate_pair": "3000 steps, loss 0.017 (first 50) -> 0.014 (last 50), 1.0 h"}


def refiner_part(pipeline: GriDiTPipeline, log: Path | None, runs: list[Path] = ()) -> str:
    """The slice model card's paragraph on its motion refiner (none without one); ``runs``: the training runs it was
    continued through (``--refiner-runs``), each started from the one before's ``model/``."""
    if pipeline.refiner is None:
        return ""
    params = sum(p.numel() for p in pipeline.refiner.parameters()) / 1e3
    return f"""
## The motion refiner (`refiner/`)

Before the DiT's correction, each new slice's flow fill is corrected by a
{params:.0f} k-weight U-Net (`ctgridit.core.motion_refiner.MotionRefiner`, width {pipeline.refiner.config.width}): from the two
moved slices, the two known ones, the ones before and after them, the position in the gap and
the two moves, it changes where each known slice is sampled, how the two are mixed, and adds a
residual (as Super SloMo and RIFE refine a flow for video). It works on {pipeline.refiner.config.pixel_size:g} mm pixels (a scan
with other pixels is resized for it, and its moves applied at the scan's own size).
Trained with `python pipelines/train_motion_refiner.py runs/motion_refiner` (LIDC-IDRI-0314 at
1.5 mm, LIDC-IDRI-0001, the elastix lung crop and STS_001 to STS_017; factors 2 to 5; batch 16 of
64 x 64 crops, flips and reversal; 1 CPU core): {stage_summary(log) if log else "no log"} (the bundled weights came
from the script as of commit 8d21396, whose crops stopped one pixel short of the slices' far edges; otherwise the
same run).{continued(runs)} Each new slice is the mean of the refiner's frame for its gap taken both ways (`symmetric`). The DiT's
correction of the plain fill is added to the refined fill; the check on the scan's own slices weighs both
(`checked_weight`).
Bundled with `python pipelines/bundle_model.py ctgridit/models/ct_interpolate --slices --refiner RUN/model
[--refiner-runs runs/motion_refiner ... RUN] --bench <the output of pipelines/eval_interpolate.py>`.
"""


def continued(runs: list[Path]) -> str:
    """The card's sentence on the runs a refiner was continued through (each ``OUT`` of
    ``pipelines/train_motion_refiner.py --start PREVIOUS/model``; their rate and seed as each ``OUT.log`` records the
    command, or as the bundler says)."""
    if not runs:
        return ""
    parts = [f"`{run.name}` ({stage_summary(run / 'train_log.csv')})" for run in runs]
    return (" It was then continued, each run started from the one before's weights with "
            "`pipelines/train_motion_refiner.py OUT --start PREVIOUS/model --lr 1e-4` (the same data; seeds 0, 1, ...): "
            + ", then ".join(parts) + ".")


def slice_card(pipeline: GriDiTPipeline, checkpoints: Path, bench: str | None, refiner_log: Path | None = None,
               refiner_runs: list[Path] = ()) -> str:
    cfg = pipeline.settings
    tile = cfg.frame_size
    params = sum(p.numel() for p in pipeline.stage1.parameters()) / 1e6
    run, tune, flow = (training_config(f"ct_interpolate{part}.yaml") for part in ("", "_1step", "_flow"))
    gaps = cfg.sampling.stage1.gaps or [cfg.grid.cells - 1]
    cond, low, high = run["stage1"]["conditioning"], *tune["stage1"]["timesteps"]
    min_snr = run.get("diffusion", {}).get("min_snr")
    weights = f"Min-SNR-{min_snr:g} loss weights" if min_snr else "the loss on every noise level alike"
    fill, residual = pipeline.stage1.config.cond_fill, pipeline.stage1.config.fill_residual
    how = {"linear": "the linear interpolation of the known ones",
           "flow": "the known ones moved along the motion between them (TV-L1 optical flow, `fill: flow`)",
           "flow_pair": "the two known ones each moved along the motion between them (TV-L1 optical flow) to the "
                        "cell's place, and the weight of the second in their mix (`fill: flow_pair`)"}
    given = (f"the unknown cells of its condition hold {how[fill]}"
             + ((" and its output is the two moved slices, each moved again by a displacement the network "
                 "gives and mixed with the weight it changes, plus its correction" if fill == "flow_pair" else
                 " and its output is that plus the network's correction") if residual else "")
             if fill in how else "the unknown cells of its condition are zero")
    text = f"""# ct_interpolate: the slice model bundled with ctgridit

The model behind `ctgridit interpolate` and `ctgridit extend`: a masked-conditional
stage-1 grid DiT ({params:.1f} M parameters, patch {pipeline.stage1.config.patch_size}) over {cfg.grid.rows} x {cfg.grid.cols} grids of
{tile[0]} x {tile[1]} tiles of consecutive slices at the scan's own resolution, pixel space, no
stage 2, predicting the clean tiles (x0, {weights}). Given the first and
last cell it fills the two between at their positions in the gap (interpolation by {", ".join(map(str, gaps))}:
two new slices at a time); given the first row it
makes the second (extension); {given}. MONAI's sliding window covers a scan with
overlapping tiles (see `ctgridit/ct/slices.py`); one DDIM step (the default) is the
model's posterior mean. Fine-tuned on diffusion steps {low} to {high} only, it serves
one-step sampling only (`--steps` above 1 passes through levels it no longer knows).
`ctgridit extend` mixes its extension into the flow extrapolation (the last slice moved further
along the motion from the one before it) by the share that is best on the scan's own last 4 slices.

- **Data**: random tiles of the scans of this project's `shared/data/ct` at their own
  voxel size, HU window -1000..1000: LIDC-IDRI-0314 (1 mm slices), Lung-PET-CT-Dx
  A0001 (5 mm), the TotalSegmentator abdomen slab (3 mm), the elastix lung crops
  (2.5 and 5 mm) and 17 Soft-tissue-Sarcoma scans (3.27 mm). Held out: the
  TotalSegmentator chest crops (1.5 mm; `pipelines/eval_interpolate.py` evaluates
  on them), A0002 and STS_018 to STS_020.
- **Tasks**: interpolation {cond["interpolation"]}, extension {cond["extension"]}, nothing known {cond["unconditional"]}
  (fine-tuning: {tune["stage1"]["conditioning"]["interpolation"]}, {tune["stage1"]["conditioning"]["extension"]}, {tune["stage1"]["conditioning"]["unconditional"]}).
- **Training** (batch {run["optim"]["batch_size"]}, AdamW, EMA 0.999, 2 CPU cores): `pipelines/configs/ct_interpolate.yaml`,
  {PHASES["ct_interpolate"]}; then
  `pipelines/configs/ct_interpolate_1step.yaml` (diffusion steps {low}-{high}),
  {PHASES["ct_interpolate_1step"]}; then
  `pipelines/configs/ct_interpolate_flow.yaml` (the same levels, `fill: {flow["stage1"]["conditioning"]["fill"]}`),
  {PHASES["ct_interpolate_flow"]}; then
  `pipelines/configs/ct_interpolate_gaps.yaml` (interpolation grids over gaps of {", ".join(map(str, gaps))} slices, the
  cells between at random slices inside the gap, the fill at their positions: one model for
  `--factor` {" to ".join(map(str, (gaps[0], gaps[-1])))}), {PHASES["ct_interpolate_gaps"]}; then
  `pipelines/configs/ct_interpolate_pair.yaml` (`fill: flow_pair`, started from the gaps model: at mid-gap
  exactly that model), {PHASES["ct_interpolate_pair"]}; then
  `pipelines/configs/ct_interpolate_pair_thin.yaml` (LIDC-IDRI-0314 only, resampled to 1.5 mm isotropic
  voxels, the held-out chest crops' own), {stage_summary(checkpoints / 'stage1' / 'train_log.csv')}.

Reproduce (from the repository root, with `../shared/data/ct` present):

```bash
ctgridit train stage1 --config pipelines/configs/ct_interpolate.yaml
ctgridit train stage1 --config pipelines/configs/ct_interpolate_1step.yaml
ctgridit train stage1 --config pipelines/configs/ct_interpolate_flow.yaml
ctgridit train stage1 --config pipelines/configs/ct_interpolate_gaps.yaml    # starts from the bundled folder
ctgridit train stage1 --config pipelines/configs/ct_interpolate_pair.yaml    # (as of commit 48824e6)
ctgridit train stage1 --config pipelines/configs/ct_interpolate_pair_thin.yaml
python pipelines/bundle_model.py runs/ct_interpolate_pair_thin/model --slices
```

## How it got there

The same 1.9 M-parameter DiT (patch 8, width 128) each time;
mean PSNR of the filled slices on the held-out chest crops:

| the model's condition in the cells to fill | training | gridit | against cubic |
|---|---|---|---|
| zeros (the known cells only) | 3,000 steps | 22.43 dB | -1.97 dB |
| linear interpolation (`fill: linear`) | 3,000 steps | 23.52 dB | -0.88 dB |
| the same, output = interpolation + correction (`residual: true`) | 3,000 steps | 24.76 dB | +0.36 dB |
| the same, fine-tuned for one step (diffusion steps 980-999) | + 4,000 steps | 24.87 dB | +0.47 dB |
| the same, fine-tuned on the one thin scan (LIDC-IDRI-0314) only | + 1,500 steps | 24.88 dB | +0.48 dB |
| motion-compensated (`fill: flow`), residual, one step | + 2,000 steps | 25.83 dB | +1.43 dB |
| the same, gaps of 2 to 5 slices with the fill at each cell's position | + 2,000 steps | 25.83 dB | +1.43 dB |
| each known slice moved separately (`fill: flow_pair`), the network moving them further | + 3,000 steps | 25.75 dB | +1.35 dB |
| the same, fine-tuned on LIDC-IDRI-0314 at 1.5 mm (bundled) | + 3,000 steps | 25.81 dB | +1.41 dB |

(The last two rows come from the evaluation as it is now, in which the gaps model measures 25.78 dB, +1.38;
the earlier rows from earlier versions of it.)

With the linear mix as its input the network learnt almost no correction (its
output differed from linear interpolation by 18 HU RMS where the real slices
differ by 115; averaging over flips and turning the scan over changed nothing);
neither more steps nor training on thin slices only changed that. A 7 x 7
linear filter of the two known slices fitted on half of the test slices gains
only about 0.24 dB over linear on the other half: the rest is motion, which the
flow supplies.
""" + refiner_part(pipeline, refiner_log, refiner_runs)
    return text + measured(bench, "python pipelines/eval_interpolate.py")


def video_card(pipeline: GriDiTPipeline, checkpoints: Path, bench: str | None) -> str:
    cfg = pipeline.settings
    params = sum(p.numel() for p in pipeline.stage1.parameters()) / 1e6
    run = training_config("video_shapes.yaml")
    text = f"""# video_shapes: the moving-squares video model bundled with ctgridit

A tiny video model of the moving-squares clips (`ctgridit.video.shapes`: a
square circling the frame centre once every 16 frames, made offline and
exactly, so a generated clip can be checked). A masked-conditional stage-1 grid
DiT ({params:.2f} M parameters, patch {pipeline.stage1.config.patch_size}) over {cfg.grid.rows} x {cfg.grid.cols}
grids of {cfg.frame_size[0]} x {cfg.frame_size[1]} RGB frames, pixel space, no stage 2, predicting the clean frames;
it generates a first grid and extends with the paper's m = {cfg.sampling.stage1.control_rows} control rows,
{cfg.adapter["fps"]:.3g} frames per second (its training clips' rate).

- **Data**: 64 clips of `python pipelines/make_moving_squares.py runs/moving_squares`.
- **Training** (`pipelines/configs/video_shapes.yaml`, batch {run["optim"]["batch_size"]}, AdamW,
  EMA {run["optim"]["ema_decay"]}, 2 CPU cores): {stage_summary(checkpoints / 'stage1' / 'train_log.csv')}.
- **Use**: `ctgridit synth --model <this folder> --frames 48 --out clip.gif`; the
  video test (`tests/test_video_synth.py`) fine-tunes it through `ctgridit train`
  and checks that the clips it samples continue the motion.

Reproduce (from the repository root):

```bash
python pipelines/make_moving_squares.py runs/moving_squares
ctgridit train stage1 --config pipelines/configs/video_shapes.yaml
python pipelines/bundle_model.py runs/video_shapes/model --video
```

## Why the video test fine-tunes this model

A model trained from scratch within a test's time does not learn the motion:
test-sized tries (8 x 8 frames, a 3-pixel square on a 2.5-pixel circle, 4 x 4
grids; patch 4 or 2; batch 16 or 32; 400 to 1,500 steps, 80 to 207 s;
continuous or 16 fixed phases; Min-SNR or plain weights; one clip only) all
still drew squares in pieces, off their circle already in the first grid
(median 2.0 to 2.6 pixels). So `tests/test_video_synth.py` fine-tunes this
model 30 steps through `ctgridit train` instead.
"""
    return text + measured(bench, "python pipelines/eval_video_motion.py")


def training_config(name: str = "ct_denoise.yaml") -> dict:
    """A native-resolution model's training config as written (batch size, timesteps, tasks)."""
    import yaml

    return yaml.safe_load((REPO / "pipelines" / "configs" / name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="the trained model folder (runs/ct_chest/model for the synthesis model)")
    parser.add_argument("--stages", nargs=2, metavar=("STAGE1", "STAGE2"),
                        help="build the model from a stage-1 and a stage-2 checkpoint folder instead (config.json and "
                             "ema.safetensors each: what pipelines/train_chest_gpu.sh brings back)")
    parser.add_argument("--checkpoints", default=str(REPO / "runs" / "ct_chest" / "checkpoints"))
    parser.add_argument("--bench", default=None, help="a file with the output of the benchmark to quote")
    parser.add_argument("--continued", default=None,
                        help="the folder pipelines/train_chest_gpu.sh wrote: the chest model's card gets its phase 3")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--denoiser", action="store_true", help="bundle as the default denoiser (ct_denoise)")
    which.add_argument("--slices", action="store_true",
                       help="bundle as the default model of interpolate and extend (ct_interpolate)")
    which.add_argument("--video", action="store_true", help="bundle as the moving-squares video model (video_shapes)")
    parser.add_argument("--refiner", default=None,
                        help="with --slices: a motion refiner folder to bundle with the slice model "
                             "(pipelines/train_motion_refiner.py's OUT/model; its OUT/train_log.csv goes on the card)")
    parser.add_argument("--refiner-runs", nargs="+", type=Path, default=[],
                        help="with --refiner: the training runs that made it, in order (the first trained from scratch, "
                             "each other continued from the one before at --lr 1e-4); their train_log.csv go on the card")
    args = parser.parse_args()
    other = {"denoiser": args.denoiser, "slices": args.slices, "video": args.video}
    kind = next((k for k, on in other.items() if on), "synthesis")
    if (args.model is None) == (args.stages is None):
        parser.error("give a model folder or --stages STAGE1 STAGE2")
    if args.stages:
        from ctgridit.training.trainer import checkpoint_pipeline

        pipeline = checkpoint_pipeline(*args.stages)
    else:
        pipeline = GriDiTPipeline.from_pretrained(Path(args.model))   # refuses an incomplete folder
    refiner_log = None
    if args.refiner:
        if kind != "slices":
            parser.error("--refiner goes with --slices")
        pipeline.register_modules(refiner=MotionRefiner.from_pretrained(args.refiner))
        pipeline._check()                                          # a refiner needs a slice model with a flow fill
        check_slice_model(pipeline, args.refiner)                  # ... trained in its HU window
        refiner_log = (args.refiner_runs[0] if args.refiner_runs else Path(args.refiner).parent) / "train_log.csv"
    if kind == "synthesis" and pipeline.stage2 is None:
        raise SystemExit("the model folder has no stage2/: train stage 2 first")
    bench = Path(args.bench).read_text() if args.bench else None
    target = {"synthesis": BUNDLED_MODEL, "denoiser": BUNDLED_DENOISER, "slices": BUNDLED_SLICE_MODEL,
              "video": BUNDLED_VIDEO_MODEL}[kind]
    runs = {"synthesis": "ct_chest", "denoiser": "ct_denoise_v4", "slices": "ct_interpolate_pair_thin",
            "video": "video_shapes"}[kind]
    checkpoints = Path(args.checkpoints) if args.checkpoints != parser.get_default("checkpoints") \
        else REPO / "runs" / runs / "checkpoints"
    if kind == "synthesis":
        text = card(pipeline, checkpoints, bench, Path(args.continued) if args.continued else None)
    else:
        text = {"denoiser": denoiser_card, "video": video_card,
                "slices": lambda *a: slice_card(*a, refiner_log=refiner_log, refiner_runs=args.refiner_runs[1:])}[kind](
                    pipeline, checkpoints, bench)
    pipeline.to(torch.float16).save_pretrained(target)           # float16 safetensors, replaced atomically
    with atomic_output(target / "MODEL.md") as tmp:
        tmp.write_text(text)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    print(f"bundled {args.model or ' and '.join(args.stages)} into {target} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
