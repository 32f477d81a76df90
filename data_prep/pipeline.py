"""Tokenize a corpus into packed NeoX/Megatron indexed shards: ordered, parallel, bounded-memory, resumable.

Design
------
* Reading (main process): inputs are streamed in a fixed order (``--inputs`` then ``--val-inputs`` then
  ``--test-inputs``, each sorted); every line / dataset row is a *record* (numbered globally, reader-level problems
  such as an unreadable file count as one record too). Records are cut into batches (at most ``batch_docs``
  records or ``batch_bytes`` bytes) that are tokenized by a ``multiprocessing`` pool; at most
  ``2 * workers + 2`` batches are in flight, and results are consumed strictly in submission order, so memory is
  bounded independently of corpus size and output never depends on the worker count or on timing.
* Workers parse JSON, validate, assign the split (``val``/``test`` inputs go to that split; main inputs go to
  ``val``/``test`` when a keyed hash of the text falls below ``--val-fraction``/``--test-fraction``), encode with
  SentencePiece and append EOD.
* Chunks: records ``[k*D, (k+1)*D)`` (``D = --docs-per-shard``) form chunk ``k``; it becomes one shard per split,
  ``OUT/{split}/{split}-{k:05d}.bin/.idx`` (splits that received no document in the chunk get no file). Each
  shard file is written to a temporary name, fsynced and renamed (``.bin`` before ``.idx``); then the chunk's
  record ``OUT/.state/chunk-{k:05d}.json`` (counts, input position, checksums of inputs finished in the chunk) is
  written atomically. That record is the commit point.
* Resume: a rerun with the same inputs and options finds the committed chunks (a contiguous prefix, each with
  its shard files present at the recorded sizes), removes temporary files of the killed run, skips the inputs
  before the recorded position (later inputs are re-read from their start only up to that position, without
  tokenizing) and continues with the next chunk, producing the same bytes as an uninterrupted run. Changing the
  inputs or an output-affecting option makes the rerun refuse (``--overwrite`` starts over). Inputs are compared
  by content, not only by name and size: each chunk record holds the SHA-256 of every input finished in it (whole
  file, computed while reading) and of the prefix read so far of the input in progress; before continuing, a rerun
  hashes those files (or prefixes) again and refuses on any difference. That costs one extra read of the input
  bytes already used (at disk speed, nothing is decompressed or tokenized), also when rerunning a finished run.
* When the stream ends, the chunk records are merged into ``OUT/manifest.json`` (and ``OUT/{split}/manifest.json``
  listing that split's shards in order), written last and atomically: a directory without ``manifest.json`` is
  not a finished output.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time

from pretrain.atomic import copy_file_atomic, write_json_atomic
from pretrain.cores import available_cores
from pretrain.data.writer import IndexedDatasetWriter, bin_path, idx_bytes, idx_path, token_dtype_name

from pretrain.data.sources import FileDone, InputError, Record, Source, iter_records, resolve_inputs
from pretrain.data.tokenizer import Tokenizer, file_sha256

from .workers import FILTER_REASON, SPLITS, init_worker, process_batch, set_parent_death_signal

FORMAT = "rebased-pretrain/tokenized-shards/v1"

# Test hooks (used by tests/data/test_data_resume.py): sleep after each committed chunk; or exit abruptly in the middle
# of committing chunk N (after its shard files are renamed into place, before its chunk record is written).
ENV_CHUNK_DELAY = "DATA_PREP_TEST_CHUNK_DELAY_S"
ENV_EXIT_AT_CHUNK = "DATA_PREP_TEST_EXIT_AT_CHUNK"


@dataclasses.dataclass
class TokenizeConfig:
    inputs: list[str]
    out: str
    tokenizer: str
    val_inputs: list[str] = dataclasses.field(default_factory=list)
    test_inputs: list[str] = dataclasses.field(default_factory=list)
    text_key: str = "text"
    set_key: str = "meta.pile_set_name"
    include_sets: list[str] | None = None
    exclude_sets: list[str] | None = None
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    split_seed: int = 0
    max_docs: int | None = None
    max_doc_bytes: int = 64 << 20
    prepend_bos: bool = False
    on_error: str = "stop"
    docs_per_shard: int = 100_000
    workers: int = 0  # 0: all available cores
    # Work items small enough that a few MB still spread evenly over the workers (~40 ms of encoding each).
    batch_docs: int = 64
    batch_bytes: int = 256 << 10
    merge: bool = False
    overwrite: bool = False
    progress: bool = True

    def output_options(self) -> dict:
        """Options that change the output bytes (part of the resume fingerprint)."""
        keys = ("text_key", "set_key", "include_sets", "exclude_sets", "val_fraction", "test_fraction", "split_seed",
                "max_docs", "max_doc_bytes", "prepend_bos", "on_error", "docs_per_shard")
        return {k: getattr(self, k) for k in keys}


# ---------------------------------------------------------------------------------------------------------------
# Main process
# ---------------------------------------------------------------------------------------------------------------
_GROUP_OPTION = {"main": "--inputs", "val": "--val-inputs", "test": "--test-inputs"}


def _check_groups_disjoint(sources: list[Source]) -> None:
    """An input named in two groups would put its documents in two splits (held-out data trained on): refuse. Files
    are compared by their real path, so a symbolic link to a file of another group counts as that file."""
    group_of: dict[str, str] = {}
    for s in sources:
        key = os.path.realpath(s.path) if s.path is not None else s.spec
        first = group_of.setdefault(key, s.group)
        if first != s.group:
            raise InputError(f"{s.name}: given in both {_GROUP_OPTION[first]} and {_GROUP_OPTION[s.group]}; "
                             "its documents would be in two splits")


def _output_paths(out: str) -> list[str]:
    """What a run writes in ``out`` (and ``--overwrite`` deletes first): the splits' folders, the state, the
    manifest, the tokenizer copy and the merged shards."""
    names = (".state", *SPLITS, "manifest.json", "tokenizer.model", *(f"{s}.{ext}" for s in SPLITS
                                                                       for ext in ("bin", "idx")))
    return [os.path.join(os.path.realpath(out), name) for name in names]


def _check_inputs_outside_output(sources: list[Source], out: str, tokenizer: str, overwrite: bool) -> None:
    """An input inside what the run writes would be mixed with its shards, and deleted by ``--overwrite``: refuse.
    Inputs elsewhere under ``out`` (say ``out/raw/``) are fine."""
    managed = _output_paths(out)

    def inside(path: str) -> str | None:
        real = os.path.realpath(path)
        return next((m for m in managed if real == m or real.startswith(m + os.sep)), None)

    for s in sources:
        hit = inside(s.path) if s.path is not None else None
        if hit is not None:
            raise InputError(f"{s.name}: inside {hit}, which this run writes{' (and --overwrite deletes)' * overwrite}; "
                             "put the inputs or --out elsewhere")
    if overwrite and inside(tokenizer) is not None:
        raise InputError(f"--tokenizer {tokenizer}: --overwrite deletes it from {out} before the run reads it; "
                         "copy it elsewhere first")


def _new_stats() -> dict:
    return {"documents_read": 0, "documents_written": 0, "documents_skipped": 0, "skipped_by_reason": {},
            "tokens": 0, "text_bytes": 0}


def _add_stats(a: dict, b: dict) -> None:
    for k in ("documents_read", "documents_written", "documents_skipped", "tokens", "text_bytes"):
        a[k] += b[k]
    for r, n in b["skipped_by_reason"].items():
        a["skipped_by_reason"][r] = a["skipped_by_reason"].get(r, 0) + n


class _Chunk:
    def __init__(self, k: int, out: str, dtype):
        self.k, self.out, self.dtype = k, out, dtype
        self.writers: dict[int, IndexedDatasetWriter] = {}
        self.stats = _new_stats()
        self.splits = {s: {"documents": 0, "tokens": 0, "text_bytes": 0} for s in SPLITS}
        self.per_set: dict[str, dict] = {}
        self.files_done: list[dict] = []
        self.examples: list[dict] = []

    def shard_name(self, split: int) -> str:
        return f"{SPLITS[split]}-{self.k:05d}"

    def writer(self, split: int) -> IndexedDatasetWriter:
        w = self.writers.get(split)
        if w is None:
            prefix = os.path.join(self.out, SPLITS[split], self.shard_name(split))
            w = self.writers[split] = IndexedDatasetWriter(prefix, self.dtype)
        return w

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


class Tokenization:
    def __init__(self, cfg: TokenizeConfig):
        if cfg.on_error not in ("stop", "skip"):
            raise ValueError("on_error must be 'stop' or 'skip'")
        if not (cfg.val_fraction >= 0 and cfg.test_fraction >= 0 and cfg.val_fraction + cfg.test_fraction < 1):
            raise ValueError("need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1")
        if cfg.docs_per_shard < 1 or cfg.batch_docs < 1:
            raise ValueError("docs_per_shard and batch_docs must be >= 1")
        if cfg.max_docs is not None and cfg.max_docs < 1:  # 0 would write empty splits and call the run complete
            raise ValueError(f"--max-docs must be >= 1, got {cfg.max_docs}")
        self.cfg = cfg
        self.out = cfg.out
        self.state_dir = os.path.join(self.out, ".state")
        self.tok = Tokenizer(cfg.tokenizer)
        self.dtype = token_dtype_name(self.tok.vocab_size)
        if self.tok.eod_id < 0:
            raise ValueError(f"{cfg.tokenizer}: the tokenizer defines no EOS/EOD token")
        if cfg.prepend_bos and self.tok.bos_id < 0:
            raise ValueError(f"{cfg.tokenizer}: --prepend-bos but the tokenizer defines no BOS token")
        self.sources: list[Source] = (
            resolve_inputs(cfg.inputs, "main") + resolve_inputs(cfg.val_inputs, "val")
            + resolve_inputs(cfg.test_inputs, "test"))
        if not self.sources:
            raise InputError("no inputs")
        _check_groups_disjoint(self.sources)
        _check_inputs_outside_output(self.sources, self.out, cfg.tokenizer, cfg.overwrite)
        self.workers = cfg.workers or available_cores()
        self._reading: dict = {}  # the file being read and its hashing reader (sources.read_file's ``progress``)

    # ---- fingerprint and resume ----------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        inputs = []
        for s in self.sources:
            size = None
            if s.path is not None:
                with contextlib.suppress(OSError):
                    size = os.path.getsize(s.path)
            inputs.append({"input": s.name, "group": s.group, "size_bytes": size})
        fp = {"format": FORMAT, "tokenizer_sha256": self.tok.sha256, "inputs": inputs,
              "options": self.cfg.output_options()}
        fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        return fp

    def _piece_path(self, k: int) -> str:
        return os.path.join(self.state_dir, f"chunk-{k:05d}.json")

    def _piece_valid(self, piece: dict) -> bool:
        for split, shard in piece["shards"].items():
            prefix = os.path.join(self.out, split, shard["name"])
            try:
                # sizes of both files: a chunk whose .idx was damaged is tokenized again, not found at load time
                if (os.path.getsize(bin_path(prefix)) != shard["bin_bytes"]
                        or os.path.getsize(idx_path(prefix)) != idx_bytes(shard["documents"])):
                    return False
            except OSError:
                return False
        return True

    def prepare(self) -> list[dict]:
        """Check/create the output directory; return the committed chunk records (contiguous prefix)."""
        fp = self.fingerprint()
        cfg_path = os.path.join(self.state_dir, "run_config.json")
        if self.cfg.overwrite and os.path.isdir(self.out):
            for path in _output_paths(self.out):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
        os.makedirs(self.state_dir, exist_ok=True)
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                old = json.load(f)
            if old.get("id") != fp["id"]:
                raise InputError(
                    f"{self.out} holds a run with different inputs/options/tokenizer (fingerprint {old.get('id')} vs "
                    f"{fp['id']}); use --overwrite to start over, or another --out")
        else:
            write_json_atomic(cfg_path, fp, sort_keys=True)
        self.fp = fp
        # Remove leftovers of killed runs: temporary files never look complete, but they take space. Only where this
        # run writes (OUT itself, .state, the split folders): anything else under OUT (e.g. inputs in OUT/raw) is
        # not ours
        for folder in (self.out, self.state_dir, *(os.path.join(self.out, s) for s in SPLITS)):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    path = os.path.join(folder, name)
                    if ".tmp-" in name and os.path.isfile(path):
                        os.remove(path)
        pieces: list[dict] = []
        k = 0
        while True:
            path = self._piece_path(k)
            if not os.path.exists(path):
                break
            try:
                with open(path) as f:
                    piece = json.load(f)
            except (OSError, ValueError):
                break
            if piece.get("fingerprint") != fp["id"] or piece.get("chunk") != k or not self._piece_valid(piece):
                break
            pieces.append(piece)
            if piece["final"]:
                break
            k += 1
        # Chunk records after a gap are stale: drop them (their shards are rewritten).
        for name in os.listdir(self.state_dir):
            number = name[6:-5]  # chunk-NNNNN.json: five digits up to chunk 99999, more after
            if name.startswith("chunk-") and name.endswith(".json") and number.isdigit() and int(number) >= len(pieces):
                os.remove(os.path.join(self.state_dir, name))
        self._check_inputs_unchanged(pieces)
        return pieces

    def _check_inputs_unchanged(self, pieces: list[dict]) -> None:
        """The inputs the committed chunks were made from still hold the same bytes (see module docstring)."""
        used: dict[str, tuple[int | None, str]] = {}
        for piece in pieces:
            for info in piece["files_done"]:
                if info.get("sha256"):
                    used[info["path"]] = (None, info["sha256"])
                elif info.get("prefix_sha256"):
                    used[info["path"]] = (info["prefix_bytes"], info["prefix_sha256"])
        reading = pieces[-1].get("reading") if pieces else None
        if reading:
            used[self.sources[reading["source"]].name] = (reading["bytes"], reading["sha256"])
        for path, (nbytes, expected) in used.items():
            try:
                got = file_sha256(path, limit=nbytes)
            except OSError as e:
                raise InputError(f"{path}: cannot read it to check it is unchanged since the earlier run in "
                                 f"{self.out}: {e.strerror or e}") from None
            if got != expected:
                what = "its content" if nbytes is None else f"its first {nbytes} bytes"
                raise InputError(
                    f"{path}: changed since the earlier run in {self.out} wrote its shards (sha256 of {what} "
                    f"differs); restore it, or use --overwrite to start over")

    # ---- main loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        lock = self._lock()
        try:
            pieces = self.prepare()
            resumed_chunks = len(pieces)
            if not (pieces and pieces[-1]["final"]):
                self._process(pieces)
            manifest = self._write_manifest(pieces, resumed_chunks, time.time() - t0)
        finally:
            lock.close()
        return manifest

    def _lock(self):
        os.makedirs(self.out, exist_ok=True)
        f = open(os.path.join(self.out, ".lock"), "w")
        try:
            import fcntl  # POSIX only: elsewhere the run goes on unlocked

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover
            pass
        except OSError:
            f.close()
            raise InputError(f"{self.out} is in use by another tokenize_pile run") from None
        return f

    def _options(self) -> dict:
        c = self.cfg
        return {"text_key": c.text_key, "set_key": c.set_key, "include_sets": c.include_sets,
                "exclude_sets": c.exclude_sets, "val_fraction": c.val_fraction, "test_fraction": c.test_fraction,
                "split_seed": c.split_seed, "max_doc_bytes": c.max_doc_bytes, "prepend_bos": c.prepend_bos}

    def _events(self, pieces: list[dict]):
        """Batches, file-done and chunk-end events in stream order (see module docstring)."""
        cfg = self.cfg
        D = cfg.docs_per_shard
        chunk = len(pieces)
        if pieces:
            start = tuple(pieces[-1]["end"])
            counts = dict(pieces[-1]["group_records"])
        else:
            start, counts = (0, 0), {}
        pos = start
        n = chunk * D
        reader = iter_records(self.sources, start=start, max_docs=cfg.max_docs, max_line_bytes=max_line_bytes(cfg),
                              group_counts=counts, progress=self._reading)
        batch: list[tuple] = []
        nbytes = 0
        for ev in reader:
            if isinstance(ev, FileDone):
                if batch:
                    yield "batch", batch
                    batch, nbytes = [], 0
                yield "file", ev.info
                continue
            rec: Record = ev
            group = self.sources[rec.source].group
            batch.append((rec.source, rec.line_no, group, rec.payload, rec.reason, rec.message))
            nbytes += len(rec.payload) if isinstance(rec.payload, (bytes, bytearray)) else 256
            counts[group] = counts.get(group, 0) + 1
            pos = (rec.source, rec.rec_no)
            n += 1
            if len(batch) >= cfg.batch_docs or nbytes >= cfg.batch_bytes or n % D == 0:
                yield "batch", batch
                batch, nbytes = [], 0
            if n % D == 0:
                yield "chunk_end", {"end": list(pos), "group_records": dict(counts), "final": False,
                                    "reading": self._prefix_read()}
        if batch:
            yield "batch", batch
        yield "chunk_end", {"end": list(pos), "group_records": dict(counts), "final": True}

    def _prefix_read(self) -> dict | None:
        """Size and SHA-256 of the bytes read so far of the input being read (None between inputs)."""
        raw = self._reading.get("reader")
        if raw is None:
            return None
        return {"source": self._reading["source"], "bytes": raw.bytes, "sha256": raw.sha.copy().hexdigest()}

    def _process(self, pieces: list[dict]) -> None:
        options = self._options()
        pool = None
        if self.workers > 1:
            # a pool only with --workers > 1; concurrent.futures, not multiprocessing.Pool: a worker killed (e.g. by
            # the OOM killer) fails its batch with BrokenProcessPool, where Pool waited for the result forever
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            if "fork" in mp.get_all_start_methods():  # workers inherit the parsed tokenizer: no parse per worker
                init_worker(self.tok.model_proto, options, tok=self.tok)
                pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"),
                                           initializer=set_parent_death_signal)
            else:
                pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
                                           initargs=(self.tok.model_proto, options))
        else:
            init_worker(self.tok.model_proto, options, tok=self.tok)
        max_inflight = 2 * self.workers + 2
        chunk = _Chunk(len(pieces), self.out, self.dtype)
        pending: collections.deque = collections.deque()
        bar = self._progress()
        try:
            for kind, payload in self._events(pieces):
                if kind == "batch":
                    if pool is not None:
                        pending.append(("batch", pool.submit(process_batch, payload), payload))
                    else:
                        pending.append(("batch", process_batch(payload), payload))
                else:
                    pending.append((kind, payload, None))
                while pending and (len(pending) > max_inflight or _ready(pending[0])):
                    chunk = self._handle(pending.popleft(), chunk, pieces, bar)
            while pending:
                chunk = self._handle(pending.popleft(), chunk, pieces, bar)
        except BaseException:
            chunk.abort()
            if pool is not None:
                # wait for the workers (their batches are small): forked, they share the OUT/.lock of this run, which
                # a rerun would otherwise find still held
                pool.shutdown(cancel_futures=True)
                pool = None
            raise
        finally:
            if pool is not None:
                pool.shutdown()
            if bar is not None:
                bar.close()

    def _batch_result(self, future) -> dict:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            raise WorkerDiedError(f"a tokenizer worker process died (killed, e.g. by the out-of-memory killer?) while "
                               f"writing {self.out}: the shards of the unfinished chunk were removed; rerun the same "
                               "command to resume (with fewer --workers or a smaller --batch-bytes if memory ran "
                               "out)") from None

    def _progress(self):
        return _Progress() if self.cfg.progress else None

    def _handle(self, item, chunk: _Chunk, pieces: list[dict], bar) -> _Chunk:
        kind, payload, records = item
        if kind == "file":
            chunk.files_done.append(payload)
            return chunk
        if kind == "chunk_end":
            pieces.append(self._commit(chunk, payload))
            delay = float(os.environ.get(ENV_CHUNK_DELAY, "0") or 0)
            if delay:
                time.sleep(delay)
            return _Chunk(chunk.k + 1, self.out, self.dtype)
        result = payload if isinstance(payload, dict) else self._batch_result(payload)
        st = chunk.stats
        tokens_before, bytes_before = st["tokens"], st["text_bytes"]
        for (split, set_name, ntok, tbytes, reason, message), rec in zip(result["docs"], records):
            st["documents_read"] += 1
            ps = chunk.per_set.setdefault(set_name, {"documents_read": 0, "documents_written": 0,
                                                     "documents_skipped": 0, "tokens": 0, "text_bytes": 0})
            ps["documents_read"] += 1
            if reason is not None:
                if reason != FILTER_REASON and self.cfg.on_error == "stop":
                    src = self.sources[rec[0]]
                    where = f"{src.name}:{rec[1]}" if rec[1] else src.name
                    raise InputError(f"{where}: {reason}: {message} (use --on-error skip to skip and count such records)")
                st["documents_skipped"] += 1
                st["skipped_by_reason"][reason] = st["skipped_by_reason"].get(reason, 0) + 1
                ps["documents_skipped"] += 1
                if reason != FILTER_REASON and len(chunk.examples) < 20:
                    chunk.examples.append({"input": self.sources[rec[0]].name, "line": rec[1], "reason": reason,
                                           "message": message[:300]})
                continue
            st["documents_written"] += 1
            st["tokens"] += ntok
            st["text_bytes"] += tbytes
            ps["documents_written"] += 1
            ps["tokens"] += ntok
            ps["text_bytes"] += tbytes
            sp = chunk.splits[SPLITS[split]]
            sp["documents"] += 1
            sp["tokens"] += ntok
            sp["text_bytes"] += tbytes
        for split in sorted(result["tokens"]):
            flat, lengths = result["tokens"][split]
            chunk.writer(split).add_documents(flat, lengths)
        if bar is not None:
            bar.update(len(result["docs"]), st["tokens"] - tokens_before, st["text_bytes"] - bytes_before)
        return chunk

    def _commit(self, chunk: _Chunk, end: dict) -> dict:
        shards = {}
        for split in sorted(chunk.writers):
            info = chunk.writers[split].finalize()
            shards[SPLITS[split]] = {"name": chunk.shard_name(split), **info}
        exit_at = os.environ.get(ENV_EXIT_AT_CHUNK)
        if exit_at is not None and int(exit_at) == chunk.k:
            os._exit(75)  # test hook: crash after the shards are in place, before the chunk is committed
        st = chunk.stats
        assert st["documents_read"] == st["documents_written"] + st["documents_skipped"]
        piece = {"chunk": chunk.k, "fingerprint": self.fp["id"], **end, "shards": shards, "stats": st,
                 "splits": chunk.splits, "per_set": chunk.per_set, "files_done": chunk.files_done,
                 "examples": chunk.examples}
        write_json_atomic(self._piece_path(chunk.k), piece, sort_keys=True)
        return piece

    # ---- manifest ----------------------------------------------------------------------------------------
    def _write_manifest(self, pieces: list[dict], resumed_chunks: int, elapsed: float) -> dict:
        totals = _new_stats()
        per_set: dict[str, dict] = {}
        splits = {s: {"documents": 0, "tokens": 0, "text_bytes": 0, "shards": []} for s in SPLITS}
        files: dict[str, dict] = {}
        examples: list[dict] = []
        for p in pieces:
            _add_stats(totals, p["stats"])
            for name, c in p["per_set"].items():
                agg = per_set.setdefault(name, dict.fromkeys(c, 0))
                for k, v in c.items():
                    agg[k] += v
            for s in SPLITS:
                for k in ("documents", "tokens", "text_bytes"):
                    splits[s][k] += p["splits"][s][k]
                if s in p["shards"]:
                    splits[s]["shards"].append(p["shards"][s])
            for info in p["files_done"]:
                files[info["path"]] = info
            examples.extend(p["examples"][: max(0, 50 - len(examples))])
        assert totals["documents_read"] == totals["documents_written"] + totals["documents_skipped"]
        inputs = []
        for s in self.sources:
            info = files.get(s.name) or {"path": s.name, "group": s.group, "records": 0, "complete": False,
                                         "note": "not read (--max-docs reached)"}
            inputs.append(info)
        tok_copy = os.path.join(self.out, "tokenizer.model")
        if not os.path.exists(tok_copy) or file_sha256(tok_copy) != self.tok.sha256:
            copy_file_atomic(self.cfg.tokenizer, tok_copy)
        tokenizer = {"source_path": os.path.abspath(self.cfg.tokenizer), "path": "tokenizer.model",
                     "sha256": self.tok.sha256, "vocab_size": self.tok.vocab_size, "eod_id": self.tok.eod_id,
                     "bos_id": self.tok.bos_id, "pad_id": self.tok.pad_id, "unk_id": self.tok.unk_id}
        for s in SPLITS:
            if splits[s]["shards"]:
                write_json_atomic(os.path.join(self.out, s, "manifest.json"), sort_keys=True, obj={
                    "format": FORMAT, "split": s, "dtype": self.dtype, "tokenizer": tokenizer,
                    **{k: splits[s][k] for k in ("documents", "tokens", "text_bytes")}, "shards": splits[s]["shards"]})
        merged = {}
        if self.cfg.merge:
            from pretrain.data.indexed import merge_indexed  # numpy: only needed here

            for s in SPLITS:
                if splits[s]["shards"]:
                    prefixes = [os.path.join(self.out, s, sh["name"]) for sh in splits[s]["shards"]]
                    merged[s] = {"prefix": s, **merge_indexed(prefixes, os.path.join(self.out, s))}
        manifest = {
            "format": FORMAT,
            "fingerprint": self.fp["id"],
            "tokenizer": tokenizer,
            "dtype": self.dtype,
            "eod_appended": True,
            "bos_prepended": self.cfg.prepend_bos,
            "options": self.cfg.output_options(),
            "inputs": inputs,
            "counts": totals,
            "splits": {s: v for s, v in splits.items() if v["documents"] or s == "train"},
            "merged": merged,
            "per_pile_set": dict(sorted(per_set.items())),
            "skipped_examples": examples,
            "chunks": len(pieces),
            "last_run": {"workers": self.workers, "elapsed_s": round(elapsed, 3), "resumed_chunks": resumed_chunks,
                         "argv": sys.argv},
        }
        write_json_atomic(os.path.join(self.out, "manifest.json"), manifest, sort_keys=True)
        return manifest


class _Progress:
    """A tqdm bar (documents, tokens/s, MB/s) that appears once a run has taken a second: a shorter run does not
    pay for importing tqdm (~40 ms, a measurable part of tokenizing a few MB)."""

    def __init__(self):
        self.t0 = time.time()
        self.docs = self.tokens = self.bytes = 0
        self.bar = None

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        dt = time.time() - self.t0
        if self.bar is None:
            if dt < 1.0:
                return
            from tqdm import tqdm  # imported after the first second only: short runs skip its import cost

            self.bar = tqdm(unit=" docs", desc="tokenizing", dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
                            initial=self.docs - docs)
        self.bar.update(docs)
        self.bar.set_postfix_str(f"{self.tokens / dt:,.0f} tok/s, {self.bytes / dt / 1e6:.2f} MB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def max_line_bytes(cfg: TokenizeConfig) -> int:
    """The longest JSON line read (longer ones are skipped unparsed, never buffered whole): room for a text of
    ``--max-doc-bytes`` escaped in the worst case (``\\u0001``: 6 bytes for 1) and its metadata. The text's own
    UTF-8 bytes are what ``--max-doc-bytes`` limits."""
    return 6 * cfg.max_doc_bytes + (1 << 20)


class WorkerDiedError(RuntimeError):
    """A tokenizer process of ``--workers N`` died before returning its batch."""


def _ready(item) -> bool:
    kind, payload, _ = item
    if kind != "batch" or isinstance(payload, dict):
        return True
    return payload.done()


def tokenize(cfg: TokenizeConfig) -> dict:
    """Run (or resume) a tokenization; returns the manifest."""
    return Tokenization(cfg).run()


def format_summary(manifest: dict) -> str:
    c = manifest["counts"]
    lines = [
        f"documents read {c['documents_read']:,}  written {c['documents_written']:,}  skipped {c['documents_skipped']:,}",
    ]
    for reason, n in sorted(c["skipped_by_reason"].items()):
        lines.append(f"  skipped ({reason}): {n:,}")
    lines.append(f"tokens {c['tokens']:,}  text {c['text_bytes'] / 1e6:,.2f} MB  dtype {manifest['dtype']}")
    for s, v in manifest["splits"].items():
        lines.append(f"  {s}: {v['documents']:,} docs, {v['tokens']:,} tokens, {len(v['shards'])} shard(s)")
    run = manifest["last_run"]
    if run["elapsed_s"] > 0:
        lines.append(f"time {run['elapsed_s']:.1f}s with {run['workers']} worker(s)"
                     + (f", resumed after {run['resumed_chunks']} committed chunk(s)" if run["resumed_chunks"] else ""))
    if c["skipped_by_reason"]:
        for ex in manifest["skipped_examples"][:5]:
            lines.append(f"  e.g. {ex['input']}:{ex['line']}: {ex['reason']}: {ex['message']}")
    return "\n".join(lines)
