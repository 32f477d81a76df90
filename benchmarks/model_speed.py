"""Whole training steps on one GPU: the 360M ReBased hybrid vs the 360M Transformer++.

Each step is forward, backward and AdamW on the same tokens per step at every sequence length (bf16 autocast over
fp32 weights; the trainer's loss, the chunked LM head + cross-entropy of training.loss_chunk_tokens, and its
activation-checkpointing hook), with and without activation checkpointing.
Reports tokens/s, MFU from the model's honest FLOP count (pretrain.models.flops), peak memory, and the
hybrid / Transformer++ ratio; results to benchmarks/results/model_speed_<device>_<date>.{json,md}.

    python -m benchmarks.model_speed [--tokens 65536] [--lengths 2048,8192,16384,32768] [--steps 8] [--compile]
                                     [--loss-chunk-tokens N]   # 0: full logits and F.cross_entropy
    python -m benchmarks.model_speed --plot RESULT.json [RESULT.json ...]   # tokens/s vs length, PNG
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

from pretrain.models import build_model, flops_per_token, load_model_config
from pretrain.training.activation_checkpointing import make_checkpoint_fn
from pretrain.training.config import TrainingConfig
from pretrain.training.metrics import peak_flops
from benchmarks.results_io import save_results

MODELS = {name: f"configs/models/{name}.yaml" for name in ("rebased_360m", "transformer_360m")}


def train_loss(model, ids, checkpoint_fn, loss_chunk_tokens: int):
    """The trainer's loss call (pretrain/train.py: Trainer.train_step) on next-token labels."""
    return model(ids[:, :-1], labels=ids[:, 1:], checkpoint_fn=checkpoint_fn, loss_chunk_tokens=loss_chunk_tokens)


