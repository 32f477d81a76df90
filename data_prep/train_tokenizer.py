"""Train a SentencePiece BPE tokenizer (byte fallback, lossless) on a streamed sample of a JSONL corpus.

    python data_prep/train_tokenizer.py --inputs PILE/train --vocab-size 32000 --out tokenizers/pile32k.model

Reads the first ``--sample-docs`` documents (at most ``--sample-bytes`` of text) in input order, splits them into
line-aligned pieces of at most ``--max-sentence-bytes`` and trains with: identity normalisation, no dummy prefix,
whitespace preserved (``allow_whitespace_only_pieces``), digits split, byte fallback, and the special ids
``pad=0 <pad>``, ``unk=1 <unk>``, ``bos=2 <s>``, ``eos=3 </s>`` (EOD). Writes ``OUT`` (the model), ``OUT`` with
``.vocab`` (piece and score per line) and ``OUT`` with ``.json`` (what it was trained on). Bad records in the sample
are skipped and counted. A missing input, a directory without input files, or a sample without one usable
document stops before SentencePiece starts, with a message naming the files and what was wrong with them.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import itertools
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece as spm  # noqa: E402

from pretrain.atomic import write_bytes_atomic, write_json_atomic  # noqa: E402
from pretrain.data.sources import FileDone, InputError, iter_records, resolve_inputs  # noqa: E402

SPECIALS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
            "pad_piece": "<pad>", "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>"}


def _text_of(rec, text_key: str) -> tuple[str | None, str | None]:
    """``(text, None)`` or ``(None, reason)``, with the reasons of ``tokenize_pile.py``."""
    if rec.reason is not None:
        return None, rec.reason
    obj = rec.payload
    if isinstance(obj, (bytes, bytearray)):
        try:
            obj = json.loads(obj.decode("utf-8"))
        except UnicodeDecodeError:
            return None, "invalid_utf8"
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter allows
            return None, "invalid_json" if obj.strip() else "blank_line"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    if text_key not in obj:
        return None, "missing_text"
    text = obj[text_key]
    if not isinstance(text, str):
        return None, "text_not_string"
    if not text.strip():
        return None, "empty_text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    return text, None


def split_sentences(text: str, max_bytes: int):
    """Line-aligned pieces of at most ``max_bytes`` UTF-8 bytes (longer lines are cut)."""
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and piece:
            yield "".join(piece)
            piece, size = [], 0
        while n > max_bytes:
            cut = line[: max_bytes // 4]  # <= max_bytes bytes whatever the characters
            yield cut
            line = line[len(cut):]
            n = len(line.encode("utf-8"))
        piece.append(line)
        size += n
    if piece:
        yield "".join(piece)


def check_inputs(inputs: list[str]) -> list:
    """The sources of ``inputs``; raises InputError naming every input that cannot be opened (all at once)."""
    sources = resolve_inputs(inputs, "main")
    missing = []
    for src in sources:
        if src.path is None:
            continue
        try:
            with open(src.path, "rb"):
                pass
        except OSError as e:
            missing.append(f"{src.path}: {e.strerror or e}")
    if missing:
        raise InputError(f"cannot read {len(missing)} input(s): " + "; ".join(missing))
    return sources


def sample_sentences(sources: list, text_key: str, sample_docs: int, sample_bytes: int, max_sentence_bytes: int,
                     stats: dict):
    """Training pieces of the first usable documents; ``stats`` counts documents, skips by reason and keeps a few
    examples of skipped records (``FILE:LINE: reason``)."""
    for rec in iter_records(sources, max_docs=None):
        if isinstance(rec, FileDone):
            continue
        if stats["documents"] >= sample_docs or stats["text_bytes"] >= sample_bytes:
            return
        text, reason = _text_of(rec, text_key)
        if text is None:
            stats["skipped"] += 1
            stats["skipped_by_reason"][reason] += 1
            if len(stats["examples"]) < 5:
                where = sources[rec.source].name + (f":{rec.line_no}" if rec.line_no else "")
                stats["examples"].append(f"{where}: {reason}" + (f" ({rec.message})" if rec.message else ""))
            continue
        stats["documents"] += 1
        stats["text_bytes"] += len(text.encode("utf-8"))
        for s in split_sentences(text, max_sentence_bytes):
            stats["sentences"] += 1
            yield s


def train(inputs: list[str], out: str, vocab_size: int = 32000, *, text_key: str = "text",
          sample_docs: int = 1_000_000, sample_bytes: int = 2 << 30, max_sentence_bytes: int = 4096,
          character_coverage: float = 0.9995, model_type: str = "bpe", threads: int | None = None) -> dict:
    if max_sentence_bytes < 10:  # SentencePiece's minimum: checked before reading, not as an internal error after
        raise ValueError(f"--max-sentence-bytes must be at least 10, got {max_sentence_bytes}")
    for option, value in (("--vocab-size", vocab_size), ("--sample-docs", sample_docs),
                          ("--sample-bytes", sample_bytes)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if not 0 < character_coverage <= 1:
        raise ValueError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    if not out.endswith(".model"):  # the .vocab and .json written beside it are named from OUT minus its suffix
        raise ValueError(f"--out {out}: the model's file name must end in .model (e.g. tokenizers/pile32k.model)")
    sources = check_inputs(inputs)
    stats = {"documents": 0, "skipped": 0, "sentences": 0, "text_bytes": 0,
             "skipped_by_reason": collections.Counter(), "examples": []}
    model = io.BytesIO()
    t0 = time.time()
    sentences = sample_sentences(sources, text_key, sample_docs, sample_bytes, max_sentence_bytes, stats)
    first = next(sentences, None)  # SentencePiece fails on an empty sample with an internal assertion
    if first is None:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(stats["skipped_by_reason"].items())) or "no records"
        raise InputError(f"no usable document to train on in {', '.join(inputs)} ({reasons}"
                         + (f"; e.g. {'; '.join(stats['examples'][:3])}" if stats["examples"] else "") + ")")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=max_sentence_bytes,
            input_sentence_size=0,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
            **SPECIALS,
        )
    except RuntimeError as e:  # e.g. a vocabulary larger than the sample supports
        raise InputError(f"SentencePiece training failed on {stats['documents']} document(s) "
                         f"({stats['text_bytes']} bytes) from {', '.join(inputs)}: {e}") from None
    stats["skipped_by_reason"] = dict(stats["skipped_by_reason"])
    proto = model.getvalue()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_bytes_atomic(out, proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    write_bytes_atomic(os.path.splitext(out)[0] + ".vocab", vocab.encode("utf-8"))
    info = {"model": os.path.abspath(out), "sha256": hashlib.sha256(proto).hexdigest(),
            "vocab_size": sp.get_piece_size(), "model_type": model_type, "inputs": inputs, "text_key": text_key,
            "sample": stats, "special_ids": {k: v for k, v in SPECIALS.items() if k.endswith("_id")},
            "train_seconds": round(time.time() - t0, 2)}
    write_json_atomic(os.path.splitext(out)[0] + ".json", info)
    return info




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="files, directories, globs or hf: sources")
    p.add_argument("--out", required=True, help="output model path, e.g. tokenizers/pile32k.model")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--text-key", default="text")
    p.add_argument("--sample-docs", type=int, default=1_000_000, help="documents to train on (default 1M)")
    p.add_argument("--sample-bytes", type=int, default=2 << 30, help="text bytes to train on (default 2 GiB)")
    p.add_argument("--max-sentence-bytes", type=int, default=4096)
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--threads", type=int, default=None, help="training threads (default: all cores)")
    args = p.parse_args(argv)
    try:
        info = train(args.inputs, args.out, args.vocab_size, text_key=args.text_key, sample_docs=args.sample_docs,
                     sample_bytes=args.sample_bytes, max_sentence_bytes=args.max_sentence_bytes,
                     character_coverage=args.character_coverage, model_type=args.model_type, threads=args.threads)
    except (InputError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = info["sample"]
    print(f"trained {info['model_type']} vocab {info['vocab_size']} on {s['documents']:,} documents "
          f"({s['text_bytes'] / 1e6:.1f} MB, {s['sentences']:,} pieces, {s['skipped']} skipped) "
          f"in {info['train_seconds']}s -> {args.out} (sha256 {info['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
