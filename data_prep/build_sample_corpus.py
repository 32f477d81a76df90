"""Build a small real-text corpus in the Pile's format from text that ships with Python (no download).

    python data_prep/build_sample_corpus.py --out data/sample_pile

Writes ``OUT/train/00.jsonl.zst``, ``OUT/train/01.jsonl.zst``, ``OUT/val.jsonl.zst`` and ``OUT/test.jsonl.zst``
(the Pile's layout), one ``{"text": ..., "meta": {"pile_set_name": ...}}`` object per line. Sources, interleaved
round-robin until ``--max-mb`` of text:

* ``Pile-CC``: the interpreter's help topics (``pydoc_data.topics``, the language reference in plain text);
* ``Wikipedia (en)``: module docstrings of the standard library (read with ``ast``; nothing is imported);
* ``StackExchange``: question/answer pages built from documented standard-library functions and classes;
* ``Github``: standard-library source files;
* ``DM Mathematics``: arithmetic questions and answers generated from a fixed seed.

The set names only label the kind of text. The output is deterministic for a given Python installation.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import random
import sys
import sysconfig

import zstandard

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.atomic import write_bytes_atomic  # noqa: E402

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo",
             "config-3", "ensurepip", "venv"}


def _stdlib_files() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                out.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(out)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def pydoc_topics():
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped installations
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield "Pile-CC", f"{name}\n\n{text}\n"


def _parsed_modules(files):
    """(module name, syntax tree) of each readable standard-library file that parses."""
    for rel, path in files:
        src = _read(path)
        if not src:
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        yield rel[:-3].replace("/", ".").removesuffix(".__init__"), tree


def module_docstrings(files):
    for mod, tree in _parsed_modules(files):
        doc = ast.get_docstring(tree)
        if doc and len(doc) > 200:
            yield "Wikipedia (en)", f"{mod}\n\n{doc}\n"


def qa_pages(files):
    for mod, tree in _parsed_modules(files):
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 300:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    yield "StackExchange", (f"Q: What does the {kind} `{mod}.{node.name}` do, and how do I use it?\n\n"
                                            f"A: From its documentation:\n\n{doc}\n")


def source_files(files):
    for rel, path in files:
        src = _read(path)
        if src and 500 < len(src) < 60_000:
            yield "Github", f"# {rel}\n{src}"


def arithmetic(seed: int = 1234):
    rng = random.Random(seed)
    while True:
        lines = []
        for _ in range(rng.randint(3, 8)):
            a, b = rng.randint(-999, 9999), rng.randint(1, 999)
            op = rng.choice("+-*")
            q = f"What is {a} {op} {b}?"
            ans = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{q}\n{ans}")
        yield "DM Mathematics", "\n".join(lines) + "\n"


def documents(max_bytes: int):
    files = _stdlib_files()
    gens = [pydoc_topics(), module_docstrings(files), qa_pages(files), source_files(files), arithmetic()]
    total = 0
    while gens and total < max_bytes:
        for g in list(gens):
            try:
                set_name, text = next(g)
            except StopIteration:
                gens.remove(g)
                continue
            total += len(text.encode("utf-8"))
            yield {"text": text, "meta": {"pile_set_name": set_name}}
            if total >= max_bytes:
                return


def _write_zst(path: str, docs: list[dict]) -> int:
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    blob = zstandard.ZstdCompressor(level=10, write_checksum=True).compress(data)
    write_bytes_atomic(path, blob)
    return len(blob)


def build(out: str, max_mb: float = 4.0, train_files: int = 2, holdout_every: int = 25) -> dict:
    """Write the corpus; every ``holdout_every``-th document goes to val, the next one to test. Train files of an
    earlier build into ``out`` beyond ``train_files`` are removed (they would be read as part of this corpus)."""
    if train_files < 1:
        raise ValueError(f"--train-files must be >= 1, got {train_files}")
    if not max_mb > 0:
        raise ValueError(f"--max-mb must be > 0, got {max_mb}")
    train, val, test = [], [], []
    for i, doc in enumerate(documents(int(max_mb * 1e6))):
        r = i % holdout_every
        (val if r == holdout_every - 2 else test if r == holdout_every - 1 else train).append(doc)
    if len(train) < train_files or not val or not test:
        raise ValueError(f"--max-mb {max_mb} collects {len(train)} train, {len(val)} val and {len(test)} test "
                         f"documents: every one of the {train_files} train files and both held-out files needs at "
                         "least one; raise --max-mb or lower --train-files")
    written = {}
    per = -(-len(train) // train_files)
    for f in range(train_files):
        path = os.path.join(out, "train", f"{f:02d}.jsonl.zst")
        written[path] = (len(train[f * per:(f + 1) * per]), _write_zst(path, train[f * per:(f + 1) * per]))
    for name, docs in (("val", val), ("test", test)):
        path = os.path.join(out, f"{name}.jsonl.zst")
        written[path] = (len(docs), _write_zst(path, docs))
    for stale in glob.glob(os.path.join(out, "train", "[0-9][0-9]*.jsonl.zst")):
        if stale not in written:
            os.remove(stale)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-mb", type=float, default=4.0, help="text to collect, in MB (default 4)")
    p.add_argument("--train-files", type=int, default=2, help="number of train files (default 2)")
    args = p.parse_args(argv)
    try:
        written = build(args.out, args.max_mb, args.train_files)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, (docs, size) in written.items():
        print(f"{path}: {docs} documents, {size / 1e6:.2f} MB compressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
