"""Model configuration: one dataclass per sequence mixer, one for the whole causal LM."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin, get_type_hints

Mixer = Literal["rebased", "based", "short_conv", "sliding_window", "attention"]
MIXERS: tuple[str, ...] = get_args(Mixer)


def _check_choices(section: str, cfg) -> None:
    """Every Literal field holds one of its choices. ``pretrain.config`` checks YAML; a config built in code would
    otherwise build a fallback silently (an unknown ``mlp`` became GELU, an unknown ``norm`` LayerNorm)."""
    for name, tp in get_type_hints(type(cfg)).items():
        if get_origin(tp) is Literal and getattr(cfg, name) not in get_args(tp):
            raise ValueError(f"{section}{name}={getattr(cfg, name)!r}: valid choices: "
                             f"{', '.join(repr(c) for c in get_args(tp))}")


def _check_linear_attention(name: str, sub) -> None:
    _check_choices(f"{name}.", sub)
    if sub.num_heads < 1 or sub.feature_dim < 1:
        raise ValueError(f"{name}.num_heads and {name}.feature_dim must be positive")
    if sub.value_heads is not None and (sub.value_heads < 1 or sub.num_heads % sub.value_heads):
        raise ValueError(f"{name}.value_heads={sub.value_heads} must divide {name}.num_heads={sub.num_heads}")
    if not 0 < sub.eps < math.inf:  # NaN fails too
        raise ValueError(f"{name}.eps={sub.eps} must be a finite number > 0")


@dataclass
class ReBasedConfig:
    num_heads: int = 16
    feature_dim: int = 16
    # φ(x) = γ·LayerNorm(x) + β. Each part can be switched off.
    use_gamma: bool = True
    use_beta: bool = True
    normalize: bool = True
    # per_head: LayerNorm over each head's 16 features (default; heads stay independent, as in FLA, and the
    # fused kernels can normalise per head). joint: over the concatenated H·16 vector (the original repo).
    norm_scope: Literal["per_head", "joint"] = "per_head"
    # shared: one φ (one γ, β) for q and k. separate: q and k each have their own (the original repo's ln_q, ln_k).
    qk_feature_map: Literal["shared", "separate"] = "shared"
    eps: float = 1e-6  # added to the attention normaliser Σ a_ts (the original repo: 1e-12)
    # Value heads: None = one per q/k head. A value head is floor(d_model / value_heads) wide, so the value and
    # output projections are value_heads·floor(d_model / value_heads) wide (the original repo's rule: d_model 64
    # with 12 heads gives 12 × 5). Fewer heads are wider and shared by num_heads/value_heads q/k heads.
    value_heads: int | None = None

    def __post_init__(self):
        _check_linear_attention("rebased", self)


@dataclass
class BasedConfig:
    num_heads: int = 16
    feature_dim: int = 16
    eps: float = 1e-6  # as for rebased
    value_heads: int | None = None  # as for rebased

    def __post_init__(self):
        _check_linear_attention("based", self)


@dataclass
class ShortConvConfig:
    kernel_size: int = 3

    def __post_init__(self):
        if self.kernel_size < 1:
            raise ValueError("short_conv.kernel_size must be >= 1")


def _check_heads(name: str, num_heads: int) -> None:
    if num_heads < 1:
        raise ValueError(f"{name}.num_heads={num_heads} must be >= 1")


@dataclass
class AttentionConfig:
    num_heads: int = 16

    def __post_init__(self):
        _check_heads("attention", self.num_heads)


@dataclass
class SlidingWindowConfig:
    num_heads: int = 16
    window: int = 256  # each token attends to itself and the previous window-1 tokens

    def __post_init__(self):
        _check_heads("sliding_window", self.num_heads)
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
    # identity: no MLP, but the block's second sub-layer still adds its normed input, x + norm(x) (the original
    # MQAR code's block with an identity state mixer); none: the block is the mixer sub-layer alone
    mlp: Literal["swiglu", "gelu", "none", "identity"] = "swiglu"
    mlp_hidden: int | None = None  # default: 8/3·d_model rounded up to 64 for swiglu, 4·d_model for gelu
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    learned_positions: bool = False  # absolute position embeddings (the paper's MQAR models)
    max_seq_len: int = 2048  # size of the learned position table; rotary has no limit
    rope_theta: float = 10000.0  # rotary embeddings, used by attention and sliding_window
    init_std: float = 0.02
    # scaled: Linear and Embedding N(0, init_std), the projections into the residual stream (o_proj, down_proj)
    # scaled by 1/sqrt(2·layers) (GPT-2), conv bias zero. zoology: the original MQAR code's _init_weights: only the
    # names it lists are scaled (softmax attention's output, the MLP's down projection), the linear-attention
    # output projection is N(0, init_std), the short conv keeps PyTorch's Conv1d default (bias too).
    init_scheme: Literal["scaled", "zoology"] = "scaled"
    # normal: the token embedding is N(0, init_std) like the other weights. readout (tied embeddings only):
    # N(0, 1/d_model^2), muP's initialisation of the output layer (Yang et al. 2021, Tensor Programs V, Table 3:
    # readout variance 1/fan_in^2). A tied table is also the LM head, and wherever the top of the residual stream is
    # a scaled copy of the input embedding (the short conv's `+ u` path copies norm(x) into it at every layer), a
    # token's logit on itself is d_model * std: 15 at d_model 768 with 0.02, loss ~14 where ln V is 10.8. With
    # std 1/d_model that logit is ~1, the others ~1/sqrt(d_model), and training starts near ln V.
    embed_init: Literal["normal", "readout"] = "normal"
    embed_dropout: float = 0.0  # dropout on the token (+ position) embeddings while training (the MQAR code: 0.1)
    rebased: ReBasedConfig = field(default_factory=ReBasedConfig)
    based: BasedConfig = field(default_factory=BasedConfig)
    short_conv: ShortConvConfig = field(default_factory=ShortConvConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)

    def __post_init__(self):
        if (self.layers is None) == (self.layer_unit is None) or (self.layers is not None and
                                                                   self.n_layers is not None):
            # n_layers beside a full pattern was ignored: the model had len(layers) layers whatever it said
            raise ValueError("give exactly one of 'layers' (full pattern) or 'layer_unit' + 'n_layers'")
        if self.layer_unit is not None:
            if not self.layer_unit or not self.n_layers or self.n_layers < 1:
                raise ValueError("'layer_unit' must be non-empty and 'n_layers' a positive integer")
            unit = self.layer_unit
            self.layers = [unit[i % len(unit)] for i in range(self.n_layers)]
            self.layer_unit, self.n_layers = None, None
        if not self.layers:
            raise ValueError("'layers' must not be empty")
        _check_choices("", self)
        unknown = [kind for kind in self.layers if kind not in MIXERS]
        if unknown:
            raise ValueError(f"layers: unknown mixer {unknown[0]!r}; valid choices: {', '.join(map(repr, MIXERS))}")
        if self.vocab_size < 1 or self.d_model < 1:
            raise ValueError("vocab_size and d_model must be positive")
        if self.embed_init == "readout" and not self.tie_embeddings:
            raise ValueError("embed_init 'readout' sizes the embedding as the tied LM head; with "
                             "tie_embeddings: false use embed_init 'normal'")
        for name in ("attention", "sliding_window"):
            heads = getattr(self, name).num_heads
            if name in self.layers and self.d_model % heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by the {heads} heads of {name}")
            if name in self.layers and (self.d_model // heads) % 2:  # rotary turns pairs of features
                raise ValueError(f"{name}.num_heads={heads} gives heads of odd width {self.d_model // heads} "
                                 f"(d_model={self.d_model}); rotary positions need an even head width")
        for name in ("rebased", "based"):
            if name in self.layers and self.value_head_dim(name) < 1:
                raise ValueError(f"d_model={self.d_model} is smaller than the "
                                 f"{getattr(self, name).value_heads or getattr(self, name).num_heads} value heads of {name}")
        for name in ("norm_eps", "init_std", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number > 0")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be >= 1")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden={self.mlp_hidden} must be >= 1")
        if not 0.0 <= self.embed_dropout < 1.0:
            raise ValueError(f"embed_dropout={self.embed_dropout} must be in [0, 1)")
        if self.mlp_hidden is None and self.mlp in ("swiglu", "gelu"):
            self.mlp_hidden = 4 * self.d_model if self.mlp == "gelu" else -(-8 * self.d_model // 3 // 64) * 64

    def value_head_dim(self, kind: str) -> int:
        """Width of one value head of a ``rebased`` / ``based`` layer: floor(d_model / value heads)."""
        sub = getattr(self, kind)
        return self.d_model // (sub.value_heads or sub.num_heads)

    @property
    def n_layer(self) -> int:
        return len(self.layers)
