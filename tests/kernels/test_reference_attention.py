"""Float64 checks of the torch reference implementations of rebased / based attention."""

import math

import pytest
import torch

import kernels
from kernels import backend as kbackend

KINDS = ("rebased", "based")
MODES = ("quadratic", "chunk", "recurrent")
F64 = torch.float64


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    monkeypatch.delenv(kbackend.BACKEND_ENV_VAR, raising=False)
    torch.manual_seed(0)


def attn(kind):
    return kernels.rebased_attention if kind == "rebased" else kernels.based_attention


def fmap(kind):
    return kernels.rebased_feature_map if kind == "rebased" else kernels.based_feature_map


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_qkv(b, t, h, dk, dv, dtype=F64, grad=False):
    q = torch.randn(b, t, h, dk, dtype=dtype)
    k = torch.randn(b, t, h, dk, dtype=dtype)
    v = torch.randn(b, t, h, dv, dtype=dtype)
    if grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v


def make_state(kind, n, h, dk, dv, grad=False):
    f = kernels.state_size(kind, dk)
    # a plausible state: sums of features of a few random keys (keeps the normaliser positive)
    kk = torch.randn(n, 5, h, dk, dtype=F64)
    vv = torch.randn(n, 5, h, dv, dtype=F64)
    phi = fmap(kind)(kk, dk ** -0.5)
    kv = torch.einsum("nshf,nshv->nhfv", phi, vv)
    z = phi.sum(1)
    assert kv.shape == (n, h, f, dv) and z.shape == (n, h, f)
    if grad:
        kv.requires_grad_(True)
        z.requires_grad_(True)
    return kv, z


def brute_force(kind, q, k, v, scale, eps, normalize, init=None):
    """Explicit loops straight from the kernel definition (no feature maps unless init is given)."""
    b, t, h, dk = q.shape
    out = torch.zeros(b, t, h, v.shape[-1], dtype=F64)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                x = scale * (k[bi, : ti + 1, hi] @ q[bi, ti, hi])          # [ti+1]
                a = x ** 2 if kind == "rebased" else 1 + x + x ** 2 / 2
                num = (a[:, None] * v[bi, : ti + 1, hi]).sum(0)
                den = a.sum()
                if init is not None:
                    phi_q = fmap(kind)(q[bi, ti, hi], scale)
                    num = num + phi_q @ init[0][bi, hi]
                    den = den + phi_q @ init[1][bi, hi]
                out[bi, ti, hi] = num / (den + eps) if normalize else num
    return out


# ------------------------------------------------------------------ feature maps

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dk", [1, 4, 16])
def test_feature_map_reproduces_kernel(kind, dk):
    scale = 0.37
    q = torch.randn(50, dk, dtype=F64)
    k = torch.randn(50, dk, dtype=F64)
    pq, pk = fmap(kind)(q, scale), fmap(kind)(k, scale)
    assert pq.shape == (50, kernels.state_size(kind, dk))
    x = scale * (q @ k.T)
    want = x ** 2 if kind == "rebased" else 1 + x + x ** 2 / 2
    assert rel(pq @ pk.T, want) < 1e-13


def test_feature_layout_and_sizes():
    assert kernels.state_size("rebased", 16) == 136
    assert kernels.state_size("based", 16) == 1 + 16 + 136
    x = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    r2 = math.sqrt(2.0)
    want = torch.tensor([1, 4, 9, r2 * 2, r2 * 3, r2 * 6], dtype=F64) * 0.5
    assert torch.allclose(kernels.rebased_feature_map(x, 0.5), want)
    want_b = torch.cat([torch.ones(1, dtype=F64), x * math.sqrt(0.5), want / r2])
    assert torch.allclose(kernels.based_feature_map(x, 0.5), want_b)
    with pytest.raises(ValueError):
        kernels.state_size("softmax", 4)


