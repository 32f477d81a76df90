"""Triton ReBased / Based attention vs the float64 torch reference (forward, all gradients, states, varlen).

Runs on CUDA when available (real shapes added), else on the CPU through the Triton interpreter
(TRITON_INTERPRET=1, tiny shapes). Every output buffer of the Triton path is poisoned with NaN before the
kernels run (``kernels.poison.set_poison``), so an element a kernel fails to write fails the test.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels import backend as kbackend  # noqa: E402
from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH  # noqa: E402
from triton_checks import plausible_state, poisoned_run, rel  # noqa: E402

_HAS_CUDA = torch.cuda.is_available()  # without CUDA, tests/conftest.py has switched Triton to its interpreter
DEV = "cuda" if _HAS_CUDA else "cpu"
F64 = torch.float64
# Triton's interpreter rounds fp32 to bf16 by truncation (twice round-to-nearest's error), so bf16 gets twice the
# tolerance there; a logic error (a missed term, a wrong state) is off by far more than either
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2 if _HAS_CUDA else 2e-2}
KINDS = ("rebased", "based")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    with poisoned_run(monkeypatch, CHUNK_LAUNCH):
        yield


def attn(kind):
    return kernels.rebased_attention if kind == "rebased" else kernels.based_attention


def run_case(kind, b, t, h, dv, dtype, *, normalize=True, init=False, final=False, chunk=16, seg=None,
             cu_seqlens=None, dk=16):
    if seg is not None:
        CHUNK_LAUNCH.update(seg_tokens=seg)
    n = b if cu_seqlens is None else cu_seqlens.numel() - 1
    q = torch.randn(b, t, h, dk, device=DEV).to(dtype)
    k = torch.randn(b, t, h, dk, device=DEV).to(dtype)
    v = torch.randn(b, t, h, dv, device=DEV).to(dtype)
    leaves = [q, k, v]
    if init:
        leaves += list(plausible_state(kind, n, h, dk, dv, DEV))
    ours = [x.clone().requires_grad_(True) for x in leaves]
    ref = [x.detach().to(F64).requires_grad_(True) for x in leaves]
    kw = dict(normalize=normalize, cu_seqlens=cu_seqlens, output_final_state=final)
    o, st = attn(kind)(*ours[:3], initial_state=tuple(ours[3:]) if init else None, backend="triton",
                       chunk_size=chunk, **kw)
    o_ref, st_ref = attn(kind)(*ref[:3], initial_state=tuple(ref[3:]) if init else None, backend="torch",
                               mode="quadratic", **kw)
    assert o.dtype == dtype and o.shape == o_ref.shape
    tol = TOL[dtype]
    errs = {"o": rel(o, o_ref)}
    w_o = torch.randn_like(o_ref)
    loss, loss_ref = (o.double() * w_o).sum(), (o_ref * w_o).sum()
    if final:
        assert st is not None and st[0].dtype == torch.float32
        for name, a, r in (("kv", st[0], st_ref[0]), ("z", st[1], st_ref[1])):
            errs[name] = rel(a, r)
            w = torch.randn_like(r)
            loss, loss_ref = loss + (a.double() * w).sum(), loss_ref + (r * w).sum()
    grads = torch.autograd.grad(loss, ours)
    grads_ref = torch.autograd.grad(loss_ref, ref)
    for name, g, gr in zip(("dq", "dk", "dv", "dkv0", "dz0"), grads, grads_ref):
        assert g.dtype == leaves[("dq", "dk", "dv", "dkv0", "dz0").index(name)].dtype
        errs[name] = rel(g, gr)
    bad = {key: val for key, val in errs.items() if not val <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"
    return errs


CPU_CASES = [
    # b, t, h, dv, dtype, normalize, init, final, chunk, seg
    (2, 45, 2, 32, torch.float32, True, True, True, 16, None),
    (1, 70, 1, 64, torch.float32, False, False, True, 16, 32),
    (2, 37, 2, 32, torch.bfloat16, True, True, True, 16, 16),
    # segments of two chunks: a chunk's state is its segment's part plus the segment's start, added in bf16
    (2, 70, 2, 32, torch.bfloat16, True, True, True, 16, 32),
    (1, 50, 2, 64, torch.bfloat16, False, False, False, 32, None),
    # one segment per document, started from the given state (and reversed from the final state's gradient)
    (2, 40, 2, 32, torch.float32, True, True, True, 16, 64),
    # value heads narrower than a block, not a power of two (the MQAR models: floor(d_model / 12) = 5, 10, ...)
    (2, 37, 3, 5, torch.float32, True, True, True, 16, 16),
    (1, 45, 2, 10, torch.bfloat16, True, True, True, 16, None),
]
GPU_CASES = [
    (2, 2048, 4, 64, torch.bfloat16, True, False, False, 64, None),
    (2, 1000, 3, 128, torch.bfloat16, True, True, True, 64, 256),
    (1, 3000, 2, 32, torch.float32, True, True, True, 64, 512),
    (4, 777, 2, 64, torch.float32, False, True, True, 64, None),
    (1, 4096, 2, 128, torch.float32, True, False, True, 128, 1024),
    # the MQAR models' shapes: 12 heads, value heads of floor(d_model / 12) for d_model 64 .. 512. (In bf16 without
    # an initial state, ReBased's dq, dk at Dv 5 and 10 sit at 1.2-1.4e-2 of float64 on an H200, 2.6e-3 at Dv 64:
    # benchmarks/mqar_profile.py errors; the logic is checked in fp32 there.)
    (4, 2048, 12, 5, torch.float32, True, False, False, 64, None),
    (4, 1024, 12, 10, torch.bfloat16, True, True, True, 64, None),
    (2, 512, 12, 21, torch.float32, True, False, False, 64, None),
    (2, 700, 12, 42, torch.bfloat16, True, False, False, 64, None),
]
CASES = CPU_CASES + (GPU_CASES if _HAS_CUDA else [])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}t{c[1]}h{c[2]}v{c[3]}-{str(c[4])[6:]}-n{int(c[5])}"
                         f"i{int(c[6])}f{int(c[7])}-c{c[8]}s{c[9]}")
def test_against_float64_reference(kind, case):
    b, t, h, dv, dtype, normalize, init, final, chunk, seg = case
    run_case(kind, b, t, h, dv, dtype, normalize=normalize, init=init, final=final, chunk=chunk, seg=seg)


VARLEN = [
    # lengths, dv, dtype, chunk, seg
    ([5, 0, 40, 17, 1], 32, torch.float32, 16, 32),
    ([33, 16, 2], 64, torch.bfloat16, 16, None),
]
if _HAS_CUDA:
    VARLEN += [([1000, 3, 2500, 0, 64, 700], 64, torch.bfloat16, 64, 512),
               ([4000, 97, 129], 128, torch.float32, 64, 1024)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"docs{len(c[0])}-v{c[1]}-{str(c[2])[6:]}")
def test_varlen_documents(kind, case):
    lengths, dv, dtype, chunk, seg = case
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    run_case(kind, 1, sum(lengths), 2, dv, dtype, init=True, final=True, chunk=chunk, seg=seg, cu_seqlens=cu)


TUNINGS = [
    # the tile side of the symmetric second-order state (8 by default; 16: the full pair matrix, one block), Dv
    # blocks, warps; per-chunk states recomputed in the backward
    dict(tile=4, bv_state=16, bv_out=16, bv_grad=32, save_states=False, warps_state=4),
    dict(tile=16, bv_state=32, bv_out=32, bv_grad=16),
    # fp32 operands on the tensor cores in three TF32 products (the interpreter multiplies in fp32 regardless)
    dict(fp32_dot="tf32x3"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tuning", TUNINGS, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
def test_tuning_variants(kind, tuning):
    """The block shapes the tuner can pick are exact too."""
    CHUNK_LAUNCH.update(**tuning)
    run_case(kind, 2, 37, 2, 32, torch.float32, init=True, final=True, chunk=16, seg=16)


@pytest.mark.parametrize("kind", KINDS)
def test_chunks_of_128_across_chunks(kind):
    """Chunks of 128 (a launch knob above the default clamp of 64, spill-free with 8 x 8 tiles): three chunks, the
    last one partial, at an MQAR value-head width, with initial and final states."""
    CHUNK_LAUNCH.update(chunk=128, tile=8, warps_out=8, warps_grad=8, warps_state=4)
    run_case(kind, 1, 300, 2, 10, torch.bfloat16, init=True, final=True, chunk=128)


@pytest.mark.skipif(not _HAS_CUDA, reason="3xTF32 products need tensor cores (the interpreter uses fp32)")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dv", [5, 10, 64])
def test_fp32_dot_tf32x3_holds_fp32_tolerance(kind, dv):
    """fp32 through 3xTF32 stays within fp32's tolerance of float64 at the MQAR shapes (12 heads, T = 2048)."""
    CHUNK_LAUNCH.update(fp32_dot="tf32x3")
    run_case(kind, 4, 2048, 12, dv, torch.float32, init=dv == 10, final=dv == 10, chunk=64)


