#!/usr/bin/env bash
# MQAR device session of 2026-12-06 (evening; prepared earlier that day). bf16 like the
# settings already run, one run at a time, in this order:
#   1. Based, d_model 64, seq 1024, lr 1e-2 to the end (cut at epoch 21 on 2026-12-04c at 0.115): ReBased there gained
#      0.209 -> 0.440 from lr 1e-2, so the two mixers are compared over the same four lrs at the paper's point (about
#      5 minutes: first, as it fits the short call the device budget leaves);
#   2. Based, d_model 64, seq 2048, lr 1e-3: the last of the issue's first 24 settings (cut at epoch 36, at chance,
#      on 2026-12-06e; its checkpoint resumes it if it is still here in runs/carry);
#   3. ReBased, then Based, d_model 128, seq 2048, lr 1e-2 (about 9 min each on an H100; resumable).
# Before the sweep, the first call measures the gradient kernel's contraction as one tensor-core product
# (ChunkLaunchConfig.grad_contract "matmul", and "matmul_split" with its fp32 operand split in two bf16 parts) against
# the default reductions: the op alone at value heads of 10 and 5, its error against float64, and whole epochs
# of ReBased d_model 128, seq 2048 (about 5 minutes), then runs the sweep for what is left.
#
#   bash session.sh first SECONDS     # the contraction variants, then `go`       (device tool: carry runs/carry)
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
  timeout 200 python -m benchmarks.mqar_profile attention --variants '[{}, {"grad_contract": "matmul"},
    {"grad_contract": "matmul_split"}, {"dv": 5}, {"dv": 5, "grad_contract": "matmul"}]' \
    >"$OUT/contract_op_$stamp.txt" 2>&1
  cat "$OUT/contract_op_$stamp.txt"
  timeout 90 python -m benchmarks.mqar_profile errors --variants '[{}, {"grad_contract": "matmul"},
    {"grad_contract": "matmul_split"}]' >"$OUT/contract_errors_$stamp.txt" 2>&1
  grep -v "dv=16\|dv=64" "$OUT/contract_errors_$stamp.txt"
  timeout 180 python -m benchmarks.mqar_speed --out runs/speed --epochs 2 --settings rebased:128:2048 \
    --variant bf16=train.precision=bf16 \
    --variant bf16_matmul=train.precision=bf16,"train.attention_launch={grad_contract: matmul}" \
    >"$OUT/contract_epochs_$stamp.txt" 2>&1
  cp runs/speed/mqar_speed.json "$OUT/mqar_speed_contract.json" 2>/dev/null
  tail -n 4 "$OUT/contract_epochs_$stamp.txt"
  seconds=$((seconds - (SECONDS - start)))
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
