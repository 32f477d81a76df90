"""AdamW parameter groups and learning-rate schedules (pure functions of the step, so the 'scheduler state'
is the step counter itself and resumes exactly)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pretrain.training.config import OptimConfig

DECAY_MODULES = (nn.Linear, nn.Conv1d)


def decay_parameter_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) parameter names. Only weight matrices of linear and convolution layers decay (also
    those a module names in ``decayed_parameters``, as the short conv's own depthwise weight); norms, biases, the
    feature map's γ/β, embeddings (and an LM head tied to them) do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids = set()
    for module in model.modules():
        if isinstance(module, DECAY_MODULES) and id(module.weight) not in embeddings:
            decay_ids.add(id(module.weight))
        decay_ids.update(id(getattr(module, name)) for name in getattr(module, "decayed_parameters", ()))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():  # named_parameters skips the tied duplicate
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if id(p) in decay_ids else no_decay).append(name)
    return decay, no_decay


def build_param_groups(model: nn.Module, decay_names: list[str], no_decay_names: list[str], weight_decay: float):
    """Groups over ``model``'s (possibly wrapped/sharded) parameters, by the names found on the plain model."""
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay_names], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay_names], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(param_groups, cfg: OptimConfig) -> torch.optim.Optimizer:
    # The same torch AdamW in every strategy (DeepSpeed gets it as a client optimizer), so the math matches.
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine / WSD / constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = cfg.warmup_steps
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        # from the peak at the first step after the warmup to the floor at the last step (max_steps - 1)
        span = max(max_steps - warmup - 1, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))
    # wsd: stable at peak, then linear decay over the last decay_fraction of the run
    # at least one step when asked for any: a fraction of a short run that rounds to 0 would never decay
    decay_steps = max(1, int(round(cfg.decay_fraction * max_steps))) if cfg.decay_fraction > 0 else 0
    decay_start = max_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return peak
    t = min((step - decay_start + 1) / decay_steps, 1.0)
    return peak + (floor - peak) * t
