"""The sequential walk of the Triton (Re)Based attention (``triton_chunk/sequential.py``) vs the float64 torch
reference: forward and all gradients, T not a multiple of the chunk, value heads of 1 to 16, with and without the
normaliser; which calls take it; torch.compile and checkpointing through its custom ops.

Runs on CUDA when available (the MQAR shapes added), else through the Triton interpreter (tests/conftest.py).
Outputs are poisoned with NaN before the kernels run, so an element a kernel fails to write fails the test.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.eager_op import through_dispatcher  # noqa: E402
from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH, ChunkLaunchConfig  # noqa: E402
from kernels.linear_attention.triton_chunk import sequential  # noqa: E402
from triton_checks import poisoned_run, rel  # noqa: E402

_HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if _HAS_CUDA else "cpu"
F64 = torch.float64
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2 if _HAS_CUDA else 2e-2}  # as test_triton_attention.py
KINDS = ("rebased", "based")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    with poisoned_run(monkeypatch, CHUNK_LAUNCH, sequential=True):
        yield


@pytest.fixture
def launches(monkeypatch):
    """Counts of the walk's forward and backward launches."""
    counts = {"fwd": 0, "bwd": 0}
    fwd, bwd = sequential._seq_fwd_impl, sequential._seq_bwd_impl

    def counted_fwd(*args):
        counts["fwd"] += 1
        return fwd(*args)

    def counted_bwd(*args):
        counts["bwd"] += 1
        return bwd(*args)

    monkeypatch.setattr(sequential, "_seq_fwd_impl", counted_fwd)
    monkeypatch.setattr(sequential, "_seq_bwd_impl", counted_bwd)
    return counts


def attn(kind):
    return kernels.rebased_attention if kind == "rebased" else kernels.based_attention


def inputs(b, t, h, dv, dtype, dk=16):
    return [torch.randn(b, t, h, d, device=DEV).to(dtype) for d in (dk, dk, dv)]


def errors(kind, leaves, normalize=True, eps=1e-6):
    """Relative errors of o, dq, dk, dv (triton backend, the launch configuration in force) against float64."""
    ours = [x.clone().requires_grad_(True) for x in leaves]
    ref = [x.detach().to(F64).requires_grad_(True) for x in leaves]
    o, _ = attn(kind)(*ours, backend="triton", normalize=normalize, eps=eps)
    o_ref, _ = attn(kind)(*ref, backend="torch", mode="quadratic", normalize=normalize, eps=eps)
    assert o.dtype == leaves[0].dtype and o.shape == o_ref.shape
    w = torch.randn_like(o_ref)
    grads = torch.autograd.grad((o.double() * w).sum(), ours)
    grads_ref = torch.autograd.grad((o_ref * w).sum(), ref)
    out = {"o": rel(o, o_ref)}
    for name, g, gr, x in zip(("dq", "dk", "dv"), grads, grads_ref, leaves):
        assert g.dtype == x.dtype and g.shape == x.shape
        out[name] = rel(g, gr)
    return out


CPU_CASES = [
    # b, t, h, dv, dtype, normalize, chunk
    (2, 37, 2, 5, torch.float32, True, 16),     # three chunks, the last partial
    (1, 45, 3, 10, torch.float32, False, 16),   # no normaliser
    (2, 70, 1, 16, torch.bfloat16, True, 32),   # the widest value head the walk takes
    (1, 20, 2, 1, torch.float32, True, 32),     # one partial chunk, one value column
    (3, 33, 2, 10, torch.bfloat16, True, 16),
    (1, 64, 2, 7, torch.float32, True, 64),     # exactly one chunk
]
GPU_CASES = [
    # the MQAR models' shapes: 12 heads, value heads of floor(d_model / 12) = 5 and 10
    (4, 2048, 12, 10, torch.bfloat16, True, 64),
    (2, 1000, 12, 5, torch.float32, True, 64),
    (3, 777, 12, 16, torch.bfloat16, True, 32),
    (2, 300, 4, 10, torch.float32, False, 128),
]
CASES = CPU_CASES + (GPU_CASES if _HAS_CUDA else [])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}t{c[1]}h{c[2]}v{c[3]}-{str(c[4])[6:]}-n{int(c[5])}"
                                                      f"-c{c[6]}")