@pytest.mark.skipif(not _HAS_CUDA, reason="needs tensors of more than 2^31 elements (about 10 GB on the GPU)")
@pytest.mark.parametrize("kind", KINDS)
def test_offsets_past_two_to_the_31(kind):
    """A packed call whose v, o and per-chunk states pass 2^31 elements (a 64 x 64k-token prefill reached an
    illegal address through int32 offsets): the last document, placed past the 2^31st element of v, gives the same
    output, final state and gradients as that document alone."""
    h, dv, tail = 16, 64, 3000
    t = 2**31 // (h * dv) + 5000
    cu = torch.tensor([0, t - tail, t], device=DEV)
    q, k = (torch.randn(1, t, h, 16, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, t, h, dv, device=DEV, dtype=torch.bfloat16)
    big = [x.requires_grad_(True) for x in (q, k, v)]
    o, (kv, z) = attn(kind)(*big, backend="triton", cu_seqlens=cu, output_final_state=True)
    do = torch.randn_like(o[:, -tail:])
    grads = torch.autograd.grad(o[:, -tail:], big, do)
    small = [x.detach()[:, -tail:].clone().requires_grad_(True) for x in (q, k, v)]
    o_s, (kv_s, z_s) = attn(kind)(*small, backend="triton", output_final_state=True)
    grads_s = torch.autograd.grad(o_s, small, do)
    # the two calls may cut the document into different segments: equal up to bf16 rounding, not bitwise
    tol = TOL[torch.bfloat16]
    assert rel(o[:, -tail:], o_s) < tol and rel(kv[1], kv_s[0]) < tol and rel(z[1], z_s[0]) < tol
    for g, g_s in zip(grads, grads_s):
        assert rel(g[:, -tail:], g_s) < tol and not g[:, :-tail].any()


def test_fp32_dot_choices():
    with pytest.raises(ValueError, match="fp32_dot"):
        CHUNK_LAUNCH.get().replace(fp32_dot="tf32")


@pytest.mark.parametrize("kind", KINDS)
def test_continuation_matches_single_call(kind):
    """Splitting a sequence in two calls with the returned state equals one call (fp32)."""
    CHUNK_LAUNCH.update(seg_tokens=16)
    q, k = torch.randn(2, 2, 40, 2, 16, device=DEV).unbind(0)
    v = torch.randn(2, 40, 2, 32, device=DEV)
    f = attn(kind)
    o, st = f(q, k, v, backend="triton", chunk_size=16, output_final_state=True)
    o1, st1 = f(q[:, :23], k[:, :23], v[:, :23], backend="triton", chunk_size=16, output_final_state=True)
    o2, st2 = f(q[:, 23:], k[:, 23:], v[:, 23:], backend="triton", chunk_size=16, initial_state=st1,
                output_final_state=True)
    assert rel(torch.cat([o1, o2], 1), o) < 1e-5
    assert rel(st2[0], st[0]) < 1e-5 and rel(st2[1], st[1]) < 1e-5


def test_activation_checkpointing_and_compile():
    """Gradients agree with and without checkpointing and under torch.compile (custom op + fake impl)."""
    from torch.utils.checkpoint import checkpoint

    q = torch.randn(1, 40, 2, 16, device=DEV, requires_grad=True)
    k = torch.randn(1, 40, 2, 16, device=DEV, requires_grad=True)
    v = torch.randn(1, 40, 2, 32, device=DEV, requires_grad=True)

    def fn(q, k, v):
        return kernels.rebased_attention(q * 1.0, k, v, backend="triton", chunk_size=16)[0]

    w = torch.randn(1, 40, 2, 32, device=DEV)
    g0 = torch.autograd.grad((fn(q, k, v) * w).sum(), (q, k, v))
    g1 = torch.autograd.grad((checkpoint(fn, q, k, v, use_reentrant=False) * w).sum(), (q, k, v))
    compiled = torch.compile(fn, backend="inductor" if _HAS_CUDA else "aot_eager", fullgraph=True)
    g2 = torch.autograd.grad((compiled(q, k, v) * w).sum(), (q, k, v))
    for a, b, c in zip(g0, g1, g2):
        assert rel(b, a) < 1e-6 and rel(c, a) < 1e-5


def test_registered_and_auto_backend():
    assert {"rebased_attention", "based_attention"} <= set(kernels.registered_triton_ops())
    if _HAS_CUDA:
        assert kbackend.resolve_backend("rebased_attention", None, torch.device("cuda")) == "triton"


def test_empty_sequence_and_fallback():
    q = torch.randn(1, 0, 2, 16, device=DEV)
    v = torch.randn(1, 0, 2, 32, device=DEV)
    o, st = kernels.rebased_attention(q, q, v, backend="triton", output_final_state=True)
    assert o.shape == (1, 0, 2, 32) and st[0].abs().sum() == 0
    # Dk != 16 is not covered by the kernels: falls back to the reference
    q8 = torch.randn(1, 5, 1, 8, device=DEV, dtype=F64)
    v8 = torch.randn(1, 5, 1, 16, device=DEV, dtype=F64)
    o8, _ = kernels.rebased_attention(q8, q8, v8, backend="triton")
    o8r, _ = kernels.rebased_attention(q8, q8, v8, backend="torch")
    assert rel(o8, o8r) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, 5, 2), (1, 5, 0), (0, 0, 0)])
