#!/usr/bin/env bash
# The next MQAR device session (prepared 2026-12-07, 16:30 UTC; rename this folder to the date it runs). In order:
#   1. (first call) the fused LM-head loss on the GPU: its tests, its speed against the chunked path
#      (`benchmarks.linear_cross_entropy_speed`) and issue 17's speed command with and without it
#      (`train.fused_head_loss`), about 4 minutes; `$OUT/fused.tgz`;
#   2. seeds 1 and 2 of ReBased and Based at d_model 64, seq 1024, lr 1e-2, bf16, two runs at a time (seed 0:
#      ReBased 0.440, Based 0.378; the paper's five-seed means ≈ 0.55 and ≈ 0.33), about 4.5 minutes each alone on
#      an H100;
#   3. seed 1 of ReBased (lr 3e-3) and Based (lr 1e-3) at d_model 64, seq 512, bf16, their seed-0 best lrs (seed 0:
#      0.802 and 0.976), about 9 minutes each. (The fp32 run of ReBased at d 64, seq 2048 needs about 24 minutes
#      afresh: its epoch-43 checkpoint did not outlive the last session's machine, so it waits for a longer lease.)
# Every call: `bash benchmarks/results/mqar/gpu_next/session.sh SECONDS` (device tool: carry runs/carry; SECONDS about
# 30 below the call's timeout), the same whether the machine is still held or fresh; the first call of a session:
# `bash benchmarks/results/mqar/gpu_next/session.sh SECONDS first`. After every call, here:
#   bash benchmarks/mqar_gpu_session.sh collect FETCHED runs/carry
# (then move runs/carry/fused, unpacked from fused.tgz, into this folder).
set -u
cd "$(dirname "$0")/../../../.." || exit 1
mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
seconds="${1:?SECONDS}"
deadline=$(( $(date +%s) + seconds ))
stamp="$(date -u +%H%M)"
if [[ "${2:-}" == first ]]; then
  bash benchmarks/mqar_gpu_session.sh machine "$OUT/gpu.txt"
  mkdir -p /tmp/fused
  { date -u
    timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_triton_linear_cross_entropy.py \
      tests/models/test_loss.py 2>&1 | tail -8
    timeout 150 python -m benchmarks.linear_cross_entropy_speed --out /tmp/fused/lce_speed.json 2>&1 | tail -30
  } >/tmp/fused/lce.txt 2>&1
  timeout 240 python -m benchmarks.mqar_speed --out /tmp/fused/speed --epochs 3 \
    --variant chunked=train.precision=bf16 --variant fused=train.precision=bf16,train.fused_head_loss=true \
    >/tmp/fused/speed.txt 2>&1
  tar czf "$OUT/fused.tgz" -C /tmp fused
fi
seconds=$(( deadline - $(date +%s) ))
# shellcheck disable=SC2086
bash benchmarks/mqar_gpu_session.sh go runs/s "$((seconds - 15))" "$OUT/s_$stamp.tgz" --checkpoints --every 60 \
  --from runs/carry -- --mixers rebased based --d-models 64 --seq-lens 1024 --lrs 1e-2 --seeds 1 2 --gpus 0 \
  --runs-per-gpu 2 train.precision=bf16 \
  --then --mixers rebased --d-models 64 --seq-lens 512 --lrs 3e-3 --seeds 1 --gpus 0 train.precision=bf16 \
  --then --mixers based --d-models 64 --seq-lens 512 --lrs 1e-3 --seeds 1 --gpus 0 train.precision=bf16
status=$?  # the sweep's, once it has finished
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
exit "$status"
