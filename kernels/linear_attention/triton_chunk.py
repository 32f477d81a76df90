"""Chunked linear-time (Re)Based causal attention in Triton: forward, backward, autograd, custom ops.

Algorithm (see /work/shared/notes/rebased-math.md for the math)
-----------------------------------------------------------------
Inside the kernels the second-order features are the *full* outer product psi(x) = vec(x x^T) (Dk^2 = 256
for Dk = 16), built per chunk in registers from the 16-wide rows (never stored in HBM).
The internal state per (document, head) is, in float32,

    rebased: S2 = scale * sum_s psi(k_s) v_s^T        [Dk^2, Dv]         (z2 likewise with v == 1)
    based:   S2 as above, S1 = sqrt(scale) * sum_s k_s v_s^T [Dk, Dv], S0 = sum_s v_s [Dv]

stacked as rows [S2; S1; S0] of one [FT, Dv] matrix (FT = Dk^2 for rebased, Dk^2 + Dk + 1 for based),
and z = the same with v == 1 ([FT]; its second-order part is used as the Dk x Dk matrix Zm, so the normaliser
term psi(q).z2 = q^T Zm q is a 16-wide product in fp32).
Output: num_t = c2 psi(q_t).S2 + sqrt(s) q_t.S1 + S0 + intra-chunk, c2 = scale (rebased) or scale / 2 (based).
The public (contract) state layout of ``kernels.rebased_feature_map`` / ``based_feature_map`` is converted to and
from this one in PyTorch (differentiable) by :func:`state_to_internal` / :func:`state_from_internal`.

Work decomposition: every document (a batch row, or a cu_seqlens document) is cut into *segments* of
``seg_tokens`` tokens (a multiple of the chunk size C, chosen to give enough programs to fill the GPU);
segments are cut into chunks of C tokens, so no chunk straddles a document boundary.

forward:  [if any document has > 1 segment] _delta_kernel (per-segment state increments)
          + _scan_kernel (exclusive prefix over a document's segments, starting at the initial state);
          _fwd_kernel: per segment, state in registers, loop over its chunks: output (inter + masked intra
          C x C part, normaliser in fp32, fused division), state update; writes the final state.
backward: _delta_kernel in "backward" mode (per-segment increments of dL/dS from later tokens, and
          h_t = -(do_t.o_t)/(den_t+eps)), reverse _scan_kernel (starting at dL/dS_final),
          _dq_kernel (forward order, recomputes the state from the saved segment starts),
          _dkv_kernel (reverse order over chunks, reverse state in registers); writes dL/dS_initial.

Tuning (H100, bf16, Dv 64; benchmarks/kernels_tune.py): chunk 64, Dv block 64, 8 warps, one dk/dv launch and
register outer products are the fastest measured; the kernels are bound by register spills and layout
shuffles, not by tensor-core FLOPs (benchmarks/results/kernels_tune_*.json lists registers and spills).
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
    "chunk_linear_attention", "state_to_internal", "state_from_internal", "internal_state_rows",
    "TUNING", "supports",
]

# Tunables (the benchmark script sweeps these). None -> heuristic.
TUNING = {
    "seg_tokens": None,      # tokens per segment (multiple of the chunk)
    "target_programs": None,  # wanted number of (segment, head) programs
    "bv_fwd": None,           # Dv block of the forward kernel
    "bv_bwd": None,           # Dv block of the backward kernels ("bv_dq" / "bv_dkv" override it for one)
    "warps_fwd": None,
    "warps_bwd": None,        # likewise "warps_dq" / "warps_dkv"
    "stages": None,
    "chunk": None,            # chunk length override (16, 32, 64, 128)
    "split_dkv": None,        # dv and dk in two launches (True) or one (default)
    "spread": None,           # build psi with spreading products (True) or a register outer product (False);
                              # "spread_<kernel>" overrides it for one kernel (fwd, delta, dq, dkv)
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
# Layout economy: the second-order features psi(x)[i*DK + j] = x_i x_j are never reshaped in registers. Two exact
# 0/1 matrix products spread x over the F = DK^2 feature columns (x_i, x_j), so psi = x_i * x_j is born in the
# matmul accumulator layout and feeds the next tensor-core product directly; the same spreading turns the
# contraction sum_j G[t, i*DK + j] x_tj of the backward into one product. The normaliser state z (F values) is
# handled as the DK x DK matrix Zm[i, j] = z[i*DK + j], so psi(q).z = q^T Zm q: a 16-wide product, kept in fp32.


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
def _spread_rows(x, C: tl.constexpr, DK: tl.constexpr, SECOND: tl.constexpr, MM: tl.constexpr):
    # x [C, DK] -> [C, DK*DK]: out[t, i*DK + j] = x[t, i] (SECOND=False) or x[t, j] (SECOND=True); exact
    F: tl.constexpr = DK * DK
    r = tl.arange(0, DK)
    f = tl.arange(0, F)
    if SECOND:
        e = (f[None, :] % DK == r[:, None]).to(tl.float32)
    else:
        e = (f[None, :] // DK == r[:, None]).to(tl.float32)
    return _mm(x, e, tl.zeros([C, F], dtype=tl.float32), MM)


@triton.jit
def _spread_cols(xT, C: tl.constexpr, DK: tl.constexpr, SECOND: tl.constexpr, MM: tl.constexpr):
    # xT [DK, C] -> [DK*DK, C], the transpose of _spread_rows(x)
    F: tl.constexpr = DK * DK
    r = tl.arange(0, DK)
    f = tl.arange(0, F)
    if SECOND:
        e = (f[:, None] % DK == r[None, :]).to(tl.float32)
    else:
        e = (f[:, None] // DK == r[None, :]).to(tl.float32)
    return _mm(e, xT, tl.zeros([F, C], dtype=tl.float32), MM)


@triton.jit
def _psi_rows(x, C: tl.constexpr, DK: tl.constexpr, MM: tl.constexpr, SPREAD: tl.constexpr):
    # [C, DK*DK] second-order features of the rows of x, fp32. SPREAD: born in the accumulator layout from two
    # spreading products; else a broadcast outer product reshaped in registers (the compiler picks the layouts)
    if SPREAD:
        return _spread_rows(x, C, DK, False, MM) * _spread_rows(x, C, DK, True, MM)
    else:
        xf = x.to(tl.float32)
        return tl.reshape(xf[:, :, None] * xf[:, None, :], (C, DK * DK))


@triton.jit
def _psi_cols(xT, C: tl.constexpr, DK: tl.constexpr, MM: tl.constexpr, SPREAD: tl.constexpr):
    # [DK*DK, C] second-order features of the columns of xT
    if SPREAD:
        return _spread_cols(xT, C, DK, False, MM) * _spread_cols(xT, C, DK, True, MM)
    else:
        xf = xT.to(tl.float32)
        return tl.reshape(xf[:, None, :] * xf[None, :, :], (DK * DK, C))


@triton.jit
def _gather_pairs(G, x, C: tl.constexpr, DK: tl.constexpr, MM: tl.constexpr, SPREAD: tl.constexpr):
    # out[t, i] = sum_j G[t, i*DK + j] x[t, j]   (G [C, DK*DK], x [C, DK])
    if SPREAD:
        F: tl.constexpr = DK * DK
        r = tl.arange(0, DK)
        f = tl.arange(0, F)
        e_iT = (f[:, None] // DK == r[None, :]).to(tl.float32)
        return _mm(G * _spread_rows(x, C, DK, True, MM), e_iT, tl.zeros([C, DK], dtype=tl.float32), MM)
    else:
        return tl.sum(tl.reshape(G, (C, DK, DK)) * x.to(tl.float32)[:, None, :], 2)


@triton.jit
def _quad(x, M, C: tl.constexpr, DK: tl.constexpr):
    # [C]: x_t^T M x_t in fp32 (the normaliser's second-order term)
    xf = x.to(tl.float32)
    return tl.sum(_mm(xf, M, tl.zeros([C, DK], dtype=tl.float32), 0) * xf, 1)


@triton.jit
def _delta_kernel(x_ptr, y_ptr, o_ptr, den_ptr, h_ptr, dS_ptr, dz_ptr, seg_ptr,
                  H, scale, c_psi, eps,
                  DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, DVP: tl.constexpr, C: tl.constexpr,
                  FT: tl.constexpr, BWD: tl.constexpr, NORMALIZE: tl.constexpr, BASED: tl.constexpr,
                  MM: tl.constexpr, SPREAD: tl.constexpr):
    """Per segment: dS = sum_t [c_psi psi(x_t); sqrt(s) x_t; 1] y_t^T and dz = same with w_t.

    forward  (BWD=False): x = k, y = v, w = 1.
    backward (BWD=True):  x = q, y = g = do/(den+eps), w = h = -(do.o)/(den+eps) (also stored to h_ptr).
    """
    sid = tl.program_id(0)
    hh = tl.program_id(1)
    vb = tl.program_id(2)
    t0 = tl.load(seg_ptr + sid * 4 + 0)
    t1 = tl.load(seg_ptr + sid * 4 + 1)
    F: tl.constexpr = DK * DK
    f = tl.arange(0, F)
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    cv = vb * BV + tl.arange(0, BV)
    vmask = cv < DV
    sq = tl.sqrt(scale)
    acc = tl.zeros([F, BV], dtype=tl.float32)
    zm = tl.zeros([DK, DK], dtype=tl.float32)
    acc1 = tl.zeros([DK, BV], dtype=tl.float32)
    z1 = tl.zeros([DK], dtype=tl.float32)
    acc0 = tl.zeros([BV], dtype=tl.float32)
    z0 = tl.zeros([1], dtype=tl.float32)
    for ts in range(t0, t1, C):
        tok = ts + c
        tmask = tok < t1
        xoff = (tok * H + hh) * DK
        voff = (tok * H + hh) * DV
        m2 = tmask[:, None] & vmask[None, :]
        yv = tl.load(y_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0).to(tl.float32)
        if BWD:
            if NORMALIZE:
                dn = tl.load(den_ptr + tok * H + hh, mask=tmask, other=1.0) + eps
                yv = yv / dn[:, None]
                cf = tl.arange(0, DVP)
                mf = tmask[:, None] & (cf < DV)[None, :]
                dof = tl.load(y_ptr + voff[:, None] + cf[None, :], mask=mf, other=0.0).to(tl.float32)
                of = tl.load(o_ptr + voff[:, None] + cf[None, :], mask=mf, other=0.0).to(tl.float32)
                w = -tl.sum(dof * of, 1) / dn
                if vb == 0:
                    tl.store(h_ptr + tok * H + hh, w, mask=tmask)
            else:
                w = tl.zeros([C], dtype=tl.float32)
        else:
            w = tmask.to(tl.float32)
        xT = tl.load(x_ptr + xoff[None, :] + d[:, None], mask=tmask[None, :], other=0.0)
        xc = tl.load(x_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        acc = _mm(_psi_cols(xT, C, DK, MM, SPREAD) * c_psi, yv, acc, MM)
        zm = _mm(xT.to(tl.float32) * (w * c_psi)[None, :], xc, zm, 0)
        if BASED:
            acc1 = _mm(xT.to(tl.float32) * sq, yv, acc1, MM)
            z1 += sq * tl.sum(xc * w[:, None], 0)
            acc0 += tl.sum(yv, 0)
            z0 += tl.sum(w, 0)
    base = (sid * H + hh) * FT
    tl.store(dS_ptr + (base + f[:, None]) * DV + cv[None, :], acc, mask=vmask[None, :])
    if vb == 0:
        tl.store(dz_ptr + base + d[:, None] * DK + d[None, :], zm)
    if BASED:
        tl.store(dS_ptr + (base + F + d[:, None]) * DV + cv[None, :], acc1, mask=vmask[None, :])
        tl.store(dS_ptr + (base + F + DK) * DV + cv, acc0, mask=vmask)
        if vb == 0:
            tl.store(dz_ptr + base + F + d, z1)
            tl.store(dz_ptr + base + F + DK + tl.arange(0, 1), z0)


@triton.jit
def _scan_kernel(delta_ptr, start_ptr, init_ptr, doc_ptr, H, M,
                 BLK: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr):
    """Exclusive scan over a document's segments: start[j] = init + sum of delta over earlier (later) segments."""
    n = tl.program_id(0)
    hh = tl.program_id(1)
    blk = tl.program_id(2)
    first = tl.load(doc_ptr + n * 2)
    cnt = tl.load(doc_ptr + n * 2 + 1)
    off = blk * BLK + tl.arange(0, BLK)
    mask = off < M
    if HAS_INIT:
        acc = tl.load(init_ptr + (n * H + hh) * M + off, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLK], dtype=tl.float32)
    for i in range(cnt):
        if REVERSE:
            j = first + cnt - 1 - i
        else:
            j = first + i
        base = (j * H + hh) * M
        tl.store(start_ptr + base + off, acc, mask=mask)
        acc += tl.load(delta_ptr + base + off, mask=mask, other=0.0)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, S_ptr, z_ptr, Sf_ptr, zf_ptr, seg_ptr,
                H, scale, eps,
                DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, FT: tl.constexpr,
                NORMALIZE: tl.constexpr, STORE_FINAL: tl.constexpr, BASED: tl.constexpr, MM: tl.constexpr,
                SPREAD: tl.constexpr):
    sid = tl.program_id(0)
    hh = tl.program_id(1)
    vb = tl.program_id(2)
    t0 = tl.load(seg_ptr + sid * 4 + 0)
    t1 = tl.load(seg_ptr + sid * 4 + 1)
    doc = tl.load(seg_ptr + sid * 4 + 2)
    flags = tl.load(seg_ptr + sid * 4 + 3)
    F: tl.constexpr = DK * DK
    f = tl.arange(0, F)
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    cv = vb * BV + tl.arange(0, BV)
    vmask = cv < DV
    if BASED:
        c2 = scale * 0.5
    else:
        c2 = scale
    sq = tl.sqrt(scale)
    base = (sid * H + hh) * FT
    S = tl.load(S_ptr + (base + f[:, None]) * DV + cv[None, :], mask=vmask[None, :], other=0.0)
    Zm = tl.load(z_ptr + base + d[:, None] * DK + d[None, :])
    if BASED:
        S1 = tl.load(S_ptr + (base + F + d[:, None]) * DV + cv[None, :], mask=vmask[None, :], other=0.0)
        z1 = tl.load(z_ptr + base + F + d)
        S0 = tl.load(S_ptr + (base + F + DK) * DV + cv, mask=vmask, other=0.0)
        z0 = tl.load(z_ptr + base + F + DK + tl.arange(0, 1))
    causal = c[:, None] >= c[None, :]
    for ts in range(t0, t1, C):
        tok = ts + c
        tmask = tok < t1
        xoff = (tok * H + hh) * DK
        voff = (tok * H + hh) * DV
        m2 = tmask[:, None] & vmask[None, :]
        qc = tl.load(q_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        kT = tl.load(k_ptr + xoff[None, :] + d[:, None], mask=tmask[None, :], other=0.0)
        kc = tl.load(k_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        vc = tl.load(v_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0)
        x = _mm(qc, kT, tl.zeros([C, C], dtype=tl.float32), MM) * scale      # [C, C]
        if BASED:
            a = 1.0 + x + 0.5 * x * x
            a = tl.where(causal & tmask[None, :], a, 0.0)
        else:
            a = tl.where(causal, x * x, 0.0)
        num = _mm(a, vc, tl.zeros([C, BV], dtype=tl.float32), MM)
        num = _mm(_psi_rows(qc, C, DK, MM, SPREAD) * c2, S, num, MM)
        dn = tl.sum(a, 1) + c2 * _quad(qc, Zm, C, DK)
        if BASED:
            qf = qc.to(tl.float32)
            num = _mm(qf * sq, S1, num, MM) + S0[None, :]
            dn += sq * tl.sum(qf * z1[None, :], 1) + z0
        if NORMALIZE:
            out = num / (dn[:, None] + eps)
        else:
            out = num
        tl.store(o_ptr + voff[:, None] + cv[None, :], out.to(o_ptr.dtype.element_ty), mask=m2)
        if vb == 0:
            tl.store(den_ptr + tok * H + hh, dn, mask=tmask)
        S = _mm(_psi_cols(kT, C, DK, MM, SPREAD) * scale, vc, S, MM)
        Zm = _mm(kT.to(tl.float32) * scale, kc, Zm, 0)
        if BASED:
            S1 = _mm(kT.to(tl.float32) * sq, vc, S1, MM)
            z1 += sq * tl.sum(kc, 0)
            S0 += tl.sum(vc.to(tl.float32), 0)
            z0 += tl.sum(tmask.to(tl.float32), 0)
    if STORE_FINAL:
        if (flags & 2) != 0:
            fb = (doc * H + hh) * FT
            tl.store(Sf_ptr + (fb + f[:, None]) * DV + cv[None, :], S, mask=vmask[None, :])
            if vb == 0:
                tl.store(zf_ptr + fb + d[:, None] * DK + d[None, :], Zm)
            if BASED:
                tl.store(Sf_ptr + (fb + F + d[:, None]) * DV + cv[None, :], S1, mask=vmask[None, :])
                tl.store(Sf_ptr + (fb + F + DK) * DV + cv, S0, mask=vmask)
                if vb == 0:
                    tl.store(zf_ptr + fb + F + d, z1)
                    tl.store(zf_ptr + fb + F + DK + tl.arange(0, 1), z0)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, den_ptr, h_ptr, dq_ptr, S_ptr, z_ptr, seg_ptr,
               H, NTOK, scale, eps,
               DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, FT: tl.constexpr,
               NORMALIZE: tl.constexpr, BASED: tl.constexpr, MM: tl.constexpr, SPREAD: tl.constexpr):
    """dq (partial over the Dv block vb, written to dq_ptr[vb]) in forward chunk order."""
    sid = tl.program_id(0)
    hh = tl.program_id(1)
    vb = tl.program_id(2)
    t0 = tl.load(seg_ptr + sid * 4 + 0)
    t1 = tl.load(seg_ptr + sid * 4 + 1)
    F: tl.constexpr = DK * DK
    f = tl.arange(0, F)
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    cv = vb * BV + tl.arange(0, BV)
    vmask = cv < DV
    if BASED:
        c2 = scale * 0.5
    else:
        c2 = scale
    sq = tl.sqrt(scale)
    hw = (vb == 0).to(tl.float32)      # the h (normaliser) terms are added by one Dv block only
    base = (sid * H + hh) * FT
    S = tl.load(S_ptr + (base + f[:, None]) * DV + cv[None, :], mask=vmask[None, :], other=0.0)
    Zm = tl.load(z_ptr + base + d[:, None] * DK + d[None, :])
    if BASED:
        S1 = tl.load(S_ptr + (base + F + d[:, None]) * DV + cv[None, :], mask=vmask[None, :], other=0.0)
        z1 = tl.load(z_ptr + base + F + d)
    causal = c[:, None] >= c[None, :]
    for ts in range(t0, t1, C):
        tok = ts + c
        tmask = tok < t1
        xoff = (tok * H + hh) * DK
        voff = (tok * H + hh) * DV
        m2 = tmask[:, None] & vmask[None, :]
        qc = tl.load(q_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        kT = tl.load(k_ptr + xoff[None, :] + d[:, None], mask=tmask[None, :], other=0.0)
        kc = tl.load(k_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        vT = tl.load(v_ptr + voff[None, :] + cv[:, None], mask=tmask[None, :] & vmask[:, None], other=0.0)
        g = tl.load(do_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0).to(tl.float32)
        if NORMALIZE:
            dn = tl.load(den_ptr + tok * H + hh, mask=tmask, other=1.0) + eps
            g = g / dn[:, None]
            hv = tl.load(h_ptr + tok * H + hh, mask=tmask, other=0.0) * hw
        else:
            hv = tl.zeros([C], dtype=tl.float32)
        x = _mm(qc, kT, tl.zeros([C, C], dtype=tl.float32), MM) * scale
        dA = _mm(g, vT, tl.zeros([C, C], dtype=tl.float32), MM) + hv[:, None]
        if BASED:
            dx = tl.where(causal & tmask[None, :], dA * (1.0 + x), 0.0) * scale
        else:
            dx = tl.where(causal, dA * x, 0.0) * (2.0 * scale)
        dq = _mm(dx, kc, tl.zeros([C, DK], dtype=tl.float32), MM)
        # inter-chunk: d/dq_t of c2 psi(q_t).(S2 g_t + z2 h_t) = 2 c2 sum_j (S2 g_t + z2 h_t)[i, j] q_tj
        G = _mm(g, tl.trans(S), tl.zeros([C, F], dtype=tl.float32), MM)
        qf = qc.to(tl.float32)
        dq += (2.0 * c2) * _gather_pairs(G, qc, C, DK, MM, SPREAD)
        dq += (2.0 * c2) * hv[:, None] * _mm(qf, Zm, tl.zeros([C, DK], dtype=tl.float32), 0)
        if BASED:
            dq += sq * (_mm(g, tl.trans(S1), tl.zeros([C, DK], dtype=tl.float32), MM) + hv[:, None] * z1[None, :])
        tl.store(dq_ptr + (vb * NTOK + tok * H + hh)[:, None] * DK + d[None, :], dq, mask=tmask[:, None])
        vc = tl.load(v_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0)
        S = _mm(_psi_cols(kT, C, DK, MM, SPREAD) * scale, vc, S, MM)
        Zm = _mm(kT.to(tl.float32) * scale, kc.to(tl.float32), Zm, 0)
        if BASED:
            S1 = _mm(kT.to(tl.float32) * sq, vc, S1, MM)
            z1 += sq * tl.sum(kc.to(tl.float32), 0)


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, den_ptr, h_ptr, dk_ptr, dv_ptr, R_ptr, r_ptr, dS0_ptr, dz0_ptr,
                seg_ptr, H, NTOK, scale, eps,
                DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, FT: tl.constexpr,
                NORMALIZE: tl.constexpr, STORE_D0: tl.constexpr, BASED: tl.constexpr, MM: tl.constexpr,
                SPREAD: tl.constexpr, PART: tl.constexpr):
    """dk (partial over the Dv block, into dk_ptr[vb]) and dv, in reverse chunk order; dL/dS_initial.

    PART: 0 -> dk and dv; 1 -> dv only; 2 -> dk and dL/dS_initial only. Two launches (1 and 2) each carry the
    reverse state but hold fewer chunk-sized temporaries; on an H100 one launch (0) measured faster.
    """
    DO_DV: tl.constexpr = PART != 2
    DO_DK: tl.constexpr = PART != 1
    sid = tl.program_id(0)
    hh = tl.program_id(1)
    vb = tl.program_id(2)
    t0 = tl.load(seg_ptr + sid * 4 + 0)
    t1 = tl.load(seg_ptr + sid * 4 + 1)
    doc = tl.load(seg_ptr + sid * 4 + 2)
    flags = tl.load(seg_ptr + sid * 4 + 3)
    F: tl.constexpr = DK * DK
    f = tl.arange(0, F)
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    cv = vb * BV + tl.arange(0, BV)
    vmask = cv < DV
    if BASED:
        c2 = scale * 0.5
    else:
        c2 = scale
    sq = tl.sqrt(scale)
    hw = (vb == 0).to(tl.float32)
    base = (sid * H + hh) * FT
    # R, Rm (r as a DK x DK matrix): dL/dS, dL/dz from the tokens after the current chunk
    R = tl.load(R_ptr + (base + f[:, None]) * DV + cv[None, :], mask=vmask[None, :], other=0.0)
    Rm = tl.load(r_ptr + base + d[:, None] * DK + d[None, :])
    if BASED:
        R1 = tl.load(R_ptr + (base + F + d[:, None]) * DV + cv[None, :], mask=vmask[None, :], other=0.0)
        r1 = tl.load(r_ptr + base + F + d)
        R0 = tl.load(R_ptr + (base + F + DK) * DV + cv, mask=vmask, other=0.0)
        r0 = tl.load(r_ptr + base + F + DK + tl.arange(0, 1))
    # transposed intra-chunk layout: rows s (keys), columns t (queries); keep s <= t
    causalT = c[:, None] <= c[None, :]
    nch = tl.cdiv(t1 - t0, C)
    for i in range(nch):
        ts = t0 + (nch - 1 - i) * C
        tok = ts + c
        tmask = tok < t1
        xoff = (tok * H + hh) * DK
        voff = (tok * H + hh) * DV
        m2 = tmask[:, None] & vmask[None, :]
        qc = tl.load(q_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        qT = tl.load(q_ptr + xoff[None, :] + d[:, None], mask=tmask[None, :], other=0.0)
        kc = tl.load(k_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        vc = tl.load(v_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0)
        g = tl.load(do_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0).to(tl.float32)
        gT = tl.load(do_ptr + voff[None, :] + cv[:, None], mask=tmask[None, :] & vmask[:, None],
                     other=0.0).to(tl.float32)
        if NORMALIZE:
            dn = tl.load(den_ptr + tok * H + hh, mask=tmask, other=1.0) + eps
            g = g / dn[:, None]
            gT = gT / dn[None, :]
            hv = tl.load(h_ptr + tok * H + hh, mask=tmask, other=0.0)
        else:
            hv = tl.zeros([C], dtype=tl.float32)
        xT = _mm(kc, qT, tl.zeros([C, C], dtype=tl.float32), MM) * scale      # [s, t]
        if BASED:
            aT = tl.where(causalT & tmask[:, None], 1.0 + xT + 0.5 * xT * xT, 0.0)
        else:
            aT = tl.where(causalT, xT * xT, 0.0)
        if DO_DK:
            dAT = _mm(vc, gT, tl.zeros([C, C], dtype=tl.float32), MM) + (hv * hw)[None, :]
            if BASED:
                dxT = tl.where(causalT & tmask[:, None], dAT * (1.0 + xT), 0.0) * scale
            else:
                dxT = tl.where(causalT, dAT * xT, 0.0) * (2.0 * scale)
        kf = kc.to(tl.float32)
        if DO_DV:
            dv = _mm(aT, g, tl.zeros([C, BV], dtype=tl.float32), MM)
            dv = _mm(_psi_rows(kc, C, DK, MM, SPREAD) * scale, R, dv, MM)
            if BASED:
                dv = _mm(kf * sq, R1, dv, MM) + R0[None, :]
            tl.store(dv_ptr + voff[:, None] + cv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m2)
        if DO_DK:
            dk = _mm(dxT, qc, tl.zeros([C, DK], dtype=tl.float32), MM)
            # inter-chunk, from dL/dS after this chunk: d/dk_s of scale psi(k_s).(R v_s + r) = 2 scale (..)[i, j] k_sj
            Gk = _mm(vc, tl.trans(R), tl.zeros([C, F], dtype=tl.float32), MM)
            dk += (2.0 * scale) * _gather_pairs(Gk, kc, C, DK, MM, SPREAD)
            dk += (2.0 * scale * hw) * _mm(kf, Rm, tl.zeros([C, DK], dtype=tl.float32), 0)
            if BASED:
                dk += sq * (_mm(vc, tl.trans(R1), tl.zeros([C, DK], dtype=tl.float32), MM) + hw * r1[None, :])
            tl.store(dk_ptr + (vb * NTOK + tok * H + hh)[:, None] * DK + d[None, :], dk, mask=tmask[:, None])
        # add this chunk's queries to dL/dS
        qTf = qT.to(tl.float32)
        R = _mm(_psi_cols(qT, C, DK, MM, SPREAD) * c2, g, R, MM)
        if DO_DK:
            Rm = _mm(qTf * (hv * c2)[None, :], qc.to(tl.float32), Rm, 0)
        if BASED:
            R1 = _mm(qTf * sq, g, R1, MM)
            r1 += sq * tl.sum(qc.to(tl.float32) * hv[:, None], 0)
            R0 += tl.sum(g, 0)
            r0 += tl.sum(hv, 0)
    if STORE_D0 and DO_DK:
        if (flags & 1) != 0:
            fb = (doc * H + hh) * FT
            tl.store(dS0_ptr + (fb + f[:, None]) * DV + cv[None, :], R, mask=vmask[None, :])
            if vb == 0:
                tl.store(dz0_ptr + fb + d[:, None] * DK + d[None, :], Rm)
            if BASED:
                tl.store(dS0_ptr + (fb + F + d[:, None]) * DV + cv[None, :], R1, mask=vmask[None, :])
                tl.store(dS0_ptr + (fb + F + DK) * DV + cv, R0, mask=vmask)
                if vb == 0:
                    tl.store(dz0_ptr + fb + F + d, r1)
                    tl.store(dz0_ptr + fb + F + DK + tl.arange(0, 1), r0)


# ----------------------------------------------------------------------------------- host side


def internal_state_rows(based: bool, dk: int = 16) -> int:
    return dk * dk + (dk + 1 if based else 0)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_seg_tokens(total_tokens: int, n_docs: int, heads: int, chunk: int, device: torch.device) -> int:
    """Tokens per segment: a multiple of ``chunk`` giving about ``target_programs`` (segment, head) programs."""
    if TUNING.get("seg_tokens"):
        return max(chunk, (int(TUNING["seg_tokens"]) // chunk) * chunk)
    target = TUNING.get("target_programs") or 4 * _num_sms(device)
    per = max(1, total_tokens * heads // max(1, target))
    seg = chunk
    while seg * 2 <= per and seg < 16384:
        seg *= 2
    return seg


def _segments(offsets: List[int], seg_tokens: int, ns_max: int, device):
    """Segment table int32 [ns_max, 4] = (start, end, doc, flags: 1 first, 2 last) and doc table [N, 2]."""
    rows, docs = [], []
    for n in range(len(offsets) - 1):
        a, b = offsets[n], offsets[n + 1]
        first = len(rows)
        s = a
        while True:
            e = min(b, s + seg_tokens)
            rows.append([s, e, n, 0])
            s = e
            if s >= b:
                break
        rows[first][3] |= 1
        rows[-1][3] |= 2
        docs.append([first, len(rows) - first])
    nseg = len(rows)
    assert nseg <= ns_max, (nseg, ns_max)
    rows.extend([[0, 0, 0, 0]] * (ns_max - nseg))
    seg = torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)
    doc = torch.tensor(docs, dtype=torch.int32).to(device, non_blocking=True)
    max_per_doc = max(cnt for _, cnt in docs)
    return seg, doc, max_per_doc


def _ns_max(total_tokens: int, n_docs: int, seg_tokens: int) -> int:
    return total_tokens // seg_tokens + n_docs


def _blocks(dv: int, which: str) -> Tuple[int, int, int]:
    # which: "fwd" | "bwd" (backward delta) | "dq" | "dkv" (the last two fall back to the "bwd" settings)
    dvp = max(16, triton.next_power_of_2(dv))
    bv = TUNING.get("bv_" + which) or TUNING.get("bv_bwd" if which in ("dq", "dkv") else "") or min(dvp, 64)
    bv = min(bv, dvp)
    warps = TUNING.get("warps_" + which) or TUNING.get("warps_bwd" if which in ("dq", "dkv") else "") or 8
    return bv, dvp, warps


def _offsets_of(cu_seqlens: Optional[torch.Tensor], b: int, t: int) -> List[int]:
    if cu_seqlens is None:
        return [i * t for i in range(b + 1)]
    return [int(x) for x in cu_seqlens.tolist()]


def _launch_scan(delta, start, init, doc, n_docs, h, m, reverse):
    blk = 1024
    grid = (n_docs, h, triton.cdiv(m, blk))
    _scan_kernel[grid](delta, start, init if init is not None else delta, doc, h, m,
                       BLK=blk, REVERSE=reverse, HAS_INIT=init is not None)


def _fwd_impl(q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, chunk, seg_tokens, store_final):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    total = b * t
    offsets = _offsets_of(cu_seqlens, b, t)
    n_docs = len(offsets) - 1
    ft = internal_state_rows(based, dk)
    ns_max = _ns_max(total, n_docs, seg_tokens)
    dev = q.device
    o = torch.empty_like(v)
    den = torch.empty(b, t, h, dtype=torch.float32, device=dev)
    S_start = torch.empty(ns_max, h, ft, dv, dtype=torch.float32, device=dev)
    z_start = torch.empty(ns_max, h, ft, dtype=torch.float32, device=dev)
    S_fin = torch.empty(n_docs if store_final else 0, h, ft, dv, dtype=torch.float32, device=dev)
    z_fin = torch.empty(n_docs if store_final else 0, h, ft, dtype=torch.float32, device=dev)
    poison(o, den, S_fin, z_fin)
    seg, doc, max_per_doc = _segments(offsets, seg_tokens, ns_max, dev)
    mm = _mm_mode(q.dtype)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    has_init = S0 is not None
    if max_per_doc == 1:
        # each document is one segment: its start state is the initial state
        if has_init:
            S_start[:n_docs].copy_(S0)
            z_start[:n_docs].copy_(z0)
        else:
            S_start.zero_()
            z_start.zero_()
    else:
        bv, dvp, warps = _blocks(dv, "bwd")
        dS = torch.zeros(ns_max, h, ft, dv, dtype=torch.float32, device=dev)
        dz = torch.zeros(ns_max, h, ft, dtype=torch.float32, device=dev)
        _delta_kernel[(ns_max, h, triton.cdiv(dv, bv))](
            k, v, v, den, den, dS, dz, seg, h, scale, scale, eps, DK=dk, DV=dv, BV=bv, DVP=dvp, C=chunk, FT=ft,
            BWD=False, NORMALIZE=normalize, BASED=based, MM=mm, SPREAD=_spread("delta"), num_warps=warps)
        _launch_scan(dS, S_start, S0.contiguous() if has_init else None, doc, n_docs, h, ft * dv, False)
        _launch_scan(dz, z_start, z0.contiguous() if has_init else None, doc, n_docs, h, ft, False)
    bv, dvp, warps = _blocks(dv, "fwd")
    _fwd_kernel[(ns_max, h, triton.cdiv(dv, bv))](
        q, k, v, o, den, S_start, z_start, S_fin, z_fin, seg, h, scale, eps,
        DK=dk, DV=dv, BV=bv, C=chunk, FT=ft, NORMALIZE=normalize, STORE_FINAL=store_final, BASED=based, MM=mm,
        SPREAD=_spread("fwd"), num_warps=warps, **_stages())
    return o, den, S_start, z_start, S_fin, z_fin


def _spread(kernel: str) -> bool:
    # how the second-order features are built in `kernel` (see _psi_rows); per-kernel override for tuning
    return bool(TUNING.get("spread_" + kernel, TUNING.get("spread") or False))


def _stages():
    s = TUNING.get("stages")
    return {"num_stages": s} if s else {}


def _bwd_impl(q, k, v, o, den, S_start, z_start, do, dSf, dzf, cu_seqlens, has_init, scale, eps, normalize,
              based, chunk, seg_tokens):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    total = b * t
    offsets = _offsets_of(cu_seqlens, b, t)
    n_docs = len(offsets) - 1
    ft = internal_state_rows(based, dk)
    ns_max = _ns_max(total, n_docs, seg_tokens)
    dev = q.device
    seg, doc, max_per_doc = _segments(offsets, seg_tokens, ns_max, dev)
    mm = _mm_mode(q.dtype)
    do = do.contiguous()
    bv, dvp, warps = _blocks(dv, "bwd")
    hbuf = torch.empty(b, t, h, dtype=torch.float32, device=dev)
    dR = torch.zeros(ns_max, h, ft, dv, dtype=torch.float32, device=dev)
    dr = torch.zeros(ns_max, h, ft, dtype=torch.float32, device=dev)
    c2 = scale * 0.5 if based else scale
    flags = dict(DK=dk, DV=dv, C=chunk, FT=ft, NORMALIZE=normalize, BASED=based, MM=mm)
    _delta_kernel[(ns_max, h, triton.cdiv(dv, bv))](
        q, do, o, den, hbuf, dR, dr, seg, h, scale, c2, eps, BV=bv, DVP=dvp, BWD=True, SPREAD=_spread("delta"),
        num_warps=warps, **flags)
    R_start = torch.empty(ns_max, h, ft, dv, dtype=torch.float32, device=dev)
    r_start = torch.empty(ns_max, h, ft, dtype=torch.float32, device=dev)
    _launch_scan(dR, R_start, dSf.contiguous() if dSf is not None else None, doc, n_docs, h, ft * dv, True)
    _launch_scan(dr, r_start, dzf.contiguous() if dzf is not None else None, doc, n_docs, h, ft, True)
    bv_q, _, warps_q = _blocks(dv, "dq")
    bv_k, _, warps_k = _blocks(dv, "dkv")
    nvb_q, nvb_k = triton.cdiv(dv, bv_q), triton.cdiv(dv, bv_k)
    dq_p = torch.empty(nvb_q, b, t, h, dk, dtype=torch.float32, device=dev)
    dk_p = torch.empty(nvb_k, b, t, h, dk, dtype=torch.float32, device=dev)
    dv_ = torch.empty_like(v)
    dS0 = torch.empty(n_docs if has_init else 0, h, ft, dv, dtype=torch.float32, device=dev)
    dz0 = torch.empty(n_docs if has_init else 0, h, ft, dtype=torch.float32, device=dev)
    poison(dq_p, dk_p, dv_, dS0, dz0)
    ntok = total * h
    _dq_kernel[(ns_max, h, nvb_q)](
        q, k, v, do, den, hbuf, dq_p, S_start, z_start, seg, h, ntok, scale, eps, BV=bv_q, SPREAD=_spread("dq"),
        num_warps=warps_q, **flags, **_stages())
    for part in ((1, 2) if TUNING.get("split_dkv") else (0,)):  # see _dkv_kernel's PART
        _dkv_kernel[(ns_max, h, nvb_k)](
            q, k, v, do, den, hbuf, dk_p, dv_, R_start, r_start, dS0, dz0, seg, h, ntok, scale, eps, BV=bv_k,
            STORE_D0=has_init, SPREAD=_spread("dkv"), PART=part, num_warps=warps_k, **flags, **_stages())
    dq = dq_p.sum(0) if nvb_q > 1 else dq_p[0]
    dkk = dk_p.sum(0) if nvb_k > 1 else dk_p[0]
    return dq.to(q.dtype), dkk.to(k.dtype), dv_, dS0, dz0


# ----------------------------------------------------------------------------------- custom ops

_LIB = "rebased_kernels"


@torch.library.custom_op(f"{_LIB}::la_chunk_fwd", mutates_args=())
def _op_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
            S0: Optional[torch.Tensor], z0: Optional[torch.Tensor], scale: float, eps: float, normalize: bool,
            based: bool, chunk: int, seg_tokens: int, store_final: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, chunk, seg_tokens, store_final)


@_op_fwd.register_fake
def _op_fwd_fake(q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, chunk, seg_tokens, store_final):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ft = internal_state_rows(based, dk)
    ns_max = _ns_max(b * t, n_docs, seg_tokens)
    nf = n_docs if store_final else 0
    f32 = torch.float32
    return (torch.empty_like(v), q.new_empty(b, t, h, dtype=f32), q.new_empty(ns_max, h, ft, dv, dtype=f32),
            q.new_empty(ns_max, h, ft, dtype=f32), q.new_empty(nf, h, ft, dv, dtype=f32),
            q.new_empty(nf, h, ft, dtype=f32))


@torch.library.custom_op(f"{_LIB}::la_chunk_bwd", mutates_args=())
def _op_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, den: torch.Tensor,
            S_start: torch.Tensor, z_start: torch.Tensor, do: torch.Tensor, dSf: Optional[torch.Tensor],
            dzf: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], has_init: bool, scale: float,
            eps: float, normalize: bool, based: bool, chunk: int, seg_tokens: int
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(q, k, v, o, den, S_start, z_start, do, dSf, dzf, cu_seqlens, has_init, scale, eps, normalize,
                     based, chunk, seg_tokens)


@_op_bwd.register_fake
def _op_bwd_fake(q, k, v, o, den, S_start, z_start, do, dSf, dzf, cu_seqlens, has_init, scale, eps, normalize,
                 based, chunk, seg_tokens):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n_docs = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ft = internal_state_rows(based, dk)
    n0 = n_docs if has_init else 0
    f32 = torch.float32
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(n0, h, ft, dv, dtype=f32),
            q.new_empty(n0, h, ft, dtype=f32))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, chunk, seg_tokens, store_final = inputs
    o, den, S_start, z_start, _, _ = output
    ctx.save_for_backward(q, k, v, o, den, S_start, z_start, cu_seqlens)
    ctx.meta = (S0 is not None, scale, eps, normalize, based, chunk, seg_tokens, store_final)


def _backward(ctx, do, dden, dSs, dzs, dSf, dzf):
    q, k, v, o, den, S_start, z_start, cu_seqlens = ctx.saved_tensors
    has_init, scale, eps, normalize, based, chunk, seg_tokens, store_final = ctx.meta
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
    dq, dk, dv, dS0, dz0 = _op_bwd(q, k, v, o, den, S_start, z_start, do, dSf, dzf, cu_seqlens, has_init, scale,
                                   eps, normalize, based, chunk, seg_tokens)
    if not has_init:
        dS0 = dz0 = None
    return dq, dk, dv, None, dS0, dz0, None, None, None, None, None, None, None


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


def state_to_internal(kind: str, kv: torch.Tensor, z: torch.Tensor, dk: int):
    """Contract (kv [N,H,F,Dv], z [N,H,F]) -> internal (S [N,H,FT,Dv], z [N,H,FT]) fp32, differentiable."""
    kv, z = kv.float(), z.float()
    _, _, _, full_idx, inv = _pair_tables(dk, kv.device)
    if kind == "rebased":
        return kv[:, :, full_idx, :] * inv[:, None], z[:, :, full_idx] * inv
    f1 = 1 + dk
    sq2 = math.sqrt(2.0)
    S2 = kv[:, :, f1:][:, :, full_idx, :] * (inv * sq2)[:, None]
    z2 = z[:, :, f1:][:, :, full_idx] * (inv * sq2)
    S = torch.cat([S2, kv[:, :, 1:f1], kv[:, :, :1]], dim=2)
    zz = torch.cat([z2, z[:, :, 1:f1], z[:, :, :1]], dim=2)
    return S, zz


def state_from_internal(kind: str, S: torch.Tensor, z: torch.Tensor, dk: int):
    """Internal (S, z) -> contract (kv, z) fp32, differentiable (symmetrised over (i, j))."""
    a, bidx, coef, _, _ = _pair_tables(dk, S.device)
    f = dk * dk
    kv2 = (S[:, :, a, :] + S[:, :, bidx, :]) * (0.5 * coef)[:, None]
    z2 = (z[:, :, a] + z[:, :, bidx]) * (0.5 * coef)
    if kind == "rebased":
        return kv2, z2
    r = 1.0 / math.sqrt(2.0)
    kv = torch.cat([S[:, :, f + dk:f + dk + 1], S[:, :, f:f + dk], kv2 * r], dim=2)
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
    seg_tokens = choose_seg_tokens(b * t, n_docs, h, chunk, q.device)
    S0 = z0 = None
    if initial_state is not None:
        S0, z0 = state_to_internal(kind, initial_state[0], initial_state[1], dk)
    o, den, S_start, z_start, S_fin, z_fin = _op_fwd(q, k, v, cu_seqlens, S0, z0, float(scale), float(eps),
                                                     bool(normalize), based, chunk, seg_tokens,
                                                     bool(output_final_state))
    final = None
    if output_final_state:
        final = state_from_internal(kind, S_fin, z_fin, dk)
    return o, final
