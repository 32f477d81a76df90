"""Generation speed: prefill tokens/s and milliseconds per decoding step, the 360M hybrid against the 360M
Transformer++, random weights in bf16, batches of equal-length random prompts.

    python -m benchmarks.generate_speed [--models rebased_360m,transformer_360m] [--batches 1,16,64]
        [--prompts 2048,8192,16384,65536] [--steps 64] [--compiled] [--out benchmarks/results] [--quick]

Per (model, batch B, prompt length T): the packed prefill of the B prompts (``pretrain.generation.decoder.prefill``,
synchronised, tokens/s), then ``--steps`` one-token steps through ``DecodeStep``: replayed as a CUDA graph (what
``generate`` does) and eager, timed with CUDA events as the mean ms per step; peak memory of the prefill and of the
decoding (``torch.cuda.max_memory_allocated``, weights and caches included). ``--compiled`` also times each
model's step as users know it from Hugging Face's static cache: the same step function through
``torch.compile(mode="reduce-overhead")`` (the Transformer++ baseline's fast path), and ``DecodeStep(compile=True)``
(the step compiled, then captured in our CUDA graph: what ``generate(..., compile=True)`` runs). Settings whose KV
cache would not fit, or whose prefill runs out of GPU memory, are skipped (and listed). The reduce-overhead step
marks the cache's buffers as static addresses (as Hugging Face's static cache does), so its CUDA graphs may update
them in place. Each model first runs a short prefill and a few steps untimed (the
kernels' compilation). Results: OUT/generate_speed_<device>_<date>.{json,md}, rewritten after every setting (a
crash or a time limit keeps what was measured), and a plot of ms per step against the prompt length.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

from benchmarks.results_io import save_results


def kv_bytes(cfg, batch: int, length: int) -> int:
    """Bytes of the attention caches in bf16: every key of full attention, a window for sliding windows."""
    total = 0
    for kind in cfg.layers:
        if kind == "attention":
            total += 2 * batch * length * cfg.d_model * 2
        elif kind == "sliding_window":
            total += 2 * batch * min(length, cfg.sliding_window.window) * cfg.d_model * 2
    return total


def time_steps(step, tokens, n: int) -> float:
    """Mean ms per step over n steps (after the ones already run)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step(tokens)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def measure(model, batch: int, prompt_len: int, steps: int, compiled: bool) -> dict:
    from pretrain.generation.decoder import DecodeStep, prefill

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    max_len = prompt_len + 3 * steps + 8
    row = {"batch": batch, "prompt": prompt_len}
    variants = [("graph", True, False), ("eager", False, False)]
    if compiled:
        variants.append(("graph_compiled", True, True))
    for key, graph, compile_step in variants:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        cache, logits = prefill(model, prompts, max_len)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t
        prefill_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if compile_step:
            torch._dynamo.reset()  # a fresh compilation per setting, never past the recompile limit into eager
        step = DecodeStep(model, cache, cuda_graph=graph, compile=compile_step)
        tokens = logits.argmax(-1)
        with torch.no_grad():
            for _ in range(3):  # warm-up (and, with a graph, its capture)
                step(tokens)
            ms = time_steps(step, tokens, steps)
        row[f"decode_ms_{key}"] = round(ms, 4)
        if key == "graph":
            row.update(prefill_s=round(prefill_s, 4), prefill_tokens_per_s=round(batch * prompt_len / prefill_s, 1),
                       prefill_peak_gib=round(prefill_peak / 2**30, 3),
                       decode_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
        del cache, step
    if compiled:
        cache, logits = prefill(model, prompts, max_len)
        # as Hugging Face's static cache does: buffers updated in place keep their addresses, so the compiled
        # function's CUDA graphs may mutate them (else inductor skips the graphs: "mutated inputs")
        for buffer in cache.buffers():
            torch._dynamo.mark_static_address(buffer)

        def forward(tokens):
            return model.lm_head(model.hidden_states(tokens, cache=cache)[:, -1])

        fn = torch.compile(forward, mode="reduce-overhead")
        tokens = logits.argmax(-1)[:, None]
        with torch.no_grad():
            for _ in range(4):
                fn(tokens)
            row["decode_ms_compiled"] = round(time_steps(fn, tokens, steps), 4)
    return row


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Generation speed: {meta['device']}, {meta['date_utc']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}; random weights, bf16, equal-length random prompts; "
             "ms per decoding step = mean over the timed steps (CUDA events).", "",
             "| model | B | prompt | prefill tok/s | decode ms (graph) | decode ms (eager) | decode ms (compiled "
             "+ graph) | decode ms (reduce-overhead) | peak GiB prefill / decode |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r.get('prefill_tokens_per_s', '-')} | "
                     f"{r.get('decode_ms_graph', '-')} | {r.get('decode_ms_eager', '-')} | "
                     f"{r.get('decode_ms_graph_compiled', '-')} | {r.get('decode_ms_compiled', '-')} | "
                     f"{r.get('prefill_peak_gib', '-')} / "
                     f"{r.get('decode_peak_gib', '-')} |")
    if result.get("skipped"):
        lines += ["", "Skipped (the KV cache would not fit, or out of memory): " + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in result["rows"]}):
        for batch in sorted({r["batch"] for r in result["rows"]}):
            rows = [r for r in result["rows"] if r["model"] == model and r["batch"] == batch and "decode_ms_graph" in r]
            if rows:
                ax.plot([r["prompt"] for r in rows], [r["decode_ms_graph"] for r in rows], marker="o",
                        label=f"{model}, B={batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("ms per decoding step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="rebased_360m,transformer_360m")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompts", default="2048,8192,16384,65536")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--compiled", action="store_true", help="also time the step through torch.compile")
    p.add_argument("--memory-gib", type=float, default=100.0, help="skip settings whose KV cache exceeds this")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--quick", action="store_true", help="tiny models and lengths: a smoke test of the script")
    args = p.parse_args(argv)
    # long prefills allocate blocks of many sizes: without expandable segments a 16 x 64k prefill ran out of memory
    # with 50 GiB reserved but free (fragmented)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not torch.cuda.is_available():
        print("generate_speed needs a CUDA GPU", file=sys.stderr)
        return 2
    from pretrain.models import build_model, load_model_config

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rows, skipped = [], []
    result = {"meta": meta, "rows": rows, "skipped": skipped}

    def save() -> str:
        return save_results(args.out, "generate_speed" + ("_quick" if args.quick else ""), meta["device"],
                            meta["date_utc"][:10], result, markdown(result))

    for name in args.models.split(","):
        overrides = ["d_model=128", "mlp_hidden=256", "vocab_size=1024"] if args.quick else []
        cfg = load_model_config(os.path.join(ROOT, "configs", "models", f"{name}.yaml"), overrides)
        torch.manual_seed(0)
        model = build_model(cfg).cuda().to(torch.bfloat16).eval()
        measure(model, 2, 300, 4, compiled=False)  # untimed: compiles the kernels the timed rows use
        for batch in map(int, args.batches.split(",")):
            for prompt_len in map(int, args.prompts.split(",")):
                if kv_bytes(cfg, batch, prompt_len + 3 * args.steps) > args.memory_gib * 2**30:
                    skipped.append(f"{name} B={batch} T={prompt_len}")
                    continue
                try:
                    row = {"model": name, **measure(model, batch, prompt_len, args.steps, args.compiled)}
                except torch.OutOfMemoryError:  # the prefill's activations, not the cache: listed, the rest runs
                    skipped.append(f"{name} B={batch} T={prompt_len} (out of memory)")
                    torch.cuda.empty_cache()
                    continue
                print(json.dumps(row), flush=True)
                rows.append(row)
                save()
                torch.cuda.empty_cache()
        del model
    stem = save()
    plot(result, stem + ".png")
    print(markdown(result))
    print("wrote", stem + ".{json,md,png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
