"""What checkpoint checksums cost on a realistic checkpoint: the 150M ReBased hybrid with its AdamW state, saved the
way the trainer saves it (one process, torch.distributed.checkpoint), on this machine's disk.

    python -m benchmarks.checkpoint_checksum [--model configs/models/rebased_150m.yaml] [--repeats 3]

Times, per save: the DCP write of model + optimizer; the fsync of every file (the save protocol fsyncs them anyway);
the checksum pass that the trainer now runs instead (xxh3-64 + fsync of every file, ``checkpoint.checksum_share``);
and ``checkpoint.verify`` at resume, with the files in the page cache (right after a save) and evicted from it
(``posix_fadvise(DONTNEED)``, as after a reboot or on another node). With several ranks each checks 1/world of the
files. Results: ``benchmarks/results/checkpoint_checksum_<cpu>_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pretrain.models import build_model, load_model_config
from pretrain.training import checkpoint as ckpt
from pretrain.training.config import RunConfig
from pretrain.training.parallel import SingleStrategy
from benchmarks.results_io import save_results
from benchmarks.tokenize_throughput import cpu_model


def evict(root: str):
    """Drop the files' pages from the page cache (they are clean after the fsync), so the next read hits the disk."""
    for rel in ckpt.list_files(root):
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "configs/models/rebased_150m.yaml"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir on /tmp's disk)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model_cfg = load_model_config(args.model)
    strategy = SingleStrategy(build_model(model_cfg), RunConfig(model=args.model), torch.device("cpu"),
                              torch.float32, 1)
    for q in strategy.model.parameters():  # one AdamW step, so that the optimizer state exists as in training
        q.grad = torch.randn_like(q) * 1e-3
    strategy.set_lr(1e-4)
    strategy.optimizer.step()
    n_params = sum(q.numel() for q in strategy.model.parameters())

    def fresh_save(name: str) -> tuple[str, float, list[str]]:
        path = os.path.join(work, name)
        os.makedirs(path)
        seconds, _ = timed(lambda: strategy.save(path))
        ckpt.save_rng(path, 0)
        ckpt.write_meta(path, {"step": 0})
        return path, seconds, ckpt.list_files(path)

    def fsync_all(path: str, files: list[str]):
        for rel in files:
            fd = os.open(os.path.join(path, rel), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    work = tempfile.mkdtemp(prefix="ckptbench-", dir=args.dir)
    rows = []
    try:
        for r in range(args.repeats):
            # the old protocol (fsync only) and the new one (xxh3-64 + fsync), each on a fresh save
            old, save_s, files = fresh_save(f"old_{r}")
            fsync_s, _ = timed(lambda: fsync_all(old, files))
            shutil.rmtree(old)
            new, save2_s, files = fresh_save(f"new_{r}")
            nbytes = sum(os.path.getsize(os.path.join(new, f)) for f in files)
            checksum_s, sums = timed(lambda: ckpt.checksum_share(new, files))
            ckpt.write_marker(new, 0, sums)
            warm_s, problems = timed(lambda: ckpt.verify(new))
            assert problems == [], problems
            evict(new)
            cold_s, problems = timed(lambda: ckpt.verify(new))
            assert problems == [], problems
            rows.append({"bytes": nbytes, "files": len(files), "dcp_save_s": min(save_s, save2_s), "fsync_s": fsync_s,
                         "checksum_and_fsync_s": checksum_s, "verify_cached_s": warm_s, "verify_cold_s": cold_s})
            shutil.rmtree(new)
            print(rows[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {k: min(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
    gb = rows[0]["bytes"] / 1e9
    added = best["checksum_and_fsync_s"] - best["fsync_s"]
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"date": now.isoformat(timespec="seconds"), "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch": torch.__version__, "model": os.path.relpath(args.model, ROOT), "parameters": n_params,
            "checkpoint_bytes": rows[0]["bytes"], "files": rows[0]["files"], "repeats": args.repeats,
            "command": "python -m benchmarks.checkpoint_checksum " + " ".join(argv if argv is not None else sys.argv[1:])}
    md = "\n".join([
        "# Checkpoint checksums: cost on a realistic checkpoint",
        "",
        f"- date: {meta['date']}",
        f"- device: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, a local virtual disk",
        f"- command: `{meta['command']}`",
        f"- checkpoint: {meta['model']} ({n_params / 1e6:.1f}M parameters) with its AdamW state, one process (DCP): "
        f"{gb:.2f} GB in {meta['files']} files; best of {args.repeats} saves",
        "",
        "| step | seconds | GB/s |",
        "|---|---:|---:|",
        f"| DCP save (model + optimizer) | {best['dcp_save_s']:.2f} | {gb / best['dcp_save_s']:.2f} |",
        f"| fsync of every file (what the save did before; DCP already fsyncs its files) | {best['fsync_s']:.2f} | |",
        f"| xxh3-64 + fsync of every file (what the save does now) | {best['checksum_and_fsync_s']:.2f} | "
        f"{gb / best['checksum_and_fsync_s']:.2f} |",
        f"| verify at resume, files in the page cache | {best['verify_cached_s']:.2f} | {gb / best['verify_cached_s']:.2f} |",
        f"| verify at resume, files read from disk | {best['verify_cold_s']:.2f} | {gb / best['verify_cold_s']:.2f} |",
        "",
        f"Added to a save: {added:.2f} s, {added / best['dcp_save_s']:.1%} of the DCP write (one rank; with W ranks "
        f"each checksums 1/W of the files). Added to a resume: one read of the checkpoint, {best['verify_cold_s']:.2f} s "
        f"from disk (then the load reads it from the page cache), also split over the ranks.",
        "",
    ])
    stem = save_results(args.out_dir, "checkpoint_checksum", meta["cpu"], now.strftime("%Y-%m-%d"),
                        {"meta": meta, "rows": rows, "best": best}, md)
    print(md)
    print(f"results: {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
