#!/usr/bin/env bash
# The next MQAR device session (prepared 2026-12-08; rename this folder to the date it runs). In order:
#   1. ReBased at d_model 64, seq 2048, lr 3e-3 in fp32, 64 epochs: issue 17's bf16 against fp32 check at one hard
#      setting (bf16: 0.008 after 64 epochs; fp32 was at 0.065 against bf16's 0.0068 at epoch 43 in
#      ../gpu_2026-12-07c/). About 21.9 s per epoch on an H100, 24 minutes in all: nearly a whole session's device
#      time, so it goes first, checkpointed every epoch and carried over the calls;
#   2. ReBased at d_model 64, seq 512, lr 1e-2, seeds 0 1 2, bf16 (about 2.5 minutes each on an H100): ReBased's
#      accuracy there rises with the lr, and Based leads at its best lr (../gpu_2026-12-07e/).
# The first call also runs the GPU-path tests, verbose (a cut run still names its failures), in the background
# beside the sweep (they are small; the fp32 run's first epochs are timed a little slow).
# Every call: `bash benchmarks/results/mqar/gpu_next/session.sh SECONDS` (device tool: carry runs/carry; SECONDS about
# 30 below the call's timeout), the same whether the machine is still held or fresh; the first call of a session:
# `bash benchmarks/results/mqar/gpu_next/session.sh SECONDS first`. After every call, here:
#   bash benchmarks/mqar_gpu_session.sh collect FETCHED runs/carry
set -u
cd "$(dirname "$0")/../../../.." || exit 1
mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
seconds="${1:?SECONDS}"
stamp="$(date -u +%H%M)"
if [[ "${2:-}" == first ]]; then
  bash benchmarks/mqar_gpu_session.sh machine "$OUT/gpu.txt"
  # the tests that take the GPU paths where there is one (the CPU runs them through Triton's interpreter): a test
  # that passes interpreted can fail compiled, or assume the interpreter
  # (test_triton_attention first: its bf16 case b2t70h2v32-...-c16s32-rebased failed on the H100 of
  # ../gpu_2026-12-07e/, whose quiet output kept no error figures)
  (timeout "$((seconds - 20))" python -m pytest -v -p no:cacheprovider -rf --tb=short \
     tests/kernels/test_triton_attention.py tests/kernels tests/models/test_loss.py tests/generation/test_decoder.py \
     >"$OUT/gpu_tests.txt" 2>&1
   echo "pytest exit $?" >>"$OUT/gpu_tests.txt") &
fi
bash benchmarks/mqar_gpu_session.sh go runs/s "$((seconds - 15))" "$OUT/s_$stamp.tgz" --checkpoints --every 60 \
  --from runs/carry -- --mixers rebased --d-models 64 --seq-lens 2048 --lrs 3e-3 --gpus 0 train.precision=fp32 \
  --then --mixers rebased --d-models 64 --seq-lens 512 --lrs 1e-2 --seeds 0 1 2 --gpus 0 train.precision=bf16
status=$?  # the sweep's, once it has finished
wait
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
exit "$status"
