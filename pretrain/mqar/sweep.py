"""The MQAR grid: every (mixer, d_model, seq_len, lr, seed) setting, one ``python -m pretrain.mqar`` run each.

    python -m pretrain.mqar.sweep --out runs/mqar [--config configs/mqar/base.yaml] [grid flags] [key=value ...]
    python -m pretrain.mqar.sweep --out runs/mqar --dry-run            # list settings and which are done
    python -m pretrain.mqar.sweep --out runs/mqar --slurm-array       # write an sbatch array script
    python -m pretrain.mqar.sweep --out runs/mqar --task-index 7      # run setting 7 only (what the array runs)

The default grid is the ReBased paper's figure: mixers rebased, based; d_model 64, 128, 256, 512; seq_len 128,
256, 512, 1024, 2048; lr 5e-4, 1e-3, 3e-3, 1e-2; one seed (160 runs; the paper averaged 5 seeds: ``--seeds``). Extra ``key=value`` overrides go to every run (e.g.
``train.max_epochs=4``; anywhere on the command line, or after ``--``); the grid's own keys (model.mixer,
model.d_model, data.seq_len, train.lr, train.seed) are set by the grid flags instead. Setting i is the i-th of
the nested loops mixer > d_model > seq_len > lr > seed, so an index names the same setting as long as the grid
flags are the same.

Each setting writes ``OUT/<name>.json`` (its result, written atomically when the run ends) and ``OUT/<name>.log``
(the run's output, appended to on every attempt), ``<name>`` = ``rebased_d64_L256_lr0.001_s0``. A setting whose
result exists and was made with the same config is skipped; a result made with another config (other overrides,
base config or model YAML) is *stale*: the sweep refuses to start until it is moved away or ``--rerun-stale`` is given.

Placement: one worker per local GPU (``--gpus`` to choose them, as CUDA_VISIBLE_DEVICES entries; ``--runs-per-gpu``
to share one), each run pinned with ``CUDA_VISIBLE_DEVICES``; without a GPU (or ``--gpus none``), ``--workers N``
CPU processes (default 1), each with ``OMP_NUM_THREADS`` = cores / N. A failed run is reported (its log keeps the
exit code) and retried by the next invocation; the others go on.

Slurm: ``--slurm-array`` writes ``OUT/slurm/mqar_sweep.sbatch``, an array over the indices not done yet, each task
running ``--task-index $SLURM_ARRAY_TASK_ID`` on one GPU. The sbatch defaults (1 GPU, 8 CPUs, 8 h) are only a
start: set the cluster's with ``--slurm-opt partition=gpu --slurm-opt time=12:00:00`` (``KEY=`` drops a default).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import itertools
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pretrain.config import ConfigError, dotted_keys, parse_override, to_dict
from pretrain.mqar.config import REPO_ROOT, format_lr, load_mqar_config, setting_name
from pretrain.mqar.estimate import epoch_flops, measured_epoch_times, order_cheapest_first, print_estimate
from pretrain.mqar.results import check_result, read_result

DEFAULT_CONFIG = "configs/mqar/base.yaml"
DEFAULT_MIXERS = ("rebased", "based")
DEFAULT_D_MODELS = (64, 128, 256, 512)
DEFAULT_SEQ_LENS = (128, 256, 512, 1024, 2048)
DEFAULT_LRS = (5e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_SEEDS = (0,)

GRID_KEYS = ("model.mixer", "model.d_model", "data.seq_len", "train.lr", "train.seed")
# Set by the sweep itself: the result path, and no progress bars in log files (an override may turn them back on).
RESERVED_KEYS = (*GRID_KEYS, "output", "name")
SWEEP_DEFAULT_OVERRIDES = ("log.tqdm=false",)
# Config keys that do not change what a run computes: a result differing only in these is still current.
# (How a run is split into micro-batches, compiled and checkpointed changes rounding at most: the loss is the exact
# mean over each batch's query tokens either way.)
NON_RESULT_KEYS = ("output", "name", "log", "data.cache_dir", "train.device", "train.num_threads",
                   "train.eval_batch_size", "train.micro_batch_size", "train.micro_batch_tokens", "train.compile",
                   "train.loss_chunk_rows", "train.checkpoint", "train.attention_launch",
                   "train.fused_head_loss")  # the last: an option results of 2026-12-07 carry, since removed

DEFAULT_EPOCH_TIMES = sorted((REPO_ROOT / "benchmarks" / "results" / "mqar").glob("mqar_speed_*.json"))
DEFAULT_SLURM_OPTIONS = {"job-name": "mqar", "nodes": "1", "ntasks": "1", "gpus": "1", "cpus-per-task": "8",
                         "time": "08:00:00"}


@dataclass(frozen=True)
class Setting:
    index: int
    mixer: str
    d_model: int
    seq_len: int
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return setting_name(self.mixer, self.d_model, self.seq_len, self.lr, self.seed)

    def overrides(self) -> list[str]:
        return [f"model.mixer={self.mixer}", f"model.d_model={self.d_model}", f"data.seq_len={self.seq_len}",
                f"train.lr={format_lr(self.lr)}", f"train.seed={self.seed}"]


def enumerate_settings(mixers, d_models, seq_lens, lrs, seeds) -> list[Setting]:
    combos = itertools.product(mixers, d_models, seq_lens, lrs, seeds)
    return [Setting(i, m, d, L, lr, s) for i, (m, d, L, lr, s) in enumerate(combos)]


def result_path(out_dir: Path, setting: Setting) -> Path:
    return Path(out_dir) / f"{setting.name}.json"


def log_path(out_dir: Path, setting: Setting) -> Path:
    return Path(out_dir) / f"{setting.name}.log"


def _drop_key(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return
    tree.pop(last, None)


def result_relevant_config(config: dict) -> dict:
    """The config without the keys that do not change the result (paths, logging, device placement)."""
    config = copy.deepcopy(config)
    for key in NON_RESULT_KEYS:
        _drop_key(config, key)
    return config


def config_differences(expected: dict, found: dict) -> list[str]:
    """Dotted keys whose values differ, as 'key: found -> expected'."""
    a, b = dotted_keys(result_relevant_config(expected)), dotted_keys(result_relevant_config(found))
    return [f"{k}: {b.get(k, '<missing>')!r} -> {a.get(k, '<missing>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def recorded_keys(expected: dict, found: dict) -> dict:
    """``expected`` without the keys that ``found`` lacks: the model config is shared by the whole stack and grows,
    and a field added after a result was made defaults to the behaviour the result was made with."""
    return {k: recorded_keys(v, found[k]) if isinstance(v, dict) and isinstance(found[k], dict) else v
            for k, v in expected.items() if k in found}


@dataclass
class SettingStatus:
    setting: Setting
    state: str  # done | pending | stale | failed (pending, and the last attempt exited non-zero) | running
    result: dict | None = None
    differences: list[str] | None = None
    damaged: str | None = None  # a result file that is there but not a complete result: what is wrong with it


class Sweep:
    """A grid of settings over one base config and one set of extra overrides, with results under ``out_dir``."""

    def __init__(self, config: str, out_dir: str | os.PathLike, settings: list[Setting], overrides: list[str]):
        self.config = str(resolve_config_path(config))
        self.out_dir = Path(out_dir).resolve()
        self.settings = settings
        self.overrides = [*SWEEP_DEFAULT_OVERRIDES, *overrides]
        for text in overrides:
            key = ".".join(parse_override(text)[0])
            if key in RESERVED_KEYS:
                raise ConfigError(f"override '{text}': '{key}' is set by the sweep (use the grid flags "
                                  f"--mixers/--d-models/--seq-lens/--lrs/--seeds; results go to --out)")
        self._expected: dict[int, tuple] = {}

    def run_overrides(self, setting: Setting) -> list[str]:
        return [*self.overrides, *setting.overrides()]

    def _resolve(self, setting: Setting) -> tuple:
        """The run's config and its model config, loaded and as dicts (validated: a bad key or value fails here,
        naming the file and the key)."""
        if setting.index not in self._expected:
            cfg = load_mqar_config(self.config, self.run_overrides(setting))
            model_cfg = cfg.model_config()
            self._expected[setting.index] = (cfg, model_cfg, to_dict(cfg), to_dict(model_cfg))
        return self._expected[setting.index]

    def run_config(self, setting: Setting) -> tuple:
        """The run's MQARConfig and its ModelConfig, as loaded."""
        return self._resolve(setting)[:2]

    def expected_config(self, setting: Setting) -> dict:
        return self._resolve(setting)[2]

    def expected_model_config(self, setting: Setting) -> dict:
        """The resolved model: the run config names the model YAML, only this holds what the YAML said."""
        return self._resolve(setting)[3]

    def validate(self) -> None:
        for setting in self.settings:
            self.expected_config(setting)

    def status(self, setting: Setting) -> SettingStatus:
        path = result_path(self.out_dir, setting)
        result, damaged = check_result(path)
        if result is not None and not isinstance(result.get("config"), dict):  # nothing says what it ran
            result, damaged = None, f"{path}: no run config recorded"
        if result is not None:
            found, found_model = result["config"], result.get("model_config")
            diffs = config_differences(self.expected_config(setting), found)
            if isinstance(found_model, dict):  # an edited model YAML changes the run as much as an override
                expected_model = recorded_keys(self.expected_model_config(setting), found_model)
                diffs += [f"model_config.{d}" for d in config_differences(expected_model, found_model)]
            if diffs:
                return SettingStatus(setting, "stale", result, diffs)
            return SettingStatus(setting, "done", result)
        if is_running(path):
            return SettingStatus(setting, "running", damaged=damaged)
        rc = last_exit_code(log_path(self.out_dir, setting))
        return SettingStatus(setting, "failed" if rc not in (None, 0) else "pending", damaged=damaged)

    def statuses(self) -> list[SettingStatus]:
        return [self.status(s) for s in self.settings]

    def command(self, setting: Setting) -> list[str]:
        return [sys.executable, "-m", "pretrain.mqar", "--config", self.config, *self.run_overrides(setting),
                "--output", str(result_path(self.out_dir, setting))]

    def run_one(self, setting: Setting, env_updates: dict[str, str] | None = None,
                processes: dict | None = None, stopping: threading.Event | None = None) -> int:
        """Run one setting in a child process, its output appended to the log beside the result; the exit code.
        A child that ends once ``stopping`` is set was stopped by the sweep: the log says so (the setting stays
        pending, not failed)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(env_updates or {})
        # The child must import this checkout's pretrain also when the project is not pip-installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        cmd = self.command(setting)
        placement = " ".join(f"{k}={v!r}" for k, v in sorted((env_updates or {}).items()))
        with open(log_path(self.out_dir, setting), "a") as log:
            log.write(f"=== start {_now()} on {socket.gethostname()} {placement}\n$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
            if processes is not None:
                processes[setting.index] = proc
            try:
                rc = proc.wait()
            finally:
                if processes is not None:
                    processes.pop(setting.index, None)
            if stopping is not None and stopping.is_set():
                log.write(f"=== stopped with the sweep at {_now()}\n")
            else:
                log.write(f"=== exit code {rc} at {_now()}\n")
        return rc


def is_running(result: Path) -> bool:
    """A process (another sweep's, a Slurm task's) runs this setting now: it holds ``<result>.lock``."""
    lock = Path(str(result) + ".lock")
    if not lock.exists():
        return False
    try:
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when the file closes
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system: nothing to tell
        return False
    return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def last_exit_code(path: Path) -> int | None:
    """The exit code recorded at the end of the last attempt in a run's log (None: no finished attempt)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("=== exit code "):
            try:
                return int(line.split()[3])
            except (IndexError, ValueError):
                return None
        if line.startswith(("=== start ", "=== stopped ")):  # killed with its parent, or stopped by the sweep
            return None
    return None


