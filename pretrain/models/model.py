"""The causal LM: embeddings, pre-norm blocks of (sequence mixer, MLP), final norm, LM head."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.common import check_cu_seqlens
from pretrain.generation import decoder
from pretrain.generation.sampling import Sampling
from pretrain.models.cache import ModelCache
from pretrain.models.config import ModelConfig
from pretrain.models.layers import build_mlp, build_norm
from pretrain.models.loss import DEFAULT_CHUNK_TOKENS, chunked_cross_entropy
from pretrain.models.mixers import LinearAttention, build_mixer, new_cache


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
        # projection, not the linear-attention output projection. (The short conv initialises itself.)
        residual_std = std / math.sqrt(2 * len(self.blocks))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scaled = name.endswith("down_proj") or (name.endswith("o_proj") and not (
                    zoology and isinstance(self.get_submodule(name.rsplit(".", 1)[0]), LinearAttention)))
                nn.init.normal_(module.weight, std=residual_std if scaled else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                readout = module is self.embed and self.config.embed_init == "readout"
                nn.init.normal_(module.weight, std=1.0 / self.config.d_model if readout else std)

    def init_cache(self, batch_size: int | None = None, max_len: int | None = None) -> ModelCache:
        """An empty decoding cache for ``batch_size`` rows (default: the first input's) of at most ``max_len``
        positions each (default: ``max_seq_len``; full-attention layers keep that many keys per row, sliding
        windows their window, the other layers a constant-size state)."""
        max_len = max_len or self.config.max_seq_len
        return ModelCache(layers=[new_cache(kind, self.config, max_len) for kind in self.config.layers],
                          max_len=max_len, rows=batch_size)

    def _positions(self, T: int, device, cu_seqlens, offset: int) -> torch.Tensor:
        positions = torch.arange(offset, offset + T, device=device)
        if cu_seqlens is not None:  # restart at every document
            starts = cu_seqlens[:-1].to(device)
            positions = positions - starts.repeat_interleave(cu_seqlens.diff().to(device))
        return positions

    def cache_limits(self) -> tuple[bool, int | None]:
        """What bounds a cached sequence (``ModelCache.reserve``): full-attention layers keep every position, and
        learned position embeddings end at max_seq_len."""
        return "attention" in self.config.layers, self.config.max_seq_len if self.pos_embed is not None else None

    def _cache_positions(self, cache: ModelCache, B: int, T: int, device, cu_seqlens) -> torch.Tensor:
        """Positions of the tokens a cached call feeds ([total] for a packed prompt, else [B, T]), advancing the
        rows' counts."""
        if torch.is_grad_enabled():
            raise ValueError("decoding caches are updated in place and have no backward: call the model under "
                             "torch.no_grad() when it is given a cache")
        limits = self.cache_limits()
        if cu_seqlens is not None:
            if cache.seen is not None:
                raise ValueError("a packed prompt (cu_seqlens) fills a fresh cache, one document per row")
            lengths = cu_seqlens.diff()
            cache.start(len(lengths), device)
            cache.reserve(int(lengths.max()) if len(lengths) else 0, *limits)
            cache.seen.copy_(lengths)
            return self._positions(T, device, cu_seqlens, 0)
        cache.start(B, device)
        if B != cache.batch_size:
            raise ValueError(f"the cache holds {cache.batch_size} rows, the input has {B}")
        cache.reserve(T, *limits)
        positions = cache.seen[:, None] + torch.arange(T, device=device)
        cache.seen += T
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
        if cu_seqlens is not None and B != 1:
            raise ValueError("cu_seqlens needs a packed batch of one ([1, T] input_ids)")
        # before the positions are cut from it: offsets not covering [0, T] failed there with shape errors
        check_cu_seqlens(cu_seqlens, B, T, "input_ids")
        if cache is not None:  # the cache checks the positions it hands out
            positions = self._cache_positions(cache, B, T, input_ids.device, cu_seqlens)
        else:
            positions = self._positions(T, input_ids.device, cu_seqlens, 0)
        x = self._embed_tokens(input_ids)
        if self.pos_embed is not None:
            if cache is None:  # without documents the last position is known on the host (no sync, no graph break)
                last = T - 1 if cu_seqlens is None else int(positions.max())
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
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """input_ids [B, T] followed by ``max_new_tokens`` sampled tokens each ([B, T + max_new_tokens]);
        temperature 0 is greedy. The batched decoder of ``pretrain.generation`` (a prefill, then one-token steps on
        preallocated caches, a CUDA graph on CUDA); ReBased/Based/short_conv layers keep a constant-size state,
        sliding_window its window of keys, attention every key."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        new = decoder.generate(self, input_ids.tolist(), max_new_tokens, generator=generator,
                       sampling=Sampling(temperature=temperature, top_k=top_k, top_p=top_p))
        return torch.cat([input_ids, torch.tensor(new, dtype=input_ids.dtype, device=input_ids.device)], dim=1)
