#!/usr/bin/env bash
# The MQAR device session of 2026-12-07, from 00:00 UTC (prepared 2026-12-06, 23:55). bf16 like the settings
# already run.
#   speed: timings of the same command (`python -m benchmarks.mqar_speed`, early stop off): d_model 128, seq 2048
#     (3 epochs; this card's baseline, and with micro-batches of 1M tokens, the whole 512-sequence batch in one,
#     against the default 512k), and d_model 512, seq 2048 (2 epochs; the grid estimate lacks d 512). Packing runs
#     is not timed again: two at once at seq 2048 took 19-20 s per epoch each against 8.6 alone (H100, 2026-12-05).
#   go: resumable, one run at a time:
#     1. Based, d_model 64, seq 2048, lr 1e-3 from its checkpoint after epoch 25 (in runs/carry);
#     2. ReBased, then Based, d_model 128, seq 2048, lr 1e-2.
#
#   bash session.sh first SECONDS     # records the machine, runs `speed`, then `go` for what is left of SECONDS
#   bash session.sh go SECONDS        # every later call, the same whether the machine is still held or fresh
# (device tool: carry runs/carry). After every call, here: bash benchmarks/mqar_gpu_session.sh collect FETCHED runs/carry
set -u
cd "$(dirname "$0")/../../../.." || exit 1
mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
action="${1:?first | go}"
seconds="${2:?SECONDS}"
deadline=$(( $(date +%s) + seconds ))
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
if [[ "$action" == first ]]; then
  bash $S machine "$OUT/gpu.txt"
  speed() {  # NAME TIMEOUT ARGS...: one mqar_speed table, kept whether it finishes or is cut
    local name="$1" limit="$2"
    shift 2
    timeout "$limit" python -m benchmarks.mqar_speed --out "/tmp/speed/$name" "$@" >"/tmp/speed/$name.log" 2>&1
    echo "speed $name: exit $?" >>/tmp/speed/exits.txt
  }
  mkdir -p /tmp/speed
  speed alone 170 --settings rebased:128:2048 --epochs 3 --variant bf16=train.precision=bf16 \
    --variant bf16_micro1M=train.precision=bf16,train.micro_batch_tokens=1048576
  speed d512 130 --settings rebased:512:2048 --epochs 2 --variant bf16=train.precision=bf16
  nvidia-smi >"/tmp/speed/nvidia_smi.txt" 2>&1
  tar czf "$OUT/speed.tgz" -C /tmp speed
fi
grid="--gpus 0 train.precision=bf16"
# shellcheck disable=SC2086
bash $S go runs/s $(( deadline - $(date +%s) - 15 )) "$OUT/s_$stamp.tgz" --checkpoints --every 60 --from runs/carry -- \
  --mixers based --d-models 64 --seq-lens 2048 --lrs 1e-3 $grid \
  --then --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 1e-2 $grid
status=$?  # the sweep's, once it has finished
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
exit "$status"
