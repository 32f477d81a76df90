"""Float64 checks of the torch reference of the causal depthwise short convolution."""

import pytest
import torch

import kernels
from kernels import backend as kbackend

F64 = torch.float64


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    monkeypatch.delenv(kbackend.BACKEND_ENV_VAR, raising=False)
    torch.manual_seed(0)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def conv1d_reference(x, weight, bias):
    """torch.nn.Conv1d(groups=D, padding=K-1), truncated to the first T outputs."""
    b, t, d = x.shape
    kk = weight.shape[1]
    conv = torch.nn.Conv1d(d, d, kk, groups=d, padding=kk - 1, bias=bias is not None).to(F64)
    with torch.no_grad():
        conv.weight.copy_(weight[:, None, :])
        if bias is not None:
            conv.bias.copy_(bias)
    return conv(x.transpose(1, 2))[..., :t].transpose(1, 2)


def conv1d_functional(x, weight, bias):
    """Same reference via F.conv1d (differentiable wrt weight/bias)."""
    t, kk = x.shape[1], weight.shape[1]
    y = torch.nn.functional.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=kk - 1,
                                   groups=x.shape[2])
    return y[..., :t].transpose(1, 2)


def make(b, t, d, kk, grad=False):
    x = torch.randn(b, t, d, dtype=F64, requires_grad=grad)
    w = torch.randn(d, kk, dtype=F64, requires_grad=grad)
    bias = torch.randn(d, dtype=F64, requires_grad=grad)
    return x, w, bias


