"""Fixed-length training sequences from packed, memory-mapped token shards, in a resumable global order.

Packing. Each dataset is one or more indexed shard sets (``.bin``/``.idx``, see :mod:`pretrain.data.indexed`)
concatenated in order into a single token stream of ``T`` tokens (documents back to back, each ending with EOD).
Sequence ``j`` of the dataset is the window ``stream[j*L : j*L + L + 1]`` (``L = seq_len``), giving
``input_ids = window[:-1]`` and ``labels = window[1:]``; consecutive windows share one token, so every token
is a label exactly once. A dataset has ``N = (T - 1) // L`` sequences; the tail that does not fill one is unused.

Global order (independent of world size). Global sample ``i`` is mapped to a dataset and an ordinal in it:

* Mixing: samples are grouped in blocks of ``mix_block``; every block holds ``n_d`` samples of dataset ``d``
  (largest-remainder rounding of ``weight_d * mix_block``), in a seeded order that differs per block. The
  ordinal of sample ``i`` within dataset ``d`` is ``block * n_d + (its rank among d's slots in the block)``.
* Shuffling: ordinal ``k`` of dataset ``d`` is epoch ``e = k // N`` and position ``k % N``; the sequence read is
  ``perm_{seed,d,e}(k % N)``, where ``perm`` is a keyed pseudo-random permutation of ``range(N)`` (a Feistel
  network with cycle walking), computed per index in O(1) memory, so corpora of any size need no index files.
  Each epoch visits every sequence of the dataset exactly once, in a new order.

Data parallelism. Rank ``r`` of ``W`` takes the global samples ``i`` with ``i % W == r``, starting at
``consumed_samples``. With a global batch of ``G = W * micro_batch`` samples per step, step ``s`` covers global
samples ``[s*G, (s+1)*G)`` and each rank gets its ``micro_batch`` share.

Resume. The whole position is ``consumed_samples`` (global samples consumed by all ranks together) — see
:meth:`PackedSequenceDataset.state_dict`. Restoring it (at the same or a DIFFERENT world size, as long as it is a
multiple of the new world size, e.g. ``step * global_batch``) continues with exactly the samples an
uninterrupted run would see next, with no repeats and no gaps.

Only numpy and torch are needed (no sentencepiece).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import numbers
import os
import re
from typing import Iterator, Sequence

import numpy as np
import torch

from .indexed import IndexedDataset

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class FeistelPermutation:
    """A keyed bijection of ``range(n)``: ``perm(i)`` for one index in O(1) time and memory."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 0:
            raise ValueError("n must be >= 0")
        self.n = n
        bits = max((n - 1).bit_length(), 2)
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64(key + r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: the domain is at most 4n, so few steps are expected
            x = self._encrypt(x)
        return x


def _check_listed_sizes(manifest: str, shards: list, prefixes: list[str]) -> None:
    """Each shard the manifest lists is on disk with the size it was written with: a stat per shard, which catches a
    truncated or partly copied ``.bin`` at once (``data_prep/verify_shards.py`` checks the SHA-256 of the bytes)."""
    for shard, prefix in zip(shards, prefixes):
        path = prefix + ".bin"
        if not os.path.isfile(prefix + ".idx") or not os.path.isfile(path):
            raise FileNotFoundError(f"{manifest} lists shard {shard['name']!r}, but {prefix}.bin/.idx is missing")
        want = shard.get("bin_bytes")
        if want is not None and os.path.getsize(path) != want:
            raise ValueError(f"{path}: {os.path.getsize(path)} bytes, but {manifest} records {want} (truncated or "
                             "replaced since it was written: tokenize again, or copy it again)")


def merged_record(prefix: str) -> tuple[str, dict] | None:
    """(``OUT/manifest.json``, what it records of ``OUT/{split}.bin``) when ``prefix`` is a split merged by
    ``tokenize_pile.py --merge``, else None."""
    prefix = os.path.abspath(prefix)
    manifest = os.path.join(os.path.dirname(prefix), "manifest.json")
    try:
        with open(manifest) as f:
            return manifest, json.load(f)["merged"][os.path.basename(prefix)]
    except (OSError, ValueError, KeyError, TypeError):  # not a merged split of tokenize_pile.py: nothing recorded
        return None


def _check_merged_size(prefix: str) -> None:
    """A merged ``OUT/{split}.bin`` has the size ``OUT/manifest.json`` records."""
    found = merged_record(prefix)
    if found is not None:
        manifest, record = found
        _check_listed_sizes(manifest, [{**record, "name": os.path.basename(prefix)}], [prefix])


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def resolve_shards(spec: str | os.PathLike) -> list[str]:
    """Shard prefixes of a data path, in order.

    ``spec`` may be: a prefix with ``spec.idx``/``spec.bin``; a directory (its ``*.idx`` files, sorted by name —
    e.g. ``OUT/train`` written by ``data_prep/tokenize_pile.py``, whose ``manifest.json`` order is used when
    present); or a glob matching ``.idx`` files or prefixes. Names sort with their numbers compared as numbers, so
    ``train-100000`` follows ``train-99999``.
    """
    spec = os.fspath(spec)
    manifest = os.path.join(spec, "manifest.json")
    # a split directory with its manifest wins over the merged OUT/{split}.bin of --merge beside it: its shards are
    # the ones the manifest's sizes and verify_shards.py vouch for (name OUT/train.idx to read the merged file)
    if os.path.isfile(spec + ".idx") and not os.path.isfile(manifest):
        _check_merged_size(spec)
        return [spec]
    if os.path.isdir(spec):
        if os.path.isfile(manifest):
            with open(manifest) as f:
                try:
                    shards = json.load(f)["shards"]
                    prefixes = [os.path.join(spec, s["name"]) for s in shards]
                except (ValueError, KeyError, TypeError) as e:  # e.g. OUT's own manifest, which has no "shards"
                    raise ValueError(f"{manifest}: not a shard list ({type(e).__name__}: {e}); give a split "
                                     f"directory (e.g. OUT/train of tokenize_pile.py) or a shard prefix") from None
            _check_listed_sizes(manifest, shards, prefixes)
            return prefixes
        state = os.path.join(os.path.dirname(os.path.abspath(spec)), ".state")
        if os.path.isdir(state):  # a split of tokenize_pile.py's OUT without its manifest: that run has not finished
            raise ValueError(f"{spec}: no manifest.json, and {state} is there: the tokenization writing it has not "
                             "finished (its shards may be partial); rerun tokenize_pile.py with the same arguments "
                             "to finish it")
        found = sorted(glob.glob(os.path.join(spec, "*.idx")), key=_natural_key)
    else:
        found = sorted(glob.glob(spec if spec.endswith(".idx") else spec + ".idx"), key=_natural_key)
        if not found:
            found = sorted((p for p in glob.glob(spec) if p.endswith(".idx")), key=_natural_key)
    if not found:
        raise FileNotFoundError(f"no indexed dataset (.idx/.bin) found at {spec!r}")
    prefixes = [p[: -len(".idx")] for p in found]
    for prefix in prefixes:
        _check_merged_size(prefix)
    return prefixes


class TokenStream:
    """Several indexed shards read as one concatenated token stream (memory-mapped)."""

    def __init__(self, spec: str | os.PathLike | Sequence[str]):
        self.prefixes = list(spec) if isinstance(spec, (list, tuple)) else resolve_shards(spec)
        self.shards = [IndexedDataset(p) for p in self.prefixes]
        for s in self.shards:
            if not s.is_contiguous():
                raise ValueError(f"{s.prefix}: sequences are not stored back to back; cannot stream it")
        counts = [s.num_tokens for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.num_tokens = int(self.starts[-1])
        self.num_documents = sum(len(s) for s in self.shards)
        # Document starts per shard: the sequence pointers (bytes) when each sequence is a document (searched in
        # place, memory-mapped), else an explicit token-offset array built from the document index.
        self._doc_starts = []
        for s in self.shards:
            if len(s.doc_idx) == len(s.sizes) + 1:
                self._doc_starts.append((s.pointers, s.dtype.itemsize))
            else:
                self._doc_starts.append((s.document_start_tokens(), 1))
        dtypes = {s.dtype for s in self.shards}
        if len(dtypes) > 1:
            raise ValueError(f"shards of {spec!r} mix token dtypes {dtypes}")

    def __reduce__(self):  # by its shard paths, reopened on load (the document starts are memmap views)
        return type(self), (self.prefixes,)

    def _pieces(self, a: int, b: int):
        first = int(np.searchsorted(self.starts, a, side="right")) - 1
        for s in range(max(first, 0), len(self.shards)):
            lo = int(self.starts[s])
            if lo >= b:
                break
            yield s, lo, max(a - lo, 0), min(b - lo, self.shards[s].num_tokens)

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens ``[a, b)`` of the stream as int64."""
        if not 0 <= a <= b <= self.num_tokens:
            raise IndexError(f"token range [{a}, {b}) outside [0, {self.num_tokens})")
        parts = [np.asarray(self.shards[s].tokens[x:y], dtype=np.int64) for s, _, x, y in self._pieces(a, b)]
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def document_starts(self, a: int, b: int) -> np.ndarray:
        """Stream offsets in ``[a, b)`` at which a document starts (sorted)."""
        out = []
        for s, lo, x, y in self._pieces(a, b):
            starts, scale = self._doc_starts[s]
            i = int(np.searchsorted(starts, x * scale, side="left"))
            j = int(np.searchsorted(starts, y * scale, side="left"))
            if i < j:
                out.append(np.asarray(starts[i:j], dtype=np.int64) // scale + lo)
        # unique: empty documents (which other MMIDIDX writers may store) start where the next one does
        return np.unique(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


class PackedSequenceDataset(torch.utils.data.IterableDataset):
    """Seeded, rank-sharded, resumable stream of packed ``seq_len`` training sequences (see module docstring).

    Args:
        datasets: ``[(path, weight), ...]`` (or plain paths, weight 1). A path is anything
            :func:`resolve_shards` accepts, or a list of shard prefixes.
        seq_len: tokens per training sequence (each sample reads ``seq_len + 1`` tokens).
        seed: shuffling and mixing seed.
        rank, world_size: data-parallel position; rank ``r`` reads global samples ``i % world_size == r``.
        return_cu_seqlens: also yield ``cu_seqlens`` (int32 ``[0, ..., seq_len]``, the document boundaries inside
            ``input_ids``) for document-masked attention.
        max_samples: stop after this many global samples (``None``: endless, epoch after epoch).
        mix_block: granularity of the mixing schedule (weights are realised exactly per block).
        micro_batch_size: the DataLoader ``batch_size``; only used to split work between DataLoader workers so
            that the DataLoader's output order equals the single-process order.

    Iterating yields dicts ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}`` (plus
    ``cu_seqlens``). Works with ``torch.utils.data.DataLoader``; with ``num_workers > 0`` pass its ``batch_size`` as
    ``micro_batch_size`` (each worker then produces every ``num_workers``-th batch, as the DataLoader expects, and
    the order is unchanged). ``ds[i]`` returns global
    sample ``i`` directly.
    """

    def __init__(
        self,
        datasets,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        return_cu_seqlens: bool = False,
        max_samples: int | None = None,
        mix_block: int = 1000,
        micro_batch_size: int = 1,
    ):
        super().__init__()
        if seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        pairs = []
        for item in datasets:
            if (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], numbers.Real)
                    and not isinstance(item[1], bool)):  # numpy scalars too
                pairs.append((item[0], float(item[1])))
            else:
                pairs.append((item, 1.0))
        if not pairs:
            raise ValueError("no datasets given")
        for path, weight in pairs:
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"mixing weight of {path!r} must be a positive finite number, got {weight}")
        self.paths = [p if isinstance(p, (list, tuple)) else os.fspath(p) for p, _ in pairs]
        total = sum(w for _, w in pairs)
        self.weights = [w / total for _, w in pairs]
        self.streams = [TokenStream(p) for p in self.paths]
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.return_cu_seqlens = return_cu_seqlens
        self.max_samples = max_samples
        self.micro_batch_size = micro_batch_size
        self.num_sequences = [max((s.num_tokens - 1) // seq_len, 0) for s in self.streams]
        for p, n in zip(self.paths, self.num_sequences):
            if n == 0:
                raise ValueError(f"dataset {p!r} has fewer than seq_len + 1 = {seq_len + 1} tokens")
        self.mix_block = mix_block
        self._block_counts = self._largest_remainder(self.weights, mix_block)
        for p, w, c in zip(self.paths, self.weights, self._block_counts):
            if c == 0:
                raise ValueError(f"weight {w:.2e} of {p!r} rounds to 0 samples per block of {mix_block}; raise mix_block")
        self._block_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: dict[tuple[int, int], FeistelPermutation] = {}
        self.consumed_samples = 0

    # ---- global order -------------------------------------------------------------------------------------
    @staticmethod
    def _largest_remainder(weights: list[float], block: int) -> list[int]:
        raw = [w * block for w in weights]
        counts = [int(np.floor(x)) for x in raw]
        order = sorted(range(len(raw)), key=lambda d: (-(raw[d] - counts[d]), d))
        for d in order[: block - sum(counts)]:
            counts[d] += 1
        return counts

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._block_cache is not None and self._block_cache[0] == b:
            return self._block_cache[1], self._block_cache[2]
        slots = np.repeat(np.arange(len(self.weights)), self._block_counts)
        rng = np.random.Generator(np.random.PCG64(_key("mix", self.seed, b)))
        slots = slots[rng.permutation(len(slots))]
        ranks = np.zeros(len(slots), dtype=np.int64)
        for d in range(len(self.weights)):
            where = np.nonzero(slots == d)[0]
            ranks[where] = np.arange(len(where))
        self._block_cache = (b, slots, ranks)
        return slots, ranks

    def locate(self, i: int) -> tuple[int, int]:
        """Global sample ``i`` → ``(dataset index, sequence index within that dataset)``."""
        if i < 0:
            raise IndexError(i)
        if len(self.weights) == 1:
            d, k = 0, i
        else:
            b, p = divmod(i, self.mix_block)
            slots, ranks = self._block(b)
            d = int(slots[p])
            k = b * self._block_counts[d] + int(ranks[p])
        n = self.num_sequences[d]
        epoch, pos = divmod(k, n)
        perm = self._perm_cache.get((d, epoch))
        if perm is None:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            perm = self._perm_cache[(d, epoch)] = FeistelPermutation(n, _key("perm", self.seed, d, epoch))
        return d, perm(pos)

    def __getitem__(self, i: int) -> dict:
        d, j = self.locate(int(i))
        a = j * self.seq_len
        window = self.streams[d].read(a, a + self.seq_len + 1)
        t = torch.from_numpy(np.ascontiguousarray(window, dtype=np.int64))
        out = {"input_ids": t[:-1], "labels": t[1:]}
        if self.return_cu_seqlens:
            starts = self.streams[d].document_starts(a + 1, a + self.seq_len) - a
            cu = np.concatenate([[0], starts, [self.seq_len]]).astype(np.int32)
            out["cu_seqlens"] = torch.from_numpy(cu)
        return out

    # ---- iteration and state ------------------------------------------------------------------------------
    def global_indices(self, start: int | None = None) -> Iterator[int]:
        """This rank's global sample indices from ``start`` (default: ``consumed_samples``) on."""
        start = self.consumed_samples if start is None else start
        i = start + (self.rank - start) % self.world_size
        while self.max_samples is None or i < self.max_samples:
            yield i
            i += self.world_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        start = self.consumed_samples
        if info is None:
            for i in self.global_indices(start):
                sample = self[i]
                # Everything up to the end of this sample's round (one sample per rank) counts as consumed.
                self.consumed_samples = i - (i % self.world_size) + self.world_size
                yield sample
        else:
            # The DataLoader takes whole batches from its workers in turn: worker w gets local batches w, w + K, ...
            for k, i in enumerate(self.global_indices(start)):
                if (k // self.micro_batch_size) % info.num_workers == info.id:
                    yield self[i]

    def state_dict(self, consumed_samples: int | None = None) -> dict:
        """The loader position, small enough for any checkpoint.

        ``consumed_samples`` defaults to what this object's own iterator has yielded (exact when iterating in the
        training process, e.g. ``DataLoader(num_workers=0)``). With DataLoader workers, which prefetch, pass the
        trainer's own count, e.g. ``step * global_batch_size``.
        """
        return {
            "consumed_samples": int(self.consumed_samples if consumed_samples is None else consumed_samples),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "weights": list(self.weights),
            "mix_block": self.mix_block,
            "num_tokens": [s.num_tokens for s in self.streams],
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from ``state`` (possibly saved at a different world size)."""
        if strict:
            mine = self.state_dict()
            # Each of these changes the order (mix_block only where several datasets are mixed).
            keys = ("seed", "seq_len", "num_tokens") + (("mix_block",) if len(self.weights) > 1 else ())
            for key in keys:
                if key in state and state[key] != mine[key]:
                    raise ValueError(f"loader state mismatch for {key!r}: checkpoint {state[key]!r}, now {mine[key]!r}")
            if "weights" in state and not np.allclose(state["weights"], mine["weights"]):
                raise ValueError(f"loader state mismatch for 'weights': {state['weights']} vs {mine['weights']}")
        self.consumed_samples = int(state["consumed_samples"])
