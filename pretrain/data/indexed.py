"""Reader for the NeoX/Megatron ``MMIDIDX`` indexed dataset format (``.bin`` + ``.idx``); the writer lives in
:mod:`pretrain.data.writer` (no numpy) and is re-exported here.

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

import os
import struct

import numpy as np

from .writer import (CODES, HEADER_BYTES, MAGIC, VERSION, IndexedDatasetWriter, bin_path, idx_path,
                     token_dtype_name)

__all__ = ["IndexFormatError", "IndexedDataset", "IndexedDatasetWriter", "merge_indexed", "token_dtype", "bin_path",
           "idx_path", "MAGIC", "VERSION", "HEADER_BYTES", "DTYPE_CODES"]

DTYPE_CODES = {code: np.dtype(name).type for code, (name, _, _) in CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype gpt-neox/Megatron pick for a vocabulary: uint16 below 65500 entries, otherwise int32."""
    return np.dtype(token_dtype_name(vocab_size))


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

    def __reduce__(self):
        # pickled by its path, reopened on load: a memmap pickles as a full copy of the file (a DataLoader worker
        # started by spawn or forkserver would hold the whole shard in memory)
        return type(self), (self.prefix,)

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
                writer._write(np.asarray(ds.tokens[a : a + step]).tobytes())
            writer._sizes.extend(int(s) for s in ds.sizes)
            writer.num_tokens += ds.num_tokens
        return writer.finalize()
    except BaseException:
        writer.abort()
        raise
