"""GPU training runs through the real launcher: 150M ReBased hybrid and Transformer++ with DeepSpeed ZeRO-2 and
FSDP2 on one GPU, bf16, activation checkpointing; loss curve, tokens/s, MFU and peak memory per run.

    python -m benchmarks.train_gpu --data DIR --vocab-size N [--steps 300] [--seq-len 2048] [--out DIR]

DIR is a tokenize_pile.py output (train/ and val/). Each run is ``bash launch/pretrain.sh`` with the run config
below as overrides; results go to benchmarks/results/train_gpu_<device>_<date>.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from benchmarks.results_io import save_results

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("deepspeed", "fsdp")


def run_config(model: str, strategy: str, args, out_dir: Path) -> dict:
    return {
        "model": f"configs/models/{model}.yaml",
        "model_overrides": [f"vocab_size={args.vocab_size}"],
        "out_dir": str(out_dir),
        "data": {"train": [{"path": f"{args.data}/train"}], "valid": [{"path": f"{args.data}/val"}],
                 "seq_len": args.seq_len},
        "training": {"max_steps": args.steps, "global_batch_size": args.batch, "micro_batch_size": args.micro,
                     "precision": "bf16", "activation_checkpointing": "full", "eval_every": args.steps // 2,
                     "eval_samples": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 30, "schedule": "cosine"},
        "parallel": {"strategy": strategy, "deepspeed_config": "configs/deepspeed/zero2.json", "zero_stage": 2},
        "checkpoint": {"every": 0, "save_final": True, "resume": "none"},
        "logging": {"every": 10, "progress_bar": False, "wandb": {"mode": "disabled"}},
    }


def summarise(metrics: Path) -> dict:
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in recs if "loss" in r and "tokens_per_s" in r]
    steady = train[len(train) // 4:] or train  # skip compilation / warm-up records
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    return {
        "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"], "val_loss": val,
        "loss_curve": [(r["step"], round(r["loss"], 4)) for r in train],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady) if steady[0].get("mfu") is not None else None,
        "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in train),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--micro", type=int, default=8, help="micro batch (sequences)")
    p.add_argument("--models", default="rebased_150m,transformer_150m", help="configs/models names")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--merge", help="an earlier results JSON of this script: its runs are kept (same device kind "
                                   "and settings assumed; each run records its own date)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = dt.date.today().isoformat()
    work = Path(tempfile.mkdtemp(prefix="train_gpu_"))
    results = json.loads(Path(args.merge).read_text())["runs"] if args.merge else []
    for model, strategy in [(m, s) for m in args.models.split(",") for s in args.strategies.split(",")]:
        out_dir = work / f"{model}_{strategy}"
        cfg_path = work / f"{model}_{strategy}.yaml"
        cfg_path.write_text(yaml.safe_dump(run_config(model, strategy, args, out_dir), sort_keys=False))
        cmd = ["bash", "launch/pretrain.sh", str(cfg_path)]
        print(f"\n=== {model} / {strategy}: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        entry = {"model": model, "strategy": strategy + (" ZeRO-2" if strategy == "deepspeed" else " (FSDP2)"),
                 "returncode": proc.returncode, "device": device, "date": date,
                 "kernel_backend": os.environ.get("REBASED_KERNEL_BACKEND", "auto")}
        if proc.returncode == 0:
            entry.update(summarise(out_dir / "metrics.jsonl"))
        else:
            entry["error_tail"] = (proc.stdout + proc.stderr)[-3000:]
        print(json.dumps({k: v for k, v in entry.items() if k != "loss_curve"}, indent=1), flush=True)
        results.append(entry)
        write_results(results, args, device, date)


def write_results(results: list[dict], args, device: str, date: str) -> None:
    import torch

    meta = {"device": device, "date": date, "command": " ".join([sys.executable, *sys.argv]),
            "torch": torch.__version__, "seq_len": args.seq_len, "global_batch": args.batch,
            "micro_batch": args.micro, "steps": args.steps, "precision": "bf16",
            "activation_checkpointing": "full", "world_size": 1}
    lines = [f"# Training on one GPU: {device}, {date}", "",
             f"Command: `{meta['command']}`  ", f"torch {meta['torch']}; seq_len {args.seq_len}, global batch "
             f"{args.batch} x {args.seq_len} tokens (micro {args.micro}), {args.steps} steps, bf16, full "
             f"activation checkpointing; data: the embedded sample corpus (tokenize_pile.py output).", "",
             "| model | strategy | attention kernels | loss first → last | val loss | tokens/s | MFU | peak mem GiB "
             "| date |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["returncode"] != 0:
            lines.append(f"| {r['model']} | {r['strategy']} | | FAILED (exit {r['returncode']}) | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['strategy']} | {r.get('kernel_backend', 'auto')} | "
                     f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in r['val_loss'])} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{r['peak_mem_gib']:.1f} | {r.get('date', date)} |")
    save_results(args.out, "train_gpu", device, date, {**meta, "runs": results}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
