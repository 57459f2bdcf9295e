"""Copy a trained model folder into the package as the bundled model, with its model card.

    python pipelines/bundle_model.py runs/ct_bundled/model

The bundled model lives in ``ctgridit/models/ct_small/`` (safetensors + JSON,
about 34 MB) and is what ``ctgridit synth`` uses without ``--model``. The
model card ``MODEL.md`` records the training config, the steps of each stage
(from the checkpoints' logs) and how to reproduce it.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from ctgridit.core.pipeline import GriDiTPipeline
from ctgridit.files import atomic_folder
from ctgridit.synthesis import BUNDLED_MODEL

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "pipelines" / "configs" / "ct_bundled.yaml"


def stage_summary(log: Path) -> str:
    rows = list(csv.DictReader(log.open())) if log.exists() else []
    if not rows:
        return "no log"
    first = sum(float(r["loss"]) for r in rows[:50]) / len(rows[:50])
    last = sum(float(r["loss"]) for r in rows[-50:]) / len(rows[-50:])
    return f"{rows[-1]['step']} steps, loss {first:.3f} (first 50) -> {last:.3f} (last 50)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the trained model folder (output of the ct_bundled config)")
    parser.add_argument("--checkpoints", default=str(REPO / "runs" / "ct_bundled" / "checkpoints"))
    parser.add_argument("--finetune-checkpoints", default=str(REPO / "runs" / "ct_bundled_finetune" / "checkpoints"))
    args = parser.parse_args()
    pipeline = GriDiTPipeline.from_pretrained(args.model)          # refuses an incomplete folder
    if pipeline.stage2 is None:
        raise SystemExit("the model folder has no stage2/: train stage 2 first")
    params = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (pipeline.stage1, pipeline.stage2)]
    ckpt, finetune = Path(args.checkpoints), Path(args.finetune_checkpoints)
    card = f"""# ct_small: the model bundled with ctgridit

A demonstration CT model, small enough to run on a laptop CPU: it generates
axial slices of 128 x 128 voxels at 3 x 3 x 3 mm (a 384 mm field of view).

- What it is: GriDiT stage 1 (a DiT over 2 x 2 grids of 64 x 64 slices, pixel
  space, {params[0]:.1f} M parameters) and stage 2 (a DiT that super-resolves each
  slice to 128 x 128, {params[1]:.1f} M parameters), trained with `ctgridit train`.
- Data: real scans of this project's `shared/data/ct`, resampled to 3 mm, HU
  window -1000..1000: TCIA Lung-PET-CT-Dx A0001 (chest) in two reconstruction
  kernels and TotalSegmentator's example CT (abdomen-pelvis). The scan A0002
  is held out for evaluation.
- Training, batch 16, AdamW, EMA 0.999, on 2 CPU cores:
  - stage 1, phase 1 (`pipelines/configs/ct_bundled.yaml`): grids of slices
    1 to 3 apart, all three scans, {stage_summary(ckpt / 'stage1' / 'train_log.csv')};
  - stage 1, phase 2 (`pipelines/configs/ct_bundled_finetune.yaml`, starting
    from phase 1): grids of consecutive slices of the soft-kernel scans only,
    {stage_summary(finetune / 'stage1' / 'train_log.csv')};
  - stage 2 (`ct_bundled.yaml`): {stage_summary(ckpt / 'stage2' / 'train_log.csv')}.
- Sampling: DDPM, 50 steps for stage 1; every slice comes from the extension
  step (two new slices per 2 x 2 grid, `interpolate: false`): phase 1 alone
  made grids whose slices were as close as consecutive ones whatever the
  stride, so the interpolation step (which takes extension frames to be 3
  slices apart) slowed the anatomy down threefold. Stage 2: DDPM 10 steps
  (as DDIM at eta 1) from the upsampled slice at strength 0.5, with noise that
  changes smoothly along z (about 8 slices).
- What it is not: a research-grade model. Three scans cannot teach the
  variability of chest CT, and 201 slices at 3 mm (603 mm) are longer than
  any training scan (at most 336 mm): past the anatomy it has seen, the model
  keeps repeating the last region (e.g. the shoulders) with small changes.
  Measured at 201 slices, seed 0 (`python pipelines/bench_synth.py`):
  neighbouring slices differ 1.46x as much as in the held-out scan (mean
  |dHU| 26.1 against 17.8); slices more than 30 apart reach SSIM 0.62 at most
  (0.68 to 0.72 with seeds 1 to 3), but the anatomy alone (stage-1 slices
  upsampled) reaches 0.83: the repeated region.
  Train on CT-RATE with `pipelines/configs/ctrate_xl.yaml` on GPUs for a real
  model.

Reproduce (from the repository root, with `../shared/data/ct` present):

```bash
ctgridit train stage1 --config pipelines/configs/ct_bundled.yaml --steps STEPS1
ctgridit train stage2 --config pipelines/configs/ct_bundled.yaml --steps STEPS2
ctgridit train stage1 --config pipelines/configs/ct_bundled_finetune.yaml --steps STEPS3
python pipelines/bundle_model.py runs/ct_bundled/model
```

with STEPS1, STEPS2 and STEPS3 the step counts above (phase 1, stage 2, phase 2).
"""
    BUNDLED_MODEL.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(BUNDLED_MODEL) as tmp:
        for item in Path(args.model).iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / "MODEL.md").write_text(card)
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.rglob("*") if f.is_file()) / 2**20
    print(f"bundled {args.model} into {BUNDLED_MODEL} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
