#!/usr/bin/env bash
# The next MQAR device session (prepared 2026-12-07, 09:50 UTC; rename this folder to the date it runs). bf16 unless
# said, one run at a time (two at once share a full GPU: no gain at these lengths). In this order:
#   1. seeds 1 and 2 of both mixers at d_model 64, seq 1024, lr 1e-2 (seed 0: ReBased 0.440, Based 0.378; the
#      paper's five-seed means ≈ 0.55 and ≈ 0.33): the seed spread at a point where ours and the paper's differ
#      (about 4.5 minutes each on an H100);
#   2. ReBased, d_model 64, seq 2048, lr 3e-3 in fp32, the original's precision (bf16: 0.008), issue 17's bf16 against
#      fp32 check at one hard setting (about 3× bf16's 7.7 s per epoch: it resumes over two or three calls).
# Every call: `bash benchmarks/results/mqar/gpu_next/session.sh SECONDS` (device tool: carry runs/carry; SECONDS about
# 30 below the call's timeout), the same whether the machine is still held or fresh. The first call of a session:
# `bash benchmarks/results/mqar/gpu_next/session.sh SECONDS first`, which before the sweep records the machine and,
# on the idle GPU, profiles the d_model 128, seq 2048 step as it is now (the last profile predates the Triton loss
# kernel; about 2 minutes; `$OUT/profile_d128.txt`) and measures the attention kernels' bf16 error at the MQAR
# shapes (`$OUT/errors.txt`). After every call, here:
#   bash benchmarks/mqar_gpu_session.sh collect FETCHED runs/carry
set -u
cd "$(dirname "$0")/../../../.." || exit 1
mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
seconds="${1:?SECONDS}"
deadline=$(( $(date +%s) + seconds ))
stamp="$(date -u +%H%M)"
if [[ "${2:-}" == first ]]; then
  bash benchmarks/mqar_gpu_session.sh machine "$OUT/gpu.txt"
  timeout 180 python -m benchmarks.mqar_profile profile --setting rebased:128:2048 --steps 4 \
    --override train.precision=bf16 >"$OUT/profile_d128.txt" 2>&1
  echo "profile: exit $?" >>"$OUT/profile_d128.txt"
  # the kernels' bf16 error against float64 at the MQAR shapes, as they are now (the last table, 2026-12-04, predates
  # the 16 x 16 tiles narrow value heads use; ReBased's dq and dk were then 4-5x less accurate at value heads of 5
  # and 10 than at 16 or more, Based's not: a lead for ReBased's gap to the paper; about a minute)
  timeout 150 python -m benchmarks.mqar_profile errors >"$OUT/errors.txt" 2>&1
  echo "errors: exit $?" >>"$OUT/errors.txt"
fi
seconds=$(( deadline - $(date +%s) ))
# shellcheck disable=SC2086
bash benchmarks/mqar_gpu_session.sh go runs/s "$((seconds - 15))" "$OUT/s_$stamp.tgz" --checkpoints --every 60 \
  --from runs/carry -- --mixers rebased based --d-models 64 --seq-lens 1024 --lrs 1e-2 --seeds 1 2 --gpus 0 \
  train.precision=bf16 \
  --then --mixers rebased --d-models 64 --seq-lens 2048 --lrs 3e-3 --gpus 0 train.precision=fp32
status=$?  # the sweep's, once it has finished
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
exit "$status"
