"""Seconds per MQAR epoch: the same ``python -m pretrain.mqar`` command for several settings and variants.

    python -m benchmarks.mqar_speed --out DIR [--epochs 2] [--settings rebased:128:2048 based:64:512 ...]
        [--variant NAME=key=value,key=value ...] [--tree LABEL=PATH ...] [--concurrent N]

Every (tree, setting, variant) runs ``python -m pretrain.mqar --config configs/mqar/base.yaml`` in its own process
for ``--epochs`` full epochs (early stop off), from the tree's own checkout (``--tree before=/path/to/old`` times
an older commit with the same command), and writes its result JSON to DIR. The first epoch includes compilation
and data generation; the steady epoch time is the median of the later ones. ``--concurrent N`` runs N copies of
each at once on the GPU (several runs packed onto one GPU) and reports the wall time per epoch divided by N, the
GPU time one run costs. The table (and ``DIR/mqar_speed.json``, rewritten after every row so that a cut run keeps
what it measured) records device, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pretrain.atomic import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def run_one(tree: Path, config: str, setting: str, overrides: list[str], epochs: int, out: Path,
            copies: int) -> dict:
    mixer, d, L = setting.split(":")
    base = [sys.executable, "-m", "pretrain.mqar", "--config", config, f"model.mixer={mixer}", f"model.d_model={d}",
            f"data.seq_len={L}", f"train.max_epochs={epochs}", "train.early_stop_accuracy=null", "log.tqdm=false",
            *overrides]
    env = dict(os.environ, PYTHONPATH=str(tree))
    procs, paths = [], []
    t0 = time.time()
    for i in range(copies):
        path = out / f"{out.name}_{i}.json"
        paths.append(path)
        cmd = [*base, f"train.seed={i}", "--output", str(path)]
        log = open(out / f"{out.name}_{i}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    rcs = []
    for proc, log in procs:
        rcs.append(proc.wait())
        log.close()
    wall = time.time() - t0
    results = [json.loads(p.read_text()) for p in paths if p.exists()]
    row = {"setting": setting, "overrides": overrides, "copies": copies, "exit_codes": rcs, "wall_s": round(wall, 2),
           "command": shlex.join(base[1:])}
    if len(results) == copies:
        epoch_s = [statistics.median(h["epoch_s"] for h in r["history"][1:]) if len(r["history"]) > 1
                   else r["history"][0]["epoch_s"] for r in results]
        first = [r["history"][0]["epoch_s"] for r in results]
        row.update({
            "steady_epoch_s": round(max(epoch_s), 3),  # wall seconds per epoch of each run (they share the GPU)
            "gpu_s_per_epoch": round(max(epoch_s) / copies, 3),
            "first_epoch_s": round(max(first), 3),
            "eval_s": round(results[0]["time"]["eval_s"] / len(results[0]["history"]), 3),
            "micro_batch_size": results[0]["protocol"].get("micro_batch_size"),
            "precision": results[0]["config"]["train"]["precision"],
            "device": results[0]["device"], "torch": results[0]["torch"], "git_commit": results[0]["git_commit"],
            "valid_accuracy": [r["history"][-1]["valid_accuracy"] for r in results],
        })
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/mqar/base.yaml", help="relative to each tree")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=["rebased:128:2048"], metavar="MIXER:D:L")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=k=v,k=v",
                   help="a named list of config overrides (default: one variant, 'default', with none)")
    p.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                   help="a checkout to run from (default: this one, labelled 'now')")
    p.add_argument("--concurrent", type=int, default=1)
    args = p.parse_args(argv)
    trees = [t.split("=", 1) for t in args.tree] or [["now", str(REPO)]]
    variants = [(v.split("=", 1)[0], [o for o in v.split("=", 1)[1].split(",") if o]) for v in args.variant] \
        or [("default", [])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, "-m", "benchmarks.mqar_speed",
                                   *(sys.argv[1:] if argv is None else argv)]), "epochs": args.epochs}
    for label, tree in trees:
        for setting in args.settings:
            for name, overrides in variants:
                run_dir = out / f"{label}_{name}_{setting.replace(':', '_')}"
                run_dir.mkdir(exist_ok=True)
                row = run_one(Path(tree).resolve(), args.config, setting, overrides, args.epochs, run_dir,
                              args.concurrent)
                row.update({"tree": label, "variant": name})
                rows.append(row)
                print(json.dumps(row), flush=True)
                # after every row: a time limit or a crash keeps the rows already measured
                write_json_atomic(out / "mqar_speed.json", {"meta": meta, "rows": rows})
    print(f"\n{meta['date']}  {meta['command']}")
    print(f"{'tree':<8} {'variant':<14} {'setting':<18} {'x':>2} {'first s':>8} {'epoch s':>8} {'GPU s/ep':>8} "
          f"{'eval s':>7} {'micro':>5}  device")
    for r in rows:
        print(f"{r['tree']:<8} {r['variant']:<14} {r['setting']:<18} {r['copies']:>2} {r.get('first_epoch_s', '-'):>8} "
              f"{r.get('steady_epoch_s', 'FAIL'):>8} {r.get('gpu_s_per_epoch', '-'):>8} {r.get('eval_s', '-'):>7} "
              f"{r.get('micro_batch_size', '-'):>5}  {r.get('device', r['exit_codes'])}")
    return 0 if all("steady_epoch_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
