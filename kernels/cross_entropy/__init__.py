"""Cross-entropy of logit rows with the gradient computed in the same pass (the fused LM-head loss's inner step)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backend import get_triton_impl, resolve_backend
from .naive import cross_entropy_grad_torch

__all__ = ["cross_entropy_grad", "cross_entropy_grad_torch"]


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor, *,
                       inplace: bool = False, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss [R] in fp32 (fp64 for fp64 logits), gradient [R, V] in the logits' dtype) for logits [R, V],
    targets [R] (int32 / int64, in [0, V): the reference raises on a target outside, the Triton kernel gives its
    row a NaN loss) and row_scale [R] (dL/d loss_r; 0 drops a row):
    loss_r = logsumexp(logits_r) - logits_r[t_r], grad_r = (softmax(logits_r) - onehot(t_r)) · row_scale_r.

    inplace: the gradient may overwrite ``logits`` (the Triton kernel then writes it there: no second [R, V]
    buffer; the caller must not use the logits afterwards). The Triton kernel reads each row twice (a running
    logsumexp, then the gradient) and writes it once; fp64 inputs use the reference.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or row_scale.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [R, V], targets [R], row_scale [R]; got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(row_scale.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64 word indices, got {targets.dtype}")
    if logits.shape[0] and logits.shape[1] == 0:  # no class to be right about: neither backend has a loss to give
        raise ValueError("logits [R, V] need V >= 1 classes, got V = 0")
    if logits.dtype != torch.float64 and resolve_backend("cross_entropy_grad", backend, logits.device) == "triton":
        return get_triton_impl("cross_entropy_grad")(logits, targets, row_scale, inplace=inplace)
    return cross_entropy_grad_torch(logits, targets, row_scale)
