"""Train and evaluate one MQAR setting; returns (and optionally writes) a result dict.

The protocol follows the ReBased paper's sweep: AdamW (weight decay 0.1 on every parameter), a cosine learning rate
over ``max_epochs`` stepped once per epoch (no warm-up), no gradient clipping, a validation pass after every
epoch, early stop once validation accuracy reaches ``early_stop_accuracy``. Accuracy is the fraction of query
positions (over the whole test split) whose argmax is the bound value; the reported metric is the best
validation accuracy over epochs (what the paper's figure plots), the last one is recorded too.

Only the logits at the query positions are computed: a forward hook on the model's final norm gathers those
positions before the LM head, so the [B, T, vocab] logits tensor is never built (at vocab 8192 it would dominate
time and memory). The loss is the exact mean over all query tokens of the optimizer batch, also when the batch is
split into micro-batches.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from pretrain.config import to_dict
from pretrain.mqar.config import MQARConfig
from pretrain.mqar.data import MQARSplit, load_mqar
from pretrain.mqar.results import SCHEMA, write_json_atomic


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def query_logits(model, inputs: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Logits [B, N, vocab] at positions qpos [B, N] of inputs [B, T]."""
    norm = getattr(model, "final_norm", None)
    if norm is None:  # unknown model layout: full logits, then gather
        logits = model(inputs)
        return logits.gather(1, qpos[..., None].expand(-1, -1, logits.shape[-1]))

    def gather(_module, _args, out):
        return out.gather(1, qpos[..., None].expand(-1, -1, out.shape[-1]))

    handle = norm.register_forward_hook(gather)
    try:
        logits = model(inputs)
    finally:
        handle.remove()
    if logits.shape[:2] != qpos.shape:
        raise RuntimeError(f"query gather failed: logits {tuple(logits.shape)} for query positions {tuple(qpos.shape)}")
    return logits


@torch.no_grad()
def evaluate(model, split: MQARSplit, batch_size: int, autocast) -> dict:
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        inputs, _ = split.batch(sl)
        qpos, values = split.qpos[sl], split.values[sl]
        with autocast():
            logits = query_logits(model, inputs, qpos)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits.flatten(0, 1), values.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == values).sum().item()
        total += values.numel()
    model.train(was_training)
    return {"valid_loss": loss_sum / max(total, 1), "valid_accuracy": correct / max(total, 1)}


def _wandb_run(cfg: MQARConfig, log):
    if cfg.log.wandb == "disabled":
        return None
    try:
        import wandb  # optional: not needed unless asked for
    except ImportError:
        log("mqar: wandb is not installed; logging to stdout and the result JSON only")
        return None
    os.makedirs(cfg.log.wandb_dir, exist_ok=True)
    return wandb.init(project=cfg.log.wandb_project, name=cfg.run_name(), mode=cfg.log.wandb, dir=cfg.log.wandb_dir,
                      config=to_dict(cfg), reinit=True)


def epoch_lr(cfg: MQARConfig, epoch: int) -> float:
    if cfg.train.schedule == "constant":
        return cfg.train.lr
    return cfg.train.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.train.max_epochs))


