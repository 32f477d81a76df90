"""The Triton 3xTF32 GEMM (kernels.matmul_tf32x3) against the float64 product.

On CUDA the products run as 3xTF32 and must keep fp32's accuracy (plain TF32 would miss the tolerance by ~100×);
under the interpreter (CPU) they are IEEE fp32, which checks the tiling, the masks, the strides and the split over
K. The output is poisoned with NaN before the kernel runs, so an element it fails to write fails the test.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.matmul import triton_ops  # noqa: E402
from triton_checks import poisoned_run, rel  # noqa: E402

_HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if _HAS_CUDA else "cpu"

CASES = [  # M, K, N: partial tiles in every dimension, K shorter than one block, a single row / column
    (45, 37, 70),
    (1, 70, 33),
    (64, 5, 1),
]
if _HAS_CUDA:  # the MQAR head at d_model 128: logits, hidden gradient, weight gradient (a long K: split)
    CASES += [(4096, 128, 8192), (4096, 8192, 128), (8192, 65536, 128), (1000, 64, 50304)]


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    with poisoned_run(monkeypatch):
        yield


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_against_float64(case):
    m, k, n = case
    a = torch.randn(m, k, device=DEV)
    b = torch.randn(k, n, device=DEV)
    out = kernels.matmul_tf32x3(a, b, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (m, n) and out.is_contiguous()
    assert rel(out, a.double() @ b.double()) < 1e-5


def test_transposed_and_sliced_operands():
    # the loss passes w.T, g.T and row slices: strided views must be read as they are, without copies
    w = torch.randn(70, 24, device=DEV)
    h = torch.randn(40, 24, device=DEV)[5:33]
    logits = kernels.matmul_tf32x3(h, w.T, backend="triton")
    assert rel(logits, h.double() @ w.double().T) < 1e-5
    weight_grad = kernels.matmul_tf32x3(logits.T, h, backend="triton")
    assert rel(weight_grad, logits.double().T @ h.double()) < 1e-5


def test_split_over_k(monkeypatch):
    # few output tiles and a long K: the K range is split and the partial products summed
    monkeypatch.setattr(triton_ops, "_splits", lambda tiles, k, device: 3)
    a = torch.randn(20, 100, device=DEV)
    b = torch.randn(100, 9, device=DEV)
    out = kernels.matmul_tf32x3(a, b, backend="triton")
    assert rel(out, a.double() @ b.double()) < 1e-5


def test_empty_dimensions():
    a = torch.randn(6, 0, device=DEV)
    b = torch.randn(0, 4, device=DEV)
    assert torch.equal(kernels.matmul_tf32x3(a, b, backend="triton"), torch.zeros(6, 4, device=DEV))
    assert kernels.matmul_tf32x3(torch.randn(0, 3, device=DEV), torch.randn(3, 4, device=DEV),
                                 backend="triton").shape == (0, 4)


def test_dispatch_and_errors():
    a64 = torch.randn(3, 4, dtype=torch.float64, device=DEV)
    b64 = torch.randn(4, 2, dtype=torch.float64, device=DEV)
    assert torch.equal(kernels.matmul_tf32x3(a64, b64, backend="triton"), a64 @ b64)  # not fp32: the plain product
    with pytest.raises(ValueError, match=r"expected a \[M, K\] and b \[K, N\]"):
        kernels.matmul_tf32x3(torch.randn(3, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match="share dtype"):
        kernels.matmul_tf32x3(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64))
