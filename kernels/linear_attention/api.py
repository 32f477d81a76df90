"""Validation + backend dispatch shared by ``rebased_attention`` and ``based_attention``, and the one-token
in-place decoding step ``linear_attention_step``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..backend import get_triton_impl, resolve_backend
from ..common import compute_dtype
from .feature_maps import default_scale
from .reference import linear_attention_reference, linear_attention_step_reference, validate_attention_inputs

__all__ = ["dispatch_linear_attention", "linear_attention_step"]


def dispatch_linear_attention(kind, q, k, v, *, scale, eps, normalize, cu_seqlens, initial_state,
                              output_final_state, backend, mode, chunk_size):
    offsets = validate_attention_inputs(kind, q, k, v, scale=scale, eps=eps, cu_seqlens=cu_seqlens,
                                        initial_state=initial_state, mode=mode, chunk_size=chunk_size)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    op = f"{kind}_attention"
    if resolve_backend(op, backend, q.device) == "triton":
        return get_triton_impl(op)(q, k, v, scale=scale, eps=eps, normalize=normalize, cu_seqlens=cu_seqlens,
                                   initial_state=initial_state, output_final_state=output_final_state,
                                   mode=mode, chunk_size=chunk_size)
    return linear_attention_reference(kind, q, k, v, scale=scale, eps=eps, normalize=normalize,
                                      cu_seqlens=cu_seqlens, initial_state=initial_state,
                                      output_final_state=output_final_state, mode=mode, chunk_size=chunk_size,
                                      _offsets=offsets, _validated=True)


def _validate_step_state(q, k, v, state) -> None:
    # shapes are checked by validate_attention_inputs; in-place updating also needs these
    if q.shape[1] != 1:
        raise ValueError(f"linear_attention_step takes one token per sequence (T == 1), got q {tuple(q.shape)}; "
                         "use rebased_attention / based_attention with initial_state for longer inputs")
    if state is None:
        raise ValueError("linear_attention_step needs a state (kv, z) to update, e.g. kernels.zero_state(...)")
    kv, z = state
    want = compute_dtype(q.dtype)
    if kv.dtype != want or z.dtype != want:
        raise ValueError(f"state for {q.dtype} inputs must be {want} (it is updated in place), "
                         f"got kv {kv.dtype} and z {z.dtype}")
    if not (kv.is_contiguous() and z.is_contiguous()):
        raise ValueError("state tensors kv and z must be contiguous (they are updated in place)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, kv, z)):
        raise ValueError("linear_attention_step updates the state in place and has no backward: call it under "
                         "torch.no_grad() (or on tensors that do not require grad), or use rebased_attention / "
                         "based_attention with output_final_state=True")


def linear_attention_step(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          state: Sequence[torch.Tensor], *, scale: Optional[float] = None, eps: float = 1e-6,
                          normalize: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """One decoding step of causal (Re)Based attention that advances ``state`` in place.

    Same result as ``{kind}_attention(q, k, v, initial_state=state, output_final_state=True, mode="recurrent")``
    with the returned state written into ``state``: kv += phi(k) v^T, z += phi(k), then
    o = phi(q)^T kv / (phi(q)^T z + eps) (no division if not normalize), so the token attends to itself.

    Args:
        kind: "rebased" or "based".
        q, k: [B, 1, H, Dk]; v: [B, 1, H, Dv] (same dtype/device).
        state: (kv [B, H, F, Dv], z [B, H, F]), F = kernels.state_size(kind, Dk), in the feature layout of
            kernels.rebased_feature_map / based_feature_map; contiguous, float32 (float64 for float64 inputs).
        backend: None/"auto" | "torch" | "triton" (as for rebased_attention); the Triton kernel also runs on the
            CPU under TRITON_INTERPRET=1, and inputs it does not cover (float64, Dk > 32) take the torch step.

    Returns:
        o [B, 1, H, Dv] in the input dtype. Inference only: it raises when gradients would be needed.
    """
    validate_attention_inputs(kind, q, k, v, scale=scale, eps=eps, cu_seqlens=None, initial_state=state,
                              mode=None, chunk_size=1)
    _validate_step_state(q, k, v, state)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    op = f"{kind}_attention_step"
    if resolve_backend(op, backend, q.device) == "triton":
        return get_triton_impl(op)(q, k, v, state, scale=scale, eps=eps, normalize=normalize)
    return linear_attention_step_reference(kind, q, k, v, state, scale=scale, eps=eps, normalize=normalize)
