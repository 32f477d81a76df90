"""Crash-safe writes: a file or a directory is built under a temporary name beside its destination (containing
``.tmp-``), fsynced, renamed into place, and its folder fsynced. A reader (or a process restarted after a crash) sees the old version
or the new one, never a torn one. Standard library only: the tokenization path imports it without numpy or torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes files readable by their owner only; what we write is for sharing: a plain open()'s permissions
FILE_MODE = 0o666 & ~_process_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames and new entries in a folder durable (best effort where the platform cannot)."""
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


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike, write: Callable, binary: bool = False) -> Path:
    """Create or replace ``path`` with what ``write(file)`` writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # temporary names contain ".tmp-" (what the tools clean up after a killed run)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_file_atomic(path, lambda f: f.write(data), binary=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_file_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    with open(src, "rb") as f:
        return write_file_atomic(dst, lambda out: shutil.copyfileobj(f, out), binary=True)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make the finished directory ``tmp`` (a sibling of ``final``) the directory ``final``: its files and itself
    fsynced, a previous ``final`` replaced."""
    tmp, final = Path(tmp), Path(final)
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Raise ValueError (naming ``option``) unless a file can be written at ``path``: its folder exists and is
    writable, and it is not a folder itself. Tools check their output path before the work whose result a failing
    write would lose."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ValueError(f"{option} {path}: the folder {target.parent} is not writable")
