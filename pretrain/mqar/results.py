"""Result files: one JSON per run, written atomically (temp file + fsync + rename), read back tolerantly."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SCHEMA = "mqar-result/1"


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; results are for sharing: the permissions of a plain open().
FILE_MODE = 0o666 & ~_process_umask()


def write_file_atomic(path: str | os.PathLike, write, binary: bool = False) -> Path:
    """Create ``path`` with ``write(file)``: temp file in the same folder, fsync, rename, fsync the folder.
    Readers never see a partial file; the permissions are those of a plain open() (the file is for sharing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_file_atomic(path, lambda f: f.write(json.dumps(data, indent=1) + "\n"))


def read_result(path: str | os.PathLike) -> dict | None:
    """The result at ``path`` if it is a complete MQAR result, else None (missing, torn or foreign)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or "best_accuracy" not in data:
        return None
    return data


def iter_results(*dirs: str | os.PathLike):
    """Every complete result JSON under the given folders (recursively), with its path."""
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else sorted(d.rglob("*.json"))
        for path in files:
            data = read_result(path)
            if data is not None:
                yield path, data
