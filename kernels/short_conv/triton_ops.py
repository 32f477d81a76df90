"""Triton backend of ``kernels.short_conv`` (registers itself on import).

y_t = (bias + sum_{s<K} weight[:, K-1-s] * x_{t-s}) * gate_t + x_t, with the gate and the residual optional and
fused; layout [B, T, D] with D contiguous, fp32 accumulation, output in x's dtype. Inputs before a document start
come from ``cache`` [N, D, K-1] (oldest first) or are zeros; with ``cu_seqlens`` (B == 1) every token looks up its
document (start, end) so tiles may straddle document boundaries.

forward:  _fwd_kernel, one program per (T tile, D tile, batch row); _final_cache_kernel, one program per
          (document, D tile), gathers the last K-1 inputs of each document (from the cache for short ones).
backward: _bwd_kernel, per (group of T tiles, D tile, batch row): dx (residual + the K outputs a token feeds + the
          final cache), dgate (recomputes the conv), and per-program partial sums of dweight / dbias that are
          reduced in torch (deterministic, no atomics); _cache_grad_kernel, per (document, D tile): dcache.
decode:   _step_kernel (T == 1 with a cache, no autograd): y and the shifted cache in one launch.

Inputs the kernels do not cover (float64, K > MAX_K) fall back to the torch reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backend import register_triton_impl
from ..common import cdiv, next_power_of_2
from ..eager_op import eager_function, needs_dispatcher
from ..poison import poison
from .config import SHORT_CONV_LAUNCH
from .naive import short_conv_torch

__all__ = ["short_conv_triton", "supports", "MAX_K"]

MAX_K = 8
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(x, weight, bias=None, gate=None, cache=None) -> bool:
    tensors = [t for t in (x, weight, bias, gate, cache) if t is not None]
    return weight.shape[1] <= MAX_K and all(t.dtype in _KERNEL_DTYPES for t in tensors)


# ----------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _token_documents(doc_ptr, cu_ptr, row, t, tmask, T, VARLEN: tl.constexpr):
    # per token: its document (cache row), and the document's [start, end) as positions in the batch row
    if VARLEN:
        doc = tl.load(doc_ptr + t, mask=tmask, other=0)
        start = tl.load(cu_ptr + doc, mask=tmask, other=0)
        end = tl.load(cu_ptr + doc + 1, mask=tmask, other=0)
    else:
        doc = tl.zeros_like(t) + row
        start = tl.zeros_like(t)
        end = tl.zeros_like(t) + T
    return doc, start, end


@triton.jit
def _offsets(row, pos, d, T, D):
    # element offsets of positions pos [BT] of a batch row, channels d [BD] (int64: B*T*D may exceed 2^31)
    return (row * T + pos).to(tl.int64)[:, None] * D + d[None, :]


@triton.jit
def _weight_column(w_ptr, d, dmask, j, K: tl.constexpr):
    return tl.load(w_ptr + d * K + j, mask=dmask, other=0.0).to(tl.float32)


@triton.jit
def _load_input(x_ptr, cache_ptr, row, src, start, doc, d, mask, T, D, K: tl.constexpr, HAS_CACHE: tl.constexpr):
    # fp32 input at positions src [BT] (>= start - (K-1)); positions before the document start read cache slot
    # K-1 - (start - src) of the document's cache row, or zeros without a cache
    inside = src >= start
    val = tl.load(x_ptr + _offsets(row, src, d, T, D), mask=mask & inside[:, None], other=0.0).to(tl.float32)
    if HAS_CACHE:
        slot = K - 1 + src - start
        cache_offs = (doc.to(tl.int64)[:, None] * D + d[None, :]) * (K - 1) + slot[:, None]
        val += tl.load(cache_ptr + cache_offs, mask=mask & (src < start)[:, None], other=0.0).to(tl.float32)
    return val


@triton.jit
def _conv_output_grad(dy_ptr, gate_ptr, offs, mask, HAS_GATE: tl.constexpr):
    # gradient w.r.t. the conv output (before the gate): dy * gate
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        dz *= tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return dz


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bias_ptr, gate_ptr, cache_ptr, doc_ptr, cu_ptr, y_ptr, T, D,
                K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_GATE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_CACHE: tl.constexpr, VARLEN: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    row = tl.program_id(2)
    tmask = t < T
    dmask = d < D
    mask = tmask[:, None] & dmask[None, :]
    doc, start, end = _token_documents(doc_ptr, cu_ptr, row, t, tmask, T, VARLEN)
    offs = _offsets(row, t, d, T, D)
    x_now = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = x_now * _weight_column(w_ptr, d, dmask, K - 1, K)[None, :]
    for s in tl.static_range(1, K):
        x_past = _load_input(x_ptr, cache_ptr, row, t - s, start, doc, d, mask, T, D, K, HAS_CACHE)
        acc += x_past * _weight_column(w_ptr, d, dmask, K - 1 - s, K)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        acc *= tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        acc += x_now
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _document_span(cu_ptr, n, T, VARLEN: tl.constexpr):
    # (batch row, start, end) of document n
    if VARLEN:
        row = 0
        start = tl.load(cu_ptr + n)
        end = tl.load(cu_ptr + n + 1)
    else:
        row = n
        start = 0
        end = T
    return row, start, end


@triton.jit
def _cache_offsets(n, slot, d, D, K: tl.constexpr):
    # offsets of cache[n, d, slot] as a [slots, BD] tile
    return (n.to(tl.int64) * D + d[None, :]) * (K - 1) + slot[:, None]


@triton.jit
def _final_cache_kernel(x_ptr, cache_ptr, cu_ptr, final_ptr, T, D,
                        K: tl.constexpr, KC: tl.constexpr, BD: tl.constexpr, HAS_CACHE: tl.constexpr,
                        VARLEN: tl.constexpr):
    # one [KC, BD] tile of slots: slot i of the final cache is the input at position end - (K-1) + i
    n = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    slot = tl.arange(0, KC)
    row, start, end = _document_span(cu_ptr, n, T, VARLEN)
    src = end - (K - 1) + slot
    valid = (slot < K - 1)[:, None] & (d < D)[None, :]
    val = tl.load(x_ptr + _offsets(row, src, d, T, D), mask=valid & (src >= start)[:, None], other=0.0)
    val = val.to(tl.float32)
    if HAS_CACHE:
        # a document shorter than K-1 keeps the newest cache entries
        from_cache = _cache_offsets(n, K - 1 + src - start, d, D, K)
        val += tl.load(cache_ptr + from_cache, mask=valid & (src < start)[:, None], other=0.0).to(tl.float32)
    tl.store(final_ptr + _cache_offsets(n, slot, d, D, K), val.to(final_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, bias_ptr, gate_ptr, cache_ptr, doc_ptr, cu_ptr, dy_ptr, dfinal_ptr,
                dx_ptr, dgate_ptr, dw_part_ptr, dbias_part_ptr, T, D, tiles_per_program,
                K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_GATE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_CACHE: tl.constexpr,
                HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr):
    pid_t = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    row = tl.program_id(2)
    dmask = d < D
    tap = tl.arange(0, KP)
    dw_acc = tl.zeros([BD, KP], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    for tile in range(tiles_per_program):
        t = (pid_t * tiles_per_program + tile) * BT + tl.arange(0, BT)
        tmask = t < T
        mask = tmask[:, None] & dmask[None, :]
        doc, start, end = _token_documents(doc_ptr, cu_ptr, row, t, tmask, T, VARLEN)
        offs = _offsets(row, t, d, T, D)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = _conv_output_grad(dy_ptr, gate_ptr, offs, mask, HAS_GATE)

        # dx: token t feeds the outputs t + s of its own document through weight K-1-s
        dx = dz * _weight_column(w_ptr, d, dmask, K - 1, K)[None, :]
        if RESIDUAL:
            dx += dy
        for s in tl.static_range(1, K):
            later = mask & (t + s < end)[:, None]
            dz_later = _conv_output_grad(dy_ptr, gate_ptr, _offsets(row, t + s, d, T, D), later, HAS_GATE)
            dx += dz_later * _weight_column(w_ptr, d, dmask, K - 1 - s, K)[None, :]
        if HAS_DFINAL:
            # the last K-1 inputs of a document are also its final cache (slot = position - (end - (K-1)))
            slot = t - end + K - 1
            final_offs = (doc.to(tl.int64)[:, None] * D + d[None, :]) * (K - 1) + slot[:, None]
            dx += tl.load(dfinal_ptr + final_offs, mask=mask & (slot >= 0)[:, None], other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

        # dweight, and the conv output recomputed for dgate, from the same input loads
        x_now = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        conv = x_now * _weight_column(w_ptr, d, dmask, K - 1, K)[None, :]
        dw_acc += tl.where(tap[None, :] == K - 1, tl.sum(dz * x_now, 0)[:, None], 0.0)
        for s in tl.static_range(1, K):
            x_past = _load_input(x_ptr, cache_ptr, row, t - s, start, doc, d, mask, T, D, K, HAS_CACHE)
            conv += x_past * _weight_column(w_ptr, d, dmask, K - 1 - s, K)[None, :]
            dw_acc += tl.where(tap[None, :] == K - 1 - s, tl.sum(dz * x_past, 0)[:, None], 0.0)
        if HAS_BIAS:
            conv += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            dbias_acc += tl.sum(dz, 0)
        if HAS_GATE:
            tl.store(dgate_ptr + offs, (dy * conv).to(dgate_ptr.dtype.element_ty), mask=mask)
    part = row * tl.num_programs(0) + pid_t
    part_offs = (part.to(tl.int64) * D + d[:, None]) * K + tap[None, :]
    tl.store(dw_part_ptr + part_offs, dw_acc, mask=dmask[:, None] & (tap < K)[None, :])
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part.to(tl.int64) * D + d, dbias_acc, mask=dmask)


@triton.jit
def _cache_grad_kernel(w_ptr, gate_ptr, dy_ptr, dfinal_ptr, cu_ptr, dcache_ptr, T, D,
                       K: tl.constexpr, KC: tl.constexpr, BD: tl.constexpr, HAS_GATE: tl.constexpr,
                       HAS_DFINAL: tl.constexpr, VARLEN: tl.constexpr):
    # one [KC, BD] tile of slots: slot c is the input at position c - (K-1) of the document, which feeds the
    # outputs at positions c - (K-1) + s (those inside the document) through weight K-1-s
    n = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = d < D
    slot = tl.arange(0, KC)
    row, start, end = _document_span(cu_ptr, n, T, VARLEN)
    length = end - start
    valid = (slot < K - 1)[:, None] & dmask[None, :]
    acc = tl.zeros([KC, BD], dtype=tl.float32)
    for s in tl.static_range(1, K):
        pos = slot - (K - 1) + s
        fed = valid & ((pos >= 0) & (pos < length))[:, None]
        dz = _conv_output_grad(dy_ptr, gate_ptr, _offsets(row, start + pos, d, T, D), fed, HAS_GATE)
        acc += dz * _weight_column(w_ptr, d, dmask, K - 1 - s, K)[None, :]
    if HAS_DFINAL:
        # a document shorter than K-1 passes slot c on to final cache slot c - length
        final_slot = slot - length
        acc += tl.load(dfinal_ptr + _cache_offsets(n, final_slot, d, D, K), mask=valid & (final_slot >= 0)[:, None],
                       other=0.0).to(tl.float32)
    tl.store(dcache_ptr + _cache_offsets(n, slot, d, D, K), acc.to(dcache_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _step_kernel(x_ptr, w_ptr, bias_ptr, gate_ptr, cache_ptr, y_ptr, new_cache_ptr, D,
                 K: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
                 RESIDUAL: tl.constexpr, STORE_CACHE: tl.constexpr):
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    n = tl.program_id(1)
    dmask = d < D
    offs = n.to(tl.int64) * D + d
    cache_row = offs * (K - 1)
    x_now = tl.load(x_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
    acc = x_now * _weight_column(w_ptr, d, dmask, K - 1, K)
    for c in tl.static_range(K - 1):
        x_past = tl.load(cache_ptr + cache_row + c, mask=dmask, other=0.0).to(tl.float32)
        acc += x_past * _weight_column(w_ptr, d, dmask, c, K)
        if STORE_CACHE:
            if c >= 1:  # the window slides by one: the oldest entry drops out
                tl.store(new_cache_ptr + cache_row + c - 1, x_past.to(new_cache_ptr.dtype.element_ty), mask=dmask)
    if STORE_CACHE:
        if K > 1:
            tl.store(new_cache_ptr + cache_row + K - 2, x_now.to(new_cache_ptr.dtype.element_ty), mask=dmask)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_GATE:
        acc *= tl.load(gate_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
    if RESIDUAL:
        acc += x_now
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=dmask)


# ----------------------------------------------------------------------------------- launchers

def _blocks(d: int, which: str) -> Tuple[int, int, int]:
    """(block_t, block_d, warps) of pass ``which`` from the launch configuration in force (:mod:`.config`)."""
    block_t, block_d, warps = SHORT_CONV_LAUNCH.get().blocks(which)
    return block_t, min(block_d, max(16, next_power_of_2(d))), warps


def _slot_block(k: int) -> int:
    # the K-1 cache slots padded to a power of two (tl.arange needs one)
    return next_power_of_2(max(k - 1, 1))


def _tiles_per_program(t_tiles: int, other_programs: int, device: torch.device) -> int:
    """Group T tiles per backward program while at least ~8 programs per SM remain."""
    tiles = SHORT_CONV_LAUNCH.get().bwd_tiles
    if tiles:
        return tiles
    if device.type != "cuda":
        return 1
    target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    tiles = 1
    while tiles < 8 and cdiv(t_tiles, 2 * tiles) * other_programs >= target:
        tiles *= 2
    return tiles


def _documents(cu_seqlens: Optional[torch.Tensor], t: int, device) -> Tuple[Optional[torch.Tensor], ...]:
    """(cu_seqlens as int32, document index of every token) or (None, None) without documents."""
    if cu_seqlens is None:
        return None, None
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    positions = torch.arange(t, device=device, dtype=torch.int32)
    return cu, torch.bucketize(positions, cu[1:], right=True, out_int32=True)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    # Triton needs a pointer even for an input a constexpr flag switches off
    return dummy if t is None else t


def _fwd_impl(x, weight, bias, gate, cache, cu_seqlens, residual, store_final):
    b, t, d = x.shape
    k = weight.shape[1]
    x, weight, bias, gate, cache = (_contiguous(v) for v in (x, weight, bias, gate, cache))
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    y = torch.empty_like(x)
    final = x.new_empty(n_docs if store_final else 0, d, k - 1)
    poison(y, final)
    cu, doc_of_token = _documents(cu_seqlens, t, x.device)
    block_t, block_d, warps = _blocks(d, "fwd")
    if y.numel():
        _fwd_kernel[(cdiv(t, block_t), cdiv(d, block_d), b)](
            x, weight, _or(bias, x), _or(gate, x), _or(cache, x), _or(doc_of_token, x), _or(cu, x), y, t, d,
            K=k, BT=block_t, BD=block_d, HAS_BIAS=bias is not None, HAS_GATE=gate is not None, RESIDUAL=residual,
            HAS_CACHE=cache is not None, VARLEN=cu is not None, num_warps=warps)
    if final.numel():
        _final_cache_kernel[(n_docs, cdiv(d, block_d))](
            x, _or(cache, x), _or(cu, x), final, t, d,
            K=k, KC=_slot_block(k), BD=block_d, HAS_CACHE=cache is not None, VARLEN=cu is not None, num_warps=warps)
    return y, final


def _bwd_impl(x, weight, bias, gate, cache, cu_seqlens, dy, dfinal, residual):
    b, t, d = x.shape
    k = weight.shape[1]
    x, weight, bias, gate, cache, dy, dfinal = (_contiguous(v) for v in (x, weight, bias, gate, cache, dy, dfinal))
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    block_t, block_d, warps = _blocks(d, "bwd")
    d_tiles = cdiv(d, block_d)
    t_tiles = cdiv(t, block_t)
    tiles = _tiles_per_program(t_tiles, d_tiles * b, x.device)
    t_programs = cdiv(t_tiles, tiles)
    f32 = torch.float32
    dx = torch.empty_like(x)
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty(0)
    dcache = torch.empty_like(cache) if cache is not None else x.new_empty(0)
    dw_part = torch.empty(b * t_programs, d, k, dtype=f32, device=x.device)
    dbias_part = torch.empty(b * t_programs if bias is not None else 0, d, dtype=f32, device=x.device)
    poison(dx, dgate, dcache, dw_part, dbias_part)
    cu, doc_of_token = _documents(cu_seqlens, t, x.device)
    if dx.numel():
        _bwd_kernel[(t_programs, d_tiles, b)](
            x, weight, _or(bias, x), _or(gate, x), _or(cache, x), _or(doc_of_token, x), _or(cu, x), dy,
            _or(dfinal, x), dx, dgate, dw_part, dbias_part, t, d, tiles,
            K=k, KP=next_power_of_2(k), BT=block_t, BD=block_d, HAS_BIAS=bias is not None,
            HAS_GATE=gate is not None, RESIDUAL=residual, HAS_CACHE=cache is not None,
            HAS_DFINAL=dfinal is not None, VARLEN=cu is not None, num_warps=warps)
    if dcache.numel():
        _cache_grad_kernel[(n_docs, d_tiles)](
            weight, _or(gate, x), dy, _or(dfinal, x), _or(cu, x), dcache, t, d,
            K=k, KC=_slot_block(k), BD=block_d, HAS_GATE=gate is not None, HAS_DFINAL=dfinal is not None,
            VARLEN=cu is not None, num_warps=warps)
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = dbias_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias, dgate, dcache


def _step_impl(x, weight, bias, gate, cache, residual, store_cache):
    b, _, d = x.shape
    k = weight.shape[1]
    x, weight, bias, gate, cache = (_contiguous(v) for v in (x, weight, bias, gate, cache))
    y = torch.empty_like(x)
    new_cache = x.new_empty(b if store_cache else 0, d, k - 1)
    poison(y, new_cache)
    _, block_d, warps = _blocks(d, "fwd")
    if y.numel():
        _step_kernel[(cdiv(d, block_d), b)](
            x, weight, _or(bias, x), _or(gate, x), cache, y, new_cache, d,
            K=k, BD=block_d, HAS_BIAS=bias is not None, HAS_GATE=gate is not None, RESIDUAL=residual,
            STORE_CACHE=store_cache, num_warps=warps)
    return y, new_cache


# ----------------------------------------------------------------------------------- custom ops

_LIB = "rebased_kernels"


@torch.library.custom_op(f"{_LIB}::short_conv_fwd", mutates_args=())
def _op_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: Optional[torch.Tensor],
            cache: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], residual: bool, store_final: bool
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(x, weight, bias, gate, cache, cu_seqlens, residual, store_final)


@_op_fwd.register_fake
def _op_fwd_fake(x, weight, bias, gate, cache, cu_seqlens, residual, store_final):
    b, _, d = x.shape
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(x), x.new_empty(n_docs if store_final else 0, d, weight.shape[1] - 1)


@torch.library.custom_op(f"{_LIB}::short_conv_bwd", mutates_args=())
def _op_bwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: Optional[torch.Tensor],
            cache: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], dy: torch.Tensor,
            dfinal: Optional[torch.Tensor], residual: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dgate, dcache); an input given as None gets an empty gradient."""
    return _bwd_impl(x, weight, bias, gate, cache, cu_seqlens, dy, dfinal, residual)


