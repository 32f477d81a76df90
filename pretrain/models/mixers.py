"""Sequence mixers. Each takes x [B, T, d_model] and returns [B, T, d_model].

Every mixer accepts ``cu_seqlens`` (packed documents in a batch of one: nothing mixes across a document start)
and ``cache`` (its layer's decoding state from ``pretrain.models.cache``, updated in place, so that feeding a
sequence in pieces gives the same outputs as feeding it whole; with ``cu_seqlens``, document i fills row i of a
fresh cache). Positions come from the caller: [T], or [B, T] when the rows of a cache are at different positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import kernels
from pretrain.models.cache import ConvCache, KVCache, LinearAttentionCache
from pretrain.models.config import ModelConfig
from pretrain.models.layers import apply_rotary


class FeatureMap(nn.Module):
    """ReBased's learnable map φ(x) = γ·LayerNorm(x) + β on x [B, T, H, D] (γ, β optional, LN optional).

    ``norm_scope='per_head'`` normalises each head's D features; ``'joint'`` normalises all H·D together.
    """

    def __init__(self, num_heads: int, feature_dim: int, *, use_gamma: bool, use_beta: bool, normalize: bool,
                 norm_scope: str):
        super().__init__()
        self.normalize, self.norm_scope = normalize, norm_scope
        shape = (num_heads, feature_dim)
        self.gamma = nn.Parameter(torch.ones(shape)) if use_gamma else None
        self.beta = nn.Parameter(torch.zeros(shape)) if use_beta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            if self.norm_scope == "per_head":
                x = F.layer_norm(x, x.shape[-1:])
            else:
                x = F.layer_norm(x.flatten(-2), (x.shape[-2] * x.shape[-1],)).view_as(x)
        if self.gamma is not None:
            x = x * self.gamma
        if self.beta is not None:
            x = x + self.beta
        return x


class LinearAttention(nn.Module):
    """ReBased (learnable φ, kernel (s·q·k)²) or Based (Taylor kernel 1 + x + x²/2) linear attention."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        sub = cfg.rebased if kind == "rebased" else cfg.based
        self.kind, self.num_heads, self.feature_dim, self.eps = kind, sub.num_heads, sub.feature_dim, sub.eps
        d = cfg.d_model
        self.value_heads = sub.value_heads or sub.num_heads
        head_dim = cfg.value_head_dim(kind)
        self.q_proj = nn.Linear(d, sub.num_heads * sub.feature_dim, bias=False)
        self.k_proj = nn.Linear(d, sub.num_heads * sub.feature_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(sub.num_heads * head_dim, d, bias=False)
        self.feature_map = self.k_feature_map = None
        if kind == "rebased":
            def feature_map():
                return FeatureMap(sub.num_heads, sub.feature_dim, use_gamma=sub.use_gamma, use_beta=sub.use_beta,
                                  normalize=sub.normalize, norm_scope=sub.norm_scope)

            self.feature_map = feature_map()  # q's, and k's too unless k has its own
            self.k_feature_map = feature_map() if sub.qk_feature_map == "separate" else None
        self.attention = kernels.rebased_attention if kind == "rebased" else kernels.based_attention

    def forward(self, x, *, positions=None, cu_seqlens=None, cache: LinearAttentionCache | None = None):
        B, T, _ = x.shape
        H, D = self.num_heads, self.feature_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, H, D)
        v = self.v_proj(x).view(B, T, self.value_heads, -1)
        if self.value_heads != H:  # each value head is shared by H / value_heads consecutive q/k heads
            v = v.repeat_interleave(H // self.value_heads, dim=2)
        if self.feature_map is not None:
            k_map = self.feature_map if self.k_feature_map is None else self.k_feature_map
            q, k = self.feature_map(q), k_map(k)
        # under autocast the LayerNorm of the feature map runs in fp32 while v is bf16: the kernels take one dtype
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is None:
            o, _ = self.attention(q, k, v, eps=self.eps, cu_seqlens=cu_seqlens)
        elif T == 1 and not cache.empty:  # one token: the state advanced in place (a fused kernel on CUDA)
            o = kernels.linear_attention_step(self.kind, q, k, v, cache.state, eps=self.eps)
        else:  # a prompt (or its documents, packed), from the cached state
            o, state = self.attention(q, k, v, eps=self.eps, cu_seqlens=cu_seqlens,
                                      initial_state=None if cache.empty else cache.state, output_final_state=True)
            cache.store(state)
        return self.o_proj(o.reshape(B, T, -1))


class ShortConv(nn.Module):
    """The paper's BaseConv: depthwise causal conv(u) ⊙ Linear(u) + u."""

    decayed_parameters = ("conv_weight",)  # a convolution's weight, held as a plain parameter for the kernel

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, k = cfg.d_model, cfg.short_conv.kernel_size
        self.proj = nn.Linear(d, d)
        self.conv_weight = nn.Parameter(torch.empty(d, k))
        self.conv_bias = nn.Parameter(torch.empty(d))
        self.reset_conv(bias_like_conv1d=cfg.init_scheme == "zoology")

    @torch.no_grad()
    def reset_conv(self, bias_like_conv1d: bool):
        """Conv1d's default: weight and bias uniform in ±1/sqrt(fan in), fan in = kernel size (depthwise); or a
        zero bias."""
        bound = self.conv_weight.shape[1] ** -0.5
        nn.init.uniform_(self.conv_weight, -bound, bound)
        if bias_like_conv1d:
            nn.init.uniform_(self.conv_bias, -bound, bound)
        else:
            nn.init.zeros_(self.conv_bias)

    def forward(self, x, *, positions=None, cu_seqlens=None, cache: ConvCache | None = None):
        y, final = kernels.short_conv(
            x, self.conv_weight, self.conv_bias, gate=self.proj(x), residual=True, cu_seqlens=cu_seqlens,
            cache=None if cache is None or cache.empty else cache.state, output_final_state=cache is not None,
        )
        if cache is not None:
            cache.store(final)
        return y


def _document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    return torch.bucketize(torch.arange(total, device=cu_seqlens.device), cu_seqlens[1:], right=True)


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with rotary positions; ``window`` restricts it to the last W tokens. SDPA (flash) for
    full attention, FlexAttention on CUDA for windows and documents, blocked or dense-mask SDPA otherwise."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        sub = cfg.sliding_window if window else cfg.attention
        d = cfg.d_model
        self.num_heads, self.window, self.rope_theta = sub.num_heads, window, cfg.rope_theta
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, *, positions, cu_seqlens=None, cache: KVCache | None = None):
        B, T, d = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, -1).unbind(2)
        q, k = apply_rotary(q, positions, self.rope_theta), apply_rotary(k, positions, self.rope_theta)
        if cache is not None:
            o = self._cached(q, k, v, positions, cu_seqlens, cache)
            return self.o_proj(o.reshape(B, T, d))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
        if cu_seqlens is None and self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif q.is_cuda and torch.is_grad_enabled():
            # training, windows and documents: block-sparse, no dense T×T mask. Not under no_grad: evaluation
            # (lm_eval) sends a new T per request, and each would compile the kernels anew
            o = _flex_causal_attention(q, k, v, self.window, cu_seqlens)
        else:
            o = _causal_attention(q, k, v, self.window, positions, cu_seqlens)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, d))

    def _cached(self, q, k, v, positions, cu_seqlens, cache: KVCache):
        """Attention through the cache, [B, T, H, Dh] -> [B, T, H, Dh]; the new keys/values are stored."""
        if cu_seqlens is not None:  # a packed prompt: each document attends to itself and fills its cache row
            offsets = cu_seqlens.tolist()
            cache.allocate_like(k, batch_size=len(offsets) - 1)
            out = []
            for row, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
                doc = [t[:, a:b].transpose(1, 2) for t in (q, k, v)]
                out.append(_causal_attention(*doc, self.window, positions[a:b]).transpose(1, 2))
                cache.write(k[:, a:b], v[:, a:b], positions[None, a:b], row=row)
            return torch.cat(out, dim=1)
        positions = positions.expand(q.shape[0], -1)
        cache.allocate_like(k)
        if q.shape[1] == 1:  # one token: stored first (it only replaces a key out of its window), then attended
            cache.write(k, v, positions)
            keys, values, key_pos = cache.k, cache.v, cache.slot_pos
        else:  # several: the cached keys and the new ones, stored after (they may replace keys these still see)
            keys, values = torch.cat([cache.k, k], 1), torch.cat([cache.v, v], 1)
            key_pos = torch.cat([cache.slot_pos, positions], 1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=cache.mask(positions, key_pos))
        if q.shape[1] > 1:
            cache.write(k, v, positions)
        return o.transpose(1, 2)


