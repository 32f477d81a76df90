"""Kernels for ReBased / Based linear-attention language models.

Public API (layout [B, T, H, D]; see each function's docstring for the full contract)::

    rebased_attention(q, k, v, *, scale=None, eps=1e-6, normalize=True, cu_seqlens=None, initial_state=None,
                      output_final_state=False, backend=None, mode=None, chunk_size=64) -> (o, final_state)
    based_attention(...same...) -> (o, final_state)
    short_conv(x, weight, bias=None, *, gate=None, residual=False, cu_seqlens=None, cache=None,
               output_final_state=False, backend=None, mode=None) -> (y, final_cache)
    linear_attention_step(kind, q, k, v, state, *, scale=None, eps=1e-6, normalize=True, backend=None) -> o
        (one decoding token, T == 1; advances state in place)
    cross_entropy_grad(logits, targets, row_scale, *, inplace=False, backend=None) -> (row_loss, grad)
        (the fused LM-head loss's inner step: loss and d loss / d logits of logit rows in one pass)
    matmul_tf32x3(a, b, *, backend=None) -> a @ b (fp32 on CUDA: 3xTF32 tensor-core products, fp32's accuracy)

    rebased_feature_map(x, scale=None), based_feature_map(x, scale=None), state_size(kind, dk)

Families: ``linear_attention/`` (ReBased and Based, generated from one table of kinds in its ``api.py``; the math
and the kernels' design in its ``DESIGN.md``), ``short_conv/``, ``cross_entropy/`` and ``matmul/``; helpers they
share in ``common.py``, the machinery of their typed launch configurations in ``launch_config.py``. Backends: the
"torch" references live in each family (``linear_attention/reference.py``, ``<family>/naive.py``); Triton
implementations register themselves from ``kernels/<family>/triton_ops.py`` (imported automatically below when the
file exists) via :func:`kernels.backend.register_triton_impl`.
"""

import importlib
import importlib.util

from .backend import (BACKEND_ENV_VAR, BackendUnavailableError, get_triton_impl, register_triton_impl,
                      registered_triton_ops, resolve_backend)
from .cross_entropy import cross_entropy_grad, cross_entropy_grad_torch
from .linear_attention.api import (based_attention, based_attention_torch, linear_attention_step, rebased_attention,
                                   rebased_attention_torch)
from .linear_attention.feature_maps import based_feature_map, rebased_feature_map, state_size, zero_state
from .matmul import matmul_tf32x3, matmul_torch
from .short_conv import short_conv, short_conv_torch

__all__ = [
    "rebased_attention", "based_attention", "short_conv", "linear_attention_step", "cross_entropy_grad",
    "matmul_tf32x3", "matmul_torch",
    "rebased_feature_map", "based_feature_map", "state_size", "zero_state",
    "rebased_attention_torch", "based_attention_torch", "short_conv_torch", "cross_entropy_grad_torch",
    "register_triton_impl", "get_triton_impl", "registered_triton_ops", "resolve_backend",
    "BackendUnavailableError", "BACKEND_ENV_VAR",
]

_TRITON_FAMILIES = ("linear_attention", "short_conv", "cross_entropy", "matmul")


def _import_triton_ops() -> None:
    # Only a *missing* triton_ops module is tolerated; if the file exists, its import errors propagate.
    for family in _TRITON_FAMILIES:
        name = f"{__name__}.{family}.triton_ops"
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name)


_import_triton_ops()
