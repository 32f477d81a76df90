"""How long the MQAR grid's pending settings will take: GPU seconds per epoch measured by
``benchmarks/mqar_speed.py`` or read from finished results, scaled to unmeasured lengths; the sweep's ``--dry-run``
estimate, with its floor (the matmul FLOPs at a GPU's peak rate), and its ``--order cheapest-first``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pretrain.mqar.config import DataSection
from pretrain.mqar.results import read_result

if TYPE_CHECKING:  # the sweep imports this module
    from pretrain.models.config import ModelConfig
    from pretrain.mqar.config import MQARConfig
    from pretrain.mqar.sweep import Setting, SettingStatus


DEFAULT_NUM_TRAIN = DataSection.num_train  # what the speed tables were measured with


def measured_epoch_times(sources: list[str | os.PathLike], precision: str,
                         num_train: int = DEFAULT_NUM_TRAIN) -> dict[tuple[str, int, int], float]:
    """GPU seconds per epoch by (mixer, d_model, seq_len) at ``precision`` (``train.precision``: fp32 runs take
    several times as long as bf16) and with ``num_train`` training examples (an epoch's length), from
    ``benchmarks/mqar_speed.py`` tables (``mqar_speed.json``: gpu_s_per_epoch; measured with the default data) and
    from finished results (their steady epoch time divided by the runs that shared the device; a file that is not
    a complete result is skipped). The smallest measurement of a setting wins (the least disturbed one)."""
    table: dict[tuple[str, int, int], float] = {}

    def add(key, seconds):
        if seconds and seconds > 0:
            table[key] = min(seconds, table.get(key, float("inf")))

    for source in sources:
        path = Path(source)
        if path.is_file() and path.suffix == ".json" and path.name != "mqar_summary.json":
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for row in data.get("rows", []) if isinstance(data, dict) else []:
                # rows written before the field existed were all bf16, the protocol's default then; a precision
                # override is matched through that field, any other override times another workload
                other = [o for o in row.get("overrides") or [] if not o.startswith("train.precision=")]
                if (row.get("tree", "now") == "now" and not other and num_train == DEFAULT_NUM_TRAIN
                        and row.get("precision", "bf16") == precision):
                    mixer, d, L = row["setting"].split(":")
                    add((mixer, int(d), int(L)), row.get("gpu_s_per_epoch"))
        elif path.is_dir():
            for result_file in sorted(path.glob("*.json")):
                result = read_result(result_file)
                try:
                    time_, st = result["time"], result["setting"]
                    run_precision = result["config"]["train"]["precision"]
                    if (run_precision == precision and result["protocol"]["num_train"] == num_train
                            and time_.get("steady_epoch_s")):
                        add((st["mixer"], int(st["d_model"]), int(st["seq_len"])),
                            float(time_["steady_epoch_s"]) / max(1, int(time_.get("runs_sharing_device", 1))))
                except (KeyError, TypeError, AttributeError, ValueError):  # none, or not a result of this code
                    continue
    return table


def estimate_epoch_s(table: dict, mixer: str, d_model: int, seq_len: int) -> float | None:
    """A setting's GPU seconds per epoch: measured, else scaled from the same width (this mixer first, then the
    other) at the nearest measured length, in proportion to the length (an epoch's tokens and query rows both grow
    with it)."""
    if (mixer, d_model, seq_len) in table:
        return table[(mixer, d_model, seq_len)]
    for same_mixer in (True, False):
        near = [(abs(math.log2(L / seq_len)), L, t) for (m, d, L), t in table.items()
                if d == d_model and (m == mixer) == same_mixer]
        if near:
            _, L, t = min(near)
            return t * seq_len / L
    return None


# Dense peak of one H100 SXM or H200 in TFLOP/s by train.precision, the yardstick of the FLOP floor below: bf16 and
# TF32 tensor cores; tf32x3 at best three TF32 products per product; IEEE fp32 on the CUDA cores.
PEAK_TFLOPS = {"bf16": 989.0, "tf32": 495.0, "tf32x3": 165.0, "fp32": 67.0}


def epoch_flops(cfg: MQARConfig, model_cfg: ModelConfig) -> float:
    """Matmul FLOPs of one epoch of ``cfg``'s run (``model_cfg``: its resolved ``cfg.model_config()``), counted for
    the minimal algorithm (``pretrain.models.flops``): forward and backward (3x forward) over the train split, plus
    the evaluation's forward over the test split. The LM head runs at the query positions only, as the runner
    computes it; norms and other elementwise work are left out. At a GPU's peak rate this is the least time an
    epoch can take."""
    from pretrain.models.flops import flops_per_token  # the model zoo imports the kernels (Triton): only when asked

    spec = cfg.data.spec()
    per_token = flops_per_token(model_cfg, spec.seq_len)
    body = per_token["forward"] - per_token["breakdown"]["lm_head"]
    per_sequence = body * spec.seq_len + 2 * model_cfg.d_model * model_cfg.vocab_size * spec.num_kv_pairs
    return per_sequence * (3 * spec.num_train + spec.num_test)


def order_cheapest_first(settings: list[Setting], table: dict) -> list[Setting]:
    """Settings by estimated seconds per epoch (unmeasured widths by d_model x seq_len), ties in grid order."""
    def cost(s: Setting):
        estimate = estimate_epoch_s(table, s.mixer, s.d_model, s.seq_len)
        return (0, estimate, s.index) if estimate is not None else (1, s.d_model * s.seq_len, s.index)
    return sorted(settings, key=cost)


def print_estimate(statuses: list[SettingStatus], table: dict, max_epochs: int,
                   flops_of: Callable[[Setting], float] | None = None, precision: str = "bf16") -> None:
    """The pending settings' GPU-hours from ``table`` (``max_epochs`` each), by width and length; with
    ``flops_of`` (a setting's FLOPs per epoch), also the floor: the same epochs at ``PEAK_TFLOPS[precision]``."""
    pending = [s.setting for s in statuses if s.state != "done"]
    if not pending:
        return
    # GPU-hours by (d_model, seq_len): the total and where it goes (the long sequences at small widths rarely stop
    # early, so they bound a grid's cost)
    hours: dict[tuple[int, int], float] = {}
    unknown = []
    for s in pending:
        epoch_s = estimate_epoch_s(table, s.mixer, s.d_model, s.seq_len)
        if epoch_s is None:
            unknown.append(s)
        else:
            hours[(s.d_model, s.seq_len)] = hours.get((s.d_model, s.seq_len), 0.0) + epoch_s * max_epochs / 3600
    print(f"estimate: {sum(hours.values()):.2f} GPU-hours for the {len(pending) - len(unknown)} pending settings "
          f"with a measured or scaled epoch time ({max_epochs} epochs each: an upper bound, early stops end runs "
          "sooner)"
          + (f"; no epoch time for {len(unknown)} (d_model {sorted({s.d_model for s in unknown})})" if unknown else ""))
    if hours:
        widths, lengths = sorted({d for d, _ in hours}), sorted({L for _, L in hours})
        print("GPU-hours by d_model (rows) and seq_len (columns), all mixers, lrs and seeds:")
        print(f"{'':>8}" + "".join(f"{L:>8}" for L in lengths))
        for d in widths:
            print(f"{d:>8}" + "".join(f"{hours[(d, L)]:>8.2f}" if (d, L) in hours else f"{'-':>8}" for L in lengths))
    if flops_of is not None:
        peak = PEAK_TFLOPS[precision]
        floor = sum(flops_of(s) for s in pending) * max_epochs / (peak * 1e12) / 3600
        known = sum(hours.values())
        ratio = f"; the estimate above is {known / floor:.1f}x it" if known and not unknown else ""
        print(f"floor: {floor:.2f} GPU-hours for the {len(pending)} pending settings if every matmul FLOP ran at "
              f"{peak:.0f} TFLOP/s (the dense {precision} peak of an H100 or H200; {max_epochs} epochs each, "
              f"LM head at the query positions){ratio}")
