"""Where and how the benchmark scripts save a run: ``OUT/<name>_<device>_<date>.json`` (all numbers, with the
device, date and command in them) and ``.md`` (the table quoted in the README)."""

from __future__ import annotations

import os

from pretrain.atomic import write_json_atomic, write_text_atomic


def save_results(out_dir: str, name: str, device: str, date: str, data: dict, markdown: str) -> str:
    """Write both files (a later call with the same arguments replaces them); returns the path without suffix."""
    os.makedirs(out_dir, exist_ok=True)
    tag = "".join(ch if ch.isalnum() else "_" for ch in device).strip("_")
    stem = os.path.join(out_dir, f"{name}_{tag}_{date}")
    # atomic: a benchmark that rewrites its results after every row never leaves a torn file when it is cut
    write_json_atomic(stem + ".json", data)
    write_text_atomic(stem + ".md", markdown)
    return stem
