"""Activation checkpointing changes memory, never the math: with the trainer's own ``make_checkpoint_fn`` (modes
``full``, ``every_k`` and ``selective``) every parameter gradient of the tiny ReBased hybrid is bit-identical
(``torch.equal``) to the gradient without checkpointing, in one process and under FSDP2 on 2 processes (gloo).

Why bitwise is expected: non-reentrant checkpointing reruns exactly the same block forward (same kernels, same
shapes, same inputs, no dropout or other randomness in the model) and the backward then runs the same ops on those
recomputed activations, in the same order, so fp32 on CPU gives the same bits. Under FSDP2 the recompute
all-gathers the same shards again and the gradient reduce-scatter sums the same per-rank values.

A test that only compared gradients could pass with a checkpoint_fn that silently checkpoints nothing, so the
single-process test also counts block forwards: a checkpointed block runs twice (forward + recompute), the others
once, which proves that the mode picks the documented blocks (``every_k``: blocks 0, k, 2k, ...).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, env, free_port
from pretrain.models import build_model, load_model_config
from pretrain.training.activation_checkpointing import make_checkpoint_fn

MODEL_CONFIG = REPO / "configs/models/tiny_rebased.yaml"


def _gradients(mode: str, every: int, input_ids, labels, cu_seqlens=None):
    """Parameter gradients (by name) of one forward/backward of a freshly seeded model, and how many times each
    block's forward ran."""
    torch.manual_seed(0)  # the same initial weights for every mode
    model = build_model(load_model_config(str(MODEL_CONFIG)))
    forward_calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: forward_calls.__setitem__(i, forward_calls[i] + 1))
    loss = model.loss(input_ids, labels, cu_seqlens=cu_seqlens,
                      checkpoint_fn=make_checkpoint_fn(model, mode, every))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return grads, forward_calls


@pytest.mark.parametrize("document_masking", [False, True], ids=["dense", "packed_documents"])
@pytest.mark.parametrize("mode,every,recomputed_blocks", [
    ("full", 2, [0, 1, 2, 3]),
    ("every_k", 2, [0, 2]),
    ("every_k", 3, [0, 3]),
    ("selective", 2, [0, 1, 2, 3]),
])
def test_checkpointing_gives_bit_identical_gradients(mode, every, recomputed_blocks, document_masking):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 1024, (2, 48), generator=generator)
    labels = torch.randint(0, 1024, (2, 48), generator=generator)
    cu_seqlens = None
    if document_masking:  # the trainer's packed layout: one row, documents reset state at cu_seqlens
        input_ids, labels = input_ids.reshape(1, -1), labels.reshape(1, -1)
        cu_seqlens = torch.tensor([0, 17, 40, 71, 96], dtype=torch.int32)

    reference, plain_calls = _gradients("none", every, input_ids, labels, cu_seqlens)
    checkpointed, calls = _gradients(mode, every, input_ids, labels, cu_seqlens)

    assert plain_calls == [1, 1, 1, 1]
    assert calls == [2 if i in recomputed_blocks else 1 for i in range(4)], \
        f"{mode}/{every}: blocks {recomputed_blocks} must be recomputed, forward calls were {calls}"
    assert reference.keys() == checkpointed.keys()
    assert all(g.abs().sum() > 0 for g in reference.values()), "every parameter must get a gradient"
    different = [name for name in reference if not torch.equal(reference[name], checkpointed[name])]
    assert not different, f"{mode}/{every}: gradients differ for {different}"


def _op_counts(mode: str) -> dict[str, int]:
    """How often each aten op ran in one forward + backward of the tiny hybrid under ``mode``."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model(load_model_config(str(MODEL_CONFIG)))
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 1024, (2, 48), generator=generator)
    with Count() as counter:
        model.loss(input_ids, input_ids, checkpoint_fn=make_checkpoint_fn(model, mode, 2)).backward()
    return counter.calls


def test_selective_keeps_the_matmuls_and_recomputes_the_rest():
    """``selective`` reruns the blocks' cheap ops in the backward but none of their matmuls (their outputs are
    kept); ``full`` reruns both. Counted op by op over one forward + backward."""
    none, full, selective = (_op_counts(mode) for mode in ("none", "full", "selective"))
    matmuls = ("mm", "addmm", "bmm")
    count = lambda calls, names: sum(calls[n] for n in names)  # noqa: E731
    assert count(full, matmuls) > count(none, matmuls) > 0
    assert count(selective, matmuls) == count(none, matmuls)
    cheap = [n for n in none if n not in matmuls and full[n] > none[n]]  # ops that full checkpointing reruns
    assert cheap, "the tiny model must have cheap ops inside its blocks"
    assert sum(selective[n] for n in cheap) > sum(none[n] for n in cheap)


def test_selective_is_refused_under_zero3():
    """ZeRO-3 with selective checkpointing adds the linear bias twice in the recompute (its losses left the
    equivalence test's tolerance): the run is refused with a message naming what works instead."""
    from pretrain.config import load_config
    from pretrain.training.config import RunConfig
    from pretrain.training.parallel import DeepSpeedStrategy

    def ds_config(stage: int, mode: str) -> dict:
        run = load_config(RunConfig, str(REPO / "configs/runs/rebased_150m.yaml"),
                          ["parallel.strategy=deepspeed", f"parallel.zero_stage={stage}",
                           f"training.activation_checkpointing={mode}"])
        return DeepSpeedStrategy.ds_config(run, 1, 1, torch.float32, False)

    assert ds_config(2, "selective")["zero_optimization"]["stage"] == 2
    assert ds_config(3, "full")["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="selective does not give the same gradients under DeepSpeed ZeRO stage 3"):
        ds_config(3, "selective")


def test_unknown_checkpointing_mode_is_refused():
    model = build_model(load_model_config(str(MODEL_CONFIG)))
    with pytest.raises(ValueError, match="selective"):
        make_checkpoint_fn(model, "some", 2)


def test_fsdp2_checkpointing_gives_bit_identical_gradients(tmp_path):
    """2 processes, FSDP2 through the trainer's FSDPStrategy: the local gradient shards with ``full``, ``every_k``
    and ``selective`` checkpointing equal those without, bit for bit, on every rank (worker:
    fsdp_checkpointing_worker)."""
    result_path = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", str(REPO / "tests/training/fsdp_checkpointing_worker.py"), str(result_path)]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    result = json.loads(result_path.read_text())
    assert result["parameters"] > 0
    assert result["sharded"], "the parameters must be FSDP2 DTensor shards"
    assert result["recompute_calls"] == {"none": [1, 1, 1, 1], "full": [2, 2, 2, 2], "every_k": [2, 1, 2, 1],
                                         "selective": [2, 2, 2, 2]}
    assert result["different"] == {"full": [], "every_k": [], "selective": []}
