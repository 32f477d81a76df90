"""The README's main job: the whole pipeline on the embedded sample corpus, offline.

    bash launch/demo.sh [--steps 300] [--out runs/demo]

1. builds the sample corpus in the Pile's format (data_prep/build_sample_corpus.py),
2. trains a SentencePiece tokenizer on it (data_prep/train_tokenizer.py),
3. tokenizes train/val/test into indexed shards (data_prep/tokenize_pile.py),
4. pretrains a tiny ReBased hybrid and a tiny Transformer++ through launch/pretrain.sh,
5. evaluates both exports on the held-out test split (python -m pretrain.evaluate) and prints a comparison,
6. writes a loss-curve plot (OUT/loss_curves.png) from the runs' metrics.jsonl.

Each step is the real command, printed before it runs; finished steps are skipped when the command is rerun with
the same --steps and --vocab-size (OUT/settings.json; other values redo what depends on them), and an unfinished
training run starts over in a clean directory.
On a machine with a GPU the training and evaluation use it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"rebased": "configs/models/tiny_rebased.yaml", "transformer": "configs/models/tiny_transformer.yaml"}


def run(cmd: list[str], done: Path | None = None) -> None:
    if done is not None and done.exists():
        print(f"[demo] skip (done): {shlex.join(cmd)}", flush=True)
        return
    print(f"\n[demo] $ {shlex.join(cmd)}", flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:  # the step printed its own message: stop with its exit code (2: bad input), no traceback of ours
        print(f"[demo] stopped: the step above exited with code {code}", file=sys.stderr, flush=True)
        raise SystemExit(code)


def forget_stale_outputs(out: Path, settings: dict) -> None:
    """Remove what an earlier run in ``out`` made with other settings, so that no finished step is skipped with
    results for other --steps or --vocab-size, and record the settings."""
    stamp = out / "settings.json"
    old = json.loads(stamp.read_text()) if stamp.exists() else settings
    stale = []
    if old.get("vocab_size") != settings["vocab_size"]:
        stale += [*out.glob("tokenizer.*"), out / "data"]
    if old != settings:
        stale += [out / name for name in MODELS] + [out / f"eval_{name}.json" for name in MODELS]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if stale:
        print(f"[demo] settings changed from {old} to {settings}: redoing the steps that depend on them", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_losses(runs: dict[str, Path], out: Path) -> None:
    import matplotlib  # only for the figure, at the end of the demo

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run_dir in runs.items():
        records = read_metrics(run_dir / "metrics.jsonl")
        train = [(r["step"], r["loss"]) for r in records if r.get("kind", "train") == "train" and "loss" in r]
        valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            line, = ax.plot(*zip(*train), label=f"{name} train")
            if valid:
                ax.plot(*zip(*valid), "o--", color=line.get_color(), label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Tiny ReBased hybrid vs Transformer++ on the embedded sample corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="working directory (relative to the repository)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    for option, value in (("--steps", args.steps), ("--vocab-size", args.vocab_size)):
        if value < 1:  # refused before anything of an earlier demo is removed
            parser.error(f"{option} must be >= 1, got {value}")
    out = Path(args.out)
    py = sys.executable
    start = time.time()
    forget_stale_outputs(ROOT / out, {"steps": args.steps, "vocab_size": args.vocab_size})

    corpus, tok, data = out / "corpus", out / "tokenizer.model", out / "data"
    run([py, "data_prep/build_sample_corpus.py", "--out", str(corpus)], done=ROOT / corpus / "test.jsonl.zst")
    run([py, "data_prep/train_tokenizer.py", "--inputs", str(corpus / "train"), "--vocab-size",
         str(args.vocab_size), "--out", str(tok)], done=ROOT / tok)
    run([py, "data_prep/tokenize_pile.py", "--inputs", str(corpus / "train"), "--val-inputs",
         str(corpus / "val.jsonl.zst"), "--test-inputs", str(corpus / "test.jsonl.zst"), "--tokenizer", str(tok),
         "--out", str(data), "--no-progress"], done=ROOT / data / "manifest.json")

    runs, results = {}, []
    for name, model in MODELS.items():
        run_dir = out / name
        runs[name] = ROOT / run_dir
        result = ROOT / out / f"eval_{name}.json"
        trained = ROOT / run_dir / "export" / "model.safetensors"
        if not trained.exists():
            # an interrupted run starts over (checkpoint.resume=none), and its metrics.jsonl, which a run appends
            # to, and its evaluation must not mix with the new run's
            shutil.rmtree(ROOT / run_dir, ignore_errors=True)
            result.unlink(missing_ok=True)
        run(["bash", "launch/pretrain.sh", "configs/runs/demo.yaml", f"model={model}", f"out_dir={run_dir}",
             f"data.train=[{{path: {data / 'train'}}}]", f"data.valid=[{{path: {data / 'val'}}}]",
             f"model_overrides=[vocab_size={args.vocab_size}]", f"training.max_steps={args.steps}",
             "checkpoint.resume=none"], done=trained)
        run([py, "-m", "pretrain.evaluate", "--checkpoint", str(run_dir / "export"), "--data",
             str(corpus / "test.jsonl.zst"), "--tokenizer", str(tok), "--seq-len", "256", "--out", str(result)],
            done=result)
        results.append(str(result))

    print("\n[demo] held-out test split (raw text, tokenized on the fly; per-set breakdown from meta.pile_set_name):")
    run([py, "-m", "pretrain.evaluate", "compare", *results])
    plot = ROOT / out / "loss_curves.png"
    plot_losses(runs, plot)
    print(f"\n[demo] loss curves: {plot}")
    print(f"[demo] finished in {time.time() - start:.0f}s; runs, checkpoints and metrics under {ROOT / out}")


if __name__ == "__main__":
    main()
