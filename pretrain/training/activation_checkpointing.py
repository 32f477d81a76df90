"""Activation checkpointing of chosen blocks (``training.activation_checkpointing``: none, every, full)."""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint


def make_checkpoint_fn(module, mode: str, every: int):
    """Activation checkpointing through the model's ``checkpoint_fn`` hook (parameter names stay unchanged, so
    checkpoints are interchangeable with it on or off; works inside FSDP2 and DeepSpeed ZeRO-3 hooks)."""
    if mode == "none":
        return None
    chosen = {id(b) for i, b in enumerate(module.blocks) if mode == "full" or i % every == 0}

    def fn(block, *args):
        if id(block) in chosen:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    return fn
