"""Triton short convolution vs the float64 torch reference (forward, all gradients, caches, documents, decoding).

Runs on CUDA when available (real shapes added), else on the CPU through the Triton interpreter
(TRITON_INTERPRET=1, tiny shapes and tiles, so that T and D both span several partial tiles). Every output buffer of
the Triton path is poisoned with NaN before the kernels run (``kernels.poison.set_poison``), so an element a kernel
fails to write fails the test.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import backend as kbackend  # noqa: E402
from kernels.short_conv import triton_ops as sc  # noqa: E402
from kernels.short_conv.config import SHORT_CONV_LAUNCH  # noqa: E402
from triton_checks import poisoned_run, rel  # noqa: E402

_HAS_CUDA = torch.cuda.is_available()  # without CUDA, tests/conftest.py has switched Triton to its interpreter
DEV = "cuda" if _HAS_CUDA else "cpu"
F64 = torch.float64
BF16 = torch.bfloat16
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
NAMES = ("x", "weight", "bias", "gate", "cache")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    # small tiles without CUDA: several (partial) tiles even at interpreter-sized shapes
    small = {} if _HAS_CUDA else dict(block_t_fwd=8, block_d_fwd=16, block_t_bwd=8, block_d_bwd=16)
    with poisoned_run(monkeypatch, SHORT_CONV_LAUNCH, **small):
        yield


def documents(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)


def run_case(b, t, d, k, dtype, *, gate=True, residual=True, bias=True, cache=False, final=False, cu_seqlens=None,
             dtypes=None):
    """Forward, final cache and the gradients of every input vs the float64 reference; returns the errors.

    dtypes overrides the dtype of single inputs by name (the model feeds an fp32 weight and bias with bf16 x).
    """
    n = b if cu_seqlens is None else cu_seqlens.numel() - 1
    shapes = {"x": (b, t, d), "weight": (d, k), "bias": (d,), "gate": (b, t, d), "cache": (n, d, k - 1)}
    used = {"x": True, "weight": True, "bias": bias, "gate": gate, "cache": cache}
    dtypes = {name: (dtypes or {}).get(name, dtype) for name in NAMES}
    leaves = {name: torch.randn(shapes[name], device=DEV).to(dtypes[name]) for name in NAMES if used[name]}
    ours = {name: v.clone().requires_grad_(True) for name, v in leaves.items()}
    ref = {name: v.detach().to(F64).requires_grad_(True) for name, v in leaves.items()}

    def call(inputs, backend):
        return kernels.short_conv(inputs["x"], inputs["weight"], inputs.get("bias"), gate=inputs.get("gate"),
                                  residual=residual, cu_seqlens=cu_seqlens, cache=inputs.get("cache"),
                                  output_final_state=final, backend=backend)

    y, fc = call(ours, "triton")
    y_ref, fc_ref = call(ref, "torch")
    assert y.dtype == dtypes["x"] and y.shape == y_ref.shape
    tol = TOL[torch.bfloat16] if BF16 in dtypes.values() else TOL[dtype]
    errs = {"y": rel(y, y_ref)}
    w_y = torch.randn_like(y_ref)
    loss, loss_ref = (y.double() * w_y).sum(), (y_ref * w_y).sum()
    if final:
        assert fc.dtype == dtypes["x"] and fc.shape == fc_ref.shape == (n, d, k - 1)
        if k > 1:
            errs["final"] = rel(fc, fc_ref)
            w_f = torch.randn_like(fc_ref)
            loss, loss_ref = loss + (fc.double() * w_f).sum(), loss_ref + (fc_ref * w_f).sum()
    else:
        assert fc is None
    grads = torch.autograd.grad(loss, list(ours.values()))
    grads_ref = torch.autograd.grad(loss_ref, list(ref.values()))
    for name, g, g_ref in zip(ours, grads, grads_ref):
        assert g.dtype == ours[name].dtype and g.shape == ours[name].shape
        if g_ref.numel():
            errs["d" + name] = rel(g, g_ref)
    bad = {key: val for key, val in errs.items() if not val <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"
    return errs


CPU_CASES = [
    # b, t, d, k, dtype, gate, residual, bias, cache, final
    (2, 37, 20, 4, torch.float32, True, True, True, True, True),
    (1, 19, 16, 1, torch.float32, True, False, True, False, True),
    (3, 10, 40, 2, torch.float32, False, True, False, True, True),
    (2, 21, 24, 3, torch.float32, False, False, True, False, False),
    (2, 2, 20, 4, torch.float32, True, True, True, True, True),     # T < K-1: the final cache keeps cache entries
    (2, 1, 20, 3, torch.float32, True, True, True, True, True),     # T == 1 with gradients: general path
    (2, 29, 24, 3, BF16, True, True, True, True, True),
    (1, 8, 16, 4, BF16, False, False, False, False, True),
]
GPU_CASES = [
    (4, 2048, 1024, 4, BF16, True, True, True, False, False),
    (2, 1000, 1000, 3, BF16, True, True, True, True, True),
    (3, 777, 200, 4, torch.float32, True, True, True, True, True),
    (1, 4096, 64, 2, torch.float32, False, True, True, True, True),
    (2, 333, 96, 8, torch.float32, True, False, True, True, True),
]
CASES = CPU_CASES + (GPU_CASES if _HAS_CUDA else [])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}t{c[1]}d{c[2]}k{c[3]}-{str(c[4])[6:]}-g{int(c[5])}"
                         f"r{int(c[6])}b{int(c[7])}c{int(c[8])}f{int(c[9])}")
def test_against_float64_reference(case):
    b, t, d, k, dtype, gate, residual, bias, cache, final = case
    run_case(b, t, d, k, dtype, gate=gate, residual=residual, bias=bias, cache=cache, final=final)


VARLEN = [
    # document lengths (incl. empty ones and ones shorter than K-1), d, k, dtype
    ([1, 0, 9, 2, 17], 20, 4, torch.float32),
    ([3, 12, 1, 0], 16, 3, BF16),
]
if _HAS_CUDA:
    VARLEN += [([1000, 3, 2500, 0, 64, 700], 512, 4, BF16), ([4000, 1, 97, 2, 129], 96, 4, torch.float32)]


@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"docs{len(c[0])}-d{c[1]}k{c[2]}-{str(c[3])[6:]}")
@pytest.mark.parametrize("cache", [False, True])
def test_varlen_documents(case, cache):
    lengths, d, k, dtype = case
    run_case(1, sum(lengths), d, k, dtype, cache=cache, final=True, cu_seqlens=documents(lengths))


def test_model_dtypes_and_grouped_backward_tiles():
    """bf16 x and gate with fp32 weight and bias (as under autocast); several T tiles per backward program."""
    SHORT_CONV_LAUNCH.update(bwd_tiles=3)
    run_case(2, 45, 24, 4, torch.float32, cache=True, final=True, dtypes={"x": BF16, "gate": BF16})
    run_case(1, 30, 16, 3, torch.float32, cache=True, final=True, cu_seqlens=documents([2, 20, 1, 7]))


@pytest.mark.parametrize("k", [2, 4])
def test_decode_steps_match_one_call(k):
    """A chain of T == 1 steps (the step kernel) equals one full call and the torch reference at every step."""
    b, t, d = 2, 6, 20
    x, gate = torch.randn(2, b, t, d, device=DEV).unbind(0)
    weight, bias = torch.randn(d, k, device=DEV), torch.randn(d, device=DEV)
    cache0 = torch.randn(b, d, k - 1, device=DEV)
    kw = dict(residual=True, output_final_state=True)
    whole, final_whole = kernels.short_conv(x, weight, bias, gate=gate, cache=cache0, backend="triton", **kw)
    assert sc._is_decode_step(x[:, :1], weight, bias, gate[:, :1], cache0, None, None)
    cache, cache_ref, outs = cache0, cache0, []
    for i in range(t):
        step = (x[:, i:i + 1], weight, bias)
        y, cache = kernels.short_conv(*step, gate=gate[:, i:i + 1], cache=cache, backend="triton", **kw)
        y_ref, cache_ref = kernels.short_conv(*step, gate=gate[:, i:i + 1], cache=cache_ref, backend="torch", **kw)
        assert rel(y, y_ref) < 1e-6 and torch.equal(cache, cache_ref)
        outs.append(y)
    assert rel(torch.cat(outs, 1), whole) < 1e-6
    assert torch.equal(cache, final_whole)
    y, none = kernels.short_conv(x[:, :1], weight, cache=cache0, backend="triton")  # no final cache asked for
    assert none is None and rel(y, kernels.short_conv(x[:, :1], weight, cache=cache0, backend="torch")[0]) < 1e-6


def test_empty_sequence_and_fallback():
    x = torch.randn(2, 0, 20, device=DEV)
    cache = torch.randn(2, 20, 3, device=DEV)
    y, fc = kernels.short_conv(x, torch.randn(20, 4, device=DEV), cache=cache, output_final_state=True,
                               backend="triton")
    assert y.shape == x.shape and torch.equal(fc, cache)
    # float64 and K > MAX_K are not covered by the kernels: they fall back to the reference
    for dtype, k in ((F64, 3), (torch.float32, sc.MAX_K + 1)):
        x = torch.randn(1, 12, 8, device=DEV, dtype=dtype)
        w = torch.randn(8, k, device=DEV, dtype=dtype)
        assert not sc.supports(x, w)
        y, _ = kernels.short_conv(x, w, backend="triton")
        assert rel(y, kernels.short_conv(x, w, backend="torch")[0]) < 1e-12


def test_compile():
    """Gradients agree under torch.compile (custom ops + fake implementations, no graph break)."""
    x = torch.randn(2, 20, 16, device=DEV, requires_grad=True)
    w = torch.randn(16, 4, device=DEV, requires_grad=True)
    bias = torch.randn(16, device=DEV, requires_grad=True)
    gate = torch.randn(2, 20, 16, device=DEV, requires_grad=True)

    def fn(x, w, bias, gate):
        return kernels.short_conv(x * 1.0, w, bias, gate=gate, residual=True, backend="triton")[0]

    dy = torch.randn(2, 20, 16, device=DEV)
    leaves = (x, w, bias, gate)
    eager = torch.autograd.grad((fn(*leaves) * dy).sum(), leaves)
    compiled = torch.compile(fn, backend="inductor" if _HAS_CUDA else "aot_eager", fullgraph=True)
    for a, b in zip(torch.autograd.grad((compiled(*leaves) * dy).sum(), leaves), eager):
        assert rel(a, b) < 1e-6


def test_registered_and_auto_backend():
    assert "short_conv" in kernels.registered_triton_ops()
    if _HAS_CUDA:
        assert kbackend.resolve_backend("short_conv", None, torch.device("cuda")) == "triton"
