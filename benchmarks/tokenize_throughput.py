"""Tokenization throughput: ``tokenize_pile.py`` end to end against raw SentencePiece ``encode``, and where the rest
of the time goes.

    python -m benchmarks.tokenize_throughput                  # embedded sample corpus (train + val + test, ~4 MB)
    python -m benchmarks.tokenize_throughput --copies 1 8     # also 8 copies of it (~32 MB): fixed costs amortised
    python -m benchmarks.tokenize_throughput --inputs PILE/train/00.jsonl.zst --tokenizer tok.model

Per corpus:

* **raw encode**: ``SentencePieceProcessor.encode(text)`` document by document in one thread, on the texts already in
  memory (the tokenizer already loaded): the work no pipeline can avoid. Wall and CPU time.
* **end to end**: ``python data_prep/tokenize_pile.py --workers N --no-progress`` as a subprocess, from interpreter
  start to exit (reading, decompressing, hashing, JSON, validation, encoding, writing and fsyncing the shards and
  manifests). Wall time, and CPU time of the process and its pool workers (``RUSAGE_CHILDREN``).
* ratios: raw encode / end to end at 1 worker (wall and CPU); linearity in workers:
  ``(wall(1) / wall(N)) / N``.
* **where the rest goes** at 1 worker: the CPU time of each stage of the pipeline run alone on the same corpus
  (interpreter start and imports, tokenizer load, reading, JSON and validation, encode, token arrays, shard
  writing); the remainder is the pipeline's own bookkeeping. At N workers: the CPU added over 1 worker (pool start,
  moving batches and results between processes) and the cores left idle (wall × cores − CPU).

Every figure is the minimum over ``--repeats`` rounds; each round runs every measurement once, so a change of machine
load during the benchmark affects them alike. Results: ``benchmarks/results/tokenize_throughput_<cpu>_<date>.{json,md}``
(``--tag`` adds to the name); the JSON keeps every sample.
"""

from __future__ import annotations

import argparse
import array
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from data_prep import workers as record_workers
from data_prep.build_sample_corpus import build
from data_prep.pipeline import TokenizeConfig
from pretrain.cores import available_cores
from pretrain.data.sources import FileDone, iter_records, resolve_inputs
from pretrain.data.tokenizer import Tokenizer
from data_prep.train_tokenizer import train
from pretrain.data.writer import IndexedDatasetWriter
from benchmarks.results_io import save_results

TOKENIZE = os.path.join(ROOT, "data_prep", "tokenize_pile.py")


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


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def in_process(fn):
    """A probe: wall and CPU seconds (this process) of one call of ``fn``."""
    def probe():
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0
    return probe


def subprocess_run(cmd: list[str], before=None):
    """A probe: wall and CPU seconds (the process and the children it waited for) of one run of ``cmd``."""
    def probe():
        if before:
            before()
        c0, t0 = _children_cpu(), time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        return time.perf_counter() - t0, _children_cpu() - c0
    return probe


# Runs the CLI in-process and reports the CPU time of the main process and of its pool workers apart.
_SPLIT = """import json, resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"main_cpu_s": s.ru_utime + s.ru_stime, "workers_cpu_s": c.ru_utime + c.ru_stime}), file=sys.stderr)
"""


def cpu_split(cmd: list[str], before):
    """A probe: main-process and pool-worker CPU seconds of one run of the CLI ``cmd``."""
    def probe():
        before()
        p = subprocess.run([sys.executable, "-c", _SPLIT, *cmd[1:]], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)
        r = json.loads(p.stderr.strip().splitlines()[-1])
        return r["main_cpu_s"], r["workers_cpu_s"]
    return probe