# ------------------------------------------------------------------ quadratic vs brute force

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_init", [False, True])
def test_quadratic_matches_brute_force(kind, normalize, with_init):
    b, t, h, dk, dv = 2, 9, 2, 4, 3
    q, k, v = make_qkv(b, t, h, dk, dv)
    scale, eps = 0.8, 1e-3
    init = make_state(kind, b, h, dk, dv) if with_init else None
    o, _ = attn(kind)(q, k, v, scale=scale, eps=eps, normalize=normalize, initial_state=init, mode="quadratic")
    want = brute_force(kind, q, k, v, scale, eps, normalize, init)
    assert rel(o, want) < 1e-12
    # default scale is Dk**-0.5
    o2, _ = attn(kind)(q, k, v, mode="quadratic", normalize=normalize, initial_state=init)
    assert rel(o2, brute_force(kind, q, k, v, dk ** -0.5, 1e-6, normalize, init)) < 1e-12


# ------------------------------------------------------------------ the three forms agree

SHAPES = [  # B, T, H, Dk, Dv
    (1, 1, 1, 4, 3),
    (2, 7, 3, 4, 8),
    (1, 33, 1, 16, 3),
    (2, 64, 3, 4, 3),
    (1, 100, 3, 16, 8),
    (2, 100, 1, 4, 8),
]


def _run_with_grads(kind, mode, q, k, v, init, normalize, chunk_size, weights):
    leaves = [q, k, v] + (list(init) if init is not None else [])
    # eps=1e-3: with eps ~ 1e-6 and a single visible token, o ~= v and dq ~ eps is pure cancellation
    # noise (ill-conditioned, not a bug), which would make a 1e-10 relative comparison meaningless.
    o, st = attn(kind)(q, k, v, normalize=normalize, initial_state=init, output_final_state=True,
                       mode=mode, chunk_size=chunk_size, eps=1e-3)
    wo, wkv, wz = weights
    loss = (o * wo).sum() + (st[0] * wkv).sum() + (st[1] * wz).sum()
    grads = torch.autograd.grad(loss, leaves)
    return o.detach(), (st[0].detach(), st[1].detach()), grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_init", [False, True])
def test_modes_agree_outputs_states_grads(kind, shape, normalize, with_init):
    b, t, h, dk, dv = shape
    q, k, v = make_qkv(b, t, h, dk, dv, grad=True)
    init = make_state(kind, b, h, dk, dv, grad=True) if with_init else None
    f = kernels.state_size(kind, dk)
    weights = (torch.randn(b, t, h, dv, dtype=F64), torch.randn(b, h, f, dv, dtype=F64),
               torch.randn(b, h, f, dtype=F64))
    ref = _run_with_grads(kind, "quadratic", q, k, v, init, normalize, 16, weights)
    for mode in ("chunk", "recurrent"):
        got = _run_with_grads(kind, mode, q, k, v, init, normalize, 16, weights)
        assert got[0].dtype == F64 and got[0].shape == (b, t, h, dv)
        assert rel(got[0], ref[0]) < 1e-10, f"{mode} output"
        assert rel(got[1][0], ref[1][0]) < 1e-10, f"{mode} final kv"
        assert rel(got[1][1], ref[1][1]) < 1e-10, f"{mode} final z"
        names = ["dq", "dk", "dv", "dkv0", "dz0"]
        for name, g, gr in zip(names, got[2], ref[2]):
            assert rel(g, gr) < 1e-10, f"{mode} {name}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 128])
def test_chunk_sizes(kind, chunk_size):
    q, k, v = make_qkv(2, 70, 2, 4, 3)
    ref, sref = attn(kind)(q, k, v, mode="quadratic", output_final_state=True)
    o, s = attn(kind)(q, k, v, mode="chunk", chunk_size=chunk_size, output_final_state=True)
    assert rel(o, ref) < 1e-10 and rel(s[0], sref[0]) < 1e-10 and rel(s[1], sref[1]) < 1e-10


def test_final_state_is_explicit_sum():
    q, k, v = make_qkv(2, 20, 3, 4, 5)
    for kind in KINDS:
        _, (kv, z) = attn(kind)(q, k, v, output_final_state=True, chunk_size=8)
        phi = fmap(kind)(k, 0.5)
        assert rel(kv, torch.einsum("bthf,bthv->bhfv", phi, v)) < 1e-12
        assert rel(z, phi.sum(1)) < 1e-12
        o, s = attn(kind)(q, k, v)
        assert s is None


