"""Print parameter counts and FLOPs per token of model configs.

    python -m pretrain.models.summary configs/models/*.yaml [--seq-len 2048]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from pretrain.models import count_parameters, flops_per_token, load_model_config


def summarize(path: str, seq_len: int) -> dict:
    cfg = load_model_config(path)
    params = count_parameters(cfg)
    flops = flops_per_token(cfg, seq_len)
    mixers = ", ".join(f"{n}×{k}" for k, n in Counter(cfg.layers).items())
    return {"config": Path(path).stem, "layers": cfg.n_layer, "d_model": cfg.d_model, "mixers": mixers,
            **params, "train_flops_per_token": flops["train"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="model config YAML files")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length for the FLOP count")
    args = parser.parse_args(argv)
    rows = [summarize(p, args.seq_len) for p in args.configs]
    print(f"{'config':<20} {'layers':>6} {'d_model':>7} {'params':>10} {'non-emb':>10} "
          f"{'train GFLOP/tok':>15}  mixers")
    for r in rows:
        print(f"{r['config']:<20} {r['layers']:>6} {r['d_model']:>7} {r['total'] / 1e6:>9.1f}M "
              f"{r['non_embedding'] / 1e6:>9.1f}M {r['train_flops_per_token'] / 1e9:>15.3f}  {r['mixers']}")
    return rows


if __name__ == "__main__":
    main()
