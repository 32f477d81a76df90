"""Speed of the Triton ReBased / Based / short-conv kernels vs SDPA flash attention (and FLA if importable).

One GPU run: forward and forward+backward times for T = 512 ... 65536 at 32768 tokens per call (B = 32768 // T,
at least 1), 16 heads, Dk 16, Dv 64, bf16; SDPA with head dim 64 (flash backend when available), causal.
Prints a table with ratios and writes benchmarks/results/kernels_speed_<device>_<date>.{json,md} (or --out DIR)
with the device, date, command, and the floor (FLOPs and bytes, see kernels/linear_attention/DESIGN.md, section 8).

    python -m benchmarks.kernels_speed [--quick] [--decode-only] [--out DIR]

Tuning variants of the attention kernels are compared by benchmarks/kernels_tune.py. Also timed: the host time of a
forward+backward with the GPU stalled (ReBased, Based, cuDNN SDPA), the peak memory of a ReBased forward+backward, the
short convolution, and one decoding token (B = 16, 64)
through the fused in-place Triton step vs the PyTorch functional recurrent call; ``--decode-only`` times just that.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


import kernels
from benchmarks.results_io import save_results
from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH, MAX_CHUNK

TOKENS = 32768
HEADS = 16
DK = 16
DV = 64
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
DECODE_BATCHES = [16, 64]


def bench(fn, warmup=25, rep=100):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fn, calls=20):
    """GPU time of one call of fn without the Python and launch overhead: `calls` calls replayed as a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return bench(graph.replay) / calls


