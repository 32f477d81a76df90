"""Atomic, verified, keep-last-K checkpoint directories with a ``latest`` pointer.

Layout under the checkpoint root::

    step_00000100/          a complete checkpoint (only ever created by renaming a finished temp dir)
        meta.json           trainer state: step, data-loader state, world size, strategy, format, config
        rng/rank_00000.pt   python / numpy / torch CPU / CUDA RNG states, per rank
        dcp/ | deepspeed/   model + optimizer (torch.distributed.checkpoint, or DeepSpeed's native files)
        COMPLETE            written last: JSON listing every other file with its size and xxh3-64 hash
    step_00000200.tmp-4242/ a save in progress (or one killed mid-save): never picked, removed on the next start
    step_00000300.corrupt/  a checkpoint that failed verification, moved aside by ``resume: auto`` (kept for a look)
    step_00000400.superseded/  newer than a step saved by a run that resumed from an older checkpoint (kept aside)
    latest                  name of the newest complete checkpoint (replaced atomically)

Save protocol: every rank writes into the temp dir, barrier; rank 0 writes meta.json and lists the files; each rank
checksums and fsyncs its share of them (``checksum_share``); rank 0 writes COMPLETE with all sizes and checksums,
renames the dir to its final name, fsyncs the root, points ``latest`` at it (write + rename) and deletes the oldest
complete checkpoints beyond ``keep_last``. ``COMPLETE`` only says the save finished; nothing in a checkpoint is
trusted before ``verify`` has checked every listed file's size and checksum (a truncated, zeroed or garbled byte
anywhere fails it). xxh3-64 because it is the cheapest checksum that catches such damage: ~11 GB/s from the page
cache against ~4 GB/s for zlib's CRC-32, so the 2 GB checkpoint of the 150M model costs a fraction of a second
(benchmarks/checkpoint_checksum.py). The root must be on a filesystem shared by all ranks (as for any multi-node
checkpointing).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import xxhash

from pretrain.atomic import fsync_dir, write_text_atomic
from pretrain.config import ConfigError

STEP_RE = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"
LATEST = "latest"
CHECKSUM = "xxh3_64"
_READ = 8 << 20

log = logging.getLogger("pretrain")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted (it failed verification), or none that can be resumed."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dirs(root: str):
    for dirpath, _, _ in os.walk(root):
        fsync_dir(dirpath)


def is_complete(path: str) -> bool:
    """The save finished (the marker exists). Says nothing about the files' integrity: see ``verify``."""
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_complete(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path) and is_complete(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def find_latest(root: str) -> str | None:
    """The newest complete checkpoint: the ``latest`` pointer if it names a complete one, else a scan."""
    complete = list_complete(root)
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if STEP_RE.match(name) and is_complete(path):
            # never older than what is on disk (the pointer is replaced after the rename)
            if not complete or int(STEP_RE.match(name).group(1)) >= complete[-1][0]:
                return path
    return complete[-1][1] if complete else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def remove_stale_temps(root: str):
    """Leftovers of a process that died while saving or rotating: temp dirs of saves that never finished, and
    checkpoints half deleted by the rotation, are removed; a checkpoint set aside to be replaced by a new save of
    its step (``commit``) goes back in place when that save never landed."""
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        replaced = re.match(r"^(step_\d+)\.old-\d+$", name)
        if replaced and not os.path.exists(os.path.join(root, replaced.group(1))) and is_complete(path):
            os.rename(path, os.path.join(root, replaced.group(1)))
            fsync_dir(root)
        elif ".tmp-" in name or ".deleting-" in name or replaced:
            shutil.rmtree(path, ignore_errors=True)


def temp_dir_name(step: int) -> str:
    return f"{step_dir_name(step)}.tmp-{os.getpid()}-{int(time.time() * 1000) % 10**8}"


# -- checksums ---------------------------------------------------------------------------------------------------
def file_checksum(path: str, fsync: bool = False) -> tuple[int, str]:
    """(size, xxh3-64 as 16 hex digits) of a file, read in 8 MiB blocks; ``fsync`` also flushes it to disk."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def list_files(root: str) -> list[str]:
    """Every file under ``root`` but the marker, as sorted '/'-separated relative paths."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != COMPLETE:
                out.append(rel)
    return sorted(out)


def checksum_share(root: str, files: list[str], rank: int = 0, world: int = 1) -> dict[str, list]:
    """Size and checksum of this rank's share of ``files`` (every ``world``-th, from ``rank``), fsynced."""
    return {rel: list(file_checksum(os.path.join(root, rel), fsync=True)) for rel in files[rank::world]}


def read_marker(path: str) -> dict:
    """The ``COMPLETE`` marker's file list; raises CheckpointError when it is missing or unreadable."""
    marker = os.path.join(path, COMPLETE)
    try:
        with open(marker) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{marker}: missing (the save never finished)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{marker}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("checksum") != CHECKSUM:
        raise CheckpointError(f"{marker}: no {CHECKSUM} checksums recorded (written by an older version?); "
                              "it cannot be verified")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
            for v in files.values()):
        raise CheckpointError(f"{marker}: malformed file list")
    return files


