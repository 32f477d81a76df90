"""Edge cases of the data pipeline: resuming exactly at --max-docs, an input named in two groups, errors that name
the field, token ids that do not fit the shard dtype, the loader's data path and resume checks, the tokenizer
trainer's bad lines and limits, a Hugging Face source failing while streaming."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from datagen import jsonl_bytes, make_docs, write_zst
from mmidx_reference import read_mmidx
from test_data_tokenize import shard_bytes

from data_prep.pipeline import TokenizeConfig, tokenize
from data_prep.train_tokenizer import train
from data_prep.workers import init_worker, process_batch
from pretrain.data import IndexedDatasetWriter, PackedSequenceDataset
from pretrain.data.sources import InputError
from pretrain.data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(inputs, tok, out, *args, **env):
    cmd = [sys.executable, os.path.join(ROOT, "data_prep", "tokenize_pile.py"), "--inputs", *inputs, "--tokenizer",
           tok, "--out", str(out), "--workers", "1", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


# --- tokenize_pile ------------------------------------------------------------------------------------------------
def test_resume_exactly_at_max_docs_matches_uninterrupted_manifest(tokenizer_model, tmp_path):
    """--max-docs 60 with 30 records per shard: the limit falls on a chunk boundary, so the input's end (read as the
    61st line) belongs to the last, empty chunk. Killed while committing it, the rerun must skip the 60 records it
    already used and describe the input as the uninterrupted run does (60 records read, not 0)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(100, seed=31)))
    opts = ("--max-docs", "60", "--docs-per-shard", "30")
    assert cli([str(path)], tokenizer_model, tmp_path / "ref", *opts).returncode == 0
    out = tmp_path / "out"
    assert cli([str(path)], tokenizer_model, out, *opts, DATA_PREP_TEST_EXIT_AT_CHUNK="2").returncode == 75
    assert (out / ".state" / "chunk-00001.json").exists() and not (out / ".state" / "chunk-00002.json").exists()
    p = cli([str(path)], tokenizer_model, out, *opts)
    assert p.returncode == 0, p.stderr
    ref, got = (json.load(open(d / "manifest.json")) for d in (tmp_path / "ref", out))
    assert got["inputs"] == ref["inputs"] and ref["inputs"][0]["records"] == 60
    assert got["counts"] == ref["counts"] and shard_bytes(out) == shard_bytes(tmp_path / "ref")


@pytest.mark.parametrize("held_out", ["val_inputs", "test_inputs"])
def test_input_named_in_two_groups_is_refused(tokenizer_model, tmp_path, held_out):
    """The same file as a training input (here through its directory) and as held-out input would put every one of
    its documents in both splits."""
    (tmp_path / "in").mkdir()
    both = write_zst(tmp_path / "in" / "a.jsonl.zst", make_docs(5, seed=2))
    option = "--" + held_out.replace("_", "-")
    with pytest.raises(InputError, match=f"^{both}: given in both --inputs and {option}; its documents would be"):
        tokenize(TokenizeConfig(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), tokenizer=tokenizer_model,
                                progress=False, workers=1, **{held_out: [both]}))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_input_named_in_two_groups_through_a_symlink_is_refused(tokenizer_model, tmp_path):
    (tmp_path / "in").mkdir()
    write_zst(tmp_path / "in" / "a.jsonl.zst", make_docs(5, seed=2))
    os.symlink(tmp_path / "in", tmp_path / "link")
    with pytest.raises(InputError, match="given in both --inputs and --val-inputs"):
        tokenize(TokenizeConfig(inputs=[str(tmp_path / "in")], val_inputs=[str(tmp_path / "link" / "a.jsonl.zst")],
                                out=str(tmp_path / "out"), tokenizer=tokenizer_model, progress=False, workers=1))


def test_a_file_named_twice_through_a_symlink_is_read_once(tokenizer_model, tmp_path):
    path = write_zst(tmp_path / "a.jsonl.zst", make_docs(7, seed=3))
    os.symlink(path, tmp_path / "alias.jsonl.zst")
    m = tokenize(TokenizeConfig(inputs=[path, str(tmp_path / "alias.jsonl.zst")], out=str(tmp_path / "out"),
                                tokenizer=tokenizer_model, progress=False, workers=1))
    assert m["counts"]["documents_read"] == 7 and len(m["inputs"]) == 1