def test_default_mode_decoding_and_chunk():
    q, k, v = make_qkv(1, 1, 2, 4, 3)
    o, _ = kernels.rebased_attention(q, k, v)
    o_r, _ = kernels.rebased_attention(q, k, v, mode="recurrent")
    assert torch.equal(o, o_r)


# ------------------------------------------------------------------ documents (cu_seqlens)

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_init", [False, True])
def test_cu_seqlens_equals_separate_documents(kind, mode, with_init):
    lengths = [5, 17, 1, 30]
    h, dk, dv = 2, 4, 3
    t = sum(lengths)
    q, k, v = make_qkv(1, t, h, dk, dv, grad=True)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    init = make_state(kind, len(lengths), h, dk, dv) if with_init else None
    eps = 1e-3  # the length-1 document makes dq ~ eps (cancellation noise) with tiny eps; see above
    o, st = attn(kind)(q, k, v, cu_seqlens=cu, initial_state=init, output_final_state=True, mode=mode,
                       chunk_size=8, eps=eps)
    assert o.shape == (1, t, h, dv) and st[0].shape[0] == len(lengths) and st[1].shape[0] == len(lengths)
    go = torch.randn_like(o)
    grads = torch.autograd.grad((o * go).sum(), [q, k, v])
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = slice(a, b)
        init_n = (init[0][n:n + 1], init[1][n:n + 1]) if with_init else None
        on, sn = attn(kind)(q[:, sl], k[:, sl], v[:, sl], initial_state=init_n, output_final_state=True,
                            mode="quadratic", eps=eps)
        assert rel(o[:, sl], on) < 1e-10
        assert rel(st[0][n:n + 1], sn[0]) < 1e-10 and rel(st[1][n:n + 1], sn[1]) < 1e-10
        gn = torch.autograd.grad((on * go[:, sl]).sum(), [q, k, v])
        for g, g_sep in zip(grads, gn):
            assert rel(g[:, sl], g_sep[:, sl]) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_cu_seqlens_with_eps_zero_keeps_gradients_finite(kind, mode):
    """Documents of unequal length are padded to the longest: the padding rows have a zero normaliser, and with
    eps = 0 their 0 / 0 reached the real tokens' gradients as NaN (the forward dropped the rows)."""
    q, k, v = make_qkv(1, 8, 2, 4, 3, grad=True)
    cu = torch.tensor([0, 3, 8])
    o, _ = attn(kind)(q, k, v, cu_seqlens=cu, eps=0.0, mode=mode)
    grads = torch.autograd.grad(o.sum(), [q, k, v])
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    for a, b in ((0, 3), (3, 8)):
        on, _ = attn(kind)(q[:, a:b], k[:, a:b], v[:, a:b], eps=0.0, mode="quadratic")
        assert rel(o[:, a:b], on) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_cu_seqlens_empty_document_and_int64(mode):
    q, k, v = make_qkv(1, 6, 1, 4, 3)
    cu = torch.tensor([0, 2, 2, 6], dtype=torch.int64)
    init = make_state("based", 3, 1, 4, 3)
    o, st = kernels.based_attention(q, k, v, cu_seqlens=cu, initial_state=init, output_final_state=True, mode=mode)
    assert torch.equal(st[0][1], init[0][1]) and torch.equal(st[1][1], init[1][1])
    o2, _ = kernels.based_attention(q[:, 2:], k[:, 2:], v[:, 2:], initial_state=(init[0][2:], init[1][2:]),
                                    mode="quadratic")
    assert rel(o[:, 2:], o2) < 1e-10


