"""Explicit feature maps for the ReBased and Based attention kernels (derivation: ``DESIGN.md`` beside this file,
section 2).

These define the *state layout* shared by every backend (torch reference, Triton, decoding code).

ReBased (``F = Dk (Dk + 1) / 2``)::

    phi(x) = scale * [x_0^2, ..., x_{Dk-1}^2,  sqrt(2) x_i x_j for (i, j) in triu_pairs(Dk)]

where ``triu_pairs(Dk)`` enumerates ``i < j`` in row-major order (``torch.triu_indices(Dk, Dk, 1)``:
(0,1), (0,2), ..., (0,Dk-1), (1,2), ...). Then ``phi(q) . phi(k) = (scale * q.k)^2``.

Based (``F = 1 + Dk + Dk (Dk + 1) / 2``)::

    phi(x) = [1,  sqrt(scale) * x_0..x_{Dk-1},  rebased_phi(x, scale) / sqrt(2)]

so ``phi(q) . phi(k) = 1 + scale q.k + (scale q.k)^2 / 2``.

The recurrent state for both kinds is ``kv = sum_s phi(k_s) v_s^T`` ([N, H, F, Dv]) and
``z = sum_s phi(k_s)`` ([N, H, F]).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "KINDS",
    "state_size",
    "rebased_feature_map",
    "based_feature_map",
    "feature_map",
    "kernel_from_dot",
    "default_scale",
    "zero_state",
]

KINDS = ("rebased", "based")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {KINDS}")


def state_size(kind: str, dk: int) -> int:
    """Number of features ``F`` of the explicit feature map for ``kind`` and key dim ``dk``."""
    _check_kind(kind)
    dk = int(dk)
    if dk < 1:
        raise ValueError(f"feature dim must be >= 1, got {dk}")
    second = dk * (dk + 1) // 2
    return second if kind == "rebased" else 1 + dk + second


def default_scale(dk: int) -> float:
    return float(dk) ** -0.5


def _pair_index(dk: int, device: torch.device):
    idx = torch.triu_indices(dk, dk, offset=1, device=device)
    return idx[0], idx[1]


def rebased_feature_map(x: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """[..., Dk] -> [..., Dk (Dk+1)/2] with ``phi(q).phi(k) == (scale q.k)^2`` (see module doc)."""
    dk = x.shape[-1]
    if scale is None:
        scale = default_scale(dk)
    i, j = _pair_index(dk, x.device)
    squares = x * x
    cross = x[..., i] * x[..., j] * math.sqrt(2.0)
    return torch.cat([squares, cross], dim=-1) * scale


def based_feature_map(x: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """[..., Dk] -> [..., 1 + Dk + Dk (Dk+1)/2] with ``phi(q).phi(k) == 1 + s q.k + (s q.k)^2/2``."""
    dk = x.shape[-1]
    if scale is None:
        scale = default_scale(dk)
    if scale < 0:
        raise ValueError(f"based_feature_map needs scale >= 0 (uses sqrt(scale)), got {scale}")
    ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
    first = x * math.sqrt(scale)
    second = rebased_feature_map(x, scale) * (1.0 / math.sqrt(2.0))
    return torch.cat([ones, first, second], dim=-1)


def feature_map(kind: str, x: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    _check_kind(kind)
    return rebased_feature_map(x, scale) if kind == "rebased" else based_feature_map(x, scale)


def kernel_from_dot(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The scalar kernel applied to ``x = scale * q.k``: ``x^2`` (rebased) or ``1 + x + x^2/2`` (based)."""
    _check_kind(kind)
    if kind == "rebased":
        return x * x
    return 1.0 + x + 0.5 * (x * x)


def zero_state(kind: str, n: int, h: int, dk: int, dv: int, *, dtype: torch.dtype = torch.float32,
               device=None):
    """An all-zero ``(kv, z)`` state: kv [n, h, F, dv], z [n, h, F]."""
    f = state_size(kind, dk)
    return (torch.zeros(n, h, f, dv, dtype=dtype, device=device),
            torch.zeros(n, h, f, dtype=dtype, device=device))