def host_ms(fn, calls=20):
    """Host time of one call of fn (Python, dispatch, launches) with the GPU stalled, so that nothing waits for it:
    a long sleep kernel goes first and the calls are queued behind it."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU cycles: longer than the calls take to queue
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return host * 1e3


def floor(t_tokens, heads, dv, chunk=MAX_CHUNK, feat=136, peak_flops=700e12, bw=3.0e12):
    # per token and head (DESIGN.md, section 8): fwd = 2*2*feat*dv (state read + update) + 2*C*(dk + dv); bwd ~ 2x fwd
    fwd_flops = (4 * feat * dv + 2 * chunk * (DK + dv)) * t_tokens * heads
    total_flops = 3 * fwd_flops
    b = 2  # bf16
    fwd_bytes = (b * (2 * DK + dv) + b * dv) * t_tokens * heads
    bwd_bytes = (b * (2 * DK + 3 * dv) + 4 + b * (2 * DK + dv)) * t_tokens * heads
    return {
        "fwd_flops": fwd_flops, "fwd_bwd_flops": total_flops, "fwd_bytes": fwd_bytes,
        "fwd_bwd_bytes": fwd_bytes + bwd_bytes,
        "fwd_floor_ms": max(fwd_flops / peak_flops, fwd_bytes / bw) * 1e3,
        "fwd_bwd_floor_ms": max(total_flops / peak_flops, (fwd_bytes + bwd_bytes) / bw) * 1e3,
    }


def make_inputs(T, dtype=torch.bfloat16, dv=DV):
    B = max(1, TOKENS // T)
    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(B, T, HEADS, DK, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(B, T, HEADS, DK, device="cuda", dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(B, T, HEADS, dv, device="cuda", dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(B, T, HEADS, dv, device="cuda", dtype=dtype, generator=g)
    return q, k, v, do


def linear_calls(kind, T, dv=DV, backend="triton"):
    """(forward, forward+backward) closures of one attention call on fresh inputs."""
    q, k, v, do = make_inputs(T, dv=dv)
    f = kernels.rebased_attention if kind == "rebased" else kernels.based_attention

    def fwd():
        with torch.no_grad():
            return f(q, k, v, backend=backend)[0]

    def fwdbwd():
        o = f(q, k, v, backend=backend)[0]
        return torch.autograd.grad(o, (q, k, v), do)

    return fwd, fwdbwd


def time_calls(fwd, fwdbwd, graph=True):
    """(forward, forward+backward) median ms per call, and the forward+backward GPU time: calls replayed as a CUDA
    graph, no Python or launch overhead (None if not asked or the calls cannot be captured)."""
    gpu = None
    if graph:
        try:
            gpu = bench_graph(fwdbwd, calls=5)
        except Exception as exc:  # pragma: no cover (a library that syncs with the host inside its call)
            print("not capturable as a CUDA graph:", repr(exc)[:200])
    return bench(fwd), bench(fwdbwd), gpu


def time_linear(kind, T, dv=DV, backend="triton", graph=True):
    return time_calls(*linear_calls(kind, T, dv, backend), graph=graph)


def peak_memory_mib(kind, T, dv=DV):
    """Extra memory one forward+backward allocates at its peak (beyond its inputs), MiB."""
    fwdbwd = linear_calls(kind, T, dv)[1]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwdbwd()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def sdpa_calls(T, backend="FLASH_ATTENTION"):
    """(forward, forward+backward) closures of SDPA (head dim 64, causal) on one backend: FLASH_ATTENTION
    (FlashAttention-2 in PyTorch) or CUDNN_ATTENTION (cuDNN's fused attention; PyTorch's default on Hopper)."""
    B = max(1, TOKENS // T)
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k, v, do = (torch.randn(B, HEADS, T, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = lambda: sdpa_kernel([getattr(SDPBackend, backend)])  # noqa: E731
    except Exception:  # pragma: no cover
        import contextlib
        ctx = contextlib.nullcontext

    def fwd():
        with torch.no_grad(), ctx():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwdbwd():
        with ctx():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(o, (q, k, v), do)

    return fwd, fwdbwd


def time_sdpa(T, backend="FLASH_ATTENTION"):
    return time_calls(*sdpa_calls(T, backend))


def time_fla(T):
    try:
        from fla.ops.rebased import parallel_rebased  # type: ignore
    except Exception as exc:
        print("FLA not importable:", repr(exc)[:200])
        return None, None, None
    q, k, v, do = make_inputs(T)
    try:
        def fwd():
            with torch.no_grad():
                return parallel_rebased(q, k, v)

        def fwdbwd():
            o = parallel_rebased(q, k, v)
            o = o[0] if isinstance(o, tuple) else o
            return torch.autograd.grad(o, (q, k, v), do)

        return time_calls(fwd, fwdbwd)
    except Exception as exc:  # pragma: no cover
        print("FLA failed:", exc)
        return None, None, None


def time_short_conv(T, D=1024, K=4):
    """Our Triton short conv as the model calls it (gate + residual) vs a depthwise F.conv1d (groups=D, padding K-1,
    truncated), plain and with the gate multiply and residual add in torch (like for like); bf16, forward and
    forward+backward (gradients of every input). None without CUDA or without the Triton implementation."""
    if not torch.cuda.is_available() or "short_conv" not in kernels.registered_triton_ops():
        return None
    B = max(1, TOKENS // T)
    g = torch.Generator(device="cuda").manual_seed(T)
    x, gate, dy = (torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    w = torch.randn(D, K, device="cuda", dtype=torch.bfloat16, generator=g) * K ** -0.5
    bias = torch.randn(D, device="cuda", dtype=torch.bfloat16, generator=g)
    for t in (x, gate, w, bias):
        t.requires_grad_()

    def ours():
        return kernels.short_conv(x, w, bias, gate=gate, residual=True, backend="triton")[0]

    def conv1d():
        return F.conv1d(x.transpose(1, 2), w.unsqueeze(1), bias, padding=K - 1, groups=D)[..., :T].transpose(1, 2)

    def conv1d_gated():
        return conv1d() * gate + x

    def fwd(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    def fwd_bwd(f, inputs):
        return lambda: torch.autograd.grad(f(), inputs, dy)

    every = (x, w, bias, gate)
    r = {"D": D, "K": K, "tokens": B * T,
         "ours_fwd": bench(fwd(ours)), "ours_fwd_bwd": bench(fwd_bwd(ours, every)),
         "conv1d_fwd": bench(fwd(conv1d)), "conv1d_fwd_bwd": bench(fwd_bwd(conv1d, (x, w, bias))),
         "conv1d_gated_fwd": bench(fwd(conv1d_gated)), "conv1d_gated_fwd_bwd": bench(fwd_bwd(conv1d_gated, every))}
    r["ours_vs_conv1d_gated_fwd"] = r["ours_fwd"] / r["conv1d_gated_fwd"]
    r["ours_vs_conv1d_gated_fwd_bwd"] = r["ours_fwd_bwd"] / r["conv1d_gated_fwd_bwd"]
    return r


def time_decode_step(kind, batch, dv=DV, bw=3.0e12):
    """One token (bf16 q, k, v; fp32 state): kernels.linear_attention_step (Triton, in place) vs the functional
    torch recurrent call that returns a new state (what decoding ran before the fused step)."""
    g = torch.Generator(device="cuda").manual_seed(batch)
    q, k = (torch.randn(batch, 1, HEADS, DK, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    v = torch.randn(batch, 1, HEADS, dv, device="cuda", dtype=torch.bfloat16, generator=g)
    state = kernels.zero_state(kind, batch, HEADS, DK, dv, device="cuda")
    attention = kernels.rebased_attention if kind == "rebased" else kernels.based_attention

    @torch.no_grad()
    def fused():
        return kernels.linear_attention_step(kind, q, k, v, state, backend="triton")

    @torch.no_grad()
    def functional():
        return attention(q, k, v, initial_state=state, output_final_state=True, backend="torch", mode="recurrent")

    state_bytes = 4 * kernels.state_size(kind, DK) * (dv + 1) * batch * HEADS  # kv and z, fp32
    return {"kind": kind, "B": batch, "H": HEADS, "dv": dv, "triton_step_ms": bench(fused),
            "torch_functional_ms": bench(functional), "triton_step_graph_ms": bench_graph(fused),
            "torch_functional_graph_ms": bench_graph(functional), "floor_ms": 2 * state_bytes / bw * 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only T = 2048, 8192, 32768")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--decode-only", action="store_true", help="only the one-token decoding step")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    import triton
    dev_name = torch.cuda.get_device_name()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {"device": dev_name, "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "triton": triton.__version__,
            "tokens_per_call": TOKENS, "heads": HEADS, "dk": DK, "dv": DV, "dtype": "bfloat16"}
    print(meta, flush=True)
    lengths = [] if args.decode_only else [2048, 8192, 32768] if args.quick else LENGTHS

    rows = []
    for T in lengths:
        fl = floor(TOKENS if T <= TOKENS else T, HEADS, DV)
        r = {"T": T, "B": max(1, TOKENS // T), **fl}
        for kind in ("rebased", "based"):
            r[f"{kind}_fwd_ms"], r[f"{kind}_fwd_bwd_ms"], r[f"{kind}_fwd_bwd_graph_ms"] = time_linear(kind, T)
        r["rebased_fwd_bwd_peak_mib"] = peak_memory_mib("rebased", T)
        try:  # the PyTorch chunked reference (what backend="torch" runs), for the dispatcher's choice
            r["torch_rebased_fwd_ms"], r["torch_rebased_fwd_bwd_ms"], _ = time_linear("rebased", T, backend="torch",
                                                                                     graph=False)
        except Exception as exc:  # pragma: no cover (out of memory at long T)
            r["torch_rebased_error"] = repr(exc)[:200]
        torch.cuda.empty_cache()
        try:
            r["sdpa_fwd_ms"], r["sdpa_fwd_bwd_ms"], r["sdpa_fwd_bwd_graph_ms"] = time_sdpa(T)
        except Exception as exc:  # pragma: no cover
            r["sdpa_error"] = repr(exc)[:200]
        try:
            r["cudnn_fwd_ms"], r["cudnn_fwd_bwd_ms"], r["cudnn_fwd_bwd_graph_ms"] = time_sdpa(T, "CUDNN_ATTENTION")
        except Exception as exc:  # pragma: no cover (no cuDNN attention on this GPU / build)
            r["cudnn_error"] = repr(exc)[:200]
        r["fla_fwd_ms"], r["fla_fwd_bwd_ms"], r["fla_fwd_bwd_graph_ms"] = time_fla(T)
        for kind in ("rebased", "based"):
            r[f"{kind}_fwd_bwd_host_ms"] = host_ms(linear_calls(kind, T)[1])
        try:
            r["cudnn_fwd_bwd_host_ms"] = host_ms(sdpa_calls(T, "CUDNN_ATTENTION")[1])
        except Exception as exc:  # pragma: no cover
            r["cudnn_host_error"] = repr(exc)[:200]
        sc = time_short_conv(T)
        if sc:
            r["short_conv"] = sc
        print(r, flush=True)
        rows.append(r)
        torch.cuda.empty_cache()

    decode_rows = []
    if "rebased_attention_step" in kernels.registered_triton_ops():
        for kind in ("rebased", "based"):
            for batch in DECODE_BATCHES:
                decode_rows.append(time_decode_step(kind, batch))
                print(decode_rows[-1], flush=True)

    tuning = CHUNK_LAUNCH.get().overrides()
    lines = [f"# Kernel speed: {dev_name}, {meta['date_utc']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; "
             f"{TOKENS} tokens per call (B = {TOKENS}//T), H={HEADS}, Dk={DK}, Dv={DV}, bf16; SDPA head dim 64 causal "
             f"(SDPA = the flash backend, FlashAttention-2; cuDNN = the cuDNN backend, PyTorch's default on an H100). "
             f"Times are medians of triton.testing.do_bench (ms); GPU = the same call replayed as a CUDA graph (no "
             f"Python or launch overhead). Tuning overrides: {json.dumps(tuning)} (chunk {MAX_CHUNK} by default).",
             "",
             "| T | B | ReBased fwd | ReBased fwd+bwd | ReBased fwd+bwd GPU | Based fwd | Based fwd+bwd | SDPA fwd | "
             "SDPA fwd+bwd | cuDNN fwd+bwd | ReBased/SDPA fwd+bwd | ReBased/cuDNN fwd+bwd | Based/ReBased fwd+bwd | "
             "us/1k tok (ReBased fb) | floor fwd+bwd | torch-ref ReBased fwd+bwd | ReBased fwd+bwd extra peak MiB | "
             "FLA parallel_rebased fwd+bwd | FLA / ReBased fwd+bwd |",
             "|---" * 19 + "|"]
    for r in rows:
        sd = r.get("sdpa_fwd_bwd_ms")
        cd = r.get("cudnn_fwd_bwd_ms")
        ntok = r["B"] * r["T"]
        lines.append(
            f"| {r['T']} | {r['B']} | {r['rebased_fwd_ms']:.3f} | {r['rebased_fwd_bwd_ms']:.3f} | "
            f"{r['rebased_fwd_bwd_graph_ms']:.3f} | "
            f"{r['based_fwd_ms']:.3f} | {r['based_fwd_bwd_ms']:.3f} | {r.get('sdpa_fwd_ms', float('nan')):.3f} | "
            f"{sd if sd else float('nan'):.3f} | {cd if cd else float('nan'):.3f} | "
            f"{(r['rebased_fwd_bwd_ms'] / sd) if sd else float('nan'):.3f} | "
            f"{(r['rebased_fwd_bwd_ms'] / cd) if cd else float('nan'):.3f} | "
            f"{r['based_fwd_bwd_ms'] / r['rebased_fwd_bwd_ms']:.2f} | "
            f"{1e3 * r['rebased_fwd_bwd_ms'] / ntok * 1e3:.2f} | "
            f"{r['fwd_bwd_floor_ms']:.3f} | {r.get('torch_rebased_fwd_bwd_ms', float('nan')):.3f} | "
            f"{r['rebased_fwd_bwd_peak_mib']:.0f} | {r['fla_fwd_bwd_ms'] or float('nan'):.3f} | "
            f"{(r['fla_fwd_bwd_ms'] or float('nan')) / r['rebased_fwd_bwd_ms']:.1f} |")
    def ratio(a, b):
        return f"{a / b:.3f}" if a and b else "n/a"

    def ms(a):
        return f"{a:.3f}" if a else "n/a"

    lines += ["", "GPU time of one forward+backward (ms; the calls replayed as a CUDA graph: what the kernels cost when "
              "the host keeps ahead, as in a training step), ratios of GPU times; floor and GPU / floor for ReBased:",
              "", "| T | ReBased | Based | SDPA flash | cuDNN | FLA parallel_rebased | ReBased/SDPA | ReBased/cuDNN | "
              "Based/ReBased | FLA/ReBased | floor | ReBased/floor |", "|---" * 12 + "|"]
    for r in rows:
        rb = r["rebased_fwd_bwd_graph_ms"]
        lines.append(f"| {r['T']} | {ms(rb)} | {ms(r['based_fwd_bwd_graph_ms'])} | "
                     f"{ms(r.get('sdpa_fwd_bwd_graph_ms'))} | {ms(r.get('cudnn_fwd_bwd_graph_ms'))} | "
                     f"{ms(r.get('fla_fwd_bwd_graph_ms'))} | {ratio(rb, r.get('sdpa_fwd_bwd_graph_ms'))} | "
                     f"{ratio(rb, r.get('cudnn_fwd_bwd_graph_ms'))} | {ratio(r['based_fwd_bwd_graph_ms'], rb)} | "
                     f"{ratio(r.get('fla_fwd_bwd_graph_ms'), rb)} | {r['fwd_bwd_floor_ms']:.3f} | "
                     f"{ratio(rb, r['fwd_bwd_floor_ms'])} |")
    lines += ["", "Host time of one forward+backward (ms): Python, dispatch and launches, measured with the GPU stalled "
              "(`host_ms`: a sleep kernel first, the calls queued behind it), against the GPU time above; a call "
              "costs max(host, GPU) when nothing else hides its host work:", "",
              "| T | ReBased host | ReBased GPU | Based host | Based GPU | cuDNN host | cuDNN GPU |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['T']} | {ms(r.get('rebased_fwd_bwd_host_ms'))} | {ms(r['rebased_fwd_bwd_graph_ms'])} | "
                     f"{ms(r.get('based_fwd_bwd_host_ms'))} | {ms(r['based_fwd_bwd_graph_ms'])} | "
                     f"{ms(r.get('cudnn_fwd_bwd_host_ms'))} | {ms(r.get('cudnn_fwd_bwd_graph_ms'))} |")
    span = [r for r in rows if 2048 <= r["T"] <= 65536]
    if len(span) > 1:  # the flatness target: ReBased time per token from T = 2048 to 65536
        lines.append("")
        for key, label in (("rebased_fwd_bwd_ms", "do_bench"), ("rebased_fwd_bwd_graph_ms", "GPU")):
            per_token = [r[key] / (r["B"] * r["T"]) for r in span]
            lines.append(f"- ReBased fwd+bwd time per token, T = {span[0]['T']} ... {span[-1]['T']} ({label}): "
                         f"max / min = {max(per_token) / min(per_token):.2f}")
    short_conv_rows = [r for r in rows if "short_conv" in r]
    if short_conv_rows:
        first = short_conv_rows[0]["short_conv"]
        lines += ["", f"Short conv (D={first['D']}, K={first['K']}, bf16, bias; ours with the gate and residual fused, "
                  "as the model calls it; conv1d + gate + res = the same in torch), ms; ratio = ours / "
                  "(conv1d + gate + res):", "",
                  "| T | ours fwd | conv1d fwd | conv1d + gate + res fwd | ratio fwd | ours fwd+bwd | conv1d fwd+bwd | "
                  "conv1d + gate + res fwd+bwd | ratio fwd+bwd |", "|---|---|---|---|---|---|---|---|---|"]
        for r in short_conv_rows:
            s = r["short_conv"]
            lines.append(f"| {r['T']} | {s['ours_fwd']:.3f} | {s['conv1d_fwd']:.3f} | {s['conv1d_gated_fwd']:.3f} | "
                         f"{s['ours_vs_conv1d_gated_fwd']:.2f} | {s['ours_fwd_bwd']:.3f} | {s['conv1d_fwd_bwd']:.3f} | "
                         f"{s['conv1d_gated_fwd_bwd']:.3f} | {s['ours_vs_conv1d_gated_fwd_bwd']:.2f} |")
    if decode_rows:
        lines += ["", f"Decoding step (one token, H={HEADS}, Dk={DK}, Dv={DV}, bf16 q/k/v, fp32 state), ms: fused "
                  "Triton step updating the state in place vs the PyTorch functional recurrent call (new state); "
                  "eager = as generate calls it (Python checks and launches included), graph = GPU time (20 calls "
                  "replayed as a CUDA graph); floor = reading and writing the fp32 state at 3 TB/s.", "",
                  "| kind | B | Triton eager | torch eager | Triton graph | torch graph | speed-up (graph) | floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in decode_rows:
            lines.append(f"| {r['kind']} | {r['B']} | {r['triton_step_ms']:.4f} | {r['torch_functional_ms']:.4f} | "
                         f"{r['triton_step_graph_ms']:.4f} | {r['torch_functional_graph_ms']:.4f} | "
                         f"{r['torch_functional_graph_ms'] / r['triton_step_graph_ms']:.1f} | {r['floor_ms']:.4f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    stem = save_results(args.out, "kernels_speed", dev_name, date,
                        {"meta": meta, "tuning": tuning, "rows": rows, "decode_step": decode_rows},
                        md)
    print("wrote", stem + ".{json,md}")


if __name__ == "__main__":
    main()
