"""Fused one-token (decoding) step of (Re)Based attention in Triton, updating the state in place (``DESIGN.md``
beside this file, section 3).

Per (batch row, head), with the state in the contract layout of :mod:`kernels.linear_attention.feature_maps`::

    kv += phi(k) v^T,   z += phi(k),   o = phi(q)^T kv / (phi(q)^T z + eps)   (no division if not normalize)

exactly the reference's recurrent mode (the update comes before the read, so the token sees itself). phi(q) and
phi(k) are built in registers from the Dk-wide rows; only q, k, v, o and the state touch memory. One program
handles one (batch row, head) and walks over Dv in tiles: the normaliser needs the whole updated z, and splitting
Dv over programs would let one program read z after another had already updated it in place.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..common import next_power_of_2
from ..poison import poison
from .feature_maps import state_size
from .reference import linear_attention_step_reference

__all__ = ["recurrent_step", "supports_step"]

# Most features the kernel builds in registers (padded to a power of two): Dk up to 32.
MAX_PADDED_FEATURES = 1024
# Elements of one [features, Dv-tile] block of the state held in registers (Dk = 16: 256 x 64; on an H100 a
# 64-wide tile was ~10% faster than 32 at B = 64, H = 16, Dv = 64, and the same at B = 16).
TILE_ELEMENTS = 16384


@triton.jit
def _feature_layout(f, DK: tl.constexpr, BASED: tl.constexpr, c_first, c_square, c_pair):
    """For feature indices f, return (i, use_i, j, use_j, coef) with phi[f] = coef * x[i] * x[j], where an unused
    index stands for a factor 1 and padding features get coef 0.

    Contract layout: based starts with [1, sqrt(s) x_0 .. x_{DK-1}]; then (both kinds) the squares x_i^2 and the
    pairs x_i x_j, i < j, in row-major order, each with its kind's factor (c_square, c_pair).
    """
    N_PAIRS: tl.constexpr = DK * (DK - 1) // 2
    SECOND: tl.constexpr = 1 + DK if BASED else 0  # where the second-order features start
    s = f - SECOND
    is_square = (s >= 0) & (s < DK)
    p = s - DK
    is_pair = (p >= 0) & (p < N_PAIRS)
    # row of pair p: pairs of row r start at r (DK - 1) - r (r - 1) / 2; count the rows r >= 1 starting at or before p
    row = tl.zeros_like(f)
    for r in tl.static_range(1, DK - 1):
        row += (p >= r * (DK - 1) - r * (r - 1) // 2).to(tl.int32)
    col = p - (row * (DK - 1) - row * (row - 1) // 2) + row + 1
    i = tl.where(is_square, s, row)
    j = tl.where(is_square, s, col)
    use_j = is_square | is_pair
    use_i = use_j
    coef = tl.where(is_square, c_square, tl.where(is_pair, c_pair, 0.0))
    if BASED:
        is_first = (f >= 1) & (f <= DK)
        i = tl.where(is_first, f - 1, i)
        use_i = use_i | is_first
        coef = tl.where(f == 0, 1.0, tl.where(is_first, c_first, coef))
    return i, use_i, j, use_j, coef


@triton.jit
def _features(x_ptr, i, use_i, j, use_j, coef):
    # two gathered loads of one DK-wide row (cached), multiplied in fp32
    xi = tl.load(x_ptr + i, mask=use_i, other=1.0).to(tl.float32)
    xj = tl.load(x_ptr + j, mask=use_j, other=1.0).to(tl.float32)
    return coef * xi * xj


@triton.jit
def _recurrent_step_kernel(q_ptr, k_ptr, v_ptr, o_ptr, kv_ptr, z_ptr, c_first, c_square, c_pair, eps,
                           DK: tl.constexpr, DV: tl.constexpr, N_FEATURES: tl.constexpr, PADDED: tl.constexpr,
                           BV: tl.constexpr, BASED: tl.constexpr, NORMALIZE: tl.constexpr):
    # q, k [BH, DK], v, o [BH, DV], kv [BH, N_FEATURES, DV], z [BH, N_FEATURES], all contiguous
    bh = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, PADDED)
    in_f = f < N_FEATURES
    i, use_i, j, use_j, coef = _feature_layout(f, DK, BASED, c_first, c_square, c_pair)
    phi_q = _features(q_ptr + bh * DK, i, use_i, j, use_j, coef)
    phi_k = _features(k_ptr + bh * DK, i, use_i, j, use_j, coef)

    z_ptrs = z_ptr + bh * N_FEATURES + f
    z = tl.load(z_ptrs, mask=in_f, other=0.0) + phi_k
    tl.store(z_ptrs, z, mask=in_f)
    den = tl.sum(phi_q * z, 0) + eps

    for v0 in range(0, DV, BV):
        cv = v0 + tl.arange(0, BV)
        in_v = cv < DV
        v = tl.load(v_ptr + bh * DV + cv, mask=in_v, other=0.0).to(tl.float32)
        kv_ptrs = kv_ptr + (bh * N_FEATURES + f[:, None]) * DV + cv[None, :]
        in_tile = in_f[:, None] & in_v[None, :]
        kv = tl.load(kv_ptrs, mask=in_tile, other=0.0) + phi_k[:, None] * v[None, :]
        tl.store(kv_ptrs, kv, mask=in_tile)
        o = tl.sum(phi_q[:, None] * kv, 0)
        if NORMALIZE:
            o = o / den
        tl.store(o_ptr + bh * DV + cv, o.to(o_ptr.dtype.element_ty), mask=in_v)


def supports_step(kind: str, q: torch.Tensor, state) -> bool:
    """Whether the kernel covers these (validated) inputs: fp32/bf16/fp16 q, k, v, fp32 state, Dk up to 32."""
    return (q.dtype in (torch.float32, torch.bfloat16, torch.float16) and state[0].dtype == torch.float32
            and next_power_of_2(state_size(kind, q.shape[-1])) <= MAX_PADDED_FEATURES)


def recurrent_step(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state, *, scale: float,
                   eps: float = 1e-6, normalize: bool = True) -> torch.Tensor:
    """One decoding step on validated inputs (see :func:`kernels.linear_attention_step`): updates the contiguous
    ``state`` in place, returns o [B, 1, H, Dv]. Inputs the kernel does not cover run the torch reference step."""
    if not supports_step(kind, q, state):
        return linear_attention_step_reference(kind, q, k, v, state, scale=scale, eps=eps, normalize=normalize)
    kv, z = state
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    n_features = state_size(kind, dk)
    padded = next_power_of_2(n_features)
    block_v = min(next_power_of_2(dv), max(16, TILE_ELEMENTS // padded))
    o = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    poison(o)
    if b * h == 0:
        return o
    based = kind == "based"
    # factors of the first-order terms, the squares and the pairs in the contract layout (feature_maps.py)
    if based:
        c_first, c_square, c_pair = math.sqrt(scale), scale / math.sqrt(2.0), scale
    else:
        c_first, c_square, c_pair = 0.0, scale, scale * math.sqrt(2.0)
    _recurrent_step_kernel[(b * h,)](
        q.contiguous(), k.contiguous(), v.contiguous(), o, kv, z, c_first, c_square, c_pair, eps,
        DK=dk, DV=dv, N_FEATURES=n_features, PADDED=padded, BV=block_v, BASED=based, NORMALIZE=normalize,
        num_warps=4)
    return o