# ------------------------------------------------------------------ continuation with initial_state

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [1, 37, 64])
@pytest.mark.parametrize("mode", ["chunk", "quadratic", "recurrent"])
def test_continuation_from_prefix_state(kind, split, mode):
    q, k, v = make_qkv(2, 100, 2, 4, 3)
    full, s_full = attn(kind)(q, k, v, mode="quadratic", output_final_state=True)
    _, s_pre = attn(kind)(q[:, :split], k[:, :split], v[:, :split], mode=mode, chunk_size=16,
                          output_final_state=True)
    rest, s_rest = attn(kind)(q[:, split:], k[:, split:], v[:, split:], mode=mode, chunk_size=16,
                              initial_state=s_pre, output_final_state=True)
    assert rel(rest, full[:, split:]) < 1e-10
    assert rel(s_rest[0], s_full[0]) < 1e-10 and rel(s_rest[1], s_full[1]) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token_decoding(kind):
    q, k, v = make_qkv(2, 12, 2, 4, 3)
    full, _ = attn(kind)(q, k, v, mode="quadratic")
    _, state = attn(kind)(q[:, :8], k[:, :8], v[:, :8], output_final_state=True)
    for t in range(8, 12):
        o, state = attn(kind)(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], initial_state=state,
                              output_final_state=True)
        assert rel(o, full[:, t:t + 1]) < 1e-10


# ------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_inputs(kind, dtype, tol, mode):
    q, k, v = make_qkv(2, 40, 2, 16, 8, dtype=dtype)
    init = tuple(s.to(dtype) for s in make_state(kind, 2, 2, 16, 8))
    o, st = attn(kind)(q, k, v, mode=mode, chunk_size=16, initial_state=init, output_final_state=True)
    assert o.dtype == dtype and st[0].dtype == torch.float32 and st[1].dtype == torch.float32
    ref, sref = attn(kind)(q.double(), k.double(), v.double(), mode="quadratic", output_final_state=True,
                           initial_state=tuple(s.double() for s in init))
    assert rel(o.double(), ref) < tol
    assert rel(st[0].double(), sref[0]) < 1e-5


def test_float64_state_for_float64_inputs():
    q, k, v = make_qkv(1, 5, 1, 4, 3)
    _, st = kernels.rebased_attention(q, k, v, output_final_state=True)
    assert st[0].dtype == F64 and st[1].dtype == F64


# ------------------------------------------------------------------ validation