@_op_bwd.register_fake
def _op_bwd_fake(x, weight, bias, gate, cache, cu_seqlens, dy, dfinal, residual):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)

    return torch.empty_like(x), torch.empty_like(weight), like(bias), like(gate), like(cache)


def _setup_context(ctx, inputs, output):
    x, weight, bias, gate, cache, cu_seqlens, residual, store_final = inputs
    ctx.save_for_backward(x, weight, bias, gate, cache, cu_seqlens)
    ctx.residual = residual
    ctx.store_final = store_final


def _backward(ctx, dy, dfinal):
    x, weight, bias, gate, cache, cu_seqlens = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if not ctx.store_final:
        dfinal = None
    bwd = _op_bwd if needs_dispatcher(x, weight, dy) else _bwd_impl
    dx, dweight, dbias, dgate, dcache = bwd(x, weight, bias, gate, cache, cu_seqlens, dy, dfinal, ctx.residual)
    return (dx, dweight, dbias if bias is not None else None, dgate if gate is not None else None,
            dcache if cache is not None else None, None, None, None)


_op_fwd.register_autograd(_backward, setup_context=_setup_context)
# _fwd_impl looked up per call, as the custom op's body does, so both paths run whatever it is bound to
_eager_fwd = eager_function("ShortConv", lambda *inputs: _fwd_impl(*inputs), _setup_context, _backward)