@pytest.mark.parametrize("overwrite", [False, True])
def test_inputs_inside_what_the_run_writes_are_refused_and_kept(tokenizer_model, tmp_path, overwrite):
    """--out over the corpus folder whose train/ holds the inputs: the shards would land among them, and --overwrite
    deleted them (the raw data lost). Inputs elsewhere under --out are fine."""
    (tmp_path / "pile" / "train").mkdir(parents=True)
    raw = write_zst(tmp_path / "pile" / "train" / "00.jsonl.zst", make_docs(6, seed=4))
    with pytest.raises(InputError, match=r"inside .*pile/train, which this run writes"):
        tokenize(TokenizeConfig(inputs=[str(tmp_path / "pile" / "train")], out=str(tmp_path / "pile"),
                                tokenizer=tokenizer_model, progress=False, workers=1, overwrite=overwrite))
    assert os.path.exists(raw) and not (tmp_path / "pile" / "manifest.json").exists()
    (tmp_path / "pile" / "raw").mkdir()
    os.replace(raw, tmp_path / "pile" / "raw" / "00.jsonl.zst")
    m = tokenize(TokenizeConfig(inputs=[str(tmp_path / "pile" / "raw")], out=str(tmp_path / "pile"),
                                tokenizer=tokenizer_model, progress=False, workers=1, overwrite=overwrite))
    assert m["counts"]["documents_written"] == 6 and (tmp_path / "pile" / "raw" / "00.jsonl.zst").exists()


def test_overwrite_refuses_the_tokenizer_it_would_delete(tokenizer_model, tmp_path):
    path = write_zst(tmp_path / "a.jsonl.zst", make_docs(5, seed=5))
    cfg = dict(inputs=[path], out=str(tmp_path / "out"), progress=False, workers=1)
    tokenize(TokenizeConfig(tokenizer=tokenizer_model, **cfg))
    copy = str(tmp_path / "out" / "tokenizer.model")
    assert tokenize(TokenizeConfig(tokenizer=copy, **cfg))["counts"]["documents_written"] == 5  # a rerun may use it
    with pytest.raises(InputError, match="--overwrite deletes it"):
        tokenize(TokenizeConfig(tokenizer=copy, overwrite=True, **cfg))
    assert os.path.exists(copy)


@pytest.mark.parametrize("set_key, expected", [("", {"<none>": 6}), ("meta", {"<none>": 6}),
                                                ("meta.pile_set_name", {"Books": 3, "<none>": 3})])
def test_subset_names_are_names_or_none(tokenizer_model, tmp_path, set_key, expected):
    """--set-key '' (no subsets) and a key holding an object count every document as <none>; they named one subset
    per document before (the record or object as text, text included), so the manifest grew with the corpus."""
    path = tmp_path / "in.jsonl"
    docs = [{"text": f"doc {i} text", "meta": {"pile_set_name": "Books"} if i % 2 else {"other": i}} for i in range(6)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    m = tokenize(TokenizeConfig(inputs=[str(path)], out=str(tmp_path / "out"), tokenizer=tokenizer_model,
                                set_key=set_key, progress=False, workers=1))
    assert {k: v["documents_written"] for k, v in m["per_pile_set"].items()} == expected


@pytest.mark.parametrize("case", ["empty_text", "surrogate"])
def test_text_errors_name_the_field(tokenizer_model, tmp_path, case):
    """With --text-key content, a bad document's error names the field 'content' (as missing_text's does)."""
    bad = {"empty_text": b'{"content": " \\n "}', "surrogate": b'{"content": "a \\udc00 b"}'}[case]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"content": "fine"}\n' + bad + b"\n")
    with pytest.raises(InputError) as err:
        tokenize(TokenizeConfig(inputs=[str(path)], out=str(tmp_path / "out"), tokenizer=tokenizer_model,
                                text_key="content", progress=False, workers=1))
    assert str(err.value).startswith(f"{path}:2: "), err.value
    assert "'content'" in str(err.value), err.value


