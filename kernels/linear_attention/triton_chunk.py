"""Chunked linear-time (Re)Based causal attention in Triton: forward, backward, autograd, custom ops.

Algorithm (see /work/shared/notes/rebased-math.md for the math)
-----------------------------------------------------------------
The second-order features are the pair products x_i x_j, built per chunk in registers from the 16-wide rows
(never stored in HBM). The state is symmetric in (i, j), so only the TS x TS tiles (I, J), I <= J, of the
Dk x Dk pair matrix are kept (TS = 8 by default: tiles (0,0), (0,1), (1,1), 192 rows instead of 256; TS = 4
keeps 10 of 16 tiles, TS = 16 is the full matrix). A contraction with psi weighs a diagonal tile 1 (it holds both
(i, j) and (j, i)) and an off-diagonal tile 2. The internal state per (document, head) is, in float32,

    rebased: S2 = scale * sum_s psi(k_s) v_s^T        [F2, Dv]          (psi: the kept tiles' rows)
    based:   S2 as above, S1 = sqrt(scale) * sum_s k_s v_s^T [Dk, Dv], S0 = sum_s v_s [Dv]

stacked as rows [S2; S1; S0] of one [FT, Dv] matrix (FT = F2 for rebased, F2 + Dk + 1 for based). The
normaliser z keeps the full Dk x Dk matrix Zm (+ Dk + 1 rows for based: FZ rows), so psi(q).z2 = q^T Zm q is a
16-wide product in fp32.
Output: num_t = c2 w psi(q_t).S2 + sqrt(s) q_t.S1 + S0 + intra-chunk, c2 = scale (rebased) or scale / 2 (based),
w the tile weights. The reverse pass stores dL/dS, whose rows carry the weights.
The public (contract) state layout of ``kernels.rebased_feature_map`` / ``based_feature_map`` is converted to and
from this one in PyTorch (differentiable) by :func:`state_to_internal` / :func:`state_from_internal`.

Work decomposition (chunk-parallel): every document (a batch row, or a cu_seqlens document) is cut into
*segments* of ``seg_tokens`` tokens (a multiple of the chunk size C), segments into chunks of C tokens, so no
chunk straddles a document boundary. Only the state kernel walks chunks in order: each of its programs holds one
block of a segment's state in registers (a [TS*TS, BV] tile of the second-order rows; or the normaliser z; or
Based's first/zeroth-order rows) and sums it from zero over the segment, storing it before (reversed: after) every
chunk (bf16 for bf16 inputs, as the tensor cores would round it anyway; fp32 otherwise). A segment's start state
(the sum over the document's earlier segments, and the initial state) is one small scan of the segments' totals;
the output and gradient kernels, one program per chunk looping over the tiles, add it to the chunk's stored
state as they load it (it stays in L2, shared by all the segment's chunks). So a long document costs no extra
pass over its tokens.

forward:  _state_kernel: per segment, the state before each chunk -> Hc, Zc, and the segment's total
          [documents of > 1 segment, an initial or a final state: _scan_kernel over a document's segment totals
          -> each segment's start state S_start (and the final state)]
          _out_kernel: per chunk, inter-chunk psi(q) (Hc + S_start) + masked intra C x C part, normaliser in fp32,
          division.
backward: [Hc not kept by the forward: _state_kernel again]
          _h_kernel: h_t = -(do_t.o_t)/(den_t+eps)
          _state_kernel in reverse: dL/dS after each chunk (from the later queries) -> dHc, dZc; reverse scan from
          dL/dS_final -> each segment's reverse start and dL/dS_initial;
          _grad_kernel: per chunk, dq, dk, dv from Hc + S_start, dHc + its start and the intra-chunk part.

Defaults from benchmarks/kernels_tune.py on an H100 (bf16, Dv 64; results in benchmarks/results/kernels_tune_*.md):
C = 64, 8 x 8 tiles, a 64-row tile x 64 Dv per state program with 2 warps, 4 warps for the output and gradient
kernels (2 pipeline stages for the output kernel, 1 for the gradient kernel), and the forward's per-chunk states
kept for the backward (without cu_seqlens; 384 bytes per token and head in bf16) instead of a third state pass.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..poison import poison

__all__ = [
    "chunk_linear_attention", "state_to_internal", "state_from_internal",
    "TUNING", "supports",
]

# Tunables (benchmarks/kernels_tune.py sweeps these). None -> default.
TUNING = {
    "chunk": None,            # chunk length override (16, 32, 64, 128)
    "seg_tokens": None,       # tokens per segment (multiple of the chunk)
    "target_programs": None,  # wanted number of state-kernel programs (segments x heads x blocks)
    "tile": None,             # side of the stored tiles of the symmetric second-order state (4, 8 or 16): the
                              # feature rows of a state program and of one step of the output / gradient loops
    "bv_state": None,         # Dv block of the state kernel
    "bv_out": None,           # Dv block of the output kernel
    "bv_grad": None,          # Dv block of the gradient kernel
    "warps_state": None,
    "warps_out": None,
    "warps_grad": None,
    "stages": None,           # software-pipelining stages of every kernel ("stages_<kernel>" for one)
    "save_states": None,      # keep the forward's per-chunk states for the backward (default; no cu_seqlens only)
}


MAX_CHUNK = 64
MAX_CHUNK_FP32 = 32  # fp32 operands at C = 64, Dv 128 need 263 KB of shared memory; an H100 has 227 KB


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    return q.shape[-1] == 16 and q.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _mm_mode(dtype: torch.dtype) -> int:
    mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    if mode and os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the interpreter's tl.dot on bf16/fp16 operands is wrong (triton 3.9): round the operands to the
        # low precision, multiply in fp32 (same rounding as the tensor cores' products with fp32 accumulation)
        mode += 2
    return mode


# ----------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _mm(a, b, acc, MM: tl.constexpr):
    # acc + a @ b. MM: 0 -> fp32 operands (no tf32); 1 -> bf16 operands; 2 -> fp16 operands;
    # 3 / 4 -> bf16 / fp16-rounded operands multiplied in fp32 (interpreter only).
    if MM == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif MM == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif MM == 2:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif MM == 3:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                      input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32), acc,
                      input_precision="ieee")


@triton.jit
def _tile(tile_ptr, fb, TS: tl.constexpr):
    # feature block fb is the TS x TS tile (I, J), I <= J, of the pair matrix: (I, J) and the block's weight in a
    # contraction with psi (1 on the diagonal, where the tile holds both (i, j) and (j, i); 2 off it)
    ti = tl.load(tile_ptr + fb * 2)
    tj = tl.load(tile_ptr + fb * 2 + 1)
    return ti, tj, tl.where(ti == tj, 1.0, 2.0)


@triton.jit
def _psi_block(x_ptr, xoff, tmask, ti, tj, C: tl.constexpr, TS: tl.constexpr):
    # [C, TS*TS] fp32: the tile's feature columns x_ti x_tj, i in tile row I, j in tile column J; the two TS-wide
    # column groups of x are loaded as their own columns (L1 hits), so the block is a broadcast product
    lane = tl.arange(0, TS)
    xi = tl.load(x_ptr + xoff[:, None] + ti * TS + lane[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    xj = tl.load(x_ptr + xoff[:, None] + tj * TS + lane[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    return tl.reshape(xi[:, :, None] * xj[:, None, :], (C, TS * TS))


@triton.jit
def _psi_block_t(x_ptr, xoff, tmask, ti, tj, C: tl.constexpr, TS: tl.constexpr):
    # [TS*TS, C]: the transpose of _psi_block
    lane = tl.arange(0, TS)
    xi = tl.load(x_ptr + xoff[None, :] + ti * TS + lane[:, None], mask=tmask[None, :], other=0.0).to(tl.float32)
    xj = tl.load(x_ptr + xoff[None, :] + tj * TS + lane[:, None], mask=tmask[None, :], other=0.0).to(tl.float32)
    return tl.reshape(xi[:, None, :] * xj[None, :, :], (TS * TS, C))


@triton.jit
def _contract_block(G, x_ptr, xoff, tmask, ti, tj, C: tl.constexpr, DK: tl.constexpr, TS: tl.constexpr):
    # [C, DK]: the derivative of sum_f G[t, f] x_ti x_tj over the tile's features f = (i, j) with respect to x_t:
    # G[t, (i, j)] x_tj goes to column i (tile row I), G[t, (i, j)] x_ti to column j (tile column J)
    NG: tl.constexpr = DK // TS
    lane = tl.arange(0, TS)
    xi = tl.load(x_ptr + xoff[:, None] + ti * TS + lane[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    xj = tl.load(x_ptr + xoff[:, None] + tj * TS + lane[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    G3 = tl.reshape(G, (C, TS, TS))
    to_i = tl.sum(G3 * xj[:, None, :], 2)
    to_j = tl.sum(G3 * xi[:, :, None], 1)
    grp = tl.arange(0, NG)
    out = (to_i[:, None, :] * (grp == ti).to(tl.float32)[None, :, None]
           + to_j[:, None, :] * (grp == tj).to(tl.float32)[None, :, None])
    return tl.reshape(out, (C, DK))


@triton.jit
def _quad(x, M, C: tl.constexpr, DK: tl.constexpr):
    # [C]: x_t^T M x_t in fp32 (the normaliser's second-order term)
    xf = x.to(tl.float32)
    return tl.sum(_mm(xf, M, tl.zeros([C, DK], dtype=tl.float32), 0) * xf, 1)


@triton.jit
def _walk_step(it, nch, t0, t1, C: tl.constexpr, REVERSE: tl.constexpr):
    # step `it` of a state program's walk over its segment's nch chunks (reversed: from the last): the chunk index,
    # its tokens and their validity
    if REVERSE:
        j = nch - 1 - it
    else:
        j = it
    tok = t0 + j * C + tl.arange(0, C)
    return j, tok, tok < t1


@triton.jit
def _state_y(y_ptr, den_ptr, tok, tmask, hh, cv, vmask, H, eps, DV: tl.constexpr, REVERSE: tl.constexpr,
             NORMALIZE: tl.constexpr):
    # [C, BV] fp32 rows of y: forward v; reverse g = do / (den + eps)
    yv = tl.load(y_ptr + ((tok * H + hh) * DV)[:, None] + cv[None, :], mask=tmask[:, None] & vmask[None, :],
                 other=0.0).to(tl.float32)
    if REVERSE and NORMALIZE:
        yv = yv / (tl.load(den_ptr + tok * H + hh, mask=tmask, other=1.0) + eps)[:, None]
    return yv


@triton.jit
def _state_kernel(x_ptr, y_ptr, den_ptr, h_ptr, seg_ptr, tile_ptr, ch_ptr, chz_ptr, tot_ptr, totz_ptr,
                  H, scale, c_psi, eps,
                  DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr, TS: tl.constexpr,
                  C: tl.constexpr, F2: tl.constexpr, FT: tl.constexpr, FZ: tl.constexpr, REVERSE: tl.constexpr,
                  NORMALIZE: tl.constexpr, BASED: tl.constexpr, MM: tl.constexpr, STORE_TOTAL: tl.constexpr):
    """One segment's state S = sum_t phi(x_t) y_t^T and z = sum_t phi(x_t) w_t, from zero at the segment's start (its
    end, reversed): the segment's own part, to which the output and gradient kernels add the segment's start state.

    forward (REVERSE=False): x = k, y = v, w = 1, chunks in order; stores the state *before* each chunk.
    reverse (REVERSE=True):  x = q, y = g = do/(den+eps), w = h = -(do.o)/(den+eps) (from _h_kernel), chunks in
                             reverse; stores the state *after* each chunk: dL/dS, so its rows carry the tile weights.
    Programs of a (segment, head), per Dv block: one per stored tile of the second-order rows, one for the
    normaliser z (the first Dv block's; idle in the others) and, for Based, one for the first/zeroth-order rows
    S1, S0. They walk their chunks side by side, so each is kept small (2 warps) and about equally long.
    STORE_TOTAL: the segment's whole sum to row `segment` of tot / totz (for the scan over a document's segments).
    """
    BK: tl.constexpr = TS * TS
    NT: tl.constexpr = F2 // BK
    # one flat grid, the programs of a (segment, head) adjacent: they run together and share its x and y in L2
    NB: tl.constexpr = (NT + 1 + BASED) * NVB
    pid = tl.program_id(0)
    fb = (pid % NB) // NVB
    vb = pid % NVB
    hh = (pid // NB) % H
    sid = pid // (NB * H)
    t0 = tl.load(seg_ptr + sid * 3 + 0)
    t1 = tl.load(seg_ptr + sid * 3 + 1)
    cbase = tl.load(seg_ptr + sid * 3 + 2)
    F: tl.constexpr = DK * DK
    d = tl.arange(0, DK)
    cv = vb * BV + tl.arange(0, BV)
    vmask = cv < DV
    nch = tl.cdiv(t1 - t0, C)
    st_ty = ch_ptr.dtype.element_ty
    srow = sid * H + hh
    if fb < NT:  # a tile of the second-order rows
        ti, tj, w_tile = _tile(tile_ptr, fb, TS)
        if REVERSE:
            cpsi = c_psi * w_tile
        else:
            cpsi = c_psi
        rows = ((fb * BK + tl.arange(0, BK)) * DV)[:, None] + cv[None, :]
        S = tl.zeros([BK, BV], dtype=tl.float32)
        for it in range(nch):
            j, tok, tmask = _walk_step(it, nch, t0, t1, C, REVERSE)
            tl.store(ch_ptr + ((cbase + j) * H + hh) * FT * DV + rows, S.to(st_ty), mask=vmask[None, :])
            yv = _state_y(y_ptr, den_ptr, tok, tmask, hh, cv, vmask, H, eps, DV, REVERSE, NORMALIZE)
            S = _mm(_psi_block_t(x_ptr, (tok * H + hh) * DK, tmask, ti, tj, C, TS) * cpsi, yv, S, MM)
        if STORE_TOTAL:
            tl.store(tot_ptr + srow * FT * DV + rows, S, mask=vmask[None, :])
    elif fb == NT:  # the normaliser z = [Zm (Dk x Dk); z1; z0], with the first Dv block
        if vb == 0:
            sq = tl.sqrt(scale)
            zrows = d[:, None] * DK + d[None, :]
            zm = tl.zeros([DK, DK], dtype=tl.float32)
            z1 = tl.zeros([DK], dtype=tl.float32)
            z0 = tl.zeros([1], dtype=tl.float32)
            for it in range(nch):
                j, tok, tmask = _walk_step(it, nch, t0, t1, C, REVERSE)
                cz = ((cbase + j) * H + hh) * FZ
                tl.store(chz_ptr + cz + zrows, zm)
                if BASED:
                    tl.store(chz_ptr + cz + F + d, z1)
                    tl.store(chz_ptr + cz + F + DK + tl.arange(0, 1), z0)
                if REVERSE:  # h: the gradient reaching the normaliser (none without normalising)
                    w = tl.zeros([C], dtype=tl.float32)
                    if NORMALIZE:
                        w = tl.load(h_ptr + tok * H + hh, mask=tmask, other=0.0)
                else:
                    w = tmask.to(tl.float32)
                xoff = (tok * H + hh) * DK
                xT = tl.load(x_ptr + xoff[None, :] + d[:, None], mask=tmask[None, :], other=0.0).to(tl.float32)
                xc = tl.load(x_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
                zm = _mm(xT * (w * c_psi)[None, :], xc, zm, 0)
                if BASED:
                    z1 += sq * tl.sum(xT * w[None, :], 1)
                    z0 += tl.sum(w, 0)
            if STORE_TOTAL:
                tl.store(totz_ptr + srow * FZ + zrows, zm)
                if BASED:
                    tl.store(totz_ptr + srow * FZ + F + d, z1)
                    tl.store(totz_ptr + srow * FZ + F + DK + tl.arange(0, 1), z0)
    else:  # Based's first- and zeroth-order rows S1 = sqrt(scale) sum_t x_t y_t^T, S0 = sum_t y_t
        sq = tl.sqrt(scale)
        rows1 = ((F2 + d) * DV)[:, None] + cv[None, :]
        rows0 = (F2 + DK) * DV + cv
        S1 = tl.zeros([DK, BV], dtype=tl.float32)
        S0 = tl.zeros([BV], dtype=tl.float32)
        for it in range(nch):
            j, tok, tmask = _walk_step(it, nch, t0, t1, C, REVERSE)
            cb = ((cbase + j) * H + hh) * FT * DV
            tl.store(ch_ptr + cb + rows1, S1.to(st_ty), mask=vmask[None, :])
            tl.store(ch_ptr + cb + rows0, S0.to(st_ty), mask=vmask)
            yv = _state_y(y_ptr, den_ptr, tok, tmask, hh, cv, vmask, H, eps, DV, REVERSE, NORMALIZE)
            xT = tl.load(x_ptr + ((tok * H + hh) * DK)[None, :] + d[:, None], mask=tmask[None, :],
                         other=0.0).to(tl.float32)
            S1 = _mm(xT * sq, yv, S1, MM)
            S0 += tl.sum(yv, 0)
        if STORE_TOTAL:
            tl.store(tot_ptr + srow * FT * DV + rows1, S1, mask=vmask[None, :])
            tl.store(tot_ptr + srow * FT * DV + rows0, S0, mask=vmask)


@triton.jit
def _scan_block(tot_ptr, start_ptr, init_ptr, fin_ptr, first, cnt, row, H, M, blk, BLK: tl.constexpr,
                REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_FIN: tl.constexpr):
    # one BLK block of the (document, head) row `row` of M floats: see _scan_kernel
    off = blk * BLK + tl.arange(0, BLK)
    mask = off < M
    if HAS_INIT:
        acc = tl.load(init_ptr + row * M + off, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLK], dtype=tl.float32)
    for i in range(cnt):
        if REVERSE:
            j = first + cnt - 1 - i
        else:
            j = first + i
        base = (j * H + row % H) * M
        tl.store(start_ptr + base + off, acc.to(start_ptr.dtype.element_ty), mask=mask)
        acc += tl.load(tot_ptr + base + off, mask=mask, other=0.0)
    if HAS_FIN:
        tl.store(fin_ptr + row * M + off, acc, mask=mask)


@triton.jit
def _scan_kernel(tot_ptr, start_ptr, init_ptr, fin_ptr, totz_ptr, startz_ptr, initz_ptr, finz_ptr, doc_ptr, H, M,
                 MZ, BLK: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_FIN: tl.constexpr):
    """Scan over a document's segments (reversed: from its end): start[j] = init + the totals of the earlier
    segments (in start's dtype: bf16 for the bf16 tensor cores), fin = init + all of them (the final state;
    reversed: dL/d initial state); sums in fp32. One launch for the state rows (M floats per segment and head) and
    the normaliser (MZ): the programs past the state rows' blocks take the normaliser's."""
    n = tl.program_id(0)
    hh = tl.program_id(1)
    blk = tl.program_id(2)
    first = tl.load(doc_ptr + n * 2)
    cnt = tl.load(doc_ptr + n * 2 + 1)
    nbs = tl.cdiv(M, BLK)
    if blk < nbs:
        _scan_block(tot_ptr, start_ptr, init_ptr, fin_ptr, first, cnt, n * H + hh, H, M, blk, BLK, REVERSE,
                    HAS_INIT, HAS_FIN)
    else:
        _scan_block(totz_ptr, startz_ptr, initz_ptr, finz_ptr, first, cnt, n * H + hh, H, MZ, blk - nbs, BLK,
                    REVERSE, HAS_INIT, HAS_FIN)


@triton.jit
def _h_kernel(do_ptr, o_ptr, den_ptr, h_ptr, NTOK, eps, DV: tl.constexpr, DVP: tl.constexpr, BT: tl.constexpr):
    """h = -(do.o) / (den + eps) per (token, head) row: the gradient that reaches the normaliser."""
    r = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = r < NTOK
    cf = tl.arange(0, DVP)
    m = rmask[:, None] & (cf < DV)[None, :]
    dof = tl.load(do_ptr + r[:, None] * DV + cf[None, :], mask=m, other=0.0).to(tl.float32)
    of = tl.load(o_ptr + r[:, None] * DV + cf[None, :], mask=m, other=0.0).to(tl.float32)
    dn = tl.load(den_ptr + r, mask=rmask, other=1.0) + eps
    tl.store(h_ptr + r, -tl.sum(dof * of, 1) / dn, mask=rmask)


@triton.jit
def _chunk_program(seg_ptr, H, C: tl.constexpr, NVB: tl.constexpr):
    # an output / gradient program's chunk: (first token, end of its segment, the chunk's row of the per-chunk
    # state buffers, the segment's row of the start states, head, Dv block); grid (segment, chunk of the segment,
    # head x Dv block)
    sid = tl.program_id(0)
    j = tl.program_id(1)
    hh = tl.program_id(2) // NVB
    vb = tl.program_id(2) % NVB
    t0 = tl.load(seg_ptr + sid * 3 + 0) + j * C
    t1 = tl.load(seg_ptr + sid * 3 + 1)
    crow = (tl.load(seg_ptr + sid * 3 + 2) + j) * H + hh
    return t0, t1, crow, sid * H + hh, hh, vb


@triton.jit
def _chunk_state(ch_ptr, st_ptr, coff, soff, offs, mask, HAS_START: tl.constexpr):
    # a block of a chunk's state: the segment's own part (the state kernel's, from zero) plus, for documents of
    # several segments or with a given start, the segment's start state (read by all its chunks: from L2). Added in
    # the stored dtype: in bf16 that is the fp32 sum's rounding, which the tensor cores would make anyway, and the
    # gradient kernel keeps its registers (with fp32 blocks it took 0.495 ms instead of 0.480 at T = 8192, H100)
    x = tl.load(ch_ptr + coff + offs, mask=mask, other=0.0)
    if HAS_START:
        x += tl.load(st_ptr + soff + offs, mask=mask, other=0.0)
    return x


@triton.jit
def _chunk_rows(t0, t1, hh, vb, H, scale, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                BASED: tl.constexpr):
    # the chunk's tokens and their validity, row offsets into the [.., H, DK] and [.., H, DV] inputs, the Dv block's
    # columns and validity; c2 (the second-order features' coefficient) and sqrt(scale)
    tok = t0 + tl.arange(0, C)
    cv = vb * BV + tl.arange(0, BV)
    if BASED:
        c2 = scale * 0.5
    else:
        c2 = scale
    return tok, tok < t1, (tok * H + hh) * DK, (tok * H + hh) * DV, cv, cv < DV, c2, tl.sqrt(scale)


@triton.jit
def _out_kernel(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, hc_ptr, hz_ptr, ss_ptr, sz_ptr, seg_ptr, tile_ptr, H, scale,
                eps, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr, TS: tl.constexpr,
                C: tl.constexpr, F2: tl.constexpr, FT: tl.constexpr, FZ: tl.constexpr, NORMALIZE: tl.constexpr,
                BASED: tl.constexpr, MM: tl.constexpr, HAS_START: tl.constexpr):
    """One chunk's output: inter-chunk psi(q) S_c (S_c: the state kernel's + the segment's start state) + the
    masked intra C x C part."""
    t0, t1, crow, srow, hh, vb = _chunk_program(seg_ptr, H, C, NVB)
    if t0 >= t1:
        return
    BK: tl.constexpr = TS * TS
    F: tl.constexpr = DK * DK
    cb = crow * FT * DV
    cz = crow * FZ
    sb = srow * FT * DV
    sz = srow * FZ
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    rk = tl.arange(0, BK)
    tok, tmask, xoff, voff, cv, vmask, c2, sq = _chunk_rows(t0, t1, hh, vb, H, scale, DK, DV, BV, C, BASED)
    m2 = tmask[:, None] & vmask[None, :]
    qc = tl.load(q_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
    kT = tl.load(k_ptr + xoff[None, :] + d[:, None], mask=tmask[None, :], other=0.0)
    vc = tl.load(v_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0)
    x = _mm(qc, kT, tl.zeros([C, C], dtype=tl.float32), MM) * scale
    causal = c[:, None] >= c[None, :]
    if BASED:
        a = tl.where(causal & tmask[None, :], 1.0 + x + 0.5 * x * x, 0.0)
    else:
        a = tl.where(causal, x * x, 0.0)
    num = _mm(a, vc, tl.zeros([C, BV], dtype=tl.float32), MM)
    for fb in range(F2 // BK):
        ti, tj, w_tile = _tile(tile_ptr, fb, TS)
        rows = (fb * BK + rk[:, None]) * DV + cv[None, :]
        hblk = _chunk_state(hc_ptr, ss_ptr, cb, sb, rows, vmask[None, :], HAS_START)
        num = _mm(_psi_block(q_ptr, xoff, tmask, ti, tj, C, TS) * (c2 * w_tile), hblk, num, MM)
    qf = qc.to(tl.float32)
    if BASED:
        S1 = _chunk_state(hc_ptr, ss_ptr, cb, sb, (F2 + d[:, None]) * DV + cv[None, :], vmask[None, :], HAS_START)
        S0 = _chunk_state(hc_ptr, ss_ptr, cb, sb, (F2 + DK) * DV + cv, vmask, HAS_START).to(tl.float32)
        num = _mm(qf * sq, S1, num, MM) + S0[None, :]
    if NORMALIZE:
        zm = _chunk_state(hz_ptr, sz_ptr, cz, sz, d[:, None] * DK + d[None, :], True, HAS_START)
        dn = tl.sum(a, 1) + c2 * _quad(qf, zm, C, DK)
        if BASED:
            z1 = _chunk_state(hz_ptr, sz_ptr, cz, sz, F + d, True, HAS_START)
            z0 = _chunk_state(hz_ptr, sz_ptr, cz, sz, F + DK + tl.arange(0, 1), True, HAS_START)
            dn += sq * tl.sum(qf * z1[None, :], 1) + z0
        out = num / (dn[:, None] + eps)
        if vb == 0:
            tl.store(den_ptr + tok * H + hh, dn, mask=tmask)
    else:
        out = num
    tl.store(o_ptr + voff[:, None] + cv[None, :], out.to(o_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _grad_kernel(q_ptr, k_ptr, v_ptr, do_ptr, den_ptr, h_ptr, hc_ptr, hz_ptr, ss_ptr, sz_ptr, rc_ptr, rz_ptr,
                 rs_ptr, rsz_ptr, dq_ptr, dk_ptr, dv_ptr, seg_ptr, tile_ptr, H, NTOK, scale, eps,
                 DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr, TS: tl.constexpr,
                 C: tl.constexpr, F2: tl.constexpr, FT: tl.constexpr, FZ: tl.constexpr, NORMALIZE: tl.constexpr,
                 BASED: tl.constexpr, MM: tl.constexpr, HAS_START: tl.constexpr, HAS_RSTART: tl.constexpr):
    """One chunk's dq, dk (with several Dv blocks: fp32 partials over the block vb, into dq_ptr[vb], dk_ptr[vb];
    else in the input dtype) and dv.

    S_c (hc + the segment's start ss) is the state before the chunk, R_c (rc + the segment's reverse start rs)
    dL/dS from the tokens after it (its rows already carry the tile weights).
    """
    t0, t1, crow, srow, hh, vb = _chunk_program(seg_ptr, H, C, NVB)
    if t0 >= t1:
        return
    BK: tl.constexpr = TS * TS
    F: tl.constexpr = DK * DK
    cb = crow * FT * DV
    cz = crow * FZ
    sb = srow * FT * DV
    sz = srow * FZ
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    rk = tl.arange(0, BK)
    tok, tmask, xoff, voff, cv, vmask, c2, sq = _chunk_rows(t0, t1, hh, vb, H, scale, DK, DV, BV, C, BASED)
    hw = (vb == 0).to(tl.float32)      # the h (normaliser) terms are added by one Dv block only
    m2 = tmask[:, None] & vmask[None, :]
    qc = tl.load(q_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
    kc = tl.load(k_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
    vc = tl.load(v_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0)
    g = tl.load(do_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0).to(tl.float32)
    if NORMALIZE:
        dn = tl.load(den_ptr + tok * H + hh, mask=tmask, other=1.0) + eps
        g = g / dn[:, None]
        hv = tl.load(h_ptr + tok * H + hh, mask=tmask, other=0.0) * hw
    else:
        hv = tl.zeros([C], dtype=tl.float32)
    # intra-chunk, rows t (queries), columns s (keys), s <= t
    causal = c[:, None] >= c[None, :]
    x = _mm(qc, tl.trans(kc), tl.zeros([C, C], dtype=tl.float32), MM) * scale
    dA = _mm(g, tl.trans(vc), tl.zeros([C, C], dtype=tl.float32), MM) + hv[:, None]
    if BASED:
        a = tl.where(causal & tmask[None, :], 1.0 + x + 0.5 * x * x, 0.0)
        dx = tl.where(causal & tmask[None, :], dA * (1.0 + x), 0.0) * scale
    else:
        a = tl.where(causal, x * x, 0.0)
        dx = tl.where(causal, dA * x, 0.0) * (2.0 * scale)
    dv = _mm(tl.trans(a), g, tl.zeros([C, BV], dtype=tl.float32), MM)
    dq = _mm(dx, kc, tl.zeros([C, DK], dtype=tl.float32), MM)
    dk = _mm(tl.trans(dx), qc, tl.zeros([C, DK], dtype=tl.float32), MM)
    # inter-chunk, feature block by block: dq_t from c2 w psi(q_t).(S g_t), dk_s and dv_s from scale psi(k_s).(R v_s)
    for fb in range(F2 // BK):
        ti, tj, w_tile = _tile(tile_ptr, fb, TS)
        rows = (fb * BK + rk[:, None]) * DV + cv[None, :]
        hblk = _chunk_state(hc_ptr, ss_ptr, cb, sb, rows, vmask[None, :], HAS_START)
        rblk = _chunk_state(rc_ptr, rs_ptr, cb, sb, rows, vmask[None, :], HAS_RSTART)
        G = _mm(g, tl.trans(hblk), tl.zeros([C, BK], dtype=tl.float32), MM)
        dq += (c2 * w_tile) * _contract_block(G, q_ptr, xoff, tmask, ti, tj, C, DK, TS)
        Gk = _mm(vc, tl.trans(rblk), tl.zeros([C, BK], dtype=tl.float32), MM)
        dk += scale * _contract_block(Gk, k_ptr, xoff, tmask, ti, tj, C, DK, TS)
        dv = _mm(_psi_block(k_ptr, xoff, tmask, ti, tj, C, TS) * scale, rblk, dv, MM)
    qf = qc.to(tl.float32)
    kf = kc.to(tl.float32)
    if BASED:
        rows1 = (F2 + d[:, None]) * DV + cv[None, :]
        S1 = _chunk_state(hc_ptr, ss_ptr, cb, sb, rows1, vmask[None, :], HAS_START)
        R1 = _chunk_state(rc_ptr, rs_ptr, cb, sb, rows1, vmask[None, :], HAS_RSTART)
        R0 = _chunk_state(rc_ptr, rs_ptr, cb, sb, (F2 + DK) * DV + cv, vmask, HAS_RSTART).to(tl.float32)
        dq += sq * _mm(g, tl.trans(S1), tl.zeros([C, DK], dtype=tl.float32), MM)
        dk += sq * _mm(vc, tl.trans(R1), tl.zeros([C, DK], dtype=tl.float32), MM)
        dv = _mm(kf * sq, R1, dv, MM) + R0[None, :]
    # normaliser: dq through z (h terms; zero without normalising), dk through dL/dz (also fed by a final z)
    rm = _chunk_state(rz_ptr, rsz_ptr, cz, sz, d[:, None] * DK + d[None, :], True, HAS_RSTART)
    dk += (2.0 * scale * hw) * _mm(kf, rm, tl.zeros([C, DK], dtype=tl.float32), 0)
    if BASED:
        dk += (sq * hw) * _chunk_state(rz_ptr, rsz_ptr, cz, sz, F + d, True, HAS_RSTART)[None, :]
    if NORMALIZE:
        zm = _chunk_state(hz_ptr, sz_ptr, cz, sz, d[:, None] * DK + d[None, :], True, HAS_START)
        dq += (2.0 * c2) * hv[:, None] * _mm(qf, zm, tl.zeros([C, DK], dtype=tl.float32), 0)
        if BASED:
            dq += sq * hv[:, None] * _chunk_state(hz_ptr, sz_ptr, cz, sz, F + d, True, HAS_START)[None, :]
    rows = (vb * NTOK + tok * H + hh)[:, None] * DK + d[None, :]
    tl.store(dq_ptr + rows, dq.to(dq_ptr.dtype.element_ty), mask=tmask[:, None])
    tl.store(dk_ptr + rows, dk.to(dk_ptr.dtype.element_ty), mask=tmask[:, None])
    tl.store(dv_ptr + voff[:, None] + cv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------------- host side


def _layout(based: bool, dk: int = 16, tile: Optional[int] = None) -> Tuple[int, int, int, int]:
    """(tile side TS, second-order state rows F2, state rows FT, normaliser rows FZ) of the internal layout.

    The second-order rows are the TS x TS tiles (I, J), I <= J, of the Dk x Dk pair matrix (i, j), tile after tile,
    row-major inside a tile: the state is symmetric in (i, j), so the tiles below the diagonal are left out
    (Dk = 16: TS = 8 keeps 3 of 4 tiles, 192 rows instead of 256; TS = 4 keeps 10 of 16, 160 rows). The normaliser
    z keeps its full Dk x Dk matrix."""
    ts = tile or TUNING.get("tile") or 8
    if ts not in (4, 8, 16) or dk % ts:
        raise ValueError(f"TUNING['tile'] = {ts}: the tile side must be 4, 8 or 16 and divide Dk = {dk}")
    ng = dk // ts
    f2 = ng * (ng + 1) // 2 * ts * ts
    extra = dk + 1 if based else 0
    return ts, f2, f2 + extra, dk * dk + extra


_TILE_TABLES: dict = {}


def _tile_table(dk: int, ts: int, device) -> torch.Tensor:
    """int32 [tiles, 2]: (I, J) of each stored tile, in the order of the state rows."""
    key = (dk, ts, str(device))
    if key not in _TILE_TABLES:
        ng = dk // ts
        pairs = [[i, j] for i in range(ng) for j in range(i, ng)]
        _TILE_TABLES[key] = torch.tensor(pairs, dtype=torch.int32).to(device)
    return _TILE_TABLES[key]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_seg_tokens(total_tokens: int, n_docs: int, heads: int, chunk: int, device: torch.device,
                      blocks: int = 1) -> int:
    """Tokens per segment: a multiple of ``chunk`` giving about ``target_programs`` state-kernel programs
    (segments x heads x ``blocks`` state blocks). A document of several segments costs a scan of their totals
    and the chunks' loads of their segment's start state."""
    if TUNING.get("seg_tokens"):
        return max(chunk, (int(TUNING["seg_tokens"]) // chunk) * chunk)
    target = TUNING.get("target_programs") or 4 * _num_sms(device)
    per = max(1, total_tokens * heads * blocks // max(1, target))
    seg = chunk
    while seg * 2 <= per and seg < 16384:
        seg *= 2
    return seg


def _segments(offsets: List[int], seg_tokens: int, ns_max: int, chunk: int, device):
    """Segment table int32 [ns_max, 3] = (start, end, first chunk index), doc table [N, 2] = (first segment,
    segments); also the most segments in one document, the number of chunks and the most chunks in one segment."""
    rows, docs = [], []
    n_chunks = 0
    for n in range(len(offsets) - 1):
        a, b = offsets[n], offsets[n + 1]
        first = len(rows)
        s = a
        while True:
            e = min(b, s + seg_tokens)
            rows.append([s, e, n_chunks])
            n_chunks += -(-(e - s) // chunk)
            s = e
            if s >= b:
                break
        docs.append([first, len(rows) - first])
    nseg = len(rows)
    assert nseg <= ns_max, (nseg, ns_max)
    max_chunks = max(-(-(r[1] - r[0]) // chunk) for r in rows)
    rows.extend([[0, 0, 0]] * (ns_max - nseg))
    seg = torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)
    doc = torch.tensor(docs, dtype=torch.int32).to(device, non_blocking=True)
    max_per_doc = max(cnt for _, cnt in docs)
    return seg, doc, max_per_doc, n_chunks, max_chunks


_TABLES: dict = {}


def _segment_tables(cu_seqlens, b, t, seg_tokens, ns_max, chunk, device):
    """_segments for this call. Without cu_seqlens the tables depend only on the shapes: cached, so a call costs
    no host work and no host-to-device copy (a pageable copy would also wait for the GPU queue to drain)."""
    if cu_seqlens is not None:
        return _segments(_offsets_of(cu_seqlens, b, t), seg_tokens, ns_max, chunk, device)
    key = (b, t, seg_tokens, ns_max, chunk, str(device))
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = _segments(_offsets_of(None, b, t), seg_tokens, ns_max, chunk, device)
    return _TABLES[key]


def _saved_chunks(save_states: bool, b: int, t: int, chunk: int) -> int:
    # rows of the per-chunk states the forward returns for the backward: every chunk when saving (no cu_seqlens,
    # so the count follows from the shapes, as the custom op's fake needs), else none
    return b * -(-t // chunk) if save_states else 0


def _ns_max(total_tokens: int, n_docs: int, seg_tokens: int) -> int:
    return total_tokens // seg_tokens + n_docs


def _cfg(which: str, dv: int) -> Tuple[int, int, int]:
    """(Dv block, Dv blocks, warps) of kernel `which` ("state" | "out" | "grad"); a feature block is one tile."""
    dvp = max(16, triton.next_power_of_2(dv))
    bv = min(TUNING.get("bv_" + which) or 64, dvp)
    # 2 warps suit the state programs (one tile each; the first/zeroth-order rows and z have their own program)
    warps = TUNING.get("warps_" + which) or (2 if which == "state" else 4)
    return bv, triton.cdiv(dv, bv), warps


def _kernel_args(which: str, dv: int, dk: int, based: bool, tile: Optional[int], device):
    """(Dv blocks, the layout and launch keywords, the tile table) of kernel `which` ("state" | "out" | "grad")."""
    ts, f2, ft, fz = _layout(based, dk, tile)
    bv, nvb, warps = _cfg(which, dv)
    return nvb, dict(DK=dk, DV=dv, BV=bv, NVB=nvb, TS=ts, F2=f2, FT=ft, FZ=fz, num_warps=warps,
                     **_stages(which)), _tile_table(dk, ts, device)


def _default_tile(dv: int) -> int:
    # narrow value heads: the full 16 x 16 pair matrix as one tile (fewer, larger feature blocks per program) was
    # 8% faster at Dv = 10 on an H200 (benchmarks/results/mqar/); 8 x 8 tiles from Dv 32 (kernels_tune, H100)
    return TUNING.get("tile") or (16 if dv <= 16 else 8)


def _state_blocks(dv: int, dk: int, tile: int) -> int:
    ts, f2, _, _ = _layout(False, dk, tile)
    _, nvb, _ = _cfg("state", dv)
    return f2 // (ts * ts) * nvb


def _offsets_of(cu_seqlens: Optional[torch.Tensor], b: int, t: int) -> List[int]:
    if cu_seqlens is None:
        return [i * t for i in range(b + 1)]
    return [int(x) for x in cu_seqlens.tolist()]


def _stages(which: str):
    # measured on an H100 (kernels_tune): 2 stages for the output kernel; 1 for the gradient kernel, whose 255
    # registers leave no room for prefetched tiles
    s = TUNING.get("stages_" + which) or TUNING.get("stages") or {"out": 2, "grad": 1}.get(which)
    return {"num_stages": s} if s else {}


def _launch_state(x, y, den, hbuf, seg, ch, ch_z, tot, tot_z, *, ns_max, h, scale, c_psi, eps, dk, dv, tile, chunk,
                  reverse, normalize, based, mm):
    nvb, meta, tiles = _kernel_args("state", dv, dk, based, tile, x.device)
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
    _scan_kernel[(n_docs, h, triton.cdiv(m, blk) + triton.cdiv(mz, blk))](
        tot[0], start[0], init[0], fin[0], tot[1], start[1], init[1], fin[1], doc, h, m, mz,
        BLK=blk, REVERSE=reverse, HAS_INIT=has_init, HAS_FIN=has_fin)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # the stored per-chunk and segment start states: bf16 for bf16 inputs (the tensor cores round them to bf16
    # anyway), fp32 otherwise
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


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


def _fwd_impl(q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, tile, chunk, seg_tokens, store_final,
              save_states):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    total = b * t
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, _, ft, fz = _layout(based, dk, tile)
    ns_max = _ns_max(total, n_docs, seg_tokens)
    dev = q.device
    o = torch.empty_like(v, memory_format=torch.contiguous_format)
    den = torch.empty(b, t, h, dtype=torch.float32, device=dev)
    S_start = torch.empty(ns_max, h, ft, dv, dtype=_state_dtype(q.dtype), device=dev)
    z_start = torch.empty(ns_max, h, fz, dtype=torch.float32, device=dev)
    S_fin = torch.empty(n_docs if store_final else 0, h, ft, dv, dtype=torch.float32, device=dev)
    z_fin = torch.empty(n_docs if store_final else 0, h, fz, dtype=torch.float32, device=dev)
    poison(o, den, S_fin, z_fin)
    seg, doc, max_per_doc, n_chunks, max_chunks = _segment_tables(cu_seqlens, b, t, seg_tokens, ns_max, chunk, dev)
    mm = _mm_mode(q.dtype)
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
                         chunk=chunk, reverse=False, normalize=normalize, based=based, mm=mm)
    nvb, meta, tiles = _kernel_args("out", dv, dk, based, tile, dev)
    _out_kernel[(ns_max, max_chunks, h * nvb)](
        q, k, v, o, den, hc, hz, S_start, z_start, seg, tiles, h, scale, eps, C=chunk, NORMALIZE=normalize,
        BASED=based, MM=mm, HAS_START=has_start, **meta)
    if not save_states:  # new empty tensors: a [:0] view would keep the states' storage alive until the backward
        hc, hz = hc.new_empty((0,) + hc.shape[1:]), hz.new_empty((0,) + hz.shape[1:])
    return o, den, S_start, z_start, S_fin, z_fin, hc, hz


def _bwd_impl(q, k, v, o, den, S_start, z_start, hc, hz, do, dSf, dzf, cu_seqlens, has_init, scale, eps,
              normalize, based, tile, chunk, seg_tokens):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    total = b * t
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, _, ft, fz = _layout(based, dk, tile)
    ns_max = _ns_max(total, n_docs, seg_tokens)
    dev = q.device
    seg, doc, max_per_doc, n_chunks, max_chunks = _segment_tables(cu_seqlens, b, t, seg_tokens, ns_max, chunk, dev)
    mm = _mm_mode(q.dtype)
    do, o = do.contiguous(), o.contiguous()
    c2 = scale * 0.5 if based else scale
    common = dict(ns_max=ns_max, h=h, scale=scale, eps=eps, dk=dk, dv=dv, tile=tile, chunk=chunk,
                  normalize=normalize, based=based, mm=mm)
    has_start = max_per_doc > 1 or has_init
    if hc.shape[0] != n_chunks:  # not saved by the forward: recompute
        hc, hz = _state_pass(k, v, den, None, seg, doc, n_docs=n_docs, n_chunks=n_chunks, c_psi=scale,
                             reverse=False, **common)
    hbuf = torch.empty(b, t, h, dtype=torch.float32, device=dev)
    poison(hbuf)
    if normalize:
        bt = 64
        _h_kernel[(triton.cdiv(total * h, bt),)](do, o, den, hbuf, total * h, eps, DV=dv,
                                                 DVP=max(16, triton.next_power_of_2(dv)), BT=bt, num_warps=4)
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
    nvb, meta, tiles = _kernel_args("grad", dv, dk, based, tile, dev)
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


# ----------------------------------------------------------------------------------- custom ops

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
        if dSf is None:
            dSf = torch.zeros(dzf.shape + (v.shape[-1],), dtype=torch.float32, device=q.device)
        if dzf is None:
            dzf = torch.zeros(dSf.shape[:-1], dtype=torch.float32, device=q.device)
        dSf, dzf = dSf.float(), dzf.float()
    dq, dk, dv, dS0, dz0 = _op_bwd(q, k, v, o, den, S_start, z_start, hc, hz, do, dSf, dzf, cu_seqlens, has_init,
                                   scale, eps, normalize, based, tile, chunk, seg_tokens)
    if not has_init:
        dS0 = dz0 = None
    return dq, dk, dv, None, dS0, dz0, None, None, None, None, None, None, None, None, None


_op_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------- state layouts

_CONV_CACHE = {}


def _pair_tables(dk: int, device):
    key = (dk, str(device))
    if key not in _CONV_CACHE:
        iu = torch.triu_indices(dk, dk, 1, device=device)
        diag = torch.arange(dk, device=device)
        # contract index -> (i, j) and its coefficient: kv_c[f] = coef[f] * (S[i*dk+j] + S[j*dk+i]) / 2
        ii = torch.cat([diag, iu[0]])
        jj = torch.cat([diag, iu[1]])
        coef = torch.cat([torch.ones(dk, device=device), torch.full((iu.shape[1],), math.sqrt(2.0), device=device)])
        # internal index -> contract index and coefficient: S[i*dk+j] = kv_c[idx] * inv
        full_idx = torch.empty(dk, dk, dtype=torch.long, device=device)
        full_idx[ii, jj] = torch.arange(ii.numel(), device=device)
        full_idx[jj, ii] = torch.arange(ii.numel(), device=device)
        inv = torch.where(torch.eye(dk, dtype=torch.bool, device=device), 1.0, 1.0 / math.sqrt(2.0))
        _CONV_CACHE[key] = (ii * dk + jj, jj * dk + ii, coef, full_idx.reshape(-1), inv.reshape(-1))
    return _CONV_CACHE[key]


def _sym_tables(dk: int, ts: int, device):
    """The tile layout's rows as indices of the full Dk x Dk pair matrix: (rows [F2], each row's (i, j) = i*Dk + j;
    full [Dk*Dk], the row that holds (i, j) or, below the diagonal tiles, (j, i))."""
    key = ("sym", dk, ts, str(device))
    if key not in _CONV_CACHE:
        tiles = _tile_table(dk, ts, "cpu").tolist()
        lane = torch.arange(ts)
        ii = torch.cat([(ts * ti + lane)[:, None].expand(ts, ts).reshape(-1) for ti, _ in tiles])
        jj = torch.cat([(ts * tj + lane)[None, :].expand(ts, ts).reshape(-1) for _, tj in tiles])
        full = torch.empty(dk, dk, dtype=torch.long)
        r = torch.arange(ii.numel())
        full[jj, ii] = r  # the mirrors first; a diagonal tile's own (j, i) row then overwrites its mirror
        full[ii, jj] = r
        _CONV_CACHE[key] = ((ii * dk + jj).to(device), full.reshape(-1).to(device))
    return _CONV_CACHE[key]


def state_to_internal(kind: str, kv: torch.Tensor, z: torch.Tensor, dk: int, tile: Optional[int] = None):
    """Contract (kv [N,H,F,Dv], z [N,H,F]) -> internal (S [N,H,FT,Dv], z [N,H,FZ]) fp32, differentiable."""
    kv, z = kv.float(), z.float()
    _, _, _, full_idx, inv = _pair_tables(dk, kv.device)
    ts = _layout(kind == "based", dk, tile)[0]
    rows, _ = _sym_tables(dk, ts, kv.device)
    if kind == "rebased":
        return (kv[:, :, full_idx, :] * inv[:, None])[:, :, rows], z[:, :, full_idx] * inv
    f1 = 1 + dk
    sq2 = math.sqrt(2.0)
    S2 = (kv[:, :, f1:][:, :, full_idx, :] * (inv * sq2)[:, None])[:, :, rows]
    z2 = z[:, :, f1:][:, :, full_idx] * (inv * sq2)
    S = torch.cat([S2, kv[:, :, 1:f1], kv[:, :, :1]], dim=2)
    zz = torch.cat([z2, z[:, :, 1:f1], z[:, :, :1]], dim=2)
    return S, zz


def state_from_internal(kind: str, S: torch.Tensor, z: torch.Tensor, dk: int, tile: Optional[int] = None):
    """Internal (S, z) -> contract (kv, z) fp32, differentiable (symmetrised over (i, j))."""
    a, bidx, coef, _, _ = _pair_tables(dk, S.device)
    ts, f2, _, _ = _layout(kind == "based", dk, tile)
    _, full = _sym_tables(dk, ts, S.device)
    S2 = S[:, :, full]  # the full [Dk*Dk] second-order rows
    f = dk * dk
    kv2 = (S2[:, :, a, :] + S2[:, :, bidx, :]) * (0.5 * coef)[:, None]
    z2 = (z[:, :, a] + z[:, :, bidx]) * (0.5 * coef)
    if kind == "rebased":
        return kv2, z2
    r = 1.0 / math.sqrt(2.0)
    kv = torch.cat([S[:, :, f2 + dk:f2 + dk + 1], S[:, :, f2:f2 + dk], kv2 * r], dim=2)
    zz = torch.cat([z[:, :, f + dk:f + dk + 1], z[:, :, f:f + dk], z2 * r], dim=2)
    return kv, zz


# ----------------------------------------------------------------------------------- entry point


def chunk_linear_attention(kind: str, q, k, v, *, scale: float, eps: float = 1e-6, normalize: bool = True,
                           cu_seqlens=None, initial_state=None, output_final_state: bool = False,
                           chunk_size: int = 64, mode=None):
    """Triton (Re)Based attention with the public contract of ``kernels.rebased_attention``."""
    based = kind == "based"
    b, t, h, dk = q.shape
    # Chunks above MAX_CHUNK are clamped: C = 64 is the fastest measured on an H100 (benchmarks/kernels_tune.py)
    # and C = 128 has not been checked on a GPU; TUNING["chunk"] bypasses the clamp.
    max_chunk = MAX_CHUNK_FP32 if q.dtype == torch.float32 else MAX_CHUNK
    chunk = min(chunk_size if chunk_size in (16, 32, 64, 128) else max_chunk, max_chunk)
    if TUNING.get("chunk"):
        chunk = int(TUNING["chunk"])
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    tile = _layout(based, dk, _default_tile(v.shape[-1]))[0]
    seg_tokens = choose_seg_tokens(b * t, n_docs, h, chunk, q.device, _state_blocks(v.shape[-1], dk, tile))
    # the kernels index rows densely; copies made here are also what the op saves for its backward
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = state_to_internal(kind, initial_state[0], initial_state[1], dk, tile)
    save = TUNING.get("save_states") is not False and cu_seqlens is None
    o, den, S_start, z_start, S_fin, z_fin, _, _ = _op_fwd(q, k, v, cu_seqlens, S0, z0, float(scale), float(eps),
                                                           bool(normalize), based, tile, chunk, seg_tokens,
                                                           bool(output_final_state), save)
    final = None
    if output_final_state:
        final = state_from_internal(kind, S_fin, z_fin, dk, tile)
    return o, final
