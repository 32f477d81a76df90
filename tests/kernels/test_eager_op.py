"""The eager shortcut past the custom ops (``kernels/eager_op.py``): an eager call gives bit-identical outputs,
states and gradients to the same call through the custom op; torch.compile and selective activation checkpointing
still see the op (the compiled graph holds it; the checkpoint keeps its outputs instead of rerunning it).

Runs on CUDA when available, else through the Triton interpreter (tests/conftest.py), at tiny shapes."""

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import eager_op  # noqa: E402
from kernels.linear_attention.triton_chunk import ops as attention_ops  # noqa: E402
from kernels.short_conv import triton_ops as short_conv_ops  # noqa: E402
from pretrain.training.activation_checkpointing import _selective_context  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _forbid_shortcut(monkeypatch):
    def refuse(*args):
        raise AssertionError("the eager shortcut ran where the custom op must")

    monkeypatch.setattr(attention_ops, "_eager_fwd", refuse)
    monkeypatch.setattr(short_conv_ops, "_eager_fwd", refuse)


class _Subclass(torch.Tensor):
    pass


def test_needs_dispatcher():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.ones(2)
    assert not eager_op.needs_dispatcher(x, None, torch.nn.Parameter(torch.ones(2)))
    with Passthrough():
        assert eager_op.needs_dispatcher(x)
    assert eager_op.needs_dispatcher(x, x.as_subclass(_Subclass))
    assert torch.compile(lambda t: t + eager_op.needs_dispatcher(t), backend="eager", fullgraph=True)(x).eq(2).all()
    with eager_op.through_dispatcher():
        assert eager_op.needs_dispatcher(x)
    assert not eager_op.needs_dispatcher(x)


def _attention_call(kind, packed, with_state):
    g = torch.Generator().manual_seed(0)
    b, t = (1, 45) if packed else (2, 37)
    q, k = (torch.randn(b, t, 2, 16, generator=g).to(DEV).requires_grad_() for _ in range(2))
    v = torch.randn(b, t, 2, 8, generator=g).to(DEV).requires_grad_()
    cu_seqlens = torch.tensor([0, 7, 30, 45], dtype=torch.int32, device=DEV) if packed else None
    n = 3 if packed else b
    leaves = [q, k, v]
    initial = None
    if with_state:
        state = kernels.zero_state(kind, n, 2, 16, 8, device=DEV)
        initial = tuple((s + 0.1 * torch.rand(s.shape, generator=g).to(DEV)).requires_grad_() for s in state)
        leaves += list(initial)
    fn = kernels.rebased_attention if kind == "rebased" else kernels.based_attention

    def run():
        o, final = fn(q, k, v, backend="triton", chunk_size=16, cu_seqlens=cu_seqlens, initial_state=initial,
                      output_final_state=with_state)
        outputs = [o] + (list(final) if with_state else [])
        w = [torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEV) for x in outputs]
        loss = sum((x.float() * wx).sum() for x, wx in zip(outputs, w))
        return [x.detach() for x in outputs] + list(torch.autograd.grad(loss, leaves))

    return run


@pytest.mark.parametrize("kind,packed,with_state", [("rebased", False, False), ("based", False, True),
                                                     ("rebased", True, True)],
                         ids=["rebased_dense", "based_dense_states", "rebased_packed_states"])
def test_attention_shortcut_is_bit_identical(kind, packed, with_state):
    run = _attention_call(kind, packed, with_state)
    shortcut = run()
    with eager_op.through_dispatcher():
        through_op = run()
    assert len(shortcut) == len(through_op)
    for a, b in zip(shortcut, through_op):
        assert torch.equal(a, b)


def _short_conv_call(with_cache):
    g = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(2, 21, 24, generator=g).to(DEV).requires_grad_() for _ in range(2))
    weight = torch.randn(24, 4, generator=g).to(DEV).requires_grad_()
    bias = torch.randn(24, generator=g).to(DEV).requires_grad_()
    cache = torch.randn(2, 24, 3, generator=g).to(DEV).requires_grad_() if with_cache else None
    leaves = [x, gate, weight, bias] + ([cache] if with_cache else [])

    def run():
        y, final = kernels.short_conv(x, weight, bias, gate=gate, residual=True, cache=cache,
                                      output_final_state=with_cache, backend="triton")
        outputs = [y] + ([final] if with_cache else [])
        loss = sum((o * torch.linspace(-1, 1, o.numel(), device=DEV).view_as(o)).sum() for o in outputs)
        return [o.detach() for o in outputs] + list(torch.autograd.grad(loss, leaves))

    return run


@pytest.mark.parametrize("with_cache", [False, True], ids=["no_cache", "cache"])
def test_short_conv_shortcut_is_bit_identical(with_cache):
    run = _short_conv_call(with_cache)
    shortcut = run()
    with eager_op.through_dispatcher():
        through_op = run()
    for a, b in zip(shortcut, through_op):
        assert torch.equal(a, b)


def test_eager_calls_take_the_shortcut_and_compile_takes_the_op(monkeypatch):
    q = torch.randn(1, 20, 2, 16, device=DEV, requires_grad=True)
    v = torch.randn(1, 20, 2, 8, device=DEV)

    def fn(q):
        return kernels.rebased_attention(q * 1.0, q, v, backend="triton", chunk_size=16)[0]

    expected = fn(q)
    grad = torch.autograd.grad(expected.sum(), q)[0]
    _forbid_shortcut(monkeypatch)
    with pytest.raises(AssertionError, match="eager shortcut"):
        fn(q)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(q)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(out.sum(), q)[0], grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module, call", [
    (attention_ops, lambda x: kernels.rebased_attention(x, x, x[..., :8], backend="triton", chunk_size=16)[0]),
    (short_conv_ops, lambda x: kernels.short_conv(x.flatten(2), torch.ones(32, 4, device=DEV), residual=True,
                                                  backend="triton")[0]),
], ids=["attention", "short_conv"])
def test_selective_checkpointing_keeps_the_kernel_output(monkeypatch, module, call):
    """Selective checkpointing names the ops to keep: through the shortcut it would not see them and would rerun
    the forward kernels in the backward. Counted by the forward implementation's calls."""
    from torch.utils.checkpoint import checkpoint

    calls = []
    impl = module._fwd_impl
    monkeypatch.setattr(module, "_fwd_impl", lambda *args: calls.append(1) or impl(*args))
    x = torch.randn(1, 24, 2, 16, device=DEV, requires_grad=True)

    def forwards(**context):
        calls.clear()
        checkpoint(lambda t: call(t * 2.0), x, use_reentrant=False, **context).sum().backward()
        return len(calls)

    assert forwards() == 2  # full checkpointing reruns the kernel
    assert forwards(context_fn=_selective_context) == 1
