#!/usr/bin/env bash
# The MQAR device session of 2026-12-06 (afternoon, the fifth of that date). bf16 like the
# settings already run, one run at a time, in this order:
#   1. ReBased, d_model 64, seq 1024, lr 1e-2 to the end (cut at epoch 22 on 2026-12-04 at 0.245 and rising: is
#      the paper's ≈ 0.55 at this point a matter of the lr our best-of-two-lrs table lacks?);
#   2. ReBased, then Based, d_model 64, seq 2048, lr 1e-3: the last two of the issue's first 24 settings.
# When the sweeps end (or with `variants`), the attention op alone at the MQAR shapes (value heads of 10 and 5)
# under launch configurations that compile without register spills for Triton 3.6 (benchmarks.kernels_resources):
# 8 x 8 tiles with 8 gradient warps, and chunks of 128 (half the per-chunk states).
#   bash session.sh start SECONDS     # record the machine, start the sweeps detached, pack every minute
#   bash session.sh wait SECONDS      # a later call on the same warm machine: pack every minute
#   bash session.sh variants          # the attention variants (about 3 minutes; nothing else on the GPU)
set -u
cd "$(dirname "$0")/../../../.."
action="${1:?start | wait | variants}"
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
if [[ "$action" == variants ]]; then
  python -m benchmarks.mqar_profile attention --variants '[{}, {"tile": 8, "warps_grad": 8},
    {"chunk": 128, "tile": 8, "warps_out": 8, "warps_grad": 8, "warps_state": 4},
    {"dv": 5}, {"dv": 5, "tile": 8, "warps_grad": 8},
    {"dv": 5, "chunk": 128, "tile": 8, "warps_out": 8, "warps_grad": 8, "warps_state": 4}]' \
    2>&1 | tee "$OUT/attention_variants_$stamp.txt"
  exit 0
fi
seconds="${2:?SECONDS}"
if [[ "$action" == start ]]; then
  bash $S machine "$OUT/gpu.txt"
  grid="--gpus 0 train.precision=bf16"
  # shellcheck disable=SC2086
  bash $S start runs/s --mixers rebased --d-models 64 --seq-lens 1024 --lrs 1e-2 $grid \
    --then --mixers rebased based --d-models 64 --seq-lens 2048 --lrs 1e-3 $grid
fi
bash $S wait runs/s "$seconds" "$OUT/s_$stamp.tgz" --checkpoints --every 60
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
