"""PyTorch reference: the LM head's cross-entropy and both of its gradients, through the full logits.

For hidden rows h [R, D], the head's weight W [V, D], targets t [R] and per-row weights w [R] (dL/d loss_r; 0 for
ignored rows), with logits x = h Wᵀ: loss_r = logsumexp(x_r) - x_r[t_r], G = dL/dx = (softmax(x) - onehot(t)) · w,
dL/dh = G W and dL/dW = Gᵀ h. The math runs in fp32 (fp64 stays fp64) and materialises [R, V]: a reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..cross_entropy.naive import cross_entropy_grad_torch

__all__ = ["linear_cross_entropy_grad_torch"]


def linear_cross_entropy_grad_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                    row_scale: torch.Tensor, *, need_hidden: bool = True, need_weight: bool = True
                                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    acc = torch.promote_types(hidden.dtype, torch.float32)
    h, w = hidden.to(acc), weight.to(acc)
    loss, grad_logits = cross_entropy_grad_torch(h @ w.T, targets, row_scale.to(acc))
    grad_hidden = (grad_logits @ w).to(hidden.dtype) if need_hidden else None
    grad_weight = grad_logits.T @ h if need_weight else None
    return loss, grad_hidden, grad_weight
