"""Helpers shared by the Triton kernel tests (not a test module)."""

import torch

import kernels


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
