"""PyTorch reference (float64-exact) for based causal linear attention. See kernels/linear_attention."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..linear_attention.feature_maps import based_feature_map
from ..linear_attention.reference import linear_attention_reference

__all__ = ["based_attention_torch", "based_feature_map"]


def based_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                          eps: float = 1e-6, normalize: bool = True,
                          cu_seqlens: Optional[torch.Tensor] = None,
                          initial_state: Optional[Sequence[torch.Tensor]] = None,
                          output_final_state: bool = False, mode: Optional[str] = None,
                          chunk_size: int = 64):
    """Torch-backend based attention (no backend dispatch); modes "quadratic" | "chunk" | "recurrent"."""
    return linear_attention_reference("based", q, k, v, scale=scale, eps=eps, normalize=normalize,
                                  cu_seqlens=cu_seqlens, initial_state=initial_state,
                                  output_final_state=output_final_state, mode=mode, chunk_size=chunk_size)
