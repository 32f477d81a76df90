"""Model configuration: one dataclass per sequence mixer, one for the whole causal LM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Mixer = Literal["rebased", "based", "short_conv", "sliding_window", "attention"]
MIXERS: tuple[str, ...] = get_args(Mixer)


def _check_linear_attention(name: str, sub) -> None:
    if sub.num_heads < 1 or sub.feature_dim < 1:
        raise ValueError(f"{name}.num_heads and {name}.feature_dim must be positive")
    if sub.value_heads is not None and (sub.value_heads < 1 or sub.num_heads % sub.value_heads):
        raise ValueError(f"{name}.value_heads={sub.value_heads} must divide {name}.num_heads={sub.num_heads}")


@dataclass
class ReBasedConfig:
    num_heads: int = 16
    feature_dim: int = 16
    # φ(x) = γ·LayerNorm(x) + β, shared by q and k. Each part can be switched off.
    use_gamma: bool = True
    use_beta: bool = True
    normalize: bool = True
    # per_head: LayerNorm over each head's 16 features (default; heads stay independent, as in FLA, and the
    # fused kernels can normalise per head). joint: over the concatenated H·16 vector (the original repo).
    norm_scope: Literal["per_head", "joint"] = "per_head"
    eps: float = 1e-6  # added to the attention normaliser Σ a_ts
    # Value heads: None = one per q/k head (width d_model/num_heads). Fewer heads are wider and shared by
    # num_heads/value_heads q/k heads (1 = one value of width d_model for all heads, as in Zoology's MQAR models).
    value_heads: int | None = None

    def __post_init__(self):
        _check_linear_attention("rebased", self)


@dataclass
class BasedConfig:
    num_heads: int = 16
    feature_dim: int = 16
    eps: float = 1e-6
    value_heads: int | None = None  # as for rebased

    def __post_init__(self):
        _check_linear_attention("based", self)


@dataclass
class ShortConvConfig:
    kernel_size: int = 3

    def __post_init__(self):
        if self.kernel_size < 1:
            raise ValueError("short_conv.kernel_size must be >= 1")


@dataclass
class AttentionConfig:
    num_heads: int = 16


@dataclass
class SlidingWindowConfig:
    num_heads: int = 16
    window: int = 256  # each token attends to itself and the previous window-1 tokens

    def __post_init__(self):
        if self.window < 1:
            raise ValueError("sliding_window.window must be >= 1")


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    # Either the full pattern (`layers`) or a repeating unit cut to `n_layers`.
    layers: list[Mixer] | None = None
    layer_unit: list[Mixer] | None = None
    n_layers: int | None = None
    mlp: Literal["swiglu", "gelu", "none"] = "swiglu"
    mlp_hidden: int | None = None  # default: 8/3·d_model rounded up to 64 for swiglu, 4·d_model for gelu
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    learned_positions: bool = False  # absolute position embeddings (the paper's MQAR models)
    max_seq_len: int = 2048  # size of the learned position table; rotary has no limit
    rope_theta: float = 10000.0  # rotary embeddings, used by attention and sliding_window
    init_std: float = 0.02
    rebased: ReBasedConfig = field(default_factory=ReBasedConfig)
    based: BasedConfig = field(default_factory=BasedConfig)
    short_conv: ShortConvConfig = field(default_factory=ShortConvConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)

    def __post_init__(self):
        if (self.layers is None) == (self.layer_unit is None):
            raise ValueError("give exactly one of 'layers' (full pattern) or 'layer_unit' + 'n_layers'")
        if self.layer_unit is not None:
            if not self.layer_unit or not self.n_layers or self.n_layers < 1:
                raise ValueError("'layer_unit' must be non-empty and 'n_layers' a positive integer")
            unit = self.layer_unit
            self.layers = [unit[i % len(unit)] for i in range(self.n_layers)]
            self.layer_unit, self.n_layers = None, None
        if not self.layers:
            raise ValueError("'layers' must not be empty")
        if self.vocab_size < 1 or self.d_model < 1:
            raise ValueError("vocab_size and d_model must be positive")
        for name in ("rebased", "based", "attention", "sliding_window"):
            if name in self.layers:
                sub = getattr(self, name)
                heads = getattr(sub, "value_heads", None) or sub.num_heads
                if self.d_model % heads:
                    raise ValueError(f"d_model={self.d_model} is not divisible by the {heads} heads of {name}")
        if self.mlp_hidden is None and self.mlp != "none":
            self.mlp_hidden = 4 * self.d_model if self.mlp == "gelu" else -(-8 * self.d_model // 3 // 64) * 64

    @property
    def n_layer(self) -> int:
        return len(self.layers)
