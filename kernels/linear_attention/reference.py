"""PyTorch reference implementations of causal (Re)Based linear attention (the math: ``DESIGN.md`` beside this
file, sections 1-4).

Three mathematically identical forms, all differentiable by autograd:

* ``quadratic``: materialised T x T kernel matrix, causally masked (plus the initial-state term
  ``phi(q_t) . kv0`` / ``phi(q_t) . z0``); final state computed directly as sums over tokens.
* ``chunk``: linear time. Chunks of ``chunk_size`` tokens; intra-chunk quadratic, inter-chunk through
  the state of explicit features (exclusive cumulative sum over chunks, vectorised).
* ``recurrent``: token by token with the ``(kv, z)`` state (python loop over T; for decoding / checks).

Inputs are [B, T, H, D]; computation runs in float32 (float64 for float64 inputs) and the output is
cast back to the input dtype. Documents given by ``cu_seqlens`` (B == 1) are handled by converting the
packed batch to a right-padded batch of documents (see :mod:`kernels.common`).
"""

from __future__ import annotations

import math

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..common import check_cu_seqlens, compute_dtype, pack_documents, unpack_documents
from .feature_maps import KINDS, default_scale, feature_map, kernel_from_dot, state_size

__all__ = ["MODES", "compute_dtype", "validate_attention_inputs", "linear_attention_reference",
           "linear_attention_step_reference"]

MODES = ("quadratic", "chunk", "recurrent")

