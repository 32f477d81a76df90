"""Validation + backend dispatch shared by ``rebased_attention`` and ``based_attention``."""

from __future__ import annotations

from ..backend import get_triton_impl, resolve_backend
from .feature_maps import default_scale
from .reference import linear_attention_reference, validate_attention_inputs

__all__ = ["dispatch_linear_attention"]


def dispatch_linear_attention(kind, q, k, v, *, scale, eps, normalize, cu_seqlens, initial_state,
                              output_final_state, backend, mode, chunk_size):
    offsets = validate_attention_inputs(kind, q, k, v, scale=scale, eps=eps, cu_seqlens=cu_seqlens,
                                        initial_state=initial_state, mode=mode, chunk_size=chunk_size)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    op = f"{kind}_attention"
    if resolve_backend(op, backend, q.device) == "triton":
        return get_triton_impl(op)(q, k, v, scale=scale, eps=eps, normalize=normalize, cu_seqlens=cu_seqlens,
                                   initial_state=initial_state, output_final_state=output_final_state,
                                   mode=mode, chunk_size=chunk_size)
    return linear_attention_reference(kind, q, k, v, scale=scale, eps=eps, normalize=normalize,
                                      cu_seqlens=cu_seqlens, initial_state=initial_state,
                                      output_final_state=output_final_state, mode=mode, chunk_size=chunk_size,
                                      _offsets=offsets, _validated=True)