@pytest.mark.parametrize("b,t,d", [(1, 1, 3), (2, 7, 8), (2, 33, 3), (1, 100, 8)])
@pytest.mark.parametrize("kk", [1, 2, 4])
@pytest.mark.parametrize("mode", ["conv", "recurrent"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_conv1d(b, t, d, kk, mode, with_bias):
    x, w, bias = make(b, t, d, kk)
    bias = bias if with_bias else None
    y, cache = kernels.short_conv(x, w, bias, mode=mode)
    assert cache is None and y.shape == x.shape and y.dtype == F64
    assert rel(y, conv1d_reference(x, w, bias)) < 1e-12


def test_explicit_formula_current_token_is_last_weight():
    x = torch.zeros(1, 5, 1, dtype=F64)
    x[0, 2, 0] = 1.0
    w = torch.tensor([[10.0, 20.0, 30.0]], dtype=F64)
    y, _ = kernels.short_conv(x, w)
    assert y[0, :, 0].tolist() == [0.0, 0.0, 30.0, 20.0, 10.0]


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
def test_gate_and_residual(mode):
    x, w, bias = make(2, 20, 5, 4)
    gate = torch.randn_like(x)
    base = conv1d_reference(x, w, bias)
    y, _ = kernels.short_conv(x, w, bias, gate=gate, mode=mode)
    assert rel(y, base * gate) < 1e-12
    y, _ = kernels.short_conv(x, w, bias, gate=gate, residual=True, mode=mode)
    assert rel(y, base * gate + x) < 1e-12
    y, _ = kernels.short_conv(x, w, bias, residual=True, mode=mode)
    assert rel(y, base + x) < 1e-12


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_cu_seqlens_equals_separate_documents(mode, with_cache):
    lengths = [5, 17, 1, 30, 2]
    d, kk = 6, 4
    t = sum(lengths)
    x, w, bias = make(1, t, d, kk)
    gate = torch.randn_like(x)
    offs = [0] + torch.tensor(lengths).cumsum(0).tolist()
    cu = torch.tensor(offs, dtype=torch.int32)
    cache = torch.randn(len(lengths), d, kk - 1, dtype=F64) if with_cache else None
    y, fc = kernels.short_conv(x, w, bias, gate=gate, residual=True, cu_seqlens=cu, cache=cache,
                               output_final_state=True, mode=mode)
    assert fc.shape == (len(lengths), d, kk - 1)
    for n, (a, e) in enumerate(zip(offs[:-1], offs[1:])):
        c_n = cache[n:n + 1] if with_cache else None
        yn, fn = kernels.short_conv(x[:, a:e], w, bias, gate=gate[:, a:e], residual=True, cache=c_n,
                                    output_final_state=True, mode="conv")
        assert rel(y[:, a:e], yn) < 1e-12
        assert rel(fc[n:n + 1], fn) < 1e-12 or (fn.norm() == 0 and fc[n].norm() == 0)


@pytest.mark.parametrize("kk", [1, 2, 4])
@pytest.mark.parametrize("split", [1, 2, 13])
@pytest.mark.parametrize("mode", ["conv", "recurrent"])
def test_cache_continuation(kk, split, mode):
    x, w, bias = make(2, 20, 5, kk)
    whole, cache_whole = kernels.short_conv(x, w, bias, output_final_state=True)
    y1, c1 = kernels.short_conv(x[:, :split], w, bias, output_final_state=True, mode=mode)
    assert c1.shape == (2, 5, kk - 1)
    # the final cache holds the last K-1 inputs (zero-padded on the left when fewer were seen)
    padded = torch.cat([torch.zeros(2, kk - 1, 5, dtype=F64), x[:, :split]], dim=1)[:, -(kk - 1):] if kk > 1 \
        else x[:, :0]
    assert torch.equal(c1, padded.transpose(1, 2))
    y2, c2 = kernels.short_conv(x[:, split:], w, bias, cache=c1, output_final_state=True, mode=mode)
    assert rel(torch.cat([y1, y2], 1), whole) < 1e-12
    assert torch.equal(c2, cache_whole)


@pytest.mark.parametrize("kk", [2, 4])
def test_step_by_step_decoding(kk):
    x, w, bias = make(2, 12, 5, kk)
    gate = torch.randn_like(x)
    whole, _ = kernels.short_conv(x, w, bias, gate=gate, residual=True)
    cache = torch.zeros(2, 5, kk - 1, dtype=F64)
    outs = []
    for t in range(12):
        y, cache = kernels.short_conv(x[:, t:t + 1], w, bias, gate=gate[:, t:t + 1], residual=True, cache=cache,
                                      output_final_state=True)  # default mode: recurrent (T == 1, cache given)
        outs.append(y)
    assert rel(torch.cat(outs, 1), whole) < 1e-12
    # a cache that ends mid-way through a short prefix (T < K-1) keeps older cache entries
    c0 = torch.randn(2, 5, kk - 1, dtype=F64)
    _, c1 = kernels.short_conv(x[:, :1], w, cache=c0, output_final_state=True)
    assert torch.equal(c1, torch.cat([c0, x[:, :1].transpose(1, 2)], -1)[..., 1:])


def test_gradients_match_conv1d_and_modes():
    x, w, bias = make(2, 17, 4, 3, grad=True)
    gate = torch.randn(2, 17, 4, dtype=F64, requires_grad=True)
    cache = torch.randn(2, 4, 2, dtype=F64, requires_grad=True)
    gy = torch.randn(2, 17, 4, dtype=F64)
    gc = torch.randn(2, 4, 2, dtype=F64)
    leaves = [x, w, bias, gate, cache]
    results = []
    for mode in ("conv", "recurrent"):
        y, c = kernels.short_conv(x, w, bias, gate=gate, residual=True, cache=cache, output_final_state=True,
                                  mode=mode)
        results.append(torch.autograd.grad((y * gy).sum() + (c * gc).sum(), leaves))
    for a, b in zip(*results):
        assert rel(a, b) < 1e-12
    # against nn.Conv1d (no cache, no gate)
    y, _ = kernels.short_conv(x, w, bias)
    g1 = torch.autograd.grad((y * gy).sum(), [x, w, bias])
    assert rel(conv1d_functional(x, w, bias), conv1d_reference(x, w, bias)) < 1e-14
    g2 = torch.autograd.grad((conv1d_functional(x, w, bias) * gy).sum(), [x, w, bias])
    for a, b in zip(g1, g2):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
def test_gradcheck_varlen(mode):
    x, w, bias = make(1, 7, 2, 3, grad=True)
    cache = torch.randn(2, 2, 2, dtype=F64, requires_grad=True)
    cu = torch.tensor([0, 3, 7])

    def f(x, w, bias, cache):
        y, c = kernels.short_conv(x, w, bias, cu_seqlens=cu, cache=cache, output_final_state=True, mode=mode)
        return y, c

    assert torch.autograd.gradcheck(f, (x, w, bias, cache))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    x, w, bias = make(2, 30, 8, 4)
    x, w, bias = x.to(dtype), w.to(dtype), bias.to(dtype)
    y, c = kernels.short_conv(x, w, bias, output_final_state=True)
    assert y.dtype == dtype and c.dtype == dtype
    ref = conv1d_reference(x.double(), w.double(), bias.double())
    assert rel(y.double(), ref) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_validation_and_backend(monkeypatch):
    x, w, bias = make(2, 6, 4, 3)
    with pytest.raises(ValueError, match="weight"):
        kernels.short_conv(x, w[:3])
    with pytest.raises(ValueError, match="bias"):
        kernels.short_conv(x, w, bias[:2])
    with pytest.raises(ValueError, match="gate"):
        kernels.short_conv(x, w, gate=x[:, :3])
    with pytest.raises(ValueError, match="cache"):
        kernels.short_conv(x, w, cache=torch.zeros(2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="batch size 1"):
        kernels.short_conv(x, w, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        kernels.short_conv(x[0], w)
    with pytest.raises(ValueError, match="mode"):
        kernels.short_conv(x, w, mode="chunk")
    saved = kbackend.unregister_triton_impl("short_conv")
    try:
        with pytest.raises(kernels.BackendUnavailableError):
            kernels.short_conv(x, w, backend="triton")
        monkeypatch.setenv(kbackend.BACKEND_ENV_VAR, "triton")
        with pytest.raises(kernels.BackendUnavailableError):
            kernels.short_conv(x, w)
        monkeypatch.setenv(kbackend.BACKEND_ENV_VAR, "torch")
        kernels.short_conv(x, w)
    finally:
        if saved is not None:
            kbackend.register_triton_impl("short_conv", saved)
