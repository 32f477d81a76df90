"""Decoding state: preallocated buffers, updated in place, so a decoding step allocates nothing and can be captured
as a CUDA graph.

One ``ModelCache`` holds a state per layer and, per sequence (row), how many tokens it has consumed (``seen``, a
device tensor, so the positions of the next token are computed on the GPU). Rows may hold prompts of different
lengths (``CausalLM.hidden_states`` with ``cu_seqlens`` fills row i with document i).

* ``LinearAttentionCache`` (rebased, based): the fp32 state (kv [B, H, F, Dv], z [B, H, F]), constant in size.
* ``ConvCache`` (short_conv): the last K-1 inputs [B, D, K-1].
* ``KVCache`` (attention, sliding_window): keys and values [B, S, H, Dh] (rotary already applied) in S slots; the
  token at position p goes to slot p mod S, and ``slot_pos`` [B, S] says which position each slot holds (-1:
  empty). Full attention takes S = the longest sequence to decode; a sliding window of W takes S = W (a ring).

A cache's buffers are made by its first write, in the dtype and on the device of the activations; after that,
every update is in place. Caches are for inference: they are used under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class LinearAttentionCache:
    kv: torch.Tensor | None = None
    z: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.kv is None

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv, self.z

    def store(self, state) -> None:
        """Keep the layer's state (kv, z) after the tokens just consumed (its own buffers: copied in)."""
        kv, z = state
        if self.kv is None:
            self.kv, self.z = kv.contiguous().clone(), z.contiguous().clone()
        else:
            self.kv.copy_(kv)
            self.z.copy_(z)


@dataclass
class ConvCache:
    state: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.state is None

    def store(self, state: torch.Tensor) -> None:
        if self.state is None:
            self.state = state.contiguous().clone()
        else:
            self.state.copy_(state)


@dataclass
class KVCache:
    window: int | None = None
    slots: int = 0  # S: positions kept per row (the window for a sliding window)
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    slot_pos: torch.Tensor | None = None

    def allocate_like(self, k: torch.Tensor, batch_size: int | None = None) -> None:
        """The buffers [B, S, H, Dh] in k's dtype and device, every slot empty (made once)."""
        if self.k is None:
            shape = (batch_size or k.shape[0], self.slots, *k.shape[2:])
            self.k, self.v = k.new_zeros(shape), k.new_zeros(shape)
            self.slot_pos = torch.full(shape[:2], -1, dtype=torch.long, device=k.device)

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, row: int | None = None) -> None:
        """Store keys/values [B, T, H, Dh] of the tokens at ``positions`` [B, T] (consecutive per row) in their
        slots; a row keeps its last S tokens. ``row``: k, v, positions are one row's, written into that row."""
        if k.shape[1] > self.slots:
            k, v, positions = k[:, -self.slots:], v[:, -self.slots:], positions[:, -self.slots:]
        rows = slice(None) if row is None else slice(row, row + 1)
        slots = positions % self.slots
        index = slots[..., None, None].expand(-1, -1, *k.shape[2:])
        self.k[rows].scatter_(1, index, k.to(self.k.dtype))
        self.v[rows].scatter_(1, index, v.to(self.v.dtype))
        self.slot_pos[rows].scatter_(1, slots, positions)

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[B, 1, Tq, Tk]: the keys each query may see (stored, not after it, inside the window)."""
        keep = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
        if self.window is not None:
            keep &= q_pos[:, :, None] - k_pos[:, None, :] < self.window
        return keep[:, None]


@dataclass
class ModelCache:
    """Every layer's state, and the tokens each row has consumed."""

    layers: list = field(default_factory=list)
    max_len: int = 0  # the positions a row can hold (full-attention layers keep every key)
    rows: int | None = None  # batch size; None: the first input's
    seen: torch.Tensor | None = None  # [B] int64 on the model's device: the next token's position per row
    seen_tokens: int = 0  # the largest of ``seen``, kept on the host (position bounds, capacity)

    def start(self, rows: int, device) -> None:
        """Allocate the per-row counters on the first call."""
        if self.seen is None:
            if self.rows is not None and rows != self.rows:
                raise ValueError(f"the cache was made for {self.rows} rows, the input has {rows}")
            self.seen = torch.zeros(rows, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.rows if self.seen is None else self.seen.shape[0]

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a decoding step updates in place (the rows' positions and each layer's buffers, once made):
        what a compiler must treat as fixed addresses, e.g. ``torch._dynamo.mark_static_address``."""
        tensors = [self.seen] + [getattr(layer, f.name) for layer in self.layers for f in fields(layer)]
        return [t for t in tensors if isinstance(t, torch.Tensor)]

    @torch.compiler.disable  # host bookkeeping: a compiled step must not specialise on the count
    def reserve(self, tokens: int, full_attention: bool, position_limit: int | None) -> None:
        """Count ``tokens`` more on the longest row; full-attention layers (and sliding windows given fewer slots
        than their window) must hold every position, and learned position embeddings end at ``position_limit``."""
        total = self.seen_tokens + tokens
        # a sliding window's ring made shorter than the window (max_len < W) would overwrite keys still in view;
        # looked at only past max_len (this runs once per decoded token)
        if total > self.max_len and (full_attention or any(
                isinstance(layer, KVCache) and layer.window is not None and layer.slots < layer.window
                for layer in self.layers)):
            kept = "full-attention layers keep every key" if full_attention else "its sliding windows hold max_len keys"
            raise ValueError(f"{total} positions do not fit a cache of max_len={self.max_len} ({kept}): make it "
                             "with init_cache(batch_size, max_len)")
        if position_limit is not None and total > position_limit:
            raise ValueError(f"position {total - 1} exceeds max_seq_len={position_limit}")
        self.seen_tokens = total
