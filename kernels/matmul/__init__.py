"""fp32 matrix products on the tensor cores with fp32's accuracy: ``matmul_tf32x3(a, b)``.

On Hopper, an IEEE fp32 GEMM runs on the CUDA cores (67 TFLOP/s at most on an H100/H200), TF32 on the tensor cores
(~495) but with a 10-bit mantissa (relative error ~1e-3). 3xTF32 splits each operand into a TF32 part and a TF32
remainder and sums three tensor-core products (hi·hi + hi·lo + lo·hi) in fp32: the error of fp32's order, at about a
third of TF32's speed. It serves where a fp32 protocol must stay fp32-accurate but is GEMM-bound, e.g. the MQAR LM
head (``pretrain.models.loss.chunked_cross_entropy(fp32_dot="tf32x3")``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backend import get_triton_impl, resolve_backend
from .naive import matmul_torch

__all__ = ["matmul_tf32x3", "matmul_torch"]


def matmul_tf32x3(a: torch.Tensor, b: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``a @ b`` for a [M, K] and b [K, N] (any strides) of one floating dtype on one device, returned contiguous in
    that dtype. fp32 on CUDA runs the Triton GEMM with 3xTF32 products (fp32 accumulation); everything else (other
    dtypes, CPU tensors, ``backend="torch"``) is the plain product."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul_tf32x3: expected a [M, K] and b [K, N]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if not a.is_floating_point():  # "one floating dtype": an integer product is not what this op is for
        raise ValueError(f"matmul_tf32x3: a and b must be floating point; got {a.dtype}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"matmul_tf32x3: a and b must share dtype and device; got {a.dtype} on {a.device} and "
                         f"{b.dtype} on {b.device}")
    if a.dtype == torch.float32 and resolve_backend("matmul_tf32x3", backend, a.device) == "triton":
        return get_triton_impl("matmul_tf32x3")(a, b)
    return matmul_torch(a, b)
