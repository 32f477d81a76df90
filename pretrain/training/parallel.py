"""Parallelism strategies behind one small interface; the model code knows nothing about them.

``single``   one process, plain module.
``ddp``      torch DistributedDataParallel (gradients all-reduced on the last micro batch only).
``fsdp``     FSDP2 ``fully_shard`` per block and at the root, with a bf16/fp32 mixed-precision policy.
``deepspeed`` a DeepSpeed engine (ZeRO stage 1/2/3 from the ds_config) around the same torch AdamW.

Every strategy takes the same AdamW (``optim.build_optimizer``) and learning rate set per step by the trainer, so
the math is the same; they differ only in how gradients are reduced and where state lives.

Checkpoints are world-size independent:
* single/ddp/fsdp save through torch.distributed.checkpoint (DCP) with ``get_state_dict`` — sharded files plus a
  metadata file that any world size (and any of these three strategies) can load; DCP reshards on load.
* deepspeed saves its native ZeRO checkpoint. Loading at the same world size uses it as is; at another world
  size the checkpoint is converted once (``deepspeed.checkpoint.ds_to_universal``) into a universal checkpoint
  kept next to it, and the engine loads that (``checkpoint.load_universal``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from pretrain.atomic import publish_dir
from pretrain.config import ConfigError
from pretrain.training.distributed import barrier
from pretrain.training import optim as optim_lib

log = logging.getLogger("pretrain")


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


class Strategy:
    """Common interface. ``model`` is what the training step calls (wrapped); ``module`` the plain CausalLM."""

    name = "single"
    handles_accumulation = False  # True when the engine averages micro batches itself (DeepSpeed)

    def __init__(self, module: nn.Module, run_cfg, device: torch.device, dtype: torch.dtype, accum: int):
        self.module = module
        self.cfg = run_cfg
        self.device = device
        self.dtype = dtype
        self.accum = accum
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.model: nn.Module = module
        self.optimizer: torch.optim.Optimizer | None = None

    # -- helpers -------------------------------------------------------------------------------------------
    def _make_optimizer(self, model: nn.Module):
        decay, no_decay = optim_lib.decay_parameter_names(self.module)
        groups = optim_lib.build_param_groups(model, decay, no_decay, self.cfg.optim.weight_decay)
        return optim_lib.build_optimizer(groups, self.cfg.optim)

    def autocast(self):
        if self.dtype == torch.bfloat16 and self.name in ("single", "ddp"):
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync_context(self, is_last_micro: bool):
        return contextlib.nullcontext()

    # -- the step ------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, is_last_micro: bool):
        """Backward of one micro batch's mean loss (scaled here by 1/accum)."""
        (loss / self.accum).backward()

    def set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False, foreach=None)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: reduce the shards' norms
            norm = norm.full_tensor()
        return norm

    def step(self, skip: bool) -> tuple[float, bool]:
        """Clip and apply the accumulated gradients; returns (grad norm before clipping, applied?).
        The step is skipped (no update) when ``skip`` or when the gradient norm is not finite."""
        norm = self.grad_norm()
        applied = not skip and _all_finite(norm)
        if applied:
            clip = self.cfg.training.grad_clip
            if clip > 0:
                params = [p for p in self.model.parameters() if p.grad is not None]
                torch.nn.utils.clip_grads_with_norm_(params, clip, norm.to(params[0].grad.device)
                                                     if not hasattr(params[0].grad, "device_mesh") else norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), applied

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, path: str):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(path, "dcp"))

    def load(self, path: str, meta: dict):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if meta.get("format") != "dcp":
            raise RuntimeError(f"{path}: a {meta.get('strategy')} checkpoint cannot be loaded by strategy {self.name}")
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=os.path.join(path, "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    checkpoint_format = "dcp"


class SingleStrategy(Strategy):
    name = "single"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if self.world_size > 1:
            raise RuntimeError("strategy 'single' runs on one process; use ddp, fsdp or deepspeed with several")
        self.optimizer = self._make_optimizer(self.model)


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DDP(self.module, device_ids=ids, broadcast_buffers=False)
        self.optimizer = self._make_optimizer(self.model.module)

    def sync_context(self, is_last_micro: bool):
        return contextlib.nullcontext() if is_last_micro else self.model.no_sync()


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.dtype == torch.bfloat16 else MixedPrecisionPolicy()
        reshard = self.cfg.parallel.fsdp_reshard_after_forward
        for block in self.module.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(self.module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
        self.model = self.module
        self.optimizer = self._make_optimizer(self.model)

    def sync_context(self, is_last_micro: bool):
        self.model.set_requires_gradient_sync(is_last_micro)
        return contextlib.nullcontext()


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    handles_accumulation = True
    checkpoint_format = "deepspeed"

    def __init__(self, module, run_cfg, device, dtype, accum, load_universal: bool = False):
        super().__init__(module, run_cfg, device, dtype, accum)
        import deepspeed

        ds_cfg = self.ds_config(run_cfg, self.world_size, accum, dtype, load_universal)
        self.zero_stage = ds_cfg["zero_optimization"]["stage"]
        optimizer = self._make_optimizer(self.module)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                                                 config=ds_cfg)
        self.model = self.engine

    @staticmethod
    def ds_config(run_cfg, world_size: int, accum: int, dtype, load_universal: bool) -> dict:
        with open(run_cfg.parallel.deepspeed_config) as f:
            cfg = json.load(f)
        t = run_cfg.training
        # Batch, clipping and precision always come from the run config (one source of truth).
        cfg["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        cfg["gradient_accumulation_steps"] = accum
        cfg["train_batch_size"] = t.micro_batch_size * accum * world_size
        cfg["gradient_clipping"] = t.grad_clip
        cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
        cfg.pop("fp16", None)
        cfg.pop("optimizer", None)  # the client torch AdamW is used
        cfg.pop("scheduler", None)  # lr is set by the trainer every step
        zero = cfg.setdefault("zero_optimization", {})
        if run_cfg.parallel.zero_stage is not None:
            zero["stage"] = run_cfg.parallel.zero_stage
        zero.setdefault("stage", 2)
        if zero["stage"] not in (1, 2, 3):
            raise ConfigError(f"DeepSpeed ZeRO stage {zero['stage']} is not supported (parallel.zero_stage or "
                              f"{run_cfg.parallel.deepspeed_config}: use 1, 2 or 3)")
        if zero["stage"] == 3 and t.activation_checkpointing == "selective":
            # ZeRO-3 runs linear layers through its own autograd function, which adds the bias in place into the
            # matmul output; selective checkpointing keeps that output, so the recompute adds the bias a second
            # time (tried in tests/training/test_equivalence.py: the losses left its 2e-6 tolerance)
            raise ConfigError("training.activation_checkpointing=selective does not give the same gradients under "
                              "DeepSpeed ZeRO stage 3; use full or every_k with ZeRO-3, or selective with FSDP2 "
                              "(parallel.strategy=fsdp) or ZeRO stage 1/2")
        cfg.setdefault("steps_per_print", 10**9)
        cfg.setdefault("wall_clock_breakdown", False)
        if load_universal:
            cfg.setdefault("checkpoint", {})["load_universal"] = True
        return cfg

    def backward(self, loss, is_last_micro):
        # The engine skips an update only on non-finite gradients, but a non-finite loss can have finite ones (a
        # micro batch whose labels are all ignored: its mean is 0/0, its gradient 0). Scale such a loss by NaN so
        # its gradients are NaN too (a factor of 1 or NaN, so no host sync).
        poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
        self.engine.backward(loss * poison)  # the engine scales by 1/gradient_accumulation_steps

    def set_lr(self, lr):
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def micro_step(self):
        """DeepSpeed wants engine.step() after every micro batch; it applies the update at the boundary."""
        self.engine.step()

    def step(self, skip: bool):
        # A non-finite loss gives non-finite gradients on that rank (see backward), hence everywhere after the
        # reduction; the engine's own overflow check then skips the update (was_step_applied() is False).
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, applied

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, path):
        self.engine.save_checkpoint(os.path.join(path, "deepspeed"), tag="native", save_latest=False)

    def load(self, path, meta):
        if meta.get("format") != "deepspeed":
            raise RuntimeError(f"{path}: a {meta.get('strategy')} checkpoint cannot be loaded by deepspeed")
        root = os.path.join(path, "deepspeed")
        same = meta.get("world_size") == self.world_size and meta.get("zero_stage") == self.zero_stage
        tag = "native" if same else "universal"
        # ZeRO-3's universal loader copies group 0's hyperparameters onto every group (weight decay would leak
        # onto norms/embeddings): remember ours and put them back.
        saved = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        inner = getattr(self.optimizer, "optimizer", None)
        saved_inner = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups] if inner else []
        self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False,
                                    load_module_strict=True)
        if not same:
            for g, s in zip(self.optimizer.param_groups, saved):
                g.update(s)
            if inner is not None:
                for g, s in zip(inner.param_groups, saved_inner):
                    g.update(s)
                # ... and it gives every flat group the SAME 'step' tensor object, which AdamW then increments
                # once per group per step (wrong bias correction): give each its own copy.
                for st in inner.state.values():
                    if isinstance(st.get("step"), torch.Tensor):
                        st["step"] = st["step"].clone()

    @staticmethod
    def convert_to_universal(path: str):
        """Once per checkpoint (rank 0, the native files already verified): native ZeRO checkpoint → universal
        one, written atomically with its own checksummed ``COMPLETE``. A universal checkpoint kept from an earlier
        run is used only if it verifies; else it is converted again from the native files."""
        from pretrain.training import checkpoint as ckpt

        root = os.path.join(path, "deepspeed")
        final = os.path.join(root, "universal")
        if os.path.isdir(final):
            problems = ckpt.verify(final, required=())
            if not problems:
                return
            log.warning("%s fails verification (%s); converting the native checkpoint again", final, problems[0])
            shutil.rmtree(final)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting %s to a DeepSpeed universal checkpoint (world size change)", root)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                        "--input_folder", os.path.join(root, "native"), "--output_folder", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        ckpt.write_marker(tmp, None, ckpt.checksum_share(tmp, ckpt.list_files(tmp)))
        publish_dir(tmp, final)