def test_too_long_dataset_row_names_the_field(tokenizer_model):
    """A file line is cut at --max-doc-bytes before it is parsed; a dataset row (hf:) is checked after: its error
    names the field too."""
    options = {"text_key": "content", "set_key": "", "include_sets": None, "exclude_sets": None, "val_fraction": 0.0,
               "test_fraction": 0.0, "split_seed": 0, "max_doc_bytes": 100, "prepend_bos": False}
    init_worker(b"", options, tok=Tokenizer(tokenizer_model))
    (doc,) = process_batch([(0, 1, "main", {"content": "y" * 101}, None, None)])["docs"]
    assert doc[4] == "too_long" and "'content'" in doc[5], doc


# --- shard writer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [70_000, -1])
def test_writer_refuses_token_ids_outside_the_dtype(tmp_path, token):
    """numpy's astype wraps 70000 to 4464 in uint16: the shard would hold a different, valid-looking token."""
    w = IndexedDatasetWriter(tmp_path / "s", "uint16")
    shard = re.escape(str(tmp_path / "s.bin"))
    with pytest.raises(ValueError, match=f"^{shard}: token id {token} does not fit the shard dtype uint16"):
        w.add_document(np.array([5, token, 3], dtype=np.int64))
    with pytest.raises(ValueError, match=f"^{shard}: a token id does not fit the shard dtype uint16"):
        w.add_document([5, token, 3])
    assert w.num_documents == 0
    w.abort()
    # A vocabulary beyond uint16 gets int32 shards, which hold such ids as they are.
    w = IndexedDatasetWriter(tmp_path / "big", "int32")
    w.add_document(np.array([5, 70_000, 3], dtype=np.int64))
    w.add_documents([65_535, 65_536, 3, 99_999, 3], [3, 2])
    w.finalize()
    assert read_mmidx(str(tmp_path / "big"))["documents"] == [[5, 70_000, 3], [65_535, 65_536, 3], [99_999, 3]]


# --- loader -------------------------------------------------------------------------------------------------------
def write_split(d, n_docs=40):
    rng = np.random.default_rng(0)
    w = IndexedDatasetWriter(d / "train-00000", "uint16")
    for _ in range(n_docs):
        w.add_document(np.append(rng.integers(4, 100, 20), 3))
    w.finalize()


