"""End-to-end tokenization: worker-count determinism, lossless round trip, manifest counts, format interop."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import subprocess
import sys

import pytest
from datagen import jsonl_bytes, make_docs, write_zst
from mmidx_reference import read_mmidx

from data_prep.pipeline import TokenizeConfig, tokenize
from pretrain.data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(inputs, out, tok, **kw):
    kw.setdefault("docs_per_shard", 200)
    kw.setdefault("batch_docs", 16)
    return tokenize(TokenizeConfig(inputs=list(inputs), out=str(out), tokenizer=tok, progress=False, **kw))


def shard_bytes(out) -> dict:
    """Relative path → bytes of every .bin/.idx under ``out``."""
    res = {}
    for root, _, files in os.walk(out):
        for f in files:
            if f.endswith((".bin", ".idx")):
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    res[os.path.relpath(p, out)] = fh.read()
    return res


def decoded_split(out, split, tok: Tokenizer) -> list[str]:
    """Documents of a split, read with the independent reader, EOD checked and stripped, decoded."""
    man = json.load(open(os.path.join(out, split, "manifest.json")))
    texts = []
    for shard in man["shards"]:
        ref = read_mmidx(os.path.join(out, split, shard["name"]))
        assert ref["version"] == 1
        assert ref["code"] == (8 if tok.vocab_size < 65500 else 4)
        assert ref["doc_idx"] == list(range(len(ref["sizes"]) + 1))
        assert ref["bin_bytes"] == shard["bin_bytes"] == sum(ref["sizes"]) * ref["width"]
        assert hashlib.sha256(open(os.path.join(out, split, shard["name"] + ".bin"), "rb").read()).hexdigest() == shard["bin_sha256"]
        for doc in ref["documents"]:
            assert doc[-1] == tok.eod_id and tok.eod_id not in doc[:-1]
            texts.append(tok.decode(doc[:-1]))
    return texts


def test_tokenizer_wrapper(tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eod_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 400
    for text in ["", "  two  spaces\n\n\ttab", "▁lit▁eral ▁ ▁▁", "emoji 😀 and 日本語\r\n", "<s></s><pad>", "\x00\x7f"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["a b", "▁c"]) == [tok.encode("a b"), tok.encode("▁c")]


def test_one_vs_two_workers_identical_roundtrip_and_counts(corpus, tokenizer_model, tmp_path):
    tok = Tokenizer(tokenizer_model)
    m1 = run(corpus["files"], tmp_path / "w1", tokenizer_model, workers=1)
    m2 = run(corpus["files"], tmp_path / "w2", tokenizer_model, workers=2, batch_docs=7)  # batching has no effect
    b1, b2 = shard_bytes(tmp_path / "w1"), shard_bytes(tmp_path / "w2")
    assert b1 == b2 and len(b1) == 2 * 4  # 720 records / 200 per shard = 4 train shards
    docs = corpus["docs"]
    assert decoded_split(tmp_path / "w1", "train", tok) == [d["text"] for d in docs]
    c = m1["counts"]
    assert c == m2["counts"]
    assert (c["documents_read"], c["documents_written"], c["documents_skipped"]) == (720, 720, 0)
    assert c["skipped_by_reason"] == {}
    assert c["text_bytes"] == sum(len(d["text"].encode()) for d in docs)
    ref_tokens = sum(len(tok.encode(d["text"])) + 1 for d in docs)
    assert c["tokens"] == ref_tokens == m1["splits"]["train"]["tokens"]
    per_set = collections.Counter(d["meta"]["pile_set_name"] for d in docs)
    assert {k: v["documents_written"] for k, v in m1["per_pile_set"].items()} == dict(per_set)
    assert m1["tokenizer"]["sha256"] == hashlib.sha256(open(tokenizer_model, "rb").read()).hexdigest()
    assert m1["dtype"] == "uint16"
    for info, path in zip(m1["inputs"], corpus["files"]):
        assert info["path"] == path and info["complete"] and info["records"] == 240
        assert info["size_bytes"] == os.path.getsize(path)
        assert info["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    # A completed run is not redone: rerunning only rewrites the manifest.
    m3 = run(corpus["files"], tmp_path / "w1", tokenizer_model, workers=2)
    assert m3["last_run"]["resumed_chunks"] == m1["chunks"] and shard_bytes(tmp_path / "w1") == b1


def test_loader_reads_tokenizer_output(corpus, tokenizer_model, tmp_path):
    from pretrain.data import PackedSequenceDataset, TokenStream

    run(corpus["files"], tmp_path / "o", tokenizer_model, workers=1)
    tok = Tokenizer(tokenizer_model)
    stream = TokenStream(str(tmp_path / "o" / "train"))
    assert stream.num_documents == 720
    all_tokens = [t for d in corpus["docs"] for t in tok.encode(d["text"]) + [tok.eod_id]]
    assert stream.read(0, stream.num_tokens).tolist() == all_tokens
    ds = PackedSequenceDataset([(str(tmp_path / "o" / "train"), 1.0)], seq_len=64, seed=3, return_cu_seqlens=True)
    s = ds[5]
    assert s["input_ids"].shape == (64,) and s["labels"].tolist()[:-1] == s["input_ids"].tolist()[1:]


def test_holdout_fraction_filters_and_max_docs(corpus, tokenizer_model, tmp_path):
    tok = Tokenizer(tokenizer_model)
    docs = corpus["docs"]
    m = run(corpus["files"], tmp_path / "h", tokenizer_model, workers=2, val_fraction=0.1, test_fraction=0.05)
    train = decoded_split(tmp_path / "h", "train", tok)
    val = decoded_split(tmp_path / "h", "val", tok)
    test = decoded_split(tmp_path / "h", "test", tok)
    assert sorted(train + val + test) == sorted(d["text"] for d in docs)
    assert 30 <= len(val) <= 120 and 10 <= len(test) <= 70
    assert m["splits"]["val"]["documents"] == len(val)
    # Same holdout again (keyed hash of the text), different with another seed.
    m2 = run(corpus["files"], tmp_path / "h2", tokenizer_model, workers=1, val_fraction=0.1, test_fraction=0.05)
    assert m2["splits"]["val"] == m["splits"]["val"]
    m3 = run(corpus["files"], tmp_path / "h3", tokenizer_model, workers=1, val_fraction=0.1, split_seed=7)
    assert m3["splits"]["val"]["tokens"] != m["splits"]["val"]["tokens"]

    m = run(corpus["files"], tmp_path / "f", tokenizer_model, workers=1, exclude_sets=["Github", "ArXiv"], max_docs=300)
    kept = [d for d in docs[:300] if d["meta"]["pile_set_name"] not in ("Github", "ArXiv")]
    assert decoded_split(tmp_path / "f", "train", tok) == [d["text"] for d in kept]
    c = m["counts"]
    assert c["documents_read"] == 300 and c["documents_written"] == len(kept)
    assert c["skipped_by_reason"] == {"filtered_set": 300 - len(kept)}
    assert m["inputs"][1]["complete"] is False and m["inputs"][2]["records"] == 0

    m = run(corpus["files"], tmp_path / "i", tokenizer_model, workers=1, include_sets=["Github"])
    assert m["counts"]["documents_written"] == sum(d["meta"]["pile_set_name"] == "Github" for d in docs)


def test_separate_val_inputs_gzip_plain_and_merge(tokenizer_model, tmp_path):
    tok = Tokenizer(tokenizer_model)
    train_docs, val_docs = make_docs(50, seed=5), make_docs(20, seed=6)
    (tmp_path / "in").mkdir()
    plain = tmp_path / "in" / "a.jsonl"
    plain.write_bytes(jsonl_bytes(train_docs[:25]))
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wb") as f:
        f.write(jsonl_bytes(train_docs[25:]))
    val = write_zst(tmp_path / "val.jsonl.zst", val_docs)
    m = run([str(tmp_path / "in")], tmp_path / "o", tokenizer_model, workers=2, val_inputs=[val], docs_per_shard=30,
            merge=True)
    assert decoded_split(tmp_path / "o", "train", tok) == [d["text"] for d in train_docs]
    assert decoded_split(tmp_path / "o", "val", tok) == [d["text"] for d in val_docs]
    assert [i["group"] for i in m["inputs"]] == ["main", "main", "val"]
    merged = read_mmidx(str(tmp_path / "o" / "train"))
    assert [tok.decode(d[:-1]) for d in merged["documents"]] == [d["text"] for d in train_docs]
    assert m["merged"]["train"]["documents"] == 50


def test_huggingface_streaming_source_matches_file_input(tokenizer_model, tmp_path):
    pytest.importorskip("datasets")
    docs = make_docs(40, seed=8)
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(docs))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    run([str(path)], tmp_path / "file", tokenizer_model, workers=1)
    m = run([f"hf:json?data_files={path}&split=train"], tmp_path / "hf", tokenizer_model, workers=2)
    assert m["counts"]["documents_written"] == 40
    assert shard_bytes(tmp_path / "hf") == shard_bytes(tmp_path / "file")


def test_cli_by_path_and_as_module(corpus, tokenizer_model, tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    args = ["--inputs", corpus["files"][0], "--tokenizer", tokenizer_model, "--workers", "2", "--no-progress"]
    p1 = subprocess.run([sys.executable, os.path.join(ROOT, "data_prep", "tokenize_pile.py"), *args,
                         "--out", str(tmp_path / "a")], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p1.returncode == 0, p1.stderr
    assert "documents read 240  written 240  skipped 0" in p1.stdout
    p2 = subprocess.run([sys.executable, "-m", "data_prep.tokenize_pile", *args, "--out", str(tmp_path / "b")],
                        capture_output=True, text=True, cwd=ROOT, env=env)
    assert p2.returncode == 0, p2.stderr
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
