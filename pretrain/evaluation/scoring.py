"""Perplexity and bits-per-byte of a causal LM over documents, with explicit windowing rules.

A document's tokens end with EOD; the scored stream of a document is ``[EOD] + tokens``, so every token of the
document, its first one and its closing EOD included, is predicted (EOD stands in for the previous document's
end, as in packed training data). Two ways to lay documents out:

- ``separate`` (default): each document on its own; the model state starts fresh for every document.
- ``packed``: one stream of all documents, as in training; context crosses document boundaries.

Windows over a stream longer than ``seq_len`` predicted tokens:

- non-overlapping (default, ``stride=None``): consecutive windows of ``seq_len`` targets, each starting with no
  context from the previous window;
- sliding (``stride=S``): windows of ``seq_len`` inputs advanced by S tokens; each window scores only its last
  S targets (the first window scores all of its targets), so every token past the first window is predicted
  with at least seq_len - S + 1 tokens of context.

NLL is summed in float64 per document; totals are reduced over documents in a fixed order, so a data-parallel
run gives the same result as a single process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids [B, T] -> logits [B, T, V]


@dataclass
class Document:
    tokens: list[int]  # the document's tokens, ending with EOD
    num_bytes: int | None = None  # UTF-8 bytes of its text (for bits per byte)
    set_name: str | None = None  # e.g. the Pile's meta.pile_set_name


@dataclass
class Totals:
    nll: float = 0.0  # nats, summed
    tokens: int = 0
    bytes: int = 0
    documents: int = 0
    bytes_known: bool = True

    def add(self, other: "Totals") -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.documents += other.documents
        self.bytes_known &= other.bytes_known

    def summary(self) -> dict:
        out = {"documents": self.documents, "tokens": self.tokens, "nll_sum": self.nll,
               "loss": self.nll / self.tokens if self.tokens else float("nan"),
               "perplexity": math.exp(self.nll / self.tokens) if self.tokens else float("nan")}
        if self.bytes_known and self.bytes:
            out["bytes"] = self.bytes
            out["bits_per_byte"] = self.nll / (math.log(2) * self.bytes)
            out["tokens_per_byte"] = self.tokens / self.bytes
        return out


@dataclass
class Window:
    start: int  # first input position in the stream
    end: int  # one past the last target position
    score_from: int  # first target position that is scored


def windows(stream_len: int, seq_len: int, stride: int | None) -> list[Window]:
    """Windows over a stream of ``stream_len`` tokens whose targets are positions 1 .. stream_len-1."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out = []
    if stride is None:
        for start in range(0, stream_len - 1, seq_len):
            out.append(Window(start, min(start + seq_len + 1, stream_len), start + 1))
        return out
    scored = 1  # next target position to score
    end = min(seq_len + 1, stream_len)
    while scored < stream_len:
        out.append(Window(max(0, end - seq_len - 1), end, scored))
        scored, end = end, min(end + stride, stream_len)
    return out


@dataclass
class _Piece:
    """One window of one stream, with the owner document of every target."""

    inputs: list[int]
    targets: list[int]
    owners: list[int]  # document index per target, -1 = not scored


def _pieces(stream: list[int], owners: list[int], seq_len: int, stride: int | None) -> Iterable[_Piece]:
    for w in windows(len(stream), seq_len, stride):
        targets = stream[w.start + 1:w.end]
        own = [owners[p] if p >= w.score_from else -1 for p in range(w.start + 1, w.end)]
        yield _Piece(stream[w.start:w.end - 1], targets, own)


@torch.no_grad()
def _score_batch(logits_fn: LogitsFn, batch: list[_Piece], device) -> list[dict[int, float]]:
    """NLL per owner document for each piece of the batch (float64 sums in position order)."""
    T = max(len(p.inputs) for p in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    tgt = torch.zeros(len(batch), T, dtype=torch.long)
    for b, p in enumerate(batch):  # right padding: a causal model's real positions never see it
        ids[b, :len(p.inputs)], tgt[b, :len(p.inputs)] = torch.tensor(p.inputs), torch.tensor(p.targets)
    logits = logits_fn(ids.to(device)).double()
    nll = F.cross_entropy(logits.flatten(0, 1), tgt.to(device).flatten(), reduction="none").view(len(batch), T)
    nll = nll.cpu().tolist()
    out = []
    for b, p in enumerate(batch):
        sums: dict[int, float] = {}
        for owner, value in zip(p.owners, nll[b]):
            if owner >= 0:
                sums[owner] = sums.get(owner, 0.0) + value
        out.append(sums)
    return out


def score_documents(logits_fn: LogitsFn, docs: list[Document], *, seq_len: int, eod_id: int,
                    stride: int | None = None, layout: Literal["separate", "packed"] = "separate",
                    batch_size: int = 8, device="cpu", rank: int = 0, world_size: int = 1,
                    all_gather: Callable[[object], list] | None = None, progress=None) -> dict[int, float]:
    """Summed NLL (nats, float64) per document index.

    Batches are formed over all windows first and dealt out round-robin to the ``world_size`` ranks, so each
    batch is computed exactly as in a single process; ``all_gather`` (e.g. torch.distributed's
    all_gather_object) collects the per-window sums, which are then added in window order on every rank.
    """
    pieces: list[_Piece] = []
    if layout == "separate":
        for i, doc in enumerate(docs):
            pieces.extend(_pieces([eod_id] + list(doc.tokens), [-1] + [i] * len(doc.tokens), seq_len, stride))
    elif layout == "packed":
        stream, owners = [eod_id], [-1]
        for i, doc in enumerate(docs):
            stream.extend(doc.tokens)
            owners.extend([i] * len(doc.tokens))
        pieces.extend(_pieces(stream, owners, seq_len, stride))
    else:
        raise ValueError(f"layout must be 'separate' or 'packed', got {layout!r}")
    order = sorted(range(len(pieces)), key=lambda j: len(pieces[j].inputs))  # similar lengths: less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine: dict[int, dict[int, float]] = {}
    for b in range(rank, len(batches), world_size):
        for j, sums in zip(batches[b], _score_batch(logits_fn, [pieces[j] for j in batches[b]], device)):
            mine[j] = sums
        if progress is not None:
            progress.update(sum(len(pieces[j].targets) for j in batches[b]))
    gathered = all_gather(mine) if all_gather is not None else [mine]
    by_piece = {j: sums for part in gathered for j, sums in part.items()}
    if len(by_piece) != len(pieces):
        raise RuntimeError(f"gathered results cover {len(by_piece)} of {len(pieces)} windows")
    per_doc = {i: 0.0 for i in range(len(docs))}
    for j in range(len(pieces)):
        for doc, value in by_piece[j].items():
            per_doc[doc] += value
    return per_doc


NO_SET = "(no set)"  # the set of documents without a set name, when others have one


def totals_by_set(docs: list[Document], per_doc_nll: dict[int, float]) -> tuple[Totals, dict[str, Totals]]:
    """Reduce per-document NLL in document order (deterministic) into overall and per-set totals. When any document
    names a set, every document is in one (``NO_SET`` for the unnamed), so the sets add up to the total."""
    named = any(doc.set_name is not None for doc in docs)
    overall, by_set = Totals(), {}
    for i, doc in enumerate(docs):
        t = Totals(nll=per_doc_nll[i], tokens=len(doc.tokens), bytes=doc.num_bytes or 0, documents=1,
                   bytes_known=doc.num_bytes is not None)
        overall.add(t)
        if named:
            by_set.setdefault(NO_SET if doc.set_name is None else doc.set_name, Totals()).add(t)
    return overall, dict(sorted(by_set.items()))