def _causal_attention(q, k, v, window: int | None, positions, cu_seqlens=None):
    """Causal attention [B, H, T, Dh] (to the last ``window`` keys; within documents) without FlexAttention: SDPA,
    in blocks for long windowed sequences, else with a dense mask (decoding, short windows, documents on CPU)."""
    T = q.shape[2]
    if cu_seqlens is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if cu_seqlens is None and T > 2 * window:
        return _blocked_window_attention(q, k, v, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(positions, positions, window, cu_seqlens))


def _dense_mask(q_pos, k_pos, window: int | None, cu_seqlens=None) -> torch.Tensor:
    """[Tq, Tk] boolean mask from absolute positions (decoding with a KV cache, short windows, documents on CPU)."""
    mask = q_pos[:, None] >= k_pos[None, :]
    if window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]) < window
    if cu_seqlens is not None:  # positions restart per document, so compare document ids too
        docs = _document_ids(cu_seqlens, len(q_pos))
        mask &= docs[:, None] == docs[None, :]
    return mask


# Eager flex_attention materialises the T×T scores and eager create_block_mask T×T index tensors (8 GiB at 32k):
# both run compiled. dynamic=False: a new T compiles anew (past torch._dynamo's recompile limit it runs eager).
_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
_compiled_create_block_mask = torch.compile(create_block_mask, dynamic=False)
_BLOCK_MASKS: dict = {}  # (T, window, device, packed) -> (cu_seqlens, its version, BlockMask) of the latest call


