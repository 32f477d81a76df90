"""The evaluation job at its edges: the loss equals a float64 brute force over the same windows (also past the
training length for rotary and linear attention), windows a model cannot score are refused with a one-line error,
bytes are those the scored tokens spell, and per-set totals add up to the total."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import from_dict
from pretrain.data.writer import IndexedDatasetWriter
from pretrain.evaluation.scoring import NO_SET, Document, score_documents, totals_by_set
from pretrain.models import ModelConfig, build_model
from pretrain.models.io import export_model, load_exported

V, EOD = 40, 3
DOC_LENGTHS = [5, 30, 1, 12]  # tokens before EOD; one document longer than 2 windows of 8


def _export(tmp_path, layers, **overrides):
    cfg = dict(vocab_size=V, d_model=16, layers=layers, mlp_hidden=16, max_seq_len=8,
               rebased={"num_heads": 2, "feature_dim": 4}, attention={"num_heads": 2},
               sliding_window={"num_heads": 2, "window": 3})
    cfg.update(overrides)
    torch.manual_seed(0)
    export_model(build_model(from_dict(ModelConfig, cfg)), tmp_path / "model")
    return tmp_path / "model"


def _shards(tmp_path, lengths=DOC_LENGTHS, high=V):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, high, (n,), generator=g).tolist() + [EOD] for n in lengths]
    writer = IndexedDatasetWriter(tmp_path / "data", "uint16")
    for d in docs:
        writer.add_document(d)
    writer.finalize()
    return tmp_path / "data", docs


def _evaluate(model, data, *extra):
    from pretrain.evaluate import main
    return main(["--checkpoint", str(model), "--data", str(data), "--eod-id", str(EOD), "--batch-size", "3",
                 "--precision", "fp32", *extra])


def _brute_force_nll(model, docs, seq_len, stride):
    """Summed NLL in float64, each window run alone: stream [EOD] + doc, windows of seq_len inputs."""
    model = model.double()
    total = 0.0
    for doc in docs:
        stream = [EOD] + doc
        scored = 1  # next target position to score
        while scored < len(stream):
            end = min(len(stream), scored + (seq_len if stride is None or scored == 1 else stride))
            start = max(0, end - 1 - seq_len) if stride is not None else scored - 1
            ids = torch.tensor([stream[start:end - 1]])
            with torch.no_grad():
                logp = F.log_softmax(model(ids)[0].double(), -1)
            for p in range(scored, end):
                total -= logp[p - 1 - start, stream[p]].item()
            scored = end
    return total


@pytest.mark.parametrize("layers", [["short_conv", "rebased", "sliding_window"], ["attention"]])
@pytest.mark.parametrize("seq_len,stride,layout", [
    (8, None, "separate"), (8, 3, "separate"), (16, None, "separate"), (32, 5, "separate"),
    (16, None, "packed"), (32, 7, "packed"), (64, None, "packed"),  # 64: all documents in one window
])
def test_loss_equals_float64_brute_force_also_past_the_training_length(tmp_path, layers, seq_len, stride, layout):
    model_dir = _export(tmp_path, layers)  # max_seq_len 8: 16 and 32 are 2x and 4x the training length
    data, docs = _shards(tmp_path)
    out = _evaluate(model_dir, data, "--seq-len", str(seq_len), "--documents", layout,
                    *(["--stride", str(stride)] if stride else []))
    streams = docs if layout == "separate" else [sum(docs, [])]  # packed: one stream, context crosses documents
    expected = _brute_force_nll(load_exported(model_dir), streams, seq_len, stride)
    assert out["tokens"] == sum(DOC_LENGTHS) + len(DOC_LENGTHS)
    assert out["nll_sum"] == pytest.approx(expected, rel=1e-5)
    assert out["loss"] == pytest.approx(expected / out["tokens"], rel=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "16"], "--seq-len 16 exceeds the model's learned position table (max_seq_len=8)"),
    (["--seq-len", "32"], "--seq-len 32 exceeds"),
    (["--seq-len", "8", "--stride", "9"], "--stride must be in"),
    (["--seq-len", "8", "--stride", "0"], "--stride must be in"),
])
def test_windows_the_model_cannot_score_are_refused_in_one_line(tmp_path, capsys, args, message):
    model_dir = _export(tmp_path, ["short_conv", "attention"], learned_positions=True)
    data, _ = _shards(tmp_path)
    with pytest.raises(SystemExit) as e:
        _evaluate(model_dir, data, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_learned_positions_evaluate_up_to_their_table(tmp_path):
    model_dir = _export(tmp_path, ["short_conv", "attention"], learned_positions=True)
    data, docs = _shards(tmp_path)
    out = _evaluate(model_dir, data)  # default window: max_seq_len
    assert out["seq_len"] == 8
    assert out["nll_sum"] == pytest.approx(_brute_force_nll(load_exported(model_dir), docs, 8, None), rel=1e-5)


def test_tokens_outside_the_vocabulary_are_refused(tmp_path, capsys):
    model_dir = _export(tmp_path, ["short_conv"])
    data, _ = _shards(tmp_path, high=V + 5)
    with pytest.raises(SystemExit) as e:
        _evaluate(model_dir, data)
    assert e.value.code == 2 and f"vocab_size={V}" in capsys.readouterr().err


def test_raw_text_bytes_are_those_of_the_decoded_tokens(tmp_path):
    """A tokenizer that normalises (SentencePiece's default NFKC and whitespace folding, no byte fallback) spells
    other bytes than the raw text: bits per byte must count what the scored tokens decode to, as for shards."""
    import sentencepiece as spm
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.evaluation.loading import load_documents

    texts = ["the   ﬁrst  line  has  doubled   spaces", " leading space and ﬁ ligature", "plain text here"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 20), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=40, hard_vocab_limit=False, bos_id=2, eos_id=3, unk_id=1, pad_id=0)
    tok = Tokenizer(tmp_path / "tok.model")
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    docs = load_documents(str(tmp_path / "raw.jsonl"), tok)
    assert [d.num_bytes for d in docs] == [len(tok.decode(d.tokens[:-1]).encode()) for d in docs]
    assert sum(d.num_bytes for d in docs) < sum(len(t.encode()) for t in texts)  # the tokenizer did normalise


def test_sets_add_up_to_the_total_when_some_documents_have_no_set():
    docs = [Document([5, 6, EOD], 4, "A"), Document([7, EOD], 2, None), Document([8, 9, 9, EOD], 5, "B")]
    uniform = lambda ids: torch.zeros(*ids.shape, V, dtype=torch.float64)
    overall, by_set = totals_by_set(docs, score_documents(uniform, docs, seq_len=4, eod_id=EOD))
    assert set(by_set) == {"A", "B", NO_SET}
    assert sum(t.tokens for t in by_set.values()) == overall.tokens == 9
    assert sum(t.bytes for t in by_set.values()) == overall.bytes == 11
    assert math.isclose(sum(t.nll for t in by_set.values()), overall.nll, rel_tol=1e-12)
    assert totals_by_set(docs[1:2], {0: 1.0})[1] == {}  # no set names at all: no breakdown


def test_a_corrupt_tokenizer_is_one_line(tmp_path, capsys):
    model_dir = _export(tmp_path, ["short_conv"])
    data, _ = _shards(tmp_path)
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(SystemExit) as e:
        _evaluate(model_dir, data, "--tokenizer", str(bad))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{bad}: not a SentencePiece model" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),  # 0 was read as "the model's default"
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    (["--max-documents", "0"], "--max-documents must be >= 1, got 0"),
    (["--eod-id", str(V)], f"--eod-id {V} is outside the model's vocabulary (vocab_size={V})"),
    (["--eod-id", "-1"], "--eod-id -1 is outside"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, capsys, args, message):
    model_dir = _export(tmp_path, ["short_conv"])
    data, _ = _shards(tmp_path)
    with pytest.raises(SystemExit) as e:
        _evaluate(model_dir, data, *args)  # a later --eod-id wins over the helper's
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("what", ["missing_data", "out_is_a_folder", "out_folder_missing"])
def test_paths_are_checked_before_the_evaluation(tmp_path, capsys, what):
    model_dir = _export(tmp_path, ["short_conv"])
    data, _ = _shards(tmp_path)
    (tmp_path / "folder").mkdir()
    args = {"missing_data": ([], tmp_path / "no_such_prefix", "no indexed dataset"),
            "out_is_a_folder": (["--out", str(tmp_path / "folder")], data, "is a directory"),
            "out_folder_missing": (["--out", str(tmp_path / "nope" / "r.json")], data, "does not exist")}[what]
    with pytest.raises(SystemExit) as e:
        _evaluate(model_dir, args[1], *args[0])
    err = capsys.readouterr().err
    assert e.value.code == 2 and args[2] in err and "Traceback" not in err


def test_raw_text_max_documents_counts_scored_documents_and_set_names_are_text(tmp_path):
    """Records skipped for having no text do not count towards --max-documents (they did: 2 asked, 1 scored); a
    numeric set name is a name (it crashed the per-set totals), a list is no set."""
    import sentencepiece as spm
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.evaluation.loading import load_documents

    texts = ["alpha beta gamma", "delta epsilon", "zeta eta theta"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 20), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=30, hard_vocab_limit=False, bos_id=2, eos_id=3, unk_id=1, pad_id=0)
    tok = Tokenizer(tmp_path / "tok.model")
    records = [{"text": ""}, {"text": texts[0], "meta": {"pile_set_name": 7}},
               {"text": texts[1], "meta": {"pile_set_name": ["A"]}}, {"text": texts[2]}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    docs = load_documents(str(tmp_path / "raw.jsonl"), tok, max_documents=2)
    assert len(docs) == 2 and [d.set_name for d in docs] == ["7", None]
    overall, by_set = totals_by_set(docs, {0: 1.0, 1: 2.0})
    assert set(by_set) == {"7", NO_SET} and overall.tokens == sum(len(d.tokens) for d in docs)


def test_compare_names_an_unreadable_result(tmp_path, capsys):
    from pretrain.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "missing.json")])
    assert e.value.code == 2 and "missing.json: not a readable result JSON" in capsys.readouterr().err


def test_raw_text_that_is_not_a_string_is_refused_naming_the_record(tmp_path):
    import sentencepiece as spm
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.evaluation.loading import EvaluationInputError, load_documents

    spm.SentencePieceTrainer.train(sentence_iterator=iter(["alpha beta"] * 40), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=20, hard_vocab_limit=False, bos_id=2, eos_id=3, unk_id=1, pad_id=0)
    (tmp_path / "raw.jsonl").write_text('{"text": "alpha"}\n{"text": 5}\n')
    with pytest.raises(EvaluationInputError, match=r"raw\.jsonl:2: 'text' is a int, not a string"):
        load_documents(str(tmp_path / "raw.jsonl"), Tokenizer(tmp_path / "tok.model"))


@pytest.mark.parametrize("damage", ["idx_magic", "idx_truncated", "bin_truncated"])
def test_a_damaged_shard_is_one_line(tmp_path, capsys, damage):
    model_dir = _export(tmp_path, ["short_conv"])
    data, _ = _shards(tmp_path)
    path = tmp_path / ("data.bin" if damage == "bin_truncated" else "data.idx")
    raw = path.read_bytes()
    path.write_bytes(b"X" + raw[1:] if damage == "idx_magic" else raw[:-4])
    with pytest.raises(SystemExit) as e:
        _evaluate(model_dir, data)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: --data ") and str(path.with_suffix("")) in line


def test_token_ids_past_the_tokenizers_vocabulary_are_one_line(tmp_path, capsys):
    """Bytes per document come from decoding the tokens: an id the tokenizer lacks failed with a traceback there,
    before the model's vocabulary check could name the mismatch."""
    import sentencepiece as spm

    texts = ["the cat sat on the mat", "a dog ran far away"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 20), model_prefix=str(tmp_path / "tok"),
                                   vocab_size=30, hard_vocab_limit=False, bos_id=2, eos_id=3, unk_id=1, pad_id=0,
                                   minloglevel=2)
    from pretrain.data.tokenizer import Tokenizer

    tok_size = Tokenizer(tmp_path / "tok.model").vocab_size
    model_dir = _export(tmp_path, ["short_conv"], vocab_size=tok_size + 20)
    writer = IndexedDatasetWriter(tmp_path / "data", "uint16")
    writer.add_document([5, 6, tok_size + 10, EOD])
    writer.finalize()
    with pytest.raises(SystemExit) as e:
        _evaluate(model_dir, tmp_path / "data", "--tokenizer", str(tmp_path / "tok.model"))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert f"document 0 holds token id {tok_size + 10}, outside the vocabulary of --tokenizer ({tok_size} ids)" in line


def test_shards_holding_only_empty_documents_are_refused(tmp_path, capsys):
    """Nothing to score: refused before any forward (it printed a NaN perplexity and exited 0); empty documents
    among others are skipped, as empty raw-text records are, and do not count toward --max-documents."""
    model_dir = _export(tmp_path, ["short_conv"])
    writer = IndexedDatasetWriter(tmp_path / "empty", "uint16")
    writer.add_document([])
    writer.add_document([])
    writer.finalize()
    with pytest.raises(SystemExit) as e:
        _evaluate(model_dir, tmp_path / "empty")
    assert e.value.code == 2 and "no documents to evaluate" in capsys.readouterr().err
    from pretrain.evaluation.loading import load_documents

    writer = IndexedDatasetWriter(tmp_path / "mixed", "uint16")
    for doc in ([], [5, EOD], [], [6, 7, EOD]):
        writer.add_document(doc)
    writer.finalize()
    assert [d.tokens for d in load_documents(str(tmp_path / "mixed"), None, max_documents=2)] == [[5, EOD],
                                                                                                   [6, 7, EOD]]