def test_empty_batch_or_heads_match_the_reference(kind, shape):
    """No rows or no heads: the reference's empty output and zero (or initial) states, not a crash in the segment
    tables (max() of no segments) or the scan's shapes."""
    b, t, h = shape
    q = torch.randn(b, t, h, 16, device=DEV)
    v = torch.randn(b, t, h, 4, device=DEV)
    o, st = attn(kind)(q, q, v, backend="triton", output_final_state=True)
    o_ref, st_ref = attn(kind)(q, q, v, backend="torch", output_final_state=True)
    assert o.shape == o_ref.shape and st[0].shape == st_ref[0].shape and st[1].shape == st_ref[1].shape


def test_non_contiguous_inputs():
    """[B, H, T, D] tensors viewed as [B, T, H, D] (strided): same output and gradients as the reference."""
    q, k = (torch.randn(2, 2, 37, 16, device=DEV).transpose(1, 2).requires_grad_() for _ in range(2))
    v = torch.randn(2, 2, 37, 32, device=DEV).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    w = torch.randn(2, 37, 2, 32, device=DEV, dtype=F64)
    o = kernels.rebased_attention(q, k, v, backend="triton", chunk_size=16)[0]
    ref = [x.detach().to(F64).requires_grad_() for x in (q, k, v)]
    o_ref = kernels.rebased_attention(*ref, backend="torch", mode="quadratic")[0]
    grads = torch.autograd.grad((o.double() * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((o_ref * w).sum(), ref)
    assert rel(o, o_ref) < 1e-4
    for g, gr in zip(grads, grads_ref):
        assert g.shape == gr.shape and rel(g, gr) < 1e-4



@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("only", ["kv", "z"])
@pytest.mark.parametrize("init", [False, True])
def test_a_gradient_through_one_part_of_the_final_state(kind, only, init):
    """A loss on the final kv alone (or z alone): the missing part's zero gradient must have its own row count (the
    normaliser has FZ rows, the state FT: equal only at tile 16). It was shaped from the other part, and the reverse
    scan read past it: dk off by 1e35 in fp32, inf in fp16, NaN in dz0."""
    b, t, h, dv = 1, 20, 2, 10  # fp32: tile 8, so FT != FZ
    leaves = [torch.randn(b, t, h, 16, device=DEV), torch.randn(b, t, h, 16, device=DEV),
              torch.randn(b, t, h, dv, device=DEV)]
    if init:
        leaves += list(plausible_state(kind, b, h, 16, dv, DEV))
    w = None
    grads = []
    for backend, dtype in (("torch", F64), ("triton", torch.float32)):
        xs = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
        _, (kv, z) = attn(kind)(*xs[:3], initial_state=tuple(xs[3:]) if init else None, backend=backend,
                                chunk_size=16, output_final_state=True)
        target = kv if only == "kv" else z
        w = torch.randn(target.shape, dtype=F64, device=DEV) if w is None else w
        got = torch.autograd.grad((target.double() * w).sum(), xs, allow_unused=True)  # the state ignores q
        grads.append([torch.zeros_like(x) if g is None else g for x, g in zip(xs, got)])
    for name, ref, ours in zip(("dq", "dk", "dv", "dkv0", "dz0"), *grads):
        assert torch.isfinite(ours).all(), name
        if ref.abs().max() == 0:
            assert ours.abs().max() == 0, name  # e.g. dz0 of a loss on kv alone
        else:
            assert rel(ours, ref) < TOL[torch.float32], (name, rel(ours, ref))
