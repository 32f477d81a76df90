"""What evaluation and generation load: a model from an export or any training checkpoint, the documents to score
(indexed shards or raw JSONL text), the tokenizer. Bad input raises ``EvaluationInputError`` naming the file;
the command-line tools turn it into a one-line message and exit code 2."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pretrain.config import ConfigError
from pretrain.data.indexed import IndexedDataset
from pretrain.data.packed import resolve_shards
from pretrain.data.sources import Record, iter_records, resolve_inputs
from pretrain.data.tokenizer import Tokenizer
from pretrain.evaluation.scoring import Document
from pretrain.models.io import WEIGHTS, load_exported
from pretrain.training.checkpoint import find_latest, is_complete
from pretrain.training.export import export_checkpoint


class EvaluationInputError(ConfigError):
    """A checkpoint, data path or record that cannot be used."""


def load_tokenizer(path):
    """The SentencePiece wrapper for ``path``, or None without one."""
    if not path:
        return None
    try:
        return Tokenizer(path)
    except (OSError, ValueError) as e:  # missing, unreadable or not a SentencePiece model: one line, exit 2
        raise EvaluationInputError(f"--tokenizer: {e}") from None


def load_documents(data: str, tokenizer, *, text_key: str = "text", max_documents: int | None = None) -> list[Document]:
    """Documents from indexed shards or raw JSONL text (each ends with EOD)."""
    raw_suffixes = (".jsonl", ".jsonl.zst", ".jsonl.zstd", ".jsonl.gz")
    is_raw = data.endswith(raw_suffixes) or (os.path.isdir(data) and any(
        f.endswith(raw_suffixes) for _, _, files in os.walk(data) for f in files))
    if is_raw:
        if tokenizer is None:
            raise EvaluationInputError(f"{data}: raw text needs a tokenizer (--tokenizer)")
        return _raw_documents(data, tokenizer, text_key, max_documents)
    docs = []
    try:
        prefixes = resolve_shards(data)
    except (OSError, ValueError) as e:  # nothing there, or a split that is not usable: one line, exit 2
        raise EvaluationInputError(f"--data {data}: {e}") from None
    for prefix in prefixes:
        try:
            ds = IndexedDataset(prefix)
        except (OSError, ValueError) as e:  # a damaged .idx/.bin: one line naming it, exit 2
            raise EvaluationInputError(f"--data {data}: {e}") from None
        for d in range(ds.num_documents):
            if max_documents is not None and len(docs) >= max_documents:
                return docs
            array = ds.document(d)
            if array.size == 0:  # nothing to score (other writers may store empty documents): as raw text, skipped
                continue
            tokens = array.tolist()
            num_bytes = None
            if tokenizer is not None:
                low, high = min(tokens), max(tokens)
                if low < 0 or high >= tokenizer.vocab_size:  # decoding it would fail with a traceback
                    raise EvaluationInputError(
                        f"{prefix}: document {d} holds token id {low if low < 0 else high}, outside the vocabulary "
                        f"of --tokenizer ({tokenizer.vocab_size} ids): the data was tokenized with another tokenizer")
                body = tokens[:-1] if tokens[-1] == tokenizer.eod_id else tokens
                num_bytes = len(tokenizer.decode(body).encode("utf-8"))
            docs.append(Document(tokens, num_bytes))
    return docs


def _raw_documents(data: str, tokenizer, text_key: str, max_documents: int | None) -> list[Document]:
    docs = []
    # --max-documents counts documents scored, as for shards: records skipped below (no text) do not count
    sources = resolve_inputs([data], "main")
    for event in iter_records(sources):
        if max_documents is not None and len(docs) >= max_documents:
            break
        if not isinstance(event, Record):
            continue
        where = f"{sources[event.source].name}:{event.line_no}"  # the file and line (the source's index before)
        if event.payload is None:
            raise EvaluationInputError(f"{data}: {event.reason}: {event.message}")
        try:
            obj = json.loads(event.payload) if isinstance(event.payload, bytes) else event.payload
            text = obj[text_key]
        except (ValueError, KeyError, TypeError) as e:
            raise EvaluationInputError(f"{where}: cannot read '{text_key}': {e}") from e
        if not isinstance(text, str):  # as tokenize_pile: a missing or non-string text is bad input, not a skip
            raise EvaluationInputError(f"{where}: '{text_key}' is a {type(text).__name__}, not a string")
        if not text:
            continue
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        subset = meta.get("pile_set_name")
        # a name as tokenize_pile counts it: numbers as text, anything else (a list, an object) as no subset
        subset = None if isinstance(subset, (dict, list)) or subset is None else str(subset)
        tokens = tokenizer.encode(text)
        # the bytes of what the tokens spell, as for shards: a normalising tokenizer's differ from the text's
        docs.append(Document(tokens + [tokenizer.eod_id], len(tokenizer.decode(tokens).encode("utf-8")), subset))
    return docs


def load_model(checkpoint: str, device):
    """A model from a consolidated export or a training checkpoint (any strategy / world size), in eval mode."""
    path = Path(checkpoint)
    if (path / WEIGHTS).exists():
        return load_exported(path, device=device)
    if not is_complete(str(path)):  # a run's checkpoint root: take its latest complete checkpoint
        latest = find_latest(str(path))
        if latest is None:
            raise EvaluationInputError(f"{path}: neither an export (model.safetensors) nor a complete checkpoint")
        path = Path(latest)
    with tempfile.TemporaryDirectory() as tmp:  # consolidate the sharded checkpoint, then load it
        export_checkpoint(str(path), os.path.join(tmp, "export"))
        return load_exported(os.path.join(tmp, "export"), device=device)
