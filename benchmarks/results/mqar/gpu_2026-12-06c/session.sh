#!/usr/bin/env bash
# The eleventh session's MQAR device work (2026-12-06), bf16 like the settings already run, one run at a time
# (two at once gain nothing at seq 2048: README), in this order:
#   1. Based, d_model 128, seq 2048, lr 3e-3, resumed from its epoch-28 checkpoint (carried in under runs/s);
#   2. Based, d_model 64, seq 1024, lr 1e-3 and 3e-3 (cut at epochs 59 / 55 on 2026-12-04, no checkpoint);
#   3. ReBased and Based, d_model 64, seq 2048, lr 3e-3, then lr 1e-3 at d_model 128, seq 2048.
# Every minute the results, logs and unfinished runs' checkpoints are packed into $OUT, so a call the lease cuts
# still returns what ran.
#   bash session.sh start SECONDS     # record the machine, start the sweeps detached, pack every minute
#   bash session.sh wait SECONDS      # a later call on the same warm machine: pack every minute
set -u
cd "$(dirname "$0")/../../../.."
action="${1:?start | wait}"
seconds="${2:?SECONDS}"
S=benchmarks/mqar_gpu_session.sh
end=$((SECONDS + seconds))
stamp="$(date -u +%H%M)"
if [[ "$action" == start ]]; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print(torch.__version__, triton.__version__)"
    git rev-parse HEAD 2>/dev/null
    date -u
  } >"$OUT/gpu.txt" 2>&1
  grid="--gpus 0 train.precision=bf16"
  # shellcheck disable=SC2086
  bash $S start runs/s --mixers based --d-models 128 --seq-lens 2048 --lrs 3e-3 $grid \
    --then --mixers based --d-models 64 --seq-lens 1024 --lrs 1e-3 3e-3 $grid \
    --then --mixers rebased based --d-models 64 --seq-lens 2048 --lrs 3e-3 $grid \
    --then --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 1e-3 $grid
fi
stage="$(mktemp -d)"
while ((SECONDS < end)); do
  step=$((end - SECONDS < 60 ? end - SECONDS : 60))
  bash $S wait runs/s "$step" "$stage/${stamp}_s.tgz" --checkpoints >"$stage/wait_$stamp.log" 2>&1
  # swap the new pack in at once: a cut never leaves $OUT without a checkpoint of a run still going
  rm -f "$OUT"/*.ckpt "$OUT"/*.ckpt.part* && mv "$stage"/* "$OUT"/
  grep -q "sweep finished" "$OUT/wait_$stamp.log" && break
done
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
