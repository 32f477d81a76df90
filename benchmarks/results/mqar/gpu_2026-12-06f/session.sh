#!/usr/bin/env bash
# MQAR device session of 2026-12-06 (fourteenth session): the sequential walk of the attention kernels
# (kernels/linear_attention/triton_chunk/sequential.py) checked and timed against the chunk-parallel kernels, then
# the sweep. bf16 like the settings already run. A record: the walk and its `sequential*` knobs were removed after
# this session measured them (README.md here), so only `go` still runs; the next sweep ran as ../gpu_2026-12-06g/session.sh.
#
#   bash session.sh kernels SECONDS   # call 1: the walk's GPU tests, the op alone per launch variant, and issue
#                                     # 17's epoch time with the chunk-parallel kernels and with the walk
#   bash session.sh speed SECONDS     # the epoch times alone, then `go`
#   bash session.sh go SECONDS        # later calls (device tool: carry runs/carry), held machine or fresh
# After every sweep call, here: bash benchmarks/mqar_gpu_session.sh collect FETCHED_FOLDER runs/carry
#
# Sweep order: Based d 64, seq 2048, lr 1e-3 (the last of the issue's first 24 settings); Based d 64, seq 1024,
# lr 1e-2 (ReBased there gained 0.209 -> 0.440 from lr 1e-2); ReBased, then Based, d 128, seq 2048, lr 1e-2.
set -u
cd "$(dirname "$0")/../../../.." || exit 1
action="${1:?kernels | speed | go}"
seconds="${2:?SECONDS}"
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
start=$SECONDS
case "$action" in
  kernels)
    bash $S machine "$OUT/gpu.txt"
    # the walk against float64 at the MQAR shapes (and the tiny ones), the chunk-parallel kernels' MQAR-shape cases
    timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_triton_sequential.py \
      tests/kernels/test_triton_attention.py -k "sequential or h12 or v10 or v5" >"$OUT/gpu_tests_$stamp.txt" 2>&1
    tests=$?
    tail -n 5 "$OUT/gpu_tests_$stamp.txt"
    [[ $tests == 0 ]] || exit "$tests"
    # forward + backward of the op, batch x 2048 tokens x 12 heads, bf16; value heads of 10 (d 128) and 5 (d 64)
    timeout 200 python -m benchmarks.mqar_profile attention --variants '[
      {"sequential": false}, {"sequential": true},
      {"sequential": true, "warps_sequential": 8}, {"sequential": true, "sequential_chunk": 32, "warps_sequential": 8},
      {"dv": 5, "sequential": false}, {"dv": 5, "sequential": true, "warps_sequential": 8},
      {"batch": 32, "sequential": false}, {"batch": 32, "sequential": true, "warps_sequential": 8}]' \
      >"$OUT/attention_variants_$stamp.txt" 2>&1
    cat "$OUT/attention_variants_$stamp.txt"
    # issue 17's setting, the same command with the chunk-parallel kernels (before) and the walk (after)
    timeout $((seconds - (SECONDS - start) - 15)) python -m benchmarks.mqar_speed --out "$OUT/speed" --epochs 3 \
      --settings rebased:128:2048 \
      --variant chunk_parallel=train.precision=bf16,train.attention_launch.sequential=false \
      --variant walk=train.precision=bf16,train.attention_launch.sequential=true \
      --variant walk_8_warps=train.precision=bf16,train.attention_launch.sequential=true,train.attention_launch.warps_sequential=8 \
      >"$OUT/speed_$stamp.txt" 2>&1
    grep -v "^{" "$OUT/speed_$stamp.txt" | tail -n 6
    # one archive: the device tool returns at most 8 files
    tar czf "$OUT/speed_$stamp.tgz" -C "$OUT" speed && rm -rf "$OUT/speed"
    ;;
  speed|go)
    mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
    if [[ "$action" == speed ]]; then
      bash $S machine "$OUT/gpu.txt"
      # issue 17's setting, the same command before (chunk-parallel) and after (the walk, the default)
      timeout 260 python -m benchmarks.mqar_speed --out "$OUT/speed" --epochs 3 --settings rebased:128:2048 \
        --variant chunk_parallel=train.precision=bf16,train.attention_launch.sequential=false \
        --variant default=train.precision=bf16 >"$OUT/speed_$stamp.txt" 2>&1
      tail -n 4 "$OUT/speed_$stamp.txt"
      # one archive: the device tool returns at most 8 files
      tar czf "$OUT/speed_$stamp.tgz" -C "$OUT" speed && rm -rf "$OUT/speed"
    fi
    grid="--gpus 0 train.precision=bf16"
    # shellcheck disable=SC2086
    bash $S go runs/s $((seconds - (SECONDS - start))) "$OUT/s_$stamp.tgz" --checkpoints --every 60 \
      --from runs/carry -- \
      --mixers based --d-models 64 --seq-lens 2048 --lrs 1e-3 $grid \
      --then --mixers based --d-models 64 --seq-lens 1024 --lrs 1e-2 $grid \
      --then --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 1e-2 $grid
    status=$?  # the sweep's, once it has finished
    nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
    exit "$status"
    ;;
  *) echo "unknown action $action (kernels | speed | go)" >&2; exit 2 ;;
esac
