"""Report of the quality runs: bits per byte by model, width, evaluation length and subset (mean ± std over seeds),
paired comparisons with a confidence interval and a paired t-test, and the training loss curves.

    python -m benchmarks.quality.report --evals results/quality/*.json --runs runs/quality/* --out REPORT_DIR

Each evaluation JSON is a ``python -m pretrain.evaluate ... --name q50m_rebased_s0 --seq-len 2048 --out F`` result:
its ``name`` says width, model and seed (``q<width>_<model>_s<seed>``), its ``seq_len`` the evaluation length.
A run directory's ``metrics.jsonl`` (the trainer's log) gives its curve; the directory is named like an evaluation.
Writes ``quality_table.md``, ``quality_summary.json`` and ``loss_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from pretrain.atomic import write_file_atomic, write_json_atomic, write_text_atomic
from pretrain.mqar.report import mean_std

NAME = re.compile(r"^q(?P<width>\d+m)_(?P<model>.+)_s(?P<seed>\d+)$")
PAIRS = [("rebased", "based"), ("rebased", "transformer")]


# --- Student's t distribution (no SciPy in the dependencies) ---------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                    -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t, by bisection on the two-sided tail."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_p(mid, df) > 2 * (1 - q):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b over the seeds both have: mean, std, 95% interval and the paired t-test's two-sided p. Seeds only one
    side has are listed in ``unpaired`` and left out; ``note`` says why there is no interval or test."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "unpaired": sorted(set(a) ^ set(b)), "differences": diffs,
           "mean": statistics.fmean(diffs) if diffs else None, "std": None, "ci95": None, "t": None, "p": None,
           "note": None}
    if len(diffs) < 2:
        return {**out, "note": "no seed in common" if not diffs else "1 seed: no interval or test (needs 2)"}
    sd = statistics.stdev(diffs)
    # equal differences (up to the rounding of the inputs) have no spread to test against: t would be infinite and
    # p = 0 even when both models score the same
    if sd <= 1e-12 * max(abs(v) for s in seeds for v in (a[s], b[s])):
        return {**out, "std": sd, "note": "all differences equal: no interval or test (zero variance)"}
    half = t_quantile(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    t = out["mean"] / (sd / math.sqrt(len(diffs)))
    return {**out, "std": sd, "ci95": [out["mean"] - half, out["mean"] + half], "t": t,
            "p": t_two_sided_p(t, len(diffs) - 1)}


# --- inputs ----------------------------------------------------------------------------------------------------

def _finite(value, path: Path, field: str) -> float:
    """``value`` as a float; an error naming the file otherwise (one NaN would make every mean and test NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SystemExit(f"error: {path}: {field} must be a finite number (got {value!r})")
    return float(value)


def load_evals(paths: list[Path]) -> list[dict]:
    rows = []
    first_file: dict[tuple, str] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {path}: not a readable evaluation JSON ({e})")
        if not isinstance(data, dict):
            raise SystemExit(f"error: {path}: not an evaluation result (a JSON {type(data).__name__}, not an object)")
        match = NAME.match(str(data.get("name", "")))
        if not match or "bits_per_byte" not in data or "seq_len" not in data:
            raise SystemExit(f"error: {path}: field 'name' must be q<width>_<model>_s<seed> (got "
                             f"{data.get('name')!r}) and 'bits_per_byte', 'seq_len' must be present")
        if not isinstance(data.get("by_set", {}), dict):
            raise SystemExit(f"error: {path}: by_set must be a mapping of set name to result, got "
                             f"{type(data['by_set']).__name__}")
        by_set = {k: _finite(v.get("bits_per_byte") if isinstance(v, dict) else None, path,
                             f"by_set[{k!r}].bits_per_byte") for k, v in data.get("by_set", {}).items()}
        seq_len = data["seq_len"]
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise SystemExit(f"error: {path}: seq_len must be a whole number >= 1 (got {seq_len!r})")
        row = {"width": match["width"], "model": match["model"], "seed": int(match["seed"]),
               "seq_len": seq_len, "bpb": _finite(data["bits_per_byte"], path, "bits_per_byte"),
               "loss": _finite(data.get("loss"), path, "loss"), "by_set": by_set, "file": str(path)}
        key = (row["width"], row["model"], row["seed"], row["seq_len"])
        if key in first_file:  # two results for one run and length: which one counts is the user's call
            raise SystemExit(f"error: {first_file[key]} and {path} are both the evaluation of width {key[0]}, "
                             f"model {key[1]}, seed {key[2]} at length {key[3]}: keep one")
        first_file[key] = str(path)
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """{width: {seq_len: {"models": {model: stats}, "pairs": {...}}}}."""
    by = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        by[r["width"]][r["seq_len"]][r["model"]].append(r)
    summary = {}
    for width, lengths in sorted(by.items()):
        summary[width] = {}
        for seq_len, models in sorted(lengths.items()):
            stats = {}
            for model, runs in sorted(models.items()):
                subsets = sorted({s for r in runs for s in r["by_set"]})
                stats[model] = {
                    "seeds": sorted(r["seed"] for r in runs),
                    "bpb": _mean_std([r["bpb"] for r in runs]),
                    "loss": _mean_std([r["loss"] for r in runs]),
                    "by_set": {s: _mean_std([r["by_set"][s] for r in runs if s in r["by_set"]]) for s in subsets},
                }
            pairs = {}
            for a, b in PAIRS:
                if a in models and b in models:
                    pairs[f"{a} - {b}"] = paired({r["seed"]: r["bpb"] for r in models[a]},
                                                 {r["seed"]: r["bpb"] for r in models[b]})
            summary[width][seq_len] = {"models": stats, "pairs": pairs}
    return summary


def _mean_std(values: list[float]) -> dict:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "n": len(values)}


