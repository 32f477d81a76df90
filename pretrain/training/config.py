"""Run configuration: one YAML file names the model config, the data, optimisation, parallelism, checkpoints
and logging. Loaded with :func:`pretrain.config.load_config`, so unknown keys, wrong types and invalid choices
fail with a message naming the file and the dotted key; ``key.sub=value`` overrides come from the command line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Literal


def _require_at_least(obj, **minimums) -> None:
    """Each named field of ``obj`` is a finite number >= its minimum; the message names the field and its value
    (the config loader adds the file and the section)."""
    for name, minimum in minimums.items():
        value = getattr(obj, name)
        if not (math.isfinite(value) and value >= minimum):
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclass
class DataSource:
    path: str  # shard prefix, directory of shards (tokenize_pile output) or glob
    weight: float = 1.0

    def __post_init__(self):
        if not (self.weight > 0 and math.isfinite(self.weight)):  # also refuses nan / inf
            raise ValueError(f"weight of {self.path!r} must be a positive number, got {self.weight}")


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    valid: list[DataSource] = field(default_factory=list)
    seq_len: int = 2048
    # Document masking: each micro batch is flattened to one packed row with cu_seqlens, so no token attends
    # across a document boundary (positions restart per document).
    document_masking: bool = False
    num_workers: int = 0  # DataLoader workers per rank (0 = read in the training process)
    mix_block: int = 1000

    def __post_init__(self):
        _require_at_least(self, seq_len=1, num_workers=0, mix_block=1)


@dataclass
class TrainingConfig:
    max_steps: int = 1000
    # Sequences per optimizer step over all ranks. Kept constant across a world-size change; gradient
    # accumulation = global_batch_size / (micro_batch_size * world_size) is derived from it.
    global_batch_size: int = 512
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still measured)
    # Non-finite loss or gradient: the step is skipped (no update) and counted; this many in a row stop the run.
    max_nonfinite_in_a_row: int = 5
    # selective: every block, keeping the matmul / attention / kernel outputs and recomputing the rest
    activation_checkpointing: Literal["none", "full", "every_k", "selective"] = "none"
    activation_checkpointing_every: int = 2  # with every_k: blocks 0, k, 2k, ... are recomputed
    compile: bool = False  # torch.compile each block
    # Tokens per chunk of the LM head + cross-entropy (pretrain/models/loss.py, which says why 8192): the
    # [tokens, vocab] logits never exist, only one chunk's. 0: full logits and F.cross_entropy (same loss).
    loss_chunk_tokens: int = 8192
    seed: int = 1234
    # true: PyTorch's deterministic algorithms (an op without one warns, naming itself), no cuDNN autotuning, cuBLAS
    # with a fixed workspace: reruns on the same GPU give the same losses, at some speed. Our Triton kernels use no
    # atomics, so they are deterministic either way; on CPU the run is deterministic without it
    deterministic: bool = False
    eval_every: int = 0  # steps between validation passes (0 = only at the end when valid data is given)
    eval_samples: int = 64  # validation sequences per pass (split over ranks)
    # Debugging / fault injection: poison the loss with NaN at these steps (tests of the non-finite path).
    inject_nan_at_steps: list[int] = field(default_factory=list)

    def __post_init__(self):
        _require_at_least(self, max_steps=0, global_batch_size=1, micro_batch_size=1, max_nonfinite_in_a_row=1,
                          activation_checkpointing_every=1, loss_chunk_tokens=0, eval_every=0, eval_samples=1,
                          grad_clip=0)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices of linear/conv layers only (not norms, biases, γ/β, embeddings)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    # WSD (warmup-stable-decay): the last `decay_fraction` of max_steps decays linearly to min_lr.
    decay_fraction: float = 0.2

    def __post_init__(self):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):  # NaN fails the comparison too
            raise ValueError(f"betas={self.betas} must be two numbers in [0, 1)")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("decay_fraction and min_lr_ratio must lie in [0, 1]")
        _require_at_least(self, lr=0, eps=0, weight_decay=0, warmup_steps=0)


@dataclass
class ParallelConfig:
    strategy: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # ZeRO stage etc.; batch/clip/precision come from here
    zero_stage: int | None = None  # overrides the ds_config's zero_optimization.stage
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, gloo on CPU
    fsdp_reshard_after_forward: bool = True

    def __post_init__(self):
        if self.zero_stage is not None and self.zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage}: DeepSpeed ZeRO stages 1, 2 and 3 are supported")


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between saves (0: only at the end / on a signal)
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted after a new one is complete)
    resume: str = "auto"  # auto: latest complete checkpoint in dir if any | none | a checkpoint directory
    save_final: bool = True
    save_on_signal: bool = True  # SIGTERM/SIGUSR1: finish the step, save, exit 0
    dir: str | None = None  # default: <out_dir>/checkpoints
    export_final: bool = False  # also write <out_dir>/export/{model.safetensors,config.yaml} at the end

    def __post_init__(self):
        _require_at_least(self, every=0, keep_last=0)
        if self.export_final and not self.save_final:
            # the export is made from the final checkpoint; without one it would be an older model
            raise ValueError("export_final=true needs save_final=true (the export is written from the final "
                             "checkpoint)")


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "rebased-pretrain"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    every: int = 10  # steps between console/JSONL/wandb records
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        _require_at_least(self, every=1)


@dataclass
class RunConfig:
    model: str  # path of a model config (configs/models/*.yaml)
    out_dir: str = "runs/default"  # metrics.jsonl, config.yaml, checkpoints/, wandb/
    name: str | None = None
    model_overrides: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.out_dir, "checkpoints")


def _writable_dir_problem(key: str, path: str) -> str | None:
    """``path`` can be created (or exists) as a directory we may write to."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{key}: {path!r} cannot be created ({probe!r} is a file)"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}: {path!r} is not writable ({probe!r} is read-only for this user)"
    return None


