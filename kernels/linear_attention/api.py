"""The public entry points of the linear-attention family: ``rebased_attention`` and ``based_attention`` with backend
dispatch, their torch references ``rebased_attention_torch`` / ``based_attention_torch``, and the one-token in-place
decoding step ``linear_attention_step``.

The kinds differ only in the kernel a_ts and the explicit feature map that linearises it (see
:mod:`kernels.linear_attention.feature_maps` and ``DESIGN.md`` beside this file), so each kind's two public functions
are generated from :data:`KIND_KERNELS` by :func:`_make_attention` and :func:`_make_attention_torch`; the Triton
implementations are registered for every kind by :mod:`kernels.linear_attention.triton_ops`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..backend import get_triton_impl, resolve_backend
from ..common import compute_dtype
from .feature_maps import KINDS, default_scale
from .reference import linear_attention_reference, linear_attention_step_reference, validate_attention_inputs

__all__ = ["KIND_KERNELS", "dispatch_linear_attention", "linear_attention_step", "rebased_attention",
           "based_attention", "rebased_attention_torch", "based_attention_torch"]

# kind -> its kernel of the scaled dot product, as the docstrings state it
KIND_KERNELS = {
    "rebased": "a_ts = (scale * q_t.k_s)^2",
    "based": "a_ts = 1 + x + x^2/2 with x = scale * q_t.k_s",
}
assert tuple(KIND_KERNELS) == KINDS

_ATTENTION_DOC = """Causal {kind} attention, layout [B, T, H, D]; q, k already feature-mapped by the model.

    Kernel: {kernel} (scale defaults to Dk**-0.5).
    o_t = sum_{{s<=t}} a_ts v_s / (sum_{{s<=t}} a_ts + eps) if normalize else sum_{{s<=t}} a_ts v_s.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv] (same dtype/device).
        cu_seqlens: optional int32/int64 [N+1] document offsets (requires B == 1); state resets per document.
        initial_state: optional (kv [N, H, F, Dv], z [N, H, F]) with F = kernels.state_size("{kind}", Dk),
            in the feature layout of kernels.{kind}_feature_map.
        output_final_state: also return the final (kv, z) state (float32; float64 for float64 inputs).
        backend: None/"auto" | "torch" | "triton" (env var REBASED_KERNEL_BACKEND overrides auto).
        mode: torch backend form, "quadratic" | "chunk" | "recurrent"; default "chunk" ("recurrent" if T == 1).
        chunk_size: chunk length for mode="chunk".

    Returns:
        (o [B, T, H, Dv] in the input dtype, final_state or None).
    """


def dispatch_linear_attention(kind, q, k, v, *, scale, eps, normalize, cu_seqlens, initial_state,
                              output_final_state, backend, mode, chunk_size):
    offsets = validate_attention_inputs(kind, q, k, v, scale=scale, eps=eps, cu_seqlens=cu_seqlens,
                                        initial_state=initial_state, mode=mode, chunk_size=chunk_size,
                                        normalize=normalize)
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


def _named(fn, name: str, doc: str):
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def _make_attention(kind: str):
    """``<kind>_attention``: validation and backend dispatch (see :data:`_ATTENTION_DOC`)."""

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                  eps: float = 1e-6, normalize: bool = True, cu_seqlens: Optional[torch.Tensor] = None,
                  initial_state: Optional[Sequence[torch.Tensor]] = None, output_final_state: bool = False,
                  backend: Optional[str] = None, mode: Optional[str] = None, chunk_size: int = 64,
                  ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
        return dispatch_linear_attention(kind, q, k, v, scale=scale, eps=eps, normalize=normalize,
                                         cu_seqlens=cu_seqlens, initial_state=initial_state,
                                         output_final_state=output_final_state, backend=backend, mode=mode,
                                         chunk_size=chunk_size)

    return _named(attention, f"{kind}_attention", _ATTENTION_DOC.format(kind=kind, kernel=KIND_KERNELS[kind]))


def _make_attention_torch(kind: str):
    """``<kind>_attention_torch``: the torch reference without backend dispatch."""

    def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                        eps: float = 1e-6, normalize: bool = True, cu_seqlens: Optional[torch.Tensor] = None,
                        initial_state: Optional[Sequence[torch.Tensor]] = None, output_final_state: bool = False,
                        mode: Optional[str] = None, chunk_size: int = 64):
        return linear_attention_reference(kind, q, k, v, scale=scale, eps=eps, normalize=normalize,
                                          cu_seqlens=cu_seqlens, initial_state=initial_state,
                                          output_final_state=output_final_state, mode=mode, chunk_size=chunk_size)

    return _named(attention_torch, f"{kind}_attention_torch",
                  f'Torch-backend {kind} attention (no backend dispatch); modes "quadratic" | "chunk" | "recurrent".')


rebased_attention = _make_attention("rebased")
based_attention = _make_attention("based")
rebased_attention_torch = _make_attention_torch("rebased")
based_attention_torch = _make_attention_torch("based")


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
                              mode=None, chunk_size=1, normalize=normalize)
    _validate_step_state(q, k, v, state)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    op = f"{kind}_attention_step"
    if resolve_backend(op, backend, q.device) == "triton":
        return get_triton_impl(op)(q, k, v, state, scale=scale, eps=eps, normalize=normalize)
    return linear_attention_step_reference(kind, q, k, v, state, scale=scale, eps=eps, normalize=normalize)
