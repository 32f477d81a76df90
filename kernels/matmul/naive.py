"""PyTorch reference of ``kernels.matmul_tf32x3``: the plain product (IEEE fp32 on the CPU and, with TF32 off, on
CUDA; float64 inputs stay float64)."""

from __future__ import annotations

import torch

__all__ = ["matmul_torch"]


def matmul_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b
