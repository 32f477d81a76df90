"""Worker of test_parallel_edge_cases (not a test module): run under ``torchrun --nproc_per_node=2`` as
``nonfinite_skip_worker.py STRATEGY ZERO_STAGE DS_CONFIG RESULT``.

On every rank: the tiny ReBased hybrid (same seed) in the trainer's strategy, fp32, one finite step (so AdamW has
state to protect), then steps that must be skipped on every rank, each decided the way the trainer decides it
(``skip`` = the mean loss over all ranks is not finite), then one finite step that must apply:

* ``ignored_labels``: rank 1's micro batch has every label ignored, so its mean loss is NaN (0/0, as
  F.cross_entropy) while its gradients are finite (zero);
* ``nan_loss_one_rank``: rank 1's loss is multiplied by NaN (its gradients are NaN before the reduction);
* ``inf_in_one_shard`` (fsdp only): after the reduce-scatter, one element of rank 1's own gradient shard is inf
  and the trainer's ``skip`` is False: only a norm over all shards sees it.

Rank 0 writes, per case, what every rank's ``step`` returned and whether its parameters or optimizer state moved."""

from __future__ import annotations

import gc
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


def local_state(strategy) -> list[torch.Tensor]:
    """This rank's copy of every parameter (its shard under FSDP2 / ZeRO-3) and of the AdamW state."""
    tensors = []
    for p in strategy.module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the parameter itself is an empty placeholder
            tensors.append(p.ds_tensor.detach().clone())
        elif hasattr(p, "to_local"):
            tensors.append(p.to_local().detach().clone())
        else:
            tensors.append(p.detach().clone())
    optimizer = getattr(strategy.optimizer, "optimizer", strategy.optimizer)  # DeepSpeed wraps the torch AdamW
    for state in optimizer.state.values():
        tensors += [v.detach().clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def run_cases(strategy_name: str, zero_stage: str, ds_config: str) -> dict:
    from pretrain.models import build_model, load_model_config
    from pretrain.training.config import RunConfig
    from pretrain.training.parallel import STRATEGIES

    model_config = str(REPO / "configs/models/tiny_rebased.yaml")
    cfg = RunConfig(model=model_config)
    cfg.parallel.strategy = strategy_name
    cfg.parallel.deepspeed_config = ds_config
    cfg.parallel.zero_stage = int(zero_stage)
    if strategy_name == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    strategy = STRATEGIES[strategy_name](build_model(load_model_config(model_config)), cfg, torch.device("cpu"),
                                         torch.float32, 1)
    strategy.set_lr(1e-3)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in training

    def train_step(case: str | None):
        ids = torch.randint(0, 1024, (2, 32), generator=generator)
        labels = ids.clone()
        if case == "ignored_labels" and rank == 1:
            labels[:] = -100
        loss = strategy.model(ids, labels=labels)
        if case == "nan_loss_one_rank" and rank == 1:
            loss = loss * float("nan")
        total = loss.detach().clone()
        dist.all_reduce(total)  # the trainer's decision: the mean loss over every rank
        strategy.backward(loss, True)
        if case == "inf_in_one_shard" and rank == 1:
            next(strategy.model.parameters()).grad.to_local().view(-1)[0] = float("inf")
        norm, applied = strategy.step(skip=not math.isfinite(float(total)))
        return {"norm_finite": math.isfinite(norm), "applied": applied}

    train_step(None)
    cases = ["ignored_labels", "nan_loss_one_rank"] + (["inf_in_one_shard"] if strategy_name == "fsdp" else [])
    result = {}
    for case in [*cases, None]:
        before = local_state(strategy)
        out = train_step(case)
        out["state_moved"] = any(not torch.equal(a, b) for a, b in zip(before, local_state(strategy)))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        result[case or "finite"] = gathered
    return result


def main(strategy_name: str, zero_stage: str, ds_config: str, result_path: str):
    result = run_cases(strategy_name, zero_stage, ds_config)
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(result))
    dist.barrier()
    # the wrapped model holds the process group: free it first (a group torn down at interpreter exit can abort)
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
