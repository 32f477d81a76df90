"""Triton backend of ``kernels.cross_entropy_grad`` (registers itself on import): one program per logit row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import register_triton_impl
from ..common import next_power_of_2
from ..poison import poison


@triton.jit
def _ce_grad_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, g_ptr, V, stride_x, stride_g, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = x_ptr + row * stride_x
    dst = g_ptr + row * stride_g
    offs = tl.arange(0, BLOCK)
    # running max and sum of exp over the row's blocks. The max starts at the lowest finite float, not -inf: a block
    # of only -inf logits (masked words) then adds exp(-inf) = 0, where exp(-inf - (-inf)) would be NaN
    m = tl.zeros((), tl.float32) - 3.4028234663852886e38
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(src + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(t_ptr + row)
    w = tl.load(w_ptr + row).to(tl.float32)
    # read before the row is overwritten. A target outside [0, V) (a caller's error, not checked on the host, which
    # would cost a sync) reads nothing outside the row and gives a NaN loss
    in_row = (target >= 0) & (target < V)
    tl.store(loss_ptr + row, lse - tl.load(src + target, mask=in_row, other=float("nan")).to(tl.float32))
    for start in range(0, V, BLOCK):
        mask = start + offs < V
        g = tl.exp(tl.load(src + start + offs, mask=mask, other=0.0).to(tl.float32) - lse) * w
        g = tl.where(start + offs == target, g - w, g)
        tl.store(dst + start + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def cross_entropy_grad_triton(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor, *,
                              inplace: bool = False, block: int | None = None):
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    poison(loss)
    if not inplace:
        poison(grad)
    block = block or min(4096, next_power_of_2(max(vocab, 16)))
    if rows and vocab:
        _ce_grad_kernel[(rows,)](logits, targets.contiguous(), row_scale.contiguous(), loss, grad, vocab,
                                 logits.stride(0), grad.stride(0), BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss, grad


register_triton_impl("cross_entropy_grad", cross_entropy_grad_triton)
