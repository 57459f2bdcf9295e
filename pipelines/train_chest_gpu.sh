#!/usr/bin/env bash
# Phase 3 of the chest model on one GPU, for a fixed wall-clock budget (issue 27): both stages of
# pipelines/configs/ct_chest_gpu.yaml train at once, warm-started from the bundled ctgridit/models/ct_chest,
# from the prepared cache runs/cache/chest_3mm (no scan is read). When the budget ends each run is stopped
# (SIGINT: a clean stop, its checkpoints intact) and the newest checkpoint of each stage is written to OUT as
# float16 EMA weights with its config and training log:
#
#   bash pipelines/train_chest_gpu.sh OUT [BUDGET_S=420] [DEVICE=cuda]
#   python pipelines/bundle_model.py --stages OUT/stage1 OUT/stage2 --continued OUT       # bundle it
#
# Wheels in .whl/ (diffusers, monai, nibabel, pydicom) are installed first where the machine lacks them. The
# cache's settings name the scans under $CTGRIDIT_DATA, so it must be the folder the cache was prepared from.
set -euo pipefail
out=${1:?usage: train_chest_gpu.sh OUT [BUDGET_S] [DEVICE]}
budget=${2:-420}
device=${3:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out/stage1" "$out/stage2"
site=/tmp/ctgridit_site
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
# A cached run never reads a scan: where SimpleITK (imported with the CT readers) is missing, an empty module stands in.
if ! "$python" -c "import SimpleITK" 2> /dev/null; then
    mkdir -p "$site/SimpleITK" && : > "$site/SimpleITK/__init__.py"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CTGRIDIT_DATA=${CTGRIDIT_DATA:-/work/shared/data/ct}
export PYTHONUNBUFFERED=1

config=${CONFIG:-pipelines/configs/ct_chest_gpu.yaml}
pids=()
for stage in 1 2; do
    timeout -s INT "$budget" "$python" -m ctgridit train "stage$stage" --config "$config" --device "$device" --force \
        > "$out/stage$stage/train.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done     # a run stopped by the budget exits 130

"$python" - "$out" "$config" <<'EOF'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from ctgridit.training.checkpoint import list_checkpoints
from ctgridit.training.config import load_config

out, config = Path(sys.argv[1]), load_config(sys.argv[2])
for stage in (1, 2):
    found = list_checkpoints(Path(config.checkpoint.dir) / f"stage{stage}")
    if not found:
        print(f"stage {stage}: no checkpoint written")
        continue
    step, folder = found[-1]
    weights = {k: v.half().contiguous() for k, v in load_file(str(folder / "ema.safetensors")).items()}
    save_file(weights, str(out / f"stage{stage}" / "ema.safetensors"))
    shutil.copy(folder / "config.json", out / f"stage{stage}" / "config.json")
    shutil.copy(folder.parent / "train_log.csv", out / f"stage{stage}" / "train_log.csv")
    print(f"stage {stage}: step {step} -> {out / f'stage{stage}'}")
EOF
