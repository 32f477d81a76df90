"""Speed of the sliding-window attention paths of pretrain/models/mixers.py: blocked SDPA (the CPU path, what CUDA
ran before) vs FlexAttention (compiled, block mask built once), and packed documents: FlexAttention with cu_seqlens
vs SDPA with the dense T×T mask (what CUDA ran before for document masking).

One GPU run: forward and forward+backward times at 32768 tokens per call, H = 16, D = 64, W = 256, bf16, for
T = 2048 ... 32768 (B = 32768 // T rows; packed: one row of 32768 tokens cut into documents of T, the same
attention as the B rows), plus the time to build a packed batch's block mask (rebuilt per batch) and the largest
output difference of flex and flex packed from blocked (JSON). Prints a table and writes
benchmarks/results/window_attention_speed_<device>_<date>.{json,md} (or --out DIR).

    python -m benchmarks.window_attention_speed [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

import torch
import torch.nn.functional as F


from pretrain.models.mixers import (
    _block_mask, _blocked_window_attention, _dense_mask, _flex_causal_attention)
from benchmarks.results_io import save_results

TOKENS = 32768
HEADS = 16
HEAD_DIM = 64
WINDOW = 256
LENGTHS = [2048, 4096, 8192, 16384, 32768]


def bench(fn, warmup=25, rep=100):
    import triton.testing
    fn()  # compile outside the timing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def inputs(B, T, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, HEADS, T, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def fwd_and_fwd_bwd(f, qkv, do):
    def fwd():
        with torch.no_grad():
            return f(*qkv)

    def fwd_bwd():
        return torch.autograd.grad(f(*qkv), qkv, do)

    return bench(fwd), bench(fwd_bwd)


def packed_cu(T):  # one row of TOKENS tokens, documents of T
    return torch.arange(0, TOKENS + 1, T, device="cuda", dtype=torch.int32)


def pack(t):  # [B, H, T, D] -> [1, H, B*T, D], the rows one after the other
    return t.detach().transpose(0, 1).reshape(1, HEADS, TOKENS, HEAD_DIM)


def time_length(T):
    torch._dynamo.reset()  # the compiled flex_attention and create_block_mask see new shapes: stay below the limit
    B = TOKENS // T
    r = {"T": T, "B": B}
    qkv, do = inputs(B, T, seed=T)
    r["blocked_fwd_ms"], r["blocked_fwd_bwd_ms"] = fwd_and_fwd_bwd(
        lambda q, k, v: _blocked_window_attention(q, k, v, WINDOW), qkv, do)
    r["flex_fwd_ms"], r["flex_fwd_bwd_ms"] = fwd_and_fwd_bwd(
        lambda q, k, v: _flex_causal_attention(q, k, v, WINDOW), qkv, do)
    cu = packed_cu(T)
    r["flex_packed_fwd_ms"], r["flex_packed_fwd_bwd_ms"] = fwd_and_fwd_bwd(
        lambda q, k, v: _flex_causal_attention(q, k, v, WINDOW, cu), [pack(t).requires_grad_() for t in qkv],
        pack(do))
    r["packed_mask_build_ms"] = bench(lambda: _block_mask(TOKENS, WINDOW, cu.clone(), cu.device))  # a new batch
    with torch.no_grad():  # the paths agree at this shape (bf16 rounding apart)
        ref = pack(_blocked_window_attention(*qkv, WINDOW))
        r["flex_max_abs_diff"] = (pack(_flex_causal_attention(*qkv, WINDOW)) - ref).abs().max().item()
        packed = _flex_causal_attention(*(pack(t) for t in qkv), WINDOW, cu)
        r["flex_packed_max_abs_diff"] = (packed - ref).abs().max().item()
    r["flex_vs_blocked_fwd_bwd"] = r["flex_fwd_bwd_ms"] / r["blocked_fwd_bwd_ms"]
    return r


def time_dense_packed():
    """SDPA with the dense mask on the packed row (its cost does not depend on the documents)."""
    qkv, do = inputs(1, TOKENS, seed=0)
    pos = torch.arange(TOKENS, device="cuda")
    cu = packed_cu(LENGTHS[0])
    pos = pos - cu[:-1].repeat_interleave(cu.diff())
    mask = _dense_mask(pos, pos, WINDOW, cu)
    try:
        fwd, fwd_bwd = fwd_and_fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                       qkv, do)
        return {"dense_packed_fwd_ms": fwd, "dense_packed_fwd_bwd_ms": fwd_bwd}
    except Exception as exc:  # pragma: no cover (out of memory)
        return {"dense_packed_error": repr(exc)[:200]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    dev_name = torch.cuda.get_device_name()
    now = _dt.datetime.now(_dt.timezone.utc)
    meta = {"device": dev_name, "date_utc": now.isoformat(timespec="seconds"),
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "tokens_per_call": TOKENS,
            "heads": HEADS, "head_dim": HEAD_DIM, "window": WINDOW, "dtype": "bfloat16"}
    print(meta, flush=True)
    rows = []
    for T in LENGTHS:
        rows.append(time_length(T))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    dense = time_dense_packed()
    print(dense, flush=True)

    lines = [f"# Sliding-window attention speed: {dev_name}, {meta['date_utc']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}; {TOKENS} tokens per call (B = {TOKENS}//T), "
             f"H={HEADS}, D={HEAD_DIM}, W={WINDOW}, bf16. Medians of triton.testing.do_bench (ms). blocked = SDPA on "
             "query blocks of W with a [W, 2W] mask; flex = compiled FlexAttention (block mask cached); packed = one "
             f"row of {TOKENS} tokens cut into documents of T (cu_seqlens), the same attention; mask build = a new "
             "batch's block mask.", "",
             "| T | B | blocked fwd | flex fwd | blocked fwd+bwd | flex fwd+bwd | flex/blocked fwd+bwd | "
             "flex packed fwd | flex packed fwd+bwd | packed mask build |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['B']} | {r['blocked_fwd_ms']:.3f} | {r['flex_fwd_ms']:.3f} | "
                     f"{r['blocked_fwd_bwd_ms']:.3f} | {r['flex_fwd_bwd_ms']:.3f} | "
                     f"{r['flex_vs_blocked_fwd_bwd']:.2f} | {r['flex_packed_fwd_ms']:.3f} | "
                     f"{r['flex_packed_fwd_bwd_ms']:.3f} | {r['packed_mask_build_ms']:.3f} |")
    if "dense_packed_fwd_bwd_ms" in dense:
        lines += ["", f"Dense-mask SDPA on the packed row of {TOKENS} tokens (the previous CUDA path with documents): "
                  f"fwd {dense['dense_packed_fwd_ms']:.3f} ms, fwd+bwd {dense['dense_packed_fwd_bwd_ms']:.3f} ms."]
    else:
        lines += ["", f"Dense-mask SDPA on the packed row failed: {dense['dense_packed_error']}"]
    md = "\n".join(lines) + "\n"
    print(md)
    stem = save_results(args.out, "window_attention_speed", dev_name, now.strftime("%Y-%m-%d"),
                        {"meta": meta, "rows": rows, "dense_packed": dense}, md)
    print("wrote", stem + ".{json,md}")


if __name__ == "__main__":
    main()
