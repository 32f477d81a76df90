"""The fused one-token decoding step (kernels.linear_attention_step) vs the float64 recurrent reference.

Runs on CUDA when available, else on the CPU through the Triton interpreter (tests/conftest.py). The output is
poisoned with NaN before the kernel runs (``kernels.poison.set_poison``), so an element it fails to write fails.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.linear_attention import linear_attention_reference  # noqa: E402
from kernels.linear_attention import triton_recurrent as tr  # noqa: E402
from triton_checks import plausible_state, poisoned_run, rel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
STATE_TOL = 1e-5  # the state is fp32 whatever the input dtype
KINDS = ("rebased", "based")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    with poisoned_run(monkeypatch):
        yield


def token(b, h, dv, dtype, dk=16):
    q, k = torch.randn(2, b, 1, h, dk, device=DEV).to(dtype).unbind(0)
    return q, k, torch.randn(b, 1, h, dv, device=DEV).to(dtype)


CASES = [
    # b, h, dv, dtype, normalize
    (1, 1, 32, torch.float32, True),
    (3, 2, 64, torch.float32, False),
    (2, 3, 128, torch.float32, True),
    (2, 2, 32, torch.bfloat16, False),
    (1, 2, 128, torch.bfloat16, True),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}v{c[2]}-{str(c[3])[6:]}-n{int(c[4])}")
def test_step_matches_float64_reference(kind, case):
    b, h, dv, dtype, normalize = case
    q, k, v = token(b, h, dv, dtype)
    state = plausible_state(kind, b, h, 16, dv, DEV)
    o_ref, (kv_ref, z_ref) = linear_attention_reference(
        kind, q.to(F64), k.to(F64), v.to(F64), normalize=normalize, initial_state=tuple(s.to(F64) for s in state),
        output_final_state=True, mode="recurrent")
    kv, z = state
    kv_ptr, z_ptr = kv.data_ptr(), z.data_ptr()
    o = kernels.linear_attention_step(kind, q, k, v, state, normalize=normalize, backend="triton")
    assert o.dtype == dtype and o.shape == (b, 1, h, dv)
    assert state[0] is kv and state[1] is z and kv.data_ptr() == kv_ptr and z.data_ptr() == z_ptr
    errs = {"o": rel(o, o_ref), "kv": rel(kv, kv_ref), "z": rel(z, z_ref)}
    assert errs["o"] <= TOL[dtype] and errs["kv"] <= STATE_TOL and errs["z"] <= STATE_TOL, errs


@pytest.mark.parametrize("kind", KINDS)
def test_steps_equal_one_chunked_call(kind):
    """N steps from a given state: the outputs and the state equal one chunked reference call over the N tokens."""
    b, h, dv, n = 2, 2, 32, 5
    q, k = torch.randn(2, b, n, h, 16, device=DEV).unbind(0)
    v = torch.randn(b, n, h, dv, device=DEV)
    state = plausible_state(kind, b, h, 16, dv, DEV)
    o_ref, (kv_ref, z_ref) = linear_attention_reference(
        kind, q.to(F64), k.to(F64), v.to(F64), initial_state=tuple(s.to(F64) for s in state),
        output_final_state=True, mode="chunk", chunk_size=2)
    outputs = [kernels.linear_attention_step(kind, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state,
                                             backend="triton") for t in range(n)]
    assert rel(torch.cat(outputs, 1), o_ref) <= 1e-4
    assert rel(state[0], kv_ref) <= STATE_TOL and rel(state[1], z_ref) <= STATE_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_torch_backend_updates_in_place_like_the_functional_call(kind):
    q, k, v = token(2, 3, 24, torch.float32, dk=8)
    state = plausible_state(kind, 2, 3, 8, 24, DEV)
    attention = kernels.rebased_attention if kind == "rebased" else kernels.based_attention
    o_ref, (kv_ref, z_ref) = attention(q, k, v, initial_state=state, output_final_state=True, backend="torch")
    kv, z = state
    o = kernels.linear_attention_step(kind, q, k, v, state, backend="torch")
    assert state[0] is kv and state[1] is z
    assert torch.equal(o, o_ref) and torch.equal(kv, kv_ref) and torch.equal(z, z_ref)


def test_small_feature_dim_and_float64_fallback():
    """Dk = 8 (the tests' tiny models) runs the kernel; float64 inputs take the torch step on backend="triton"."""
    q, k, v = token(2, 2, 16, torch.float32, dk=8)
    state = plausible_state("based", 2, 2, 8, 16, DEV)
    expected = tuple(s.clone() for s in state)
    o_ref = kernels.linear_attention_step("based", q, k, v, expected, scale=0.3, backend="torch")
    o = kernels.linear_attention_step("based", q, k, v, state, scale=0.3, backend="triton")
    assert rel(o, o_ref) <= 1e-5 and rel(state[0], expected[0]) <= 1e-6 and rel(state[1], expected[1]) <= 1e-6
    q, k, v = (x.to(F64) for x in (q, k, v))
    state = tuple(s.to(F64) for s in state)
    expected = tuple(s.clone() for s in state)
    o = kernels.linear_attention_step("based", q, k, v, state, backend="triton")
    o_ref = kernels.linear_attention_step("based", q, k, v, expected, backend="torch")
    assert torch.equal(o, o_ref) and torch.equal(state[0], expected[0])


def test_invalid_inputs_raise_clear_errors():
    q, k, v = token(2, 2, 32, torch.float32)
    state = kernels.zero_state("rebased", 2, 2, 16, 32, device=DEV)
    step = kernels.linear_attention_step
    with pytest.raises(ValueError, match="one token"):
        step("rebased", q.repeat(1, 2, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), state)
    with pytest.raises(ValueError, match="needs a state"):
        step("rebased", q, k, v, None)
    with pytest.raises(ValueError, match="initial_state for based"):
        step("based", q, k, v, state)
    with pytest.raises(ValueError, match="must be torch.float32"):
        step("rebased", q, k, v, (state[0].double(), state[1].double()))
    with pytest.raises(ValueError, match="contiguous"):
        step("rebased", q, k, v, (state[0].transpose(0, 1).contiguous().transpose(0, 1), state[1]))
    with pytest.raises(ValueError, match="no backward"):
        step("rebased", q.requires_grad_(), k, v, state)
    with pytest.raises(ValueError, match="unknown attention kind"):
        step("linear", q.detach(), k, v, state)
