"""The custom ops (``rebased_kernels::la_chunk_fwd`` / ``la_chunk_bwd``, with fake implementations for
torch.compile), their autograd, its eager shortcut (``kernels/eager_op.py``) and the entry point
:func:`chunk_linear_attention`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...eager_op import eager_function, needs_dispatcher
from .launch import _bwd_impl, _fwd_impl
from .state_layout import state_from_internal, state_to_internal
from .config import CHUNK_LAUNCH
from .tables import (MAX_CHUNK, MAX_CHUNK_FP32, _layout, _ns_max, _saved_chunks, _state_blocks, _state_dtype,
                     choose_seg_tokens)

_LIB = "rebased_kernels"


@torch.library.custom_op(f"{_LIB}::la_chunk_fwd", mutates_args=())
def _op_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
            S0: Optional[torch.Tensor], z0: Optional[torch.Tensor], scale: float, eps: float, normalize: bool,
            based: bool, tile: int, chunk: int, seg_tokens: int, store_final: bool, save_states: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, tile, chunk, seg_tokens,
                     store_final, save_states)


@_op_fwd.register_fake
def _op_fwd_fake(q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, tile, chunk, seg_tokens, store_final,
                 save_states):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, _, ft, fz = _layout(based, dk, tile)
    ns_max = _ns_max(b * t, n_docs, seg_tokens)
    nf = n_docs if store_final else 0
    nc = _saved_chunks(save_states, b, t, chunk)
    f32 = torch.float32
    hdt = _state_dtype(q.dtype)
    return (torch.empty_like(v, memory_format=torch.contiguous_format), q.new_empty(b, t, h, dtype=f32),
            q.new_empty(ns_max, h, ft, dv, dtype=hdt), q.new_empty(ns_max, h, fz, dtype=f32),
            q.new_empty(nf, h, ft, dv, dtype=f32), q.new_empty(nf, h, fz, dtype=f32),
            q.new_empty(nc, h, ft, dv, dtype=hdt), q.new_empty(nc, h, fz, dtype=f32))


@torch.library.custom_op(f"{_LIB}::la_chunk_bwd", mutates_args=())
def _op_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, den: torch.Tensor,
            S_start: torch.Tensor, z_start: torch.Tensor, hc: torch.Tensor, hz: torch.Tensor, do: torch.Tensor,
            dSf: Optional[torch.Tensor], dzf: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
            has_init: bool, scale: float, eps: float, normalize: bool, based: bool, tile: int, chunk: int,
            seg_tokens: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(q, k, v, o, den, S_start, z_start, hc, hz, do, dSf, dzf, cu_seqlens, has_init, scale, eps,
                     normalize, based, tile, chunk, seg_tokens)


@_op_bwd.register_fake
def _op_bwd_fake(q, k, v, o, den, S_start, z_start, hc, hz, do, dSf, dzf, cu_seqlens, has_init, scale, eps,
                 normalize, based, tile, chunk, seg_tokens):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, _, ft, fz = _layout(based, dk, tile)
    n0 = n_docs if has_init else 0
    f32 = torch.float32
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(n0, h, ft, dv, dtype=f32),
            q.new_empty(n0, h, fz, dtype=f32))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, tile, chunk, seg_tokens, store_final, _ = inputs
    o, den, S_start, z_start, _, _, hc, hz = output
    ctx.save_for_backward(q, k, v, o, den, S_start, z_start, hc, hz, cu_seqlens)
    # only o (and the final state) carry gradients: unmaterialised, the others' would be zero tensors as large as
    # the per-chunk states (200 MB at 32k tokens x 16 heads), filled on every backward
    ctx.set_materialize_grads(False)
    ctx.meta = (S0 is not None, scale, eps, normalize, based, tile, chunk, seg_tokens, store_final)


def _backward(ctx, do, dden, dSs, dzs, dSf, dzf, dhc, dhz):
    q, k, v, o, den, S_start, z_start, hc, hz, cu_seqlens = ctx.saved_tensors
    has_init, scale, eps, normalize, based, tile, chunk, seg_tokens, store_final = ctx.meta
    if do is None:
        do = torch.zeros_like(o)
    if not store_final:
        dSf = dzf = None
    if dSf is not None or dzf is not None:
        # the one without a gradient is zero; the state and the normaliser have their own row counts (FT, FZ: equal
        # only at tile 16), so neither shape follows from the other's
        _, _, ft, fz = _layout(based, q.shape[-1], tile)
        n, h = (dSf if dSf is not None else dzf).shape[:2]
        if dSf is None:
            dSf = torch.zeros(n, h, ft, v.shape[-1], dtype=torch.float32, device=q.device)
        if dzf is None:
            dzf = torch.zeros(n, h, fz, dtype=torch.float32, device=q.device)
        dSf, dzf = dSf.float(), dzf.float()
    bwd = _op_bwd if needs_dispatcher(q, do) else _bwd_impl
    dq, dk, dv, dS0, dz0 = bwd(q, k, v, o, den, S_start, z_start, hc, hz, do, dSf, dzf, cu_seqlens, has_init, scale,
                               eps, normalize, based, tile, chunk, seg_tokens)
    if not has_init:
        dS0 = dz0 = None
    return dq, dk, dv, None, dS0, dz0, None, None, None, None, None, None, None, None, None


_op_fwd.register_autograd(_backward, setup_context=_setup_context)
# _fwd_impl looked up per call, as the custom op's body does, so both paths run whatever it is bound to
_eager_fwd = eager_function("ChunkLinearAttention", lambda *inputs: _fwd_impl(*inputs), _setup_context, _backward)


def chunk_linear_attention(kind: str, q, k, v, *, scale: float, eps: float = 1e-6, normalize: bool = True,
                           cu_seqlens=None, initial_state=None, output_final_state: bool = False,
                           chunk_size: int = 64, mode=None):
    """Triton (Re)Based attention with the public contract of ``kernels.rebased_attention``; the chunk, tile and
    segment length come from the launch configuration in force (:data:`.config.CHUNK_LAUNCH`)."""
    if q.dtype == torch.float16:
        # fp16's range (65504) is too small for the states a long context sums (phi(k) v over the whole prefix): a
        # long document would overflow to inf and NaN. The kernels run in fp32; the output is cast back.
        o, final = chunk_linear_attention(kind, q.float(), k.float(), v.float(), scale=scale, eps=eps,
                                          normalize=normalize, cu_seqlens=cu_seqlens, initial_state=initial_state,
                                          output_final_state=output_final_state, chunk_size=chunk_size)
        return o.to(torch.float16), final
    config = CHUNK_LAUNCH.get()
    based = kind == "based"
    b, t, h, dk = q.shape
    # Chunks above MAX_CHUNK are clamped: C = 64 is the fastest measured on an H100 (benchmarks/kernels_tune.py)
    # and C = 128 has not been checked on a GPU; the config's chunk bypasses the clamp.
    max_chunk = MAX_CHUNK_FP32 if q.dtype == torch.float32 else MAX_CHUNK
    chunk = config.chunk or min(chunk_size if chunk_size in (16, 32, 64, 128) else max_chunk, max_chunk)
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    tile = _layout(based, dk, config.tile_for(v.shape[-1], fp32=q.dtype == torch.float32))[0]
    seg_tokens = choose_seg_tokens(b * t, n_docs, h, chunk, q.device, _state_blocks(v.shape[-1], dk, tile, config),
                                   config)
    # the kernels index rows densely; copies made here are also what the op saves for its backward
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = state_to_internal(kind, initial_state[0], initial_state[1], dk, tile)
    save = config.save_states and cu_seqlens is None
    fwd = _op_fwd if needs_dispatcher(q, k, v, S0) else _eager_fwd
    o, den, S_start, z_start, S_fin, z_fin, _, _ = fwd(q, k, v, cu_seqlens, S0, z0, float(scale), float(eps),
                                                       bool(normalize), based, tile, chunk, seg_tokens,
                                                       bool(output_final_state), save)
    final = None
    if output_final_state:
        final = state_from_internal(kind, S_fin, z_fin, dk, tile)
    return o, final
