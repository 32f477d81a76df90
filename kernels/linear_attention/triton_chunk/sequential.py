"""The sequential walk of the chunked (Re)Based attention, for narrow value heads: one program per (sequence, head)
walks its chunks in order and keeps the whole state in registers, so no per-chunk state goes through HBM and no
second kernel rebuilds the key features.

The chunk-parallel kernels (package docstring) split a sequence over many programs and pay for it with a state
pass, per-chunk states written and read through HBM, and feature work repeated per program. With value heads of
at most 16 columns (the MQAR models: 5 and 10) the whole state of a head, [Dk², BV] plus the Dk x Dk normaliser,
is a few registers per thread, and a batch of B sequences x H heads already gives thousands of programs. The math
is the chunked form of ``DESIGN.md`` (sections 4-5) with the full Dk x Dk pair matrix as features:

    forward, chunk by chunk:  num = c2 psi(q) S2 + c1 q S1 + S0 + intra,  den = c2 q^T Zm q + c1 q.z1 + n + intra,
                              then S2 += psi(k)^T v, Zm += k^T k, S1 += k^T v, S0 += sum v, z1 += sum k, n += C
    backward, one program per (sequence, head, direction):
        forward walk:  dq from the intra-chunk part and the states before the chunk (as the forward)
        reverse walk:  dk, dv from the intra-chunk part and R2 = sum over later tokens of psi(q_t) g_t^T,
                       Rz = sum h_t q_t q_t^T (R1 = sum q_t g_t^T, R0 = sum g_t, r1 = sum h_t q_t for Based)

with x = scale q.k, c2 = scale² (ReBased) or scale²/2 (Based), c1 = scale and the first/zeroth orders for Based
only, g = do / (den + eps) and h = -(do.o) / (den + eps). States accumulate in fp32; the matmul operands are the
inputs' dtype (bf16 states rounded to bf16 as operands, as the chunk-parallel kernels store them); the normaliser
is fp32 throughout.

Covered: Dk = 16, Dv <= 16, no ``cu_seqlens``, no initial state and no final state (:func:`sequential_supports`);
:func:`use_sequential` decides per call from the launch configuration's ``sequential`` knob.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ...common import next_power_of_2
from ...eager_op import eager_function, needs_dispatcher
from ...poison import poison
from .config import CHUNK_LAUNCH, ChunkLaunchConfig
from .jit import _contract_block, _mm, _psi_block, _psi_block_t, _quad
from .tables import _mm_mode, _num_sms

__all__ = ["sequential_supports", "use_sequential", "sequential_linear_attention", "MAX_DV"]

MAX_DV = 16  # value columns one program keeps: the [Dk², 16] fp32 state is 32 registers a thread at 4 warps


def sequential_supports(q: torch.Tensor, v: torch.Tensor, cu_seqlens, initial_state, output_final_state) -> bool:
    """Whether the sequential walk covers this call (the chunk-parallel kernels cover every call)."""
    return (q.shape[-1] == 16 and 0 < v.shape[-1] <= MAX_DV and q.dtype in (torch.float32, torch.bfloat16)
            and cu_seqlens is None and initial_state is None and not output_final_state)


def use_sequential(q: torch.Tensor, v: torch.Tensor, cu_seqlens, initial_state, output_final_state,
                   config: ChunkLaunchConfig) -> bool:
    """The ``sequential`` knob for this call: True takes the walk wherever it is covered, False never; None (the
    auto rule) takes it on CUDA for bf16 inputs with at least ``config.sequential_min_programs`` (sequence, head)
    pairs."""
    if config.sequential is False or not sequential_supports(q, v, cu_seqlens, initial_state, output_final_state):
        return False
    if config.sequential:
        return True
    programs = q.shape[0] * q.shape[2]
    return q.is_cuda and q.dtype == torch.bfloat16 and programs >= config.sequential_min_programs(_num_sms(q.device))


@triton.jit
def _seq_coefficients(scale, BASED: tl.constexpr):
    # c2: the pair features' coefficient in kappa(scale q.k) = c0 + c1 q.k + c2 psi(q).psi(k); c1 (Based only)
    if BASED:
        return scale * scale * 0.5, scale
    else:
        return scale * scale, scale


@triton.jit
def _seq_chunk(b, j, T, H, hh, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    # chunk j of sequence b, head hh: token validity, the (token, head) rows, row offsets into the [B, T, H, DK] / [B, T, H, DV] tensors, the
    # value columns and their validity. int64: token x head x Dk offsets pass 2^31 at ~8M tokens
    t = j * C + tl.arange(0, C)
    tmask = t < T
    row = (b.to(tl.int64) * T + t) * H + hh
    cv = tl.arange(0, BV)
    return tmask, row, row * DK, row * DV, cv, cv < DV


@triton.jit
def _seq_g_h(do_ptr, o_ptr, den_ptr, row, voff, tmask, cv, vmask, eps, C: tl.constexpr, NORMALIZE: tl.constexpr):
    # g = do / (den + eps) [C, BV] and h = -(do.o) / (den + eps) [C] (g = do, h = 0 without normalising)
    m2 = tmask[:, None] & vmask[None, :]
    g = tl.load(do_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0).to(tl.float32)
    if NORMALIZE:
        dn = tl.load(den_ptr + row, mask=tmask, other=1.0) + eps
        of = tl.load(o_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0).to(tl.float32)
        h = -tl.sum(g * of, 1) / dn
        g = g / dn[:, None]
    else:
        h = tl.zeros([C], dtype=tl.float32)
    return g, h


@triton.jit
def _seq_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, T, H, scale, eps, DK: tl.constexpr, DV: tl.constexpr,
                    BV: tl.constexpr, C: tl.constexpr, NORMALIZE: tl.constexpr, BASED: tl.constexpr,
                    MM: tl.constexpr):
    """o (and den) of one (sequence, head), chunk after chunk, the state before each chunk held in registers."""
    pid = tl.program_id(0)
    b = pid // H
    hh = pid % H
    F: tl.constexpr = DK * DK
    c2, c1 = _seq_coefficients(scale, BASED)
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    causal = c[:, None] >= c[None, :]
    S2 = tl.zeros([F, BV], dtype=tl.float32)
    Zm = tl.zeros([DK, DK], dtype=tl.float32)
    S1 = tl.zeros([DK, BV], dtype=tl.float32)
    S0 = tl.zeros([BV], dtype=tl.float32)
    z1 = tl.zeros([DK], dtype=tl.float32)
    for j in range(tl.cdiv(T, C)):
        tmask, row, xoff, voff, cv, vmask = _seq_chunk(b, j, T, H, hh, DK, DV, BV, C)
        m2 = tmask[:, None] & vmask[None, :]
        qc = tl.load(q_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        kT = tl.load(k_ptr + xoff[None, :] + d[:, None], mask=tmask[None, :], other=0.0)
        vc = tl.load(v_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0)
        x = _mm(qc, kT, tl.zeros([C, C], dtype=tl.float32), MM) * scale
        if BASED:
            a = tl.where(causal & tmask[None, :], 1.0 + x + 0.5 * x * x, 0.0)
        else:
            a = tl.where(causal, x * x, 0.0)
        num = _mm(a, vc, tl.zeros([C, BV], dtype=tl.float32), MM)
        num = _mm(_psi_block(q_ptr, xoff, tmask, 0, 0, C, DK) * c2, S2, num, MM)
        qf = qc.to(tl.float32)
        if BASED:
            num = _mm(qf * c1, S1, num, MM) + S0[None, :]
        if NORMALIZE:
            dn = tl.sum(a, 1) + c2 * _quad(qf, Zm, C, DK)
            if BASED:
                dn += c1 * tl.sum(qf * z1[None, :], 1) + j * C * 1.0  # the earlier chunks' tokens (all valid)
            tl.store(den_ptr + row, dn, mask=tmask)
            num = num / (dn[:, None] + eps)
        tl.store(o_ptr + voff[:, None] + cv[None, :], num.to(o_ptr.dtype.element_ty), mask=m2)
        # the chunk's keys into the state
        S2 = _mm(_psi_block_t(k_ptr, xoff, tmask, 0, 0, C, DK), vc, S2, MM)
        kTf = kT.to(tl.float32)
        Zm = _mm(kTf, tl.trans(kTf), Zm, 0)
        if BASED:
            S1 = _mm(kTf, vc, S1, MM)
            S0 += tl.sum(vc.to(tl.float32), 0)
            z1 += tl.sum(kTf, 1)


@triton.jit
def _seq_dq(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, do_ptr, dq_ptr, b, hh, T, H, scale, eps, DK: tl.constexpr,
            DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, NORMALIZE: tl.constexpr, BASED: tl.constexpr,
            MM: tl.constexpr):
    # the forward walk of the backward: dq_t from the keys up to t (the state before the chunk, as the forward)
    F: tl.constexpr = DK * DK
    c2, c1 = _seq_coefficients(scale, BASED)
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    causal = c[:, None] >= c[None, :]
    S2 = tl.zeros([F, BV], dtype=tl.float32)
    Zm = tl.zeros([DK, DK], dtype=tl.float32)
    S1 = tl.zeros([DK, BV], dtype=tl.float32)
    z1 = tl.zeros([DK], dtype=tl.float32)
    for j in range(tl.cdiv(T, C)):
        tmask, row, xoff, voff, cv, vmask = _seq_chunk(b, j, T, H, hh, DK, DV, BV, C)
        m2 = tmask[:, None] & vmask[None, :]
        qc = tl.load(q_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        kc = tl.load(k_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        vc = tl.load(v_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0)
        g, hv = _seq_g_h(do_ptr, o_ptr, den_ptr, row, voff, tmask, cv, vmask, eps, C, NORMALIZE)
        x = _mm(qc, tl.trans(kc), tl.zeros([C, C], dtype=tl.float32), MM) * scale
        dA = _mm(g, tl.trans(vc), tl.zeros([C, C], dtype=tl.float32), MM) + hv[:, None]
        if BASED:
            dx = tl.where(causal & tmask[None, :], dA * (1.0 + x), 0.0) * scale
        else:
            dx = tl.where(causal, dA * x, 0.0) * (2.0 * scale)
        dq = _mm(dx, kc, tl.zeros([C, DK], dtype=tl.float32), MM)
        G = _mm(g, tl.trans(S2), tl.zeros([C, F], dtype=tl.float32), MM)
        dq += c2 * _contract_block(G, q_ptr, xoff, tmask, 0, 0, C, DK, DK)
        qf = qc.to(tl.float32)
        if BASED:
            dq += c1 * _mm(g, tl.trans(S1), tl.zeros([C, DK], dtype=tl.float32), MM)
        if NORMALIZE:
            dq += (2.0 * c2) * hv[:, None] * _mm(qf, Zm, tl.zeros([C, DK], dtype=tl.float32), 0)
            if BASED:
                dq += c1 * hv[:, None] * z1[None, :]
        tl.store(dq_ptr + xoff[:, None] + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=tmask[:, None])
        S2 = _mm(_psi_block_t(k_ptr, xoff, tmask, 0, 0, C, DK), vc, S2, MM)
        kf = kc.to(tl.float32)
        Zm = _mm(tl.trans(kf), kf, Zm, 0)
        if BASED:
            S1 = _mm(tl.trans(kf), vc, S1, MM)
            z1 += tl.sum(kf, 0)


@triton.jit
def _seq_dkv(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, do_ptr, dk_ptr, dv_ptr, b, hh, T, H, scale, eps,
             DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, NORMALIZE: tl.constexpr,
             BASED: tl.constexpr, MM: tl.constexpr):
    # the reverse walk: dk_s, dv_s from the queries from s on (dL/dS from the chunks after this one, held in
    # registers, plus the intra-chunk part); rows s (keys), columns t (queries) in the C x C blocks
    F: tl.constexpr = DK * DK
    c2, c1 = _seq_coefficients(scale, BASED)
    c = tl.arange(0, C)
    d = tl.arange(0, DK)
    later = c[None, :] >= c[:, None]
    R2 = tl.zeros([F, BV], dtype=tl.float32)
    Rz = tl.zeros([DK, DK], dtype=tl.float32)
    R1 = tl.zeros([DK, BV], dtype=tl.float32)
    R0 = tl.zeros([BV], dtype=tl.float32)
    r1 = tl.zeros([DK], dtype=tl.float32)
    n_chunks = tl.cdiv(T, C)
    for it in range(n_chunks):
        j = n_chunks - 1 - it
        tmask, row, xoff, voff, cv, vmask = _seq_chunk(b, j, T, H, hh, DK, DV, BV, C)
        m2 = tmask[:, None] & vmask[None, :]
        qc = tl.load(q_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        kc = tl.load(k_ptr + xoff[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        vc = tl.load(v_ptr + voff[:, None] + cv[None, :], mask=m2, other=0.0)
        g, hv = _seq_g_h(do_ptr, o_ptr, den_ptr, row, voff, tmask, cv, vmask, eps, C, NORMALIZE)
        # padded queries past T carry g = h = 0, so they add nothing; padded keys are never stored
        xt = _mm(kc, tl.trans(qc), tl.zeros([C, C], dtype=tl.float32), MM) * scale
        dAt = _mm(vc, tl.trans(g), tl.zeros([C, C], dtype=tl.float32), MM) + hv[None, :]
        if BASED:
            at = tl.where(later, 1.0 + xt + 0.5 * xt * xt, 0.0)
            dxt = tl.where(later, dAt * (1.0 + xt), 0.0) * scale
        else:
            at = tl.where(later, xt * xt, 0.0)
            dxt = tl.where(later, dAt * xt, 0.0) * (2.0 * scale)
        dv = _mm(at, g, tl.zeros([C, BV], dtype=tl.float32), MM)
        dk = _mm(dxt, qc, tl.zeros([C, DK], dtype=tl.float32), MM)
        dv = _mm(_psi_block(k_ptr, xoff, tmask, 0, 0, C, DK) * c2, R2, dv, MM)
        Gk = _mm(vc, tl.trans(R2), tl.zeros([C, F], dtype=tl.float32), MM)
        dk += c2 * _contract_block(Gk, k_ptr, xoff, tmask, 0, 0, C, DK, DK)
        kf = kc.to(tl.float32)
        if BASED:
            dv = _mm(kf * c1, R1, dv, MM) + R0[None, :]
            dk += c1 * _mm(vc, tl.trans(R1), tl.zeros([C, DK], dtype=tl.float32), MM)
        if NORMALIZE:
            dk += (2.0 * c2) * _mm(kf, Rz, tl.zeros([C, DK], dtype=tl.float32), 0)
            if BASED:
                dk += c1 * r1[None, :]
        tl.store(dk_ptr + xoff[:, None] + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=tmask[:, None])
        tl.store(dv_ptr + voff[:, None] + cv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m2)
        # the chunk's queries into dL/dS
        R2 = _mm(_psi_block_t(q_ptr, xoff, tmask, 0, 0, C, DK), g, R2, MM)
        qf = qc.to(tl.float32)
        if NORMALIZE:
            Rz = _mm(tl.trans(qf * hv[:, None]), qf, Rz, 0)
        if BASED:
            R1 = _mm(tl.trans(qf), g, R1, MM)
            R0 += tl.sum(g, 0)
            r1 += tl.sum(qf * hv[:, None], 0)


@triton.jit
def _seq_bwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, T, H, scale, eps,
                    DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                    NORMALIZE: tl.constexpr, BASED: tl.constexpr, MM: tl.constexpr):
    """dq (program_id(1) == 0, forward walk) or dk and dv (1, reverse walk) of one (sequence, head): both walks in
    one launch, twice the programs of either."""
    pid = tl.program_id(0)
    b = pid // H
    hh = pid % H
    if tl.program_id(1) == 0:
        _seq_dq(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, do_ptr, dq_ptr, b, hh, T, H, scale, eps, DK, DV, BV, C,
                NORMALIZE, BASED, MM)
    else:
        _seq_dkv(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, do_ptr, dk_ptr, dv_ptr, b, hh, T, H, scale, eps, DK, DV, BV,
                 C, NORMALIZE, BASED, MM)


def _launch_keywords(dv: int, config: ChunkLaunchConfig) -> dict:
    return dict(DV=dv, BV=max(16, next_power_of_2(dv)), C=config.sequential_chunk,
                num_warps=config.warps_sequential)


def _seq_fwd_impl(q, k, v, scale: float, eps: float, normalize: bool, based: bool):
    config = CHUNK_LAUNCH.get()
    b, t, h, dk = q.shape
    o = torch.empty_like(v, memory_format=torch.contiguous_format)
    den = torch.empty(b, t, h, dtype=torch.float32, device=q.device)
    poison(o, den)
    _seq_fwd_kernel[(b * h,)](q, k, v, o, den, t, h, scale, eps, DK=dk, NORMALIZE=normalize, BASED=based,
                              MM=_mm_mode(q.dtype, config), **_launch_keywords(v.shape[-1], config))
    return o, den


def _seq_bwd_impl(q, k, v, o, den, do, scale: float, eps: float, normalize: bool, based: bool):
    config = CHUNK_LAUNCH.get()
    b, t, h, dk = q.shape
    do, o = do.contiguous(), o.contiguous()
    dq, dk_, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    poison(dq, dk_, dv)
    _seq_bwd_kernel[(b * h, 2)](q, k, v, o, den, do, dq, dk_, dv, t, h, scale, eps, DK=dk, NORMALIZE=normalize,
                                BASED=based, MM=_mm_mode(q.dtype, config), **_launch_keywords(v.shape[-1], config))
    return dq, dk_, dv


_LIB = "rebased_kernels"


@torch.library.custom_op(f"{_LIB}::la_seq_fwd", mutates_args=())
def _op_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, eps: float, normalize: bool,
            based: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _seq_fwd_impl(q, k, v, scale, eps, normalize, based)


@_op_fwd.register_fake
def _op_fwd_fake(q, k, v, scale, eps, normalize, based):
    b, t, h, _ = q.shape
    return torch.empty_like(v, memory_format=torch.contiguous_format), q.new_empty(b, t, h, dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::la_seq_bwd", mutates_args=())
def _op_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, den: torch.Tensor,
            do: torch.Tensor, scale: float, eps: float, normalize: bool, based: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _seq_bwd_impl(q, k, v, o, den, do, scale, eps, normalize, based)


@_op_bwd.register_fake
def _op_bwd_fake(q, k, v, o, den, do, scale, eps, normalize, based):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, eps, normalize, based = inputs
    o, den = output
    ctx.save_for_backward(q, k, v, o, den)
    ctx.set_materialize_grads(False)  # den carries no gradient: no zero tensor for it
    ctx.meta = (scale, eps, normalize, based)


def _backward(ctx, do, dden):
    q, k, v, o, den = ctx.saved_tensors
    if do is None:
        return None, None, None, None, None, None, None
    bwd = _op_bwd if needs_dispatcher(q, do) else _seq_bwd_impl
    dq, dk, dv = bwd(q, k, v, o, den, do, *ctx.meta)
    return dq, dk, dv, None, None, None, None


_op_fwd.register_autograd(_backward, setup_context=_setup_context)
_eager_fwd = eager_function("SequentialLinearAttention", lambda *inputs: _seq_fwd_impl(*inputs), _setup_context,
                            _backward)


def sequential_linear_attention(kind: str, q, k, v, *, scale: float, eps: float = 1e-6, normalize: bool = True):
    """Triton (Re)Based attention by the sequential walk; the caller has checked :func:`sequential_supports`.
    Returns o [B, T, H, Dv] in the input dtype."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    fwd = _op_fwd if needs_dispatcher(q, k, v) else _eager_fwd
    o, _ = fwd(q, k, v, float(scale), float(eps), bool(normalize), kind == "based")
    return o
