"""Batched generation: one varlen prefill of all prompts, then one-token steps on preallocated caches.

The prompts (any lengths) are packed into one row with ``cu_seqlens``; the chunked kernels run the linear-attention
and convolution layers over every document at once and leave each document's final state in its cache row, the
attention layers fill their KV buffers. Each step then feeds one token per row: nothing is allocated outside the
caches' own buffers, so on CUDA the whole step (embedding to logits) is captured once as a CUDA graph and replayed
for every later token. The choice of the next token (greedy, temperature, top-k, top-p), EOS and stop checks run
on the host between steps.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch

from pretrain.generation.sampling import Sampling, choose, row_uniforms


class DecodeStep:
    """``step(tokens [B]) -> logits [B, vocab]``: feeds one token per row through the model and its cache.

    With ``cuda_graph``, the first ``warmup`` steps run eagerly (they compile and initialise the kernels), the next
    is captured and every later one replays the graph on the same buffers. With ``compile``, the step's function
    goes through ``torch.compile`` first (fused norms, activations and residual adds: fewer kernels per step, which
    is what a launch-bound step costs); the graph then captures the compiled kernels. It compiles anew for each
    ``DecodeStep`` (the cache's shapes differ), so it pays off for long generations, not for many short calls."""

    def __init__(self, model, cache, *, cuda_graph: bool, compile: bool = False, warmup: int = 2):
        self.model, self.cache = model, cache
        device = cache.seen.device
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.warmup, self.calls = warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.forward = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def _forward(self) -> torch.Tensor:
        hidden = self.model.hidden_states(self.tokens, cache=self.cache)
        return self.model.lm_head(hidden[:, -1])

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view(-1, 1))
        self.calls += 1
        if not self.cuda_graph or self.calls <= self.warmup:
            return self.forward()
        if self.graph is None:  # recording runs no kernel; the replay below runs this step
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.forward()
        else:  # the replay advances the rows' positions on the GPU; the host's count and bounds are kept here
            self.cache.reserve(1, *self.model.cache_limits())
        self.graph.replay()
        return self.logits


def _is_list_like(x) -> bool:  # lists, tuples, numpy arrays, 1-d tensors; not text
    return not isinstance(x, (str, bytes)) and hasattr(x, "__len__") and hasattr(x, "__iter__") and \
        getattr(x, "ndim", 1) >= 1