def measure(inputs: dict, tok_path: str, workers: list[int], repeats: int, work: str) -> dict:
    """Every probe once per round, ``repeats`` rounds, the minimum of each: the probes are interleaved so that a
    change of machine load during the run affects them alike."""
    sources = (resolve_inputs(inputs["main"], "main") + resolve_inputs(inputs["val"], "val")
               + resolve_inputs(inputs["test"], "test"))
    tok = Tokenizer(tok_path)

    def read():
        return [(r.source, r.line_no, sources[r.source].group, r.payload, r.reason, r.message)
                for r in iter_records(sources) if not isinstance(r, FileDone)]

    records = read()
    options = {"text_key": "text", "set_key": "meta.pile_set_name", "include_sets": None, "exclude_sets": None,
               "val_fraction": 0.0, "test_fraction": 0.0, "split_seed": 0, "max_doc_bytes": 64 << 20,
               "prepend_bos": False}
    record_workers.init_worker(tok.model_proto, options, tok=tok)
    texts = [x[0] for x in (record_workers._check(rec) for rec in records) if x[0] is not None]
    batch = TokenizeConfig.__dataclass_fields__["batch_docs"].default

    def encode_batched():
        return [ids for i in range(0, len(texts), batch) for ids in tok.encode_batch(texts[i:i + batch], num_threads=1)]

    encoded = encode_batched()
    typecode, dtype = ("H", "uint16") if tok.vocab_size < 65500 else ("i", "int32")

    def to_arrays():
        flat, lengths = array.array(typecode), array.array("q")
        for ids in encoded:
            flat.fromlist(ids)
            flat.append(tok.eod_id)
            lengths.append(len(ids) + 1)
        return flat, lengths

    flat, lengths = to_arrays()

    def write():
        w = IndexedDatasetWriter(os.path.join(work, "stage_write", "shard"), dtype)
        w.add_documents(flat, lengths)
        return w.finalize()

    out = os.path.join(work, "out")
    cmd = [sys.executable, TOKENIZE, "--inputs", *inputs["main"], "--tokenizer", tok_path, "--out", out,
           "--no-progress"]
    if inputs["val"]:
        cmd += ["--val-inputs", *inputs["val"]]
    if inputs["test"]:
        cmd += ["--test-inputs", *inputs["test"]]
    clean = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
    encode_stage = f"encode (as the pipeline calls it: batches of {batch}, 1 thread)"
    probes = {
        "raw encode": in_process(lambda: [tok.sp.encode(t) for t in texts]),
        "interpreter start": subprocess_run([sys.executable, "-c", "pass"]),
        "interpreter start and imports": subprocess_run([sys.executable, "-c", "import data_prep.tokenize_pile"]),
        "tokenizer load": in_process(lambda: Tokenizer(tok_path)),
        "read, decompress, hash, split lines": in_process(read),
        "JSON and validation": in_process(lambda: [record_workers._check(rec) for rec in records]),
        encode_stage: in_process(encode_batched),
        "token arrays (EOD appended)": in_process(to_arrays),
        "shard writing (sha256, fsync)": in_process(write),
        **{f"workers={w}": subprocess_run(cmd + ["--workers", str(w)], before=clean) for w in workers},
        **{f"split workers={w}": cpu_split(cmd + ["--workers", str(w)], clean) for w in workers if w > 1},
    }
    samples = {name: [] for name in probes}
    for _ in range(repeats):
        for name, probe in probes.items():
            samples[name].append(probe())
    wall = {name: min(x[0] for x in v) for name, v in samples.items()}
    cpu = {name: min(x[1] for x in v) for name, v in samples.items()}

    baseline = {"wall_s": wall["raw encode"], "cpu_s": cpu["raw encode"], "documents": len(texts),
                "text_bytes": sum(len(t.encode("utf-8")) for t in texts), "tokens": sum(len(ids) + 1 for ids in encoded)}
    runs = [{"workers": w, "wall_s": wall[f"workers={w}"], "cpu_s": cpu[f"workers={w}"]} for w in workers]
    cores = available_cores()
    one = next((r for r in runs if r["workers"] == 1), None)
    for r in runs:
        r["wall_ratio_to_raw_encode"] = baseline["wall_s"] / r["wall_s"]
        r["cpu_ratio_to_raw_encode"] = baseline["cpu_s"] / r["cpu_s"]
        r["mb_per_s"] = baseline["text_bytes"] / 1e6 / r["wall_s"]
        r["idle_core_s"] = max(r["wall_s"] * min(r["workers"] + 1, cores) - r["cpu_s"], 0.0)
        if r["workers"] > 1:
            split = min(samples[f"split workers={r['workers']}"], key=sum)
            r["cpu_split"] = {"main_cpu_s": split[0], "workers_cpu_s": split[1]}
        if one is not None:
            r["linearity"] = one["wall_s"] / r["wall_s"] / r["workers"]
            r["cpu_added_over_1_worker_s"] = r["cpu_s"] - one["cpu_s"]
    stages = {"interpreter start": cpu["interpreter start"],
              "imports": max(cpu["interpreter start and imports"] - cpu["interpreter start"], 0.0)}
    for name in ("tokenizer load", "read, decompress, hash, split lines", "JSON and validation", encode_stage,
                 "token arrays (EOD appended)", "shard writing (sha256, fsync)"):
        stages[name] = cpu[name]
    if one is not None:
        stages["rest: bookkeeping, batching, manifests (by difference)"] = one["cpu_s"] - sum(stages.values())
    return {"baseline_raw_encode": baseline, "runs": runs, "stages_cpu_s_1_worker": stages, "samples": samples,
            "command": " ".join(cmd).replace(work, "$TMP").replace(ROOT + os.sep, "")}


