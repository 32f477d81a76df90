"""Shared helpers for the trainer tests: tiny synthetic shards (session scope), a runner that starts
``python -m pretrain.train`` (1 process) or ``torchrun --nproc_per_node=N`` on a free port, and metrics parsing.

Every run here uses the tiny ReBased hybrid (d_model 64, 4 layers), seq_len 32, global batch 8, 20 steps, fp32 on
CPU with gloo; OMP_NUM_THREADS=1 and WANDB_MODE=disabled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    from pretrain.data.synthetic import write_synthetic_shard

    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shard(str(root / "train_a"), 60_000, 1024, seed=0)
    write_synthetic_shard(str(root / "train_b"), 30_000, 1024, seed=1)
    write_synthetic_shard(str(root / "valid"), 8_000, 1024, seed=2)
    return root


@pytest.fixture(scope="session")
def ds_config(tmp_path_factory):
    """ZeRO config for tests: every parameter partitioned under stage 3 (the shipped config keeps small ones)."""
    path = tmp_path_factory.mktemp("ds") / "zero.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "stage3_param_persistence_threshold": 0,
                                                      "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 4096}}))
    return str(path)


def base_config(shards: Path, out_dir: Path, **extra) -> dict:
    cfg = {
        "model": str(REPO / "configs/models/tiny_rebased.yaml"),
        "out_dir": str(out_dir),
        "data": {"train": [{"path": str(shards / "train_a"), "weight": 2.0},
                           {"path": str(shards / "train_b"), "weight": 1.0}],
                 "seq_len": 32, "mix_block": 100},
        "training": {"max_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 2, "seed": 7,
                     "inject_nan_at_steps": [3]},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "schedule": "cosine"},
        "checkpoint": {"every": 5, "keep_last": 2},
        "logging": {"every": 1, "progress_bar": False},
    }
    for key, value in extra.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def command(config_path: Path, nproc: int, strategy: str, overrides=(), entry=("-m", "pretrain.train")) -> list[str]:
    """``entry``: how Python starts the trainer; a test may pass ``("-c", code)`` to patch it before ``main()``."""
    args = [*entry, "--config", str(config_path), f"parallel.strategy={strategy}", *overrides]
    if nproc == 1 and strategy == "single":
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1", *args]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
             PYTHONWARNINGS="ignore")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def write_config(shards, out_dir: Path, **extra) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(base_config(shards, out_dir, **extra)))
    return path


def run(shards, out_dir: Path, nproc: int, strategy: str, overrides=(), timeout=240, extra_env=None,
        check=True, entry=("-m", "pretrain.train"), **cfg_extra) -> subprocess.CompletedProcess:
    path = write_config(shards, out_dir, **cfg_extra)
    p = subprocess.run(command(path, nproc, strategy, overrides, entry), cwd=REPO, env=env(**(extra_env or {})),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def start(shards, out_dir: Path, nproc: int, strategy: str, overrides=(), extra_env=None, **cfg_extra):
    """Start a run in its own process group (so the whole tree can be killed)."""
    path = write_config(shards, out_dir, **cfg_extra)
    log = open(out_dir.parent / f"{out_dir.name}.log", "w")
    return subprocess.Popen(command(path, nproc, strategy, overrides), cwd=REPO, env=env(**(extra_env or {})),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def records(out_dir: Path) -> list[dict]:
    f = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def losses(out_dir: Path) -> dict[int, dict]:
    """Last training record per step (a resumed run appends; the later record of a step wins)."""
    out = {}
    for r in records(out_dir):
        if "loss" in r:
            out[r["step"]] = r
    return out


def assert_same_losses(got: dict, ref: dict, context: str):
    """Every step 1..STEPS present, with the reference run's loss and batch fingerprint to the last bit."""
    assert sorted(got) == list(range(1, STEPS + 1)), context
    mismatched = [s for s in got if got[s]["loss"] != ref[s]["loss"] or got[s]["batch_fp"] != ref[s]["batch_fp"]]
    assert not mismatched, f"{context}: steps {mismatched} differ from the uninterrupted run"


def wait_for_step(out_dir: Path, step: int, proc, timeout=180) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = max(losses(out_dir), default=0)
        if got >= step:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def torchrun_workers(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a torchrun launcher started (its children with RANK set; Linux /proc),
    to signal one rank on its own as a scheduler's per-task signal would."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile, or not ours
        rank = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if parent == launcher_pid and rank:
            workers[int(rank[0])] = int(entry.name)
    return workers


def kill_run(proc, sig=signal.SIGKILL):
    """Signal a run started by ``start``, workers included, and reap it. torchrun starts every worker in a session
    of its own, so signalling the launcher's process group alone would leave the workers running (and training)."""
    workers = torchrun_workers(proc.pid)
    os.killpg(proc.pid, sig)
    for pid in workers.values():
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait()


def as_float(v) -> float:
    return float(v)  # JSONL writes non-finite numbers as the strings "nan" / "inf"


def max_rel_diff(a: dict[int, dict], b: dict[int, dict], key: str = "loss") -> float:
    """Largest relative difference of ``key`` over the steps of ``a``; both non-finite at a step counts as equal
    and non-finite in only one as infinitely different."""
    import math

    worst = 0.0
    for step, ra in a.items():
        x, y = as_float(ra[key]), as_float(b[step][key])
        if not (math.isfinite(x) and math.isfinite(y)):
            if math.isfinite(x) != math.isfinite(y):
                return math.inf
            continue
        worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return worst


class Runs:
    """Memoised reference runs shared by the test modules (each costs a few seconds to tens of seconds)."""

    def __init__(self, shards, root: Path, ds_config: str):
        self.shards, self.root, self.ds_config, self.cache = shards, root, ds_config, {}

    def get(self, name: str, nproc: int, strategy: str, overrides=(), **cfg_extra) -> Path:
        if name not in self.cache:
            out = self.root / name
            if strategy == "deepspeed":
                overrides = [f"parallel.deepspeed_config={self.ds_config}", *overrides]
            run(self.shards, out, nproc, strategy, overrides, **cfg_extra)
            self.cache[name] = out
        return self.cache[name]

    def overrides(self, key: str) -> list[str]:
        nproc, strategy, overrides = REFERENCE_RUNS[key]
        if strategy == "deepspeed":
            return [f"parallel.deepspeed_config={self.ds_config}", *overrides]
        return list(overrides)

    def reference(self, key: str) -> Path:
        nproc, strategy, overrides = REFERENCE_RUNS[key]
        return self.get(f"ref_{key}", nproc, strategy, overrides)


# name -> (processes, strategy, overrides). Activation checkpointing is on in some so that the equivalence test
# also shows it works (and changes nothing) under FSDP2 and ZeRO-3.
REFERENCE_RUNS = {
    "single": (1, "single", []),
    "ddp": (2, "ddp", []),
    "fsdp": (2, "fsdp", ["training.activation_checkpointing=full"]),
    "zero1": (2, "deepspeed", ["parallel.zero_stage=1"]),
    "zero2": (2, "deepspeed", ["parallel.zero_stage=2", "training.activation_checkpointing=selective"]),
    "zero3": (2, "deepspeed", ["parallel.zero_stage=3", "training.activation_checkpointing=full"]),
}


@pytest.fixture(scope="session")
def runs(shards, ds_config, tmp_path_factory):
    return Runs(shards, tmp_path_factory.mktemp("runs"), ds_config)
