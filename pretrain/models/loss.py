"""Cross-entropy of the LM head without the [tokens, vocab] logits.

``F.cross_entropy(lm_head(x).float(), labels)`` keeps the logits (bf16) and their fp32 copy alive for the backward:
at 32k tokens and a 50304-word vocabulary that is 3.3 + 6.5 GB, plus as much again for their gradient.
``chunked_cross_entropy`` computes the same loss and gradients over chunks of tokens, so at most one chunk's
logits exist at a time.
"""

from __future__ import annotations

import torch

import kernels

# 8192 tokens × 50304 words: one transient [chunk, vocab] buffer in the compute dtype (0.8 GB in bf16: the logits,
# overwritten by their gradient), against 9.8 GB of bf16 + fp32 logits for the full path at 32k tokens (rebased_360m's
# micro batch: 4 chunks). Each chunk also pays a fixed cost, one fp32 accumulation into the [vocab, d_model] weight
# gradient (about 0.5 GB of memory traffic at d_model 1024), a few percent of the time of the chunk's three
# [8192, d_model] x [d_model, vocab] matmuls; smaller chunks save memory at a growing share of it.
DEFAULT_CHUNK_TOKENS = 8192


class _LinearCrossEntropy(torch.autograd.Function):
    """Both gradients are computed in the forward, chunk by chunk while that chunk's logits exist; the backward
    only scales them by grad_output. Keeping logits for the backward would hold all of them at once, and
    recomputing them there would repeat the head's largest matmul."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_tokens, reduction, compute_dtype, fp32_dot):
        # fp32 products on the tensor cores as 3xTF32 (kernels.matmul_tf32x3), or the plain product
        mm = kernels.matmul_tf32x3 if fp32_dot == "tf32x3" and compute_dtype == torch.float32 else torch.matmul
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32 softmax for bf16, fp64 stays fp64
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        w = weight.to(compute_dtype)  # once per call (autocast would cast it again for every chunk)
        valid = labels != ignore_index
        n_valid = valid.sum()
        targets = labels.where(valid, 0)  # ignored rows gather a dummy target; their loss and gradient are dropped
        # d loss / d (loss of a row); 0 for ignored rows, so they add nothing to the gradients
        row_scale = valid.to(acc_dtype)
        if reduction == "mean":
            row_scale /= n_valid.clamp(min=1)
        row_loss = torch.empty(labels.shape, dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].to(compute_dtype)
            # the softmax, loss and logits gradient in one pass, the gradient written over the chunk's logits
            row_loss[rows], g = kernels.cross_entropy_grad(mm(h, w.T), targets[rows], row_scale[rows], inplace=True)
            if need_hidden:
                grad_hidden[rows] = mm(g, w)
            if need_weight:
                grad_weight += mm(g.T, h)
        loss = row_loss.where(valid, 0).sum()
        if reduction == "mean":
            loss = loss / n_valid  # NaN when every label is ignored, as F.cross_entropy
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        # scaled in grad_output's dtype (fp32): a bf16 gradient times 1/accumulation must not round the factor
        grads = [None if g is None else (g.to(grad_output.dtype) * grad_output).to(dtype)
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          ignore_index: int = -100, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                          reduction: str = "mean", fp32_dot: str = "ieee") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, ignore_index=..., reduction=...)`` over chunks of
    ``chunk_tokens`` tokens, with fp32 softmax; hidden [..., d], weight [vocab, d], labels [...].

    Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would (the weight is cast once per
    call); gradients come back in the dtypes of hidden and weight, the weight's accumulated in fp32 over chunks.
    reduction: ``mean`` over the labels that are not ignore_index, or ``sum``.
    fp32_dot: how the three matmuls run when they run in fp32: ``ieee`` (the plain product: cuBLAS on the CUDA
    cores with TF32 off) or ``tf32x3`` (:func:`kernels.matmul_tf32x3` on CUDA: 3xTF32 products on the tensor
    cores, fp32's accuracy); no effect in other dtypes or on the CPU.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if fp32_dot not in ("ieee", "tf32x3"):
        raise ValueError(f"fp32_dot must be 'ieee' or 'tf32x3', got {fp32_dot!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):  # the function casts explicitly
        return _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), ignore_index,
                                         chunk_tokens, reduction, dtype, fp32_dot)
