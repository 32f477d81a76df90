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
import contextlib
import functools
import gc
import logging
import math
import os
import random
import signal
import sys
import time
import warnings
import weakref

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pretrain.atomic import write_text_atomic
from pretrain.config import ConfigError, dotted_keys, load_config, to_dict
from pretrain.data.packed import PackedSequenceDataset
from pretrain.models import build_model, count_parameters, flops_per_token, load_model_config
from pretrain.training import checkpoint as ckpt
from pretrain.training.activation_checkpointing import make_checkpoint_fn
from pretrain.training.config import RunConfig, check_paths
from pretrain.training.distributed import all_gather_object, all_reduce, barrier, broadcast_object, init_distributed
from pretrain.training.resume import find_resume
from pretrain.training.errors import EXIT_CONFIG, EXIT_NONFINITE, NonFiniteError, report_error
from pretrain.training.export import export_checkpoint
from pretrain.training.metrics import MetricsLogger, peak_flops
from pretrain.training.optim import lr_at
from pretrain.training.parallel import build_strategy

log = logging.getLogger("pretrain")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # save a checkpoint and exit 0 (Slurm preemption)
_TEST_STEP_SLEEP = float(os.environ.get("REBASED_TEST_STEP_SLEEP", "0"))


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms():
    """training.deterministic, while a run trains: PyTorch's deterministic kernels (warn_only: an op without one
    warns, naming itself, rather than failing a long run) and no cuDNN autotuning; the process's previous settings
    come back afterwards. (The cuBLAS workspace setting they also need is made before the model reaches the GPU.)"""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2:]


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


def config_differences(saved: dict, now: dict, sections: tuple[str, ...] | None = None) -> list[str]:
    """'key: saved -> now' for every dotted key of ``saved`` whose value differs (only under ``sections`` when
    given). Keys the saved config lacks are left out: a field added to the stack since then has the default that
    keeps the behaviour the checkpoint was made with."""
    saved, now = dotted_keys(saved), dotted_keys(now)
    return [f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in sorted(saved)
            if saved[k] != now.get(k) and (sections is None or k.split(".")[0] in sections)]


def batch_fingerprint(input_ids: torch.Tensor, seq_len: int) -> int:
    """An order-insensitive sum identifying the sequences of a batch (to check that no sample is repeated or
    skipped after a resume, at any world size and micro-batch size): Σ over sequences of Σ_t token_t·(t+1), each
    sample's positions counted from its own start (document masking packs a micro batch into one row)."""
    x = input_ids.reshape(-1, seq_len).long().cpu()
    return int((x * torch.arange(1, seq_len + 1)).sum())


