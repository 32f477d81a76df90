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

Caches are for inference: every update is in place, so they are used under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LinearAttentionCache:
    kv: torch.Tensor
    z: torch.Tensor
    empty: bool = True  # no token consumed yet: a prefill starts from no state rather than a zero one

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv, self.z

    def store(self, state, rows: slice | None = None) -> None:
        kv, z = state
        self.kv[rows or slice(None)].copy_(kv)
        self.z[rows or slice(None)].copy_(z)
        self.empty = False


@dataclass
class ConvCache:
    state: torch.Tensor
    empty: bool = True

    def store(self, state: torch.Tensor, rows: slice | None = None) -> None:
        self.state[rows or slice(None)].copy_(state)
        self.empty = False


@dataclass
class KVCache:
    k: torch.Tensor
    v: torch.Tensor
    slot_pos: torch.Tensor
    window: int | None = None

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, row: int | None = None) -> None:
        """Store keys/values [B, T, H, Dh] of tokens at ``positions`` [B, T] (consecutive per row) in their slots;
        only the last S tokens of a row can be kept. ``row``: write into that one row (k, v, positions of one row)."""
        if k.shape[1] > self.slots:
            k, v, positions = k[:, -self.slots:], v[:, -self.slots:], positions[:, -self.slots:]
        slots = positions % self.slots
        rows = slice(None) if row is None else slice(row, row + 1)
        index = slots[..., None, None].expand(-1, -1, *k.shape[2:])
        self.k[rows].scatter_(1, index, k.to(self.k.dtype))
        self.v[rows].scatter_(1, index, v.to(self.v.dtype))
        self.slot_pos[rows].scatter_(1, slots, positions)

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[B, 1, Tq, Tk] keys each query may see: stored (position >= 0), not after it, inside the window."""
        keep = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
        if self.window is not None:
            keep &= q_pos[:, :, None] - k_pos[:, None, :] < self.window
        return keep[:, None]


@dataclass
class ModelCache:
    """Every layer's state, and the tokens each row has consumed."""

    layers: list = field(default_factory=list)
    seen: torch.Tensor | None = None  # [B] int64 on the model's device
    seen_tokens: int = 0  # the largest of ``seen``, kept on the host (position bounds, capacity)
    max_len: int = 0  # the positions the attention caches can hold

    @property
    def batch_size(self) -> int:
        return 0 if self.seen is None else self.seen.shape[0]
