"""Triton backend of ``kernels.linear_cross_entropy_grad`` (registers itself on import).

The logits never reach memory: each program recomputes its [rows, words] tiles of h Wᵀ with ``tl.dot`` where it
needs them. Two kernels:

- ``_loss_dh_kernel``, one program per block of rows: a first sweep over the vocabulary keeps a running logsumexp
  and picks the target's logit (the loss); a second sweep recomputes each tile, turns it into the gradient of the
  logits G = (softmax - onehot) · w and accumulates dL/dh = G W in registers. The logsumexp is stored for the next.
- ``_dw_kernel``, one program per (block of words, slice of the rows): recomputes the tiles of its words for its
  rows and accumulates dL/dW = Gᵀ h; the slices' partial sums (fp32) are added on the host side of the call.

That is five GEMMs' worth of tensor-core work against three for the chunked path (logits, G W, Gᵀ h), but none
of the [R, V] traffic: at the MQAR head (262k query rows × 8192 words per step) the chunked path writes and reads
4.3 GB of bf16 logits five times. G is rounded to the inputs' dtype before its two products, as the chunked path
rounds it when it writes it over the logits; the softmax itself is fp32, from fp32 logits.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backend import register_triton_impl
from ..common import cdiv, next_power_of_2
from ..poison import poison
from . import MAX_HIDDEN

# Triton's interpreter (the CPU tests) gets 16-bit dot products wrong: there the operands go up to fp32 (exactly)
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# the lowest finite fp32: a running max that starts there never makes exp(-inf - (-inf)) = NaN (a constexpr: a
# compiled kernel reads no other globals, though the interpreter does)
_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _rows(ptr, n_rows, D, stride, first, BR: tl.constexpr, BD: tl.constexpr):
    """Rows first .. first + BR of a row-major [n_rows, D] matrix as a [BR, BD] tile, zero past its edges. The
    offsets inside the tile are int32 from a 64-bit base: 64-bit addresses per element cost registers that spilled."""
    rows = tl.arange(0, BR)
    dims = tl.arange(0, BD)
    base = ptr + (first + tl.full([], 0, tl.int64)) * stride  # first: a scalar tensor compiled, an int interpreted
    return tl.load(base + rows[:, None] * stride + dims[None, :],
                   mask=(rows[:, None] < n_rows - first) & (dims[None, :] < D), other=0.0)


@triton.jit
def _store_rows(ptr, value, n_rows, D, stride, first, BR: tl.constexpr, BD: tl.constexpr):
    """``value`` [BR, BD] into rows first .. first + BR of a row-major [n_rows, D] matrix (in its dtype), nothing
    past its edges: the store twin of ``_rows``."""
    rows = tl.arange(0, BR)
    dims = tl.arange(0, BD)
    base = ptr + (first + tl.full([], 0, tl.int64)) * stride
    tl.store(base + rows[:, None] * stride + dims[None, :], value.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows - first) & (dims[None, :] < D))


@triton.jit
def _softmax_grad(x, lse, scale, is_target):
    """G = (softmax - onehot) · scale of a logits tile x (words past V hold -inf: exp gives 0); lse and scale
    broadcast against x, is_target marks each row's target word (the tile may be transposed)."""
    g = tl.exp(x - lse) * scale
    return tl.where(is_target, g - scale, g)


