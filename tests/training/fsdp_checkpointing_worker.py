"""Worker of test_activation_checkpointing (not a test module): run under ``torchrun --nproc_per_node=2`` with the
result file as its argument.

On every rank: the tiny ReBased hybrid (same seed), sharded by the trainer's FSDPStrategy in fp32, one
forward/backward on this rank's own batch with activation checkpointing none / full / every_k (k = 2) /
selective, through the trainer's ``make_checkpoint_fn`` made before wrapping, as the trainer does. Rank 0 writes
which parameters' local gradient shards differ from the no-checkpointing ones on any rank, and how often each
block's forward ran."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


def gradients(mode: str, rank: int):
    from pretrain.models import build_model, load_model_config
    from pretrain.training.activation_checkpointing import make_checkpoint_fn
    from pretrain.training.config import RunConfig
    from pretrain.training.parallel import FSDPStrategy

    model_config = str(REPO / "configs/models/tiny_rebased.yaml")
    torch.manual_seed(0)
    module = build_model(load_model_config(model_config))
    forward_calls = [0] * len(module.blocks)
    for i, block in enumerate(module.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: forward_calls.__setitem__(i, forward_calls[i] + 1))
    checkpoint_fn = make_checkpoint_fn(module, mode, 2)
    strategy = FSDPStrategy(module, RunConfig(model=model_config), torch.device("cpu"), torch.float32, 1)

    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in training
    input_ids = torch.randint(0, 1024, (2, 48), generator=generator)
    labels = torch.randint(0, 1024, (2, 48), generator=generator)
    loss = strategy.model(input_ids, checkpoint_fn=checkpoint_fn, labels=labels)  # the trainer's loss path
    strategy.backward(loss, True)
    grads = {name: p.grad.to_local().clone() for name, p in strategy.model.named_parameters()}
    sharded = all(hasattr(p.grad, "to_local") for p in strategy.model.parameters())
    return grads, forward_calls, sharded


def main(result_path: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference, calls_none, sharded = gradients("none", rank)
    different, recompute_calls = {}, {"none": calls_none}
    for mode in ("full", "every_k", "selective"):
        grads, recompute_calls[mode], _ = gradients(mode, rank)
        different[mode] = sorted(n for n in reference if not torch.equal(reference[n], grads[n]))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"different": different, "calls": recompute_calls, "sharded": sharded})
    if rank == 0:
        result = {
            "parameters": len(reference),
            "sharded": all(g["sharded"] for g in gathered),
            "different": {m: sorted({n for g in gathered for n in g["different"][m]}) for m in different},
            # the same on every rank; a disagreement would show as a list of lists here
            "recompute_calls": {m: (recompute_calls[m] if all(g["calls"][m] == recompute_calls[m] for g in gathered)
                                    else [g["calls"][m] for g in gathered]) for m in recompute_calls},
        }
        Path(result_path).write_text(json.dumps(result))
    gc.collect()  # free the sharded models (and their hold on the process group) before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
