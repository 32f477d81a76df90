"""Synthetic Pile-format corpora for the data tests."""

from __future__ import annotations

import json
import os
import random

import zstandard

SETS = ["Pile-CC", "Github", "ArXiv", "StackExchange", "Wikipedia (en)"]
_WORDS = ("the of and to in is for on that with as by this from at be are it an or was which we can data model "
          "train token sequence attention linear kernel feature map résumé naïve café Ω≈ç√ 日本語 テスト 😀 🚀 "
          "def return import class self None True x=1; y[i] += 2 {} () <s> </s> <pad> \u2581 ▁▁").split(" ")


def make_text(rng: random.Random, n_words: int | None = None) -> str:
    n = n_words if n_words is not None else rng.randint(1, 120)
    parts = []
    for _ in range(n):
        parts.append(rng.choice(_WORDS))
        parts.append(rng.choice([" ", " ", " ", "  ", "\n", "\t", "\n\n    ", "\r\n", ", "]))
    text = "".join(parts)
    if rng.random() < 0.1:
        text = "  " + text  # leading whitespace must survive
    return text


def make_docs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": make_text(rng), "meta": {"pile_set_name": rng.choice(SETS)}} for _ in range(n)]


def jsonl_bytes(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d, ensure_ascii=rng_ascii(i)) + "\n" for i, d in enumerate(docs)).encode("utf-8")


def rng_ascii(i: int) -> bool:
    return i % 2 == 0  # mix escaped and raw UTF-8 JSON


def write_zst(path, docs: list[dict] | None = None, raw: bytes | None = None, frames: int = 1) -> str:
    data = jsonl_bytes(docs) if raw is None else raw
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    if frames > 1:  # several concatenated frames, as some tools write them
        step = -(-len(data) // frames)
        blob = b"".join(cctx.compress(data[i:i + step]) for i in range(0, len(data), step))
    else:
        blob = cctx.compress(data)
    with open(path, "wb") as f:
        f.write(blob)
    return str(path)