def test_loader_path_with_a_manifest_that_is_not_a_shard_list(tmp_path):
    """The tokenizer's output root (its manifest describes the run, it lists no shards) is named with the remedy,
    not read as an empty dataset; a damaged split manifest is named too."""
    write_split(tmp_path / "train")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "x", "splits": {"train": {}}}))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'manifest.json'}: not a shard list .*give a split directory"):
        PackedSequenceDataset([str(tmp_path)], seq_len=16)
    (tmp_path / "train" / "manifest.json").write_text('{"shards": [{"name": "train-00000"')
    with pytest.raises(ValueError, match=f"^{tmp_path / 'train' / 'manifest.json'}: not a shard list"):
        PackedSequenceDataset([str(tmp_path / "train")], seq_len=16)
    (tmp_path / "train" / "manifest.json").write_text('{"shards": [{"name": "train-00000"}]}')
    assert PackedSequenceDataset([str(tmp_path / "train")], seq_len=16).num_sequences == [(40 * 21 - 1) // 16]


def test_resume_with_another_mix_block_is_refused(tmp_path):
    """mix_block decides which dataset each sample comes from: resuming with another one would silently change the
    batches that follow. With a single dataset it has no effect, and a resume is allowed."""
    write_split(tmp_path / "a")
    write_split(tmp_path / "b", n_docs=25)
    mix = [(str(tmp_path / "a"), 2.0), (str(tmp_path / "b"), 1.0)]
    saved = PackedSequenceDataset(mix, seq_len=8, seed=3, mix_block=30).state_dict(consumed_samples=12)
    other = PackedSequenceDataset(mix, seq_len=8, seed=3, mix_block=60)
    assert [other.locate(i) for i in range(12, 40)] != [PackedSequenceDataset(mix, seq_len=8, seed=3, mix_block=30)
                                                        .locate(i) for i in range(12, 40)]
    with pytest.raises(ValueError, match="loader state mismatch for 'mix_block': checkpoint 30, now 60"):
        other.load_state_dict(saved)
    single = PackedSequenceDataset([str(tmp_path / "a")], seq_len=8, seed=3, mix_block=30)
    resumed = PackedSequenceDataset([str(tmp_path / "a")], seq_len=8, seed=3, mix_block=60)
    resumed.load_state_dict(single.state_dict(consumed_samples=12))
    assert [resumed.locate(i) for i in range(12, 40)] == [single.locate(i) for i in range(12, 40)]


# --- tokenizer training -------------------------------------------------------------------------------------------
def test_train_tokenizer_skips_a_deeply_nested_line(tmp_path):
    """A line nested deeper than Python's recursion limit is invalid JSON, counted like any other bad line."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(50, seed=4)) + b"[" * 100_000 + b"\n")
    info = train([str(path)], str(tmp_path / "tok.model"), vocab_size=400, threads=1)
    assert info["sample"]["skipped_by_reason"] == {"invalid_json": 1} and info["sample"]["documents"] == 50


def test_train_tokenizer_max_sentence_bytes_below_sentencepiece_minimum_is_refused(tmp_path):
    """SentencePiece takes no sentence limit under 10 bytes; the option is checked before any input is read, with
    the option's name, instead of SentencePiece's internal assertion after sampling."""
    path = write_zst(tmp_path / "in.jsonl.zst", make_docs(20, seed=5))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data_prep", "train_tokenizer.py"), "--inputs", path,
                        "--out", str(tmp_path / "tok.model"), "--vocab-size", "300", "--max-sentence-bytes", "9"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr == "error: --max-sentence-bytes must be at least 10, got 9\n", p.stderr
    assert not (tmp_path / "tok.model").exists()


# --- Hugging Face sources -----------------------------------------------------------------------------------------
def test_huggingface_source_failing_while_streaming_is_named(tokenizer_model, tmp_path, monkeypatch):
    """A dataset whose reader fails part-way (here pyarrow on a bad JSON line) stops the run naming the source and
    the row, as a damaged file does, instead of escaping as the reader's own exception; under skip it is counted
    and the input is not complete. An empty dataset is not complete either."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(3, seed=6)) + b"{not json\n")
    spec = f"hf:json?data_files={path}&split=train"
    kw = dict(tokenizer=tokenizer_model, progress=False, workers=1)
    with pytest.raises(InputError, match=f"^{re.escape(spec)}:[0-9]+: unreadable_file: reading row [0-9]+ failed: "):
        tokenize(TokenizeConfig(inputs=[spec], out=str(tmp_path / "stop"), **kw))
    m = tokenize(TokenizeConfig(inputs=[spec], out=str(tmp_path / "skip"), on_error="skip", **kw))
    assert m["counts"]["skipped_by_reason"] == {"unreadable_file": 1}
    assert m["inputs"][0]["complete"] is False and m["inputs"][0]["error"].startswith("unreadable_file: reading row")


def test_shards_without_a_manifest_sort_with_numbers_compared_as_numbers(tmp_path):
    # past 99999 chunks the five-digit shard names grow a sixth digit: train-100000 must follow train-99999
    from pretrain.data.packed import resolve_shards

    for k in (100000, 99999, 2):
        writer = IndexedDatasetWriter(tmp_path / f"train-{k:05d}", "uint16")
        writer.add_document(np.arange(5))
        writer.finalize()
    names = [os.path.basename(p) for p in resolve_shards(tmp_path)]
    assert names == ["train-00002", "train-99999", "train-100000"]
    assert [os.path.basename(p) for p in resolve_shards(str(tmp_path / "train-*"))] == names


def test_listed_shards_are_checked_on_load_and_by_verify_shards(tokenizer_model, tmp_path):
    """Loading stats every shard its manifest lists (a truncated or missing .bin is named at once);
    data_prep/verify_shards.py also checks the bytes (a same-size change is caught only there)."""
    from data_prep.verify_shards import main as verify_main
    from pretrain.data.packed import resolve_shards

    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(90, seed=5)))
    out = tmp_path / "out"
    assert cli([str(path)], tokenizer_model, out, "--docs-per-shard", "30").returncode == 0
    split = out / "train"
    shards = resolve_shards(split)
    assert len(shards) == 3 and verify_main([str(split), "--no-progress"]) == 0
    bin1 = shards[1] + ".bin"
    data = open(bin1, "rb").read()
    open(bin1, "wb").write(data[:1] + bytes([data[1] ^ 1]) + data[2:])  # same size, one bit flipped
    assert resolve_shards(split) == shards
    assert verify_main([str(split), "--no-progress"]) == 1
    open(bin1, "wb").write(data[:-2])  # truncated
    with pytest.raises(ValueError, match=r"train-00001\.bin: .* bytes, but .*manifest\.json records"):
        resolve_shards(split)
    os.remove(bin1)
    with pytest.raises(FileNotFoundError, match="lists shard 'train-00001'"):
        resolve_shards(split)
    assert verify_main([str(split), "--no-progress"]) == 1


