#!/usr/bin/env bash
# The MQAR device session prepared 2026-12-06, 23:55 UTC. No machine came for it until 2026-12-07, 07:52 UTC, with
# too little device time left for `first`: it ran once as `go 300` (README.md here). bf16 like the settings
# already run; one run at a time (two at once at seq 2048 took 19-20 s per epoch each against 8.6 alone: H100,
# 2026-12-05).
#   first SECONDS: records the machine, then
#     1. Based, d_model 64, seq 2048, lr 1e-3 from its checkpoint after epoch 25 (in runs/carry) to the end: the last
#        of the issue's first 24 settings (about 5 minutes);
#     2. timings of `python -m benchmarks.mqar_speed` (early stop off) in what is left: d_model 128, seq 2048 for 3
#        epochs (this card's baseline, and with micro-batches of 1M tokens, the whole 512-sequence batch in one,
#        against the default 512k), then d_model 512, seq 2048 for 2 (the grid estimate lacks d 512).
#   go SECONDS: every later call, the same whether the machine is still held or fresh: run 1 if it has not finished,
#     then ReBased and Based, d_model 128, seq 2048, lr 1e-2 (about 9 minutes each on an H100; resumable).
# With less than about 400 s of device time, skip the timings: `bash benchmarks/mqar_gpu_session.sh machine
# "$OUT/gpu.txt"; bash session.sh go SECONDS`. Device tool: carry runs/carry. After every call, here:
#   bash benchmarks/mqar_gpu_session.sh collect FETCHED runs/carry
set -u
cd "$(dirname "$0")/../../../.." || exit 1
mkdir -p runs/carry  # what the device tool carried in; without it, every setting starts afresh
action="${1:?first | go}"
seconds="${2:?SECONDS}"
deadline=$(( $(date +%s) + seconds ))
left() { echo $(( deadline - $(date +%s) )); }
S=benchmarks/mqar_gpu_session.sh
stamp="$(date -u +%H%M)"
grid="--gpus 0 train.precision=bf16"
based64="--mixers based --d-models 64 --seq-lens 2048 --lrs 1e-3 $grid"
if [[ "$action" == first ]]; then
  bash $S machine "$OUT/gpu.txt"
  # shellcheck disable=SC2086
  bash $S go runs/s $(( $(left) - 190 )) "$OUT/s_$stamp.tgz" --checkpoints --every 60 --from runs/carry -- $based64
  status=$?
  # the run still going (a slow card) keeps the GPU: timings beside it would measure the sharing
  [[ -f runs/s/sweep.exit ]] || exit "$status"
  speed() {  # NAME TIMEOUT ARGS...: one mqar_speed table, kept whether it finishes or is cut
    local name="$1" limit="$2"
    shift 2
    ((limit > 60)) || return 0
    timeout "$limit" python -m benchmarks.mqar_speed --out "/tmp/speed/$name" "$@" >"/tmp/speed/$name.log" 2>&1
    echo "speed $name: exit $? after $((SECONDS)) s of the call" >>/tmp/speed/exits.txt
  }
  mkdir -p /tmp/speed
  speed alone "$(( $(left) - 20 < 150 ? $(left) - 20 : 150 ))" --settings rebased:128:2048 --epochs 3 \
    --variant bf16=train.precision=bf16 --variant bf16_micro1M=train.precision=bf16,train.micro_batch_tokens=1048576
  speed d512 "$(( $(left) - 20 ))" --settings rebased:512:2048 --epochs 2 --variant bf16=train.precision=bf16
  nvidia-smi >"/tmp/speed/nvidia_smi.txt" 2>&1
  tar czf "$OUT/speed.tgz" -C /tmp speed
  exit "$status"
fi
# shellcheck disable=SC2086
bash $S go runs/s $(( $(left) - 15 )) "$OUT/s_$stamp.tgz" --checkpoints --every 60 --from runs/carry -- $based64 \
  --then --mixers rebased based --d-models 128 --seq-lens 2048 --lrs 1e-2 $grid
status=$?  # the sweep's, once it has finished
nvidia-smi >"$OUT/nvidia_smi_$stamp.txt" 2>&1
exit "$status"
