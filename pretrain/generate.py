"""Sample text from a trained model.

    python -m pretrain.generate --checkpoint runs/x/export --tokenizer tok.model --prompt "Once upon a time"
        [--max-new-tokens 128] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 0] [--stop "\\n\\n"]
    python -m pretrain.generate --checkpoint ... --tokenizer ... --prompts prompts.txt [--out samples.jsonl]

One prompt streams its continuation to the terminal as it is decoded. ``--prompts FILE`` takes one prompt per line
(or a ``.jsonl`` file of {"prompt": ...} objects), decodes them as one batch and prints each continuation when the
batch is done (and writes them to ``--out`` as JSON lines). Every prompt starts after the end-of-document token,
as every training document did. ``--temperature 0`` is greedy. A row stops at the end-of-document token (unless
``--ignore-eos``), at a ``--stop`` string (cut from the output), or after ``--max-new-tokens``.
``--checkpoint`` takes an export or any training checkpoint (a run's checkpoint folder: its latest).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from pretrain.atomic import check_writable, write_text_atomic
from pretrain.config import ConfigError
from pretrain.data.tokenizer import Tokenizer
from pretrain.evaluation.loading import load_model
from pretrain.generation.decoder import check_positions, generate
from pretrain.generation.sampling import Sampling


def parse_device(name: str | None) -> torch.device:
    """``--device`` (default: cuda when available), refused here if this machine cannot run it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):  # torch parses it, loading weights onto it fails
        raise ValueError(f"--device {name!r}: there is one CPU device; use cpu")
    return device


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a text file (blank lines skipped), or the "prompt" field of each JSON line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    # lines end at "\n" only (read_text already turned "\r\n" into it): str.splitlines would also cut at U+2028,
    # form feeds and the like, which a prompt (or a JSON string) may hold
    lines = text.split("\n")
    if not path.endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' string ({e})") from None
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{n}: 'prompt' must be a string, not {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"{path}:{n}: the prompt is empty (a prompt needs at least one character)")
        prompts.append(prompt)
    return prompts


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(stop: str) -> str:
    """``--stop`` as typed in a shell: ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` are a newline, a tab, a carriage return
    and a backslash (``--stop "\\n\\n"`` stops at a blank line); any other backslash stays as it is."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), stop, flags=re.DOTALL)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def settled(text: str, stops: list[str]) -> str:
    """The part of a growing continuation (already cut at its stop strings) that later tokens cannot change: without
    an incomplete character at its end (its next byte is to come) and without an end that may begin a stop string."""
    text = text.rstrip("\ufffd")
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - held]


class Streamer:
    """Prints the new text of one row as tokens arrive (decoding the whole continuation each time: a token may
    complete a multi-byte character begun by the previous one). Only settled text is printed, so the stream never
    shows what the final text cuts; ``finish`` prints the rest of that final text."""

    def __init__(self, tokenizer, stops: list[str], out=None):
        # sys.stdout as it is now, not at import: a redirected stdout (contextlib.redirect_stdout, pytest's capsys)
        # gets the continuation too, as it gets the prompt
        self.tokenizer, self.stops, self.out = tokenizer, stops, out if out is not None else sys.stdout
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, new: list[int | None]) -> None:
        if new[0] is None:
            return
        self.tokens.append(new[0])
        self._write(settled(cut_at_stop(self.tokenizer.decode(self._body()), self.stops)[0], self.stops))

    def finish(self, text: str) -> None:
        """Print what is left of ``text``, the row's final continuation."""
        self._write(text)

    def _write(self, text: str) -> None:
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = max(self.printed, len(text))  # a shorter text must not print its end again

    def _body(self) -> list[int]:
        eod = self.tokenizer.eod_id
        return self.tokens[:-1] if self.tokens and self.tokens[-1] == eod else self.tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="export dir (model.safetensors) or checkpoint dir")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model the model was trained with")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (streamed)")
    source.add_argument("--prompts", help="a file of prompts: one per line, or .jsonl with a 'prompt' field")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[],
                        help="stop string (repeatable); \\n, \\t, \\r and \\\\ in it are escapes")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-document token")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="weights and activations (auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--no-cuda-graph", action="store_true", help="run every decoding step eagerly")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoding step (fewer kernels per token; compiles once, ~a minute)")
    parser.add_argument("--out", help="write {prompt, completion, tokens} JSON lines here")
    args = parser.parse_args(argv)

    try:
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
        args.stop = [unescape(s) for s in args.stop]
        if "" in args.stop:  # found at the start of every text: each row would stop after one token, printing nothing
            raise ValueError("--stop '' is empty: a stop string needs at least one character")
        if args.prompt == "":
            raise ValueError("--prompt '' is empty: a prompt needs at least one character")
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts")
        if args.out:
            check_writable(args.out, "--out")  # before decoding, which a failing write at the end would throw away
        tokenizer = Tokenizer(args.tokenizer)
        device = parse_device(args.device)
        model = load_model(args.checkpoint, device)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"{args.tokenizer} has {tokenizer.vocab_size} tokens, more than the model's "
                             f"{model.config.vocab_size}")
        if not 0 <= tokenizer.eod_id < model.config.vocab_size:
            raise ValueError(f"{args.tokenizer} has no end-of-document token (id {tokenizer.eod_id}) in the model's "
                             f"vocabulary of {model.config.vocab_size}: every prompt starts after it, as every "
                             "training document did")
        ids = [[tokenizer.eod_id] + tokenizer.encode(p) for p in prompts]
        check_positions(model, ids, args.max_new_tokens)
    except (ValueError, OSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16":
        model = model.to(torch.bfloat16)

    def should_stop(row: int, tokens: list[int]) -> bool:
        return bool(args.stop) and cut_at_stop(tokenizer.decode(tokens), args.stop)[1]

    streamer = Streamer(tokenizer, args.stop) if args.prompt is not None else None  # --prompts: always a batch
    if streamer is not None:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    start = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, sampling=sampling,
                   eos_ids=() if args.ignore_eos else (tokenizer.eod_id,), should_stop=should_stop,
                   on_tokens=streamer, cuda_graph=not args.no_cuda_graph, compile=args.compile,
                   vocab_size=tokenizer.vocab_size)
    seconds = time.perf_counter() - start
    records = []
    for prompt, tokens in zip(prompts, out):
        body = tokens[:-1] if tokens and tokens[-1] == tokenizer.eod_id and not args.ignore_eos else tokens
        text, _ = cut_at_stop(tokenizer.decode(body), args.stop)
        records.append({"prompt": prompt, "completion": text, "tokens": len(tokens)})
    if streamer is not None:
        streamer.finish(records[0]["completion"])
        sys.stdout.write("\n")
    else:
        for i, r in enumerate(records):
            print(f"=== {i}: {r['prompt']}\n{r['prompt']}{r['completion']}\n")
    new_tokens = sum(r["tokens"] for r in records)
    print(f"[{len(prompts)} prompt(s), {new_tokens} new tokens in {seconds:.2f} s, {precision}, {device.type}]",
          file=sys.stderr)
    if args.out:
        write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
