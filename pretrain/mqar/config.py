"""The MQAR run configuration (one setting: mixer × d_model × seq_len × lr × seed), read with ``pretrain.config``."""

from __future__ import annotations

import math
import re

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pretrain.config import load_config
from pretrain.mqar.data import MQARSpec, default_num_kv_pairs

MQARMixer = Literal["rebased", "based", "attention", "conv_attention"]
REPO_ROOT = Path(__file__).resolve().parents[2]

# How each benchmark mixer maps onto the model zoo: the base model YAML and the overrides on top of it.
# attention = two softmax-attention layers; conv_attention = short_conv then attention (the paper's baseline);
# both use one head, as the paper's sweep (num_heads = 1 for attention).
MIXER_MODELS: dict[str, tuple[str, list[str]]] = {
    "rebased": ("configs/models/mqar_rebased.yaml", []),
    "based": ("configs/models/mqar_based.yaml", []),
    "attention": ("configs/models/mqar_rebased.yaml", ["layers=[attention,attention]", "attention.num_heads=1"]),
    "conv_attention": ("configs/models/mqar_rebased.yaml", ["layers=[short_conv,attention]", "attention.num_heads=1"]),
}


@dataclass
class DataSection:
    seq_len: int = 512
    num_kv_pairs: int | None = None  # None: 16 at seq_len 128, seq_len/4 otherwise (the paper's rule)
    vocab_size: int = 8192
    num_train: int = 100_000
    num_test: int = 3_000
    power_a: float = 0.01
    random_non_queries: bool = False
    seed: int = 42  # the data seed (test split: seed + 10); fixed across training seeds, as in the paper's sweep
    cache_dir: str | None = ".cache/mqar"

    def __post_init__(self):
        self.spec()  # the generator's own checks (pairs fit the sequence and the vocabulary), at load time
        # a run needs examples to train on and to measure: an empty test split would report accuracy 0
        for key in ("num_train", "num_test"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")

    def spec(self) -> MQARSpec:
        n = self.num_kv_pairs if self.num_kv_pairs is not None else default_num_kv_pairs(self.seq_len)
        return MQARSpec(seq_len=self.seq_len, num_kv_pairs=n, vocab_size=self.vocab_size, num_train=self.num_train,
                        num_test=self.num_test, power_a=self.power_a, random_non_queries=self.random_non_queries,
                        seed=self.seed)


# The original code's oddities that configs/models/mqar_*.yaml copy, and what the clean variant uses instead: the
# block's identity second sub-layer (x += LN2(x)) -> none; the normaliser eps 1e-12 -> 1e-6; its init (the
# linear-attention output projection not scaled with depth, Conv1d's default bias) -> the stack's scaled init.
CLEAN_VARIANT = ["mlp=none", "init_scheme=scaled", "rebased.eps=1e-6", "based.eps=1e-6"]


@dataclass
class ModelSection:
    mixer: MQARMixer = "rebased"
    d_model: int = 128
    variant: Literal["official", "clean"] = "official"  # clean: CLEAN_VARIANT on top of the official layout
    config: str | None = None  # base model YAML; None: the mixer's default (MIXER_MODELS)
    overrides: list[str] = field(default_factory=list)  # extra model overrides, applied last

    def __post_init__(self):
        # these come from the setting (its name and result record them): an override would train another model
        # than the result says, or one that cannot read the data
        owned = {"d_model": "model.d_model", "vocab_size": "data.vocab_size", "max_seq_len": "data.seq_len"}
        for item in self.overrides:
            key = str(item).split("=", 1)[0].strip()
            if key in owned:
                raise ValueError(f"overrides: {item!r} sets {key}, which the setting owns: set {owned[key]} instead")


@dataclass
class TrainSection:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 512  # examples per optimizer step (the paper: 512)
    # Micro-batches split the batch only for memory: the loss is the exact mean over the batch's query tokens
    # either way. None: the largest divisor of batch_size with micro_batch_size · seq_len <= micro_batch_tokens.
    micro_batch_size: int | None = None
    micro_batch_tokens: int = 524_288
    eval_batch_size: int | None = None  # None: the micro batch size
    max_epochs: int = 64
    early_stop_accuracy: float | None = 0.99  # stop once validation accuracy exceeds this; null: never
    schedule: Literal["cosine_epoch", "constant"] = "cosine_epoch"  # cosine over max_epochs, stepped per epoch
    grad_clip: float | None = None  # the paper does not clip
    seed: int = 0  # model init and batch order
    device: str = "auto"  # auto: cuda when available
    # fp32: IEEE fp32 throughout (the original). tf32x3: the same, but the attention kernels and the LM head's
    # matmuls multiply fp32 in three TF32 tensor-core products (error of fp32's order). tf32: fp32 weights/activations, TF32 matmuls on CUDA.
    # bf16: autocast. (CPU runs are fp32 whatever is asked.)
    precision: Literal["fp32", "tf32x3", "tf32", "bf16"] = "fp32"  # the protocol's (configs/mqar/base.yaml)
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests, time budgets)
    time_limit_s: float | None = None  # stop after the epoch that crosses this wall time (recorded in the result)
    eval_every_steps: int | None = None  # extra evaluations inside epochs (None: once per epoch)
    num_threads: int | None = None  # CPU threads for torch (None: torch's default); 1 is fastest on a shared CPU
    compile: bool | None = None  # torch.compile the model body; None: on CUDA only
    loss_chunk_rows: int = 32_768  # query rows per chunk of the fused LM head + cross-entropy
    # knobs of the attention kernels' launch configuration (kernels' ChunkLaunchConfig) for this run, e.g.
    # {tile: 8, warps_grad: 8}: how the work is cut, not what is computed (fp32_dot comes from precision)
    attention_launch: dict[str, Any] = field(default_factory=dict)
    # Save the run's state after every epoch to <output>.ckpt and resume from it on a rerun (the file is removed
    # once the result is written). A run killed mid-epoch loses only that epoch.
    checkpoint: bool = True

    def __post_init__(self):
        if not 0 < self.lr < math.inf:  # NaN and inf fail too
            raise ValueError(f"lr={self.lr} must be a finite number > 0")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay={self.weight_decay} must be a finite number >= 0")
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            # clip_grad_norm_ with a negative limit flips every gradient (gradient ascent), 0 zeroes them
            raise ValueError(f"grad_clip={self.grad_clip} must be a finite number > 0, or null (no clipping)")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s={self.time_limit_s} must be > 0 or null")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r} must be auto, cpu, cuda or cuda:N")
        for key in ("batch_size", "max_epochs", "max_steps", "eval_every_steps", "eval_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        if self.early_stop_accuracy is not None and not 0 <= self.early_stop_accuracy <= 1:
            raise ValueError(f"early_stop_accuracy={self.early_stop_accuracy} must be in [0, 1] (an accuracy) or null")
        if self.micro_batch_size is not None and (self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size):
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={self.betas} must be two numbers in [0, 1)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be >= 1")
        if self.micro_batch_tokens < 1 or self.loss_chunk_rows < 1:
            raise ValueError("micro_batch_tokens and loss_chunk_rows must be >= 1")
        if "fp32_dot" in self.attention_launch:
            raise ValueError("attention_launch.fp32_dot is set by precision (tf32x3 or not), not here")
        if self.attention_launch:  # imports the kernels (Triton) only when knobs are given
            from kernels.linear_attention.triton_chunk.config import ChunkLaunchConfig

            try:  # an unknown knob or a bad value raises, naming it
                ChunkLaunchConfig().replace(**self.attention_launch)
            except TypeError as e:
                raise ValueError(f"attention_launch: {e}") from e


@dataclass
class LogSection:
    tqdm: bool = True
    wandb: Literal["disabled", "offline", "online"] = "disabled"  # never needs an account unless 'online'
    wandb_project: str = "rebased-mqar"
    wandb_dir: str = "runs/wandb"


@dataclass
class MQARConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    output: str | None = None  # result JSON path; None: print only
    name: str | None = None  # run name; None: derived from the setting

    def run_name(self) -> str:
        return self.name or setting_name(self.model.mixer, self.model.d_model, self.data.seq_len, self.train.lr,
                                         self.train.seed)

    def micro_batch_size(self) -> int:
        if self.train.micro_batch_size is not None:
            return self.train.micro_batch_size
        mb = max(1, min(self.train.batch_size, self.train.micro_batch_tokens // self.data.seq_len))
        while self.train.batch_size % mb:
            mb -= 1
        return mb

    def checkpoint_path(self) -> Path | None:
        return Path(self.output + ".ckpt") if self.output and self.train.checkpoint else None

    def model_overrides(self) -> tuple[str, list[str]]:
        base, extra = MIXER_MODELS[self.model.mixer]
        path = self.model.config or base
        if not Path(path).is_absolute() and not Path(path).exists():
            path = str(REPO_ROOT / path)
        variant = CLEAN_VARIANT if self.model.variant == "clean" else []
        overrides = [f"d_model={self.model.d_model}", f"vocab_size={self.data.vocab_size}",
                     f"max_seq_len={self.data.seq_len}", *extra, *variant, *self.model.overrides]
        return path, overrides

    def model_config(self):
        from pretrain.models import load_model_config  # the model zoo imports the kernels (Triton): only when asked

        path, overrides = self.model_overrides()
        return load_model_config(path, overrides)


def format_lr(lr: float) -> str:
    """The shortest text that reads back as the same float (0.001, 0.0005, 1e-05; {:g} kept only 6 digits, so
    0.0012345678 trained as 0.00123457 and two learning rates could share a result file)."""
    return repr(float(lr))


def setting_name(mixer: str, d_model: int, seq_len: int, lr: float, seed: int) -> str:
    return f"{mixer}_d{d_model}_L{seq_len}_lr{format_lr(lr)}_s{seed}"


def load_mqar_config(path=None, overrides=None) -> MQARConfig:
    return load_config(MQARConfig, path, overrides)
