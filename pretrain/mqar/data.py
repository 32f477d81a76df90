"""Multi-Query Associative Recall (MQAR) data, following the task definition of Zoology (Arora et al., 2023).

One example of length ``seq_len`` with ``N = num_kv_pairs`` pairs (vocabulary ``V``)::

    position   0    1    2    3   ...  2N-2 2N-1 | 2N ... seq_len-1
    input      k1   v1   k2   v2  ...  kN   vN   | 0 .. k_j .. 0 .. k_i .. 0        (query slots: 2N + 2g)
    label      -100 ...                          | -100 .. v_j .. -100 .. v_i ..    (label at the query itself)

* keys are N distinct tokens from ``[1, V/2)`` (0 is the filler token), values N distinct tokens from ``[V/2, V)``;
* the ``space = (seq_len - 2N) // 2`` query slots are the even offsets ``2N + 2g`` (``g = 0 .. space-1``) after the
  context; every key is queried exactly once, at a slot drawn without replacement with probability
  ``p(g) ∝ (g+1)^(power_a - 1)`` (a power law: near slots are likelier; ``power_a = 1`` is uniform). The i-th key of
  the context takes the i-th slot drawn (Zoology's order);
* **alignment**: the label sits *at* the query's position, i.e. the model reads key ``k_j`` at position ``p`` and
  must output ``v_j`` from the logits at ``p``. ``inputs`` and ``labels`` are both ``[n, seq_len]``; the loss and
  the accuracy use the positions whose label is not ``-100`` (exactly the N query positions);
* all other input positions are 0 (``random_non_queries=True`` fills them with uniform random tokens instead, as
  Zoology's default; the ReBased paper's sweep uses zeros).

Storage is compact: an example is fully described by its keys, values and query positions (``[n, N]`` int16
each); dense batches are built on the fly (on the training device) by :meth:`MQARSplit.batch`. A dataset is
generated once per parameter set and cached on disk (``.npz``, keyed by every parameter and the generator
version); train and test use independent random streams (``seed`` and ``seed + 10``, as the ReBased code).
The random streams are numpy's ``default_rng`` (PCG64), not Zoology's legacy global RNG: the distribution is the
same, the exact examples are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.atomic import write_file_atomic
from pretrain.cores import available_cores

GENERATOR_VERSION = 1
IGNORE_INDEX = -100
TEST_SEED_OFFSET = 10  # the test split uses seed + 10 (as the ReBased/Zoology builders)


def default_num_kv_pairs(seq_len: int) -> int:
    """The ReBased paper's rule: 16 pairs at sequence length 128, seq_len / 4 otherwise."""
    return 16 if seq_len == 128 else seq_len // 4


@dataclass(frozen=True)
class MQARSpec:
    """Everything that determines a dataset (and its cache key)."""

    seq_len: int
    num_kv_pairs: int
    vocab_size: int = 8192
    num_train: int = 100_000
    num_test: int = 3_000
    power_a: float = 0.01
    random_non_queries: bool = False
    seed: int = 42

    def __post_init__(self):
        n, L, V = self.num_kv_pairs, self.seq_len, self.vocab_size
        if L < 4 or L % 2:
            raise ValueError(f"seq_len={L} must be even and >= 4")
        if n < 1 or 4 * n > L:
            raise ValueError(f"num_kv_pairs={n} must be in [1, seq_len/4={L // 4}]")
        if n > V // 2 - 1:
            raise ValueError(f"num_kv_pairs={n} needs at least {n} keys and values; vocab_size={V} is too small")
        if V > 32767:
            raise ValueError(f"vocab_size={V} does not fit the int16 storage")
        if self.seed < 0:  # numpy seeds are non-negative
            raise ValueError(f"seed={self.seed} must be >= 0")
        if not self.power_a > 0:
            raise ValueError(f"power_a={self.power_a} must be > 0")
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(query_slot_probs(self.space, self.power_a)).all()
        if not finite:  # (g+1)^(a-1) past the float64 range: NaN probabilities would put every query first
            raise ValueError(f"power_a={self.power_a} is too large for seq_len={L}: the query-slot weights "
                             f"(g+1)^(a-1) overflow float64 (at most about 1 + 700 / ln({self.space}))")
        if self.num_train < 0 or self.num_test < 0:
            raise ValueError("num_train and num_test must be >= 0")

    @property
    def space(self) -> int:
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def cache_name(self) -> str:
        payload = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
        return (f"mqar_L{self.seq_len}_kv{self.num_kv_pairs}_V{self.vocab_size}_n{self.num_train}-{self.num_test}"
                f"_s{self.seed}_{digest}.npz")