def setup(name: str, seq_len: int, tokens: int, ac: str, compile_blocks: bool):
    """(config, model on the GPU, fused AdamW, random ids [tokens // seq_len, seq_len + 1], checkpoint hook)."""
    cfg = load_model_config(os.path.join(ROOT, MODELS[name]), [f"max_seq_len={seq_len}"])
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    if compile_blocks:
        torch._dynamo.reset()  # each (model, length) is a new shape: without this the recompile limit is hit
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (max(1, tokens // seq_len), seq_len + 1), device="cuda")
    return cfg, model, opt, ids, make_checkpoint_fn(model, ac, 2)


def time_steps(name: str, seq_len: int, tokens: int, ac: str, steps: int, compile_blocks: bool,
               loss_chunk_tokens: int) -> dict:
    cfg, model, opt, ids, ckpt = setup(name, seq_len, tokens, ac, compile_blocks)
    batch = ids.shape[0]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train_loss(model, ids, ckpt, loss_chunk_tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # warm-up: Triton/inductor compilation, allocator
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / steps
    tps = batch * seq_len / sec
    peak = peak_flops(torch.device("cuda"))
    fpt = flops_per_token(cfg, seq_len)["train"]
    res = {"model": name, "seq_len": seq_len, "batch": batch, "activation_checkpointing": ac,
           "step_ms": 1e3 * sec, "tokens_per_s": tps, "train_flops_per_token": fpt,
           "mfu": fpt * tps / peak if peak else None, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model, opt, ids
    torch.cuda.empty_cache()
    return res


def profile_top(name: str, seq_len: int, tokens: int, loss_chunk_tokens: int, ac: str, compile_blocks: bool,
                top: int = 30) -> str:
    """The top CUDA kernels of one training step (what to fuse next)."""
    from torch.profiler import ProfilerActivity, profile

    cfg, model, opt, ids, ckpt = setup(name, seq_len, tokens, ac, compile_blocks)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            train_loss(model, ids, ckpt, loss_chunk_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=90)
    del model, opt
    torch.cuda.empty_cache()
    return table


def plot(result_files: list, out_png: str) -> None:
    """Tokens/s against sequence length (no activation checkpointing) for each saved result file."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for path in result_files:
        with open(path) as f:
            result = json.load(f)
        label = "torch.compile" if result["meta"].get("compile") else "eager"
        for model, style in (("rebased_360m", "o-"), ("transformer_360m", "s--")):
            rows = sorted((r for r in result["rows"] if r["model"] == model and "tokens_per_s" in r
                           and r["activation_checkpointing"] == "none" and not r.get("ran_eager")),
                          key=lambda r: r["seq_len"])
            ax.plot([r["seq_len"] for r in rows], [r["tokens_per_s"] / 1e3 for r in rows], style,
                    label=f"{'ReBased hybrid' if model.startswith('rebased') else 'Transformer++'} ({label})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens per step fixed)")
    ax.set_ylabel("training tokens/s (thousands)")
    ax.set_title(f"360M models, one {result['meta']['device']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def table(meta: dict, args, rows: list) -> str:
    lines = [f"# Whole-model training step: {meta['device']}, {meta['date']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}; {args.tokens} tokens per step; "
             f"{meta['precision']}; fused AdamW; compile={args.compile}; loss_chunk_tokens="
             f"{args.loss_chunk_tokens}; linear-attention kernels: {meta['kernel_backend']}.", "",
             "| T | AC | hybrid tokens/s | Transformer++ tokens/s | hybrid / T++ | hybrid MFU | T++ MFU | "
             "hybrid peak GiB | T++ peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, k, f: (f.format(r[k]) if r.get(k) is not None else "OOM" if r.get("oom") else "n/a")  # noqa: E731
    for seq_len in sorted({r["seq_len"] for r in rows}):
        for ac in args.ac.split(","):
            pair = {r["model"]: r for r in rows if r["seq_len"] == seq_len and r["activation_checkpointing"] == ac}
            if len(pair) < 2:
                continue
            h, t = pair["rebased_360m"], pair["transformer_360m"]
            ratio = f"{h['tokens_per_s'] / t['tokens_per_s']:.2f}x" if "tokens_per_s" in h and "tokens_per_s" in t \
                else "n/a"
            lines.append(f"| {seq_len} | {ac} | {fmt(h, 'tokens_per_s', '{:,.0f}')} | "
                         f"{fmt(t, 'tokens_per_s', '{:,.0f}')} | {ratio} | {fmt(h, 'mfu', '{:.1%}')} | "
                         f"{fmt(t, 'mfu', '{:.1%}')} | "
                         f"{fmt(h, 'peak_mem_gib', '{:.1f}')} | {fmt(t, 'peak_mem_gib', '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536, help="tokens per step at every length")
    p.add_argument("--lengths", default="2048,8192,16384,32768")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ac", default="none,full", help="activation checkpointing modes to time")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--loss-chunk-tokens", type=int, default=TrainingConfig.loss_chunk_tokens,
                   help="tokens per chunk of the LM head + cross-entropy, as training.loss_chunk_tokens (default "
                   "%(default)s, the trainer's); 0: full logits and F.cross_entropy")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels per model at 2048 and 16384")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--plot", nargs="+", metavar="RESULT_JSON", help="only draw tokens/s vs length from saved "
                   "results into OUT/model_speed.png")
    args = p.parse_args()
    if args.plot:
        plot(args.plot, os.path.join(args.out, "model_speed.png"))
        return

    device = torch.cuda.get_device_name()
    meta = {"device": device, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
            "tokens_per_step": args.tokens, "compile": args.compile, "precision": "bf16 autocast, fp32 weights",
            "loss_chunk_tokens": args.loss_chunk_tokens,
            "kernel_backend": os.environ.get("REBASED_KERNEL_BACKEND", "auto")}
    print(meta, flush=True)
    rows = []
    date = meta["date"][:10]
    stem = "model_speed_compiled" if args.compile else "model_speed"  # both kinds of run kept side by side
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        for ac in args.ac.split(","):
            for name in MODELS:
                try:
                    r = time_steps(name, seq_len, args.tokens, ac, args.steps, args.compile, args.loss_chunk_tokens)
                except torch.OutOfMemoryError:
                    r = {"model": name, "seq_len": seq_len, "activation_checkpointing": ac, "oom": True}
                    torch.cuda.empty_cache()
                print(json.dumps(r), flush=True)
                rows.append(r)
            md = table(meta, args, rows)  # saved after every pair: a run cut short keeps what it measured
            save_results(args.out, stem, device, date, {"meta": meta, "rows": rows}, md)
    print(md)
    if args.profile:  # after the table is saved: a failure here loses no timing
        profiles = {}
        for name in MODELS:
            for seq_len in (2048, 16384):
                try:
                    profiles[f"{name}@{seq_len}"] = profile_top(name, seq_len, args.tokens, args.loss_chunk_tokens,
                                                                args.ac.split(",")[0], args.compile)
                except torch.OutOfMemoryError:
                    profiles[f"{name}@{seq_len}"] = "out of memory"
                    torch.cuda.empty_cache()
                print(f"--- {name} @ {seq_len}\n{profiles[f'{name}@{seq_len}']}", flush=True)
        md += (f"\nTop CUDA kernels of one step (torch.profiler; activation checkpointing {args.ac.split(',')[0]}, "
               f"compile={args.compile}):\n\n")
        md += "".join(f"{key}:\n\n```\n{top}\n```\n\n" for key, top in profiles.items())
        save_results(args.out, stem, device, date, {"meta": meta, "rows": rows, "profiles": profiles}, md)


if __name__ == "__main__":
    main()
