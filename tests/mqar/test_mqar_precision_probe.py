"""benchmarks/mqar_precision_probe.py: its emulation of the bf16 kernels must round (or it measures nothing) and stay
close to the exact attention (or it measures something else)."""

import torch

from benchmarks.mqar_precision_probe import _attention_as_bf16_kernel
from kernels import rebased_attention


def test_the_bf16_emulation_rounds_and_stays_near_the_exact_attention():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 150, 3, 16, generator=g) for _ in range(2))
    v = torch.randn(2, 150, 3, 10, generator=g)
    exact, _ = rebased_attention(q.double(), k.double(), v.double(), backend="torch", mode="chunk")
    fp32, _ = rebased_attention(q, k, v, backend="torch", mode="chunk")
    with _attention_as_bf16_kernel():
        emulated, _ = rebased_attention(q, k, v, backend="torch", mode="chunk")
    after, _ = rebased_attention(q, k, v, backend="torch", mode="chunk")

    def rel(x):
        return ((x.double() - exact).norm() / exact.norm()).item()

    assert rel(fp32) < 1e-5 and torch.equal(after, fp32)  # the exact form is back afterwards
    assert 1e-3 < rel(emulated) < 1e-2  # bf16 roundings, as the GPU kernels in bf16 (2.6e-3 at the MQAR shapes)
