"""The public (contract) state layout of ``kernels.rebased_feature_map`` / ``based_feature_map`` to and from the
internal one of the chunked kernels (symmetric tiles of the pair matrix; ``kernels/linear_attention/DESIGN.md``,
section 6), in PyTorch and differentiable."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .tables import _layout, _tile_table

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
