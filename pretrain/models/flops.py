"""Parameter counts and honest FLOPs per token, per mixer, for throughput and MFU.

Conventions: a matmul of [m, k] × [k, n] costs 2·m·k·n FLOPs. Norms, activations, rotary and softmax
exponentials are elementwise and left out (they are bandwidth, not FLOPs). Training = forward + backward
= 3 × forward. Causal work is counted as done: a token at position t of a full-attention layer attends to
t + 1 keys, so the average over a sequence of T is (T + 1) / 2 — the usual 6N + 12·L·T·d formula counts
T and overstates a causal model's work by 2×; linear attention is counted by its chunked algorithm.
"""

from __future__ import annotations

import torch

from pretrain.models.config import ModelConfig
from pretrain.models.model import CausalLM


def count_parameters(model_or_cfg) -> dict[str, int]:
    """Total, embedding (token + position tables; a tied head is counted once) and non-embedding parameters."""
    if isinstance(model_or_cfg, ModelConfig):
        with torch.device("meta"):
            model = CausalLM(model_or_cfg)
    else:
        model = model_or_cfg
    seen, total, embedding = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if name.startswith(("embed.", "pos_embed.")) or (name.startswith("lm_head.") and not model.config.tie_embeddings):
            embedding += p.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _mean_keys(seq_len: int, window: int | None) -> float:
    """Average number of keys a causal query attends to over positions 0..T-1."""
    T = seq_len
    if window is None or window >= T:
        return (T + 1) / 2
    return (window * (window + 1) / 2 + (T - window) * window) / T


def _linear_attention_flops(dv: int, heads: int, dk: int, features: int, chunk: int) -> float:
    per_head = (
        2 * 2 * features * (dv + 1)       # read φ(q)ᵀ[S|z] and update [S|z] += φ(k)ᵀ[v|1]
        + 2 * 2 * features                # build φ(q), φ(k) (products of pairs)
        + 2 * (chunk + 1) / 2 * (dk + dv + 1)  # causal intra-chunk scores, weighted values and normaliser
    )
    return heads * per_head


def mixer_flops(cfg: ModelConfig, kind: str, seq_len: int, chunk_size: int = 64) -> float:
    """Forward FLOPs per token of one mixer layer, projections included."""
    d = cfg.d_model
    if kind in ("rebased", "based"):
        sub = cfg.rebased if kind == "rebased" else cfg.based
        dk, h = sub.feature_dim, sub.num_heads
        vh, dv = sub.value_heads or h, cfg.value_head_dim(kind)
        features = dk * (dk + 1) // 2 + (1 + dk if kind == "based" else 0)
        projections = 2 * d * (2 * h * dk) + 2 * d * vh * dv + 2 * h * dv * d  # q, k (H·dk), v, o
        return projections + _linear_attention_flops(dv, h, dk, features, min(chunk_size, seq_len))
    if kind == "short_conv":
        return 2 * d * d + 2 * cfg.short_conv.kernel_size * d + d  # projection, depthwise conv, gate
    if kind in ("attention", "sliding_window"):
        window = cfg.sliding_window.window if kind == "sliding_window" else None
        return 2 * d * 3 * d + 2 * d * d + 2 * 2 * _mean_keys(seq_len, window) * d  # qkv, o, QKᵀ and AV
    raise ValueError(kind)


def flops_per_token(cfg: ModelConfig, seq_len: int, chunk_size: int = 64) -> dict:
    """Forward and training FLOPs per token at sequence length ``seq_len``, with a per-part breakdown."""
    breakdown: dict[str, float] = {}
    for kind in cfg.layers:
        breakdown[kind] = breakdown.get(kind, 0.0) + mixer_flops(cfg, kind, seq_len, chunk_size)
    if cfg.mlp in ("swiglu", "gelu"):
        matrices = 3 if cfg.mlp == "swiglu" else 2
        breakdown["mlp"] = cfg.n_layer * 2 * matrices * cfg.d_model * cfg.mlp_hidden
    breakdown["lm_head"] = 2 * cfg.d_model * cfg.vocab_size
    forward = sum(breakdown.values())
    return {"forward": forward, "train": 3 * forward, "breakdown": breakdown}
