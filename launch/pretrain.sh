#!/usr/bin/env bash
# Start pretraining:  launch/pretrain.sh CONFIG [key.sub=value ...]
#
# One node by default; the process count is the number of GPUs found (1 without GPUs).
#   strategy single     python -m pretrain.train (one process)
#   strategy ddp|fsdp   torchrun (python -m pretrain.torchrun: c10d rendezvous, several nodes with NNODES/NODE_RANK/
#                       MASTER_ADDR; exits with the trainer's code, forwards SIGUSR1/SIGTERM to the workers)
#   strategy deepspeed  torchrun as above; the `deepspeed` launcher when HOSTFILE names the hosts
# CONFIG may be relative to the current directory; the run itself starts in the repository root.
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: GPUs visible (CUDA_VISIBLE_DEVICES), else 1; on CPU set it, e.g. 2)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous for torchrun (default 1 node, 29500)
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" lines); runs on all hosts in it
#   LAUNCHER        force one: python | torchrun | deepspeed
#   WANDB_MODE      online | offline | disabled: overrides the config's logging.wandb.mode (shipped: offline)
#   PEAK_TFLOPS     peak device TFLOP/s for MFU when the GPU is not in the built-in table
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi
CONFIG="$1"; shift
caller="$PWD"
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# env.sh moved to the repository root (where the configs' own relative paths start): a config named relative to
# the caller's directory would be looked for there
if [ "$PWD" != "$caller" ] && [[ "$CONFIG" != /* ]] && [ -e "$caller/$CONFIG" ]; then CONFIG="$caller/$CONFIG"; fi
# the same for HOSTFILE (DeepSpeed, finding no hostfile, would silently run on this node alone)
if [ -n "${HOSTFILE:-}" ]; then
  if [[ "$HOSTFILE" != /* ]]; then HOSTFILE="$caller/$HOSTFILE"; fi
  if [ ! -f "$HOSTFILE" ]; then echo "HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; fi
fi

strategy=$(python - "$CONFIG" "$@" <<'PY'
import sys
from pretrain.config import load_config
from pretrain.training.config import RunConfig
try:
    print(load_config(RunConfig, sys.argv[1], [a for a in sys.argv[2:] if "=" in a]).parallel.strategy)
except Exception as e:
    print(f"config error: {e}", file=sys.stderr); sys.exit(2)
PY
)
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); else gpus=0; fi
# nvidia-smi lists every GPU of the machine; the processes see only CUDA_VISIBLE_DEVICES' (one process per GPU)
if [ "$gpus" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  gpus=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c . || true)
fi
nproc="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"
nnodes="${NNODES:-1}"
# bash arithmetic below would read "abc" as the name of an unset variable, and torchrun fails on 0
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then echo "NPROC_PER_NODE=$nproc: expected a whole number >= 1" >&2; exit 2; fi
if ! [[ "$nnodes" =~ ^[1-9][0-9]*$ ]]; then echo "NNODES=$nnodes: expected a whole number >= 1" >&2; exit 2; fi
port="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}"
[ "$gpus" -eq 0 ] && export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

launcher="${LAUNCHER:-}"
if [ -z "$launcher" ]; then
  if [ "$strategy" = single ]; then launcher=python
  # torchrun for DeepSpeed too on one node: the deepspeed launcher prints every rank's error message and does not
  # forward SIGUSR1 (the workers would not save)
  elif [ "$strategy" = deepspeed ] && [ -n "${HOSTFILE:-}" ]; then launcher=deepspeed
  else launcher=torchrun; fi
fi
if [ "$strategy" = single ] && { [ "$nproc" -gt 1 ] || [ "$nnodes" -gt 1 ]; }; then
  echo "strategy 'single' runs one process; NPROC_PER_NODE=$nproc NNODES=$nnodes: using 1 process" >&2
  launcher=python
fi

set -x
case "$launcher" in
  python)
    exec python -m pretrain.train --config "$CONFIG" "$@" ;;
  torchrun)
    if [ "$nnodes" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
      exec python -m pretrain.torchrun --standalone --nproc_per_node "$nproc" -m pretrain.train --config "$CONFIG" "$@"
    fi
    if [ -z "${MASTER_ADDR:-}" ]; then
      echo "NNODES=$nnodes: set MASTER_ADDR to the address of the node with NODE_RANK=0 (the rendezvous)" >&2; exit 2
    fi
    exec python -m pretrain.torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" \
      --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR}:$port" --rdzv_id "${RDZV_ID:-pretrain}" \
      -m pretrain.train --config "$CONFIG" "$@" ;;
  deepspeed)
    if [ "$nnodes" -gt 1 ] && [ -z "${HOSTFILE:-}" ]; then
      echo "LAUNCHER=deepspeed with NNODES=$nnodes needs HOSTFILE (the deepspeed launcher takes its nodes from it)" >&2
      exit 2
    fi
    if [ -n "${HOSTFILE:-}" ]; then
      exec deepspeed --hostfile "$HOSTFILE" --master_port "$port" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
        --module pretrain.train --config "$CONFIG" "$@"
    elif [ "$gpus" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
      # --num_gpus would make DeepSpeed ignore CUDA_VISIBLE_DEVICES and take GPUs 0..N-1; without it, it starts
      # one process per visible GPU
      exec deepspeed --master_port "$port" --module pretrain.train --config "$CONFIG" "$@"
    else
      exec deepspeed --num_gpus "$nproc" --master_port "$port" --module pretrain.train --config "$CONFIG" "$@"
    fi ;;
  *) echo "unknown LAUNCHER=$launcher (python | torchrun | deepspeed)" >&2; exit 2 ;;
esac