def position_dtype(seq_len: int) -> type:
    """Storage of the query positions (even, at most seq_len - 2): int16 while they fit, else int32."""
    return np.int16 if seq_len - 2 <= np.iinfo(np.int16).max else np.int32


def query_slot_probs(space: int, power_a: float) -> np.ndarray:
    """Probability of query slot g (offset 2g after the context), g = 0 .. space-1: ∝ (g+1)^(a-1)."""
    p = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def _distinct(scores: np.ndarray, low: int, k: int) -> np.ndarray:
    """k distinct integers from [low, low + width) per row, in random order, chosen by uniform random ``scores``
    [rows, width]."""
    if k < scores.shape[1]:  # the k smallest (a uniform subset), then ordered by their score (a uniform order)
        idx = np.argpartition(scores, k - 1, axis=1)[:, :k]
        return np.take_along_axis(idx, np.take_along_axis(scores, idx, axis=1).argsort(axis=1), axis=1) + low
    return scores.argsort(axis=1) + low


def _generate(spec: MQARSpec, num: int, seed: int, chunk: int = 2048, workers: int | None = None
              ) -> dict[str, np.ndarray]:
    """The split's arrays. The random draws run in one stream, chunk after chunk, in this thread (so the examples
    depend on the seed and ``chunk``, never on the threads); the selections from them (partitions and sorts, which
    release the GIL) run on ``workers`` threads: the 100k examples at seq 2048 take ~20 s in one thread."""
    rng = np.random.default_rng(seed)
    N, V, L = spec.num_kv_pairs, spec.vocab_size, spec.seq_len
    half = V // 2
    log_p = np.log(query_slot_probs(spec.space, spec.power_a))
    keys, values = (np.empty((num, N), dtype=np.int16) for _ in range(2))
    qpos = np.empty((num, N), dtype=position_dtype(L))

    def select(sl: slice, key_scores, value_scores, slot_scores) -> None:
        keys[sl] = _distinct(key_scores, 1, N)
        values[sl] = _distinct(value_scores, half, N)
        # Weighted sampling without replacement (Gumbel top-k): the slots in decreasing order of
        # log p + Gumbel noise are distributed as successive draws ∝ p among the slots not yet taken.
        qpos[sl] = 2 * N + 2 * np.argsort(-slot_scores, axis=1, kind="stable")[:, :N]

    workers = workers or min(16, available_cores())
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for start in range(0, num, chunk):
            rows = min(chunk, num - start)
            key_scores = rng.random((rows, half - 1), dtype=np.float32)
            value_scores = rng.random((rows, V - half), dtype=np.float32)
            slot_scores = log_p[None, :] + rng.gumbel(size=(rows, spec.space))
            pending.append(pool.submit(select, slice(start, start + rows), key_scores, value_scores, slot_scores))
            while len(pending) > 2 * workers:  # a bounded number of chunks' scores in memory
                pending.popleft().result()
        for job in pending:
            job.result()
    out = {"keys": keys, "values": values, "qpos": qpos}
    if spec.random_non_queries:
        out["filler"] = rng.integers(0, V, size=(num, L), dtype=np.int16)
    return out


