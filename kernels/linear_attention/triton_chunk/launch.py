"""Buffers and launches of the chunked kernels: one state pass (state kernel + segment scan), the forward
(state pass, output kernel) and the backward (state pass if not saved, h, reverse state pass, gradient kernel)."""

from __future__ import annotations

import torch

from ...common import cdiv, next_power_of_2
from ...poison import poison
from .jit import _grad_kernel, _h_kernel, _out_kernel, _scan_kernel, _state_kernel
from .config import CHUNK_LAUNCH
from .tables import _kernel_args, _layout, _mm_mode, _ns_max, _segment_tables, _state_dtype


def _launch_state(x, y, den, hbuf, seg, ch, ch_z, tot, tot_z, *, ns_max, h, scale, c_psi, eps, dk, dv, tile, chunk,
                  reverse, normalize, based, mm, config):
    nvb, meta, tiles = _kernel_args("state", dv, dk, based, tile, x.device, config)
    dummy = den
    _state_kernel[(ns_max * h * (tiles.shape[0] + 1 + based) * nvb,)](
        x, y, den, hbuf if hbuf is not None else dummy, seg, tiles, ch, ch_z,
        tot if tot is not None else dummy, tot_z if tot_z is not None else dummy,
        h, scale, c_psi, eps, C=chunk, REVERSE=reverse, NORMALIZE=normalize, BASED=based, MM=mm,
        STORE_TOTAL=tot is not None, **meta)


def _scan_segments(tot, start, init, fin, doc, n_docs, reverse):
    """start[j] = init + the totals of the document's earlier (reverse: later) segments; fin (if given) = init + all
    of them; for the state rows and the normaliser in one launch: tot, start = (rows, normaliser) pairs of
    [segments, H, ...]; init, fin = pairs of [documents, H, ...] or None."""
    h, m, mz = tot[0].shape[1], tot[0][0, 0].numel(), tot[1][0, 0].numel()
    blk = 256  # small blocks: many programs, as each walks its document's segments one after another
    has_init, has_fin = init is not None, fin is not None
    init = (init[0].contiguous(), init[1].contiguous()) if has_init else tot  # tot: unread placeholders
    fin = fin if has_fin else tot
    _scan_kernel[(n_docs, h, cdiv(m, blk) + cdiv(mz, blk))](
        tot[0], start[0], init[0], fin[0], tot[1], start[1], init[1], fin[1], doc, h, m, mz,
        BLK=blk, REVERSE=reverse, HAS_INIT=has_init, HAS_FIN=has_fin)


def _state_pass(x, y, den, hbuf, seg, doc, *, n_docs, n_chunks, starts=None, init=None, fin=None, **launch):
    """One state kernel pass over every segment: the per-chunk states (hc, hz) from the segment's own tokens and,
    with starts = (start, start_z), each segment's start state from init = (S, z) and the document's earlier
    segments (the scan of the segments' totals), and the documents' sums into fin = (S, z)."""
    h, dk, dv, based, tile = (launch[k] for k in ("h", "dk", "dv", "based", "tile"))
    _, _, ft, fz = _layout(based, dk, tile)
    ch = torch.empty(n_chunks, h, ft, dv, dtype=_state_dtype(x.dtype), device=x.device)
    ch_z = torch.empty(n_chunks, h, fz, dtype=torch.float32, device=x.device)
    poison(ch, ch_z)
    totals = None
    if starts is not None:  # the segments' totals (fp32) of the state rows and of the normaliser
        totals = (torch.empty(starts[0].shape, dtype=torch.float32, device=x.device), torch.empty_like(starts[1]))
        poison(*totals)
    _launch_state(x, y, den, hbuf, seg, ch, ch_z, *(totals or (None, None)), **launch)
    if starts is not None:
        _scan_segments(totals, starts, init, fin, doc, n_docs, launch["reverse"])
    return ch, ch_z


def _sizes(q, v, cu_seqlens, based, tile, seg_tokens):
    """(b, t, h, dk, dv, n_docs, ft, fz, ns_max) of a forward or backward call: the shapes, the documents, the
    internal state's rows and normaliser rows, and the rows of the per-segment buffers."""
    b, t, h, dk = q.shape
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, _, ft, fz = _layout(based, dk, tile)
    return b, t, h, dk, v.shape[-1], n_docs, ft, fz, _ns_max(b * t, n_docs, seg_tokens)