STRATEGIES = {"single": SingleStrategy, "ddp": DDPStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(module, run_cfg, device, dtype, accum: int, rank: int, world: int, resume_path: str | None,
                   resume_meta: dict | None) -> Strategy:
    """The run's strategy around ``module``. DeepSpeed resumes a checkpoint saved at another world size or ZeRO stage
    through a universal checkpoint, converted once (by rank 0) before the engine is built."""
    cls = STRATEGIES[run_cfg.parallel.strategy]
    if cls is not DeepSpeedStrategy:
        return cls(module, run_cfg, device, dtype, accum)
    universal = False
    if resume_meta is not None:
        stage = DeepSpeedStrategy.ds_config(run_cfg, world, accum, dtype, False)["zero_optimization"]["stage"]
        saved_stage = resume_meta.get("zero_stage")
        if saved_stage != stage and 3 in (saved_stage, stage):
            # DeepSpeed's universal checkpoint converts, but its load then fails (an assertion in its
            # state_dict_factory) between stage 3 and stages 1/2; 1 <-> 2 and other world sizes load
            raise ConfigError(f"checkpoint.resume: {resume_path} was saved under ZeRO stage {saved_stage}, which "
                              f"stage {stage} cannot load; resume with parallel.zero_stage={saved_stage}, or export "
                              "its model (python -m pretrain.training.export)")
        universal = resume_meta.get("world_size") != world or saved_stage != stage
        if universal and rank == 0:
            DeepSpeedStrategy.convert_to_universal(resume_path)
        barrier()
    return cls(module, run_cfg, device, dtype, accum, load_universal=universal)
