"""The LM head's cross-entropy with both gradients, without the [rows, vocab] logits in memory (the fused head of
``pretrain.models.loss`` on CUDA for hidden sizes up to :data:`MAX_HIDDEN`)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backend import get_triton_impl, resolve_backend
from .naive import linear_cross_entropy_grad_torch

__all__ = ["linear_cross_entropy_grad", "linear_cross_entropy_grad_torch", "MAX_HIDDEN"]

# The Triton kernels hold a block of rows' hidden vectors and their fp32 gradient in registers; wider heads take
# the chunked path
MAX_HIDDEN = 256


def linear_cross_entropy_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              row_scale: torch.Tensor, *, need_hidden: bool = True, need_weight: bool = True,
                              backend: Optional[str] = None
                              ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(loss [R] in fp32, dL/d hidden [R, D] in hidden's dtype or None, dL/d weight [V, D] in fp32 or None) of
    the rows hidden [R, D] through the head weight [V, D] (same dtype), for targets [R] (int32 / int64, in
    [0, V): the reference raises on a target outside, the Triton kernels give its row a NaN loss) and row_scale [R]
    (dL/d loss_r; 0 drops a row): loss_r = logsumexp(x_r) - x_r[t_r] with x = hidden @ weightᵀ, and the gradients
    of Σ_r row_scale_r · loss_r. fp64 runs the reference (fp64 results); the Triton kernels take D <= MAX_HIDDEN.
    The kernels round G = (softmax - onehot) · row_scale to the inputs' dtype before its products, as the chunked
    path does: in fp16 a row_scale below about 1e-4 (a mean over many rows) pushes G into subnormals and loses
    precision; bf16 (the trainers' 16-bit dtype) has fp32's range and does not.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [R, D] and weight [V, D]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or row_scale.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [R] and row_scale [R] for R = {hidden.shape[0]}; got "
                         f"{tuple(targets.shape)}, {tuple(row_scale.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64 word indices, got {targets.dtype}")
    if weight.shape[0] == 0:
        raise ValueError("weight [V, D] needs V >= 1 words, got V = 0")
    if (hidden.dtype != torch.float64
            and resolve_backend("linear_cross_entropy_grad", backend, hidden.device) == "triton"):
        return get_triton_impl("linear_cross_entropy_grad")(hidden, weight, targets, row_scale,
                                                            need_hidden=need_hidden, need_weight=need_weight)
    return linear_cross_entropy_grad_torch(hidden, weight, targets, row_scale, need_hidden=need_hidden,
                                           need_weight=need_weight)
