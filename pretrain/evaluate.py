"""Perplexity and bits-per-byte of trained models on held-out data.

    python -m pretrain.evaluate --checkpoint CKPT --data PREFIX_OR_TEXT [--tokenizer tok.model] [options]
    python -m pretrain.evaluate compare results_a.json results_b.json ...

CKPT is a consolidated export (a directory with ``model.safetensors`` and ``config.yaml``) or a training
run's checkpoint directory. Data is indexed token shards (``PREFIX`` of ``PREFIX.bin``/``PREFIX.idx``, a
directory or glob of them) or raw ``.jsonl[.zst|.gz]`` text tokenized on the fly (then the tokenizer is needed,
and the Pile's ``meta.pile_set_name`` gives a per-set breakdown). With shards, bits per byte needs the tokenizer
too (documents are decoded to count their bytes).

Under ``torchrun`` the windows are split over ranks and the sums gathered in a fixed order, so the result equals
a single process's. Windowing and document layout are described in ``pretrain/evaluation/scoring.py`` and
recorded in the output JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pretrain.atomic import check_writable, write_json_atomic
from pretrain.config import ConfigError
from pretrain.evaluation.loading import EvaluationInputError, load_documents, load_model, load_tokenizer
from pretrain.evaluation.scoring import score_documents, totals_by_set
from pretrain.training.distributed import all_gather_object, init_from_env
from pretrain.training.errors import EXIT_CONFIG, report_error


def evaluate(args) -> dict:
    rank, world = init_from_env()
    all_gather = all_gather_object if world > 1 else None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.batch_size < 1:
        raise EvaluationInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_documents is not None and args.max_documents < 1:
        raise EvaluationInputError(f"--max-documents must be >= 1, got {args.max_documents}")
    if args.out:
        try:
            check_writable(args.out, "--out")  # before the evaluation, whose result a failing write would lose
        except ValueError as e:
            raise EvaluationInputError(str(e)) from None
    tokenizer = load_tokenizer(args.tokenizer)
    docs = load_documents(args.data, tokenizer, text_key=args.text_key, max_documents=args.max_documents)
    if not docs:
        raise EvaluationInputError(f"{args.data}: no documents to evaluate")
    model = load_model(args.checkpoint, device)
    seq_len = args.seq_len if args.seq_len is not None else model.config.max_seq_len
    eod_id = args.eod_id if args.eod_id is not None else (
        tokenizer.eod_id if tokenizer is not None else _default_eod(args))
    _check_inputs(model.config, seq_len, args.stride, docs, eod_id)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def logits_fn(ids):
        with autocast:
            return model(ids)

    total_targets = sum(len(d.tokens) for d in docs)
    bar = tqdm(total=total_targets // world, unit="tok", desc="evaluate", disable=rank != 0, unit_scale=True)
    start = time.time()
    per_doc = score_documents(logits_fn, docs, seq_len=seq_len, eod_id=eod_id, stride=args.stride, layout=args.documents,
        batch_size=args.batch_size, device=device, rank=rank, world_size=world, all_gather=all_gather, progress=bar)
    bar.close()
    overall, by_set = totals_by_set(docs, per_doc)
    result = {
        "name": args.name or model_name(args.checkpoint), "checkpoint": str(args.checkpoint), "data": str(args.data),
        "seq_len": seq_len,
        "windows": "non-overlapping" if args.stride is None else f"sliding, stride {args.stride}",
        "documents_layout": args.documents + (" (state reset per document)" if args.documents == "separate"
                                              else " (context crosses documents)"),
        "precision": precision, "world_size": world, "seconds": round(time.time() - start, 3),
        **overall.summary(), "by_set": {k: v.summary() for k, v in by_set.items()},
    }
    if rank == 0:
        print_table([result])
        if args.out:
            write_json_atomic(args.out, result, indent=2)
    return result


def _check_inputs(cfg, seq_len: int, stride: int | None, docs, eod_id: int) -> None:
    """Refuse, naming the option, windows or tokens the model cannot score, before any forward runs."""
    if seq_len < 1:
        raise EvaluationInputError(f"--seq-len must be >= 1, got {seq_len}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise EvaluationInputError(f"--stride must be in [1, --seq-len={seq_len}], got {stride}")
    if cfg.learned_positions and seq_len > cfg.max_seq_len:  # rotary and linear attention have no such limit
        raise EvaluationInputError(f"--seq-len {seq_len} exceeds the model's learned position table "
                                   f"(max_seq_len={cfg.max_seq_len}); evaluate at --seq-len {cfg.max_seq_len} or less")
    if not 0 <= eod_id < cfg.vocab_size:  # it starts every window of a document
        raise EvaluationInputError(f"--eod-id {eod_id} is outside the model's vocabulary (vocab_size={cfg.vocab_size})")
    top = max((max(d.tokens) for d in docs if d.tokens), default=-1)
    if top >= cfg.vocab_size:
        raise EvaluationInputError(f"token id {top} is outside the model's vocabulary (vocab_size={cfg.vocab_size}):"
                                   f" the data was tokenized with another tokenizer")


def _default_eod(args):
    raise EvaluationInputError("give --tokenizer (or --eod-id) so the end-of-document id is known")


def model_name(checkpoint: str) -> str:
    """A short label: the run directory for ``RUN/export`` or ``RUN/checkpoints[/step_N]``, else the last part."""
    parts = [p for p in Path(checkpoint).parts if p not in ("export", "checkpoints") and not p.startswith("step_")]
    return parts[-1] if parts else str(checkpoint)


def print_table(results: list[dict]) -> None:
    names = [r.get("name") or model_name(r["checkpoint"]) for r in results]
    width = max(12, *(len(n) for n in names))
    print(f"{'model':<{width}} {'tokens':>10} {'loss':>8} {'ppl':>10} {'bits/byte':>10}  windows / layout")
    for name, r in zip(names, results):
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "n/a"
        print(f"{name:<{width}} {r['tokens']:>10} {r['loss']:>8.4f} {r['perplexity']:>10.3f} {bpb:>10}  "
              f"{r['windows']}, {r['documents_layout'].split(' ')[0]}, seq {r['seq_len']}")
    sets = sorted({s for r in results for s in r.get("by_set", {})})
    if sets:
        set_width = max(len("perplexity by set"), *(len(s) for s in sets))
        print(f"\n{'perplexity by set':<{set_width}} " + " ".join(f"{n[:14]:>14}" for n in names))
        for s in sets:
            cells = [r["by_set"].get(s) for r in results]
            print(f"{s:<{set_width}} " + " ".join(f"{c['perplexity']:>14.3f}" if c else f"{'-':>14}" for c in cells))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate compare",
                                         description="print several evaluation results side by side")
        parser.add_argument("results", nargs="+", help="JSON files written with --out")
        args = parser.parse_args(argv[1:])
        results = []
        for path in args.results:
            try:
                results.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as e:
                print(f"error: {path}: not a readable result JSON ({e})", file=sys.stderr)
                raise SystemExit(2) from None
        try:
            print_table(results)
        except (KeyError, TypeError) as e:
            print(f"error: a result lacks the field {e} (not written by python -m pretrain.evaluate --out?)",
                  file=sys.stderr)
            raise SystemExit(2) from None
        return results
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="export dir (model.safetensors) or checkpoint dir")
    parser.add_argument("--data", required=True, help="shard prefix / dir / glob, or .jsonl[.zst|.gz] text")
    parser.add_argument("--tokenizer", help="SentencePiece .model (raw text, bits per byte, EOD id)")
    parser.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    parser.add_argument("--stride", type=int, help="sliding windows with this stride (default: non-overlapping)")
    parser.add_argument("--documents", choices=["separate", "packed"], default="separate",
                        help="score each document on its own (default) or as one packed stream")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--max-documents", type=int)
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--eod-id", type=int, help="end-of-document id when no tokenizer is given")
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--name", help="label in tables (default: the run directory's name)")
    args = parser.parse_args(argv)
    try:
        return evaluate(args)
    except ConfigError as e:  # a bad config or a checkpoint that fails verification: one line, exit code 2
        report_error(EXIT_CONFIG, f"error: {e}")  # under pretrain.torchrun: handed to the launcher, printed once
        raise SystemExit(EXIT_CONFIG) from None
    finally:
        if dist.is_initialized():  # released here, not at interpreter exit (gloo can abort the process there)
            gc.collect()
            dist.barrier()  # no rank tears the group down while another is still in a collective
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
