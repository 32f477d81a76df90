"""Result files: one JSON per run, written atomically (``pretrain.atomic.write_json_atomic``), read back tolerantly."""

from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = "mqar-result/1"


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
