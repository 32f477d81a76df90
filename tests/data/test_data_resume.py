"""Interruption: a tokenizer killed mid-run (SIGKILL, or an abrupt exit inside a commit) resumes to identical output.

Test hooks used here (see data_prep/pipeline.py): DATA_PREP_TEST_CHUNK_DELAY_S sleeps after each committed chunk
(so the kill lands mid-run), DATA_PREP_TEST_EXIT_AT_CHUNK=N exits with os._exit after chunk N's shard files are
renamed into place but before the chunk is committed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_data_tokenize import shard_bytes

from data_prep.pipeline import TokenizeConfig, tokenize
from pretrain.data.sources import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(corpus, tok, out, workers=2, **env):
    cmd = [sys.executable, os.path.join(ROOT, "data_prep", "tokenize_pile.py"), "--inputs", *corpus["files"],
           "--tokenizer", tok, "--out", str(out), "--docs-per-shard", "60", "--batch-docs", "8",
           "--workers", str(workers), "--no-progress", "--val-fraction", "0.1"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env},
                            start_new_session=True)


@pytest.fixture(scope="module")
def reference(corpus, tokenizer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    p = cli(corpus, tokenizer_model, out, workers=1)
    assert p.wait(120) == 0, p.stderr.read()
    return shard_bytes(out)


def test_sigkill_mid_run_then_rerun_is_identical(corpus, tokenizer_model, reference, tmp_path):
    out = tmp_path / "out"
    p = cli(corpus, tokenizer_model, out, DATA_PREP_TEST_CHUNK_DELAY_S="0.5")
    deadline = time.time() + 60
    while not os.path.exists(out / ".state" / "chunk-00002.json"):
        assert p.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the tokenizer and its pool workers (they die with it anyway)
    p.wait(30)
    assert not os.path.exists(out / "manifest.json")
    partial = shard_bytes(out)
    assert 0 < len(partial) < len(reference)
    p = cli(corpus, tokenizer_model, out)
    assert p.wait(120) == 0, p.stderr.read()
    assert shard_bytes(out) == reference
    assert b"resumed after" in p.stdout.read()


def test_exit_inside_commit_then_rerun_is_identical(corpus, tokenizer_model, reference, tmp_path):
    out = tmp_path / "out"
    p = cli(corpus, tokenizer_model, out, DATA_PREP_TEST_EXIT_AT_CHUNK="4")
    assert p.wait(120) == 75
    assert not os.path.exists(out / ".state" / "chunk-00004.json") and os.path.exists(out / "train" / "train-00004.idx")
    p = cli(corpus, tokenizer_model, out, workers=1)
    assert p.wait(120) == 0, p.stderr.read()
    assert shard_bytes(out) == reference


def test_a_damaged_index_of_a_committed_chunk_is_tokenized_again(corpus, tokenizer_model, reference, tmp_path):
    """Stopped with chunks 0-2 committed and chunk 1's .idx then cut short: the rerun keeps chunk 0 and redoes the
    rest (only the .bin size was checked, and the split failed at load time)."""
    out = tmp_path / "out"
    p = cli(corpus, tokenizer_model, out, DATA_PREP_TEST_EXIT_AT_CHUNK="3")
    assert p.wait(120) == 75
    index = out / "train" / "train-00001.idx"
    index.write_bytes(index.read_bytes()[:-8])
    p = cli(corpus, tokenizer_model, out, workers=1)
    assert p.wait(120) == 0, p.stderr.read()
    assert shard_bytes(out) == reference
    assert b"resumed after 1 committed chunk(s)" in p.stdout.read()


def test_rerun_with_different_options_refuses(corpus, tokenizer_model, tmp_path):
    out = str(tmp_path / "out")
    kw = dict(out=out, tokenizer=tokenizer_model, workers=1, progress=False, docs_per_shard=300)
    tokenize(TokenizeConfig(inputs=corpus["files"][:1], **kw))
    with pytest.raises(InputError, match="different inputs/options"):
        tokenize(TokenizeConfig(inputs=corpus["files"][:1], max_docs=10, **kw))
    m = tokenize(TokenizeConfig(inputs=corpus["files"][:1], max_docs=10, overwrite=True, **kw))
    assert m["counts"]["documents_read"] == 10
