"""Edge cases of the kernels' public API that the per-family tests do not reach: inputs without tokens for the short
convolution's reference, masked (-inf) logits and invalid targets for the cross-entropy kernel, fp16 attention
whose state leaves fp16's range.

Runs on CUDA when available, else on the CPU through the Triton interpreter (tests/conftest.py); Triton outputs are
poisoned with NaN before the kernels run, so an element a kernel fails to write fails the test.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.cross_entropy.triton_ops import cross_entropy_grad_triton  # noqa: E402
from triton_checks import poisoned_run, rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    with poisoned_run(monkeypatch):
        yield


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("lengths", [None, [0, 0]], ids=["T0", "empty-documents"])
def test_short_conv_reference_without_tokens(k, lengths):
    """No tokens at all (T == 0, or only empty documents): no output, the cache passes through to the final cache,
    and so does its gradient (F.conv1d rejected the K-1 cache columns as shorter than the kernel)."""
    cu = None if lengths is None else torch.tensor([0] + lengths, device=DEV)
    n = 2 if lengths is not None else 1
    x = torch.randn(1, 0, 8, dtype=F64, device=DEV, requires_grad=True)
    weight = torch.randn(8, k, dtype=F64, device=DEV)
    cache = torch.randn(n, 8, k - 1, dtype=F64, device=DEV, requires_grad=True)
    y, final = kernels.short_conv(x, weight, torch.randn(8, dtype=F64, device=DEV), cache=cache, cu_seqlens=cu,
                                  output_final_state=True, backend="torch")
    assert y.shape == x.shape and torch.equal(final, cache)
    d_final = torch.randn_like(final)
    assert torch.equal(torch.autograd.grad(final, cache, d_final)[0], d_final)


def test_cross_entropy_leading_block_of_masked_logits():
    """A row whose first block of logits is all -inf (masked words) is as finite as the reference: the running max
    started at -inf, and exp(-inf - (-inf)) made the whole row NaN."""
    logits = 3 * torch.randn(3, 40, device=DEV)
    logits[:, :16] = float("-inf")
    logits[1, 16:32] = float("-inf")  # two masked blocks
    targets = torch.tensor([20, 35, 39], device=DEV)
    scale = torch.rand(3, device=DEV)
    ref_loss, ref_grad = kernels.cross_entropy_grad_torch(logits.double(), targets, scale.double())
    loss, grad = cross_entropy_grad_triton(logits.clone(), targets, scale, block=16)
    assert rel(loss, ref_loss) < 1e-6 and rel(grad, ref_grad) < 1e-6
    assert not grad[:, :16].any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cross_entropy_target_dtype(backend):
    logits = torch.randn(3, 10, device=DEV)
    for targets in (torch.tensor([1.0, 2.0, 3.0], device=DEV), torch.tensor([True, False, True], device=DEV)):
        with pytest.raises(ValueError, match="targets must be int32 or int64"):
            kernels.cross_entropy_grad(logits, targets, torch.ones(3, device=DEV), backend=backend)


def test_cross_entropy_out_of_range_target_reads_nothing_outside_its_row():
    """A target outside [0, V) gives that row a NaN loss (it read a neighbouring row's logit, or memory before the
    buffer, and returned a plausible number); the other rows are untouched."""
    logits = torch.randn(4, 10, device=DEV)
    targets = torch.tensor([-1, 3, 10, 9], device=DEV, dtype=torch.int32)
    loss, grad = cross_entropy_grad_triton(logits.clone(), targets, torch.ones(4, device=DEV), block=16)
    assert loss[[0, 2]].isnan().all()
    ref_loss, ref_grad = kernels.cross_entropy_grad_torch(logits[[1, 3]].double(), targets[[1, 3]].long(),
                                                          torch.ones(2, dtype=F64, device=DEV))
    assert rel(loss[[1, 3]], ref_loss) < 1e-6 and rel(grad[[1, 3]], ref_grad) < 1e-6


@pytest.mark.parametrize("kind", ["rebased", "based"])
def test_fp16_attention_with_a_state_past_the_fp16_range(kind):
    """A long context's state (sums of phi(k) v over the prefix) passes 65504, fp16's largest number: the fp16
    call must stay finite and as accurate as fp16 allows (it overflowed to NaN when the state was multiplied in fp16),
    and return fp16 output and gradients."""
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k = (torch.randn(1, 40, 2, 16, device=DEV, generator=g) for _ in range(2))
    v = torch.randn(1, 40, 2, 8, device=DEV, generator=g)
    keys = torch.randn(1, 6, 2, 16, dtype=F64, device=DEV, generator=g)
    phi = (kernels.rebased_feature_map if kind == "rebased" else kernels.based_feature_map)(keys)
    big = 3e4 * torch.einsum("nshf,nshv->nhfv", phi, torch.rand(1, 6, 2, 8, dtype=F64, device=DEV, generator=g))
    state = (big.float(), 3e4 * phi.sum(1).float())
    assert state[0].abs().max() > 65504
    attention = kernels.rebased_attention if kind == "rebased" else kernels.based_attention
    x16 = [t.half().requires_grad_() for t in (q, k, v)]
    o, _ = attention(*x16, initial_state=state, backend="triton")
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref, _ = attention(*x64, initial_state=tuple(s.double() for s in state), backend="torch")
    assert o.dtype == torch.float16 and rel(o, ref) < 2e-3
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(o, x16, do.half())
    ref_grads = torch.autograd.grad(ref, x64, do)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float16 and rel(got, want) < 2e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_short_conv_without_tokens_has_zero_gradients(backend):
    """T = 0: every input gets a gradient (zeros), as at T > 0; the reference returned an output outside autograd."""
    x = torch.randn(2, 0, 8, device=DEV, requires_grad=True)
    weight = torch.randn(8, 4, device=DEV, requires_grad=True)
    bias = torch.randn(8, device=DEV, requires_grad=True)
    y, _ = kernels.short_conv(x, weight, bias, backend=backend)
    assert y.shape == (2, 0, 8)
    grads = torch.autograd.grad(y.sum(), (x, weight, bias))
    assert [g.shape for g in grads] == [x.shape, weight.shape, bias.shape]
    assert all(g.abs().sum() == 0 for g in grads)


def test_non_float_operands_are_refused():
    x, weight = torch.randn(1, 5, 8, device=DEV), torch.randn(8, 3, device=DEV)
    for name, kwargs in (("bias", {"bias": torch.ones(8, dtype=torch.long, device=DEV)}),
                         ("gate", {"gate": torch.ones(1, 5, 8, dtype=torch.long, device=DEV)})):
        with pytest.raises(ValueError, match=f"{name} must be a floating point tensor"):
            kernels.short_conv(x, weight, **kwargs)
    with pytest.raises(ValueError, match="must be floating point"):
        kernels.matmul_tf32x3(torch.ones(2, 3, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="V >= 1"):
        kernels.cross_entropy_grad(torch.zeros(2, 0, device=DEV), torch.zeros(2, dtype=torch.long, device=DEV),
                                   torch.ones(2, device=DEV))
