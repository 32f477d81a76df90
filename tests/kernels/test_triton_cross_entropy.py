"""Triton cross-entropy-with-gradient vs the float64 reference (loss and d loss / d logits), in place and not.

Runs on CUDA when available (LM and MQAR vocabularies added), else through the Triton interpreter on small rows.
Outputs are poisoned with NaN before the kernel runs, so an element it fails to write fails the test.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.cross_entropy.triton_ops import cross_entropy_grad_triton  # noqa: E402
from triton_checks import poisoned_run, rel  # noqa: E402

_HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if _HAS_CUDA else "cpu"

CASES = [  # rows, vocab, dtype, block (None: the default)
    (5, 37, torch.float32, 16),       # several blocks, a partial last one
    (7, 64, torch.bfloat16, None),
    (3, 300, torch.float16, 128),
]
if _HAS_CUDA:
    CASES += [(1000, 8192, torch.bfloat16, None), (257, 50304, torch.bfloat16, None), (64, 50304, torch.float32, None)]


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    with poisoned_run(monkeypatch):
        yield


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}v{c[1]}-{str(c[2])[6:]}-b{c[3]}")
def test_against_float64_reference(case, inplace):
    rows, vocab, dtype, block = case
    logits = (3 * torch.randn(rows, vocab, device=DEV)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=DEV)
    scale = torch.rand(rows, device=DEV)
    scale[0] = 0.0  # an ignored row: zero gradient
    ref_loss, ref_grad = kernels.cross_entropy_grad_torch(logits.double(), targets, scale.double())
    given = logits.clone()
    loss, grad = cross_entropy_grad_triton(given, targets, scale, inplace=inplace, block=block)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    assert (grad.data_ptr() == given.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(given, logits), "the logits are left alone unless inplace"
    assert rel(loss, ref_loss) < 1e-5
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(grad, ref_grad) < tol
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.allclose(grad.double().sum(1), torch.zeros(rows, dtype=torch.float64, device=DEV), atol=1e-2)


def test_dispatch_and_shape_errors():
    logits = torch.randn(4, 10, dtype=torch.float64, device=DEV)
    targets = torch.tensor([1, 2, 3, 9], device=DEV)
    loss, grad = kernels.cross_entropy_grad(logits, targets, torch.ones(4, dtype=torch.float64, device=DEV),
                                            backend="triton")  # fp64: the reference
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    with pytest.raises(ValueError, match="expected logits"):
        kernels.cross_entropy_grad(logits, targets[:3], torch.ones(4, device=DEV))
