"""Result files: one JSON per run, written atomically (``pretrain.atomic.write_json_atomic``), read back tolerantly:
a file that is not a complete result is skipped, and said so when it is damaged rather than another kind of JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = "mqar-result/1"


def check_result(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """(result, None) when ``path`` holds a complete MQAR result; else (None, why), why naming the file and what is
    wrong with it (for broken JSON, the line and column), or None where there is nothing to report: no file, or
    valid JSON of another kind (reports and speed tables may sit beside results)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path}: cannot be read ({e.strerror or e})"
    except ValueError as e:  # JSONDecodeError (a torn or edited file) or bytes that are not UTF-8
        return None, f"{path}: not valid JSON ({e})"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None, None
    value = data.get("best_accuracy")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:  # NaN fails too
        return None, f"{path}: an incomplete {SCHEMA} result (best_accuracy is {value!r})"
    return data, None


def read_result(path: str | os.PathLike) -> dict | None:
    """The result at ``path`` if it is a complete MQAR result, else None (missing, torn or foreign)."""
    return check_result(path)[0]


def iter_results(*dirs: str | os.PathLike, log=None):
    """Every complete result JSON under the given folders (recursively), with its path; ``log`` (a callable) is told
    of every damaged file skipped."""
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else sorted(d.rglob("*.json"))
        for path in files:
            data, problem = check_result(path)
            if data is not None:
                yield path, data
            elif problem and log is not None:
                log(f"skipping {problem}")
