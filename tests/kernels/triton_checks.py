"""Helpers shared by the Triton kernel tests (not a test module)."""

import contextlib

import torch

import kernels
from kernels import backend as kbackend
from kernels.poison import set_poison


def rel(a, b):
    """Relative error of a against b in float64; non-finite values in a (an unwritten poisoned output) fail."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten poisoned output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def plausible_state(kind, n, h, dk, dv, device):
    """fp32 (kv, z): sums of the features of a few random keys (keeps the normaliser positive)."""
    keys = torch.randn(n, 6, h, dk, dtype=torch.float64, device=device)
    values = torch.randn(n, 6, h, dv, dtype=torch.float64, device=device)
    phi = (kernels.rebased_feature_map if kind == "rebased" else kernels.based_feature_map)(keys)
    return torch.einsum("nshf,nshv->nhfv", phi, values).float(), phi.sum(1).float()


@contextlib.contextmanager
def poisoned_run(monkeypatch, launch=None, **overrides):
    """A Triton test's surroundings: backend chosen by the call, outputs poisoned with NaN, seed 0, and (with
    ``launch``, a family's :class:`kernels.launch_config.LaunchSettings`) its launch configuration with
    ``overrides`` applied; whatever the test sets on it is undone afterwards."""
    monkeypatch.delenv(kbackend.BACKEND_ENV_VAR, raising=False)
    set_poison(True)
    torch.manual_seed(0)
    try:
        with launch.override(**overrides) if launch is not None else contextlib.nullcontext():
            yield
    finally:
        set_poison(False)
