# shellcheck shell=bash
# Sourced by the launch scripts: use the active virtualenv, or create ./.venv, and install the project into it
# when pyproject.toml changed since the last install. Nothing is installed twice.
#   TORCH_SPEC   what to pip-install when torch is missing, pip options allowed (default: torch==2.13.0 when no
#                NVIDIA driver is present, else the newest torch from the index)
#   REBASED_SKIP_INSTALL=1   use the python on PATH as it is (a prepared container or cluster module, offline
#                nodes): no virtualenv, no pip; the repository goes on PYTHONPATH
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${REBASED_SKIP_INSTALL:-0}" = 1 ]; then
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  cd "$ROOT"
  return 0
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then default_torch="torch"; else default_torch="torch==2.13.0"; fi
  # unquoted on purpose: TORCH_SPEC may carry pip options, e.g. "torch==2.13.0 --index-url URL"
  # shellcheck disable=SC2086
  python -m pip install -q ${TORCH_SPEC:-$default_torch}
fi
stamp="$VIRTUAL_ENV/.rebased-installed-$(cksum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q -e "${ROOT}[dev]"
  touch "$stamp"
fi
cd "$ROOT"
