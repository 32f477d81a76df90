"""Helpers every kernel family shares: the compute dtype of the references and packed variable-length batches.

Packed variable-length batches follow FLA's ``cu_seqlens`` convention. Packed input: ``x`` of shape [1, T, ...]
holding N documents back to back, with document ``n`` at ``x[0, cu_seqlens[n]:cu_seqlens[n+1]]``. The references
convert this to a right-padded batch [N, Tmax, ...] plus a ``valid`` mask [N, Tmax], run the batched algorithm, and
convert back.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["compute_dtype", "check_cu_seqlens", "pack_documents", "unpack_documents", "cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: ``triton.cdiv`` without its constexpr-function wrapper (about 2 µs a call, paid
    several times per kernel call on the host path)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0), as ``triton.next_power_of_2`` without its wrapper."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the PyTorch references compute in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_cu_seqlens(cu_seqlens: Optional[torch.Tensor], batch_size: int, seq_len: int,
                     tensor_name: str = "q") -> Optional[List[int]]:
    """Validate ``cu_seqlens``; return the offsets as a python list (one host sync) or None."""
    if cu_seqlens is None:
        return None
    if not torch.is_tensor(cu_seqlens):
        raise ValueError(f"cu_seqlens must be a torch tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if batch_size != 1:
        raise ValueError(
            f"cu_seqlens requires packed inputs with batch size 1, but {tensor_name} has batch size {batch_size}")
    offsets = [int(o) for o in cu_seqlens.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if offsets[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at the sequence length T={seq_len}, got {offsets[-1]}")
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    return offsets


def pack_documents(x: torch.Tensor, offsets: Optional[List[int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T, ...] -> (padded [N, Tmax, ...], valid [N, Tmax] bool, lengths [N] int64).

    Without offsets this is the identity (N = B, everything valid). Padded slots are zero.
    """
    if offsets is None:
        b, t = x.shape[:2]
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device)
        lengths = torch.full((b,), t, dtype=torch.long, device=x.device)
        return x, valid, lengths
    starts = torch.tensor(offsets[:-1], dtype=torch.long, device=x.device)
    lens_list = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    lengths = torch.tensor(lens_list, dtype=torch.long, device=x.device)
    t_max = max(lens_list)
    pos = torch.arange(t_max, device=x.device)
    valid = pos[None, :] < lengths[:, None]
    total = x.shape[1]
    idx = (starts[:, None] + pos[None, :]).clamp(max=max(total - 1, 0))
    if total == 0:
        padded = x.new_zeros((len(lens_list), t_max) + tuple(x.shape[2:]))
    else:
        padded = x[0][idx]
        mask = valid.reshape(valid.shape + (1,) * (x.dim() - 2))
        padded = torch.where(mask, padded, torch.zeros((), dtype=x.dtype, device=x.device))
    return padded, valid, lengths


def unpack_documents(padded: torch.Tensor, valid: torch.Tensor, offsets: Optional[List[int]]) -> torch.Tensor:
    """Inverse of :func:`pack_documents`: [N, Tmax, ...] -> [1, T, ...] (identity without offsets)."""
    if offsets is None:
        return padded
    return padded[valid].unsqueeze(0)
