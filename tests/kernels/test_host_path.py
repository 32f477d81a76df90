"""benchmarks/host_path.py: the stubbed launches stand for every kernel the chunked op launches (a renamed kernel
would otherwise run for real and be timed), and the real kernels are back afterwards."""

import pytest

pytest.importorskip("triton")

from benchmarks import host_path  # noqa: E402
from kernels.linear_attention.triton_chunk import jit, launch  # noqa: E402


def test_stub_covers_every_launched_kernel_and_is_undone():
    launched = {name for name in vars(launch) if name.startswith("_") and hasattr(getattr(jit, name, None), "run")}
    assert launched == set(host_path.KERNELS)
    real = {name: getattr(launch, name) for name in host_path.KERNELS}
    with host_path.launches_stubbed():
        assert all(isinstance(getattr(launch, name), host_path._NoLaunch) for name in host_path.KERNELS)
    assert {name: getattr(launch, name) for name in host_path.KERNELS} == real


def test_measure_runs_forward_and_backward():
    row = host_path.measure("based", batch=1, seq_len=40, heads=2, dv=8, calls=2)
    assert row["kind"] == "based" and 0 < row["fwd_us"] and 0 < row["fwd_bwd_us"]
