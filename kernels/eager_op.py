"""The eager shortcut past a custom op's dispatcher: the same implementation and backward, fewer Python layers.

Our Triton kernels are ``torch.library.custom_op``s so that torch.compile can trace them (fake implementations)
and dispatch modes can see them: selective activation checkpointing keeps the attention and short-conv outputs by
naming the ops. In an eager call that nothing observes, the custom op's Python layers (argument defaults, the
generated autograd wrapper, two redispatches) cost more host time than our own launch code
(``python -m benchmarks.host_path``). There a call goes through a plain ``torch.autograd.Function`` running the
same implementation and the same backward, so results are identical bit for bit; whenever something could tell
the difference, the custom op runs.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
# how many TorchDispatchModes are active; a torch without this private query always takes the custom op
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_always_dispatcher = False


@contextlib.contextmanager
def through_dispatcher():
    """Every kernel call takes its custom op for the duration: the path before the shortcut, for benchmarks and
    tests that compare the two."""
    global _always_dispatcher
    saved, _always_dispatcher = _always_dispatcher, True
    try:
        yield
    finally:
        _always_dispatcher = saved


def needs_dispatcher(*tensors) -> bool:
    """True where a kernel call must go through its custom op: under torch.compile, inside any TorchDispatchMode
    (selective checkpointing, FakeTensorMode, FlopCounterMode, tracing), for tensor subclasses, or inside
    :func:`through_dispatcher`."""
    if _always_dispatcher or torch.compiler.is_compiling() or _dispatch_modes() > 0:
        return True
    return any(t is not None and type(t) not in _PLAIN for t in tensors)


def eager_function(name: str, impl: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``apply`` of an autograd.Function that runs ``impl(*inputs)``, then ``setup_context(ctx, inputs, output)``,
    with ``backward(ctx, *grads)``: the three pieces a custom op registers, so both paths share them."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })
    return function.apply