def test_input_validation_errors():
    q, k, v = make_qkv(2, 8, 2, 4, 3)
    fn = kernels.rebased_attention
    with pytest.raises(ValueError, match="q and k"):
        fn(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v must"):
        fn(q, k, v[:, :7])
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        fn(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="dtype"):
        fn(q, k, v.float())
    with pytest.raises(ValueError, match="batch size 1"):
        fn(q, k, v, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    q1, k1, v1 = q[:1], k[:1], v[:1]
    with pytest.raises(ValueError, match="end at"):
        fn(q1, k1, v1, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32 or int64"):
        fn(q1, k1, v1, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        fn(q1, k1, v1, cu_seqlens=torch.tensor([0, 6, 3, 8]))
    with pytest.raises(ValueError, match="initial_state"):
        fn(q, k, v, initial_state=kernels.zero_state("based", 2, 2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="initial_state"):
        fn(q1, k1, v1, cu_seqlens=torch.tensor([0, 3, 8]),
           initial_state=kernels.zero_state("rebased", 1, 2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="mode"):
        fn(q, k, v, mode="fused")
    with pytest.raises(ValueError, match="chunk_size"):
        fn(q, k, v, chunk_size=0)
    # numbers that would make every output NaN, and a truthy non-bool that silently normalised
    for kwargs, message in (({"scale": math.nan}, "scale must be a finite"), ({"scale": math.inf}, "scale must"),
                            ({"eps": math.nan}, "eps must be a finite"), ({"eps": -1e-6}, "eps must"),
                            ({"scale": True}, "scale must be a finite"), ({"eps": False}, "eps must be a finite"),
                            ({"normalize": "no"}, "normalize must be a bool")):
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=message):
                fn(q, k, v, backend=backend, **kwargs)


# ------------------------------------------------------------------ backend selection

@pytest.fixture
def no_triton_registered():
    saved = {op: kbackend.unregister_triton_impl(op) for op in kbackend.KNOWN_OPS}
    yield
    for op, fn in saved.items():
        kbackend.unregister_triton_impl(op)
        if fn is not None:
            kbackend.register_triton_impl(op, fn)


def test_explicit_triton_without_impl_raises(no_triton_registered):
    q, k, v = make_qkv(1, 4, 1, 4, 3)
    for fn in (kernels.rebased_attention, kernels.based_attention):
        with pytest.raises(kernels.BackendUnavailableError, match="no Triton implementation"):
            fn(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="invalid backend"):
        kernels.rebased_attention(q, k, v, backend="cuda")


def test_env_var_backend(monkeypatch, no_triton_registered):
    q, k, v = make_qkv(1, 4, 1, 4, 3)
    monkeypatch.setenv(kbackend.BACKEND_ENV_VAR, "triton")
    with pytest.raises(kernels.BackendUnavailableError, match=kbackend.BACKEND_ENV_VAR):
        kernels.rebased_attention(q, k, v)
    # an explicit argument beats the environment
    kernels.rebased_attention(q, k, v, backend="torch")
    monkeypatch.setenv(kbackend.BACKEND_ENV_VAR, "torch")
    kernels.rebased_attention(q, k, v)
    monkeypatch.setenv(kbackend.BACKEND_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=kbackend.BACKEND_ENV_VAR):
        kernels.rebased_attention(q, k, v)


def test_registered_impl_dispatch(monkeypatch, no_triton_registered):
    calls = []

    def fake(q, k, v, **kw):
        calls.append(kw)
        return "sentinel", None

    kbackend.register_triton_impl("rebased_attention", fake)
    q, k, v = make_qkv(1, 4, 1, 4, 3)
    # auto on CPU -> torch even though an impl is registered
    o, _ = kernels.rebased_attention(q, k, v)
    assert torch.is_tensor(o) and not calls
    assert kbackend.resolve_backend("rebased_attention", None, torch.device("cuda")) == "triton"
    assert kbackend.resolve_backend("based_attention", None, torch.device("cuda")) == "torch"
    monkeypatch.setenv(kbackend.BACKEND_ENV_VAR, "torch")
    assert kbackend.resolve_backend("rebased_attention", None, torch.device("cuda")) == "torch"
    monkeypatch.delenv(kbackend.BACKEND_ENV_VAR)
    # Triton takes CUDA inputs, or CPU ones under its interpreter (which tests/conftest.py turns on without CUDA)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    o, _ = kernels.rebased_attention(q.to(dev), k.to(dev), v.to(dev), backend="triton", chunk_size=32)
    assert o == "sentinel"
    assert set(calls[0]) == {"scale", "eps", "normalize", "cu_seqlens", "initial_state", "output_final_state",
                             "mode", "chunk_size"}
    assert calls[0]["scale"] == 0.5 and calls[0]["chunk_size"] == 32
    with pytest.raises(ValueError):
        kbackend.register_triton_impl("not_an_op", fake)


@pytest.mark.parametrize("mode", ["quadratic", "chunk", "recurrent"])
def test_no_tokens_still_gives_a_graph_through_the_inputs(mode):
    """T = 0: every mode returns an output autograd can differentiate (empty gradients); the recurrent mode's was
    a fresh zeros tensor, so autograd.grad failed on it."""
    q = torch.randn(1, 0, 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 0, 2, 4, dtype=torch.float64, requires_grad=True)
    o, _ = kernels.rebased_attention(q, q, v, backend="torch", mode=mode)
    assert o.shape == (1, 0, 2, 4) and o.requires_grad
    dq, dv = torch.autograd.grad(o.sum(), (q, v))
    assert dq.shape == q.shape and dv.shape == v.shape


def test_triton_on_the_cpu_without_the_interpreter_is_named(monkeypatch):
    """Not Triton's '0 active drivers' from deep inside a launch: the device and the interpreter switch are named."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(kbackend.BackendUnavailableError, match="inputs on cpu: .*TRITON_INTERPRET=1"):
        kbackend.resolve_backend("rebased_attention", "triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kbackend.resolve_backend("rebased_attention", "triton", torch.device("cpu")) == "triton"
