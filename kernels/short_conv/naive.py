"""PyTorch reference for the causal depthwise short convolution.

y_t = bias + sum_{j<K} weight[:, j] * x_{t-K+1+j}   (weight[:, K-1] multiplies the current token),
i.e. torch Conv1d(D, D, K, groups=D, padding=K-1) truncated to the first T outputs, where inputs
before the sequence start come from ``cache`` (the last K-1 inputs, oldest first; zeros at a start).
Then ``y = y * gate`` if a gate is given, then ``y = y + x`` if ``residual``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..common import check_cu_seqlens, compute_dtype, pack_documents, unpack_documents

__all__ = ["SHORT_CONV_MODES", "validate_short_conv_inputs", "short_conv_torch"]

SHORT_CONV_MODES = ("conv", "recurrent")


def _shape(t):
    return tuple(t.shape)


def validate_short_conv_inputs(x, weight, bias, gate, cu_seqlens, cache, mode) -> Optional[List[int]]:
    for name, tensor in (("x", x), ("weight", weight)):
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating point torch tensor")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, T, D], got {_shape(x)}")
    b, t, d = x.shape
    if weight.dim() != 2 or weight.shape[0] != d or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape [D, K] with D={d} (from x {_shape(x)}) and K >= 1, "
                         f"got {_shape(weight)}")
    kk = weight.shape[1]
    if bias is not None and (not torch.is_tensor(bias) or tuple(bias.shape) != (d,)):
        raise ValueError(f"bias must have shape [D]=({d},), got {_shape(bias) if torch.is_tensor(bias) else bias!r}")
    if gate is not None and (not torch.is_tensor(gate) or gate.shape != x.shape):
        raise ValueError(f"gate must have the shape of x {_shape(x)}, got "
                         f"{_shape(gate) if torch.is_tensor(gate) else gate!r}")
    for name, other in (("weight", weight), ("bias", bias), ("gate", gate), ("cache", cache)):
        if other is not None and torch.is_tensor(other) and other.device != x.device:
            raise ValueError(f"{name} is on {other.device} but x is on {x.device}")
        if other is not None and torch.is_tensor(other) and not other.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {other.dtype}")
    if mode is not None and mode not in SHORT_CONV_MODES:
        raise ValueError(f"mode must be one of {SHORT_CONV_MODES} or None, got {mode!r}")
    offsets = check_cu_seqlens(cu_seqlens, b, t, "x")
    if cache is not None:
        n = b if offsets is None else len(offsets) - 1
        if not torch.is_tensor(cache) or tuple(cache.shape) != (n, d, kk - 1):
            raise ValueError(f"cache must have shape [N, D, K-1]={(n, d, kk - 1)}, got "
                             f"{_shape(cache) if torch.is_tensor(cache) else cache!r}")
    return offsets


def short_conv_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     gate: Optional[torch.Tensor] = None, residual: bool = False,
                     cu_seqlens: Optional[torch.Tensor] = None, cache: Optional[torch.Tensor] = None,
                     output_final_state: bool = False, mode: Optional[str] = None,
                     _offsets: Optional[list] = None, _validated: bool = False,
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Torch reference of :func:`kernels.short_conv` (no backend dispatch). Modes "conv" | "recurrent"."""
    if not _validated:
        _offsets = validate_short_conv_inputs(x, weight, bias, gate, cu_seqlens, cache, mode)
    offsets = _offsets
    b, t, d = x.shape
    kk = weight.shape[1]
    if mode is None:
        mode = "recurrent" if (t == 1 and cache is not None) else "conv"
    cdt = compute_dtype(x.dtype)
    w = weight.to(cdt)
    bia = bias.to(cdt) if bias is not None else None
    xp, valid, lengths = pack_documents(x.to(cdt), offsets)          # [N, Tm, D]
    n, tm = xp.shape[:2]
    c0 = cache.to(cdt) if cache is not None else xp.new_zeros(n, d, kk - 1)

    if mode == "conv":
        xe = torch.cat([c0, xp.transpose(1, 2)], dim=-1)               # [N, D, K-1+Tm]
        if tm:
            y = F.conv1d(xe, w.unsqueeze(1), bia, groups=d).transpose(1, 2)  # [N, Tm, D]
        else:  # no tokens (T == 0 or only empty documents): conv1d rejects an input shorter than the kernel;
            # an empty output still computed from the inputs, so autograd gives (zero) gradients as for T > 0
            y = (xe[:, :, :0].transpose(1, 2) * w.sum()) + (bia.sum() * 0 if bia is not None else 0)
        final = None
        if output_final_state:
            # last K-1 inputs of each document: x_ext indices len .. len+K-2
            idx = lengths[:, None] + torch.arange(kk - 1, device=x.device)[None, :]
            final = torch.gather(xe, 2, idx[:, None, :].expand(n, d, kk - 1))
    else:
        state = c0
        ys = []
        for i in range(tm):
            window = torch.cat([state, xp[:, i, :, None]], dim=-1)    # [N, D, K]
            y_i = (window * w).sum(-1)
            if bia is not None:
                y_i = y_i + bia
            ys.append(y_i)
            state = torch.where(valid[:, i, None, None], window[..., 1:], state)
        y = torch.stack(ys, dim=1) if ys else xp.new_zeros(n, 0, d)
        final = state if output_final_state else None

    y = unpack_documents(y, valid, offsets)
    if gate is not None:
        y = y * gate.to(cdt)
    if residual:
        y = y + x.to(cdt)
    return y.to(x.dtype), (final.to(x.dtype) if final is not None else None)
