#!/usr/bin/env bash
# A last short call of the session (2026-12-08): the attention op alone at issue 17's shape (batch 256 x 2048
# tokens x 12 heads, Dv 10, bf16) under the two launch configurations that compile without register spills on
# Triton 3.6 (../../kernels_resources_mqar_variants_triton3_6_0_2026-12-06.json) and were never timed, beside the
# default; then, with what time is left, the GPU-path tests in verbose mode (a cut run still names its failures).
#   bash benchmarks/results/mqar/gpu_2026-12-07e/call4.sh SECONDS
set -u
cd "$(dirname "$0")/../../../.." || exit 1
deadline=$(( $(date +%s) + ${1:?SECONDS} ))
python -m benchmarks.mqar_profile attention --variants '[{}, {"tile": 8, "warps_grad": 8},
  {"chunk": 128, "tile": 8, "warps_out": 8, "warps_grad": 8, "warps_state": 4}]' 2>&1 | tee "$OUT/attention_variants.txt"
left=$(( deadline - $(date +%s) ))
if (( left > 20 )); then
  timeout "$left" python -m pytest -v -p no:cacheprovider -rf --tb=short tests/kernels/test_triton_attention.py \
    tests/kernels tests/models/test_loss.py tests/generation/test_decoder.py >"$OUT/gpu_tests_v.txt" 2>&1
  echo "pytest exit $?" >>"$OUT/gpu_tests_v.txt"
fi