def verify(path: str, rank: int = 0, world: int = 1, required: tuple[str, ...] = ("meta.json",)) -> list[str]:
    """Problems found in this rank's share of the checkpoint's files (empty: they match what was saved). Every rank
    also checks the marker itself and that it lists the ``required`` files; the caller gathers the ranks' lists."""
    try:
        files = read_marker(path)
    except CheckpointError as e:
        return [str(e)]
    problems = [f"{os.path.join(path, COMPLETE)}: does not list {rel}" for rel in required if rel not in files]
    for rel in sorted(files)[rank::world]:
        size, digest = files[rel]
        f = os.path.join(path, rel)
        try:
            got_size, got_digest = file_checksum(f)
        except OSError as e:
            problems.append(f"{f}: {e.strerror or e}")
            continue
        if got_size != size:
            problems.append(f"{f}: {got_size} bytes, {size} were saved")
        elif got_digest != digest:
            problems.append(f"{f}: contents changed since the save ({CHECKSUM} {got_digest}, saved {digest})")
    return problems


def move_aside(path: str, why: str = "corrupt") -> str:
    """Rename a checkpoint out of the way (``step_N.corrupt`` when it failed verification): it is never picked,
    counted or deleted again, and stays for inspection."""
    dest, n = f"{path}.{why}", 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.{why}{n}"
    os.rename(path, dest)
    fsync_dir(os.path.dirname(path) or ".")
    return dest


def write_meta(tmp: str, meta: dict):
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def write_marker(path: str, step: int | None, files: dict[str, list]):
    """Write ``COMPLETE`` (the file list with sizes and checksums) last, fsynced with the directories."""
    with open(os.path.join(path, COMPLETE), "w") as f:
        json.dump({"step": step, "checksum": CHECKSUM, "files": files}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dirs(path)


def commit(root: str, tmp: str, step: int, files: dict[str, list], keep_last: int,
           keep_through_step: int | None = None) -> str:
    """Rank 0, after every rank's files, meta.json and all checksums (``files``) are in place: make ``tmp`` the
    complete checkpoint of ``step``. Rotation keeps ``keep_last`` checkpoints and, when ``keep_through_step`` is
    given, also the newest one at or before that step (the last one saved before a run of non-finite steps)."""
    if os.environ.get("REBASED_TEST_CRASH_BEFORE_COMPLETE") == str(step):  # fault injection for tests
        os._exit(17)
    write_marker(tmp, step, files)
    # Newer checkpoints belong to the run this one went back on (it resumed from an older checkpoint): set them
    # aside, else the rotation would count them as the newest and delete this one, and `resume: auto` would pick
    # them up after a crash.
    for newer_step, path in list_complete(root):
        if newer_step > step:
            log.warning("checkpoint %s is newer than step %d, which a run resumed from an older checkpoint just "
                        "saved: moved aside as %s", path, step, move_aside(path, "superseded"))
    final = os.path.join(root, step_dir_name(step))
    if os.path.exists(final):  # re-saving a step (e.g. a signal right after a periodic save): replace it
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    write_text_atomic(os.path.join(root, LATEST), step_dir_name(step) + "\n")
    if keep_last > 0:
        complete = list_complete(root)
        protected = [p for s, p in complete if keep_through_step is not None and s <= keep_through_step][-1:]
        for _, path in complete[:-keep_last]:
            if path not in protected:
                # renamed first: a crash mid-delete leaves a leftover for the next start, not a half checkpoint
                # under a checkpoint's name
                doomed = f"{path}.deleting-{os.getpid()}"
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    return final


# -- RNG ---------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(tmp: str, rank: int):
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))


def load_rng(path: str, rank: int) -> bool:
    f = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if not os.path.isfile(f):
        return False
    set_rng_state(torch.load(f, weights_only=False))
    return True
