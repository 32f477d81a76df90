#!/usr/bin/env bash
# The next MQAR device session (prepared 2026-12-07, 22:50 UTC; rename this folder to the date it runs). In order:
#   1. seeds 1 and 2 of ReBased (lr 3e-3) and Based (lr 1e-3) at d_model 64, seq 512, bf16, their seed-0 best lrs:
#      the one point where Based is ahead against the paper's ordering (seed 0: 0.802 against 0.976); about 2.5
#      minutes each on an H100, one at a time;
#   2. ReBased at d_model 64, seq 2048, lr 3e-3 in fp32, 64 epochs (about 24 minutes on an H100; checkpointed every
#      epoch, so it goes on over the calls): against the bf16 run's 0.008 (0.065 against 0.0068 at epoch 43 in
#      ../gpu_2026-12-07c/), issue 17's bf16 against fp32 check at one hard setting.
# Every call: `bash benchmarks/results/mqar/gpu_next/session.sh SECONDS` (device tool: carry runs/carry; SECONDS about
# 30 below the call's timeout), the same whether the machine is still held or fresh; the first call of a session:
# `bash benchmarks/results/mqar/gpu_next/session.sh SECONDS first` (records the machine, runs the GPU tests: about
# 3 minutes). After every call, here:
#   bash benchmarks/mqar_gpu_session.sh collect FETCHED runs/carry
set -u
cd "$(dirname "$0")/../../../.." || exit 1
mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
seconds="${1:?SECONDS}"
deadline=$(( $(date +%s) + seconds ))
stamp="$(date -u +%H%M)"
if [[ "${2:-}" == first ]]; then
  bash benchmarks/mqar_gpu_session.sh machine "$OUT/gpu.txt"
  # the tests that take the GPU paths where there is one (the CPU runs them through Triton's interpreter), in full:
  # a test that passes interpreted can fail compiled, or assume the interpreter (as one of tests/models/test_loss.py
  # did until 2026-12-07d)
  timeout 170 python -m pytest -q -p no:cacheprovider -rf tests/kernels tests/models/test_loss.py \
    tests/generation/test_decoder.py >"$OUT/gpu_tests.txt" 2>&1
fi
seconds=$(( deadline - $(date +%s) ))
bash benchmarks/mqar_gpu_session.sh go runs/s "$((seconds - 15))" "$OUT/s_$stamp.tgz" --checkpoints --every 60 \
  --from runs/carry -- --mixers rebased --d-models 64 --seq-lens 512 --lrs 3e-3 --seeds 1 2 --gpus 0 \
  train.precision=bf16 \
  --then --mixers based --d-models 64 --seq-lens 512 --lrs 1e-3 --seeds 1 2 --gpus 0 train.precision=bf16 \
  --then --mixers rebased --d-models 64 --seq-lens 2048 --lrs 3e-3 --gpus 0 train.precision=fp32
status=$?  # the sweep's, once it has finished
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
exit "$status"
