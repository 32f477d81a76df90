"""Synthetic token shards for tests, smoke runs and throughput benchmarks (no tokenizer needed).

Documents follow a noisy affine recurrence ``x_{t+1} = (a·x_t + c) mod V`` with per-document (a, c), so a model
can learn them (the loss falls well below log V) while the data stays cheap to generate at any size.

    python -m pretrain.data.synthetic OUT_PREFIX --tokens 2000000 --vocab 50304
"""

from __future__ import annotations

import argparse

import numpy as np

from pretrain.data.indexed import IndexedDatasetWriter, token_dtype


def write_synthetic_shard(prefix: str, num_tokens: int, vocab_size: int, seed: int = 0, eod: int = 0,
                          doc_len: tuple[int, int] = (16, 400), noise: float = 0.05) -> dict:
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, token_dtype(vocab_size))
    written = 0
    try:
        while written < num_tokens:
            n = int(rng.integers(doc_len[0], doc_len[1] + 1))
            a, c = int(rng.integers(1, 8)), int(rng.integers(1, vocab_size))
            x = np.empty(n, dtype=np.int64)
            x[0] = rng.integers(1, vocab_size)
            for t in range(1, n - 1):
                x[t] = (a * x[t - 1] + c) % vocab_size
            flip = rng.random(n) < noise
            x[flip] = rng.integers(1, vocab_size, size=int(flip.sum()))
            x[x == eod] = 1
            x[-1] = eod
            writer.add_document(x)
            written += n
        return writer.finalize()
    except BaseException:
        writer.abort()
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description="write a synthetic .bin/.idx shard")
    p.add_argument("prefix")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_synthetic_shard(a.prefix, a.tokens, a.vocab, a.seed))


if __name__ == "__main__":
    main()
