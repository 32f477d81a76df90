"""Tokenize the Pile (or any corpus in its JSONL format) into packed NeoX/Megatron indexed shards.

    python data_prep/tokenize_pile.py --inputs PILE/train --val-inputs PILE/val.jsonl.zst \\
        --tokenizer tok.model --out data/pile

Writes ``OUT/{train,val,test}/{split}-NNNNN.{bin,idx}`` (one shard per ``--docs-per-shard`` input records),
``OUT/{split}/manifest.json`` and ``OUT/manifest.json``; rerunning the same command after an interruption resumes.
See ``data_prep/pipeline.py`` for the design.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.pipeline import TokenizeConfig, WorkerDiedError, format_summary, tokenize  # noqa: E402
from pretrain.data.sources import InputError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True,
                   help="input files (.jsonl, .jsonl.zst, .jsonl.gz), directories, globs, or "
                        "hf:PATH?split=S&data_files=GLOB&name=CONFIG (Hugging Face datasets, streamed)")
    p.add_argument("--val-inputs", nargs="+", default=[], help="inputs written entirely to the val split")
    p.add_argument("--test-inputs", nargs="+", default=[], help="inputs written entirely to the test split")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model (see data_prep/train_tokenizer.py)")
    p.add_argument("--text-key", default="text", help="JSON field holding the document text (default: text)")
    p.add_argument("--set-key", default="meta.pile_set_name",
                   help="dotted path of the subset name used for filtering and counts (default: meta.pile_set_name; "
                        "'': no subsets); records without a string or number there count as <none>")
    p.add_argument("--include-sets", nargs="+", default=None, metavar="NAME", help="keep only these pile_set_names")
    p.add_argument("--exclude-sets", nargs="+", default=None, metavar="NAME", help="drop these pile_set_names")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of main-input documents held out to val (by a keyed hash of the text)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="likewise for test")
    p.add_argument("--split-seed", type=int, default=0, help="key of the holdout hash")
    p.add_argument("--max-docs", type=int, default=None,
                   help="read at most this many records from each input group (main, val, test)")
    p.add_argument("--max-doc-bytes", type=int, default=64 << 20,
                   help="a document whose text has more UTF-8 bytes is an error (skipped with --on-error skip); "
                   "default 64 MiB")
    p.add_argument("--prepend-bos", action="store_true", help="also put BOS before each document (EOD always ends it)")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="stop (default): bad input stops the run naming file and line; skip: skip and count it")
    p.add_argument("--docs-per-shard", type=int, default=100_000,
                   help="input records per output shard (the unit of resume); default 100000")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all available cores)")
    p.add_argument("--batch-docs", type=int, default=64, help="records per work item (no effect on output)")
    p.add_argument("--batch-bytes", type=int, default=256 << 10, help="bytes per work item (no effect on output)")
    p.add_argument("--merge", action="store_true", help="also write each split as a single OUT/{split}.bin/.idx")
    p.add_argument("--overwrite", action="store_true", help="discard an existing (different) run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TokenizeConfig:
    return TokenizeConfig(
        inputs=args.inputs, val_inputs=args.val_inputs, test_inputs=args.test_inputs, out=args.out,
        tokenizer=args.tokenizer, text_key=args.text_key, set_key=args.set_key, include_sets=args.include_sets,
        exclude_sets=args.exclude_sets, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        split_seed=args.split_seed, max_docs=args.max_docs, max_doc_bytes=args.max_doc_bytes,
        prepend_bos=args.prepend_bos, on_error=args.on_error, docs_per_shard=args.docs_per_shard,
        workers=args.workers, batch_docs=args.batch_docs, batch_bytes=args.batch_bytes, merge=args.merge,
        overwrite=args.overwrite, progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = tokenize(config_from_args(args))
    except (InputError, ValueError, WorkerDiedError, OSError) as e:  # OSError: e.g. a missing --tokenizer
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(manifest))
    print(f"manifest: {args.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
