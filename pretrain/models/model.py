"""The causal LM: embeddings, pre-norm blocks of (sequence mixer, MLP), final norm, LM head."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.models.config import ModelConfig
from pretrain.models.layers import build_mlp, build_norm
from pretrain.models.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy
from pretrain.models.mixers import LinearAttention, ShortConv, build_mixer, new_cache


@dataclass
class ModelCache:
    """Decoding state of every layer plus the number of tokens already consumed."""

    layers: list = field(default_factory=list)
    seen_tokens: int = 0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.mixer_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(cfg, kind)
        self.mlp = build_mlp(cfg.mlp, cfg.d_model, cfg.mlp_hidden)
        self.mlp_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if self.mlp is not None else None

    def forward(self, x, positions, cu_seqlens=None, cache=None):
        x = x + self.mixer(self.mixer_norm(x), positions=positions, cu_seqlens=cu_seqlens, cache=cache)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class LMHead(nn.Linear):
    """The vocabulary projection; given labels, its forward returns the cross-entropy instead of the logits. The
    loss runs inside this module's forward because DeepSpeed ZeRO-3 gathers a module's weight only around its
    forward: the weight read by the loss must be gathered there."""

    def forward(self, x, labels=None, *, ignore_index: int = -100, reduction: str = "mean",
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        if labels is None:
            return super().forward(x)
        if chunk_tokens == 0:
            logits = super().forward(x)
            return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=ignore_index,
                                   reduction=reduction)
        return chunked_cross_entropy(x, self.weight, labels, ignore_index=ignore_index, chunk_tokens=chunk_tokens,
                                     reduction=reduction)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.learned_positions else None
        self.embed_dropout = nn.Dropout(cfg.embed_dropout) if cfg.embed_dropout > 0 else None
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layers)
        self.final_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.init_std
        zoology = self.config.init_scheme == "zoology"
        # Projections that write into the residual stream are scaled down with depth (GPT-2). The zoology scheme
        # scales only what the original code's name list matches: softmax attention's output and the MLP's down
        # projection, not the linear-attention output projection.
        residual_std = std / math.sqrt(2 * len(self.blocks))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scaled = name.endswith("down_proj") or (name.endswith("o_proj") and not (
                    zoology and isinstance(self.get_submodule(name.rsplit(".", 1)[0]), LinearAttention)))
                nn.init.normal_(module.weight, std=residual_std if scaled else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, ShortConv):
                module.reset_conv(bias_like_conv1d=zoology)

    def init_cache(self) -> ModelCache:
        return ModelCache(layers=[new_cache(kind, self.config) for kind in self.config.layers])

    def _positions(self, T: int, device, cu_seqlens, offset: int) -> torch.Tensor:
        positions = torch.arange(offset, offset + T, device=device)
        if cu_seqlens is not None:  # restart at every document
            starts = cu_seqlens[:-1].to(device)
            positions = positions - starts.repeat_interleave(cu_seqlens.diff().to(device))
        return positions

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                cache: ModelCache | None = None, checkpoint_fn=None, labels: torch.Tensor | None = None,
                ignore_index: int = -100, reduction: str = "mean",
                loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T]; given labels [B, T], the cross-entropy instead.

        cu_seqlens: document offsets for a packed batch of one ([1, T] input); nothing mixes across documents.
        cache: decoding state from ``init_cache``; it is advanced in place past these tokens.
        checkpoint_fn: optional wrapper ``fn(block, *args)`` the trainer uses for activation checkpointing.
        labels: the loss is computed here, not by the caller, so that a wrapper's forward (FSDP2, DeepSpeed) has
            the LM head's weight gathered for it. ``reduction``: mean over the labels that are not
            ``ignore_index``, or sum. ``loss_chunk_tokens``: tokens per chunk of ``chunked_cross_entropy`` (the
            full logits never exist); 0: the full logits and ``F.cross_entropy``.
        """
        x = self.hidden_states(input_ids, cu_seqlens=cu_seqlens, cache=cache, checkpoint_fn=checkpoint_fn)
        return self.lm_head(x, labels, ignore_index=ignore_index, reduction=reduction, chunk_tokens=loss_chunk_tokens)

    def hidden_states(self, input_ids: torch.Tensor, *, cu_seqlens=None, cache: ModelCache | None = None,
                      checkpoint_fn=None, select: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm output [B, T, d_model] that the LM head reads (arguments as ``forward``).

        select: [B, N] positions; only their states are normed and returned ([B, N, d_model]): a head applied
        to a few positions (MQAR's queries) never touches the others."""
        B, T = input_ids.shape
        if cu_seqlens is not None and (B != 1 or cache is not None):
            raise ValueError("cu_seqlens needs a packed batch of one ([1, T] input_ids) and no cache")
        offset = cache.seen_tokens if cache is not None else 0
        positions = self._positions(T, input_ids.device, cu_seqlens, offset)
        x = self._embed_tokens(input_ids)
        if self.pos_embed is not None:
            # without documents the last position is known on the host (no device sync, no graph break)
            last = offset + T - 1 if cu_seqlens is None else int(positions.max())
            if last >= self.config.max_seq_len:
                raise ValueError(f"position {last} exceeds max_seq_len={self.config.max_seq_len}")
            x = x + self.pos_embed(positions)
        if self.embed_dropout is not None:
            x = self.embed_dropout(x)
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if checkpoint_fn is not None and layer_cache is None:
                x = checkpoint_fn(block, x, positions, cu_seqlens)
            else:
                x = block(x, positions, cu_seqlens, layer_cache)
        if cache is not None:
            cache.seen_tokens += T
        if select is not None:
            x = x.gather(1, select[..., None].expand(-1, -1, x.shape[-1]))
        return self.final_norm(x)

    @torch.compiler.disable
    def _embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        # eager also inside a compiled model: ATen's embedding backward sorts the token ids and sums each id's
        # rows once, where the compiled one adds every row atomically, serialised on a frequent id (MQAR's filler
        # token is 3/4 of its inputs)
        return self.embed(input_ids)

    def loss(self, input_ids, labels, *, cu_seqlens=None, ignore_index: int = -100, checkpoint_fn=None,
             loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        """Mean cross-entropy, through ``forward`` (the trainer's path)."""
        return self(input_ids, cu_seqlens=cu_seqlens, checkpoint_fn=checkpoint_fn, labels=labels,
                    ignore_index=ignore_index, loss_chunk_tokens=loss_chunk_tokens)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations of input_ids [B, T] with per-layer caches; temperature 0 means greedy.

        ReBased/Based/short_conv layers keep a constant-size state, sliding_window keeps W keys, attention grows.
        """
        cache = self.init_cache()
        logits = self(input_ids, cache=cache)[:, -1]
        out = [input_ids]
        for step in range(max_new_tokens):
            if temperature == 0:
                next_ids = logits.argmax(-1, keepdim=True)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            out.append(next_ids)
            if step + 1 < max_new_tokens:
                logits = self(next_ids, cache=cache)[:, -1]
        return torch.cat(out, dim=1)
