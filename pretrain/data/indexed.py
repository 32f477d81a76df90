"""Reader and writer for the NeoX/Megatron ``MMIDIDX`` indexed dataset format (``.bin`` + ``.idx``).

Format (all integers little-endian), as written by gpt-neox / Megatron-LM ``MMapIndexedDatasetBuilder``:

``.idx``::

    magic     9 bytes   b"MMIDIDX\\x00\\x00"
    version   uint64    1
    dtype     uint8     code of the token dtype (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                        6 float64, 7 float32, 8 uint16)
    n_seq     uint64    number of sequences (items)
    n_doc     uint64    length of the document index (number of documents + 1)
    sizes     int32[n_seq]   tokens per sequence
    pointers  int64[n_seq]   byte offset of each sequence in the ``.bin``
    doc_idx   int64[n_doc]   sequence index where each document starts, ending with n_seq

``.bin``: the token ids of all sequences back to back, in the dtype above.

Our tokenizer writes one sequence per document (EOD appended), so ``doc_idx == arange(n_seq + 1)``; files built by
gpt-neox/Megatron tools with one sequence per document read the same. Only numpy is needed here (no sentencepiece).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype gpt-neox/Megatron pick for a vocabulary: uint16 below 65500 entries, otherwise int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


class IndexFormatError(ValueError):
    """The ``.idx``/``.bin`` pair is not a valid MMIDIDX dataset."""


class IndexedDataset:
    """Memory-mapped read access to one ``prefix.bin`` / ``prefix.idx`` pair.

    ``ds[i]`` is the token array of sequence ``i``; ``ds.sizes``, ``ds.pointers``, ``ds.doc_idx`` are the index
    arrays (memory-mapped). ``ds.tokens`` is the whole ``.bin`` as one flat token array, which for datasets written
    contiguously (ours, and those of the gpt-neox/Megatron builders) is the packed token stream.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        ipath = idx_path(self.prefix)
        with open(ipath, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
            raise IndexFormatError(f"{ipath}: not an MMIDIDX index (bad magic or truncated header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise IndexFormatError(f"{ipath}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise IndexFormatError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER_BYTES + n_seq * 4 + n_seq * 8 + n_doc * 8
        actual = os.path.getsize(ipath)
        if actual != expected:
            raise IndexFormatError(f"{ipath}: size {actual} bytes, header implies {expected}")
        self._idx = np.memmap(ipath, dtype=np.uint8, mode="r") if actual > 0 else None
        off = HEADER_BYTES
        self.sizes = np.frombuffer(self._idx, dtype="<i4", count=n_seq, offset=off)
        off += n_seq * 4
        self.pointers = np.frombuffer(self._idx, dtype="<i8", count=n_seq, offset=off)
        off += n_seq * 8
        self.doc_idx = np.frombuffer(self._idx, dtype="<i8", count=n_doc, offset=off)
        bpath = bin_path(self.prefix)
        nbytes = os.path.getsize(bpath)
        if nbytes % self.dtype.itemsize:
            raise IndexFormatError(f"{bpath}: size {nbytes} is not a multiple of {self.dtype.itemsize}")
        if n_seq and int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize > nbytes:
            raise IndexFormatError(f"{bpath}: shorter ({nbytes} bytes) than the index says")
        self.num_tokens = nbytes // self.dtype.itemsize
        if nbytes:
            self.tokens = np.memmap(bpath, dtype=self.dtype.newbyteorder("<"), mode="r", shape=(self.num_tokens,))
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences concatenated)."""
        a, b = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if a == b:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate([self[i] for i in range(a, b)]) if b - a > 1 else self[a]

    def is_contiguous(self) -> bool:
        """True when sequences lie back to back in the ``.bin`` (so ``tokens`` is the packed stream)."""
        if len(self) == 0:
            return True
        expected = np.concatenate([[0], np.cumsum(self.sizes[:-1], dtype=np.int64)]) * self.dtype.itemsize
        return bool(np.array_equal(expected, self.pointers)) and int(self.sizes.sum(dtype=np.int64)) == self.num_tokens

    def document_start_tokens(self) -> np.ndarray:
        """Token offset (in ``tokens``) at which each document starts, ascending (a new int64 array)."""
        if len(self.doc_idx) == len(self.sizes) + 1:
            # One sequence per document (the usual case): the sequence pointers are the document starts.
            return np.asarray(self.pointers, dtype=np.int64) // self.dtype.itemsize
        seq_starts = np.asarray(self.pointers, dtype=np.int64) // self.dtype.itemsize
        d = np.asarray(self.doc_idx[:-1], dtype=np.int64)
        d = d[d < len(seq_starts)]
        return np.unique(seq_starts[d])


class IndexedDatasetWriter:
    """Streams documents into ``prefix.bin``/``prefix.idx`` atomically.

    Tokens go to a temporary ``.bin`` as they arrive (only the per-document sizes stay in memory). ``finalize``
    fsyncs and renames the ``.bin`` into place first, then writes and renames the ``.idx``, so an ``.idx`` on disk
    always has its complete ``.bin``. A writer that is not finalized (``abort`` or a killed process) leaves only
    ``*.tmp-*`` files behind. The SHA-256 of the ``.bin`` is computed while writing.
    """

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported dtype {self.dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = f"{bin_path(self.prefix)}.tmp-{os.getpid()}"
        self._tmp_idx = f"{idx_path(self.prefix)}.tmp-{os.getpid()}"
        self._f = open(self._tmp_bin, "wb")
        self._sizes: list[int] = []
        self._hash = hashlib.sha256()
        self.num_tokens = 0
        self.bin_sha256: str | None = None

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError("a document must be a 1-D token array")
        data = arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._f.write(data)
        self._hash.update(data)
        self._sizes.append(len(arr))
        self.num_tokens += len(arr)

    def add_documents(self, flat_tokens: np.ndarray, lengths) -> None:
        """Add several documents at once: ``flat_tokens`` is their concatenation, ``lengths`` their sizes."""
        data = np.asarray(flat_tokens).astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._f.write(data)
        self._hash.update(data)
        lengths = [int(x) for x in lengths]
        self._sizes.extend(lengths)
        self.num_tokens += sum(lengths)

    @property
    def num_documents(self) -> int:
        return len(self._sizes)

    def finalize(self) -> dict:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        sizes = np.asarray(self._sizes, dtype="<i4")
        if len(sizes) and int(np.max(sizes)) >= 2**31:
            raise ValueError("document too long for the int32 sizes of the index")
        pointers = np.zeros(len(sizes), dtype="<i8")
        if len(sizes) > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype="<i8")
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[self.dtype], len(sizes), len(doc_idx)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))
        self.bin_sha256 = self._hash.hexdigest()
        return {
            "documents": len(sizes),
            "tokens": self.num_tokens,
            "bin_bytes": self.num_tokens * self.dtype.itemsize,
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


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def merge_indexed(prefixes, out_prefix: str | os.PathLike, chunk_bytes: int = 64 << 20) -> dict:
    """Concatenate several contiguous indexed datasets (same dtype) into one, streaming, atomically."""
    datasets = [IndexedDataset(p) for p in prefixes]
    if not datasets:
        raise ValueError("nothing to merge")
    dtype = datasets[0].dtype
    writer = IndexedDatasetWriter(out_prefix, dtype)
    try:
        for ds in datasets:
            if ds.dtype != dtype:
                raise ValueError(f"{ds.prefix}: dtype {ds.dtype} differs from {dtype}")
            if not ds.is_contiguous():
                raise ValueError(f"{ds.prefix}: not contiguous; cannot merge by concatenation")
            step = max(chunk_bytes // dtype.itemsize, 1)
            for a in range(0, ds.num_tokens, step):
                block = np.asarray(ds.tokens[a : a + step])
                writer._f.write(block.tobytes())
                writer._hash.update(block.tobytes())
            writer._sizes.extend(int(s) for s in ds.sizes)
            writer.num_tokens += ds.num_tokens
        return writer.finalize()
    except BaseException:
        writer.abort()
        raise
