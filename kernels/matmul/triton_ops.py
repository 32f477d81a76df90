"""Triton backend of ``kernels.matmul_tf32x3`` (registers itself on import): a tiled GEMM whose ``tl.dot`` runs
with ``input_precision="tf32x3"`` (IEEE fp32 under the interpreter, which has no tensor cores), split over K when
the output has too few tiles to fill the GPU (the head's weight gradient: [vocab, d_model] from many rows)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..backend import register_triton_impl
from ..common import cdiv
from ..poison import poison

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Not tuned on a GPU yet: 128 x 128 output tiles, K in steps of 32 (two fp32 operand tiles of 16 KiB per stage).
# The interpreter gets small tiles: it runs every element in numpy.
BLOCK_M, BLOCK_N, BLOCK_K = (32, 32, 16) if _INTERPRETED else (128, 128, 32)
NUM_WARPS, NUM_STAGES = 8, 3
GROUP_M = 8  # output tiles walked in groups of 8 tile rows, so a group's operand tiles are reused from L2


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, k_per_split, s_am, s_ak, s_bk, s_bn, s_cs, s_cm, s_cn,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GM: tl.constexpr, PRECISION: tl.constexpr):
    # program (tile, split): output tile `tile` (grouped order) from K range [split * k_per_split, + k_per_split)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GM * tiles_n
    first_m = (pid // per_group) * GM
    group_m = tl.minimum(tiles_m - first_m, GM)
    tile_m = first_m + (pid % per_group) % group_m
    tile_n = (pid % per_group) // group_m
    rm = (tile_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (tile_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        kk = (k0 + rk).to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mask=(rm < M)[:, None] & (kk < k_end)[None, :],
                    other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=(kk < k_end)[:, None] & (rn < N)[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c = c_ptr + split.to(tl.int64) * s_cs + rm[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(c, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


def _splits(tiles: int, k: int, device: torch.device) -> int:
    """K splits: enough programs for two per SM when the output alone has fewer tiles, each split at least 8 K
    blocks long (shorter ones spend more on the partials' sum than they gain)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // tiles)
    return max(1, min(want, k // (8 * BLOCK_K)))


def matmul_tf32x3_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[1]
    tiles = cdiv(m, BLOCK_M) * cdiv(n, BLOCK_N)
    splits = _splits(tiles, k, a.device)
    # K range per split, a whole number of K blocks
    k_per_split = cdiv(cdiv(k, splits), BLOCK_K) * BLOCK_K if k else BLOCK_K
    splits = max(1, cdiv(k, k_per_split))
    out = torch.empty(splits, m, n, dtype=torch.float32, device=a.device)
    poison(out)
    if m and n:
        _mm_kernel[(tiles, splits)](a, b, out, m, n, k, k_per_split, a.stride(0), a.stride(1), b.stride(0),
                                    b.stride(1), out.stride(0), out.stride(1), out.stride(2), BM=BLOCK_M, BN=BLOCK_N,
                                    BK=BLOCK_K, GM=GROUP_M, PRECISION="ieee" if _INTERPRETED else "tf32x3",
                                    num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out[0] if splits == 1 else out.sum(0)


register_triton_impl("matmul_tf32x3", matmul_tf32x3_triton)
