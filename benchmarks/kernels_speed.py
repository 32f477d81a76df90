"""Speed of the Triton ReBased / Based / short-conv kernels vs SDPA flash attention (and FLA if importable).

One GPU run: forward and forward+backward times for T = 512 ... 65536 at 32768 tokens per call (B = 32768 // T,
at least 1), 16 heads, Dk 16, Dv 64, bf16; SDPA with head dim 64 (flash backend when available), causal.
Prints a table with ratios and writes benchmarks/results/kernels_speed_<device>_<date>.{json,md} (or --out DIR)
with the device, date, command, and the floor (FLOPs and bytes, see /work/shared/notes/rebased-math.md).

    python benchmarks/kernels_speed.py [--sweep] [--quick] [--out DIR]

``--sweep`` first times several tuning variants (kernels.linear_attention.triton_chunk.TUNING) at a few
lengths and uses the fastest fwd+bwd variant for the main table.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels  # noqa: E402
from results_io import save_results  # noqa: E402
from kernels.linear_attention import triton_chunk as tc  # noqa: E402

TOKENS = 32768
HEADS = 16
DK = 16
DV = 64
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


def bench(fn, warmup=25, rep=100):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def floor(t_tokens, heads, dv, chunk=tc.MAX_CHUNK, feat=136, peak_flops=700e12, bw=3.0e12):
    # per token and head (notes): fwd = 2*2*feat*dv (state read + update) + 2*C*(dk + dv); bwd ~ 2x fwd
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


def time_linear(kind, T, dv=DV, backend="triton"):
    q, k, v, do = make_inputs(T, dv=dv)
    f = kernels.rebased_attention if kind == "rebased" else kernels.based_attention

    def fwd():
        with torch.no_grad():
            return f(q, k, v, backend=backend)[0]

    def fwdbwd():
        o = f(q, k, v, backend=backend)[0]
        return torch.autograd.grad(o, (q, k, v), do)

    return bench(fwd), bench(fwdbwd)


def time_sdpa(T):
    B = max(1, TOKENS // T)
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k, v, do = (torch.randn(B, HEADS, T, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731
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

    return bench(fwd), bench(fwdbwd)


def time_fla(T):
    try:
        from fla.ops.rebased import parallel_rebased  # type: ignore
    except Exception:
        return None, None
    q, k, v, do = make_inputs(T)
    try:
        def fwd():
            with torch.no_grad():
                return parallel_rebased(q, k, v)

        def fwdbwd():
            o = parallel_rebased(q, k, v)
            o = o[0] if isinstance(o, tuple) else o
            return torch.autograd.grad(o, (q, k, v), do)

        return bench(fwd), bench(fwdbwd)
    except Exception as exc:  # pragma: no cover
        print("FLA failed:", exc)
        return None, None


def time_short_conv(T, D=2048, K=4):
    if "short_conv" not in kernels.registered_triton_ops():
        return None
    B = max(1, TOKENS // T)
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(D, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def ours_fb():
        y = kernels.short_conv(x, w, bias, backend="triton")[0]
        return torch.autograd.grad(y, (x, w, bias), dy)

    def conv_fb():
        y = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), bias, padding=K - 1, groups=D)[..., :T].transpose(1, 2)
        return torch.autograd.grad(y, (x, w, bias), dy)

    def ours_f():
        with torch.no_grad():
            return kernels.short_conv(x, w, bias, backend="triton")[0]

    def conv_f():
        with torch.no_grad():
            return F.conv1d(x.transpose(1, 2), w.unsqueeze(1), bias, padding=K - 1, groups=D)[..., :T].transpose(1, 2)

    return {"ours_fwd": bench(ours_f), "ours_fwd_bwd": bench(ours_fb), "conv1d_fwd": bench(conv_f),
            "conv1d_fwd_bwd": bench(conv_fb), "D": D, "K": K}


SWEEP = [
    {},
    {"bv_fwd": 32, "bv_bwd": 32},
    {"bv_bwd": 32, "stages": 1},
    {"chunk": 32, "bv_bwd": 32},
    {"bv_fwd": 32, "bv_bwd": 32, "warps_fwd": 4, "warps_bwd": 4},
    {"bv_bwd": 32, "target_programs": 264},
    {"bv_bwd": 32, "target_programs": 1056},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="only T = 2048, 8192, 32768")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--sweep-lengths", default="2048,8192,32768")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    import triton
    dev_name = torch.cuda.get_device_name()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    meta = {"device": dev_name, "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "triton": triton.__version__,
            "tokens_per_call": TOKENS, "heads": HEADS, "dk": DK, "dv": DV, "dtype": "bfloat16"}
    print(meta, flush=True)
    lengths = [2048, 8192, 32768] if args.quick else LENGTHS

    sweep_rows = []
    best = {}
    if args.sweep:
        base = dict(tc.TUNING)
        sl = [int(x) for x in args.sweep_lengths.split(",")]
        best_score = None
        for cfg in SWEEP:
            tc.TUNING.clear()
            tc.TUNING.update(base)
            tc.TUNING.update(cfg)
            row = {"cfg": cfg}
            score = 0.0
            try:
                for T in sl:
                    f_ms, fb_ms = time_linear("rebased", T)
                    row[f"T{T}"] = (round(f_ms, 4), round(fb_ms, 4))
                    score += fb_ms / T
            except Exception as exc:
                row["error"] = repr(exc)[:300]
                score = float("inf")
            print("sweep", row, flush=True)
            sweep_rows.append(row)
            if best_score is None or score < best_score:
                best_score, best = score, cfg
        tc.TUNING.clear()
        tc.TUNING.update(base)
        tc.TUNING.update(best)
        print("best variant", best, flush=True)

    rows = []
    for T in lengths:
        fl = floor(TOKENS if T <= TOKENS else T, HEADS, DV)
        r = {"T": T, "B": max(1, TOKENS // T), **fl}
        r["rebased_fwd_ms"], r["rebased_fwd_bwd_ms"] = time_linear("rebased", T)
        r["based_fwd_ms"], r["based_fwd_bwd_ms"] = time_linear("based", T)
        try:  # the PyTorch chunked reference (what backend="torch" runs), for the dispatcher's choice
            r["torch_rebased_fwd_ms"], r["torch_rebased_fwd_bwd_ms"] = time_linear("rebased", T, backend="torch")
        except Exception as exc:  # pragma: no cover (out of memory at long T)
            r["torch_rebased_error"] = repr(exc)[:200]
        torch.cuda.empty_cache()
        try:
            r["sdpa_fwd_ms"], r["sdpa_fwd_bwd_ms"] = time_sdpa(T)
        except Exception as exc:  # pragma: no cover
            r["sdpa_error"] = repr(exc)[:200]
        r["fla_fwd_ms"], r["fla_fwd_bwd_ms"] = time_fla(T)
        sc = time_short_conv(T)
        if sc:
            r["short_conv"] = sc
        print(r, flush=True)
        rows.append(r)
        torch.cuda.empty_cache()

    lines = [f"# Kernel speed: {dev_name}, {meta['date_utc']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; "
             f"{TOKENS} tokens per call (B = {TOKENS}//T), H={HEADS}, Dk={DK}, Dv={DV}, bf16; SDPA head dim 64 causal "
             f"(flash). Times are medians of triton.testing.do_bench (ms). Tuning: {json.dumps(best or {})}.", "",
             "| T | B | ReBased fwd | ReBased fwd+bwd | Based fwd | Based fwd+bwd | SDPA fwd | SDPA fwd+bwd | "
             "ReBased/SDPA fwd+bwd | Based/ReBased fwd+bwd | us/1k tok (ReBased fb) | floor fwd+bwd | "
             "torch-ref ReBased fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sd = r.get("sdpa_fwd_bwd_ms")
        ntok = r["B"] * r["T"]
        lines.append(
            f"| {r['T']} | {r['B']} | {r['rebased_fwd_ms']:.3f} | {r['rebased_fwd_bwd_ms']:.3f} | {r['based_fwd_ms']:.3f} | "
            f"{r['based_fwd_bwd_ms']:.3f} | {r.get('sdpa_fwd_ms', float('nan')):.3f} | {sd if sd else float('nan'):.3f} | "
            f"{(r['rebased_fwd_bwd_ms'] / sd) if sd else float('nan'):.3f} | "
            f"{r['based_fwd_bwd_ms'] / r['rebased_fwd_bwd_ms']:.2f} | {1e3 * r['rebased_fwd_bwd_ms'] / ntok * 1e3:.2f} | "
            f"{r['fwd_bwd_floor_ms']:.3f} | {r.get('torch_rebased_fwd_bwd_ms', float('nan')):.3f} |")
    if any("short_conv" in r for r in rows):
        lines += ["", "Short conv (D=2048, K=4, bf16, bias), ms:", "",
                  "| T | ours fwd | conv1d fwd | ours fwd+bwd | conv1d fwd+bwd |", "|---|---|---|---|---|"]
        for r in rows:
            if "short_conv" in r:
                s = r["short_conv"]
                lines.append(f"| {r['T']} | {s['ours_fwd']:.3f} | {s['conv1d_fwd']:.3f} | {s['ours_fwd_bwd']:.3f} | "
                             f"{s['conv1d_fwd_bwd']:.3f} |")
    if sweep_rows:
        lines += ["", "Tuning sweep (ReBased, (fwd, fwd+bwd) ms):", ""]
        lines += [f"- {json.dumps(s)}" for s in sweep_rows]
    md = "\n".join(lines) + "\n"
    print(md)
    stem = save_results(args.out, "kernels_speed", dev_name, date,
                        {"meta": meta, "tuning": best, "rows": rows, "sweep": sweep_rows}, md)
    print("wrote", stem + ".{json,md}")


if __name__ == "__main__":
    main()
