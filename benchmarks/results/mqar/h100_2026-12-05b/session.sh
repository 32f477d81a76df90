#!/usr/bin/env bash
# The eighth session's MQAR device work (2026-12-05), bf16 like the 14 settings already run:
#   a: ReBased and Based at d_model 128, seq 2048, lr 3e-3 (the paper's quoted point, 0.66 / 0.48), two at once;
#   beside them at the start, where the 3xTF32 path loses its time: the head's three matmuls per precision, then
#   a torch.profiler trace of two optimizer steps of issue 17's setting with train.precision=tf32x3.
#   bash session.sh start SECONDS     # record the machine, start the sweep detached, profile, wait, pack
#   bash session.sh wait SECONDS      # a later call on the same machine: wait, pack (results, logs, checkpoints)
# Each call packs the sweep's results, logs and unfinished runs' checkpoints under $OUT, so a machine lost mid-way
# costs only the epochs since the last call.
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
  bash $S start runs/a --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 3e-3 --gpus 0 \
    --runs-per-gpu 2 train.precision=bf16
  (sleep 120 && nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1) &
  {
    echo "== head matmuls per precision ($(date -u +%T))"
    timeout 90 python -m benchmarks.mqar_profile head --setting rebased:128:2048
    echo "exit $?"
    echo "== tf32x3 profile, 2 steps ($(date -u +%T))"
    timeout 240 python -m benchmarks.mqar_profile profile --setting rebased:128:2048 --steps 2 \
      --override train.precision=tf32x3
    echo "exit $?"
    echo "== done ($(date -u +%T))"
  } >"$OUT/tf32x3_profile.log" 2>&1
  seconds=$((seconds - (SECONDS - t0)))
fi
bash $S wait runs/a "$seconds" "$OUT/${stamp}_a.tgz" --checkpoints
