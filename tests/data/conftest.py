"""Shared fixtures for the data tests: synthetic Pile-format corpora and a small trained tokenizer."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datagen import make_docs, write_zst  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    """A 400-piece BPE model trained with data_prep.train_tokenizer on a synthetic corpus."""
    from data_prep.train_tokenizer import train

    d = tmp_path_factory.mktemp("tok")
    src = write_zst(d / "tok_train.jsonl.zst", make_docs(600, seed=99))
    out = str(d / "tok400.model")
    train([src], out, vocab_size=400, threads=2)
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """Three .jsonl.zst files (one multi-frame) of 240 documents each, plus the documents in order."""
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(720, seed=1)
    files = []
    for i in range(3):
        files.append(write_zst(d / f"{i:02d}.jsonl.zst", docs[i * 240:(i + 1) * 240], frames=3 if i == 1 else 1))
    return {"dir": str(d), "files": files, "docs": docs}