@triton.jit
def _loss_dh_kernel(h_ptr, w_ptr, t_ptr, s_ptr, loss_ptr, lse_ptr, dh_ptr, R, V, D, stride_h, stride_w, stride_dh,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, NEED_DH: tl.constexpr,
                    PRECISION: tl.constexpr):
    first = tl.program_id(0) * BM
    rows = first + tl.arange(0, BM)
    row_ok = rows < R
    h = _rows(h_ptr, R, D, stride_h, first, BM, BD)
    target = tl.load(t_ptr + rows, mask=row_ok, other=0)
    m = tl.zeros((BM,), tl.float32) + _LOWEST
    s = tl.zeros((BM,), tl.float32)
    target_logit = tl.zeros((BM,), tl.float32)
    for start in range(0, V, BN):
        words = start + tl.arange(0, BN)
        x = _dot(h, tl.trans(_rows(w_ptr, V, D, stride_w, start, BN, BD)), None, PRECISION)
        x = tl.where(words[None, :] < V, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
        target_logit += tl.sum(tl.where(words[None, :] == target[:, None], x, 0.0), 1)
    lse = m + tl.log(s)
    # a target outside [0, V) (a caller's error, not checked on the host, which would cost a sync) gives a NaN loss
    loss = tl.where((target >= 0) & (target < V), lse - target_logit, float("nan"))
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if NEED_DH:
        scale = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        dh = tl.zeros((BM, BD), tl.float32)
        for start in range(0, V, BN):
            words = start + tl.arange(0, BN)
            w = _rows(w_ptr, V, D, stride_w, start, BN, BD)
            x = tl.where(words[None, :] < V, _dot(h, tl.trans(w), None, PRECISION), float("-inf"))
            g = _softmax_grad(x, lse[:, None], scale[:, None], words[None, :] == target[:, None])
            dh = _dot(g.to(w.dtype), w, dh, PRECISION)
        _store_rows(dh_ptr, dh, R, D, stride_dh, first, BM, BD)


@triton.jit
def _dw_kernel(h_ptr, w_ptr, t_ptr, s_ptr, lse_ptr, dw_ptr, R, V, D, rows_per_slice, stride_h, stride_w,
               stride_dw_slice, stride_dw, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
               PRECISION: tl.constexpr):
    first_word = tl.program_id(0) * BN
    words = first_word + tl.arange(0, BN)
    w = _rows(w_ptr, V, D, stride_w, first_word, BN, BD)
    first = tl.program_id(1) * rows_per_slice
    end = tl.minimum(first + rows_per_slice, R)
    dw = tl.zeros((BN, BD), tl.float32)
    for start in range(first, end, BM):
        rows = start + tl.arange(0, BM)
        row_ok = rows < end
        h = _rows(h_ptr, end, D, stride_h, start, BM, BD)  # rows past the slice read as zero
        target = tl.load(t_ptr + rows, mask=row_ok, other=0)
        scale = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # 0: no gradient from those rows
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        # the logits transposed, [BN, BM]: G's transpose comes out in the layout its product with h takes
        xt = tl.where(words[:, None] < V, _dot(w, tl.trans(h), None, PRECISION), float("-inf"))
        gt = _softmax_grad(xt, lse[None, :], scale[None, :], words[:, None] == target[None, :])
        dw = _dot(gt.to(h.dtype), h, dw, PRECISION)
    _store_rows(dw_ptr + tl.program_id(1).to(tl.int64) * stride_dw_slice, dw, V, D, stride_dw, first_word, BN, BD)


# (rows, words, warps) of each kernel's tile, by the widest hidden size they serve. 16-bit: on sm_90 (H100 / H200)
# the largest tiles that compile without register spills (kernels_resources-style check in
# tests/kernels/test_triton_linear_cross_entropy.py). fp32 products run on the CUDA cores (IEEE, no tensor cores)
# in small tiles: correct, but the trainer keeps cuBLAS and the chunks for fp32 (pretrain.models.loss).
TILES_16BIT = ((64, {"loss_dh": (64, 128, 8), "dw": (64, 128, 8)}),
               (128, {"loss_dh": (64, 64, 8), "dw": (64, 128, 8)}),
               (256, {"loss_dh": (64, 32, 8), "dw": (64, 32, 8)}))
TILES_FP32 = {"loss_dh": (16, 32, 4), "dw": (16, 32, 4)}


def tiles(hidden_dim: int, dtype: torch.dtype) -> dict:
    """{"loss_dh": (rows, words, warps), "dw": (...)} for a head of ``hidden_dim`` inputs in ``dtype``."""
    if dtype == torch.float32:
        return TILES_FP32
    return next(t for widest, t in TILES_16BIT if hidden_dim <= widest)


def _row_slices(word_blocks: int, device: torch.device) -> int:
    """Slices of the rows for ``_dw_kernel``: enough programs for about 4 per SM (one slice off CUDA)."""
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return cdiv(programs, word_blocks)


def linear_cross_entropy_grad_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     row_scale: torch.Tensor, *, need_hidden: bool = True, need_weight: bool = True,
                                     blocks: Optional[Tuple[int, int]] = None, num_warps: Optional[int] = None,
                                     row_slices: Optional[int] = None
                                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The op (``kernels.linear_cross_entropy_grad``) on Triton. blocks (rows, words) and num_warps replace both
    kernels' entries of :func:`tiles`; row_slices: how many slices of the rows share the work on dL/dW (at most
    one per block of rows; None: about 4 programs per SM)."""
    rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    if hidden_dim > MAX_HIDDEN:
        raise ValueError(f"the Triton linear cross-entropy keeps a row's hidden vector in registers: hidden size "
                         f"{hidden_dim} is over its {MAX_HIDDEN}; use the chunked path (pretrain.models.loss)")
    hidden, weight = hidden.contiguous(), weight.contiguous()
    targets, row_scale = targets.contiguous(), row_scale.contiguous()
    launch = {name: (*(blocks or tile[:2]), num_warps or tile[2])
              for name, tile in tiles(hidden_dim, hidden.dtype).items()}
    block_dim = max(16, next_power_of_2(hidden_dim))
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"  # fp32: exact products; 16-bit: no effect
    loss = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    poison(loss, lse, *([grad_hidden] if need_hidden else []))
    grad_weight = None
    if rows:
        block_rows, block_words, warps = launch["loss_dh"]
        _loss_dh_kernel[(cdiv(rows, block_rows),)](
            hidden, weight, targets, row_scale, loss, lse, grad_hidden if need_hidden else hidden, rows, vocab,
            hidden_dim, hidden.stride(0), weight.stride(0), hidden_dim, BM=block_rows, BN=block_words,
            BD=block_dim, NEED_DH=need_hidden, PRECISION=precision, num_warps=warps)
    if need_weight and not rows:
        grad_weight = torch.zeros(vocab, hidden_dim, dtype=torch.float32, device=hidden.device)
    elif need_weight:
        block_rows, block_words, warps = launch["dw"]
        word_blocks = cdiv(vocab, block_words)
        slices = max(1, min(cdiv(rows, block_rows), row_slices or _row_slices(word_blocks, hidden.device)))
        rows_per_slice = cdiv(cdiv(rows, slices), block_rows) * block_rows
        slices = cdiv(rows, rows_per_slice)  # a slice past the rows would only add zeros
        partial = torch.empty(slices, vocab, hidden_dim, dtype=torch.float32, device=hidden.device)
        poison(partial)
        _dw_kernel[(word_blocks, slices)](
            hidden, weight, targets, row_scale, lse, partial, rows, vocab, hidden_dim, rows_per_slice,
            hidden.stride(0), weight.stride(0), partial.stride(0), partial.stride(1), BM=block_rows,
            BN=block_words, BD=block_dim, PRECISION=precision, num_warps=warps)
        grad_weight = partial[0] if slices == 1 else partial.sum(0)
    return loss, grad_hidden, grad_weight


register_triton_impl("linear_cross_entropy_grad", linear_cross_entropy_grad_triton)
