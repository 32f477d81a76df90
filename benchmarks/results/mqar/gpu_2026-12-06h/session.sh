#!/usr/bin/env bash
# The MQAR device session of 2026-12-06, 21:00 UTC on (prepared that evening). bf16 like the
# settings already run, one run at a time, in this order:
#   1. Based, d_model 64, seq 1024, lr 1e-2 to the end (cut at epoch 34 on 2026-12-06g at 0.355; its checkpoint
#      resumes it if it is still in runs/carry, else it starts afresh: about 5 minutes on an H100);
#   2. Based, d_model 64, seq 2048, lr 1e-3: the last of the issue's first 24 settings (about 8 minutes);
#   3. ReBased, then Based, d_model 128, seq 2048, lr 1e-2 (about 9 min each on an H100; resumable).
#
#   bash session.sh first SECONDS     # records the machine, then `go`       (device tool: carry runs/carry)
#   bash session.sh go SECONDS        # every later call, the same whether the machine is still held or fresh
#   bash session.sh speed             # d_model 512's epoch time (bf16, seq 2048), for the grid's estimate; alone
# After every call, here: bash benchmarks/mqar_gpu_session.sh collect FETCHED_FOLDER runs/carry
set -u
cd "$(dirname "$0")/../../../.." || exit 1
mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
action="${1:?first | go | speed}"
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
if [[ "$action" == speed ]]; then
  bash $S machine "$OUT/gpu_speed.txt"
  python -m benchmarks.mqar_speed --out /tmp/speed512 --settings rebased:512:2048 --epochs 2 \
    --variant bf16=train.precision=bf16 2>&1 | tail -5
  status=${PIPESTATUS[0]}
  cp /tmp/speed512/mqar_speed.json "$OUT/mqar_speed_d512.json"
  tar czf "$OUT/speed512.tgz" -C /tmp speed512
  exit "$status"
fi
seconds="${2:?SECONDS}"
if [[ "$action" == first ]]; then
  bash $S machine "$OUT/gpu.txt"
fi
grid="--gpus 0 train.precision=bf16"
# shellcheck disable=SC2086
bash $S go runs/s "$seconds" "$OUT/s_$stamp.tgz" --checkpoints --every 60 --from runs/carry -- \
  --mixers based --d-models 64 --seq-lens 1024 --lrs 1e-2 $grid \
  --then --mixers based --d-models 64 --seq-lens 2048 --lrs 1e-3 $grid \
  --then --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 1e-2 $grid
status=$?  # the sweep's, once it has finished
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
exit "$status"
