"""How long the MQAR generator takes for one split, on one thread and on several (the examples are the same).

    python -m benchmarks.mqar_data_speed [--seq-len 2048] [--examples 8192] [--threads 1,2] [--out DIR]

Prints seconds per call (best of 3) for each thread count and writes ``mqar_data_speed_<date>.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import time

from pretrain.atomic import write_text_atomic
from pretrain.cores import available_cores
from pretrain.mqar.data import MQARSpec, _generate, default_num_kv_pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--examples", type=int, default=8192)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--out")
    args = p.parse_args()
    spec = MQARSpec(seq_len=args.seq_len, num_kv_pairs=default_num_kv_pairs(args.seq_len))
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            _generate(spec, args.examples, seed=42, workers=threads)
            times.append(time.perf_counter() - start)
        rows.append((threads, min(times)))
        print(f"{threads} thread(s): {min(times):.2f} s for {args.examples} examples at seq {args.seq_len}", flush=True)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# MQAR data generation speed, {date}", "",
             f"Machine: {platform.processor() or platform.machine()}, {available_cores()} usable cores. Command: "
             f"`python -m benchmarks.mqar_data_speed --seq-len {args.seq_len} --examples {args.examples} "
             f"--threads {args.threads}`; best of 3.", "",
             "| threads | seconds | speed-up |", "|---|---|---|"]
    lines += [f"| {t} | {s:.2f} | {rows[0][1] / s:.2f}× |" for t, s in rows]
    print("\n".join(lines))
    if args.out:
        write_text_atomic(os.path.join(args.out, f"mqar_data_speed_{date[:10]}.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
