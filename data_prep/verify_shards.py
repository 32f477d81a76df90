"""Check token shards against the manifest ``tokenize_pile.py`` wrote for them: every listed ``.bin`` has the size
and the SHA-256 recorded when it was written, and its ``.idx`` opens, covers the ``.bin`` back to back and holds
the manifest's document and token counts; so does the split's merged ``OUT/{split}.bin`` of ``--merge``, against
``OUT/manifest.json``. Use it after copying a dataset to another machine or file system
(loading already checks the sizes, not the bytes).

    python data_prep/verify_shards.py OUT/train [OUT/val ...]

Prints one line per problem and exits 1 if there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from pretrain.data.indexed import IndexedDataset  # noqa: E402
from pretrain.data.packed import merged_record  # noqa: E402


def _sha256(path: str, bar) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _verify_shard(prefix: str, record: dict, bar) -> list[str]:
    """Problems of one ``.bin``/``.idx`` pair against the manifest ``record`` written with it."""
    path = prefix + ".bin"
    if not os.path.isfile(path):
        return [f"{path}: missing"]
    if os.path.getsize(path) != record["bin_bytes"]:
        return [f"{path}: {os.path.getsize(path)} bytes, the manifest records {record['bin_bytes']}"]
    if _sha256(path, bar) != record["bin_sha256"]:
        return [f"{path}: SHA-256 differs from the manifest's"]
    try:
        index = IndexedDataset(prefix)
    except (OSError, ValueError) as e:
        return [f"{prefix}.idx: {e}"]
    problems = []
    # the .idx must describe this .bin whole (the loader streams it back to back) and the recorded counts: another
    # shard's index opens fine against a longer .bin
    if not index.is_contiguous():
        problems.append(f"{prefix}.idx: its sequences do not cover {path} back to back (another shard's index, or a "
                        "damaged one)")
    for field, found in (("documents", index.num_documents), ("tokens", index.num_tokens)):
        if field in record and found != record[field]:
            problems.append(f"{prefix}.idx: {found} {field}, the manifest records {record[field]}")
    return problems


def verify_split(split_dir: str, progress: bool = True) -> list[str]:
    """Problems of one split directory (empty if none), and of its merged file when ``--merge`` wrote one."""
    manifest = os.path.join(split_dir, "manifest.json")
    try:
        with open(manifest) as f:
            shards = json.load(f)["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{manifest}: cannot read its shard list ({type(e).__name__}: {e})"]
    merged = merged_record(split_dir)
    pairs = [(os.path.join(split_dir, shard["name"]), shard) for shard in shards]
    if merged is not None:
        pairs.append((os.path.normpath(split_dir), merged[1]))
    problems = []
    with tqdm(total=sum(r.get("bin_bytes", 0) for _, r in pairs), unit="B", unit_scale=True, desc=split_dir,
              disable=not progress) as bar:
        for prefix, record in pairs:
            problems += _verify_shard(prefix, record, bar)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("splits", nargs="+", help="split directories (OUT/train, OUT/val, ...)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    problems = [p for d in args.splits for p in verify_split(d, progress=not args.no_progress)]
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {len(args.splits)} split(s)" if problems else "all shards verified")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
