"""Streaming corpus readers: ``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz`` files and Hugging Face ``datasets`` sources.

Everything streams: compressed files are decompressed chunk by chunk (zstd frame by frame, so truncation is
detected), lines are cut from a bounded buffer (a line longer than ``max_line_bytes`` is reported and skipped
without being held in memory), and the raw bytes of each input are hashed (SHA-256) as they are read.

The reader yields, in order, :class:`Record` (one per line / dataset row, or one per problem the reader itself
finds: unreadable file, empty file, corrupt or truncated compressed data, over-long line) and :class:`FileDone`
events (size, checksum and record count of an input once it has been read to the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import urllib.parse
import zlib
from typing import Iterator

import zstandard

SUFFIXES = (".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".jsonl", ".json.zst", ".json.gz")
READ_CHUNK = 1 << 20


@dataclasses.dataclass
class Source:
    """One input: a file (``path``) or a Hugging Face dataset (``hf`` options), in input group ``group``."""

    spec: str
    group: str  # "main", "val" or "test"
    path: str | None = None
    hf: dict | None = None

    @property
    def name(self) -> str:
        return self.path if self.path is not None else self.spec


@dataclasses.dataclass
class Record:
    source: int  # index into the source list
    rec_no: int  # 1-based position among this source's records (used for resuming)
    line_no: int  # 1-based line (file) or row (dataset) number; 0 for file-level problems
    payload: bytes | dict | None  # raw line bytes, a dataset row, or None for a reader-level problem
    reason: str | None = None  # reader-level problem: unreadable_file, empty_file, corrupt_compression, too_long
    message: str | None = None


@dataclasses.dataclass
class FileDone:
    source: int
    info: dict


class InputError(Exception):
    """A problem with an input; ``str()`` names the file and line."""


def parse_hf_spec(spec: str) -> dict:
    """``hf:PATH?split=train&data_files=GLOB&name=CONFIG`` → ``load_dataset`` arguments (``streaming=True``)."""
    rest = spec[3:]
    path, _, query = rest.partition("?")
    opts = {k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
    unknown = set(opts) - {"split", "data_files", "name", "data_dir"}
    if unknown:
        raise ValueError(f"{spec}: unknown option(s) {sorted(unknown)} (allowed: split, data_files, name, data_dir)")
    out = {"path": path, "split": opts.get("split", "train")}
    for k in ("data_files", "name", "data_dir"):
        if k in opts:
            out[k] = opts[k]
    return out


def resolve_inputs(specs: list[str], group: str) -> list[Source]:
    """Expand paths, directories (recursively, files with a JSONL suffix) and globs into sorted sources.

    Every input named must contribute: a directory without a file of a known suffix and a glob that matches no
    file raise InputError. A path that does not exist is kept (it is reported as unreadable when read).
    """
    out: list[Source] = []
    seen: set[str] = set()
    for spec in specs:
        if spec.startswith("hf:"):
            out.append(Source(spec=spec, group=group, hf=parse_hf_spec(spec)))
            continue
        if os.path.isdir(spec):
            paths = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(spec)
                for f in files
                if f.endswith(SUFFIXES)
            )
            if not paths:
                raise InputError(f"{spec}: directory holds no input file (none ends in {', '.join(SUFFIXES)})")
        elif any(c in spec for c in "*?["):
            paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not paths:
                raise InputError(f"{spec}: no files match")
        else:
            paths = [spec]
        for p in paths:
            key = os.path.realpath(p)  # a file named twice, also through a symbolic link, is read once
            if key not in seen:
                seen.add(key)
                out.append(Source(spec=spec, group=group, path=p))
    return out


class _HashingReader:
    """File wrapper that hashes and counts the raw bytes read (the hash of the bytes read so far identifies the
    prefix of the input a run has used; see ``pipeline.Tokenization``)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(READ_CHUNK):
            pass


class CompressionError(Exception):
    pass