def sample_inputs(work: str, copies: int) -> dict:
    """The embedded sample corpus (train dir, val, test), its files repeated ``copies`` times."""
    src = os.path.join(work, "sample")
    if not os.path.isdir(src):
        build(src)
    if copies == 1:
        return {"main": [os.path.join(src, "train")], "val": [os.path.join(src, "val.jsonl.zst")],
                "test": [os.path.join(src, "test.jsonl.zst")]}
    d = os.path.join(work, f"copies{copies}")
    for c in range(copies):
        for rel, split in (("train/00.jsonl.zst", "train"), ("train/01.jsonl.zst", "train"),
                           ("val.jsonl.zst", "val"), ("test.jsonl.zst", "test")):
            os.makedirs(os.path.join(d, split), exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(d, split, f"{c:02d}-{os.path.basename(rel)}"))
    return {"main": [os.path.join(d, "train")], "val": [os.path.join(d, "val")], "test": [os.path.join(d, "test")]}


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        "# Tokenization throughput: tokenize_pile.py end to end vs raw SentencePiece encode",
        "",
        f"- date: {m['date']}",
        f"- device: {m['cpu']}, {m['cores']} cores available, Python {m['python']}, sentencepiece {m['sentencepiece']}",
        f"- command: `{m['command']}`",
        f"- tokenizer: vocab {m['vocab_size']}; each figure the minimum of {m['repeats']} interleaved rounds",
        f"- PYTHONDONTWRITEBYTECODE={m['PYTHONDONTWRITEBYTECODE'] or '(unset)'}" + (
            ": no .pyc is written, a module without one is compiled at every start" if m["PYTHONDONTWRITEBYTECODE"]
            else ": the project's modules are compiled once, as in a normal install"),
        f"- load average (1/5/15 min) before: {m['loadavg_before']}, after: {m['loadavg_after']}",
    ]
    if m["note"]:
        lines.append(f"- note: {m['note']}")
    for c in result["corpora"]:
        b = c["baseline_raw_encode"]
        lines += ["", f"## {c['corpus']}: {b['documents']:,} documents, {b['text_bytes'] / 1e6:.2f} MB of text, "
                      f"{b['tokens']:,} tokens", "",
                  f"Pipeline command (plus `--workers N`): `{c['command']}`", "",
                  "| run | wall s | CPU s | MB/s | wall: raw / this | CPU: raw / this | linearity | idle core·s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| raw encode, 1 thread, in memory | {b['wall_s']:.3f} | {b['cpu_s']:.3f} | "
                  f"{b['text_bytes'] / 1e6 / b['wall_s']:.2f} | 1.00 | 1.00 | | |"]
        for r in c["runs"]:
            lines.append(f"| tokenize_pile.py --workers {r['workers']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | "
                         f"{r['mb_per_s']:.2f} | {r['wall_ratio_to_raw_encode']:.3f} | "
                         f"{r['cpu_ratio_to_raw_encode']:.3f} | {r.get('linearity', float('nan')):.3f} | "
                         f"{r['idle_core_s']:.3f} |")
        one = next(r for r in c["runs"] if r["workers"] == 1)
        lines += ["", "Where the CPU time of `--workers 1` goes (each stage run alone on this corpus):", "",
                  "| stage | CPU s | share |", "|---|---:|---:|"]
        for name, s in c["stages_cpu_s_1_worker"].items():
            lines.append(f"| {name} | {s:.3f} | {s / one['cpu_s']:.1%} |")
        for r in c["runs"]:
            if r["workers"] > 1:
                sp = r["cpu_split"]
                lines.append(f"\n`--workers {r['workers']}`: {r['cpu_added_over_1_worker_s']:+.3f} CPU s over 1 worker "
                             f"(pool start, batches and results between processes); main process "
                             f"{sp['main_cpu_s']:.3f} CPU s (start-up, reading, writing, bookkeeping, sharing the "
                             f"cores with the workers), workers {sp['workers_cpu_s']:.3f}; "
                             f"{r['idle_core_s']:.3f} core·s idle of {r['wall_s'] * min(r['workers'] + 1, m['cores']):.3f}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=None, help="default: the embedded sample corpus")
    p.add_argument("--tokenizer", default=None, help="default: an 8000-piece BPE trained on the sample")
    p.add_argument("--copies", type=int, nargs="+", default=[1], help="sample corpus sizes, in copies of it")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1, 2, 4, ... up to all cores")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--tag", default="", help="added to the results file name (tokenize_throughput_TAG_...)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    cores = available_cores()
    workers = args.workers or sorted({1, *[w for w in (2, 4, 8, 16, 32, 64) if w <= cores], cores})
    load_before = loadavg()
    work = tempfile.mkdtemp(prefix="tokbench-")
    try:
        tok_path = args.tokenizer
        if tok_path is None:
            tok_path = os.path.join(work, "tok.model")
            sample_inputs(work, 1)
            train([os.path.join(work, "sample", "train")], tok_path, 8000, threads=cores)
        corpora = []
        if args.inputs:
            corpora.append(("given inputs", {"main": args.inputs, "val": [], "test": []}))
        else:
            for c in args.copies:
                corpora.append((f"sample corpus x{c}", sample_inputs(work, c)))
        results = []
        for name, inputs in corpora:
            r = measure(inputs, tok_path, workers, args.repeats, work)
            r["corpus"] = name
            results.append(r)
            one = next(x for x in r["runs"] if x["workers"] == 1)
            print(f"{name}: raw encode {r['baseline_raw_encode']['wall_s']:.3f}s; workers=1 wall ratio "
                  f"{one['wall_ratio_to_raw_encode']:.3f} CPU ratio {one['cpu_ratio_to_raw_encode']:.3f}; "
                  + ", ".join(f"workers={x['workers']} linearity {x['linearity']:.3f}" for x in r["runs"]))
        import sentencepiece

        now = datetime.datetime.now(datetime.timezone.utc)
        meta = {"date": now.isoformat(timespec="seconds"), "cpu": cpu_model(), "cores": cores,
                "python": platform.python_version(), "sentencepiece": sentencepiece.__version__,
                "command": "python -m benchmarks.tokenize_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
                "vocab_size": Tokenizer(tok_path).vocab_size, "repeats": args.repeats, "note": args.note,
                "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
                "loadavg_before": load_before, "loadavg_after": loadavg()}
        result = {"meta": meta, "corpora": results}
        stem = save_results(args.out_dir, "_".join(x for x in ("tokenize_throughput", args.tag) if x), meta["cpu"], now.strftime("%Y-%m-%d"), result,
                            markdown(result))
        print(f"results: {stem}.md")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
