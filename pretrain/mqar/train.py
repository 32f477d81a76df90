"""Train and evaluate one MQAR setting; returns (and optionally writes) a result dict.

The protocol follows the ReBased paper's sweep: AdamW (weight decay 0.1 on every parameter), a cosine learning rate
over ``max_epochs`` stepped once per epoch (no warm-up), no gradient clipping, a validation pass after every
epoch, early stop once validation accuracy exceeds ``early_stop_accuracy``. Accuracy is the fraction of query
positions (over the whole test split) whose argmax is the bound value; the reported metric is the best
validation accuracy over epochs (what the paper's figure plots), the last one is recorded too.

Speed without changing the result: only the final states at the query positions are normed and projected, and
the LM head and the cross-entropy run fused in chunks of query rows (``chunked_cross_entropy``: no [B, N, vocab]
logits tensor lives beyond one chunk); the loss is the exact mean over all query tokens of the optimizer batch,
whatever the micro-batch; a short last micro-batch is padded with ignored rows, so every step has one shape
(compiled once); the model body is compiled on CUDA; losses stay on the device until the epoch ends.

With ``output`` set, the run's state is saved after every epoch to ``<output>.ckpt`` and a rerun resumes from it
(same numbers as an uninterrupted run); the file is removed when the result is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import math
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH
from pretrain.config import ConfigError, to_dict
from pretrain.models import build_model, count_parameters
from pretrain.models.loss import chunked_cross_entropy
from pretrain.mqar.config import MQARConfig
from pretrain.mqar.data import IGNORE_INDEX, MQARSplit, load_mqar
from pretrain.atomic import write_bytes_atomic, write_json_atomic
from pretrain.mqar.results import SCHEMA
from pretrain.mqar.sweep import config_differences, result_relevant_config
from pretrain.training.metrics import init_wandb

CHECKPOINT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    """train.device on this machine; ConfigError when it asks for a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"train.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit(here: str | None = None) -> str | None:
    """HEAD's commit of the checkout holding ``here`` (default: this code), with "-dirty" appended when tracked files
    differ from it (uncommitted changes, or a copied tree whose .git is older than its files): then only
    ``source_digest`` names the code that ran. None outside a git checkout."""
    here = here or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        commit = head.stdout.strip()
        if head.returncode or not commit:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=30, cwd=here)
        return commit + "-dirty" if status.returncode or status.stdout.strip() else commit
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 (12 hex) of the code and configs a run executes (pretrain/, kernels/, configs/): names the code also
    where git's HEAD does not (a copied tree, uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for path in sorted(p for d in ("pretrain", "kernels", "configs") for p in (root / d).rglob("*")
                       if p.suffix in (".py", ".yaml")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def query_logits(model, inputs: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Logits [B, N, vocab] at positions qpos [B, N] of inputs [B, T]."""
    return model.lm_head(model.hidden_states(inputs, select=qpos))


def _padded(idx: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """idx grown to ``size`` rows by repeating its first example (the copies' labels are ignored), and the count
    of real rows: every micro-batch then has one shape, so a compiled body is built once."""
    real = idx.numel()
    if real < size:
        idx = torch.cat([idx, idx[:1].expand(size - real)])
    return idx, real


def _query_labels(split: MQARSplit, idx: torch.Tensor, real: int) -> torch.Tensor:
    values = split.values[idx]
    if real < values.shape[0]:
        values = values.clone()
        values[real:] = IGNORE_INDEX
    return values


_EVAL_LOGITS = 1 << 26  # logits per chunk of the evaluation's head (256 MiB in fp32)


@torch.no_grad()
def evaluate(hidden_fn, lm_head, split: MQARSplit, batch_size: int, autocast) -> dict:
    """Validation loss (mean over query tokens) and accuracy (argmax == bound value) over the whole split."""
    correct = torch.zeros((), dtype=torch.long, device=split.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.device)
    total = 0
    for start in range(0, len(split), batch_size):
        idx, real = _padded(torch.arange(start, min(start + batch_size, len(split)), device=split.device),
                            batch_size)
        inputs, qpos = split.inputs(idx), split.qpos[idx]
        with autocast():
            hidden = hidden_fn(inputs, qpos)[:real]
        values = split.values[idx[:real]]
        # the head over a few sequences at a time: the whole batch's fp32 logits are GiBs at seq 2048 (one run
        # out of six sharing a GPU ran out of memory here), a chunk's at most _EVAL_LOGITS elements
        rows = max(1, _EVAL_LOGITS // (values.shape[1] * lm_head.weight.shape[0]))
        for h, v in zip(hidden.split(rows), values.split(rows)):
            with autocast():
                logits = lm_head(h)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), v.flatten(), reduction="sum")
            correct += (logits.argmax(-1) == v).sum()
        total += values.numel()
    return {"valid_loss": loss_sum.item() / max(total, 1), "valid_accuracy": correct.item() / max(total, 1)}


def _wandb_run(cfg: MQARConfig):
    """The trainer's W&B init (offline needs no account; a failing online init falls back to offline)."""
    if cfg.log.wandb != "disabled":
        os.makedirs(cfg.log.wandb_dir, exist_ok=True)
    return init_wandb(os.environ.get("WANDB_MODE") or cfg.log.wandb, project=cfg.log.wandb_project,
                      name=cfg.run_name(), dir=cfg.log.wandb_dir, config=to_dict(cfg), reinit=True)


# train.* limits a checkpoint may be resumed under with other values (the result records the final ones)
RESUMABLE_LIMITS = ("max_steps", "time_limit_s")


def epoch_lr(cfg: MQARConfig, epoch: int) -> float:
    if cfg.train.schedule == "constant":
        return cfg.train.lr
    return cfg.train.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.train.max_epochs))