State = Tuple[torch.Tensor, torch.Tensor]


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def validate_attention_inputs(kind: str, q, k, v, *, scale, eps, cu_seqlens, initial_state, mode,
                              chunk_size, normalize=True) -> Optional[list]:
    """Check shapes/dtypes/options; return cu_seqlens offsets as a list (or None)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {KINDS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, T, H, D], got {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {t.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, Dk], got q {_shape(q)} and k {_shape(k)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape [B, T, H, Dv] matching q's [B, T, H]; got q {_shape(q)} and v {_shape(v)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"feature dims must be >= 1, got q {_shape(q)} and v {_shape(v)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite python number or None, got {scale!r}")
    if kind == "based" and scale is not None and scale < 0:
        raise ValueError(f"based attention needs scale >= 0, got {scale}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:  # NaN fails too
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    if not isinstance(normalize, bool):  # a truthy string ("no") would silently normalise
        raise ValueError(f"normalize must be a bool, got {normalize!r}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, t, h, dk = q.shape
    offsets = check_cu_seqlens(cu_seqlens, b, t, "q")
    if initial_state is not None:
        n = b if offsets is None else len(offsets) - 1
        f = state_size(kind, dk)
        dv = v.shape[-1]
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state must be a tuple (kv, z) with kv [N, H, F, Dv] and z [N, H, F]")
        kv0, z0 = initial_state
        if not (torch.is_tensor(kv0) and torch.is_tensor(z0)):
            raise ValueError("initial_state entries (kv, z) must be torch tensors")
        if tuple(kv0.shape) != (n, h, f, dv) or tuple(z0.shape) != (n, h, f):
            raise ValueError(
                f"initial_state for {kind} with N={n}, H={h}, Dk={dk} (F={f}), Dv={dv} must be kv {(n, h, f, dv)} "
                f"and z {(n, h, f)}; got kv {_shape(kv0)} and z {_shape(z0)}")
        if kv0.device != q.device or z0.device != q.device:
            raise ValueError(f"initial_state must be on {q.device}, got kv on {kv0.device}, z on {z0.device}")
        if not (kv0.is_floating_point() and z0.is_floating_point()):
            raise ValueError(f"initial_state must be floating point, got kv {kv0.dtype}, z {z0.dtype}")
    return offsets


# --------------------------------------------------------------------------------------- cores
# All cores take padded documents: q, k [N, T, H, Dk], v [N, T, H, Dv] in the compute dtype,
# valid [N, T] bool (keys outside a document must not enter the state), kv0 [N, H, F, Dv], z0 [N, H, F].
# They return num [N, T, H, Dv], den [N, T, H], and the final (kv, z) (or None).


def _core_quadratic(kind, q, k, v, scale, valid, kv0, z0, want_state):
    t = q.shape[1]
    x = torch.einsum("nthd,nshd->nhts", q, k) * scale
    a = kernel_from_dot(kind, x)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    a = torch.where(causal & valid[:, None, None, :], a, torch.zeros((), dtype=a.dtype, device=a.device))
    num = torch.einsum("nhts,nshv->nthv", a, v)
    den = a.sum(-1).transpose(1, 2)
    phi_q = feature_map(kind, q, scale)
    num = num + torch.einsum("nthf,nhfv->nthv", phi_q, kv0)
    den = den + torch.einsum("nthf,nhf->nth", phi_q, z0)
    state = None
    if want_state:
        phi_k = feature_map(kind, k, scale) * valid[:, :, None, None].to(q.dtype)
        state = (kv0 + torch.einsum("nthf,nthv->nhfv", phi_k, v), z0 + phi_k.sum(1))
    return num, den, state


def _core_chunk(kind, q, k, v, scale, valid, kv0, z0, want_state, chunk_size):
    n, t, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    n_chunks = max(1, -(-t // c))
    pad = n_chunks * c - t
    if pad:
        q = F.pad(q, (0, 0, 0, 0, 0, pad))
        k = F.pad(k, (0, 0, 0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, 0, 0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    qc = q.reshape(n, n_chunks, c, h, dk)
    kc = k.reshape(n, n_chunks, c, h, dk)
    vc = v.reshape(n, n_chunks, c, h, dv)
    validc = valid.reshape(n, n_chunks, c)

    phi_q = feature_map(kind, qc, scale)                                   # [n, nc, c, h, f]
    phi_k = feature_map(kind, kc, scale) * validc[..., None, None].to(q.dtype)
    # per-chunk state increments and the state *before* each chunk (exclusive prefix sum)
    d_kv = torch.einsum("ncihf,ncihv->nchfv", phi_k, vc)                  # [n, nc, h, f, dv]
    d_z = phi_k.sum(2)                                                      # [n, nc, h, f]
    kv_all = torch.cumsum(torch.cat([kv0[:, None], d_kv], dim=1), dim=1)   # [n, nc+1, h, f, dv]
    z_all = torch.cumsum(torch.cat([z0[:, None], d_z], dim=1), dim=1)
    num = torch.einsum("ncihf,nchfv->ncihv", phi_q, kv_all[:, :-1])
    den = torch.einsum("ncihf,nchf->ncih", phi_q, z_all[:, :-1])
    # intra-chunk: masked C x C kernel matrix
    x = torch.einsum("ncihd,ncjhd->nchij", qc, kc) * scale
    a = kernel_from_dot(kind, x)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    mask = causal & validc[:, :, None, None, :]                             # [n, nc, 1, c, c]
    a = torch.where(mask, a, torch.zeros((), dtype=a.dtype, device=a.device))
    num = num + torch.einsum("nchij,ncjhv->ncihv", a, vc)
    den = den + a.sum(-1).permute(0, 1, 3, 2)
    num = num.reshape(n, n_chunks * c, h, dv)[:, :t]
    den = den.reshape(n, n_chunks * c, h)[:, :t]
    state = (kv_all[:, -1], z_all[:, -1]) if want_state else None
    return num, den, state


def _core_recurrent(kind, q, k, v, scale, valid, kv0, z0, want_state):
    t = q.shape[1]
    phi_q = feature_map(kind, q, scale)
    phi_k = feature_map(kind, k, scale) * valid[:, :, None, None].to(q.dtype)
    kv, z = kv0, z0
    nums, dens = [], []
    for i in range(t):
        kv = kv + phi_k[:, i, :, :, None] * v[:, i, :, None, :]
        z = z + phi_k[:, i]
        nums.append(torch.einsum("nhf,nhfv->nhv", phi_q[:, i], kv))
        dens.append((phi_q[:, i] * z).sum(-1))
    if t == 0:  # empty, but from the inputs: an autograd graph through them (as the other modes give)
        num = v * 0
        den = (phi_q * 0).sum(-1)
    else:
        num = torch.stack(nums, dim=1)
        den = torch.stack(dens, dim=1)
    return num, den, ((kv, z) if want_state else None)


def linear_attention_reference(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               scale: Optional[float] = None, eps: float = 1e-6, normalize: bool = True,
                               cu_seqlens: Optional[torch.Tensor] = None,
                               initial_state: Optional[Sequence[torch.Tensor]] = None,
                               output_final_state: bool = False, mode: Optional[str] = None,
                               chunk_size: int = 64, _offsets: Optional[list] = None, _validated: bool = False):
    """Reference (Re)Based causal linear attention; see :func:`kernels.rebased_attention` for the contract."""
    if not _validated:
        _offsets = validate_attention_inputs(kind, q, k, v, scale=scale, eps=eps, cu_seqlens=cu_seqlens,
                                             initial_state=initial_state, mode=mode, chunk_size=chunk_size,
                                             normalize=normalize)
    offsets = _offsets
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if scale is None:
        scale = default_scale(dk)
    scale = float(scale)
    if mode is None:
        mode = "recurrent" if t == 1 else "chunk"
    cdt = compute_dtype(q.dtype)
    out_dtype = q.dtype

    qp, valid, _ = pack_documents(q.to(cdt), offsets)
    kp, _, _ = pack_documents(k.to(cdt), offsets)
    vp, _, _ = pack_documents(v.to(cdt), offsets)
    n = qp.shape[0]
    f = state_size(kind, dk)
    if initial_state is not None:
        kv0, z0 = initial_state[0].to(cdt), initial_state[1].to(cdt)
    else:
        kv0 = torch.zeros(n, h, f, dv, dtype=cdt, device=q.device)
        z0 = torch.zeros(n, h, f, dtype=cdt, device=q.device)

    if mode == "quadratic":
        num, den, state = _core_quadratic(kind, qp, kp, vp, scale, valid, kv0, z0, output_final_state)
    elif mode == "chunk":
        num, den, state = _core_chunk(kind, qp, kp, vp, scale, valid, kv0, z0, output_final_state, chunk_size)
    else:
        num, den, state = _core_recurrent(kind, qp, kp, vp, scale, valid, kv0, z0, output_final_state)

    if normalize:
        # padding rows of packed documents have den = 0: divided by 1 there, so eps = 0 sends no 0/0 into the
        # gradients of the real tokens (the rows are dropped by the unpacking anyway)
        den = torch.where(valid[:, :, None], den + eps, torch.ones_like(den))
        o = num / den[..., None]
    else:
        o = num
    o = unpack_documents(o, valid, offsets).to(out_dtype)
    return o, (state if output_final_state else None)


def linear_attention_step_reference(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state, *,
                                    scale: float, eps: float = 1e-6, normalize: bool = True) -> torch.Tensor:
    """One-token step on validated inputs: the recurrent reference, its final state copied into ``state``."""
    o, (kv, z) = linear_attention_reference(kind, q, k, v, scale=scale, eps=eps, normalize=normalize,
                                            initial_state=state, output_final_state=True, mode="recurrent",
                                            _validated=True)
    state[0].copy_(kv)
    state[1].copy_(z)
    return o
