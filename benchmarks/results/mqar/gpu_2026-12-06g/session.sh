#!/usr/bin/env bash
# MQAR device session of 2026-12-06 (evening; prepared earlier that day). bf16 like the
# settings already run, one run at a time, in this order:
#   1. Based, d_model 64, seq 2048, lr 1e-3: the last of the issue's first 24 settings (cut at epoch 36, at chance,
#      on 2026-12-06e; its checkpoint resumes it if it is still here in runs/carry);
#   2. Based, d_model 64, seq 1024, lr 1e-2 to the end (cut at epoch 21 on 2026-12-04c at 0.115): ReBased there gained
#      0.209 -> 0.440 from lr 1e-2, so the two mixers are compared over the same four lrs at the paper's point;
#   3. ReBased, then Based, d_model 128, seq 2048, lr 1e-2 (about 9 min each on an H100; resumable).
# Before the sweep, the first call measures the epoch time of d_model 512 at seq 2048 (ReBased, bf16, two epochs),
# the one width the sweep's --dry-run estimate has no measurement for; about 2 minutes.
#
#   bash session.sh first SECONDS     # the d_model-512 epoch time, then `go`       (device tool: carry runs/carry)
#   bash session.sh go SECONDS        # every later call, the same whether the machine is still held or fresh
# After every call, here: bash benchmarks/mqar_gpu_session.sh collect FETCHED_FOLDER runs/carry
set -u
cd "$(dirname "$0")/../../../.." || exit 1
mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
action="${1:?first | go}"
seconds="${2:?SECONDS}"
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
if [[ "$action" == first ]]; then
  bash $S machine "$OUT/gpu.txt"
  start=$SECONDS
  timeout 170 python -m benchmarks.mqar_speed --out runs/speed512 --epochs 2 --settings rebased:512:2048 \
    --variant bf16=train.precision=bf16 >"$OUT/speed512_$stamp.txt" 2>&1
  cp runs/speed512/mqar_speed.json "$OUT/mqar_speed_d512.json" 2>/dev/null
  tail -n 4 "$OUT/speed512_$stamp.txt"
  seconds=$((seconds - (SECONDS - start)))
fi
grid="--gpus 0 train.precision=bf16"
# shellcheck disable=SC2086
bash $S go runs/s "$seconds" "$OUT/s_$stamp.tgz" --checkpoints --every 60 --from runs/carry -- \
  --mixers based --d-models 64 --seq-lens 2048 --lrs 1e-3 $grid \
  --then --mixers based --d-models 64 --seq-lens 1024 --lrs 1e-2 $grid \
  --then --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 1e-2 $grid
status=$?  # the sweep's, once it has finished
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
exit "$status"
