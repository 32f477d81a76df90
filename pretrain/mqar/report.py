"""Table and figure from MQAR results, in the ReBased paper's layout.

    python -m pretrain.mqar.report RESULTS_DIR [RESULTS_DIR ...] --out DIR [--metric best|final]

Reads every complete result JSON under the folders (``pretrain.mqar.results.iter_results``). For each
(mixer, d_model, seq_len) the learning rate with the highest mean accuracy over seeds is chosen (ties: more seeds,
then the smaller lr), as the paper reports the best lr per point. Prints a markdown table (accuracy mean ± sample
std over seeds at that lr, the lr, the number of seeds, mean wall time per run) and writes

* ``DIR/mqar_table.md``      the table, an accuracy grid (rows mixer × d_model, columns seq_len) and the provenance
  (devices, dates, torch versions, commits, protocols of the runs);
* ``DIR/mqar_summary.json``  the same numbers, with every lr's mean/std/seeds per point;
* ``DIR/mqar_accuracy.png``  one panel per sequence length, x = d_model (log2 axis), y = accuracy, one line per mixer.

The same setting (mixer, d_model, seq_len, lr, seed) found twice counts once: the newest result (by its date).
A run stopped by a time or step limit (``stopped_by``: ``time_limit`` / ``max_steps``) before its last epoch and
without the early stop is a lower bound: its point is printed as ``≥ accuracy``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from pretrain.mqar.config import format_lr
from pretrain.atomic import write_json_atomic
from pretrain.mqar.results import iter_results

SUMMARY_SCHEMA = "mqar-summary/1"
METRICS = {"best": "best_accuracy", "final": "final_accuracy"}
MIXER_ORDER = ("rebased", "based", "attention", "conv_attention")
MIXER_LABELS = {"rebased": "ReBased", "based": "Based", "attention": "Attention", "conv_attention": "Conv-Attention"}
TABLE_FILE, SUMMARY_FILE, FIGURE_FILE = "mqar_table.md", "mqar_summary.json", "mqar_accuracy.png"
CUT = ("time_limit", "max_steps")  # a run stopped before its protocol's end: its accuracy is a lower bound


def mixer_sort_key(mixer: str):
    return (MIXER_ORDER.index(mixer), "") if mixer in MIXER_ORDER else (len(MIXER_ORDER), mixer)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value: no spread can be measured)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def setting_key(result: dict) -> tuple:
    s = result["setting"]
    return s["mixer"], int(s["d_model"]), int(s["seq_len"]), float(s["lr"]), int(s["seed"])


def arm(result: dict) -> str:
    """The training arm a result belongs to: its precision, and the model variant when not the official layout.
    Runs of different arms are different experiments (bf16 vs fp32 is an open question of the protocol)."""
    proto = result.get("protocol") if isinstance(result.get("protocol"), dict) else {}
    train = (result.get("config") or {}).get("train", {}) if isinstance(result.get("config"), dict) else {}
    precision = proto.get("precision") or train.get("precision") or "unrecorded"
    variant = proto.get("model_variant") or "official"
    return precision if variant == "official" else f"{precision}, {variant}"


def load_results(dirs, log=print, field: str = "best_accuracy", arms: list[str] | None = None
                 ) -> list[tuple[Path, dict]]:
    """Complete results under ``dirs`` (of the given ``arms`` when named); a setting found twice keeps its newest
    result (with a warning). Results of several arms are refused: they would be averaged into one cell, or one
    would replace the other as a duplicate."""
    chosen: dict[tuple, tuple[Path, dict]] = {}
    seen_arms: Counter = Counter()  # before duplicates are dropped: a bf16 copy of an fp32 run is another arm
    for path, result in iter_results(*dirs, log=lambda message: log(f"report: {message}")):
        try:
            key = setting_key(result)
        except (KeyError, TypeError, ValueError):
            log(f"report: skipping {path}: no complete 'setting' (mixer, d_model, seq_len, lr, seed)")
            continue
        value = result.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            log(f"report: skipping {path}: {field} is {value!r}, not a number")
            continue
        if arms is not None and arm(result) not in arms:
            continue
        seen_arms[arm(result)] += 1
        if key in chosen:
            other_path, other = chosen[key]
            keep_new = str(result.get("date", "")) > str(other.get("date", ""))
            log(f"report: {key} appears twice: {other_path} and {path}; using "
                f"{path if keep_new else other_path} (newer)")
            if not keep_new:
                continue
        chosen[key] = (path, result)
    if len(seen_arms) > 1:
        listed = ", ".join(f"'{a}' ({n} runs)" for a, n in seen_arms.most_common())
        raise ValueError(f"the results mix training arms: {listed}; report one at a time with --arm "
                         "(e.g. --arm bf16), or from separate folders")
    return [chosen[k] for k in sorted(chosen, key=lambda k: (mixer_sort_key(k[0]), *k[1:]))]


def summarize(results: list[tuple[Path, dict]], metric: str = "best") -> dict:
    """Per (mixer, d_model, seq_len): every lr's accuracy over seeds and the best lr's numbers."""
    field = METRICS[metric]
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for _path, r in results:
        mixer, d_model, seq_len, lr, _seed = setting_key(r)
        groups[(mixer, d_model, seq_len)][lr].append(r)

    rows = []
    for (mixer, d_model, seq_len) in sorted(groups, key=lambda k: (mixer_sort_key(k[0]), k[1], k[2])):
        per_lr = []
        for lr, runs in sorted(groups[(mixer, d_model, seq_len)].items()):
            runs = sorted(runs, key=lambda r: r["setting"]["seed"])
            mean, std = mean_std([float(r[field]) for r in runs])
            times = [r["time"]["total_s"] for r in runs if isinstance(r.get("time"), dict) and "total_s" in r["time"]]
            per_lr.append({"lr": lr, "accuracy_mean": mean, "accuracy_std": std, "n_seeds": len(runs),
                           "seeds": [r["setting"]["seed"] for r in runs],
                           "accuracies": [float(r[field]) for r in runs],
                           "time_per_run_s": sum(times) / len(times) if times else None,
                           "epochs_run": [r.get("epochs_run") for r in runs],
                           "cut_runs": sum(r.get("stopped_by") in CUT for r in runs)})
        # best mean accuracy; ties: more seeds, then the smaller lr
        best = max(per_lr, key=lambda e: (e["accuracy_mean"], e["n_seeds"], -e["lr"]))
        kv = {r["setting"].get("num_kv_pairs") for runs in groups[(mixer, d_model, seq_len)].values() for r in runs}
        rows.append({"mixer": mixer, "d_model": d_model, "seq_len": seq_len,
                     "num_kv_pairs": kv.pop() if len(kv) == 1 else sorted(kv, key=str),
                     "accuracy_mean": best["accuracy_mean"], "accuracy_std": best["accuracy_std"],
                     "best_lr": best["lr"], "n_seeds": best["n_seeds"], "seeds": best["seeds"],
                     "time_per_run_s": best["time_per_run_s"], "cut_runs": best["cut_runs"], "lrs": per_lr})
    return {"schema": SUMMARY_SCHEMA, "metric": field, "rows": rows, "provenance": provenance(results)}


# the protocol field that says how a run was executed, not what it computed: the micro-batch follows the sequence
# length (train.micro_batch_tokens), and the loss is the exact batch mean whatever the split
EXECUTION_FIELD = "micro_batch_size"
# the data settings that define the task (num_kv_pairs as configured: null is the paper's rule, which follows seq_len)
DATA_FIELDS = ("vocab_size", "num_kv_pairs", "power_a", "random_non_queries", "seed")


def provenance(results: list[tuple[Path, dict]]) -> dict:
    """Where and when the runs were made (devices, dates, software, commits, protocols), with counts."""
    dates = sorted(str(r["date"]) for _, r in results if r.get("date"))

    def protocol(r: dict) -> dict | None:
        proto = r.get("protocol")
        if not isinstance(proto, dict):
            return proto
        proto = {k: v for k, v in proto.items() if k != EXECUTION_FIELD}
        # the task itself (results record it in their config): runs on other data are another experiment
        data = r["config"].get("data") if isinstance(r.get("config"), dict) else None
        if isinstance(data, dict):
            proto.update({f"data.{k}": data[k] for k in DATA_FIELDS if k in data})
        return proto

    protocols = Counter(json.dumps(protocol(r), sort_keys=True) for _, r in results)
    micro = Counter(str(r["protocol"].get(EXECUTION_FIELD)) for _, r in results
                    if isinstance(r.get("protocol"), dict))
    return {
        "n_runs": len(results),
        "devices": dict(Counter(str(r.get("device", "unknown")) for _, r in results).most_common()),
        "hosts": dict(Counter(str(r.get("hostname", "unknown")) for _, r in results).most_common()),
        "dates": {"first": dates[0], "last": dates[-1]} if dates else None,
        "torch": dict(Counter(str(r.get("torch", "unknown")) for _, r in results).most_common()),
        "git_commits": dict(Counter(str(r.get("git_commit")) for _, r in results).most_common()),
        "protocols": [{"protocol": json.loads(p), "n_runs": n} for p, n in protocols.most_common()],
        "micro_batch_sizes": dict(micro.most_common()),
        "sources": sorted({str(p.parent) for p, _ in results}),
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_accuracy(mean: float, std: float | None, cut: bool = False) -> str:
    text = f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
    return f"≥ {text}" if cut else text


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} ({v})" for k, v in counter.items())


def markdown_report(summary: dict) -> str:
    rows, prov = summary["rows"], summary["provenance"]
    lines = [f"### MQAR accuracy ({summary['metric'].replace('_', ' ')}, best lr per point, mean ± std over seeds)",
             "",
             "| mixer | d_model | seq_len | kv pairs | accuracy | best lr | seeds | time / run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['mixer']} | {r['d_model']} | {r['seq_len']} | {r['num_kv_pairs']} | "
                     f"{format_accuracy(r['accuracy_mean'], r['accuracy_std'], r.get('cut_runs', 0) > 0)} | "
                     f"{format_lr(r['best_lr'])} | "
                     f"{r['n_seeds']} | {format_duration(r['time_per_run_s'])} |")

    # the paper's grid: one column per sequence length
    seq_lens = sorted({r["seq_len"] for r in rows})
    cells = {(r["mixer"], r["d_model"], r["seq_len"]): r for r in rows}
    lines += ["", "| mixer | d_model | " + " | ".join(f"L={L}" for L in seq_lens) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in seq_lens) + " |"]
    for mixer, d_model in sorted({(r["mixer"], r["d_model"]) for r in rows},
                                 key=lambda k: (mixer_sort_key(k[0]), k[1])):
        vals = [("≥ " if cells[(mixer, d_model, L)].get("cut_runs", 0) else "")
                + f"{cells[(mixer, d_model, L)]['accuracy_mean']:.3f}" if (mixer, d_model, L) in cells else "–"
                for L in seq_lens]
        lines.append(f"| {mixer} | {d_model} | " + " | ".join(vals) + " |")

    if any(r.get("cut_runs", 0) for r in rows):
        lines += ["", "≥: a run of that point was stopped by a time or step limit before its last epoch, without the "
                  "early stop: the accuracy is a lower bound."]
    dates = prov["dates"]
    lines += ["", f"{prov['n_runs']} runs. Devices: {_counts(prov['devices'])}.",
              f"Dates: {dates['first']} to {dates['last']}." if dates else "Dates: unknown.",
              f"torch: {_counts(prov['torch'])}. Commits: {_counts(prov['git_commits'])}."]
    for p in prov["protocols"]:
        proto = p["protocol"] or {}
        lines.append("Protocol (" + str(p["n_runs"]) + " runs): "
                     + ", ".join(f"{k}={v}" for k, v in proto.items()) + ".")
    if prov.get("micro_batch_sizes"):
        lines.append(f"Micro-batch sizes (sequences; execution only): {_counts(prov['micro_batch_sizes'])}.")
    if len(prov["protocols"]) > 1:
        lines.append("**Warning: the runs follow different protocols; compare points with care.**")
    return "\n".join(lines) + "\n"


def plot_accuracy(summary: dict, path: str | Path) -> Path:
    """One panel per sequence length: accuracy against d_model (log2 axis), one line per mixer, std as error bars."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend needed

    rows = summary["rows"]
    seq_lens = sorted({r["seq_len"] for r in rows})
    d_models = sorted({r["d_model"] for r in rows})
    mixers = sorted({r["mixer"] for r in rows}, key=mixer_sort_key)
    fig = Figure(figsize=(3.2 * len(seq_lens) + 0.6, 3.2), constrained_layout=True)
    axes = fig.subplots(1, len(seq_lens), sharey=True, squeeze=False)[0]
    for ax, L in zip(axes, seq_lens):
        for mixer in mixers:
            pts = sorted((r["d_model"], r["accuracy_mean"], r["accuracy_std"] or 0.0) for r in rows
                         if r["mixer"] == mixer and r["seq_len"] == L)
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=MIXER_LABELS.get(mixer, mixer))
        ax.set_xscale("log", base=2)
        ax.set_xticks(d_models)
        ax.set_xticklabels([str(d) for d in d_models])
        ax.minorticks_off()
        ax.set_xlim(d_models[0] / 1.3, d_models[-1] * 1.3)  # keep the end points off the frame
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Sequence length {L}")
        ax.set_xlabel("Model dimension")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Accuracy")
    axes[-1].legend(loc="lower right", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def write_report(dirs, out_dir, metric: str = "best", log=print, command: str | None = None,
                 arms: list[str] | None = None) -> dict:
    results = load_results(dirs, log=log, field=METRICS[metric], arms=arms)
    if not results:
        raise FileNotFoundError(f"no MQAR results (*.json with schema mqar-result/1) under {', '.join(map(str, dirs))}")
    summary = summarize(results, metric)
    summary["generated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary["command"] = command
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_report(summary)
    (out_dir / TABLE_FILE).write_text(table)
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    plot_accuracy(summary, out_dir / FIGURE_FILE)
    log(table)
    log(f"report: {out_dir / TABLE_FILE}, {out_dir / SUMMARY_FILE}, {out_dir / FIGURE_FILE}")
    return summary


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m pretrain.mqar.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="folders (searched recursively) or result JSON files")
    p.add_argument("--out", required=True, help="where the table, summary and figure go")
    p.add_argument("--metric", choices=sorted(METRICS), default="best",
                   help="best (default, the paper's: best validation accuracy over epochs) or final accuracy")
    p.add_argument("--arm", action="append", dest="arms",
                   help="only results of this training arm: a precision (fp32, bf16, tf32x3, tf32), with ', clean' "
                        "for model.variant=clean (repeatable)")
    args = p.parse_args(argv)
    missing = [d for d in args.results if not Path(d).exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        write_report(args.results, args.out, args.metric, arms=args.arms,
                     command="python -m pretrain.mqar.report " + " ".join(shlex.quote(a) for a in argv))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # several training arms in one table
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