class MQARSplit:
    """One split in compact form; ``batch(idx)`` builds dense ``(inputs, labels)`` [B, seq_len] int64 tensors."""

    def __init__(self, spec: MQARSpec, arrays: dict[str, np.ndarray], device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.keys = torch.from_numpy(arrays["keys"].astype(np.int64)).to(self.device)
        self.values = torch.from_numpy(arrays["values"].astype(np.int64)).to(self.device)
        self.qpos = torch.from_numpy(arrays["qpos"].astype(np.int64)).to(self.device)
        filler = arrays.get("filler")
        self.filler = torch.from_numpy(filler.astype(np.int64)).to(self.device) if filler is not None else None
        N = spec.num_kv_pairs
        self._kv_pos = torch.arange(2 * N, device=self.device)

    def __len__(self) -> int:
        return self.keys.shape[0]

    def to(self, device) -> "MQARSplit":
        arrays = {"keys": self.keys.cpu().numpy(), "values": self.values.cpu().numpy(), "qpos": self.qpos.cpu().numpy()}
        if self.filler is not None:
            arrays["filler"] = self.filler.cpu().numpy()
        return MQARSplit(self.spec, arrays, device)

    def inputs(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The dense inputs [B, seq_len] int64 of examples ``idx`` (all when None), built on the split's device."""
        if idx is None:
            idx = slice(None)
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.device)
        keys, qpos = self.keys[idx], self.qpos[idx]
        B, N = keys.shape
        if self.filler is not None:
            inputs = self.filler[idx].clone()
        else:
            inputs = torch.zeros(B, self.spec.seq_len, dtype=torch.long, device=self.device)
        inputs[:, 0:2 * N:2] = keys
        inputs[:, 1:2 * N:2] = self.values[idx]
        inputs.scatter_(1, qpos, keys)
        return inputs

    def batch(self, idx: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(inputs, labels)`` [B, seq_len]: labels hold the bound value at each query, IGNORE_INDEX elsewhere."""
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.device)
        inputs = self.inputs(idx)
        sel = slice(None) if idx is None else idx
        labels = torch.full_like(inputs, IGNORE_INDEX)
        labels.scatter_(1, self.qpos[sel], self.values[sel])
        return inputs, labels

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as dense tensors (for inspection and tests; large for long sequences)."""
        return self.batch(None)


@dataclass
class MQARDataset:
    spec: MQARSpec
    train: MQARSplit
    test: MQARSplit
    cache_path: Path | None = None
    from_cache: bool = False


def _atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_file_atomic(path, lambda f: np.savez(f, **arrays), binary=True)


def generate_arrays(spec: MQARSpec) -> dict[str, np.ndarray]:
    """Both splits as flat ``train_*`` / ``test_*`` arrays (what the cache stores)."""
    out = {}
    for split, num, seed in (("train", spec.num_train, spec.seed), ("test", spec.num_test, spec.seed + TEST_SEED_OFFSET)):
        for name, arr in _generate(spec, num, seed).items():
            out[f"{split}_{name}"] = arr
    return out


def check_cached_arrays(spec: MQARSpec, arrays: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless ``arrays`` hold both splits of ``spec``: the right shapes, integer dtypes, and
    examples of the task (keys in [1, V/2) and values in [V/2, V), distinct within an example; query positions even,
    after the pairs, inside the sequence and distinct), so that a damaged or foreign cache is never trained on."""
    N, V, L = spec.num_kv_pairs, spec.vocab_size, spec.seq_len
    ranges = {"keys": (1, V // 2), "values": (V // 2, V), "qpos": (2 * N, L), "filler": (0, V)}
    for split, num in (("train", spec.num_train), ("test", spec.num_test)):
        names = ("keys", "values", "qpos") + (("filler",) if spec.random_non_queries else ())
        for name in names:
            width = L if name == "filler" else N
            field = f"'{split}_{name}'"
            arr = arrays.get(f"{split}_{name}")
            if arr is None or arr.shape != (num, width):
                found = None if arr is None else arr.shape
                raise ValueError(f"{field} has shape {found}, expected {(num, width)}")
            if arr.dtype.kind not in "iu":
                raise ValueError(f"{field} has dtype {arr.dtype}, expected integers")
            if arr.size == 0:
                continue
            low, high = ranges[name]
            if arr.min() < low or arr.max() >= high:
                raise ValueError(f"{field} holds values outside [{low}, {high})")
            if name == "qpos" and (arr % 2).any():
                raise ValueError(f"{field} holds odd positions; queries sit at even offsets after the pairs")
            if name != "filler" and N > 1 and (np.diff(np.sort(arr, axis=1), axis=1) == 0).any():
                raise ValueError(f"{field} repeats an entry within an example")


def load_mqar(spec: MQARSpec, cache_dir: str | os.PathLike | None = ".cache/mqar", device="cpu",
              log=print) -> MQARDataset:
    """Generate (or read from ``cache_dir``) the dataset for ``spec`` and place it on ``device``."""
    path = Path(cache_dir) / spec.cache_name() if cache_dir is not None else None
    arrays, from_cache = None, False
    if path is not None and path.exists():
        try:
            loaded = np.load(path)
            if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array is a foreign file too
                raise ValueError(f"not an .npz archive but {type(loaded).__name__}")
            with loaded as f:
                arrays = {k: f[k] for k in f.files}
            check_cached_arrays(spec, arrays)
            from_cache = True
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a torn or foreign file: regenerate
            arrays = None
            log(f"mqar: ignoring unreadable cache {path}: {e}")
    if arrays is None:
        arrays = generate_arrays(spec)
        if path is not None:
            try:
                _atomic_save_npz(path, arrays)
            except OSError as e:  # a read-only or broken cache folder costs the next run a regeneration, no more
                log(f"mqar: could not cache the data at {path}: {e}")
    splits = {}
    for split in ("train", "test"):
        splits[split] = MQARSplit(spec, {k[len(split) + 1:]: v for k, v in arrays.items() if k.startswith(split + "_")},
                                  device)
    return MQARDataset(spec, splits["train"], splits["test"], path, from_cache)