def _fmt(ms: dict, runs: int | None = None) -> str:
    """mean ± std, with (n=k) when only k of the ``runs`` have the value (a subset missing from some runs)."""
    return (f"{ms['mean']:.4f}" + (f" ± {ms['std']:.4f}" if ms["std"] is not None else "")
            + (f" (n={ms['n']})" if runs is not None and ms["n"] < runs else ""))


def table(summary: dict) -> str:
    lines = ["# Quality runs: bits per byte (mean ± std over seeds; lower is better)", ""]
    for width, lengths in summary.items():
        for seq_len, block in lengths.items():
            models = block["models"]
            subsets = sorted({s for m in models.values() for s in m["by_set"]})
            lines += [f"## {width}, evaluated at sequence length {seq_len}", "",
                      "| model | seeds | all | " + " | ".join(subsets) + " |",
                      "|---|---|---|" + "---|" * len(subsets)]
            for model, st in models.items():
                runs = len(st["seeds"])
                cells = [_fmt(st["by_set"][s], runs) if s in st["by_set"] else "–" for s in subsets]
                lines.append(f"| {model} | {runs} | {_fmt(st['bpb'])} | " + " | ".join(cells) + " |")
            if any(ms["n"] < len(st["seeds"]) for st in models.values() for ms in st["by_set"].values()):
                lines += ["", "(n=k): the subset is in only k of the model's runs; its mean is over those."]
            if block["pairs"]:
                lines += ["", "Paired by seed: a - b is a's bits per byte minus b's in the same seed, so a negative "
                          "difference means a (ReBased) is better.", "",
                          "| pair a - b | seeds | mean | 95% interval | paired t | p |", "|---|---|---|---|---|---|"]
                for pair, pr in block["pairs"].items():
                    mean = "–" if pr["mean"] is None else f"{pr['mean']:+.4f}"
                    if pr["p"] is None:
                        lines.append(f"| {pair} | {len(pr['seeds'])} | {mean} | {pr['note']} | | |")
                    else:
                        lo, hi = pr["ci95"]
                        lines.append(f"| {pair} | {len(pr['seeds'])} | {mean} | [{lo:+.4f}, {hi:+.4f}] | "
                                     f"{pr['t']:.2f} | {pr['p']:.3g} |")
                for pair, pr in block["pairs"].items():
                    if pr["unpaired"]:
                        lines += ["", f"{pair}: seed(s) {', '.join(map(str, pr['unpaired']))} left out "
                                  "(evaluated for one of the two models only)."]
            lines.append("")
    return "\n".join(lines)


def plot_curves(run_dirs: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, start) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in sorted(run_dirs):
        metrics = run / "metrics.jsonl"
        if not metrics.exists():
            raise SystemExit(f"error: {run}: no metrics.jsonl (is it a training run's out_dir?)")
        points = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        points = sorted({p["step"]: p for p in points if "loss" in p}.values(), key=lambda p: p["step"])
        # the trainer logs a non-finite loss as the string "nan"/"inf" (JSON has neither): as text it would turn the
        # axis into categories; as a float it is a gap in the curve
        steps, losses = [p["step"] for p in points], [float(p["loss"]) for p in points]
        full.plot(steps, losses, label=run.name, lw=1)
        first = [(s, v) for s, v in zip(steps, losses) if s <= 100]
        if first:
            start.plot(*zip(*first), label=run.name, lw=1, marker=".")
    full.set(xlabel="step", ylabel="training loss", title="training loss")
    start.set(xlabel="step", ylabel="training loss", title="the first 100 steps")
    full.legend(fontsize=7)
    fig.tight_layout()
    write_file_atomic(out, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evals", nargs="+", required=True, type=Path, help="pretrain.evaluate result JSONs")
    p.add_argument("--runs", nargs="*", default=[], type=Path, help="training out_dirs (metrics.jsonl) to plot")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    summary = summarise(load_evals(args.evals))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "quality_summary.json", summary)
    write_text_atomic(args.out / "quality_table.md", table(summary) + "\n")
    if args.runs:
        plot_curves(args.runs, args.out / "loss_curves.png")
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