def resolve_config_path(path: str) -> Path:
    """A config path as given (relative to the working directory), else relative to the repository root."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    if not p.exists():
        raise ConfigError(f"cannot read config file {path}: no such file")
    return p.resolve()


# ---------------------------------------------------------------- placement

def visible_gpus() -> list[str]:
    """The local GPUs as CUDA_VISIBLE_DEVICES entries (respecting an existing CUDA_VISIBLE_DEVICES)."""
    try:
        import torch  # only here: the sweep's own process needs torch for nothing else

        count = torch.cuda.device_count()
    except Exception:  # no usable CUDA runtime: a CPU machine
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [d.strip() for d in listed.split(",") if d.strip()]
        return ids[:count]
    return [str(i) for i in range(count)]


def worker_slots(gpus: str | None, workers: int | None, runs_per_gpu: int,
                 pending: int | None = None) -> list[dict[str, str]]:
    """One environment update per concurrent run: GPU pinning, or a CPU thread share. With ``pending`` settings
    fewer than the slots, a GPU gets only as many runs as there are to share it (a run records how many did)."""
    if gpus is None:
        gpu_ids = visible_gpus()
    elif gpus.strip().lower() in ("none", "cpu", ""):
        gpu_ids = []
    else:
        gpu_ids = list(dict.fromkeys(g.strip() for g in gpus.split(",") if g.strip()))  # each GPU once
    if gpu_ids and pending is not None:
        runs_per_gpu = max(1, min(runs_per_gpu, -(-pending // len(gpu_ids))))
    if gpu_ids:
        if workers is not None:
            print(f"sweep: --workers {workers} ignored: one worker per GPU ({len(gpu_ids)} GPUs, "
                  f"{runs_per_gpu} run(s) each)", file=sys.stderr)
        # MQAR_RUNS_PER_DEVICE: a run records it, so its epoch time can be read as GPU time (epoch time / runs);
        # set it beforehand when several sweeps share the GPUs
        share = os.environ.get("MQAR_RUNS_PER_DEVICE") or str(runs_per_gpu)
        return [{"CUDA_VISIBLE_DEVICES": g, "MQAR_RUNS_PER_DEVICE": share}
                for g in gpu_ids for _ in range(runs_per_gpu)]
    n = workers or 1
    threads = str(max(1, (os.cpu_count() or 1) // n))
    slot = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    return [dict(slot) for _ in range(n)]


def run_parallel(sweep: Sweep, todo: list[Setting], slots: list[dict[str, str]], log=print) -> dict[str, list]:
    """Run ``todo`` over the slots (one thread per slot starting one child at a time); failures do not stop others."""
    jobs: queue.Queue = queue.Queue()
    for s in todo:
        jobs.put(s)
    outcome = {"done": [], "failed": []}
    lock = threading.Lock()
    stop = threading.Event()
    processes: dict[int, subprocess.Popen] = {}
    started = [0]

    def worker(slot: dict[str, str]):
        where = f"GPU {slot['CUDA_VISIBLE_DEVICES']}" if slot.get("CUDA_VISIBLE_DEVICES") else "CPU"
        while not stop.is_set():
            try:
                setting = jobs.get_nowait()
            except queue.Empty:
                return
            with lock:
                started[0] += 1
                log(f"[{started[0]}/{len(todo)}] start #{setting.index} {setting.name} on {where}")
            t0 = time.time()
            if is_running(result_path(sweep.out_dir, setting)):  # taken by another sweep since the statuses
                with lock:
                    log(f"skipped #{setting.index} {setting.name}: another process is running it")
                continue
            rc = sweep.run_one(setting, slot, processes, stop)
            if stop.is_set():
                return
            result = read_result(result_path(sweep.out_dir, setting))
            with lock:
                if rc == 0 and result is not None:
                    outcome["done"].append(setting)
                    log(f"done #{setting.index} {setting.name}: best accuracy {result['best_accuracy']:.4f} "
                        f"({result.get('stopped_by')}, {time.time() - t0:.0f}s)")
                else:
                    outcome["failed"].append(setting)
                    log(f"FAILED #{setting.index} {setting.name}: exit code {rc}; log: "
                        f"{log_path(sweep.out_dir, setting)}")

    def interrupted(signum, frame):  # a scheduler's or kill's SIGTERM, a closed terminal: as Ctrl-C
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # the children would otherwise outlive the sweep and hold their settings' locks (a rerun failed on them)
    previous = ({sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
                if threading.current_thread() is threading.main_thread() else {})
    threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in slots]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        stop.set()
        log("sweep: interrupted; stopping the running settings (their results stay pending)")
        deadline = time.time() + 30
        while any(t.is_alive() for t in threads) and time.time() < deadline:
            for proc in list(processes.values()):  # again each round: a thread may start one as we stop
                if proc.poll() is None:
                    proc.terminate()
            for t in threads:
                t.join(timeout=0.2)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome


# ---------------------------------------------------------------- Slurm

def compress_indices(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (Slurm's --array syntax)."""
    parts, run = [], []
    for i in sorted(set(indices)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def grid_arguments(args) -> list[str]:
    """The sweep flags that define the grid and the runs (what every array task must repeat)."""
    out = ["--config", str(resolve_config_path(args.config)), "--out", str(Path(args.out).resolve()),
           "--mixers", *args.mixers, "--d-models", *map(str, args.d_models), "--seq-lens", *map(str, args.seq_lens),
           "--lrs", *map(format_lr, args.lrs), "--seeds", *map(str, args.seeds)]
    if args.rerun_stale:
        out.append("--rerun-stale")
    return out


def slurm_script(args, pending: list[int], total: int) -> str:
    options = dict(DEFAULT_SLURM_OPTIONS)
    for text in args.slurm_opt:
        key, sep, value = text.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"--slurm-opt '{text}' must look like KEY=VALUE (an sbatch option without '--')")
        if sep and not value:  # KEY= drops a default, e.g. gpus= when the cluster wants gres=gpu:a100:1
            options.pop(key, None)
        else:
            options[key] = value if sep else None  # KEY alone: a flag such as 'exclusive'
    out_dir = Path(args.out).resolve()
    options["output"] = str(out_dir / "slurm" / "%x-%A_%a.out")
    array = compress_indices(pending) + (f"%{args.max_concurrent}" if args.max_concurrent else "")
    options["array"] = array
    # a value with a space (an --out path) in double quotes, which sbatch reads as one value
    header = [f"#SBATCH --{k}" + ("" if v is None else f'="{v}"' if any(c.isspace() for c in v) else f"={v}")
              for k, v in options.items()]
    overrides = " ".join(shlex.quote(o) for o in args.overrides)
    sweep_cmd = ("\"$PYTHON\" -m pretrain.mqar.sweep " + " ".join(shlex.quote(a) for a in grid_arguments(args))
                 + ' --task-index "$SLURM_ARRAY_TASK_ID"' + (f" {overrides}" if overrides else ""))
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# MQAR sweep as a Slurm array, written {_now()} by:",
        f"#   {shlex.join(['python', '-m', 'pretrain.mqar.sweep', *args.argv])}",
        f"# Task i runs setting i of the {total}-setting grid ({len(pending)} not done when written); its result and",
        f"# log go to {out_dir}/<setting>.json/.log. List the settings: the same command with --dry-run.",
        *header,
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f"PYTHON=\"${{MQAR_PYTHON:-{sys.executable}}}\"",
        f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export WANDB_MODE=\"${WANDB_MODE:-offline}\"",
        f"exec {sweep_cmd}",
        "",
    ])


