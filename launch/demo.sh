#!/usr/bin/env bash
# The main job on the embedded default, offline: sample corpus -> tokenizer -> shards -> pretrain a tiny ReBased
# hybrid and a tiny Transformer++ -> evaluate both -> comparison table and loss-curve plot (see README.md).
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "$0")/env.sh"
python -m pretrain.demo "$@"
