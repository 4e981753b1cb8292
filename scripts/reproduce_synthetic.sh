#!/usr/bin/env bash
# The paper's claims on our synthetic data, on one GPU (experiment synthetic_gpu):
#   1. train CropFormer, evaluate the four Table 7 modes (Batch-OC should beat Image-O);
#   2. the Table 9a delta sweep (0.5 .. 0.8), collected beside the paper's numbers.
# Usage: scripts/reproduce_synthetic.sh [extra Hydra overrides, e.g. trainer.max_steps=800]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=outputs/reproduce_synthetic/$(date +%Y-%m-%d_%H-%M-%S)

$PY -m entityseg.train experiment=synthetic_gpu test=false hydra.run.dir="$OUT/train" "$@"
CKPT=$(ls "$OUT"/train/checkpoints/best_step_*.ckpt 2>/dev/null | tail -n 1)
CKPT=${CKPT:-$OUT/train/checkpoints/last.ckpt}
$PY -m entityseg.evaluate experiment=synthetic_gpu ckpt_path="$CKPT" hydra.run.dir="$OUT/table7" "$@"

$PY -m entityseg.train -m experiment=synthetic_gpu hparams_search=table9_delta \
    trainer.max_steps=400 hydra.sweep.dir="$OUT/table9_delta" "$@"
$PY scripts/collect_tables.py "$OUT/table9_delta"
echo "Table 7: $OUT/table7/table7.md; Table 9a: $OUT/table9_delta/table.md"