def train_mqar(cfg: MQARConfig, *, log=print, command: str | None = None) -> dict:
    from pretrain.models import build_model, count_parameters

    t_start = time.time()
    tc = cfg.train
    device = resolve_device(tc.device)
    if tc.num_threads is not None:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(tc.seed)
        torch.backends.cuda.matmul.allow_tf32 = tc.precision != "fp32"
        torch.backends.cudnn.allow_tf32 = tc.precision != "fp32"
    if tc.precision == "bf16" and device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    spec = cfg.data.spec()
    data = load_mqar(spec, cfg.data.cache_dir, device=device, log=log)
    t_data = time.time() - t_start
    model_cfg = cfg.model_config()
    model = build_model(model_cfg).to(device)
    params = count_parameters(model)
    n_params = params["total"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=tuple(tc.betas))
    micro = cfg.micro_batch_size()
    eval_bs = tc.eval_batch_size or micro
    n_train, N = len(data.train), spec.num_kv_pairs
    steps_per_epoch = math.ceil(n_train / tc.batch_size)
    name = cfg.run_name()
    log(f"mqar {name}: {model_cfg.layers} d_model={model_cfg.d_model} params={n_params:,} | seq_len={spec.seq_len} "
        f"kv_pairs={N} train={n_train} test={len(data.test)} | batch {tc.batch_size} (micro {micro}) "
        f"{steps_per_epoch} steps/epoch | device {device_name(device)} | data {'cached' if data.from_cache else 'generated'}"
        f" in {t_data:.1f}s")
    run = _wandb_run(cfg, log)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    gen = torch.Generator().manual_seed(tc.seed)
    history, best, best_epoch, step, examples_seen = [], -1.0, -1, 0, 0
    stopped_by = "max_epochs"
    train_time = eval_time = 0.0
    model.train()
    for epoch in range(tc.max_epochs):
        lr = epoch_lr(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_epoch = time.time()
        perm = torch.randperm(n_train, generator=gen)
        bar = tqdm(total=steps_per_epoch, desc=f"{name} epoch {epoch + 1}/{tc.max_epochs}", leave=False,
                   disable=not cfg.log.tqdm, mininterval=2.0) if tqdm else None
        loss_sum, loss_tokens = 0.0, 0
        out_of_steps = False
        for start in range(0, n_train, tc.batch_size):
            idx = perm[start:start + tc.batch_size].to(device)
            total = idx.numel() * N
            optimizer.zero_grad(set_to_none=True)
            batch_loss = 0.0
            for m in range(0, idx.numel(), micro):
                sub = idx[m:m + micro]
                inputs, _ = data.train.batch(sub)
                qpos, values = data.train.qpos[sub], data.train.values[sub]
                with autocast():
                    logits = query_logits(model, inputs, qpos)
                loss = F.cross_entropy(logits.float().flatten(0, 1), values.flatten(), reduction="sum") / total
                loss.backward()
                batch_loss += loss.detach()
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            step += 1
            examples_seen += idx.numel()  # the last batch of an epoch may be short
            batch_loss = float(batch_loss)
            loss_sum += batch_loss * total
            loss_tokens += total
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{batch_loss:.3f}", refresh=False)
            if run is not None:
                run.log({"train/loss": batch_loss, "lr": lr, "epoch": epoch}, step=step)
            if tc.eval_every_steps and step % tc.eval_every_steps == 0:
                t_eval = time.time()
                metrics = evaluate(model, data.test, eval_bs, autocast)
                eval_time += time.time() - t_eval
                log(f"  step {step}: valid acc {metrics['valid_accuracy']:.4f}")
            if tc.max_steps is not None and step >= tc.max_steps:
                out_of_steps = True
                break
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.time() - t_epoch
        t_eval = time.time()
        metrics = evaluate(model, data.test, eval_bs, autocast)
        eval_time += time.time() - t_eval
        acc = metrics["valid_accuracy"]
        if acc > best:
            best, best_epoch = acc, epoch
        entry = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": loss_sum / max(loss_tokens, 1), **metrics,
                 "epoch_s": round(time.time() - t_epoch, 3), "elapsed_s": round(time.time() - t_start, 3)}
        history.append(entry)
        log(f"{name} epoch {epoch + 1}/{tc.max_epochs} step {step} lr {lr:.2e} train_loss {entry['train_loss']:.4f} "
            f"valid_loss {metrics['valid_loss']:.4f} valid_acc {acc:.4f} ({entry['epoch_s']:.1f}s)")
        if run is not None:
            run.log({"valid/loss": metrics["valid_loss"], "valid/accuracy": acc, "epoch": epoch + 1}, step=step)
        if tc.early_stop_accuracy is not None and acc >= tc.early_stop_accuracy:
            stopped_by = "early_stop"
            break
        if out_of_steps:
            stopped_by = "max_steps"
            break
        if tc.time_limit_s is not None and time.time() - t_start >= tc.time_limit_s:
            stopped_by = "time_limit"
            break

    total_s = time.time() - t_start
    epochs_run = len(history)
    tokens = examples_seen * spec.seq_len
    result = {
        "schema": SCHEMA,
        "name": name,
        "setting": {"mixer": cfg.model.mixer, "d_model": cfg.model.d_model, "seq_len": spec.seq_len,
                    "num_kv_pairs": N, "lr": tc.lr, "seed": tc.seed},
        "best_accuracy": best,
        "final_accuracy": history[-1]["valid_accuracy"],
        "best_epoch": best_epoch + 1,
        "epochs_run": epochs_run,
        "steps": step,
        "stopped_by": stopped_by,
        "n_params": n_params,
        "params": params,
        "time": {
            "total_s": round(total_s, 3), "data_s": round(t_data, 3), "train_s": round(train_time, 3),
            "eval_s": round(eval_time, 3), "per_epoch_s": round((train_time + eval_time) / max(epochs_run, 1), 3),
            "per_step_s": round(train_time / max(step, 1), 5),
            "train_tokens_per_s": round(tokens / max(train_time, 1e-9), 1),
        },
        "protocol": {"num_train": spec.num_train, "num_test": spec.num_test, "max_epochs": tc.max_epochs,
                     "batch_size": tc.batch_size, "micro_batch_size": micro, "precision": tc.precision,
                     "max_steps": tc.max_steps, "time_limit_s": tc.time_limit_s,
                     "early_stop_accuracy": tc.early_stop_accuracy},
        "history": history,
        "device": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "hostname": socket.gethostname(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": command,
        "config": to_dict(cfg),
        "model_config": to_dict(model_cfg),
    }
    if run is not None:
        run.summary["max_accuracy"] = best
        run.finish()
    if cfg.output:
        write_json_atomic(cfg.output, result)
        log(f"mqar {name}: best valid accuracy {best:.4f} (epoch {best_epoch + 1}) -> {cfg.output}")
    else:
        log(f"mqar {name}: best valid accuracy {best:.4f} (epoch {best_epoch + 1})")
    return result
