"""The host path of one chunked (Re)Based attention call without its kernels: the wrapper, the custom ops, autograd,
the buffer allocations and the launch arguments, with every Triton launch replaced by a no-op.

This is the part of a call's host cost that is ours (the rest is Triton's launcher and the driver, measured on a GPU
by ``kernels_speed.py``'s host column), so it runs anywhere, on CPU tensors:

    python -m benchmarks.host_path [--tokens 32768] [--seq-len 2048] [--heads 16] [--dv 64] [--out DIR]

Prints microseconds per forward and per forward+backward call (best of 5 repeats) and writes
``host_path_<cpu>_<date>.{json,md}`` under ``--out`` (default: no file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import platform
import sys
import time

import torch

from benchmarks.results_io import save_results

KERNELS = ("_state_kernel", "_scan_kernel", "_h_kernel", "_out_kernel", "_grad_kernel")


class _NoLaunch:
    """Stands for a @triton.jit kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


@contextlib.contextmanager
def launches_stubbed():
    """Replace the chunked kernels' launches with no-ops for the duration (the outputs are left unwritten)."""
    from kernels.linear_attention.triton_chunk import launch

    saved = {name: getattr(launch, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(launch, name, _NoLaunch())
        yield
    finally:
        for name, kernel in saved.items():
            setattr(launch, name, kernel)


def per_call_us(fn, calls: int, repeats: int = 5) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def measure(kind: str, batch: int, seq_len: int, heads: int, dv: int, calls: int) -> dict:
    from kernels.linear_attention.triton_chunk import chunk_linear_attention

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch, seq_len, heads, 16, dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    v = torch.randn(batch, seq_len, heads, dv, dtype=torch.bfloat16, generator=g).requires_grad_()
    do = torch.randn(batch, seq_len, heads, dv, dtype=torch.bfloat16, generator=g)

    def forward():
        with torch.no_grad():
            chunk_linear_attention(kind, q, k, v, scale=0.25)

    def forward_backward():
        o = chunk_linear_attention(kind, q, k, v, scale=0.25)[0]
        torch.autograd.grad(o, (q, k, v), do)

    with launches_stubbed():
        return {"kind": kind, "fwd_us": per_call_us(forward, calls), "fwd_bwd_us": per_call_us(forward_backward, calls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=None, help="write host_path_<cpu>_<date>.{json,md} here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the host path is single-threaded Python; other threads only add noise
    batch = max(1, args.tokens // args.seq_len)
    rows = [measure(kind, batch, args.seq_len, args.heads, args.dv, args.calls) for kind in ("rebased", "based")]
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {"cpu": cpu, "date_utc": now.isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
            "torch": torch.__version__, "batch": batch, "seq_len": args.seq_len, "heads": args.heads, "dv": args.dv}
    lines = [f"# Host path of a chunked attention call, launches stubbed: {cpu}, {meta['date_utc']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}; B = {batch}, T = {args.seq_len}, H = "
             f"{args.heads}, Dk = 16, Dv = {args.dv}, bf16 CPU tensors; microseconds per call, best of 5 repeats of "
             f"{args.calls} calls, every Triton launch a no-op.", "",
             "| kind | forward µs | forward+backward µs |", "|---|---|---|"]
    lines += [f"| {r['kind']} | {r['fwd_us']:.1f} | {r['fwd_bwd_us']:.1f} |" for r in rows]
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        save_results(args.out, "host_path", cpu, now.strftime("%Y-%m-%d"), {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
    main()
