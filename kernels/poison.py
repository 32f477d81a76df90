"""Test mode of every Triton kernel family: fill each output buffer with NaN before the kernels run, so an element
a kernel fails to write shows up in the comparison with the reference. On with REBASED_TRITON_POISON=1 or
``set_poison(True)``."""

from __future__ import annotations

import os

import torch

_ENABLED = os.environ.get("REBASED_TRITON_POISON", "0") == "1"


def set_poison(flag: bool) -> None:
    global _ENABLED
    _ENABLED = bool(flag)


def poison(*buffers: torch.Tensor) -> None:
    """Fill the buffers with NaN when the test mode is on (no-op otherwise)."""
    if _ENABLED:
        for buf in buffers:
            buf.fill_(float("nan"))
