"""PyTorch reference: per-row cross-entropy and its gradient with respect to the logits.

For logits x [R, V], targets t [R] and per-row weights w [R] (dL/d loss_r; 0 for ignored rows):
loss_r = logsumexp(x_r) - x_r[t_r], and dL/dx_r = (softmax(x_r) - onehot(t_r)) · w_r. The math runs in fp32
(fp64 stays fp64); the gradient comes back in the logits' dtype.
"""

from __future__ import annotations

import torch

__all__ = ["cross_entropy_grad_torch"]


def cross_entropy_grad_torch(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    loss = (lse - x.gather(1, targets[:, None])).squeeze(1)
    probs = torch.exp(x - lse)
    grad = probs.scatter_add(1, targets[:, None], probs.new_full((len(targets), 1), -1.0))
    return loss, (grad * row_scale[:, None].to(grad.dtype)).to(logits.dtype)
