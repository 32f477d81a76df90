#!/usr/bin/env bash
# The seventh session's MQAR sweeps (2026-12-05), bf16 like the 12 settings already run (ran on a lent H100: no H200 came):
#   a: ReBased and Based at d_model 64, seq 2048, lr 1e-3 / 3e-3 (issue 17's hard setting), four runs at once;
#   b: Based at d_model 128, seq 1024, lr 1e-3 / 3e-3 (the L 1024 row's missing Based half), beside them.
#   bash session.sh start SECONDS      # record the machine, start both sweeps detached, wait, pack
#   bash session.sh wait SECONDS [--checkpoints]   # a later call on the same machine: wait, pack
# Each call packs the sweeps' results and logs under $OUT/<call>_{a,b}.tgz, so a machine lost mid-way costs only
# the runs, never the results already finished.
set -u
cd "$(dirname "$0")/../../../.."
action="${1:?start | wait}"
seconds="${2:?SECONDS}"
checkpoints="${3:-}"
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
if [[ "$action" == start ]]; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print(torch.__version__, triton.__version__)"
    date -u
  } >"$OUT/gpu.txt" 2>&1
  bash $S start runs/a --mixers rebased based --d-models 64 --seq-lens 2048 --lrs 1e-3 3e-3 --gpus 0 \
    --runs-per-gpu 4 train.precision=bf16
  bash $S start runs/b --mixers based --d-models 128 --seq-lens 1024 --lrs 1e-3 3e-3 --gpus 0 \
    --runs-per-gpu 2 train.precision=bf16
  (sleep 90 && nvidia-smi >"$OUT/nvidia_smi.txt" 2>&1) &
fi
# one wait covers both sweeps: b (shorter) is packed without waiting, after a's wait has used the time
bash $S wait runs/a "$seconds" "$OUT/${stamp}_a.tgz" $checkpoints
bash $S wait runs/b 1 "$OUT/${stamp}_b.tgz" $checkpoints
wait
