"""benchmarks/host_path.py: the stubbed launches stand for every kernel the chunked attention and the short conv
launch (a renamed kernel would otherwise run for real and be timed), the real kernels are back afterwards, and both
call paths (the eager shortcut, the custom op) are timed."""

import pytest

pytest.importorskip("triton")

from benchmarks import host_path  # noqa: E402
from kernels.linear_attention.triton_chunk import jit, launch  # noqa: E402
from kernels.short_conv import triton_ops as short_conv_ops  # noqa: E402


def _launched(module, source=None):
    """The module's @triton.jit kernels (its jit helpers are inlined, never launched: named *_kernel or not)."""
    source = source or module
    return {name for name in vars(module) if name.startswith("_") and name.endswith("_kernel")
            and hasattr(getattr(source, name, None), "run")}


def test_stub_covers_every_launched_kernel_and_is_undone():
    assert _launched(launch, jit) == set(host_path.KERNELS)
    assert _launched(short_conv_ops) == set(host_path.SHORT_CONV_KERNELS)
    stubbed = [(launch, host_path.KERNELS), (short_conv_ops, host_path.SHORT_CONV_KERNELS)]
    real = [{name: getattr(module, name) for name in names} for module, names in stubbed]
    with host_path.launches_stubbed():
        for module, names in stubbed:
            assert all(isinstance(getattr(module, name), host_path._NoLaunch) for name in names)
    assert [{name: getattr(module, name) for name in names} for module, names in stubbed] == real


def test_measure_times_both_paths():
    for row in (host_path.measure("based", batch=1, seq_len=40, heads=2, dv=8, calls=2),
                host_path.measure_short_conv(batch=1, seq_len=40, width=16, calls=2)):
        assert all(row[f"{part}_us_{path}"] > 0 for part in ("fwd", "fwd_bwd") for path in ("eager", "dispatcher"))


def test_grid_arithmetic_matches_triton():
    """kernels.common's cdiv / next_power_of_2 size the launch grids in place of Triton's wrapped versions."""
    import triton

    from kernels.common import cdiv, next_power_of_2

    for n in range(0, 4200):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        assert all(cdiv(n, b) == triton.cdiv(n, b) for b in (1, 7, 16, 64, 256))
    assert next_power_of_2(2**40 + 1) == triton.next_power_of_2(2**40 + 1) == 2**41
