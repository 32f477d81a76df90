#!/usr/bin/env bash
# The twelfth session's MQAR device work (2026-12-06), bf16 like the settings already run, one run at a time, in
# this order (the five settings of the issue's first 24 still to run):
#   1. Based, d_model 64, seq 2048, lr 3e-3, resumed from its epoch-10 checkpoint (carried in under runs/s);
#   2. ReBased, then Based, d_model 128, seq 2048, lr 1e-3 (the paper-quoted point);
#   3. ReBased, then Based, d_model 64, seq 2048, lr 1e-3.
# The first call also runs the eager-path kernel tests on the GPU beside the sweep (a few seconds of GPU).
#   bash session.sh start SECONDS     # record the machine, start the sweeps detached, pack every minute
#   bash session.sh wait SECONDS      # a later call on the same warm machine: pack every minute
set -u
cd "$(dirname "$0")/../../../.."
action="${1:?start | wait}"
seconds="${2:?SECONDS}"
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
if [[ "$action" == start ]]; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print(torch.__version__, triton.__version__)"
    date -u
  } >"$OUT/gpu.txt" 2>&1
  grid="--gpus 0 train.precision=bf16"
  # shellcheck disable=SC2086
  bash $S start runs/s --mixers based --d-models 64 --seq-lens 2048 --lrs 3e-3 $grid \
    --then --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 1e-3 $grid \
    --then --mixers rebased based --d-models 64 --seq-lens 2048 --lrs 1e-3 $grid
  (WANDB_MODE=disabled timeout 300 python -m pytest -q tests/kernels/test_eager_op.py >"$OUT/gpu_tests.log" 2>&1;
    echo "exit $?" >>"$OUT/gpu_tests.log") &
fi
bash $S wait runs/s "$seconds" "$OUT/s_$stamp.tgz" --checkpoints --every 60
wait
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
