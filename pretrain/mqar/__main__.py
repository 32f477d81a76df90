"""Run one MQAR setting.

    python -m pretrain.mqar --config configs/mqar/base.yaml [key.sub=value ...] [--output result.json]

Overrides use the config's dotted keys, e.g. ``model.mixer=based model.d_model=64 data.seq_len=1024
train.lr=3e-3 train.seed=1``. The result (best / final validation accuracy, per-epoch history, timings, device,
date, command, full config) is printed and, with ``output`` set, written atomically as JSON.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from pretrain.config import ConfigError, to_dict
from pretrain.mqar.config import load_mqar_config
from pretrain.mqar.train import RunInProgressError, train_mqar


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m pretrain.mqar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="MQAR YAML config (configs/mqar/...)")
    parser.add_argument("--output", help="result JSON path (overrides the config's 'output')")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)

    try:
        cfg = load_mqar_config(args.config, list(args.overrides))
        if args.output:  # set after loading: a path is not parsed as YAML
            cfg.output = args.output
        model_cfg = cfg.model_config()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.output and Path(cfg.output).is_dir():  # found before training, not by the final write
        print(f"error: output {cfg.output}: is a directory; name the result JSON file", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump({"mqar": to_dict(cfg), "model": to_dict(model_cfg)}, sort_keys=False))
        return 0
    command = "python -m pretrain.mqar " + " ".join(shlex.quote(a) for a in argv)
    try:
        train_mqar(cfg, command=command)
    except (RunInProgressError, ConfigError) as e:  # another run of this output; a device this machine lacks
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
