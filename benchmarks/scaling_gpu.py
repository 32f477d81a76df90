"""Weak scaling of the training step over the GPUs of one node: one model with FSDP2 and DeepSpeed ZeRO-2/3 on
1, 2, 4 ... GPUs, a fixed micro batch per GPU and no gradient accumulation (global batch = micro × GPUs), so every
GPU processes the same tokens per step at every GPU count. Efficiency at n GPUs = tokens/s at n / (n × tokens/s at
1 GPU with the same strategy).

    python -m benchmarks.scaling_gpu --data DIR --vocab-size N [--model rebased_360m] [--strategies fsdp,zero2,zero3]
        [--gpus 1,2,4] [--seq-len 2048] [--micro 32] [--steps 40] [--ac full] [--run-timeout 240] [--merge JSON]
        [--out DIR]

DIR is a tokenize_pile.py output (only train/ is read). Each run is ``NPROC_PER_NODE=n bash launch/pretrain.sh``
with train_gpu.py's run config, changed as in scaling_run_config; bf16, no validation, no checkpoints, wandb off.
Results go to benchmarks/results/scaling_gpu_<device>_<date>.{json,md} (or --out); --merge keeps an earlier
file's runs, so a sweep can be split into several calls (e.g. one strategy each). Without GPUs the ranks are CPU
processes (gloo), which only checks that the sweep works.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from benchmarks.results_io import save_results
from benchmarks.train_gpu import run_config, summarise

ROOT = Path(__file__).resolve().parents[1]
# name on the command line: (parallel.strategy, ZeRO stage, label in the table)
STRATEGIES = {"fsdp": ("fsdp", None, "FSDP2"), "zero2": ("deepspeed", 2, "DeepSpeed ZeRO-2"),
              "zero3": ("deepspeed", 3, "DeepSpeed ZeRO-3")}
KILL_GRACE_S = 30  # after SIGTERM on a timed-out run, before SIGKILL


def scaling_run_config(strategy: str, n_gpus: int, args, out_dir: Path) -> dict:
    """train_gpu.py's run config with global batch = micro × n_gpus (no accumulation), the chosen ZeRO stage,
    no validation, no checkpoint saves and one metrics record per step."""
    parallel_strategy, zero_stage, _ = STRATEGIES[strategy]
    cfg = run_config(args.model, parallel_strategy, argparse.Namespace(**vars(args), batch=args.micro * n_gpus),
                     out_dir)
    del cfg["data"]["valid"]
    cfg["training"].update(activation_checkpointing=args.ac, eval_every=0)
    if zero_stage:
        cfg["parallel"].update(deepspeed_config=f"configs/deepspeed/zero{zero_stage}.json", zero_stage=zero_stage)
    # save_on_signal off: SIGTERM on a timed-out run ends it at once instead of saving a checkpoint
    cfg["checkpoint"].update(save_final=False, save_on_signal=False)
    cfg["logging"]["every"] = 1
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_tree(pid: int) -> None:
    """SIGTERM the launcher and all its descendants (torchrun starts each rank in a session of its own, so a
    process-group signal would miss them), then SIGKILL what is left after KILL_GRACE_S."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=KILL_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def launch(cfg_path: Path, n_gpus: int, log_path: Path, timeout_s: float) -> int | None:
    """Run the launcher with n_gpus processes, output to log_path; the exit code, or None after a timeout."""
    # MASTER_PORT: the deepspeed launcher's rendezvous port (torchrun --standalone picks its own)
    env = {**os.environ, "NPROC_PER_NODE": str(n_gpus), "MASTER_PORT": str(free_port()), "WANDB_MODE": "disabled"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "launch/pretrain.sh", str(cfg_path)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_tree(proc.pid)
            proc.wait()
            return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model", default="rebased_360m", help="configs/models name")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"of {', '.join(STRATEGIES)}")
    p.add_argument("--gpus", default="1,2,4", help="GPU (process) counts; 1 is the baseline of the efficiency")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro", type=int, default=32,
                   help="sequences per GPU per step; at 8 x 2048 tokens the eager step of the 360M model is bound by "
                        "the host's kernel launches, and per-GPU throughput then varies by +-30%% between runs")
    p.add_argument("--steps", type=int, default=40, help="the median skips the first quarter (warm-up)")
    p.add_argument("--ac", choices=("none", "full"), default="full", help="activation checkpointing")
    p.add_argument("--run-timeout", type=float, default=240, help="seconds per run, launch to exit")
    p.add_argument("--merge", help="an earlier results JSON of this script: its runs are kept unless rerun here "
                                   "(same device kind and settings assumed), e.g. to split a sweep over sessions")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    strategies = args.strategies.split(",")
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")

    import torch

    gpus_available = torch.cuda.device_count()
    meta = {"device": torch.cuda.get_device_name() if gpus_available else "cpu", "gpus_available": gpus_available,
            "date": dt.date.today().isoformat(), "command": " ".join([sys.executable, *sys.argv]),
            "torch": torch.__version__, "deepspeed": deepspeed_version(), "model": args.model,
            "seq_len": args.seq_len, "micro_batch": args.micro, "steps": args.steps, "precision": "bf16",
            "activation_checkpointing": args.ac, "kernel_backend": os.environ.get("REBASED_KERNEL_BACKEND", "auto"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    work = Path(tempfile.mkdtemp(prefix="scaling_gpu_"))
    runs = json.loads(Path(args.merge).read_text())["runs"] if args.merge else []
    for strategy in strategies:
        for n_gpus in [int(n) for n in args.gpus.split(",")]:
            name = f"{strategy}_{n_gpus}gpu"
            entry = {"strategy": strategy, "gpus": n_gpus, "global_batch": args.micro * n_gpus, "date": meta["date"]}
            if gpus_available and n_gpus > gpus_available:
                entry.update(status="skipped", error_tail=f"{n_gpus} GPUs asked, {gpus_available} available")
            else:
                cfg = scaling_run_config(strategy, n_gpus, args, work / name)
                cfg_path, log_path = work / f"{name}.yaml", work / f"{name}.log"
                cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                print(f"\n=== {name}: NPROC_PER_NODE={n_gpus} bash launch/pretrain.sh {cfg_path}  (log {log_path})",
                      flush=True)
                t0 = time.perf_counter()
                returncode = launch(cfg_path, n_gpus, log_path, args.run_timeout)
                entry.update(returncode=returncode, wall_s=round(time.perf_counter() - t0, 1), log=str(log_path),
                             run_config=cfg)
                if returncode == 0:
                    entry.update(status="ok", **summarise(work / name / "metrics.jsonl"))
                    # tokens_per_s in metrics.jsonl is already global: rank 0 times each step, and a step is
                    # global_batch_size × seq_len tokens over all ranks (pretrain/train.py); mfu is per GPU.
                    entry["tokens_per_s_per_gpu"] = entry["tokens_per_s"] / n_gpus
                else:
                    status = f"failed (exit {returncode})" if returncode is not None else "timed out"
                    entry.update(status=status, error_tail=log_path.read_text(errors="replace")[-3000:])
            runs = [r for r in runs if (r["strategy"], r["gpus"]) != (strategy, n_gpus)] + [entry]
            add_efficiency(runs)
            print(json.dumps({k: v for k, v in entry.items() if k not in ("loss_curve", "run_config")}, indent=1),
                  flush=True)
            stem = save_results(args.out, "scaling_gpu", meta["device"], meta["date"], {**meta, "runs": runs},
                                markdown(runs, meta))
    print("\n" + markdown(runs, meta) + f"\nsaved {stem}.{{json,md}}")


def deepspeed_version() -> str | None:
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return None


def add_efficiency(runs: list[dict]) -> None:
    """Weak-scaling efficiency of each finished run against the 1-GPU run of its strategy (None without one)."""
    baseline = {r["strategy"]: r["tokens_per_s"] for r in runs if r["gpus"] == 1 and r["status"] == "ok"}
    for r in runs:
        if r["status"] == "ok":
            base = baseline.get(r["strategy"])
            r["efficiency"] = r["tokens_per_s"] / (r["gpus"] * base) if base else None


def markdown(runs: list[dict], meta: dict) -> str:
    lines = [f"# Weak scaling on one node: {meta['device']} ({meta['gpus_available']} GPUs available), {meta['date']}",
             "", f"Command: `{meta['command']}`  ",
             f"torch {meta['torch']}, deepspeed {meta['deepspeed']}; model {meta['model']}, seq_len "
             f"{meta['seq_len']}, micro batch {meta['micro_batch']} per GPU and no gradient accumulation (global "
             f"batch = micro × GPUs), {meta['steps']} steps, bf16, activation checkpointing "
             f"{meta['activation_checkpointing']}, attention kernels {meta['kernel_backend']}, OMP_NUM_THREADS "
             f"{meta.get('omp_num_threads') or 'launcher default'}. tokens/s is the global "
             f"throughput, the median over steps after the first quarter; efficiency = tokens/s at n GPUs / "
             f"(n × tokens/s at 1 GPU, same strategy); MFU per GPU; peak memory of rank 0.", "",
             "| strategy | GPUs | global batch | tokens/s | tokens/s per GPU | efficiency | MFU | peak mem GiB "
             "| loss first → last | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (list(STRATEGIES).index(r["strategy"]), r["gpus"])):
        label = STRATEGIES[r["strategy"]][2]
        if r["status"] != "ok":
            lines.append(f"| {label} | {r['gpus']} | {r['global_batch']} | | | | | | | {r['status']} |")
            continue
        eff = f"{100 * r['efficiency']:.1f}%" if r["efficiency"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "n/a"  # recorded on CUDA only
        lines.append(f"| {label} | {r['gpus']} | {r['global_batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {eff} | {mfu} | {mem} | "
                     f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | ok |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