@torch.compiler.disable  # built and cached eagerly, also inside a compiled block (a graph break)
def _block_mask(T: int, window: int | None, cu_seqlens: torch.Tensor | None, device: torch.device) -> BlockMask:
    """Causal mask (sliding-window when ``window``; within documents when ``cu_seqlens``) for FlexAttention.

    Reused while the same cu_seqlens tensor comes back unmodified: the layers of one forward (and the activation
    checkpointing recompute) share it; a new batch is a new tensor, so its mask is rebuilt."""
    key = (T, window, device, cu_seqlens is not None)
    version = None if cu_seqlens is None else cu_seqlens._version
    hit = _BLOCK_MASKS.get(key)
    if hit is not None and hit[0] is cu_seqlens and hit[1] == version:
        return hit[2]
    docs = None if cu_seqlens is None else _document_ids(cu_seqlens, T)

    def mask_mod(b, h, q_idx, kv_idx):  # within a document, index distance = position distance
        keep = q_idx >= kv_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        if docs is not None:
            keep = keep & (docs[q_idx] == docs[kv_idx])
        return keep

    build = _compiled_create_block_mask if device.type == "cuda" else create_block_mask
    mask = build(mask_mod, None, None, T, T, device=device)
    _BLOCK_MASKS[key] = (cu_seqlens, version, mask)
    return mask


def _flex_causal_attention(q, k, v, window: int | None, cu_seqlens=None):
    """Causal attention [B, H, T, D] (to the last ``window`` keys; within documents) through FlexAttention, which
    skips the 128×128 blocks the mask empties: O(T·W) for windows, O(Σ len²) for documents."""
    mask = _block_mask(q.shape[2], window, cu_seqlens, q.device)
    attend = _compiled_flex_attention if q.is_cuda else flex_attention  # eager on CPU: the tests' reference check
    return attend(q, k, v, block_mask=mask)


def _blocked_window_attention(q, k, v, window: int):
    """Causal attention to the last ``window`` keys in O(T·W): queries in blocks of W see their own block and the
    previous one (a dense T×T mask would make sliding-window layers as costly as full attention). [B, H, T, D]."""
    B, H, T, D = q.shape
    n = -(-T // window)
    pad = n * window - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))

    def blocks(t):  # [B, H, n*W, D] -> [B*n, H, W, D]
        return t.view(B, H, n, window, D).transpose(1, 2).reshape(B * n, H, window, D)

    def with_previous(t):  # keys of the previous block, then this block's: [B*n, H, 2W, D]
        t = t.view(B, H, n, window, D)
        prev = F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :n]
        return torch.cat([prev, t], 3).transpose(1, 2).reshape(B * n, H, 2 * window, D)

    i = torch.arange(window, device=q.device)
    j = torch.arange(2 * window, device=q.device)
    offset = j[None, :] - window - i[:, None]  # key position minus query position
    mask = (offset <= 0) & (offset > -window)  # [W, 2W]
    first = mask & (j[None, :] >= window)  # block 0 has no previous block
    masks = torch.cat([first[None], mask[None].expand(n - 1, -1, -1)])  # [n, W, 2W]
    masks = masks[None, :, None].expand(B, -1, 1, -1, -1).reshape(B * n, 1, window, 2 * window)
    o = F.scaled_dot_product_attention(blocks(q), with_previous(k), with_previous(v), attn_mask=masks)
    return o.view(B, n, H, window, D).transpose(1, 2).reshape(B, H, n * window, D)[:, :, :T]


def build_mixer(cfg: ModelConfig, kind: str) -> nn.Module:
    if kind in ("rebased", "based"):
        return LinearAttention(cfg, kind)
    if kind == "short_conv":
        return ShortConv(cfg)
    if kind == "attention":
        return SoftmaxAttention(cfg, window=None)
    if kind == "sliding_window":
        return SoftmaxAttention(cfg, window=cfg.sliding_window.window)
    raise ValueError(f"unknown mixer '{kind}'")


def new_cache(kind: str, cfg: ModelConfig, max_len: int):
    """An empty cache for a layer of ``kind``; its buffers are made by the first write (their dtype is the
    activations')."""
    if kind in ("rebased", "based"):
        return LinearAttentionCache()
    if kind == "short_conv":
        return ConvCache()
    window = cfg.sliding_window.window if kind == "sliding_window" else None
    return KVCache(window=window, slots=min(window, max_len) if window else max_len)
