"""Triton backend of the linear-attention family: registers ``<kind>_attention`` and ``<kind>_attention_step`` for
every kind in :data:`kernels.linear_attention.feature_maps.KINDS` on import.

The chunked kernels live in :mod:`kernels.linear_attention.triton_chunk`, the decoding step in
:mod:`kernels.linear_attention.triton_recurrent`. Inputs the chunked kernels do not cover (Dk != 16, float64) and
empty ones (no rows, heads, tokens or value columns) fall back to the torch reference, chunk mode.
"""

from __future__ import annotations

from functools import partial

from ..backend import register_triton_impl
from .feature_maps import KINDS
from .reference import linear_attention_reference
from .triton_chunk import chunk_linear_attention, supports
from .triton_recurrent import recurrent_step

__all__ = ["linear_attention_triton"]


def linear_attention_triton(kind, q, k, v, *, scale, eps=1e-6, normalize=True, cu_seqlens=None, initial_state=None,
                            output_final_state=False, mode=None, chunk_size=64):
    """The Triton implementation of ``<kind>_attention`` (called by the dispatch with validated inputs)."""
    if not supports(q, v) or q.numel() == 0 or v.numel() == 0:  # empty batch, heads, tokens or values: no launch
        return linear_attention_reference(kind, q, k, v, scale=scale, eps=eps, normalize=normalize,
                                          cu_seqlens=cu_seqlens, initial_state=initial_state,
                                          output_final_state=output_final_state, mode=None, chunk_size=chunk_size)
    return chunk_linear_attention(kind, q, k, v, scale=scale, eps=eps, normalize=normalize, cu_seqlens=cu_seqlens,
                                  initial_state=initial_state, output_final_state=output_final_state,
                                  chunk_size=chunk_size)


for _kind in KINDS:
    register_triton_impl(f"{_kind}_attention", partial(linear_attention_triton, _kind))
    register_triton_impl(f"{_kind}_attention_step", partial(recurrent_step, _kind))