def token_lists(prompts, vocab_size: int) -> list[list[int]]:
    """``prompts`` (token-id sequences, or a [B, T] integer tensor) as lists of ints, each checked: not empty and
    every id in [0, vocab_size), the first offender named (the embedding would fail on it with an IndexError, a
    device-side assert on CUDA)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.is_floating_point() or prompts.is_complex():
            raise ValueError(f"prompts as a tensor must be [batch, length] token ids, got {prompts.dim()}-d "
                             f"{prompts.dtype}")
        prompts = prompts.tolist()
    if not _is_list_like(prompts) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, prompt in enumerate(prompts):
        if not _is_list_like(prompt):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. the "
                             "end-of-document token)")
        ids = []
        for item in prompt:
            if (token := _integer_id(item)) is None:
                raise ValueError(f"prompt {i} holds {item!r}, not an integer token id")
            if not 0 <= token < vocab_size:
                raise ValueError(f"prompt {i} holds token id {token}, outside the model's vocabulary "
                                 f"[0, {vocab_size})")
            ids.append(token)
        out.append(ids)
    return out


@torch.no_grad()
def prefill(model, prompts: Sequence[Sequence[int]], max_len: int):
    """(cache with the prompts consumed, logits [N, vocab] after each prompt's last token)."""
    return _prefill(model, token_lists(prompts, model.config.vocab_size), max_len)


def _prefill(model, prompts: list[list[int]], max_len: int):
    """``prefill`` on prompts ``token_lists`` has checked."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]
    cache = model.init_cache(len(prompts), max_len)
    hidden = model.hidden_states(ids, cu_seqlens=cu_seqlens, cache=cache)
    return cache, model.lm_head(hidden[0, cu_seqlens[1:] - 1])


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampling: Sampling | None = None,
             eos_ids: Sequence[int] = (), should_stop: Callable[[int, list[int]], bool] | None = None,
             on_tokens: Callable[[list[int | None]], None] | None = None, cuda_graph: bool = True,
             compile: bool = False, generator: torch.Generator | None = None,
             vocab_size: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (token lists of any lengths), at most ``max_new_tokens`` each.

    A row stops after an ``eos_ids`` token (one id, or ints / a tensor of them; kept in its output) or when
    ``should_stop(row, tokens so far)`` says so (stop strings: the caller decodes). ``on_tokens`` gets each step's
    new token per row (None for a row that has stopped), for streaming. ``cuda_graph`` / ``compile``: see
    :class:`DecodeStep`. The batch runs until every row has stopped. Draws come from ``generator`` (shared by the
    rows, in row order), else from one stream per row seeded with ``sampling.seed`` and the row's index
    (:func:`row_uniforms`: a prompt's sample then does not depend on the other prompts of the batch), else from
    torch's default generator. ``vocab_size``: only ids below it are chosen (a model's vocabulary padded past its
    tokenizer's: the padding ids have no text). The model runs in eval mode (no dropout), whatever its mode; the
    mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, max_new_tokens, sampling, eos_ids, should_stop, on_tokens, cuda_graph,
                         compile, generator, vocab_size)
    finally:
        model.train(was_training)


def check_positions(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raise ValueError when the longest prompt plus ``max_new_tokens`` passes the model's learned positions. Checked
    before decoding, not at the step that passes the limit, so that no decoding (or streaming) is spent on a failing
    call."""
    longest = max((len(p) for p in prompts), default=0)
    _, position_limit = model.cache_limits()
    # the last new token is not fed back: the longest row uses positions up to longest + max_new_tokens - 2
    if max_new_tokens > 0 and position_limit is not None and longest + max_new_tokens - 1 > position_limit:
        raise ValueError(f"a prompt of {longest} tokens and max_new_tokens={max_new_tokens} need "
                         f"{longest + max_new_tokens - 1} positions, more than max_seq_len={position_limit} "
                         "(learned position embeddings)")


def _integer_id(x) -> int | None:
    """``x`` as a plain int if it is one integer id (an int, a numpy integer, a one-element integer tensor), else
    None (bools, floats and the like are not ids)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        return None
    return int(x)


def _token_ids(ids, name: str) -> set[int]:
    """A set of plain ints from one id or a sequence of them (ints, numpy integers or a tensor of integers; None:
    none). Tensors are unpacked: a set of 0-d tensors would hash them by identity and never match a token."""
    if ids is None:
        return set()
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids, got a {ids.dtype} tensor")
        return set(ids.flatten().tolist())
    if (one := _integer_id(ids)) is not None:
        return {one}
    out = set()
    for i in ids:
        if (token := _integer_id(i)) is None:
            raise ValueError(f"{name} must hold integer token ids, got {i!r}")
        out.add(token)
    return out


def _generate(model, prompts, max_new_tokens, sampling, eos_ids, should_stop, on_tokens, cuda_graph, compile,
              generator, vocab_size) -> list[list[int]]:
    sampling = sampling or Sampling(temperature=0.0)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    prompts = token_lists(prompts, model.config.vocab_size)
    eos = _token_ids(eos_ids, "eos_ids")
    if vocab_size is not None and not 0 < vocab_size <= model.config.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, the model's {model.config.vocab_size}]")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    check_positions(model, prompts, max_new_tokens)
    longest = max((len(p) for p in prompts), default=0)
    cache, logits = _prefill(model, prompts, longest + max_new_tokens)  # checked above
    draws = None  # a seeded call's [rows, steps] numbers, one row stream each, on the logits' device
    if generator is None and sampling.seed is not None and not sampling.greedy:
        draws = row_uniforms(sampling.seed, len(prompts), max_new_tokens).to(logits.device)
    step = DecodeStep(model, cache, cuda_graph=cuda_graph, compile=compile)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for i in range(max_new_tokens):
        tokens = choose(logits[:, :vocab_size], sampling, generator if draws is None else draws[:, i])
        new: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                new.append(None)
                continue
            out[row].append(token)
            new.append(token)
            done[row] = token in eos or (should_stop is not None and should_stop(row, out[row]))
        if on_tokens is not None:
            on_tokens(new)
        if all(done) or i + 1 == max_new_tokens:
            break
        logits = step(tokens)
    return out
