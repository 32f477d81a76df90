"""Tokenization throughput: data_prep's pipeline at 1, 2, ... workers vs. a plain single-process loop.

    python benchmarks/tokenize_throughput.py                 # embedded sample corpus, 8k-vocab tokenizer
    python benchmarks/tokenize_throughput.py --inputs PILE/train/00.jsonl.zst --tokenizer tok.model --max-docs 200000

Writes benchmarks/results/tokenize_throughput.{json,md}. Throughput counts tokens written (EOD included) and
MB (10^6 bytes) of document text (UTF-8) per second of wall time, best of ``--repeats`` runs. The baseline reads
the same files with a zstandard stream reader, ``json.loads`` each line and encodes the text with SentencePiece
in one process, writing nothing.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zstandard  # noqa: E402

from data_prep.build_sample_corpus import build  # noqa: E402
from data_prep.pipeline import TokenizeConfig, available_cores, tokenize  # noqa: E402
from data_prep.sources import resolve_inputs  # noqa: E402
from data_prep.tokenizer import Tokenizer  # noqa: E402
from data_prep.train_tokenizer import train  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def plain_loop(files: list[str], tok: Tokenizer, max_docs: int | None) -> dict:
    t0 = time.perf_counter()
    docs = tokens = nbytes = 0
    for path in files:
        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw) if path.endswith(".zst") else raw
            for line in io.TextIOWrapper(reader, encoding="utf-8"):
                if max_docs is not None and docs >= max_docs:
                    break
                text = json.loads(line)["text"]
                tokens += len(tok.encode(text)) + 1
                nbytes += len(text.encode("utf-8"))
                docs += 1
    dt = time.perf_counter() - t0
    return {"documents": docs, "tokens": tokens, "text_bytes": nbytes, "seconds": dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=None, help="default: the embedded sample corpus (train files)")
    p.add_argument("--tokenizer", default=None, help="default: train an 8000-piece BPE on the sample")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--copies", type=int, default=3, help="sample corpus: number of copies of its train files")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1, 2, 4, ... up to all cores")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--out-dir", default=RESULTS)
    args = p.parse_args(argv)

    load_before = loadavg()
    work = tempfile.mkdtemp(prefix="tokbench-")
    try:
        inputs = args.inputs
        if inputs is None:
            build(os.path.join(work, "sample"))
            inputs = []
            for c in range(args.copies):
                for f in sorted(os.listdir(os.path.join(work, "sample", "train"))):
                    dst = os.path.join(work, "corpus", f"{c:02d}-{f}")
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(os.path.join(work, "sample", "train", f), dst)
                    inputs.append(dst)
        tok_path = args.tokenizer
        if tok_path is None:
            tok_path = os.path.join(work, "tok.model")
            train([os.path.join(work, "sample", "train")] if args.inputs is None else inputs, tok_path,
                  args.vocab_size, threads=available_cores())
        tok = Tokenizer(tok_path)
        files = [s.path for s in resolve_inputs(inputs, "main")]
        cores = available_cores()
        workers = args.workers or sorted({1, *[w for w in (2, 4, 8, 16, 32, 64) if w <= cores], cores})

        baseline = min((plain_loop(files, tok, args.max_docs) for _ in range(args.repeats)), key=lambda r: r["seconds"])
        baseline.update(tokens_per_s=baseline["tokens"] / baseline["seconds"],
                        mb_per_s=baseline["text_bytes"] / 1e6 / baseline["seconds"])
        print(f"plain loop: {baseline['tokens_per_s']:,.0f} tok/s, {baseline['mb_per_s']:.2f} MB/s")
        rows = []
        for w in workers:
            best = None
            for r in range(args.repeats):
                out = os.path.join(work, f"out-w{w}-r{r}")
                t0 = time.perf_counter()
                m = tokenize(TokenizeConfig(inputs=inputs, out=out, tokenizer=tok_path, workers=w, progress=False,
                                            max_docs=args.max_docs))
                dt = time.perf_counter() - t0
                shutil.rmtree(out)
                if best is None or dt < best[0]:
                    best = (dt, m["counts"])
            dt, c = best
            row = {"workers": w, "seconds": dt, "documents": c["documents_written"], "tokens": c["tokens"],
                   "text_bytes": c["text_bytes"], "tokens_per_s": c["tokens"] / dt,
                   "mb_per_s": c["text_bytes"] / 1e6 / dt}
            row["speedup_vs_plain_loop"] = row["tokens_per_s"] / baseline["tokens_per_s"]
            rows.append(row)
            print(f"workers={w}: {row['tokens_per_s']:,.0f} tok/s, {row['mb_per_s']:.2f} MB/s "
                  f"({row['speedup_vs_plain_loop']:.2f}x plain loop)")
        result = {
            "benchmark": "tokenize_throughput",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": {"cpu": cpu_model(), "cores_available": cores, "python": platform.python_version()},
            "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd()), *(argv or sys.argv[1:])]),
            "corpus": {"inputs": "embedded sample corpus (data_prep/build_sample_corpus.py) x%d" % args.copies
                       if args.inputs is None else inputs, "files": len(files)},
            "tokenizer": {"vocab_size": tok.vocab_size, "sha256": tok.sha256},
            "repeats": args.repeats,
            "plain_loop": baseline,
            "pipeline": rows,
            "note": args.note,
            "loadavg_1_5_15min": {"before": load_before, "after": loadavg()},
        }
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "tokenize_throughput.json"), "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        md = [
            "# Tokenization throughput",
            "",
            f"- date: {result['date']}",
            f"- device: {result['device']['cpu']}, {cores} cores available, Python {result['device']['python']}",
            f"- command: `{result['command']}`",
            f"- corpus: {result['corpus']['inputs'] if isinstance(result['corpus']['inputs'], str) else len(files)} "
            f"({baseline['documents']:,} documents, {baseline['text_bytes'] / 1e6:.1f} MB text), "
            f"tokenizer vocab {tok.vocab_size}, best of {args.repeats}",
            f"- note: {args.note}" if args.note else "",
            f"- load average (1/5/15 min) before: {load_before}, after: {result['loadavg_1_5_15min']['after']}",
            "",
            "| run | workers | tokens/s | MB/s (text) | vs plain loop |",
            "|---|---:|---:|---:|---:|",
            f"| plain single-process loop (no output) | 1 | {baseline['tokens_per_s']:,.0f} | "
            f"{baseline['mb_per_s']:.2f} | 1.00x |",
        ]
        for r in rows:
            md.append(f"| tokenize_pile pipeline | {r['workers']} | {r['tokens_per_s']:,.0f} | {r['mb_per_s']:.2f} | "
                      f"{r['speedup_vs_plain_loop']:.2f}x |")
        with open(os.path.join(args.out_dir, "tokenize_throughput.md"), "w") as f:
            f.write("\n".join(x for x in md if x is not None) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
