"""Triton linear cross-entropy (the head's logits never in memory) vs the float64 reference: the loss and both
gradients, for partial row, word and hidden blocks, ignored rows and one or several row slices of the weight's
gradient. Runs on CUDA when available (MQAR and LM heads added), else through the Triton interpreter on small heads.
Outputs are poisoned with NaN before the kernels run, so an element they fail to write fails the test.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.linear_cross_entropy.triton_ops import linear_cross_entropy_grad_triton  # noqa: E402
from triton_checks import poisoned_run, rel  # noqa: E402

_HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if _HAS_CUDA else "cpu"

CASES = [  # rows, hidden, vocab, dtype, blocks (None: the default), row slices of dW (None: the default)
    (37, 24, 53, torch.float32, (16, 16), 2),    # partial blocks of rows, words and hidden; an uneven last slice
    (20, 16, 40, torch.bfloat16, (16, 32), 5),   # more slices asked for than blocks of rows
    (9, 40, 33, torch.float16, None, None),       # one block of rows, a partial one of words
]
if _HAS_CUDA:
    CASES += [(4099, 128, 8192, torch.bfloat16, None, None), (1000, 64, 8192, torch.bfloat16, None, None),
              (777, 256, 50304, torch.bfloat16, None, None), (300, 200, 1000, torch.float32, None, 3)]


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    with poisoned_run(monkeypatch):
        yield


def _inputs(rows, hidden, vocab, dtype):
    h = torch.randn(rows, hidden, device=DEV).to(dtype)
    w = (torch.randn(vocab, hidden, device=DEV) / hidden ** 0.5).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=DEV)
    scale = torch.rand(rows, device=DEV)
    scale[0] = 0.0  # an ignored row: no gradient through it
    return h, w, targets, scale


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"r{c[0]}d{c[1]}v{c[2]}-{str(c[3])[6:]}-{c[4]}-s{c[5]}")
def test_against_float64_reference(case):
    rows, hidden, vocab, dtype, blocks, row_slices = case
    h, w, targets, scale = _inputs(rows, hidden, vocab, dtype)
    ref_loss, ref_dh, ref_dw = kernels.linear_cross_entropy_grad_torch(h.double(), w.double(), targets,
                                                                       scale.double())
    loss, dh, dw = linear_cross_entropy_grad_triton(h, w, targets, scale, blocks=blocks, row_slices=row_slices)
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == torch.float32
    assert dh.shape == h.shape and dw.shape == w.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(loss, ref_loss) < tol
    assert rel(dh, ref_dh) < tol
    assert rel(dw, ref_dw) < tol
    assert torch.count_nonzero(dh[0]) == 0, "an ignored row has no gradient"


def test_confident_rows_keep_their_small_gradients():
    """Rows whose target takes almost all the probability (p_t up to 1 - 2e-6, as near convergence): the gradient
    matrices, which scale with 1 - p_t, stay within bf16 accuracy of the float64 truth relative to their own norm
    (rounding the softmax before subtracting the one-hot would not). A single row with 1 - p_t near fp32's
    resolution is limited by fp32 itself, in any formulation."""
    rows, hidden, vocab = 32, 32, 64
    w = (torch.randn(vocab, hidden, device=DEV) / hidden ** 0.5).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=DEV)
    direction = w[targets].float()
    h = (20 * direction / direction.norm(dim=1, keepdim=True) ** 2).to(torch.bfloat16)  # target logit 20
    scale = torch.ones(rows, device=DEV)
    ref_loss, ref_dh, ref_dw = kernels.linear_cross_entropy_grad_torch(h.double(), w.double(), targets,
                                                                       scale.double())
    assert (1 - (-ref_loss).exp()).max() < 0.02, "the rows are confident"
    loss, dh, dw = linear_cross_entropy_grad_triton(h, w, targets, scale, blocks=(16, 16))
    assert rel(loss, ref_loss) < 1e-3 and rel(dh, ref_dh) < 1e-2 and rel(dw, ref_dw) < 1e-2


def test_only_the_gradients_asked_for():
    h, w, targets, scale = _inputs(20, 16, 40, torch.float32)
    ref_loss, ref_dh, ref_dw = kernels.linear_cross_entropy_grad_torch(h.double(), w.double(), targets,
                                                                       scale.double())
    loss, dh, dw = linear_cross_entropy_grad_triton(h, w, targets, scale, need_hidden=False, blocks=(16, 16))
    assert dh is None and rel(loss, ref_loss) < 1e-5 and rel(dw, ref_dw) < 1e-5
    loss, dh, dw = linear_cross_entropy_grad_triton(h, w, targets, scale, need_weight=False, blocks=(16, 16))
    assert dw is None and rel(loss, ref_loss) < 1e-5 and rel(dh, ref_dh) < 1e-5


def test_target_outside_the_vocabulary_gives_nan_loss_and_no_rows_give_empty_results():
    h, w, targets, scale = _inputs(5, 16, 20, torch.float32)
    targets[2] = 20
    loss, _, _ = linear_cross_entropy_grad_triton(h, w, targets, scale, blocks=(16, 16))
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all()
    loss, dh, dw = linear_cross_entropy_grad_triton(h[:0], w, targets[:0], scale[:0], blocks=(16, 16))
    assert loss.shape == (0,) and dh.shape == (0, 16) and torch.equal(dw, torch.zeros_like(w))


def test_public_op_dispatch_and_errors():
    h, w, targets, scale = _inputs(6, 16, 20, torch.float64)
    loss, dh, dw = kernels.linear_cross_entropy_grad(h, w, targets, scale, backend="triton")  # fp64: the reference
    assert loss.dtype == dh.dtype == dw.dtype == torch.float64
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.T, targets, reduction="none"))
    with pytest.raises(ValueError, match="expected hidden"):
        kernels.linear_cross_entropy_grad(h, w[:, :8], targets, scale)
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.linear_cross_entropy_grad(h, w.float(), targets, scale)
    with pytest.raises(ValueError, match="targets must be int32 or int64"):
        kernels.linear_cross_entropy_grad(h, w, targets.float(), scale)
    with pytest.raises(ValueError, match="hidden size 300 is over"):
        linear_cross_entropy_grad_triton(torch.zeros(2, 300, device=DEV), torch.zeros(4, 300, device=DEV),
                                         torch.zeros(2, dtype=torch.long, device=DEV), torch.ones(2, device=DEV))