# ---------------------------------------------------------------- CLI

def _print_statuses(statuses: list[SettingStatus], out_dir: Path) -> None:
    width = max((len(s.setting.name) for s in statuses), default=10)
    for st in statuses:
        extra = ""
        if st.state == "done":
            extra = f"best accuracy {st.result['best_accuracy']:.4f}"
        elif st.state == "stale":
            extra = "made with another config: " + "; ".join(st.differences[:3]) + (
                " ..." if len(st.differences) > 3 else "")
        elif st.state == "failed":
            extra = f"last attempt failed: {log_path(out_dir, st.setting)}"
        print(f"{st.setting.index:4d}  {st.setting.name:<{width}}  {st.state:<7}  {extra}".rstrip())
    counts = {k: sum(s.state == k for s in statuses) for k in ("done", "pending", "failed", "stale", "running")}
    print(f"{len(statuses)} settings: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"  (results: {out_dir})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.mqar.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder: OUT/<setting>.json and OUT/<setting>.log")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"base MQAR config (default {DEFAULT_CONFIG})")
    p.add_argument("--mixers", nargs="+", default=list(DEFAULT_MIXERS), metavar="MIXER")
    p.add_argument("--d-models", nargs="+", type=int, default=list(DEFAULT_D_MODELS), metavar="D")
    p.add_argument("--seq-lens", nargs="+", type=int, default=list(DEFAULT_SEQ_LENS), metavar="L")
    p.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS), metavar="LR")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), metavar="SEED")
    p.add_argument("--dry-run", action="store_true",
                   help="list the settings and their state, and estimate the GPU time of the pending ones; run nothing")
    p.add_argument("--epoch-times", nargs="*", default=[str(p) for p in DEFAULT_EPOCH_TIMES if p.exists()],
                   metavar="FILE", help="measured epoch times for --dry-run's estimate: mqar_speed.json tables or "
                   "result folders (default: the H200 table in benchmarks/results/mqar; OUT's results always count)")
    p.add_argument("--rerun-stale", action="store_true",
                   help="rerun (and overwrite) results that were made with another config")
    place = p.add_argument_group("local placement")
    place.add_argument("--gpus", help="comma-separated GPU ids to use (default: all visible); 'none': CPU only")
    place.add_argument("--runs-per-gpu", type=int, default=1, help="concurrent runs per GPU (default 1)")
    place.add_argument("--workers", type=int, help="CPU processes when there is no GPU (default 1)")
    place.add_argument("--order", choices=("grid", "cheapest-first"), default="grid",
                       help="order in which pending settings start: grid (index order) or cheapest-first (by "
                            "estimated GPU seconds per epoch, from --epoch-times; the most results per GPU-hour "
                            "when the time is limited)")
    slurm = p.add_argument_group("Slurm")
    slurm.add_argument("--slurm-array", action="store_true",
                       help="write OUT/slurm/mqar_sweep.sbatch (an array over the settings not done) and print it")
    slurm.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                       help="sbatch option for the script, e.g. partition=gpu, time=12:00:00, account=x (repeatable)")
    slurm.add_argument("--max-concurrent", type=int, help="array tasks running at once (--array=...%%N)")
    slurm.add_argument("--task-index", type=int, help="run only setting I (what each array task does)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run, e.g. train.max_epochs=4")
    return p


