"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus); seeded draws that depend only on
the seed and a row's index (:func:`row_uniforms`), or one generator shared by the rows."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of most likely tokens whose probability reaches p
    seed: int | None = None

    def __post_init__(self):
        def number(x) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool)

        if not (number(self.temperature) and 0 <= self.temperature < math.inf):  # NaN fails too
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0: greedy)")
        if self.top_k is not None and not (isinstance(self.top_k, numbers.Integral) and not isinstance(self.top_k, bool)
                                           and self.top_k >= 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1")
        if self.top_p is not None and not (number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and not (isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool)
                                          and 0 <= self.seed < 2 ** 64):
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**64) (torch's generator seeds)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [B, V] with the tokens outside the top-k and the top-p nucleus (of the top-k distribution) set to
    -inf. Exactly k tokens stay on ties, and the most likely token, the one greedy picks, is always kept."""
    top_k = top_k if top_k is not None and top_k < logits.shape[-1] else None
    top_p = top_p if top_p is not None and top_p < 1 else None
    if top_k is None and top_p is None:
        return logits
    # stable: tied tokens keep their index order, so rank 0 is argmax's token (the first of the largest)
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        drop[:, top_k:] = True
    if top_p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def row_uniforms(seed: int, rows: int, steps: int) -> torch.Tensor:
    """[rows, steps] float64 draws from U[0, 1), row ``r``'s from a CPU generator seeded from (``seed``, r) through
    numpy's SeedSequence: a seeded row draws the same numbers whatever the batch around it (its size, the other
    prompts, when they stop) and however many steps are asked (a longer call extends a shorter one's draws), and rows
    with the same prompt still draw different samples. Drawn once per call, not per step."""
    out = torch.empty(rows, steps, dtype=torch.float64)
    for row in range(rows):
        row_seed = int(np.random.SeedSequence([seed, row]).generate_state(1, np.uint64)[0])
        torch.rand(steps, generator=torch.Generator().manual_seed(row_seed), dtype=torch.float64, out=out[row])
    return out


def choose(logits: torch.Tensor, sampling: Sampling,
           generator: torch.Generator | torch.Tensor | None = None) -> torch.Tensor:
    """The next token [B] for logits [B, V]. ``generator``: a generator whose draws go to the rows in order, or the
    draws themselves (a [B] tensor of numbers in [0, 1): a column of :func:`row_uniforms`), or None (torch's default
    generator)."""
    if sampling.greedy:
        return logits.argmax(-1)
    # shifted so the largest is 0: a tiny temperature then sends the others to -inf, not the largest to inf (a
    # softmax of NaNs); float64 so that a temperature below float32's smallest number does not become 0
    logits = logits.double()
    logits = (logits - logits.amax(-1, keepdim=True)) / sampling.temperature
    logits = filter_logits(logits, sampling.top_k, sampling.top_p)
    rows = logits.shape[0]
    if isinstance(generator, torch.Tensor):
        if generator.shape != (rows,):
            raise ValueError(f"draws of shape {tuple(generator.shape)} for {rows} rows: one per row")
        u = generator.to(device=logits.device, dtype=torch.float64)
    else:
        u = torch.rand(rows, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else logits.device).to(logits.device)
    # inverse CDF: the first token whose cumulative probability passes u * total. A token of probability 0 spans an
    # empty interval, so it is never chosen; u < 1 keeps the choice inside the vocabulary
    cdf = logits.softmax(-1).cumsum(-1)
    u = u[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