# ---------------------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        if cfg.training.deterministic:  # cuBLAS reads it at its first handle: before the model reaches the GPU
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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
        if cfg.data.valid and t.eval_samples < self.world:  # each rank evaluates eval_samples // world sequences
            raise ConfigError(f"training.eval_samples={t.eval_samples} is fewer than the {self.world} processes; "
                              f"give at least one validation sequence per process")
        self.stop_signal = None
        self._previous_handlers: dict = {}  # signal -> the handler this run replaced

        self.model_cfg = load_model_config(cfg.model, cfg.model_overrides)
        if self.model_cfg.learned_positions and cfg.data.seq_len > self.model_cfg.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len")
        self.flops_per_token = flops_per_token(self.model_cfg, cfg.data.seq_len)["train"]
        seed_everything(t.seed)
        module = build_model(self.model_cfg)  # same init on every rank (seeded), fp32 master weights
        # from here on each rank draws its own stream (dropout masks differ across data-parallel ranks); a resume
        # without the saved RNG states reseeds by the same rule at its step
        seed_everything(self._rank_seed(step=0))
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
        self.resume_path = find_resume(cfg.checkpoint.resume, self.ckpt_root, self.rank, self.world)
        self.resume_meta = ckpt.read_meta(self.resume_path) if self.resume_path else None

        self.train_ds = PackedSequenceDataset(
            [(s.path, s.weight) for s in cfg.data.train], cfg.data.seq_len, seed=t.seed, rank=self.rank,
            world_size=self.world, return_cu_seqlens=cfg.data.document_masking, mix_block=cfg.data.mix_block,
            micro_batch_size=t.micro_batch_size)
        if self.resume_path:  # before any model state is loaded: a checkpoint of another run is refused cleanly
            self._check_resumable(self.resume_path, self.resume_meta)

        self.strategy = build_strategy(module, cfg, self.device, self.dtype, self.accum, self.rank, self.world,
                                       self.resume_path, self.resume_meta)

        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.tokens_seen = 0
        self.last_saved_path = None
        if self.resume_path:
            self._load(self.resume_path, self.resume_meta)
        self.train_iter = iter(self._loader(self.train_ds))

    # -- setup helpers ------------------------------------------------------------------------------------------
    def _rank_seed(self, step: int) -> int:
        return self.cfg.training.seed + 1000003 * step + self.rank

    def _loader(self, ds):
        dm = self.cfg.data.document_masking
        return torch.utils.data.DataLoader(
            ds, batch_size=self.cfg.training.micro_batch_size, num_workers=self.cfg.data.num_workers,
            # a partial, not a lambda: workers started by spawn/forkserver (macOS; Linux from Python 3.14) get it
            # pickled
            collate_fn=functools.partial(collate, document_masking=dm), pin_memory=self.device.type == "cuda",
            persistent_workers=self.cfg.data.num_workers > 0,
            # its own generator: starting an iterator would otherwise draw from the global torch RNG, which a
            # resume restores before the iterator starts (dropout would then differ from the uninterrupted run)
            generator=torch.Generator().manual_seed(self.cfg.training.seed))

    def _check_resumable(self, path: str, meta: dict):
        """Refuse a checkpoint saved with another model, global batch or data order; name the other settings
        that changed since it was saved (lr, schedule, max_steps, ...)."""
        changed = config_differences(meta["model_config"], to_dict(self.model_cfg))
        if changed:
            raise ConfigError(
                f"checkpoint.resume: {path} holds another model than {self.cfg.model} (with model_overrides) builds "
                f"({'; '.join(changed)}); resume with the model it was trained with, or start over with "
                f"checkpoint.resume=none")
        saved_by = meta.get("strategy")
        if (saved_by == "deepspeed") != (self.cfg.parallel.strategy == "deepspeed"):
            # DCP (single, ddp, fsdp) and DeepSpeed's own files: each loads only its own
            raise ConfigError(
                f"checkpoint.resume: {path} was saved by parallel.strategy={saved_by}, which "
                f"parallel.strategy={self.cfg.parallel.strategy} cannot load; resume it with "
                f"{'deepspeed' if saved_by == 'deepspeed' else 'single, ddp or fsdp'}, or export its model "
                f"(python -m pretrain.training.export)")
        if meta["global_batch_size"] != self.cfg.training.global_batch_size:
            raise ConfigError(
                f"{path} was trained with global_batch_size={meta['global_batch_size']}, the config says "
                f"{self.cfg.training.global_batch_size}: keep it (change micro_batch_size for another world size)")
        try:
            self.train_ds.load_state_dict(meta["data"])
        except ValueError as e:
            raise ConfigError(
                f"checkpoint.resume: {path} was trained on another data order ({e}); keep training.seed, "
                f"data.seq_len, data.mix_block and the train datasets and weights as they were") from None
        changed = config_differences(meta["run_config"], to_dict(self.cfg), ("training", "optim", "data"))
        if changed and self.rank == 0:
            log.warning("resume: the config differs from the one %s was saved with: %s", path, "; ".join(changed))

    def _load(self, path: str, meta: dict):
        self.strategy.load(path, meta)
        self.last_saved_path = path
        self.step = meta["step"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.nonfinite_in_a_row = meta.get("nonfinite_in_a_row", 0)
        self.tokens_seen = meta.get("tokens_seen", 0)
        same_world = meta.get("world_size") == self.world
        if not (same_world and ckpt.load_rng(path, self.rank)):
            seed_everything(self._rank_seed(self.step))
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
        self.last_saved_path = os.path.join(root, ckpt.step_dir_name(self.step))

    # -- evaluation ---------------------------------------------------------------------------------------------
    def _check_token_ids(self, input_ids: torch.Tensor, source: str) -> None:
        """Refuse a batch (on the CPU, before it moves) holding an id past the model's vocabulary: the embedding
        lookup would fail on the CPU and trip a device-side assert on CUDA. The path check catches this from a
        split's manifest before the start; shards without one are caught here."""
        top = int(input_ids.max()) if input_ids.numel() else -1
        if top >= self.model_cfg.vocab_size:
            raise ConfigError(f"{source}: token id {top} in the batch of step {self.step} is outside the model's "
                              f"vocabulary (vocab_size={self.model_cfg.vocab_size}): the data was tokenized with "
                              "another tokenizer")

    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        n = (t.eval_samples // self.world) * self.world
        ds = PackedSequenceDataset([(s.path, s.weight) for s in cfg.data.valid], cfg.data.seq_len, seed=t.seed,
                                   rank=self.rank, world_size=self.world, max_samples=n,
                                   return_cu_seqlens=cfg.data.document_masking, mix_block=cfg.data.mix_block)
        model = self.strategy.model
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self._loader(ds):
            self._check_token_ids(batch["input_ids"], "data.valid")
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

        # a weak reference: a handler holding the trainer would keep its model (and the model's hold on the process
        # group) alive until interpreter exit, where a gloo group torn down late can abort a finished run
        trainer = weakref.ref(self)

        def handler(signum, frame):
            if trainer() is not None:
                trainer().stop_signal = signum

        self._previous_handlers = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def _restore_signal_handlers(self):
        """The handlers from before the run, unless a signal stopped it: then ours stay, so that a second signal
        (a scheduler's SIGTERM after its SIGUSR1) cannot kill the process that has just saved."""
        if self.stop_signal is None:
            for sig, previous in self._previous_handlers.items():
                signal.signal(sig, previous)
        self._previous_handlers = {}

    def _signal_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self._reduce_device)
        all_reduce(flag, dist.ReduceOp.MAX if dist.is_initialized() else None)
        return bool(flag.item() > 0)

    def train_step(self) -> dict:
        cfg, t, s = self.cfg, self.cfg.training, self.strategy
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
            fingerprint += batch_fingerprint(batch["input_ids"], cfg.data.seq_len)
            self._check_token_ids(batch["input_ids"], "data.train")
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
        """Train to ``max_steps``: 0 when finished or saved after a signal, EXIT_NONFINITE after too many
        non-finite steps in a row."""
        with deterministic_algorithms() if self.cfg.training.deterministic else contextlib.nullcontext():
            return self._train()

    def _train(self) -> int:
        t = self.cfg.training
        metrics = self._start()
        try:
            while self.step < t.max_steps:
                out = self.train_step()
                if _TEST_STEP_SLEEP:
                    time.sleep(_TEST_STEP_SLEEP)  # tests: widen the window for signals / kills
                too_many_nonfinite = self._count_step(out, metrics)
                # the step that stops the run is always recorded, so metrics show why it stopped
                if self.step % self.cfg.logging.every == 0 or self.step == t.max_steps or too_many_nonfinite:
                    metrics.log(self._record(out))
                if too_many_nonfinite:
                    raise NonFiniteError(
                        f"stopping at step {self.step}: {self.nonfinite_in_a_row} non-finite steps in a row "
                        f"(training.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); "
                        f"{self._checkpoint_before_streak()}. Lower the lr, raise warmup or check the data.")
                metrics.advance(1, loss=out["loss"])
                if self._periodic(metrics):  # a signal: saved, stop here
                    metrics.close()
                    return 0
            self._finish(metrics)
            metrics.close()
            return 0
        except NonFiniteError as e:
            report_error(EXIT_NONFINITE, f"error: {e}")
            metrics.close()
            return EXIT_NONFINITE
        finally:
            self._restore_signal_handlers()

    def _start(self) -> MetricsLogger:
        cfg, t = self.cfg, self.cfg.training
        self._reduce_device = self.device
        self.last_saved_step = self.step if self.resume_path else -1
        if self.rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            write_text_atomic(os.path.join(cfg.out_dir, "config.yaml"), yaml.safe_dump(to_dict(cfg), sort_keys=False))
        metrics = MetricsLogger(cfg, self.rank, self.step, t.max_steps, to_dict(cfg))
        self.peak_flops = peak_flops(self.device)
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        metrics.info(
            f"model {cfg.model}: {self.n_params['total'] / 1e6:.2f}M parameters "
            f"({self.n_params['non_embedding'] / 1e6:.2f}M non-embedding), {self.flops_per_token / 1e6:.1f} "
            f"MFLOPs/token (train); strategy={self.strategy.name} world={self.world} precision="
            f"{str(self.dtype).replace('torch.', '')} micro_batch={t.micro_batch_size} accum={self.accum} "
            f"global_batch={t.global_batch_size} seq_len={cfg.data.seq_len} start_step={self.step}")
        if 0 < t.max_steps <= cfg.optim.warmup_steps:
            log.warning("optim.warmup_steps=%d >= training.max_steps=%d: the whole run is warmup, the lr only "
                        "rises (to at most optim.lr=%g) and never decays", cfg.optim.warmup_steps, t.max_steps,
                        cfg.optim.lr)
        self._install_signal_handlers()
        self.window = ThroughputWindow()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return metrics

    def _count_step(self, out: dict, metrics: MetricsLogger) -> bool:
        """Advance the counters after a step; True when the non-finite steps in a row reached the limit."""
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.window.add(self.tokens_per_step, out["data_wait_s"])
        if out["applied"]:
            self.nonfinite_in_a_row = 0
            return False
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        metrics.info(f"step {self.step}: non-finite loss/gradient (loss={out['loss']}, grad_norm={out['grad_norm']}); "
                     f"update skipped ({self.nonfinite_in_a_row} in a row, {self.skipped_steps} total)")
        return self.nonfinite_in_a_row >= self.cfg.training.max_nonfinite_in_a_row

    def _record(self, out: dict) -> dict:
        """The metrics line of this step: the step's numbers and the throughput since the last line."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt, tokens, wait = self.window.take()
        tps = tokens / dt
        peak = self.peak_flops
        rec = {"step": self.step, "loss": out["loss"], "grad_norm": out["grad_norm"], "lr": out["lr"],
               "tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world,
               "mfu": (self.flops_per_token * tps / (peak * self.world)) if peak else None,
               "data_wait_frac": wait / dt, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
               "batch_fp": out["batch_fp"]}
        if self.device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return rec

    def _periodic(self, metrics: MetricsLogger) -> bool:
        """A signal's save, the periodic checkpoint, then the evaluation (a save never waits for an evaluation, nor
        is lost when one fails; their time is left out of the throughput); True when a signal stopped the run. The
        last step leaves all of it to ``_finish``, which also saves, evaluates and exports when a signal came."""
        cfg, t = self.cfg, self.cfg.training
        if self.step >= t.max_steps:
            return False
        if self._signal_agreed():
            metrics.info(f"signal received: saving at step {self.step} and exiting")
            self.save("signal")
            return True
        if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
            self.save("periodic")
            self.window.restart()
        if cfg.data.valid and t.eval_every and self.step % t.eval_every == 0:
            metrics.log({"step": self.step, **self.evaluate()})
            self.window.restart()
        return False

    def _finish(self, metrics: MetricsLogger) -> None:
        cfg = self.cfg
        if cfg.checkpoint.save_final and self.last_saved_step != self.step:
            self.save("final")  # before the final evaluation: a failure there must not lose the run
        if cfg.data.valid:
            metrics.log({"step": self.step, **self.evaluate()})
        if cfg.checkpoint.export_final and self.rank == 0:
            # the checkpoint of this step: saved above, or the one this run resumed from (at max_steps already)
            exported = export_checkpoint(self.last_saved_path, os.path.join(cfg.out_dir, "export"))
            metrics.info(f"exported {exported} (step {self.step})")
        barrier()


class ThroughputWindow:
    """Tokens and data-loading wait since the last metrics line (time spent evaluating or saving is left out)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.t0, self.tokens, self.wait = time.perf_counter(), 0, 0.0

    def add(self, tokens: int, wait_s: float) -> None:
        self.tokens += tokens
        self.wait += wait_s

    def take(self) -> tuple[float, int, float]:
        """(seconds, tokens, wait seconds) of the window, and a new window."""
        out = (time.perf_counter() - self.t0, self.tokens, self.wait)
        self.restart()
        return out


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
    try:
        return trainer.run()
    except ConfigError as e:  # found in the data while training (e.g. a token id past the vocabulary)
        report_error(EXIT_CONFIG, f"config error: {e}")
        return EXIT_CONFIG
    finally:
        # the run is over (saved): a late signal (a scheduler's second one) must not fail the teardown
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            if dist.is_initialized():
                # free the wrapped model (it holds the process group) while Python is still up: a group torn down
                # only at interpreter exit can abort the process ("terminate called without an active exception")
                del trainer
                gc.collect()
                dist.destroy_process_group()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    exit_code = main()
    for stop_signal in STOP_SIGNALS:  # nor the exit: Python restores the default action of handled signals then
        signal.signal(stop_signal, signal.SIG_IGN)
    sys.exit(exit_code)