@dataclass
class Progress:
    """What a run has done so far: saved with the weights after every epoch, so a rerun resumes exactly."""

    epoch: int = 0  # epochs finished
    step: int = 0
    examples_seen: int = 0
    best: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)
    train_s: float = 0.0
    eval_s: float = 0.0
    elapsed_s: float = 0.0  # wall time of earlier attempts
    attempts: int = 1


class MQARRun:
    """One setting's model, optimizer, data and progress on one device."""

    def __init__(self, cfg: MQARConfig, log=print):
        self.cfg, self.log = cfg, log
        tc = cfg.train
        self.t_start = time.time()
        self.device = resolve_device(tc.device)
        if tc.num_threads is not None:
            torch.set_num_threads(tc.num_threads)
        torch.manual_seed(tc.seed)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.manual_seed_all(tc.seed)
            torch.backends.cuda.matmul.allow_tf32 = tc.precision in ("tf32", "bf16")
            torch.backends.cudnn.allow_tf32 = tc.precision in ("tf32", "bf16")
            CHUNK_LAUNCH.update(fp32_dot="tf32x3" if tc.precision == "tf32x3" else "ieee")
        CHUNK_LAUNCH.update(**tc.attention_launch)  # checked when the config was loaded
        # tf32x3: the attention kernels' products (above) and the LM head's three matmuls as 3xTF32
        self.fp32_dot = "tf32x3" if tc.precision == "tf32x3" else "ieee"
        bf16 = tc.precision == "bf16" and cuda
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext

        self.spec = cfg.data.spec()
        self.data = load_mqar(self.spec, cfg.data.cache_dir, device=self.device, log=log)
        self.data_s = time.time() - self.t_start
        self.model_cfg = cfg.model_config()
        self.model = build_model(self.model_cfg).to(self.device)
        self.params = count_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                           betas=tuple(tc.betas), fused=cuda or None)
        self.micro = cfg.micro_batch_size()
        self.eval_bs = tc.eval_batch_size or self.micro
        self.compiled = cuda if tc.compile is None else tc.compile
        if self.compiled:
            body = torch.compile(self.model.hidden_states, dynamic=False)
            self.hidden = lambda inputs, qpos: body(inputs, select=qpos)
        else:
            self.hidden = lambda inputs, qpos: self.model.hidden_states(inputs, select=qpos)
        self.perm_gen = torch.Generator().manual_seed(tc.seed)
        self.progress = Progress()
        self.checkpoint_path = cfg.checkpoint_path()
        self.resumed_from = self._resume() if self.checkpoint_path is not None else None

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_config(self) -> dict:
        """What a checkpoint must match to be resumed: the result-relevant run config without the limits that only
        say where a run stops (the trajectory up to there does not depend on them: a rerun may raise them), plus
        the resolved model config (a model YAML edited between attempts changes the model, not the run config)."""
        config = result_relevant_config(to_dict(self.cfg))
        for key in RESUMABLE_LIMITS:
            config["train"].pop(key, None)
        return {**config, "model_config": to_dict(self.model_cfg)}

    def save_checkpoint(self) -> None:
        progress = asdict(self.progress)
        progress["elapsed_s"] += time.time() - self.t_start  # this attempt's wall time so far
        state = {
            "version": CHECKPOINT_VERSION, "config": self._checkpoint_config(), "progress": progress,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "perm_generator": self.perm_gen.get_state(), "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.checkpoint_path, buffer.getvalue())

    def _resume(self) -> str | None:
        path = self.checkpoint_path
        if not path.exists():
            return None
        try:
            # to the CPU: the generator states must stay CPU byte tensors (a CUDA map_location moved them and every
            # resume on a GPU failed); load_state_dict moves weights and moments to where the parameters live
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
                raise ValueError("not an MQAR run checkpoint of this version")
            saved, now = state.get("config"), self._checkpoint_config()
            if saved != now:
                diffs = config_differences(now, saved) if isinstance(saved, dict) else ["no config recorded"]
                listed = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
                self.log(f"mqar: {path} was saved by a run with another config ({listed}); starting afresh")
                return None
            self._check_checkpoint(state)
        except Exception as e:  # a torn or foreign file: the run starts afresh and overwrites it
            self.log(f"mqar: ignoring unreadable checkpoint {path}: {type(e).__name__}: {e}")
            return None
        # everything was checked above, so nothing is left half-restored: a failure from here on is a bug
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.perm_gen.set_state(state["perm_generator"])
        torch.set_rng_state(state["cpu_rng"])
        cuda_rng = state["cuda_rng"]
        if cuda_rng and self.device.type == "cuda":
            if len(cuda_rng) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_rng)
            else:  # saved where another number of GPUs was visible: the first was the run's (the sweep pins one)
                torch.cuda.set_rng_state(cuda_rng[0], self.device)
        self.progress = Progress(**state["progress"])
        self.progress.attempts += 1
        self.log(f"mqar: resuming from {path} after epoch {self.progress.epoch} (step {self.progress.step})")
        return str(path)

    def _check_checkpoint(self, state: dict) -> None:
        """Raise ValueError naming the first field of a loaded checkpoint that this run could not restore."""
        own = self.model.state_dict()
        model = state.get("model")
        if not isinstance(model, dict) or set(model) != set(own):
            raise ValueError("field 'model': not this model's parameters")
        for name, tensor in model.items():
            if not isinstance(tensor, torch.Tensor) or tensor.shape != own[name].shape:
                raise ValueError(f"field 'model': {name} is not a tensor of shape {tuple(own[name].shape)}")
        optimizer = state.get("optimizer")
        groups = self.optimizer.state_dict()["param_groups"]
        if not isinstance(optimizer, dict) or [len(g.get("params", ())) for g in optimizer.get("param_groups", ())] \
                != [len(g["params"]) for g in groups]:
            raise ValueError("field 'optimizer': not this run's parameter groups")
        generators = {"perm_generator": self.perm_gen.get_state(), "cpu_rng": torch.get_rng_state()}
        for key, like in generators.items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.shape != like.shape:
                raise ValueError(f"field '{key}': not a generator state ({like.numel()} bytes)")
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and not (isinstance(cuda_rng, list)
                                         and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                 for t in cuda_rng)):
            raise ValueError("field 'cuda_rng': not a list of CUDA generator states")
        progress = state.get("progress")
        if not isinstance(progress, dict) or not set(progress) <= set(Progress.__dataclass_fields__):
            raise ValueError("field 'progress': not this version's run progress")

    # ------------------------------------------------------------------ training

    def train_epoch(self, epoch: int, bar=None, wandb_run=None) -> tuple[float, bool]:
        """One pass over the shuffled training split; (mean train loss over its query tokens, cut short: True when
        ``train.max_steps`` ended it before its last batch)."""
        tc, data, N = self.cfg.train, self.data.train, self.spec.num_kv_pairs
        lr = epoch_lr(self.cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        perm = torch.randperm(len(data), generator=self.perm_gen).to(self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_tokens = 0
        head_weight = self.model.lm_head.weight
        for start in range(0, len(data), tc.batch_size):
            idx = perm[start:start + tc.batch_size]
            total = idx.numel() * N
            self.optimizer.zero_grad(set_to_none=True)
            batch_loss = torch.zeros((), dtype=torch.float32, device=self.device)
            for m in range(0, idx.numel(), self.micro):
                sub, real = _padded(idx[m:m + self.micro], self.micro)
                with self.autocast():
                    hidden = self.hidden(data.inputs(sub), data.qpos[sub])
                    loss = chunked_cross_entropy(hidden, head_weight, _query_labels(data, sub, real),
                                                 reduction="sum", chunk_tokens=tc.loss_chunk_rows,
                                                 fp32_dot=self.fp32_dot) / total
                loss.backward()
                batch_loss += loss.detach()
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.optimizer.step()
            self.progress.step += 1
            self.progress.examples_seen += idx.numel()  # the last batch of an epoch may be short
            loss_sum += batch_loss.double() * total
            loss_tokens += total
            if bar is not None:
                bar.update(1)
            if wandb_run is not None:
                wandb_run.log({"train/loss": batch_loss.item(), "lr": lr, "epoch": epoch}, step=self.progress.step)
            if tc.eval_every_steps and self.progress.step % tc.eval_every_steps == 0:
                t_eval = time.time()
                metrics = self.evaluate()
                self.progress.eval_s += time.time() - t_eval
                self.log(f"  step {self.progress.step}: valid acc {metrics['valid_accuracy']:.4f}")
            if tc.max_steps is not None and self.progress.step >= tc.max_steps and start + tc.batch_size < len(data):
                return loss_sum.item() / max(loss_tokens, 1), True
        return loss_sum.item() / max(loss_tokens, 1), False

    def evaluate(self) -> dict:
        self.model.eval()
        try:
            return evaluate(self.hidden, self.model.lm_head, self.data.test, self.eval_bs, self.autocast)
        finally:
            self.model.train()

    def run(self, command: str | None = None) -> dict:
        cfg, tc, p = self.cfg, self.cfg.train, self.progress
        name = cfg.run_name()
        steps_per_epoch = math.ceil(len(self.data.train) / tc.batch_size)
        self.log(f"mqar {name}: {self.model_cfg.layers} d_model={self.model_cfg.d_model} "
                 f"params={self.params['total']:,} | seq_len={self.spec.seq_len} kv_pairs={self.spec.num_kv_pairs} "
                 f"train={len(self.data.train)} test={len(self.data.test)} | batch {tc.batch_size} (micro "
                 f"{self.micro}) {steps_per_epoch} steps/epoch | device {device_name(self.device)} | "
                 f"{tc.precision}{', compiled' if self.compiled else ''} | data "
                 f"{'cached' if self.data.from_cache else 'generated'} in {self.data_s:.1f}s")
        wandb_run = _wandb_run(cfg)
        stopped_by = "max_epochs"
        self.model.train()
        while p.epoch < tc.max_epochs:
            epoch = p.epoch
            t_epoch = time.time()
            bar = tqdm(total=steps_per_epoch, desc=f"{name} epoch {epoch + 1}/{tc.max_epochs}", leave=False,
                       disable=not cfg.log.tqdm, mininterval=2.0)
            train_loss, cut_short = self.train_epoch(epoch, bar, wandb_run)
            bar.close()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_s = time.time() - t_epoch
            p.train_s += train_s
            t_eval = time.time()
            metrics = self.evaluate()
            eval_s = time.time() - t_eval
            p.eval_s += eval_s
            acc = metrics["valid_accuracy"]
            if acc > p.best:
                p.best, p.best_epoch = acc, epoch
            entry = {"epoch": epoch + 1, "step": p.step, "lr": epoch_lr(cfg, epoch), "train_loss": train_loss,
                     **metrics, "train_s": round(train_s, 3), "eval_s": round(eval_s, 3),
                     "epoch_s": round(time.time() - t_epoch, 3),
                     "elapsed_s": round(p.elapsed_s + time.time() - self.t_start, 3)}
            p.history.append(entry)
            p.epoch += 1
            self.log(f"{name} epoch {epoch + 1}/{tc.max_epochs} step {p.step} lr {entry['lr']:.2e} train_loss "
                     f"{train_loss:.4f} valid_loss {metrics['valid_loss']:.4f} valid_acc {acc:.4f} "
                     f"({entry['epoch_s']:.1f}s)")
            if wandb_run is not None:
                wandb_run.log({"valid/loss": metrics["valid_loss"], "valid/accuracy": acc, "epoch": epoch + 1},
                              step=p.step)
            # strictly above, as the paper's trainer: an epoch exactly at the threshold trains on
            if tc.early_stop_accuracy is not None and acc > tc.early_stop_accuracy:
                stopped_by = "early_stop"
                break
            if cut_short:
                stopped_by = "max_steps"
                break
            if p.epoch >= tc.max_epochs:  # the protocol's end, whatever limit its last step also reached
                break
            if tc.max_steps is not None and p.step >= tc.max_steps:
                stopped_by = "max_steps"
                break
            if tc.time_limit_s is not None and p.elapsed_s + time.time() - self.t_start >= tc.time_limit_s:
                stopped_by = "time_limit"
                break
            if self.checkpoint_path is not None and p.epoch < tc.max_epochs:
                self.save_checkpoint()
        result = self.result(stopped_by, command)
        if wandb_run is not None:
            wandb_run.summary["max_accuracy"] = p.best
            wandb_run.finish()
        if cfg.output:
            write_json_atomic(cfg.output, result)
            if self.checkpoint_path is not None and self.checkpoint_path.exists():
                self.checkpoint_path.unlink()
            self.log(f"mqar {name}: best valid accuracy {p.best:.4f} (epoch {p.best_epoch + 1}) -> {cfg.output}")
        else:
            self.log(f"mqar {name}: best valid accuracy {p.best:.4f} (epoch {p.best_epoch + 1})")
        return result

    def result(self, stopped_by: str, command: str | None) -> dict:
        cfg, tc, p, spec = self.cfg, self.cfg.train, self.progress, self.spec
        total_s = p.elapsed_s + time.time() - self.t_start
        epochs_run = len(p.history)
        # steady-state seconds per epoch: the median over epochs after the first (which compiles)
        steady = sorted(h["epoch_s"] for h in p.history[1:]) or [p.history[-1]["epoch_s"]]
        return {
            "schema": SCHEMA,
            "name": cfg.run_name(),
            "setting": {"mixer": cfg.model.mixer, "d_model": cfg.model.d_model, "seq_len": spec.seq_len,
                        "num_kv_pairs": spec.num_kv_pairs, "lr": tc.lr, "seed": tc.seed},
            "best_accuracy": p.best,
            "final_accuracy": p.history[-1]["valid_accuracy"],
            "best_epoch": p.best_epoch + 1,
            "epochs_run": epochs_run,
            "steps": p.step,
            "stopped_by": stopped_by,
            "n_params": self.params["total"],
            "params": self.params,
            "time": {
                "total_s": round(total_s, 3), "data_s": round(self.data_s, 3), "train_s": round(p.train_s, 3),
                "eval_s": round(p.eval_s, 3), "per_epoch_s": round((p.train_s + p.eval_s) / max(epochs_run, 1), 3),
                "steady_epoch_s": steady[len(steady) // 2],
                "per_step_s": round(p.train_s / max(p.step, 1), 5),
                "train_tokens_per_s": round(p.examples_seen * spec.seq_len / max(p.train_s, 1e-9), 1),
                "attempts": p.attempts,
                # runs that shared the device (set by the sweep): epoch time / this = the GPU time one run used
                "runs_sharing_device": int(os.environ.get("MQAR_RUNS_PER_DEVICE", "1")),
            },
            "protocol": {"num_train": spec.num_train, "num_test": spec.num_test, "max_epochs": tc.max_epochs,
                         "batch_size": tc.batch_size, "micro_batch_size": self.micro, "precision": tc.precision,
                         "compiled": self.compiled, "max_steps": tc.max_steps, "time_limit_s": tc.time_limit_s,
                         "early_stop_accuracy": tc.early_stop_accuracy, "model_variant": cfg.model.variant},
            "history": p.history,
            "device": device_name(self.device),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "hostname": socket.gethostname(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "source_digest": source_digest(),
            "command": command,
            "config": to_dict(cfg),
            "model_config": to_dict(self.model_cfg),
        }


class RunInProgressError(RuntimeError):
    """Another process is running the same setting into the same output."""


@contextmanager
def exclusive_output(output: str | None):
    """Hold an exclusive lock on ``<output>.lock`` while a run writes ``<output>`` and its checkpoint: a second run
    of the same setting (a resubmitted job, a sweep restarted beside one still running) would otherwise resume from
    and overwrite the same checkpoint and result."""
    if not output:
        yield
        return
    path = Path(output + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInProgressError(f"{output}: another process is running this setting (it holds {path})") from None
        except OSError as e:  # a file system without locks (some network mounts): run unguarded, say so
            print(f"mqar: warning: cannot lock {path} ({e}); nothing stops a second run of this setting",
                  file=sys.stderr)
        yield


def train_mqar(cfg: MQARConfig, *, log=print, command: str | None = None) -> dict:
    with exclusive_output(cfg.output):
        return MQARRun(cfg, log).run(command)
