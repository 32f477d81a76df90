"""Activation checkpointing of chosen blocks (``training.activation_checkpointing``: none, every_k, full,
selective).

``selective`` wraps every block, but keeps the outputs of its expensive ops (matmuls, attention, the linear
attention and short convolution kernels) and recomputes only the cheap ones in the backward (norms, activations,
rotary, residual adds): most of the memory of ``full`` is in those cheap ops' many same-sized outputs, most of
its recompute time in the expensive ones.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


@functools.cache
def saved_ops() -> frozenset:
    """The ops whose outputs ``selective`` keeps: matmuls and SDPA (those this torch build has), and the project's
    linear-attention and short-conv forward kernels (always registered: a renamed op fails here, loudly)."""
    import kernels  # noqa: F401  (registers the custom ops)

    aten = torch.ops.aten
    ops = {torch.ops.rebased_kernels.la_chunk_fwd.default, torch.ops.rebased_kernels.short_conv_fwd.default}
    for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu"):
        try:
            ops.add(getattr(aten, name).default)
        except (AttributeError, RuntimeError):  # not in this build (e.g. cuDNN attention on an older torch)
            continue
    return frozenset(ops)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_policy)


def make_checkpoint_fn(module, mode: str, every: int):
    """Activation checkpointing through the model's ``checkpoint_fn`` hook (parameter names stay unchanged, so
    checkpoints are interchangeable with it on or off; works inside FSDP2 and DeepSpeed ZeRO-3 hooks)."""
    if mode == "none":
        return None
    if mode not in ("full", "every_k", "selective"):
        raise ValueError(f"activation checkpointing mode {mode!r}: expected none, full, every_k or selective")
    chosen = {id(b) for i, b in enumerate(module.blocks) if mode != "every_k" or i % every == 0}
    extra = {"context_fn": _selective_context} if mode == "selective" else {}

    def fn(block, *args):
        if id(block) in chosen:
            return checkpoint(block, *args, use_reentrant=False, **extra)
        return block(*args)

    return fn
