"""Causal depthwise short convolution: public entry point with backend dispatch."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..backend import get_triton_impl, resolve_backend
from .naive import short_conv_torch, validate_short_conv_inputs

__all__ = ["short_conv", "short_conv_torch"]


def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               gate: Optional[torch.Tensor] = None, residual: bool = False,
               cu_seqlens: Optional[torch.Tensor] = None, cache: Optional[torch.Tensor] = None,
               output_final_state: bool = False, backend: Optional[str] = None, mode: Optional[str] = None,
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal depthwise conv over time, x [B, T, D], weight [D, K], bias [D].

    y_t = bias + sum_{j<K} weight[:, j] * x_{t-K+1+j} (weight[:, K-1] hits the current token; same as
    Conv1d(groups=D, padding=K-1) truncated to T outputs); then y *= gate (if given); then y += x (if residual).
    cache [N, D, K-1]: the last K-1 inputs before this call, oldest first (zeros at a sequence start);
    N = B, or the number of documents with cu_seqlens (B == 1; the conv never crosses a document start).
    Returns (y [B, T, D] in x's dtype, final_cache [N, D, K-1] in x's dtype if output_final_state else None).
    mode (torch backend): "conv" (default) | "recurrent" (default when T == 1 and a cache is given).
    """
    offsets = validate_short_conv_inputs(x, weight, bias, gate, cu_seqlens, cache, mode)
    if resolve_backend("short_conv", backend, x.device) == "triton":
        return get_triton_impl("short_conv")(x, weight, bias, gate=gate, residual=residual, cu_seqlens=cu_seqlens,
                                             cache=cache, output_final_state=output_final_state, mode=mode)
    return short_conv_torch(x, weight, bias, gate=gate, residual=residual, cu_seqlens=cu_seqlens, cache=cache,
                            output_final_state=output_final_state, mode=mode, _offsets=offsets, _validated=True)
