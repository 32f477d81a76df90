"""Minimal shared pytest setup: no W&B network traffic, deterministic seeds."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")

# Triton decides at @triton.jit time whether a kernel runs in its interpreter, so the switch must be on before any
# test module imports the kernels; on a machine without CUDA the Triton tests run interpreted (small shapes).
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402


@pytest.fixture
def seed():
    """Seed torch (and numpy/random when available) and return the seed; request it in a test to use it."""
    import random

    import torch

    value = 1234
    random.seed(value)
    torch.manual_seed(value)
    try:
        import numpy as np

        np.random.seed(value)
    except ImportError:  # pragma: no cover
        pass
    return value
