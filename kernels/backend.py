"""Backend selection for the ``kernels`` package.

Every public op (``rebased_attention``, ``based_attention``, ``short_conv``, and the decoding step
``linear_attention_step``, registered per kind as ``<kind>_attention_step``) has a pure PyTorch
reference implementation (backend ``"torch"``) and may have a Triton implementation registered at
import time by ``kernels/<family>/triton_ops.py`` via :func:`register_triton_impl`.

Resolution order for a call:

1. an explicit ``backend="torch"`` / ``backend="triton"`` argument wins;
2. otherwise (``backend=None`` or ``"auto"``) the environment variable ``REBASED_KERNEL_BACKEND``
   (``torch`` | ``triton`` | ``auto``) is used when set;
3. ``auto`` picks ``"triton"`` only when the inputs live on CUDA *and* a Triton implementation is
   registered for the op, else ``"torch"``.

Requesting ``"triton"`` (explicitly or via the env var) when nothing is registered raises
:class:`BackendUnavailableError`.

Calling convention for registered Triton implementations: the public function validates the inputs,
resolves ``scale`` to a float and then calls ``fn(*tensors, **kwargs)`` with exactly the public
keyword arguments minus ``backend`` (e.g. for attention: ``fn(q, k, v, scale=..., eps=...,
normalize=..., cu_seqlens=..., initial_state=..., output_final_state=..., mode=..., chunk_size=...)``;
``mode`` is the caller's value, possibly ``None``, and may be ignored). It must return the same
``(output, final_state_or_cache)`` pair as the reference. The step ops are called as
``fn(q, k, v, state, scale=..., eps=..., normalize=...)``, update ``state`` in place and return the output.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

__all__ = [
    "BACKEND_ENV_VAR",
    "BACKENDS",
    "KNOWN_OPS",
    "BackendUnavailableError",
    "register_triton_impl",
    "unregister_triton_impl",
    "get_triton_impl",
    "registered_triton_ops",
    "resolve_backend",
]

BACKEND_ENV_VAR = "REBASED_KERNEL_BACKEND"
BACKENDS = ("auto", "torch", "triton")
KNOWN_OPS = ("rebased_attention", "based_attention", "short_conv", "rebased_attention_step", "based_attention_step",
             "cross_entropy_grad", "matmul_tf32x3")

_TRITON_IMPLS: Dict[str, Callable] = {}


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is requested that has no implementation for the op."""


def register_triton_impl(op_name: str, fn: Callable) -> Callable:
    """Register ``fn`` as the Triton implementation of ``op_name`` (one of :data:`KNOWN_OPS`).

    Re-registering replaces the previous implementation. Returns ``fn`` so it can be used as a
    decorator helper: ``register_triton_impl("rebased_attention", my_fn)``.
    """
    if op_name not in KNOWN_OPS:
        raise ValueError(f"unknown op {op_name!r}; known ops: {', '.join(KNOWN_OPS)}")
    if not callable(fn):
        raise TypeError(f"Triton implementation for {op_name!r} must be callable, got {type(fn)!r}")
    _TRITON_IMPLS[op_name] = fn
    return fn


def unregister_triton_impl(op_name: str) -> Optional[Callable]:
    """Remove (and return) the Triton implementation of ``op_name``, if any. Mainly for tests."""
    return _TRITON_IMPLS.pop(op_name, None)


def get_triton_impl(op_name: str) -> Optional[Callable]:
    return _TRITON_IMPLS.get(op_name)


def registered_triton_ops() -> tuple:
    return tuple(sorted(_TRITON_IMPLS))


def _normalise_backend_name(value: str, source: str) -> str:
    name = value.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"invalid backend {value!r} from {source}; expected one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(op_name: str, backend: Optional[str], device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for a call of ``op_name`` with inputs on ``device``."""
    if op_name not in KNOWN_OPS:
        raise ValueError(f"unknown op {op_name!r}; known ops: {', '.join(KNOWN_OPS)}")
    requested = "auto" if backend is None else _normalise_backend_name(backend, "the backend argument")
    source = "backend argument"
    if requested == "auto":
        env = os.environ.get(BACKEND_ENV_VAR, "").strip()
        if env:
            requested = _normalise_backend_name(env, f"environment variable {BACKEND_ENV_VAR}")
            source = f"environment variable {BACKEND_ENV_VAR}={env!r}"
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if op_name not in _TRITON_IMPLS:
            raise BackendUnavailableError(
                f"backend 'triton' requested for {op_name} (via {source}) but no Triton implementation is "
                f"registered (registered: {list(registered_triton_ops()) or 'none'}). Use backend='torch' "
                f"or make sure kernels/<family>/triton_ops.py calls register_triton_impl({op_name!r}, fn)."
            )
        if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError(
                f"backend 'triton' requested for {op_name} (via {source}) with inputs on {torch.device(device)}: "
                "Triton runs them on CUDA, or on the CPU through its interpreter (TRITON_INTERPRET=1, set before "
                "triton is imported; slow, for tests). Use backend='torch' on the CPU."
            )
        return "triton"
    # auto
    if torch.device(device).type == "cuda" and op_name in _TRITON_IMPLS:
        return "triton"
    return "torch"
