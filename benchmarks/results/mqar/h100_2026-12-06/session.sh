#!/usr/bin/env bash
# The tenth session's MQAR device work (2026-12-06), bf16 like the settings already run, one run at a time:
#   1. ReBased and Based at d_model 128, seq 2048, lr 3e-3, resumed from their own checkpoints of 2026-12-05
#      (epochs 25 / 24; carried in as runs/s/<setting>.json.ckpt);
#   2. Based at d_model 64, seq 1024, lr 1e-3 and 3e-3 (cut at epochs 59 / 55 on 2026-12-04, no checkpoint);
#   3. ReBased and Based at d_model 64, seq 2048, lr 1e-3 and 3e-3 (what time is left; cut runs' checkpoints return).
# Before the sweep starts: the fp32 attention op per tile (the 8 x 8 fp32 tiles of 41d17b8 against the old 16 x 16)
# and 3xTF32, and bf16 with more warps (the tile-16 state and gradient kernels spill at 2 / 4 warps, not at 4 / 8:
# benchmarks/results/kernels_resources_triton3_6_0_2026-12-06.md); beside the sweep: the CUDA resume test.
#   bash session.sh start SECONDS     # record the machine, measure, start the sweeps detached, wait, pack
#   bash session.sh wait SECONDS      # a later call on the same machine: wait, pack (results, logs, checkpoints)
set -u
cd "$(dirname "$0")/../../../.."
action="${1:?start | wait}"
seconds="${2:?SECONDS}"
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
if [[ "$action" == start ]]; then
  t0=$SECONDS
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print(torch.__version__, triton.__version__)"
    date -u
  } >"$OUT/gpu.txt" 2>&1
  {
    echo "== fp32 attention per tile ($(date -u +%T))"
    timeout 190 python -m benchmarks.mqar_profile attention --variants '[{}, {"warps_state": 4, "warps_grad": 8},
      {"tile": 8, "warps_grad": 8}, {"dtype": "float32"}, {"dtype": "float32", "tile": 16},
      {"dtype": "float32", "fp32_dot": "tf32x3"}]'
    echo "exit $? ($(date -u +%T))"
  } >"$OUT/attention_fp32.log" 2>&1
  grid="--gpus 0 train.precision=bf16"
  # shellcheck disable=SC2086
  bash $S start runs/s --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 3e-3 $grid \
    --then --mixers based --d-models 64 --seq-lens 1024 --lrs 1e-3 3e-3 $grid \
    --then --mixers rebased based --d-models 64 --seq-lens 2048 --lrs 1e-3 3e-3 $grid
  {
    echo "== CUDA resume test ($(date -u +%T))"
    timeout 240 python -m pytest -q -x tests/mqar/test_mqar_train.py -k "resume" -p no:cacheprovider
    echo "exit $? ($(date -u +%T))"
  } >"$OUT/resume_test.log" 2>&1
  seconds=$((seconds - (SECONDS - t0)))
fi
bash $S wait runs/s "$seconds" "$OUT/${stamp}_s.tgz" --checkpoints
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
