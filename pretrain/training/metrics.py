"""Observability: console lines, a JSONL file, Weights & Biases (online | offline | disabled, never needing an
account) and a tqdm progress bar with ETA. Only rank 0 writes; other ranks get a no-op logger."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys

import torch

from pretrain.atomic import write_text_atomic

log = logging.getLogger("pretrain")

# Dense bf16 peak FLOP/s per device, for MFU. Override with PEAK_TFLOPS=<number> (e.g. for other GPUs or CPUs).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "L40S": 362.0,
                    "4090": 165.0, "A6000": 155.0, "V100": 125.0}


def peak_flops(device: torch.device) -> float | None:
    env = os.environ.get("PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, tf in PEAK_BF16_TFLOPS.items():
        # the whole model number: "L4" must not match an "L40S" (or "L40", which is not in the table)
        if re.search(re.escape(key) + r"(?![0-9A-Za-z])", name):
            return tf * 1e12
    return None


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def wandb_mode(mode: str | None) -> str | None:
    """'online' or 'offline' (W&B's old 'dryrun' is offline), or None when W&B is off."""
    mode = "offline" if mode == "dryrun" else mode
    return mode if mode in ("online", "offline") else None


def init_wandb(mode: str | None, **kwargs):
    """A W&B run in ``mode`` (online | offline; anything else: None), or None when wandb is missing or fails. A
    failing online init (no account, no network) falls back to offline, so a run never stops for its logging."""
    mode = wandb_mode(mode)
    if mode is None:
        return None
    try:
        import wandb  # optional: only when W&B logging is asked for
    except ImportError:
        log.warning("wandb is not installed; W&B logging is off")
        return None
    try:
        return wandb.init(mode=mode, **kwargs)
    except Exception as e:
        if mode != "online":
            log.warning("wandb init failed (%s); W&B logging is off", e)
            return None
        log.warning("wandb online init failed (%s); falling back to offline mode (sync later with `wandb sync %s`)",
                    e, os.path.join(str(kwargs.get("dir") or "."), "wandb"))
        try:
            return wandb.init(mode="offline", **kwargs)
        except Exception as e2:
            log.warning("wandb offline init failed too (%s); W&B logging is off", e2)
            return None


class MetricsLogger:
    def __init__(self, cfg, rank: int, start_step: int, max_steps: int, config_dict: dict):
        self.enabled = rank == 0
        self.cfg = cfg
        self.wandb_run = None
        self.bar = None
        if not self.enabled:
            return
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a", buffering=1)
        self._init_wandb(config_dict)
        if cfg.logging.progress_bar and max_steps > start_step:
            from tqdm import tqdm  # only for a bar: rank 0, with progress_bar on

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=not sys.stderr.isatty() and os.environ.get("TQDM_FORCE") != "1")

    def _init_wandb(self, config_dict):
        wcfg = self.cfg.logging.wandb
        mode = os.environ.get("WANDB_MODE") or wcfg.mode
        if wandb_mode(mode) is None:
            return
        id_file = os.path.join(self.cfg.out_dir, "wandb_id")
        run_id = ""
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        if not re.fullmatch(r"[0-9a-z]+", run_id):  # none yet, or an empty / damaged file: a new W&B run
            run_id = secrets.token_hex(4)  # wandb ids: lowercase letters and digits
            write_text_atomic(id_file, run_id)
        self.wandb_run = init_wandb(mode, project=wcfg.project, entity=wcfg.entity, name=wcfg.name or self.cfg.name,
                                    id=run_id, resume="allow", dir=self.cfg.out_dir, config=config_dict)

    def log(self, record: dict, console: bool = True):
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            step = record.get("step")
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if console:
            parts = []
            for k, v in record.items():
                if isinstance(v, float):
                    parts.append(f"{k}={v:.4g}")
                else:
                    parts.append(f"{k}={v}")
            line = " ".join(parts)
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, flush=True)

    def advance(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def info(self, msg: str):
        if self.enabled:
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                print(msg, flush=True)

    def close(self):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
