#!/usr/bin/env bash
# The project's checks that need a CUDA GPU, in one call. The lent device machine has PyTorch,
# Triton, timm and transformers but not our other dependencies: they travel as wheels in .whl/
# (docs/performance.md, "GPU checks"). Logs and benchmark JSON go to $OUT (default ./gpu_out).
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# CUDA-only tests: the fused deformable attention against the PyTorch op (eager and compiled),
# fusion on CUDA, CUDA-graph inference against eager
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short \
  tests/models/test_ms_deform_attn_triton.py tests/inference/test_fusion.py \
  tests/inference/test_cuda_graphs.py -k "cuda or triton" 2>&1 | tail -40 | tee "$OUT/tests.log"

# Swin-L at the release's test size: every mode, HF Mask2Former beside image_o, a training step
bench() {
  local limit=$1 name=$2
  timeout "$limit" python3 scripts/benchmark.py --backbone swin_large --height 800 --width 1216 \
    --device cuda --threads 16 --json "$OUT/$name.json" "${@:3}" 2>&1 | tail -14 \
    | tee "$OUT/$name.log"
}
bench 150 bf16 --precision bf16 --runs 10 --warmup 3 --tasks forward end_to_end train_step \
  --train-batch 1
bench 90 bf16_cuda_graphs --precision bf16 --runs 10 --warmup 3 --tasks forward end_to_end \
  --views 1 5 --overrides inference.cuda_graphs=true
if [ -n "$GPU_CHECKS_ALL" ]; then  # the slower rows: fp32, and compiling (about 2 minutes)
  bench 90 fp32 --precision fp32 --runs 5 --warmup 2 --tasks forward --views 1 5
  bench 240 bf16_compiled --precision bf16 --runs 10 --warmup 3 --tasks forward --views 1 5 \
    --no-hf --overrides model.compile=true
fi

# predict on Swin-L Batch-OC at the release's test size: today's sequential loop against the
# Lightning path with loader workers and batches of 4 (images per second, peak GPU memory)
timeout 240 python3 scripts/benchmark.py --backbone swin_large --height 768 --width 1024 \
  --device cuda --precision bf16 --threads 16 --no-hf --tasks predict_throughput --photos 32 \
  --predict-workers 0 8 --predict-batch 4 --predict-processes 1 \
  --overrides data.size_scale=1 --json "$OUT/predict_throughput.json" 2>&1 | tail -10 \
  | tee "$OUT/predict_throughput.log"