def test_the_merged_file_of_a_split_is_checked_on_load_and_by_verify_shards(tokenizer_model, tmp_path, capsys):
    """--merge writes OUT/train.bin beside OUT/train/: OUT/train names the verified shards (it named the merged file,
    which verify_shards did not check, so a same-size change there was trained on); OUT/train.idx names the merged
    file, whose size is checked on load and whose bytes verify_shards checks against OUT/manifest.json."""
    from data_prep.verify_shards import main as verify_main
    from pretrain.data.packed import resolve_shards

    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(60, seed=7)))
    out = tmp_path / "out"
    assert cli([str(path)], tokenizer_model, out, "--docs-per-shard", "30", "--merge").returncode == 0
    split, merged = out / "train", str(out / "train")
    assert [os.path.basename(p) for p in resolve_shards(split)] == ["train-00000", "train-00001"]
    assert resolve_shards(str(out / "train.idx")) == [merged]
    ds = PackedSequenceDataset([merged + ".idx"], 16)
    assert ds.streams[0].read(0, ds.streams[0].num_tokens).tolist() == \
        PackedSequenceDataset([str(split)], 16).streams[0].read(0, ds.streams[0].num_tokens).tolist()
    assert verify_main([str(split), "--no-progress"]) == 0
    data = open(merged + ".bin", "rb").read()
    open(merged + ".bin", "wb").write(data[:1] + bytes([data[1] ^ 1]) + data[2:])  # same size, one bit flipped
    capsys.readouterr()
    assert verify_main([str(split), "--no-progress"]) == 1
    assert f"{merged}.bin: SHA-256 differs" in capsys.readouterr().out
    open(merged + ".bin", "wb").write(data[:-2])  # truncated
    with pytest.raises(ValueError, match=r"train\.bin: .* bytes, but .*manifest\.json records"):
        resolve_shards(str(out / "train.idx"))


def test_verify_shards_catches_an_index_of_another_shard(tokenizer_model, tmp_path, capsys):
    """Another (shorter) shard's .idx opens against a longer .bin: verify_shards must not call the split verified
    when the loader then refuses it."""
    import shutil

    from data_prep.verify_shards import main as verify_main
    from pretrain.data.packed import resolve_shards

    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(70, seed=6)))
    out = tmp_path / "out"
    assert cli([str(path)], tokenizer_model, out, "--docs-per-shard", "30").returncode == 0
    shards = resolve_shards(out / "train")  # 30, 30, 10 documents
    shutil.copyfile(shards[2] + ".idx", shards[0] + ".idx")
    capsys.readouterr()
    assert verify_main([str(out / "train"), "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert "train-00000.idx: 10 documents, the manifest records 30" in report and "back to back" in report


def test_a_split_of_an_unfinished_tokenization_is_refused(tokenizer_model, tmp_path):
    """Killed after its first chunk, tokenize_pile leaves OUT/train without manifest.json (and OUT/.state): the
    loader refused nothing and trained on part of the corpus; the trainer's path check now names it."""
    from pretrain.data.packed import resolve_shards
    from pretrain.training.config import DataConfig, DataSource, RunConfig, check_paths

    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(90, seed=7)))
    out = tmp_path / "out"
    assert cli([str(path)], tokenizer_model, out, "--docs-per-shard", "30",
               DATA_PREP_TEST_EXIT_AT_CHUNK="2").returncode == 75
    assert list((out / "train").glob("*.idx")) and not (out / "train" / "manifest.json").exists()
    with pytest.raises(ValueError, match="has not finished"):
        resolve_shards(out / "train")
    cfg = RunConfig(model=os.path.join(ROOT, "configs/models/tiny_rebased.yaml"), out_dir=str(tmp_path / "run"),
                    data=DataConfig(train=[DataSource(str(out / "train"))], seq_len=32))
    assert any("has not finished" in p for p in check_paths(cfg))
    assert cli([str(path)], tokenizer_model, out, "--docs-per-shard", "30").returncode == 0  # finished: loads
    assert len(resolve_shards(out / "train")) == 3