def _fwd_impl(q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, tile, chunk, seg_tokens, store_final,
              save_states):
    config = CHUNK_LAUNCH.get()  # Dv blocks, warps and stages of the launches (the layout came with the op's inputs)
    b, t, h, dk, dv, n_docs, ft, fz, ns_max = _sizes(q, v, cu_seqlens, based, tile, seg_tokens)
    dev = q.device
    o = torch.empty_like(v, memory_format=torch.contiguous_format)
    den = torch.empty(b, t, h, dtype=torch.float32, device=dev)
    S_start = torch.empty(ns_max, h, ft, dv, dtype=_state_dtype(q.dtype), device=dev)
    z_start = torch.empty(ns_max, h, fz, dtype=torch.float32, device=dev)
    S_fin = torch.empty(n_docs if store_final else 0, h, ft, dv, dtype=torch.float32, device=dev)
    z_fin = torch.empty(n_docs if store_final else 0, h, fz, dtype=torch.float32, device=dev)
    poison(o, den, S_fin, z_fin)
    seg, doc, max_per_doc, n_chunks, max_chunks = _segment_tables(cu_seqlens, b, t, seg_tokens, ns_max, chunk, dev)
    mm = _mm_mode(q.dtype, config)
    has_init = S0 is not None
    # segments start from zero unless a document has several or an initial state; the segment start states are
    # then the scan of the segments' totals (which also gives the final state)
    has_start = max_per_doc > 1 or has_init
    if has_start:
        poison(S_start, z_start)
    hc, hz = _state_pass(k, v, den, None, seg, doc, n_docs=n_docs, n_chunks=n_chunks,
                         starts=(S_start, z_start) if has_start or store_final else None,
                         init=(S0, z0) if has_init else None, fin=(S_fin, z_fin) if store_final else None,
                         ns_max=ns_max, h=h, scale=scale, c_psi=scale, eps=eps, dk=dk, dv=dv, tile=tile,
                         chunk=chunk, reverse=False, normalize=normalize, based=based, mm=mm, config=config)
    nvb, meta, tiles = _kernel_args("out", dv, dk, based, tile, dev, config)
    _out_kernel[(ns_max, max_chunks, h * nvb)](
        q, k, v, o, den, hc, hz, S_start, z_start, seg, tiles, h, scale, eps, C=chunk, NORMALIZE=normalize,
        BASED=based, MM=mm, HAS_START=has_start, **meta)
    if not save_states:  # new empty tensors: a [:0] view would keep the states' storage alive until the backward
        hc, hz = hc.new_empty((0,) + hc.shape[1:]), hz.new_empty((0,) + hz.shape[1:])
    return o, den, S_start, z_start, S_fin, z_fin, hc, hz


def _bwd_impl(q, k, v, o, den, S_start, z_start, hc, hz, do, dSf, dzf, cu_seqlens, has_init, scale, eps,
              normalize, based, tile, chunk, seg_tokens):
    config = CHUNK_LAUNCH.get()
    b, t, h, dk, dv, n_docs, ft, fz, ns_max = _sizes(q, v, cu_seqlens, based, tile, seg_tokens)
    total = b * t
    dev = q.device
    seg, doc, max_per_doc, n_chunks, max_chunks = _segment_tables(cu_seqlens, b, t, seg_tokens, ns_max, chunk, dev)
    mm = _mm_mode(q.dtype, config)
    do, o = do.contiguous(), o.contiguous()
    c2 = scale * 0.5 if based else scale
    common = dict(ns_max=ns_max, h=h, scale=scale, eps=eps, dk=dk, dv=dv, tile=tile, chunk=chunk,
                  normalize=normalize, based=based, mm=mm, config=config)
    has_start = max_per_doc > 1 or has_init
    if hc.shape[0] != n_chunks:  # not saved by the forward: recompute
        hc, hz = _state_pass(k, v, den, None, seg, doc, n_docs=n_docs, n_chunks=n_chunks, c_psi=scale,
                             reverse=False, **common)
    hbuf = torch.empty(b, t, h, dtype=torch.float32, device=dev)
    poison(hbuf)
    if normalize:
        bt = 64
        _h_kernel[(cdiv(total * h, bt),)](do, o, den, hbuf, total * h, eps, DV=dv,
                                          DVP=max(16, next_power_of_2(dv)), BT=bt, num_warps=4)
    # the reverse segment starts (dL/dS from the later segments and the final state's gradient) and dL/dS_initial
    has_rstart = max_per_doc > 1 or dSf is not None
    R_start = torch.empty(ns_max if has_rstart or has_init else 0, h, ft, dv, dtype=_state_dtype(q.dtype),
                          device=dev)
    r_start = torch.empty(ns_max if has_rstart or has_init else 0, h, fz, dtype=torch.float32, device=dev)
    dS0 = torch.empty(n_docs if has_init else 0, h, ft, dv, dtype=torch.float32, device=dev)
    dz0 = torch.empty(n_docs if has_init else 0, h, fz, dtype=torch.float32, device=dev)
    poison(R_start, r_start, dS0, dz0)
    rc, rz = _state_pass(q, do, den, hbuf, seg, doc, n_docs=n_docs, n_chunks=n_chunks,
                         starts=(R_start, r_start) if has_rstart or has_init else None,
                         init=(dSf, dzf) if dSf is not None else None, fin=(dS0, dz0) if has_init else None,
                         c_psi=c2, reverse=True, **common)
    nvb, meta, tiles = _kernel_args("grad", dv, dk, based, tile, dev, config)
    # dq, dk: in the input dtype from one Dv block, else fp32 partials per block, summed here
    dq, dkk = ((torch.empty(nvb, b, t, h, dk, dtype=torch.float32, device=dev) if nvb > 1
                else torch.empty_like(x, memory_format=torch.contiguous_format))
               for x in (q, k))
    dv_ = torch.empty_like(v)
    poison(dq, dkk, dv_)
    _grad_kernel[(ns_max, max_chunks, h * nvb)](
        q, k, v, do, den, hbuf, hc, hz, S_start, z_start, rc, rz, R_start, r_start, dq, dkk, dv_, seg, tiles, h,
        total * h, scale, eps, C=chunk, NORMALIZE=normalize, BASED=based, MM=mm, HAS_START=has_start,
        HAS_RSTART=has_rstart, **meta)
    if nvb > 1:
        dq, dkk = dq.sum(0).to(q.dtype), dkk.sum(0).to(k.dtype)
    return dq, dkk, dv_, dS0, dz0
