"""Every input the user names contributes or is reported; a rerun notices inputs edited in place; the tokenizer
trainer names the file and the cause instead of failing inside SentencePiece."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys

import pytest
from datagen import jsonl_bytes, make_docs, write_zst
from test_data_tokenize import decoded_split, shard_bytes

from data_prep.pipeline import TokenizeConfig, tokenize
from pretrain.data.sources import InputError
from pretrain.data.tokenizer import Tokenizer
from data_prep.train_tokenizer import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(inputs, out, tok, **kw):
    return tokenize(TokenizeConfig(inputs=list(inputs), out=str(out), tokenizer=tok, progress=False, workers=1, **kw))


# --- named inputs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alone", [True, False], ids=["alone", "among_others"])
def test_directory_without_input_files_is_reported(tokenizer_model, tmp_path, alone):
    good = write_zst(tmp_path / "good.jsonl.zst", make_docs(5, seed=1))
    empty = tmp_path / "no_inputs_here"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an input")
    with pytest.raises(InputError, match=f"^{empty}: directory holds no input file \\(none ends in .jsonl.zst"):
        run([str(empty)] if alone else [good, str(empty)], tmp_path / "out", tokenizer_model)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(InputError, match=f"^{empty}: directory holds no input file"):
        run([good], tmp_path / "out2", tokenizer_model, val_inputs=[str(empty)])


def test_multi_member_gzip_with_zero_padding_is_read_whole(tokenizer_model, tmp_path):
    docs = make_docs(30, seed=3)
    path = tmp_path / "multi.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(docs[:10])) + gzip.compress(jsonl_bytes(docs[10:])) + b"\0" * 1024)
    m = run([str(path)], tmp_path / "out", tokenizer_model)
    assert decoded_split(tmp_path / "out", "train", Tokenizer(tokenizer_model)) == [d["text"] for d in docs]
    assert m["inputs"][0]["complete"] is True and m["counts"]["skipped_by_reason"] == {}


# --- inputs edited in place ---------------------------------------------------------------------------------------
def edit_keeping_size_and_mtime(path, marker: bytes, replacement: bytes):
    """Replace the first ``marker`` with ``replacement`` (same length) and put the old mtime back, as a careless
    copy tool or an editor that preserves timestamps would: only the content tells."""
    assert len(marker) == len(replacement)
    st = os.stat(path)
    data = open(path, "rb").read()
    assert marker in data
    with open(path, "wb") as f:
        f.write(data.replace(marker, replacement, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size


def plain_inputs(d, n_files=2, docs_per_file=100):
    paths = []
    for i in range(n_files):
        docs = make_docs(docs_per_file, seed=40 + i)
        docs[0]["text"] = f"FILE {i} FIRST DOCUMENT"  # a known place to edit
        p = d / f"{i:02d}.jsonl"
        p.write_bytes(jsonl_bytes(docs))
        paths.append(str(p))
    return paths


def test_finished_run_rerun_refuses_an_input_edited_in_place(tokenizer_model, tmp_path):
    inputs = plain_inputs(tmp_path)
    out = tmp_path / "out"
    run(inputs, out, tokenizer_model, docs_per_shard=30)
    before = shard_bytes(out)
    edit_keeping_size_and_mtime(inputs[1], b"FILE 1 FIRST", b"FILE 1 EDITD")
    with pytest.raises(InputError, match=f"^{inputs[1]}: changed since the earlier run in {out} wrote its shards "
                                         "\\(sha256 of its content differs\\); restore it, or use --overwrite"):
        run(inputs, out, tokenizer_model, docs_per_shard=30)
    assert shard_bytes(out) == before, "nothing is rewritten"
    m = run(inputs, out, tokenizer_model, docs_per_shard=30, overwrite=True)
    assert "FILE 1 EDITD DOCUMENT" in decoded_split(out, "train", Tokenizer(tokenizer_model))
    assert m["inputs"][1]["sha256"] != m["inputs"][0]["sha256"]


def cli(inputs, tok, out, **env):
    cmd = [sys.executable, os.path.join(ROOT, "data_prep", "tokenize_pile.py"), "--inputs", *inputs, "--tokenizer",
           tok, "--out", str(out), "--docs-per-shard", "30", "--workers", "1", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize("edited", [0, 1], ids=["finished_input", "input_in_progress"])
def test_interrupted_run_refuses_an_input_edited_in_place(tokenizer_model, tmp_path, edited):
    """Killed inside chunk 4 (records 120-149): chunks 0-3 are committed, input 0 (records 0-99) is finished and
    input 1 is being read. Editing either one's already-used bytes, size and mtime kept, makes the rerun refuse;
    without an edit the rerun completes to the uninterrupted output."""
    inputs = plain_inputs(tmp_path)
    ref = tmp_path / "ref"
    assert cli(inputs, tokenizer_model, ref).returncode == 0
    out = tmp_path / "out"
    assert cli(inputs, tokenizer_model, out, DATA_PREP_TEST_EXIT_AT_CHUNK="4").returncode == 75
    assert (out / ".state" / "chunk-00003.json").exists() and not (out / ".state" / "chunk-00004.json").exists()
    edit_keeping_size_and_mtime(inputs[edited], f"FILE {edited} FIRST".encode(), f"FILE {edited} EDITD".encode())
    p = cli(inputs, tokenizer_model, out)
    assert p.returncode == 1 and p.stderr.startswith(f"error: {inputs[edited]}: changed since the earlier run"), p.stderr
    edit_keeping_size_and_mtime(inputs[edited], f"FILE {edited} EDITD".encode(), f"FILE {edited} FIRST".encode())
    p = cli(inputs, tokenizer_model, out)
    assert p.returncode == 0, p.stderr
    assert shard_bytes(out) == shard_bytes(ref)


# --- tokenizer training -------------------------------------------------------------------------------------------
def test_train_tokenizer_names_missing_and_empty_inputs(tmp_path):
    missing = str(tmp_path / "missing.jsonl.zst")
    empty = write_zst(tmp_path / "empty.jsonl.zst", raw=b"")
    blank = write_zst(tmp_path / "blank.jsonl.zst", [{"text": "  \n"}, {"text": ""}, {"meta": {}}])
    out = str(tmp_path / "tok.model")
    with pytest.raises(InputError, match=f"^cannot read 1 input\\(s\\): {missing}: No such file or directory$"):
        train([empty, missing], out, vocab_size=300)
    with pytest.raises(InputError, match=f"^no usable document to train on in {empty} \\(1 empty_file; e.g. {empty}: "
                                         "empty_file \\(file contains no documents\\)\\)$"):
        train([empty], out, vocab_size=300)
    with pytest.raises(InputError, match=f"^no usable document to train on in {blank} \\(2 empty_text, 1 missing_text; "
                                         f"e.g. {blank}:1: empty_text; {blank}:2: empty_text; {blank}:3: missing_text"):
        train([blank], out, vocab_size=300)
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="directory holds no input file"):
        train([str(tmp_path / "dir")], out, vocab_size=300)
    assert not os.path.exists(out)

    p = subprocess.run([sys.executable, os.path.join(ROOT, "data_prep", "train_tokenizer.py"), "--inputs", empty,
                        "--out", out, "--vocab-size", "300"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith(f"error: no usable document to train on in {empty}"), p.stderr
    assert "INTERNAL" not in p.stderr.upper() and "trainer_interface" not in p.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"vocab_size": 0}, "--vocab-size must be >= 1, got 0"),  # SentencePiece's internal message before
    ({"sample_docs": 0}, "--sample-docs must be >= 1, got 0"),  # reported "(no records)"
    ({"sample_bytes": -1}, "--sample-bytes must be >= 1"),
    ({"character_coverage": 1.5}, "--character-coverage must be in (0, 1]"),
    ({"out": "tok.json"}, "must end in .model"),  # its .json side file would have replaced the model
])
def test_train_tokenizer_refuses_bad_settings_before_reading(tmp_path, kwargs, message):
    src = write_zst(tmp_path / "in.jsonl.zst", [{"text": "some text here"}])
    out = str(tmp_path / kwargs.pop("out", "tok.model"))
    with pytest.raises(ValueError, match=re.escape(message)):
        train([src], out, **{"vocab_size": 300, **kwargs})
    assert not os.path.exists(out)