def split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from the flags, wherever they stand (argparse alone would read an override
    that follows ``--seeds 0 1`` as a seed); everything after ``--`` is an override."""
    takes_value = {o for a in parser._actions if a.option_strings and a.nargs is None for o in a.option_strings}
    flags, overrides, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            overrides.extend(argv[i + 1:])
            break
        if token in takes_value and i + 1 < len(argv):  # an option's own value may contain '=' (--slurm-opt a=b)
            flags += [token, argv[i + 1]]
            i += 2
            continue
        (overrides if "=" in token and not token.startswith("-") else flags).append(token)
        i += 1
    return flags, overrides


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, overrides = split_overrides(parser, argv)
    args = parser.parse_args(flags)
    args.argv = argv
    args.overrides = [*args.overrides, *overrides]
    if args.runs_per_gpu < 1 or (args.workers is not None and args.workers < 1) or (
            args.max_concurrent is not None and args.max_concurrent < 1):
        print("error: --runs-per-gpu, --workers and --max-concurrent must be >= 1", file=sys.stderr)
        return 2
    for flag, values in (("--mixers", args.mixers), ("--d-models", args.d_models), ("--seq-lens", args.seq_lens),
                         ("--lrs", args.lrs), ("--seeds", args.seeds)):
        if len(set(values)) != len(values):
            print(f"error: {flag} lists a value twice: {values}", file=sys.stderr)
            return 2
    settings = enumerate_settings(args.mixers, args.d_models, args.seq_lens, args.lrs, args.seeds)
    try:
        sweep = Sweep(args.config, args.out, settings, args.overrides)
        if args.task_index is not None:
            if not 0 <= args.task_index < len(settings):
                print(f"error: --task-index {args.task_index} is outside the grid's 0..{len(settings) - 1}",
                      file=sys.stderr)
                return 2
            sweep.settings = [settings[args.task_index]]
        sweep.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    statuses = sweep.statuses()
    for st in statuses:
        if st.damaged:
            print(f"warning: {st.damaged}: setting #{st.setting.index} counts as not done and runs again",
                  file=sys.stderr)
    first_cfg = sweep.run_config(sweep.settings[0])[0]  # the grid's own keys applied (validated above)
    train_cfg = first_cfg.train

    def epoch_times():  # reads every result and speed table: only for the estimate and the order that use it
        return measured_epoch_times([*args.epoch_times, sweep.out_dir], train_cfg.precision, first_cfg.data.num_train)

    if args.dry_run:
        _print_statuses(statuses, sweep.out_dir)
        print_estimate(statuses, epoch_times(), train_cfg.max_epochs,
                       lambda s: epoch_flops(*sweep.run_config(s)), train_cfg.precision)
        return 0
    stale = [s for s in statuses if s.state == "stale"]
    if stale and not args.rerun_stale:
        first = stale[0]
        print(f"error: {len(stale)} result(s) in {sweep.out_dir} were made with another config, e.g. "
              f"{result_path(sweep.out_dir, first.setting)}: {'; '.join(first.differences[:5])}. Use another --out, "
              f"move them away, or pass --rerun-stale to replace them.", file=sys.stderr)
        return 2
    todo = [s.setting for s in statuses if s.state not in ("done", "running")]  # running: another process's
    if args.order == "cheapest-first":
        todo = order_cheapest_first(todo, epoch_times())

    if args.slurm_array:
        if args.task_index is not None:
            print("error: --slurm-array writes the array over the whole grid; drop --task-index", file=sys.stderr)
            return 2
        if not todo:
            print(f"all {len(settings)} settings are done in {sweep.out_dir}; no array to submit")
            return 0
        try:
            script = slurm_script(args, [s.index for s in todo], len(settings))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        path = sweep.out_dir / "slurm" / "mqar_sweep.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
        print(script)
        print(f"# written to {path}; submit with: sbatch {shlex.quote(str(path))}")
        return 0

    if args.task_index is not None:
        setting = sweep.settings[0]
        if not todo:
            print(f"setting #{setting.index} {setting.name} is done: {result_path(sweep.out_dir, setting)}")
            return 0
        print(f"running setting #{setting.index} {setting.name}; log: {log_path(sweep.out_dir, setting)}", flush=True)
        rc = sweep.run_one(setting)
        result = read_result(result_path(sweep.out_dir, setting))
        if rc == 0 and result is not None:
            print(f"done: best accuracy {result['best_accuracy']:.4f} -> {result_path(sweep.out_dir, setting)}")
            return 0
        print(f"FAILED (exit code {rc}); see {log_path(sweep.out_dir, setting)}", file=sys.stderr)
        return rc or 1

    done = len(settings) - len(todo)
    if not todo:
        print(f"all {len(settings)} settings are done in {sweep.out_dir}")
        return 0
    slots = worker_slots(args.gpus, args.workers, args.runs_per_gpu, pending=len(todo))
    where = (f"{len(slots)} worker(s) on GPU(s) {sorted({s['CUDA_VISIBLE_DEVICES'] for s in slots})}"
             if slots[0].get("CUDA_VISIBLE_DEVICES") else
             f"{len(slots)} CPU worker(s), {slots[0]['OMP_NUM_THREADS']} thread(s) each")
    print(f"sweep: {len(settings)} settings, {done} done, {len(todo)} to run on {where}; results in {sweep.out_dir}",
          flush=True)
    try:
        outcome = run_parallel(sweep, todo, slots, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        return 130
    print(f"sweep: {len(outcome['done'])} finished, {len(outcome['failed'])} failed, {done} were already done")
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
