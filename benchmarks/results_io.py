"""Where and how the benchmark scripts save a run: ``OUT/<name>_<device>_<date>.json`` (all numbers, with the
device, date and command in them) and ``.md`` (the table quoted in the README)."""

from __future__ import annotations

import json
import os


def save_results(out_dir: str, name: str, device: str, date: str, data: dict, markdown: str) -> str:
    """Write both files (a later call with the same arguments replaces them); returns the path without suffix."""
    os.makedirs(out_dir, exist_ok=True)
    tag = "".join(ch if ch.isalnum() else "_" for ch in device).strip("_")
    stem = os.path.join(out_dir, f"{name}_{tag}_{date}")
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    return stem
