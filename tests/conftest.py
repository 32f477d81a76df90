"""Minimal shared pytest setup: no W&B network traffic, deterministic seeds."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")

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
