#!/usr/bin/env bash
# The main job on an embedded default, offline: see README.md ("Set-up: two commands").
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m pretrain.recall_demo "$@"
