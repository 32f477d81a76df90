"""Pretraining entry point.

    python -m pretrain.train --config configs/runs/<run>.yaml [key.sub=value ...]
    torchrun --nproc_per_node=N -m pretrain.train --config ...      (ddp / fsdp / deepspeed)
    deepspeed --num_gpus N --module pretrain.train --config ...       (deepspeed)

See ``launch/pretrain.sh`` for the launcher and ``pretrain/training/config.py`` for every key.
Exit codes: 0 finished or saved after SIGTERM/SIGUSR1; 3 stopped after too many non-finite steps in a row;
2 configuration error (every bad path of the run config listed at once) or no checkpoint that verifies.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import random
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import ConfigError, load_config, to_dict
from pretrain.training import checkpoint as ckpt
from pretrain.training.config import RunConfig, check_paths

log = logging.getLogger("pretrain")

EXIT_NONFINITE = 3
EXIT_CONFIG = 2
ERROR_DIR_ENV = "REBASED_ERROR_DIR"
_TEST_STEP_SLEEP = float(os.environ.get("REBASED_TEST_STEP_SLEEP", "0"))


class NonFiniteError(RuntimeError):
    pass


def report_error(code: int, message: str) -> None:
    """Our one-line message for exit code ``code``. Under a launcher that collects the ranks' messages (it sets
    REBASED_ERROR_DIR: ``pretrain.torchrun``, ``launch/slurm/pretrain.sbatch``) it goes to a file per rank and the
    launcher prints each distinct one once; otherwise this process prints it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        print(message, file=sys.stderr, flush=True)
        return
    with open(os.path.join(folder, f"rank-{int(os.environ.get('RANK', '0')):05d}"), "w") as f:
        f.write(f"{code}\t{message}\n")


# ---------------------------------------------------------------------------------------------------------------
# distributed setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = cfg.parallel.strategy
    if strategy == "single" and world > 1:
        raise ConfigError(f"parallel.strategy=single but WORLD_SIZE={world}; use ddp, fsdp or deepspeed")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if strategy != "single":
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = cfg.parallel.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if strategy == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_checkpoint_fn(module, mode: str, every: int):
    """Activation checkpointing through the model's ``checkpoint_fn`` hook (parameter names stay unchanged, so
    checkpoints are interchangeable with it on or off; works inside FSDP2 and DeepSpeed ZeRO-3 hooks)."""
    if mode == "none":
        return None
    from torch.utils.checkpoint import checkpoint

    chosen = {id(b) for i, b in enumerate(module.blocks) if mode == "full" or i % every == 0}

    def fn(block, *args):
        if id(block) in chosen:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    return fn


def resolve_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    p = cfg.training.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


