#!/usr/bin/env bash
# The session's third call (2026-12-08): the GPU-path tests again, in verbose mode so that a cut run still names
# its failures (the first call's quiet run was cut at 170 s with two failures unnamed), and beside them on the same
# GPU ReBased at d_model 64, seq 512, lr 1e-2, seeds 0 1 2 in bf16 (seed 0 was cut at epoch 43 at >= 0.870 in
# ../h200_2026-12-04c/; ReBased's accuracy there rises with the lr). Device tool: carry nothing; timeout T, then
#   bash benchmarks/results/mqar/gpu_2026-12-07e/call3.sh SECONDS      # SECONDS about 15 below T
set -u
cd "$(dirname "$0")/../../../.." || exit 1
seconds="${1:?SECONDS}"
(timeout "$((seconds - 10))" python -m pytest -v -p no:cacheprovider -rf --tb=short tests/kernels \
   tests/models/test_loss.py tests/generation/test_decoder.py >"$OUT/gpu_tests_v.txt" 2>&1
 echo "pytest exit $?" >>"$OUT/gpu_tests_v.txt") &
bash benchmarks/mqar_gpu_session.sh go runs/s3 "$((seconds - 5))" "$OUT/s3.tgz" --checkpoints --every 60 -- \
  --mixers rebased --d-models 64 --seq-lens 512 --lrs 1e-2 --seeds 0 1 2 --gpus 0 train.precision=bf16
status=$?
wait
exit "$status"