def _manifest_vocab_size(path: str) -> int | None:
    """The tokenizer vocabulary a split directory of tokenize_pile.py records, or None (no manifest, or none said)."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            size = json.load(f)["tokenizer"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) else None


def check_paths(cfg: RunConfig) -> list[str]:
    """Every path the run will use, checked before anything starts (no process group, no model): the model
    config, each train/valid dataset (its shards open and hold at least one sequence), the DeepSpeed JSON, an
    explicit resume path and the output directories. Returns one line per problem (empty: all fine), so that a
    missing validation path fails at the start and not after training."""
    from pretrain.config import ConfigError
    from pretrain.data.packed import TokenStream
    from pretrain.models import load_model_config

    problems = []
    vocab_size = None
    try:
        vocab_size = load_model_config(cfg.model, cfg.model_overrides).vocab_size
    except ConfigError as e:
        problems.append(f"model: {e}")
    if not cfg.data.train:
        problems.append("data.train: empty; give at least one {path, weight}")
    for group in ("train", "valid"):
        for i, source in enumerate(getattr(cfg.data, group)):
            key = f"data.{group}[{i}].path"
            try:
                stream = TokenStream(source.path)
            except (OSError, ValueError) as e:  # missing or unreadable files, malformed index
                problems.append(f"{key}: {e}")
                continue
            if stream.num_tokens < cfg.data.seq_len + 1:
                problems.append(f"{key}: {source.path!r} holds {stream.num_tokens} tokens, fewer than "
                                f"data.seq_len + 1 = {cfg.data.seq_len + 1}")
            data_vocab = _manifest_vocab_size(source.path)
            if vocab_size is not None and data_vocab is not None and data_vocab > vocab_size:
                problems.append(f"{key}: tokenized with a {data_vocab}-token vocabulary (its manifest.json), "
                                f"more than the model's vocab_size={vocab_size}")
    if cfg.parallel.strategy == "deepspeed":
        path = cfg.parallel.deepspeed_config
        try:
            with open(path) as f:
                ds = json.load(f)
            if not isinstance(ds, dict):
                problems.append(f"parallel.deepspeed_config: {path!r} holds a JSON {type(ds).__name__}, not an object")
        except OSError as e:
            problems.append(f"parallel.deepspeed_config: cannot read {path!r}: {e.strerror or e}")
        except ValueError as e:
            problems.append(f"parallel.deepspeed_config: {path!r} is not valid JSON: {e}")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        problems.append(f"checkpoint.resume: {resume!r} is not a directory (give a checkpoint, a checkpoint "
                        "directory, 'auto' or 'none')")
    for key, path in (("out_dir", cfg.out_dir), ("checkpoint.dir", cfg.checkpoint_dir)):
        problem = _writable_dir_problem(key, path)
        if problem:
            problems.append(problem)
    return problems
