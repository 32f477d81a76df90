"""Bad input: every case stops with file/line/problem by default, and is skipped and counted with on_error=skip.

A damaged compressed file (truncated or corrupt zstd or gzip) keeps its complete leading documents under skip, the
error names the position reached, and the manifest lists the file as not complete (as it does an empty or
unreadable file); a file with bad lines was read completely.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
import zstandard
from datagen import jsonl_bytes, make_docs, write_zst
from mmidx_reference import read_mmidx

from data_prep.pipeline import TokenizeConfig, tokenize
from pretrain.data.sources import InputError
from pretrain.data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD = make_docs(10, seed=21)
AROUND = make_docs(4, seed=22)  # good documents around the bad line of the bad file
MAX_DOC_BYTES = 1 << 20


def lines(docs):
    return [json.dumps(d).encode() for d in docs]


def with_bad_line(bad: bytes) -> bytes:
    """Good lines 1-2, the bad line 3, good lines 4-5."""
    ls = lines(AROUND)
    return b"\n".join(ls[:2] + [bad] + ls[2:]) + b"\n"


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def build_case(case: str, d) -> tuple[str, str, int | None, list[str], int]:
    """Write the bad input; return (path, reason, line named in the error, texts expected from it, skipped count)."""
    around = [x["text"] for x in AROUND]
    path = str(d / "bad.jsonl.zst")
    line_cases = {
        "invalid_json": b'{"text": "unterminated',
        "deeply_nested": b'{"text": "x", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError
        "not_an_object": b'["text", "in a list"]',
        "missing_text": b'{"meta": {"pile_set_name": "Github"}}',
        "text_not_string": b'{"text": 12345}',
        "invalid_utf8": b'{"text": "bad \xff\xfe bytes"}',
        "surrogate": b'{"text": "lone \\ud800 surrogate"}',
        "empty_text": b'{"text": ""}',
        "whitespace_text": b'{"text": " \\n\\t\\r\\n  "}',  # counted as empty: nothing to learn from
        "blank_line": b"   ",
        "enormous": json.dumps({"text": "x" * (3 * MAX_DOC_BYTES)}).encode(),
    }
    if case in line_cases:
        reason = {"surrogate": "invalid_utf8", "enormous": "too_long", "whitespace_text": "empty_text",
                  "deeply_nested": "invalid_json"}.get(case, case)
        open(path, "wb").write(zst(with_bad_line(line_cases[case])))
        return path, reason, 3, around, 1
    if case == "truncated_zstd":
        docs = make_docs(2000, seed=23)
        blob = zst(jsonl_bytes(docs))
        open(path, "wb").write(blob[: len(blob) // 2])
        return path, "corrupt_compression", None, None, 1  # None: a prefix of docs, checked below
    if case == "truncated_gzip":
        path = str(d / "bad.jsonl.gz")
        docs = make_docs(2000, seed=23)
        blob = gzip.compress(jsonl_bytes(docs))
        open(path, "wb").write(blob[: len(blob) // 2])
        return path, "corrupt_compression", None, None, 1
    if case == "corrupt_gzip":  # a complete member, then bytes that are neither a member nor zero padding
        path = str(d / "bad.jsonl.gz")
        open(path, "wb").write(gzip.compress(jsonl_bytes(AROUND)) + b"\x00garbage that is not a gzip member" * 4)
        return path, "corrupt_compression", 5, around, 1
    if case == "corrupt_zstd":
        open(path, "wb").write(zst(jsonl_bytes(AROUND)) + b"\x00garbage that is not a zstd frame" * 4)
        return path, "corrupt_compression", 5, around, 1
    if case == "empty_file":
        open(path, "wb").write(zst(b""))
        return path, "empty_file", None, [], 1
    if case == "unreadable_file":
        return str(d / "does_not_exist.jsonl.zst"), "unreadable_file", None, [], 1
    raise AssertionError(case)


CASES = ["truncated_zstd", "corrupt_zstd", "truncated_gzip", "corrupt_gzip", "invalid_json", "deeply_nested",
         "not_an_object", "missing_text", "text_not_string", "invalid_utf8", "surrogate", "empty_text",
         "whitespace_text", "blank_line", "enormous", "empty_file", "unreadable_file"]
READER_LEVEL = ("truncated_zstd", "corrupt_zstd", "truncated_gzip", "corrupt_gzip", "empty_file", "unreadable_file")


@pytest.mark.parametrize("mode", ["stop", "skip"])
@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, mode, tokenizer_model, tmp_path):
    good = write_zst(tmp_path / "a_good.jsonl.zst", GOOD)
    bad, reason, line, expected, n_skipped = build_case(case, tmp_path)
    cfg = TokenizeConfig(inputs=[good, bad], out=str(tmp_path / "out"), tokenizer=tokenizer_model, on_error=mode,
                         workers=2, progress=False, docs_per_shard=8, batch_docs=3, max_doc_bytes=MAX_DOC_BYTES)
    if mode == "stop":
        with pytest.raises(InputError) as err:
            tokenize(cfg)
        msg = str(err.value)
        assert bad in msg and reason in msg
        if line is not None:
            assert f"{bad}:{line}:" in msg
        if case.startswith(("truncated", "corrupt")):  # where the damage is
            assert "compressed bytes" in msg and "decompressed" in msg, msg
        assert not os.path.exists(tmp_path / "out" / "manifest.json")
        leftovers = [f for _, _, fs in os.walk(tmp_path / "out") for f in fs if ".tmp-" in f]
        assert leftovers == []
        return
    m = tokenize(cfg)
    c = m["counts"]
    assert c["skipped_by_reason"] == {reason: n_skipped}
    assert c["documents_read"] == c["documents_written"] + c["documents_skipped"]
    tok = Tokenizer(tokenizer_model)
    texts = []
    for shard in m["splits"]["train"]["shards"]:
        texts += [tok.decode(doc[:-1]) for doc in read_mmidx(str(tmp_path / "out" / "train" / shard["name"]))["documents"]]
    good_texts = [x["text"] for x in GOOD]
    assert texts[:10] == good_texts
    if expected is None:  # truncated: every complete line before the cut, in order, and nothing else
        docs = make_docs(2000, seed=23)
        assert 0 < len(texts) - 10 < 2000 and texts[10:] == [x["text"] for x in docs[: len(texts) - 10]]
    else:
        assert texts[10:] == expected
    assert c["documents_written"] == len(texts)
    ex = m["skipped_examples"][0]
    assert ex["reason"] == reason and ex["input"] == bad
    info = {i["path"]: i for i in m["inputs"]}
    assert info[good]["complete"] is True and "error" not in info[good]
    assert info[bad]["complete"] is (case not in READER_LEVEL), info[bad]
    if case in READER_LEVEL:
        assert info[bad]["error"].startswith(reason), info[bad]


def test_cli_reports_error_and_exit_code(tokenizer_model, tmp_path):
    bad = tmp_path / "bad.jsonl.zst"
    bad.write_bytes(zst(with_bad_line(b"{not json")))
    base = [sys.executable, os.path.join(ROOT, "data_prep", "tokenize_pile.py"), "--inputs", str(bad),
            "--tokenizer", tokenizer_model, "--no-progress", "--workers", "1"]
    p = subprocess.run(base + ["--out", str(tmp_path / "o1")], capture_output=True, text=True)
    assert p.returncode == 1
    assert f"error: {bad}:3: invalid_json" in p.stderr
    p = subprocess.run(base + ["--out", str(tmp_path / "o2"), "--on-error", "skip"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "skipped (invalid_json): 1" in p.stdout and "written 4" in p.stdout
