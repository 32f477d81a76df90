#!/usr/bin/env bash
# The test suite on this machine (CPU; Triton kernels through TRITON_INTERPRET=1, distributed tests through
# torchrun with the gloo backend). Extra arguments go to pytest.
set -euo pipefail
# shellcheck disable=SC1091
. "$(dirname "$0")/env.sh"
export WANDB_MODE=disabled
python -m pytest -q "$@"
