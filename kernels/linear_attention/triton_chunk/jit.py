"""The @triton.jit kernels of the chunked (Re)Based attention (the algorithm: the package docstring; the math and
the symmetric-tile state layout: ``kernels/linear_attention/DESIGN.md``, sections 4-7); launched from
:mod:`.launch`."""

import os

import triton
import triton.language as tl

# Triton's interpreter (the CPU tests) needs a few operations done differently (the kernels' uses, and the matmul
# mode of tables._mm_mode). Read once at import, as triton.jit itself decides then whether a kernel is interpreted
INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _mm(a, b, acc, MM: tl.constexpr):
    # acc + a @ b. MM: 0 -> fp32 operands (no tf32); 1 -> bf16 operands; 3 -> bf16-rounded operands multiplied in
    # fp32 (interpreter only); 5 -> fp32 operands, 3xTF32. (fp16 inputs run as fp32: tables._mm_mode.)
    if MM == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif MM == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif MM == 3:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                      input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")


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
    tok = t0.to(tl.int64) + j * C + tl.arange(0, C)  # int64: token x head x Dv offsets pass 2^31 at ~2M tokens
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
    cbase = tl.load(seg_ptr + sid * 3 + 2).to(tl.int64)  # per-chunk state offsets pass 2^31 at ~700k tokens
    F: tl.constexpr = DK * DK
    d = tl.arange(0, DK)
    cv = vb * BV + tl.arange(0, BV)
    vmask = cv < DV
    nch = tl.cdiv(t1 - t0, C)
    st_ty = ch_ptr.dtype.element_ty
    srow = (sid * H + hh).to(tl.int64)
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
        acc = tl.load(init_ptr + row.to(tl.int64) * M + off, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLK], dtype=tl.float32)
    for i in range(cnt):
        if REVERSE:
            j = first + cnt - 1 - i
        else:
            j = first + i
        base = (j * H + row % H).to(tl.int64) * M
        tl.store(start_ptr + base + off, acc.to(start_ptr.dtype.element_ty), mask=mask)
        acc += tl.load(tot_ptr + base + off, mask=mask, other=0.0)
    if HAS_FIN:
        tl.store(fin_ptr + row.to(tl.int64) * M + off, acc, mask=mask)


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
    r = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
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
    # int64 offsets: token x head x Dv passes 2^31 at ~2M tokens, the per-chunk states at ~700k
    t0 = tl.load(seg_ptr + sid * 3 + 0).to(tl.int64) + j * C
    t1 = tl.load(seg_ptr + sid * 3 + 1)
    crow = (tl.load(seg_ptr + sid * 3 + 2).to(tl.int64) + j) * H + hh
    return t0, t1, crow, (sid * H + hh).to(tl.int64), hh, vb


@triton.jit
def _chunk_state(ch_ptr, st_ptr, coff, soff, offs, mask, HAS_START: tl.constexpr):
    # a block of a chunk's state: the segment's own part (the state kernel's, from zero) plus, for documents of
    # several segments or with a given start, the segment's start state (read by all its chunks: from L2). Added in
    # the stored dtype: in bf16 that is the fp32 sum's rounding, which the tensor cores would make anyway, and the
    # gradient kernel keeps its registers (with fp32 blocks it took 0.495 ms instead of 0.480 at T = 8192, H100).
    # Triton's interpreter adds bf16 values wrongly (NaN, triton 3.9): there the same sum is made in fp32.
    x = tl.load(ch_ptr + coff + offs, mask=mask, other=0.0)
    if HAS_START:
        start = tl.load(st_ptr + soff + offs, mask=mask, other=0.0)
        if INTERPRETED:
            x = (x.to(tl.float32) + start.to(tl.float32)).to(x.dtype)
        else:
            x += start
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
    rows = (vb.to(tl.int64) * NTOK + tok * H + hh)[:, None] * DK + d[None, :]
    tl.store(dq_ptr + rows, dq.to(dq_ptr.dtype.element_ty), mask=tmask[:, None])
    tl.store(dk_ptr + rows, dk.to(dk_ptr.dtype.element_ty), mask=tmask[:, None])
    tl.store(dv_ptr + voff[:, None] + cv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m2)