def _zstd_blocks(raw: _HashingReader) -> Iterator[bytes]:
    """Decompressed blocks of a (possibly multi-frame) zstd stream; raises CompressionError on bad/truncated data,
    after yielding everything decompressed before the damage."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    in_frame = False
    pending = b""
    produced = 0
    while True:
        data = pending or raw.read(READ_CHUNK // 4)
        pending = b""
        if not data:
            break
        try:
            out = dobj.decompress(data)
        except zstandard.ZstdError as e:
            raise CompressionError(f"corrupt zstd data within compressed bytes {raw.bytes - len(data)}-{raw.bytes} "
                                   f"({produced} bytes decompressed before it): {e}") from None
        in_frame = True
        if out:
            produced += len(out)
            yield out
        if dobj.eof:
            pending = dobj.unused_data
            dobj = dctx.decompressobj()
            in_frame = False
    if in_frame:
        raise CompressionError(f"truncated zstd stream: ends inside a frame after {raw.bytes} compressed bytes "
                               f"({produced} bytes decompressed)")


def _gzip_blocks(raw: _HashingReader) -> Iterator[bytes]:
    """Decompressed blocks of a (possibly multi-member) gzip stream, at most READ_CHUNK bytes each; raises
    CompressionError on bad/truncated data after yielding everything decompressed before the damage (so, as for
    zstd, the complete leading documents of a truncated file are kept). Zero padding after a member is ignored,
    as gzip does."""
    dobj = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header and trailer required
    in_member = False
    pending = b""
    produced = 0
    while True:
        data = pending or raw.read(READ_CHUNK // 4)
        pending = b""
        if not data:
            break
        if not in_member:
            data = data.lstrip(b"\0")
            if not data:
                continue
        try:
            out = dobj.decompress(data, READ_CHUNK)
            while True:
                in_member = True
                if out:
                    produced += len(out)
                    yield out
                if not dobj.unconsumed_tail:
                    break
                out = dobj.decompress(dobj.unconsumed_tail, READ_CHUNK)
        except zlib.error as e:
            raise CompressionError(f"corrupt gzip data within compressed bytes {raw.bytes - len(data)}-{raw.bytes} "
                                   f"({produced} bytes decompressed before it): {e}") from None
        if dobj.eof:
            pending = dobj.unused_data
            dobj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            in_member = False
    if in_member:
        raise CompressionError(f"truncated gzip stream: ends inside a member after {raw.bytes} compressed bytes "
                               f"({produced} bytes decompressed)")


def _plain_blocks(raw: _HashingReader) -> Iterator[bytes]:
    while True:
        data = raw.read(READ_CHUNK)
        if not data:
            return
        yield data


def _blocks(path: str, raw: _HashingReader) -> Iterator[bytes]:
    if path.endswith((".zst", ".zstd")):
        return _zstd_blocks(raw)
    if path.endswith(".gz"):
        return _gzip_blocks(raw)
    return _plain_blocks(raw)


def _lines(blocks: Iterator[bytes], max_line_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """``(line, size)``; ``line is None`` for a line longer than ``max_line_bytes`` (skipped, never buffered)."""
    buf = bytearray()
    oversize = -1  # >= 0: bytes seen so far of an over-long line being discarded
    for block in blocks:
        start = 0
        while True:
            nl = block.find(b"\n", start)
            if nl < 0:
                piece = block[start:]
                if oversize >= 0:
                    oversize += len(piece)
                elif len(buf) + len(piece) > max_line_bytes:
                    oversize = len(buf) + len(piece)
                    buf.clear()
                else:
                    buf += piece
                break
            piece = block[start:nl]
            if oversize >= 0:
                yield None, oversize + len(piece)
                oversize = -1
            elif len(buf) + len(piece) > max_line_bytes:
                yield None, len(buf) + len(piece)
                buf.clear()
            else:
                if buf:
                    buf += piece
                    line = bytes(buf)
                    buf.clear()
                else:
                    line = piece
                yield line, len(line)
            start = nl + 1
    if oversize >= 0:
        yield None, oversize
    elif buf:
        yield bytes(buf), len(buf)


def read_file(source: Source, index: int, skip: int, max_line_bytes: int, limit: int | None,
              progress: dict | None = None) -> Iterator[Record | FileDone]:
    """Records of one file after the first ``skip``; at most ``limit`` records are yielded (``None``: all).

    ``FileDone.info``: ``complete`` is true only when every record of the file was read without a reader-level
    problem (``error`` names one); ``sha256`` covers the whole file when it was read to its end, else
    ``prefix_bytes``/``prefix_sha256`` the part read. ``progress`` (when given) holds the reader of the file being
    read, so that the caller can take the hash of the prefix read so far.
    """
    path = source.path
    assert path is not None
    rec_no = 0
    yielded = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        if skip < 1:
            yield Record(index, 1, 0, None, "unreadable_file", f"cannot open: {e.strerror or e}")
        yield FileDone(index, {"path": path, "group": source.group, "size_bytes": None, "sha256": None,
                               "records": 1, "complete": False, "error": f"unreadable_file: {e.strerror or e}"})
        return
    limited = False
    error = None
    with f:
        raw = _HashingReader(f)
        if progress is not None:
            progress.update(source=index, reader=raw)
        line_no = 0
        try:
            for line, size in _lines(_blocks(path, raw), max_line_bytes):
                line_no += 1
                rec_no += 1
                if rec_no <= skip:  # before the limit: a resumed run counts the records it skips, as the first did
                    continue
                if limit is not None and yielded >= limit:
                    rec_no -= 1
                    limited = True
                    break
                yielded += 1
                if line is None:
                    yield Record(index, rec_no, line_no, None, "too_long",
                                 f"line of {size} bytes exceeds the limit of {max_line_bytes} bytes")
                else:
                    yield Record(index, rec_no, line_no, line)
        except CompressionError as e:
            rec_no += 1
            error = ("corrupt_compression", str(e))
            if rec_no > skip:
                yield Record(index, rec_no, line_no + 1, None, *error)
        except OSError as e:
            rec_no += 1
            error = ("unreadable_file", f"read error: {e}")
            if rec_no > skip:
                yield Record(index, rec_no, line_no + 1, None, *error)
        if rec_no == 0 and not limited:
            rec_no = 1
            error = ("empty_file", "file contains no documents")
            if rec_no > skip:
                yield Record(index, 1, 0, None, *error)
        info = {"path": path, "group": source.group, "size_bytes": os.fstat(f.fileno()).st_size, "sha256": None,
                "records": rec_no, "complete": not limited and error is None}
        if error is not None:
            info["error"] = f"{error[0]}: {error[1]}"
        if limited:  # the rest is never read: the hash covers what was
            info.update(prefix_bytes=raw.bytes, prefix_sha256=raw.sha.hexdigest())
        else:
            with contextlib.suppress(OSError):
                raw.drain()  # e.g. bytes after the gzip trailer: the checksum covers the whole file
                info["sha256"] = raw.sha.hexdigest()
        if progress is not None:
            progress.clear()
        yield FileDone(index, info)


def read_hf(source: Source, index: int, skip: int, limit: int | None) -> Iterator[Record | FileDone]:
    """Rows of a Hugging Face dataset, as ``read_file`` yields lines: a dataset that cannot be opened, fails while
    streaming (e.g. a damaged data file) or has no rows gives one problem record and is not ``complete``."""
    import datasets  # imported lazily: only needed for hf: sources

    opts = dict(source.hf or {})
    rec_no = 0
    yielded = 0
    limited = False
    error = None  # (reason, message, line)
    try:
        ds = datasets.load_dataset(**opts, streaming=True)
    except Exception as e:  # noqa: BLE001 - any failure to open the source is reported as unreadable
        error = ("unreadable_file", f"load_dataset failed: {type(e).__name__}: {e}", 0)
        ds = ()
    try:
        for row in ds:
            if rec_no >= skip and limit is not None and yielded >= limit:
                limited = True
                break
            rec_no += 1
            if rec_no > skip:
                yielded += 1
                yield Record(index, rec_no, rec_no, dict(row))
    except Exception as e:  # noqa: BLE001 - whatever the dataset's reader raises ends it, named like a damaged file
        error = ("unreadable_file", f"reading row {rec_no + 1} failed: {type(e).__name__}: {e}", rec_no + 1)
    if error is None and rec_no == 0 and not limited:
        error = ("empty_file", "dataset contains no rows", 0)
    if error is not None:
        rec_no += 1
        if rec_no > skip:
            yield Record(index, rec_no, error[2], None, error[0], error[1])
    info = {"path": source.spec, "group": source.group, "hf": opts, "records": rec_no,
            "complete": not limited and error is None}
    if error is not None:
        info["error"] = f"{error[0]}: {error[1]}"
    yield FileDone(index, info)


def iter_records(sources: list[Source], *, start: tuple[int, int] = (0, 0), max_docs: int | None = None,
                 max_line_bytes: int = 1 << 28, group_counts: dict | None = None,
                 progress: dict | None = None) -> Iterator[Record | FileDone]:
    """All records of ``sources`` in order, starting after record ``start[1]`` of source ``start[0]``.

    ``max_docs`` limits the records read per input group (main / val / test); ``group_counts`` holds the records
    already read per group before ``start`` (for resuming); ``progress``: see ``read_file``.
    """
    counts = dict(group_counts or {})
    first, skip = start
    for i in range(first, len(sources)):
        src = sources[i]
        done_before = counts.get(src.group, 0)
        limit = None if max_docs is None else max(max_docs - done_before, 0)
        skip_here = skip if i == first else 0
        if limit == 0 and skip_here == 0:
            continue  # the group's limit is reached: later inputs of the group are not opened
        gen = read_hf(src, i, skip_here, limit) if src.hf is not None else read_file(
            src, i, skip_here, max_line_bytes, limit, progress)
        for ev in gen:
            if isinstance(ev, Record):
                counts[src.group] = counts.get(src.group, 0) + 1
            yield ev