@torch.library.custom_op(f"{_LIB}::short_conv_step", mutates_args=())
def _op_step(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: Optional[torch.Tensor],
             cache: torch.Tensor, residual: bool, store_cache: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (T == 1): y and the cache shifted by one token (empty unless store_cache)."""
    return _step_impl(x, weight, bias, gate, cache, residual, store_cache)


@_op_step.register_fake
def _op_step_fake(x, weight, bias, gate, cache, residual, store_cache):
    b, _, d = x.shape
    return torch.empty_like(x), x.new_empty(b if store_cache else 0, d, weight.shape[1] - 1)


# ----------------------------------------------------------------------------------- entry point


def _is_decode_step(x, weight, bias, gate, cache, cu_seqlens, mode) -> bool:
    # the step op has no autograd: calls that need gradients take the general path
    if x.shape[1] != 1 or cache is None or cu_seqlens is not None or mode == "conv":
        return False
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, gate, cache))
    return not needs_grad


def short_conv_triton(x, weight, bias=None, *, gate=None, residual=False, cu_seqlens=None, cache=None,
                      output_final_state=False, mode=None):
    """Triton short conv with the public contract of ``kernels.short_conv`` (inputs already validated)."""
    if not supports(x, weight, bias, gate, cache):
        return short_conv_torch(x, weight, bias, gate=gate, residual=residual, cu_seqlens=cu_seqlens, cache=cache,
                                output_final_state=output_final_state, mode=mode)
    if _is_decode_step(x, weight, bias, gate, cache, cu_seqlens, mode):
        step = _op_step if needs_dispatcher(x, weight, bias, gate, cache) else _step_impl
        y, final = step(x, weight, bias, gate, cache, bool(residual), bool(output_final_state))
    else:
        fwd = _op_fwd if needs_dispatcher(x, weight, bias, gate, cache) else _eager_fwd
        y, final = fwd(x, weight, bias, gate, cache, cu_seqlens, bool(residual), bool(output_final_state))
    return y, (final if output_final_state else None)


register_triton_impl("short_conv", short_conv_triton)
