"""``MMIDIDX`` format constants and the shard writer, in the standard library only.

The tokenizer pipeline imports this and not numpy: in a short ``tokenize_pile.py`` run numpy's import alone is ~10%
of the end-to-end time (``benchmarks/tokenize_throughput.py`` measures it). The reader and the format's description
are in :mod:`pretrain.data.indexed`.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import os
import struct
import sys
from pathlib import Path

from pretrain.atomic import fsync_dir

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8

# dtype code -> (dtype name, numpy little-endian type string, array typecode or None)
CODES = {
    1: ("uint8", "<u1", "B"),
    2: ("int8", "<i1", "b"),
    3: ("int16", "<i2", "h"),
    4: ("int32", "<i4", "i"),
    5: ("int64", "<i8", "q"),
    6: ("float64", "<f8", "d"),
    7: ("float32", "<f4", "f"),
    8: ("uint16", "<u2", "H"),
}
CODE_OF_NAME = {name: code for code, (name, _, _) in CODES.items()}
_LITTLE = sys.byteorder == "little"
assert array.array("i").itemsize == 4 and array.array("q").itemsize == 8


def token_dtype_name(vocab_size: int) -> str:
    """The dtype gpt-neox/Megatron pick for a vocabulary: uint16 below 65500 entries, otherwise int32."""
    return "uint16" if vocab_size < 65500 else "int32"


def dtype_name(dtype) -> str:
    """'uint16' for 'uint16', numpy.uint16 or numpy.dtype('uint16')."""
    name = getattr(dtype, "name", None) if not isinstance(dtype, type) else dtype.__name__
    return name if isinstance(name, str) else str(dtype)


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def idx_bytes(documents: int) -> int:
    """Size of the ``.idx`` this writer makes for ``documents`` documents (one sequence each): the header, the sizes
    (int32), the pointers (int64) and the document index (int64, documents + 1 entries)."""
    return HEADER_BYTES + documents * (4 + 8) + (documents + 1) * 8


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def _le_bytes(values: array.array) -> bytes:
    if not _LITTLE:
        values = array.array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


class IndexedDatasetWriter:
    """Streams documents into ``prefix.bin``/``prefix.idx`` atomically.

    Tokens go to a temporary ``.bin`` as they arrive (only the per-document sizes stay in memory). ``finalize``
    fsyncs and renames the ``.bin`` into place first, then writes and renames the ``.idx``, so an ``.idx`` on disk
    always has its complete ``.bin``. A writer that is not finalized (``abort`` or a killed process) leaves only
    ``*.tmp-*`` files behind. The SHA-256 of the ``.bin`` is computed while writing.
    """

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = os.fspath(prefix)
        name = dtype_name(dtype)
        if name not in CODE_OF_NAME:
            raise ValueError(f"unsupported dtype {name}")
        self.code = CODE_OF_NAME[name]
        self.dtype_name = name
        _, self._np_type, self._typecode = CODES[self.code]
        self.itemsize = array.array(self._typecode).itemsize
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = f"{bin_path(self.prefix)}.tmp-{os.getpid()}"
        self._tmp_idx = f"{idx_path(self.prefix)}.tmp-{os.getpid()}"
        self._f = open(self._tmp_bin, "wb")
        self._sizes = array.array("q")
        self._hash = hashlib.sha256()
        self.num_tokens = 0
        self.bin_sha256: str | None = None

    def _token_bytes(self, tokens) -> tuple[bytes, int]:
        """Little-endian bytes of the tokens in the shard's dtype: from an array.array, a numpy array (converted by
        numpy, which the caller has imported) or any sequence of ints."""
        if isinstance(tokens, array.array) and tokens.typecode == self._typecode:
            return _le_bytes(tokens), len(tokens)
        if hasattr(tokens, "astype"):
            if getattr(tokens, "ndim", 1) != 1:
                raise ValueError("a document must be a 1-D token array")
            converted = tokens.astype(self._np_type, copy=False)
            if converted is not tokens:  # numpy wraps ids that do not fit (70000 -> 4464 in uint16): refuse them
                changed = converted != tokens
                if changed.any():
                    raise ValueError(f"{bin_path(self.prefix)}: token id {tokens[changed][0]} does not fit the "
                                     f"shard dtype {self.dtype_name}")
            return converted.tobytes(), len(tokens)
        try:
            values = array.array(self._typecode, tokens)
        except OverflowError as e:
            raise ValueError(f"{bin_path(self.prefix)}: a token id does not fit the shard dtype {self.dtype_name} "
                             f"({e})") from None
        return _le_bytes(values), len(values)

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._hash.update(data)

    def add_document(self, tokens) -> None:
        data, n = self._token_bytes(tokens)
        self._write(data)
        self._sizes.append(n)
        self.num_tokens += n

    def add_documents(self, flat_tokens, lengths) -> None:
        """Add several documents at once: ``flat_tokens`` is their concatenation, ``lengths`` their sizes."""
        data, n = self._token_bytes(flat_tokens)
        sizes = array.array("q", lengths)
        if sum(sizes) != n:
            raise ValueError(f"the lengths add up to {sum(sizes)} tokens, {n} were given")
        self._write(data)
        self._sizes.extend(sizes)
        self.num_tokens += n

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def finalize(self) -> dict:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        n = len(self._sizes)
        try:
            sizes = array.array("i", self._sizes)
        except OverflowError:
            raise ValueError(f"{idx_path(self.prefix)}: a document of {max(self._sizes)} tokens is too long for the "
                             "index's int32 sizes") from None
        pointers = array.array("q", itertools.accumulate((k * self.itemsize for k in self._sizes[:-1]), initial=0)
                               if n else ())
        doc_idx = array.array("q", range(n + 1))
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQQ", VERSION, self.code, n, len(doc_idx)))
            f.write(_le_bytes(sizes))
            f.write(_le_bytes(pointers))
            f.write(_le_bytes(doc_idx))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))
        self.bin_sha256 = self._hash.hexdigest()
        return {
            "documents": n,
            "tokens": self.num_tokens,
            "bin_bytes": self.num_tokens * self.itemsize,
            "bin_sha256": self.bin_sha256,
        }

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            for p in (self._tmp_bin, self._tmp_idx):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
