"""The host path of one chunked (Re)Based attention call and one short-conv call without their kernels: the
wrapper, autograd, the buffer allocations and the launch arguments, with every Triton launch replaced by a no-op.

This is the part of a call's host cost that is ours (the rest is Triton's launcher and the driver, measured on a GPU
by ``kernels_speed.py``'s host column), so it runs anywhere, on CPU tensors:

    python -m benchmarks.host_path [--tokens 32768] [--seq-len 2048] [--heads 16] [--dv 64] [--width 1024] [--out DIR]

Each call is timed two ways side by side: as an eager call runs (the shortcut of ``kernels/eager_op.py``) and
through the custom op's dispatcher (what torch.compile, selective checkpointing and dispatch modes see; every call
took that path before the shortcut). Prints microseconds per forward and per forward+backward call (best of 5
repeats) and writes ``host_path_<cpu>_<date>.{json,md}`` under ``--out`` (default: no file).
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
SHORT_CONV_TOKENS = 128
SHORT_CONV_KERNELS = ("_fwd_kernel", "_final_cache_kernel", "_bwd_kernel", "_cache_grad_kernel", "_step_kernel")


class _NoLaunch:
    """Stands for a @triton.jit kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


@contextlib.contextmanager
def _patched(replacements):
    """Set module attributes for the duration: replacements = [(module, name, value)]."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in replacements]
    try:
        for module, name, value in replacements:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def launches_stubbed():
    """Replace the chunked attention's and the short conv's kernel launches with no-ops for the duration (the
    outputs are left unwritten)."""
    from kernels.linear_attention.triton_chunk import launch
    from kernels.short_conv import triton_ops as short_conv_ops

    with _patched([(launch, name, _NoLaunch()) for name in KERNELS]
                  + [(short_conv_ops, name, _NoLaunch()) for name in SHORT_CONV_KERNELS]):
        yield


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


def _timed(forward, forward_backward, calls: int) -> dict:
    from kernels.eager_op import through_dispatcher

    row = {}
    with launches_stubbed():
        for path, context in (("eager", contextlib.nullcontext), ("dispatcher", through_dispatcher)):
            with context():
                row[f"fwd_us_{path}"] = per_call_us(forward, calls)
                row[f"fwd_bwd_us_{path}"] = per_call_us(forward_backward, calls)
    return row


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

    return {"kind": kind, **_timed(forward, forward_backward, calls)}


def measure_short_conv(batch: int, seq_len: int, width: int, calls: int) -> dict:
    """The short conv as the hybrid blocks call it: kernel 4, bias, gate and residual fused. Keep the shape small:
    the backward's reductions of per-program partial sums (one launch each on a GPU) are real work on CPU tensors."""
    from kernels.short_conv.triton_ops import short_conv_triton

    g = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(batch, seq_len, width, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(2))
    weight = torch.randn(width, 4, dtype=torch.bfloat16, generator=g).requires_grad_()
    bias = torch.zeros(width, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(batch, seq_len, width, dtype=torch.bfloat16, generator=g)

    def forward():
        with torch.no_grad():
            short_conv_triton(x, weight, bias, gate=gate, residual=True)

    def forward_backward():
        y = short_conv_triton(x, weight, bias, gate=gate, residual=True)[0]
        torch.autograd.grad(y, (x, weight, bias, gate), dy)

    return {"kind": "short_conv", **_timed(forward, forward_backward, calls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--width", type=int, default=1024, help="the short conv's channels (the 360M hybrid's)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=None, help="write host_path_<cpu>_<date>.{json,md} here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the host path is single-threaded Python; other threads only add noise
    batch = max(1, args.tokens // args.seq_len)
    rows = [measure(kind, batch, args.seq_len, args.heads, args.dv, args.calls) for kind in ("rebased", "based")]
    rows.append(measure_short_conv(1, SHORT_CONV_TOKENS, args.width, args.calls))
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {"cpu": cpu, "date_utc": now.isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
            "torch": torch.__version__, "batch": batch, "seq_len": args.seq_len, "heads": args.heads, "dv": args.dv,
            "width": args.width}
    lines = [f"# Host path of the attention and short-conv calls, launches stubbed: {cpu}, {meta['date_utc']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}; B = {batch}, T = {args.seq_len}; attention: H = "
             f"{args.heads}, Dk = 16, Dv = {args.dv}; short conv: B = 1, T = {SHORT_CONV_TOKENS} (on CPU tensors its "
             f"backward's partial-sum reductions would be timed as work, not host cost), D = {args.width}, K = 4, "
             f"bias, gate and residual; bf16 CPU tensors; microseconds per call, best of 5 repeats of {args.calls} "
             "calls, every Triton launch a no-op. *eager*: the call as eager code makes it (`kernels/eager_op.py`'s "
             "shortcut); *dispatcher*: through the custom op, as under torch.compile or a dispatch mode.", "",
             "| kernel | forward µs, eager | forward µs, dispatcher | forward+backward µs, eager "
             "| forward+backward µs, dispatcher | forward+backward, eager / dispatcher |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['fwd_us_eager']:.1f} | {r['fwd_us_dispatcher']:.1f} | {r['fwd_bwd_us_eager']:.1f} "
              f"| {r['fwd_bwd_us_dispatcher']:.1f} | {r['fwd_bwd_us_eager'] / r['fwd_bwd_us_dispatcher']:.2f} |"
              for r in rows]
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        save_results(args.out, "host_path", cpu, now.strftime("%Y-%m-%d"), {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
    main()