def collate(samples: list[dict], document_masking: bool) -> dict:
    input_ids = torch.stack([s["input_ids"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    out = {"input_ids": input_ids, "labels": labels}
    if document_masking:  # one packed row; documents never see each other
        L = input_ids.shape[1]
        parts = [s["cu_seqlens"][:-1].long() + i * L for i, s in enumerate(samples)]
        out["cu_seqlens"] = torch.cat(parts + [torch.tensor([len(samples) * L])]).to(torch.int32)
        out["input_ids"], out["labels"] = input_ids.reshape(1, -1), labels.reshape(1, -1)
    return out


def batch_fingerprint(input_ids: torch.Tensor) -> int:
    """An order-insensitive sum identifying the sequences of a batch (to check that no sample is repeated or
    skipped after a resume, at any world size): Σ over sequences of Σ_t token_t·(t+1)."""
    x = input_ids.reshape(-1, input_ids.shape[-1]).long().cpu()
    return int((x * torch.arange(1, x.shape[1] + 1)).sum())


# ---------------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        t = cfg.training
        per_step = t.micro_batch_size * self.world
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size × world "
                f"size = {t.micro_batch_size} × {self.world}; change training.micro_batch_size (the global batch "
                f"stays fixed so that a resume at another world size continues the same sample order)")
        self.accum = t.global_batch_size // per_step
        self.stop_signal = None

        from pretrain.models import build_model, count_parameters, flops_per_token, load_model_config

        self.model_cfg = load_model_config(cfg.model, cfg.model_overrides)
        if self.model_cfg.learned_positions and cfg.data.seq_len > self.model_cfg.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len")
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)["train"]
        seed_everything(t.seed)
        module = build_model(self.model_cfg)  # same init on every rank (seeded), fp32 master weights
        self.n_params = count_parameters(module)
        module = module.to(self.device)
        if t.compile:
            for block in module.blocks:
                block.compile()
        self.checkpoint_fn = make_checkpoint_fn(module, t.activation_checkpointing, t.activation_checkpointing_every)

        # --- which checkpoint to resume from (decides how DeepSpeed is initialised) ---
        self.ckpt_root = cfg.checkpoint_dir
        if self.rank == 0:
            ckpt.remove_stale_temps(self.ckpt_root)
        barrier()
        self.resume_path = self._find_resume()
        self.resume_meta = ckpt.read_meta(self.resume_path) if self.resume_path else None

        from pretrain.training.parallel import STRATEGIES, DeepSpeedStrategy

        cls = STRATEGIES[cfg.parallel.strategy]
        if cls is DeepSpeedStrategy:
            universal = False
            if self.resume_meta is not None:
                stage = DeepSpeedStrategy.ds_config(cfg, self.world, self.accum, self.dtype, False)[
                    "zero_optimization"]["stage"]
                universal = (self.resume_meta.get("world_size") != self.world
                             or self.resume_meta.get("zero_stage") != stage)
                if universal and self.rank == 0:
                    DeepSpeedStrategy.convert_to_universal(self.resume_path)
                barrier()
            self.strategy = cls(module, cfg, self.device, self.dtype, self.accum, load_universal=universal)
        else:
            self.strategy = cls(module, cfg, self.device, self.dtype, self.accum)

        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.tokens_seen = 0
        if self.resume_path:
            self._load(self.resume_path, self.resume_meta)

        from pretrain.data import PackedSequenceDataset

        self.train_ds = PackedSequenceDataset(
            [(s.path, s.weight) for s in cfg.data.train], cfg.data.seq_len, seed=t.seed, rank=self.rank,
            world_size=self.world, return_cu_seqlens=cfg.data.document_masking, mix_block=cfg.data.mix_block,
            micro_batch_size=t.micro_batch_size)
        if self.resume_meta is not None:
            self.train_ds.load_state_dict(self.resume_meta["data"])
        self.train_iter = iter(self._loader(self.train_ds))

    # -- setup helpers ------------------------------------------------------------------------------------------
    def _verify(self, path: str) -> list[str]:
        """Problems of checkpoint ``path`` found by all ranks together (each checks a share of the files)."""
        found = [p for share in all_gather_object(ckpt.verify(path, self.rank, self.world)) for p in share]
        return list(dict.fromkeys(found))  # every rank reports a bad marker: once is enough

    def _find_resume(self) -> str | None:
        """The checkpoint to resume from, verified. ``auto``: the newest under the run's checkpoint root that
        verifies; newer ones that fail are moved aside (``step_N.corrupt``) and named in one line. A checkpoint
        root given as ``resume``: the same, without moving anything. One checkpoint given: it must verify."""
        r = self.cfg.checkpoint.resume
        if r == "none":
            return None
        if r != "auto" and ckpt.is_complete(r):
            problems = self._verify(r)
            if problems:
                more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
                raise ckpt.CheckpointError(f"checkpoint.resume={r}: refusing to resume from it, it fails "
                                           f"verification: {problems[0]}{more}")
            return r
        root = self.ckpt_root if r == "auto" else r
        candidates = [path for _, path in reversed(ckpt.list_complete(root))]
        if r != "auto" and not candidates:
            raise ConfigError(f"checkpoint.resume={r!r}: no complete checkpoint there")
        chosen, rejected = None, []
        for path in candidates:
            problems = self._verify(path)
            if not problems:
                chosen = path
                break
            rejected.append((path, problems))
        if not rejected:
            return chosen
        why = "; ".join(f"{os.path.basename(p)}: {probs[0]}" + (f" (+{len(probs) - 1} more)" if len(probs) > 1 else "")
                        for p, probs in rejected)
        if chosen is None:  # nothing is moved: a rerun must not silently start over
            raise ckpt.CheckpointError(
                f"no checkpoint in {root} passes verification, refusing to resume ({why}); restore the files, or "
                f"start over with checkpoint.resume=none")
        moved = ""
        if r == "auto":
            if self.rank == 0:
                for path, _ in rejected:
                    ckpt.move_aside(path)
            barrier()
            moved = ", moved aside as .corrupt"
        if self.rank == 0:
            log.warning("resume: %d newer checkpoint(s) failed verification%s (%s); resuming from the newest that "
                        "verifies, %s", len(rejected), moved, why, chosen)
        return chosen

    def _loader(self, ds):
        dm = self.cfg.data.document_masking
        return torch.utils.data.DataLoader(
            ds, batch_size=self.cfg.training.micro_batch_size, num_workers=self.cfg.data.num_workers,
            collate_fn=lambda s: collate(s, dm), pin_memory=self.device.type == "cuda",
            persistent_workers=self.cfg.data.num_workers > 0)

    def _load(self, path: str, meta: dict):
        if meta["global_batch_size"] != self.cfg.training.global_batch_size:
            raise ConfigError(
                f"{path} was trained with global_batch_size={meta['global_batch_size']}, the config says "
                f"{self.cfg.training.global_batch_size}: keep it (change micro_batch_size for another world size)")
        self.strategy.load(path, meta)
        self.step = meta["step"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.nonfinite_in_a_row = meta.get("nonfinite_in_a_row", 0)
        self.tokens_seen = meta.get("tokens_seen", 0)
        same_world = meta.get("world_size") == self.world
        if not (same_world and ckpt.load_rng(path, self.rank)):
            seed_everything(self.cfg.training.seed + 1000003 * self.step + self.rank)
        log.info("resumed from %s (step %d, saved at world size %s, now %d)", path, self.step,
                 meta.get("world_size"), self.world)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save(self, reason: str):
        root = self.ckpt_root
        name = ckpt.temp_dir_name(self.step) if self.rank == 0 else None
        name = broadcast_object(name)
        tmp = os.path.join(root, name)
        os.makedirs(tmp, exist_ok=True)
        barrier()
        self.strategy.save(tmp)
        ckpt.save_rng(tmp, self.rank)
        barrier()
        files = None
        if self.rank == 0:
            G = self.cfg.training.global_batch_size
            meta = {
                "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                "strategy": self.strategy.name, "format": self.strategy.checkpoint_format,
                "zero_stage": getattr(self.strategy, "zero_stage", None), "global_batch_size": G,
                "data": self.train_ds.state_dict(consumed_samples=self.step * G),
                "skipped_steps": self.skipped_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "model_config": to_dict(self.model_cfg), "run_config": to_dict(self.cfg), "reason": reason,
                "time": time.time(),
            }
            ckpt.write_meta(tmp, meta)
            files = ckpt.list_files(tmp)
        files = broadcast_object(files)
        sums = {}
        for share in all_gather_object(ckpt.checksum_share(tmp, files, self.rank, self.world)):
            sums.update(share)
        if self.rank == 0:
            # rotation keeps the last checkpoint saved before a run of non-finite steps (the one to go back to)
            final = ckpt.commit(root, tmp, self.step, sums, self.cfg.checkpoint.keep_last,
                                keep_through_step=self.step - self.nonfinite_in_a_row)
            log.info("saved checkpoint %s (%s)", final, reason)
        barrier()
        self.last_saved_step = self.step

    # -- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        from pretrain.data import PackedSequenceDataset

        cfg, t = self.cfg, self.cfg.training
        n = (t.eval_samples // self.world) * self.world
        ds = PackedSequenceDataset([(s.path, s.weight) for s in cfg.data.valid], cfg.data.seq_len, seed=t.seed,
                                   rank=self.rank, world_size=self.world, max_samples=n,
                                   return_cu_seqlens=cfg.data.document_masking, mix_block=cfg.data.mix_block)
        model = self.strategy.model
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self._loader(ds):
            ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
            cu = batch.get("cu_seqlens")
            with self.strategy.autocast():
                nll = model(ids, cu_seqlens=cu.to(self.device) if cu is not None else None, labels=labels,
                            reduction="sum", loss_chunk_tokens=t.loss_chunk_tokens)
            total[0] += nll.double()
            total[1] += labels.numel()
        model.train()
        all_reduce(total)
        loss = float(total[0] / total[1])
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(total[1])}

    # -- the loop -----------------------------------------------------------------------------------------------
    def _checkpoint_before_streak(self) -> str:
        """Names the newest checkpoint saved before the current run of non-finite steps began (one saved during
        it holds that streak's state, not a point to go back to)."""
        first_bad = self.step - self.nonfinite_in_a_row + 1
        before = [path for step, path in ckpt.list_complete(self.ckpt_root) if step < first_bad]
        if before:
            return f"the newest checkpoint saved before they began (step {first_bad}) is {before[-1]}"
        return f"no checkpoint was saved before they began (step {first_bad})"

    def _install_signal_handlers(self):
        if not self.cfg.checkpoint.save_on_signal:
            return

        def handler(signum, frame):
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _signal_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self._reduce_device)
        all_reduce(flag, dist.ReduceOp.MAX if dist.is_initialized() else None)
        return bool(flag.item() > 0)

    def train_step(self) -> dict:
        cfg, t, s = self.cfg, self.cfg.training, self.strategy
        from pretrain.training.optim import lr_at

        lr = lr_at(self.step, cfg.optim, t.max_steps)
        s.set_lr(lr)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        fingerprint = 0
        data_wait = 0.0
        for micro in range(self.accum):
            last = micro == self.accum - 1
            t0 = time.perf_counter()
            batch = next(self.train_iter)
            data_wait += time.perf_counter() - t0
            fingerprint += batch_fingerprint(batch["input_ids"])
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            cu = batch.get("cu_seqlens")
            cu = cu.to(self.device) if cu is not None else None
            with s.sync_context(last):
                with s.autocast():  # the loss is computed inside the wrapper's forward (it gathers the LM head)
                    loss = s.model(ids, cu_seqlens=cu, checkpoint_fn=self.checkpoint_fn, labels=labels,
                                   loss_chunk_tokens=t.loss_chunk_tokens)
                if self.step in t.inject_nan_at_steps and micro == 0:
                    loss = loss * float("nan")
                loss_sum += loss.detach().double()
                s.backward(loss, last)
            if s.handles_accumulation and not last:
                s.micro_step()
        stats = torch.tensor([float(loss_sum), float(fingerprint)], dtype=torch.float64, device=self._reduce_device)
        all_reduce(stats)
        mean_loss = float(stats[0]) / (self.accum * self.world)
        nonfinite_loss = not math.isfinite(mean_loss)
        grad_norm, applied = s.step(skip=nonfinite_loss)
        return {"loss": mean_loss, "grad_norm": grad_norm, "lr": lr, "applied": applied,
                "batch_fp": int(stats[1]), "data_wait_s": data_wait}

    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        self._reduce_device = self.device
        self.last_saved_step = self.step if self.resume_path else -1
        if self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            import yaml

            with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        from pretrain.training.metrics import MetricsLogger, peak_flops

        metrics = MetricsLogger(cfg, self.rank, self.step, t.max_steps, to_dict(cfg))
        peak = peak_flops(self.device)
        tokens_per_step = t.global_batch_size * cfg.data.seq_len
        metrics.info(
            f"model {cfg.model}: {self.n_params['total'] / 1e6:.2f}M parameters "
            f"({self.n_params['non_embedding'] / 1e6:.2f}M non-embedding), {self.flops_per_token / 1e6:.1f} "
            f"MFLOPs/token (train); strategy={self.strategy.name} world={self.world} precision="
            f"{str(self.dtype).replace('torch.', '')} micro_batch={t.micro_batch_size} accum={self.accum} "
            f"global_batch={t.global_batch_size} seq_len={cfg.data.seq_len} start_step={self.step}")
        self._install_signal_handlers()
        window_t0, window_tokens, window_wait = time.perf_counter(), 0, 0.0
        exit_code = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            while self.step < t.max_steps:
                out = self.train_step()
                if _TEST_STEP_SLEEP:
                    time.sleep(_TEST_STEP_SLEEP)  # tests: widen the window for signals / kills
                self.step += 1
                self.tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                window_wait += out["data_wait_s"]
                too_many_nonfinite = False
                if out["applied"]:
                    self.nonfinite_in_a_row = 0
                else:
                    self.skipped_steps += 1
                    self.nonfinite_in_a_row += 1
                    metrics.info(f"step {self.step}: non-finite loss/gradient (loss={out['loss']}, grad_norm="
                                 f"{out['grad_norm']}); update skipped ({self.nonfinite_in_a_row} in a row, "
                                 f"{self.skipped_steps} total)")
                    too_many_nonfinite = self.nonfinite_in_a_row >= t.max_nonfinite_in_a_row
                # the step that stops the run is always recorded, so metrics show why it stopped
                log_now = self.step % cfg.logging.every == 0 or self.step == t.max_steps or too_many_nonfinite
                if log_now:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    dt = time.perf_counter() - window_t0
                    tps = window_tokens / dt
                    rec = {"step": self.step, "loss": out["loss"], "grad_norm": out["grad_norm"], "lr": out["lr"],
                           "tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world,
                           "mfu": (self.flops_per_token * tps / (peak * self.world)) if peak else None,
                           "data_wait_frac": window_wait / dt, "tokens_seen": self.tokens_seen,
                           "skipped_steps": self.skipped_steps, "batch_fp": out["batch_fp"]}
                    if self.device.type == "cuda":
                        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    metrics.log(rec)
                    window_t0, window_tokens, window_wait = time.perf_counter(), 0, 0.0
                if too_many_nonfinite:
                    raise NonFiniteError(
                        f"stopping at step {self.step}: {self.nonfinite_in_a_row} non-finite steps in a row "
                        f"(training.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); "
                        f"{self._checkpoint_before_streak()}. Lower the lr, raise warmup or check the data.")
                metrics.advance(1, loss=out["loss"])
                if cfg.data.valid and t.eval_every and self.step % t.eval_every == 0:
                    metrics.log({"step": self.step, **self.evaluate()})
                    window_t0 = time.perf_counter()
                if self._signal_agreed():
                    metrics.info(f"signal received: saving at step {self.step} and exiting")
                    self.save("signal")
                    metrics.close()
                    return 0
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < t.max_steps:
                    self.save("periodic")
                    window_t0 = time.perf_counter()
        except NonFiniteError as e:
            report_error(EXIT_NONFINITE, f"error: {e}")
            exit_code = EXIT_NONFINITE
        if exit_code == 0:
            if cfg.checkpoint.save_final and self.last_saved_step != self.step:
                self.save("final")  # before the final evaluation: a failure there must not lose the run
            if cfg.data.valid and (not t.eval_every or self.step % t.eval_every != 0):
                metrics.log({"step": self.step, **self.evaluate()})
            if cfg.checkpoint.export_final and self.rank == 0:
                from pretrain.training.export import export_checkpoint

                latest = ckpt.find_latest(self.ckpt_root)
                if latest:
                    metrics.info(f"exported {export_checkpoint(latest, os.path.join(cfg.out_dir, 'export'))}")
            barrier()
        metrics.close()
        return exit_code


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pretrain.train", description="Pretrain a model config.")
    p.add_argument("--config", required=True, help="run config YAML (configs/runs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. training.max_steps=100")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP save in one process
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        problems = check_paths(cfg)  # all of them at once, before any process group or model exists
        if problems:
            raise ConfigError(f"{args.config}: {len(problems)} problem(s) with paths:\n  " + "\n  ".join(problems))
        trainer = Trainer(cfg)
    except ckpt.CheckpointError as e:
        report_error(EXIT_CONFIG, f"checkpoint error: {e}")
        return EXIT_CONFIG
    except ConfigError as e:
        report_error(EXIT_CONFIG, f"config error: {e}")
        return EXIT_CONFIG
    if trainer.rank != 0:
        logging.getLogger("pretrain").setLevel(logging.WARNING)
    code = trainer.run()
    if dist.is_initialized():
        # free the wrapped model (it holds the process group) while Python is still up: a group torn down only at
        # interpreter exit can abort the process ("terminate called without an active exception") after a clean run
        del trainer
        gc.collect()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