@pytest.mark.parametrize("max_docs", ["0", "-3"])
def test_max_docs_below_one_is_refused(tokenizer_model, tmp_path, max_docs):
    # it wrote empty splits and a manifest calling the run complete
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(5, seed=2)))
    p = cli([str(path)], tokenizer_model, tmp_path / "out", "--max-docs", max_docs)
    assert p.returncode == 1 and f"--max-docs must be >= 1, got {max_docs}" in p.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def _killed_at_line_40(records):
    """A tokenizer worker killed (as by the out-of-memory killer) on the batch holding line 40."""
    import signal

    from data_prep.workers import process_batch as real

    if any(r[1] == 40 for r in records):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(records)


def test_a_tokenizer_worker_that_dies_stops_the_run_and_a_rerun_finishes_it(tokenizer_model, tmp_path, monkeypatch):
    """With multiprocessing.Pool the dead worker's batch never came back and the run waited forever; now it stops
    naming the cause, keeps the committed chunks, and the same command finishes with the uninterrupted output."""
    import data_prep.pipeline as pipeline

    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(90, seed=9)))
    config = dict(inputs=[str(path)], tokenizer=tokenizer_model, workers=2, progress=False, docs_per_shard=30,
                  batch_docs=4)
    tokenize(TokenizeConfig(out=str(tmp_path / "whole"), **config))
    monkeypatch.setattr(pipeline, "process_batch", _killed_at_line_40)
    with pytest.raises(pipeline.WorkerDiedError, match="worker process died"):
        tokenize(TokenizeConfig(out=str(tmp_path / "out"), **config))
    assert sorted(os.listdir(tmp_path / "out" / "train")) == ["train-00000.bin", "train-00000.idx"]
    monkeypatch.undo()
    tokenize(TokenizeConfig(out=str(tmp_path / "out"), **config))
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "whole")


def test_max_doc_bytes_limits_the_text_not_its_escaped_json_line(tokenizer_model, tmp_path):
    """--max-doc-bytes 100: a text of 100 UTF-8 bytes (50 'é', written as \\u00e9: a 320-byte line) is kept; one of
    102 bytes is skipped as too_long, named by the text's size (the line's size refused both before)."""
    path = tmp_path / "in.jsonl"
    texts = ["é" * 50, "é" * 51, "plain words"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    p = cli([str(path)], tokenizer_model, out, "--max-doc-bytes", "100", "--on-error", "skip")
    assert p.returncode == 0, p.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_by_reason"] == {"too_long": 1}
    assert manifest["skipped_examples"][0]["line"] == 2
    assert "holds 102 bytes, more than --max-doc-bytes 100" in manifest["skipped_examples"][0]["message"]
    assert manifest["counts"]["documents_written"] == 2


def test_leftover_temporary_files_are_removed_only_where_the_run_writes(tokenizer_model, tmp_path):
    """A rerun removes what a killed run left half-written (names with '.tmp-') in OUT, OUT/.state and the split
    folders; files elsewhere under OUT (inputs kept in OUT/raw, which is allowed) are not the run's to delete."""
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    mine = out / "raw" / "notes.tmp-keep.jsonl"
    mine.write_text("mine")
    path = out / "raw" / "in.jsonl"
    path.write_bytes(jsonl_bytes(make_docs(20, seed=3)))
    assert cli([str(path)], tokenizer_model, out).returncode == 0
    leftovers = [out / "train" / "train-00001.bin.tmp-99", out / ".state" / "chunk-00007.json.tmp-99",
                 out / "manifest.json.tmp-99"]
    for f in leftovers:
        f.write_bytes(b"half")
    assert cli([str(path)], tokenizer_model, out).returncode == 0
    assert mine.read_text() == "mine" and not any(f.exists() for f in leftovers)
