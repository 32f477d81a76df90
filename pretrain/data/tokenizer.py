"""SentencePiece tokenizer wrapper used by data preparation, training and evaluation.

Models trained by ``data_prep/train_tokenizer.py`` are byte-level-lossless: identity normalisation, no dummy prefix,
whitespace kept, byte fallback, so ``decode(encode(text)) == text`` for every valid Unicode string. Special ids:
``pad=0``, ``unk=1``, ``bos=2``, ``eos=3`` (``eos`` is the end-of-document token, EOD, appended after every
document). Any other SentencePiece ``.model`` works too; ids it does not define are ``-1``. Text that is not valid
Unicode (a lone surrogate) cannot be encoded: ``ValueError`` naming the position.
"""

from __future__ import annotations

import hashlib
import os

import sentencepiece as spm

# SentencePiece turns spaces into U+2581 and back; a literal U+2581 in the text would come back as a space. We
# encode it as its UTF-8 byte pieces instead (with byte fallback), which decode to the character itself.
_META_SPACE = "\u2581"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20, limit: int | None = None) -> str:
    """SHA-256 of a file, or of its first ``limit`` bytes."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(chunk if left is None else min(chunk, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"cannot tokenize a lone surrogate {text[e.start]!r} at position {e.start}: "
                         "not valid Unicode") from None


class Tokenizer:
    """``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eod_id``, ``bos_id``, ``pad_id``."""

    def __init__(self, model_path: str | os.PathLike | None = None, *, model_proto: bytes | None = None):
        if (model_path is None) == (model_proto is None):
            raise ValueError("give exactly one of model_path or model_proto")
        if model_path is not None:
            with open(model_path, "rb") as f:
                model_proto = f.read()
        self.model_path = os.fspath(model_path) if model_path is not None else None
        self.model_proto = model_proto
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        # SentencePiece's own errors name neither the file nor the problem; an empty proto even loads as no model
        source = self.model_path or "model_proto"
        if not model_proto:
            raise ValueError(f"{source}: empty, not a SentencePiece model")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(f"{source}: not a SentencePiece model (corrupt or truncated?): {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.eod_id = self.eos_id
        meta_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _META_SPACE.encode()]
        ok = all(i != self.unk_id and self.sp.id_to_piece(i) == f"<0x{b:02X}>" for i, b in zip(meta_bytes, _META_SPACE.encode()))
        self._meta_ids = meta_bytes if ok else None

    def __getstate__(self):
        return {"model_proto": self.model_proto, "model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(model_proto=state["model_proto"])
        self.model_path = state["model_path"]

    def encode(self, text: str) -> list[int]:
        try:
            return self._encode(text)
        except RuntimeError:  # pybind11's "Unable to cast": checked only on failure, off the hot path
            _check_unicode(text)
            raise

    def _encode(self, text: str) -> list[int]:
        if self._meta_ids is None or _META_SPACE not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_META_SPACE)):
            if i:
                ids.extend(self._meta_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        if self._meta_ids is None or not any(_META_SPACE in t for t in texts):
            try:
                return self.sp.encode(texts, num_threads=num_threads)
            except TypeError:  # "List elements must be str or bytes": a string that is not valid Unicode
                for t in texts:
                    _check_unicode(t)
                raise
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        try:
            return self.sp.decode(ids)
        except IndexError:  # SentencePiece's message names neither the id nor the vocabulary
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise IndexError(f"cannot decode id {bad} of {self.model_path or 'model_proto'}: outside "
                             f"vocab_size {self.vocab_size}") from None

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_path or '<proto>'}, vocab_size={self.vocab_size}, eod_id={self.eod_id}, "
                f"bos_id={self.bos_id}, pad_id={self.pad_id})")