def test_against_float64_reference(kind, case, launches):
    b, t, h, dv, dtype, normalize, chunk = case
    CHUNK_LAUNCH.update(sequential_chunk=chunk)
    errs = errors(kind, inputs(b, t, h, dv, dtype), normalize=normalize)
    assert launches == {"fwd": 1, "bwd": 1}
    tol = TOL[dtype]
    assert all(e <= tol for e in errs.values()), f"relative errors over {tol}: {errs}"


@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_chunk_parallel_kernels(kind):
    """The two Triton paths compute the same function: fp32 results agree far inside the float64 tolerance."""
    q, k, v = inputs(2, 50, 2, 10, torch.float32)
    outs = []
    for walk in (True, False):
        with CHUNK_LAUNCH.override(sequential=walk):
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            o, _ = attn(kind)(*leaves, backend="triton", chunk_size=16)
            outs.append([o, *torch.autograd.grad(o.square().sum(), leaves)])
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_large_eps_and_warps(kind):
    """eps enters the division and the gradient through h; 8 warps per program is the same computation."""
    CHUNK_LAUNCH.update(warps_sequential=8, sequential_chunk=16)
    errs = errors(kind, inputs(1, 40, 2, 10, torch.float32), eps=0.5)
    assert all(e <= 1e-4 for e in errs.values()), errs


def test_which_calls_take_the_walk(launches):
    q, k, v = inputs(2, 20, 2, 10, torch.float32)
    run = lambda *args, **kw: kernels.rebased_attention(*args, backend="triton", **kw)  # noqa: E731
    run(q, k, v)
    assert launches["fwd"] == 1
    # not covered: the chunk-parallel kernels take these
    run(q, k, torch.randn(2, 20, 2, 17, device=DEV))                         # value heads over 16
    run(q, k, v, output_final_state=True)                                     # a final state
    state = kernels.zero_state("rebased", 2, 2, 16, 10, device=DEV)
    run(q, k, v, initial_state=state)                                         # an initial state
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=DEV)
    run(*inputs(1, 40, 2, 10, torch.float32), cu_seqlens=cu)                 # documents
    run(q.half(), k.half(), v.half())                                         # fp16 (runs in fp32 there)
    assert launches["fwd"] == 1
    with CHUNK_LAUNCH.override(sequential=False):
        run(q, k, v)
    assert launches["fwd"] == 1


def test_auto_rule():
    q, k, v = inputs(64, 8, 12, 10, torch.bfloat16)
    assert ChunkLaunchConfig().sequential is False  # the default: the chunk-parallel kernels
    auto = ChunkLaunchConfig(sequential=None)
    if not _HAS_CUDA:  # the rule was measured on GPUs: off the GPU only an explicit True takes the walk
        assert not sequential.use_sequential(q, v, None, None, False, auto)
        return
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    assert sequential.use_sequential(q, v, None, None, False, auto) == (64 * 12 >= auto.sequential_per_sm * sms)
    assert not sequential.use_sequential(q[:1], v[:1], None, None, False, auto)  # 12 programs: too few
    assert not sequential.use_sequential(q.float(), v.float(), None, None, False, auto)  # the rule is for bf16
    assert sequential.use_sequential(q[:1], v[:1], None, None, False, auto.replace(sequential=True))


def test_knobs_are_validated():
    for bad in ({"sequential": "yes"}, {"sequential_chunk": 48}, {"warps_sequential": 3},
                {"sequential_per_sm": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ChunkLaunchConfig(**bad)


def test_compile_checkpoint_and_dispatcher(launches):
    """Gradients agree through the eager shortcut, the custom ops, checkpointing and torch.compile (fake impls)."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = (x.requires_grad_(True) for x in inputs(1, 40, 2, 10, torch.float32))

    def fn(q, k, v):
        return kernels.based_attention(q * 1.0, k, v, backend="triton")[0]

    w = torch.randn(1, 40, 2, 10, device=DEV)
    g0 = torch.autograd.grad((fn(q, k, v) * w).sum(), (q, k, v))
    with through_dispatcher():
        g1 = torch.autograd.grad((fn(q, k, v) * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((checkpoint(fn, q, k, v, use_reentrant=False) * w).sum(), (q, k, v))
    compiled = torch.compile(fn, backend="inductor" if _HAS_CUDA else "aot_eager", fullgraph=True)
    g3 = torch.autograd.grad((compiled(q, k, v) * w).sum(), (q, k, v))
    for a, b, c, d in zip(g0, g1, g2, g3):
        assert rel(b, a) == 0 and rel(c, a) < 1e-6 and rel(d, a) < 1e-5
    assert launches["fwd"] >= 4 and launches["bwd"] >= 4
