"""Triton backend of ``kernels.rebased_attention`` and of its decoding step (registers both on import).

The kernels live in :mod:`kernels.linear_attention.triton_chunk` (shared with Based). Inputs the kernels do not
cover (Dk != 16, float64) fall back to the torch reference, chunk mode.
"""

from __future__ import annotations

from functools import partial

from ..backend import register_triton_impl
from ..linear_attention.reference import linear_attention_reference
from ..linear_attention.triton_chunk import chunk_linear_attention, supports
from ..linear_attention.triton_recurrent import recurrent_step

KIND = "rebased"


def rebased_attention_triton(q, k, v, *, scale, eps=1e-6, normalize=True, cu_seqlens=None, initial_state=None,
                             output_final_state=False, mode=None, chunk_size=64):
    if not supports(q, v):
        return linear_attention_reference(KIND, q, k, v, scale=scale, eps=eps, normalize=normalize,
                                          cu_seqlens=cu_seqlens, initial_state=initial_state,
                                          output_final_state=output_final_state, mode=None, chunk_size=chunk_size)
    return chunk_linear_attention(KIND, q, k, v, scale=scale, eps=eps, normalize=normalize, cu_seqlens=cu_seqlens,
                                  initial_state=initial_state, output_final_state=output_final_state,
                                  chunk_size=chunk_size)


register_triton_impl("rebased_attention", rebased_attention_triton)
register_triton_impl("rebased_attention_step", partial(recurrent_step, KIND))
