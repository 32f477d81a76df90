"""Atomic, keep-last-K checkpoint directories with a ``latest`` pointer.

Layout under the checkpoint root::

    step_00000100/          a complete checkpoint (only ever created by renaming a finished temp dir)
        meta.json           trainer state: step, data-loader state, world size, strategy, format, config
        rng/rank_00000.pt   python / numpy / torch CPU / CUDA RNG states, per rank
        dcp/ | deepspeed/   model + optimizer (torch.distributed.checkpoint, or DeepSpeed's native files)
        COMPLETE            written last, fsynced, before the rename
    step_00000200.tmp-4242/ a save in progress (or one killed mid-save): never picked, removed on the next start
    latest                  name of the newest complete checkpoint (replaced atomically)

Save protocol: every rank writes into the temp dir, barrier, then rank 0 fsyncs all files, writes meta.json and
COMPLETE, renames the dir to its final name, fsyncs the root, points ``latest`` at it (write + rename) and
deletes the oldest complete checkpoints beyond ``keep_last``. ``find_latest`` trusts only directories named
``step_<n>`` that contain ``COMPLETE``; the pointer is a hint, checked against that. The root must be on a
filesystem shared by all ranks (as for any multi-node checkpointing).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch

STEP_RE = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_file(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str):
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_file(os.path.join(dirpath, f))
        _fsync_dir(dirpath)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, "meta.json"))


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
    """Temp dirs of saves that never finished (the process died mid-save)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def temp_dir_name(step: int) -> str:
    return f"{step_dir_name(step)}.tmp-{os.getpid()}-{int(time.time() * 1000) % 10**8}"


def commit(root: str, tmp: str, step: int, meta: dict, keep_last: int) -> str:
    """Rank 0, after every rank finished writing into ``tmp``: make it the complete checkpoint of ``step``."""
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    fsync_tree(tmp)
    if os.environ.get("REBASED_TEST_CRASH_BEFORE_COMPLETE") == str(step):  # fault injection for tests
        os._exit(17)
    marker = os.path.join(tmp, COMPLETE)
    with open(marker, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = os.path.join(root, step_dir_name(step))
    if os.path.exists(final):  # re-saving a step (e.g. a signal right after a periodic save): replace it
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    pointer_tmp = os.path.join(root, f"{LATEST}.tmp-{os.getpid()}")
    with open(pointer_tmp, "w") as f:
        f.write(step_dir_name(step) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(root, LATEST))
    _fsync_dir(root)
    if keep_last > 0:
        for _, path in list_complete(root)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
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
