"""rebased causal linear attention: public entry point with backend dispatch."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..linear_attention.api import dispatch_linear_attention
from ..linear_attention.feature_maps import rebased_feature_map
from .naive import rebased_attention_torch

__all__ = ["rebased_attention", "rebased_attention_torch", "rebased_feature_map"]


def rebased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                     eps: float = 1e-6, normalize: bool = True, cu_seqlens: Optional[torch.Tensor] = None,
                     initial_state: Optional[Sequence[torch.Tensor]] = None, output_final_state: bool = False,
                     backend: Optional[str] = None, mode: Optional[str] = None, chunk_size: int = 64,
                     ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """Causal rebased attention, layout [B, T, H, D]; q, k already feature-mapped by the model.

    Kernel: a_ts = (scale * q_t.k_s)^2 (scale defaults to Dk**-0.5).
    o_t = sum_{s<=t} a_ts v_s / (sum_{s<=t} a_ts + eps) if normalize else sum_{s<=t} a_ts v_s.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv] (same dtype/device).
        cu_seqlens: optional int32/int64 [N+1] document offsets (requires B == 1); state resets per document.
        initial_state: optional (kv [N, H, F, Dv], z [N, H, F]) with F = kernels.state_size("rebased", Dk),
            in the feature layout of kernels.rebased_feature_map.
        output_final_state: also return the final (kv, z) state (float32; float64 for float64 inputs).
        backend: None/"auto" | "torch" | "triton" (env var REBASED_KERNEL_BACKEND overrides auto).
        mode: torch backend form, "quadratic" | "chunk" | "recurrent"; default "chunk" ("recurrent" if T == 1).
        chunk_size: chunk length for mode="chunk".

    Returns:
        (o [B, T, H, Dv] in the input dtype, final_state or None).
    """
    return dispatch_linear_attention("rebased", q, k, v, scale=scale, eps=eps, normalize=normalize,
                                     cu_seqlens=cu_seqlens, initial_state=initial_state,
                                     output_final_state=output_final_state, backend=backend, mode=mode,
                                     chunk_size=chunk_size)
