"""benchmarks/quality/report.py: Student's t against tabulated values, the paired comparison, the table, the
curves and the errors on bad input."""

import json
import math
import re

import pytest

from benchmarks.quality import report


@pytest.mark.parametrize("df, t975", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantiles_match_the_tables(df, t975):
    assert report.t_quantile(0.975, df) == pytest.approx(t975, abs=1e-3)
    assert report.t_two_sided_p(t975, df) == pytest.approx(0.05, abs=2e-4)


def test_t_tail_closed_forms():
    for t in (0.3, 1.0, 2.5, 7.0):
        assert report.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9)  # Cauchy
        assert report.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert report.t_two_sided_p(0.0, 5) == pytest.approx(1.0)


def test_paired_difference():
    a, b = {0: 1.00, 1: 1.10, 2: 0.95, 3: 2.0}, {0: 1.05, 1: 1.12, 2: 1.01}  # seed 3 has no partner
    pr = report.paired(a, b)
    diffs = [-0.05, -0.02, -0.06]
    assert pr["seeds"] == [0, 1, 2] and pr["differences"] == pytest.approx(diffs)
    mean, sd = sum(diffs) / 3, math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    assert pr["mean"] == pytest.approx(mean) and pr["std"] == pytest.approx(sd)
    t = mean / (sd / math.sqrt(3))
    assert pr["t"] == pytest.approx(t)
    assert pr["p"] == pytest.approx(1 - t_abs_over(2, abs(t)), rel=1e-9)
    half = 4.302653 * sd / math.sqrt(3)
    assert pr["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-5)
    one = report.paired({0: 1.0}, {0: 1.2})
    assert one["mean"] == pytest.approx(-0.2) and one["p"] is None and one["ci95"] is None


def t_abs_over(df, t):  # P(|T| < t) for df = 2 in closed form
    assert df == 2
    return t / math.sqrt(2 + t * t)


def write_eval(path, name, seq_len, bpb, sets):
    path.write_text(json.dumps({"name": name, "seq_len": seq_len, "bits_per_byte": bpb, "loss": bpb * 2,
                                "by_set": {k: {"bits_per_byte": v} for k, v in sets.items()}}))
    return path


def test_report_end_to_end(tmp_path):
    evals = []
    for seed, (r, b, t) in enumerate([(1.00, 1.05, 0.98), (1.02, 1.06, 0.99), (0.99, 1.04, 1.00)]):
        for model, bpb in (("rebased", r), ("based", b), ("transformer", t)):
            evals.append(write_eval(tmp_path / f"{model}{seed}.json", f"q50m_{model}_s{seed}", 1024, bpb,
                                    {"ManPages": bpb + 0.1, "Linux Kernel Source": bpb - 0.1}))
    evals.append(write_eval(tmp_path / "long.json", "q50m_rebased_s0", 4096, 1.01, {}))
    run = tmp_path / "q50m_rebased_s0"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 10.8 / s ** 0.2}) + "\n"
                                               for s in range(10, 301, 10)))
    out = tmp_path / "report"
    assert report.main(["--evals", *map(str, evals), "--runs", str(run), "--out", str(out)]) == 0
    text = (out / "quality_table.md").read_text()
    assert "## 50m, evaluated at sequence length 1024" in text and "## 50m, evaluated at sequence length 4096" in text
    assert "| rebased | 3 | 1.0033 ± 0.0153 |" in text
    assert "| rebased - based | 3 | -0.0467 |" in text
    summary = json.loads((out / "quality_summary.json").read_text())
    pair = summary["50m"]["1024"]["pairs"]["rebased - based"]
    assert pair["p"] < 0.01 and pair["ci95"][1] < 0  # rebased lower in every seed, by a steady margin
    assert summary["50m"]["1024"]["models"]["based"]["by_set"]["ManPages"]["mean"] == pytest.approx(1.15)
    assert (out / "loss_curves.png").stat().st_size > 10_000


def test_bad_inputs_name_the_file(tmp_path):
    bad = write_eval(tmp_path / "x.json", "rebased-seed0", 1024, 1.0, {})
    with pytest.raises(SystemExit, match=r"x\.json: field 'name' must be q<width>_<model>_s<seed>"):
        report.load_evals([bad])
    a = write_eval(tmp_path / "a.json", "q50m_rebased_s0", 1024, 1.0, {})
    b = write_eval(tmp_path / "b.json", "q50m_rebased_s0", 1024, 1.1, {})
    with pytest.raises(SystemExit, match=r"a\.json and .*b\.json are both the evaluation of width 50m, model rebased, "
                                         r"seed 0 at length 1024"):
        report.load_evals([a, b])
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        report.plot_curves([tmp_path], tmp_path / "c.png")
    # malformed results name the file instead of a traceback
    for name, text, message in (("list.json", "[1, 2]", "a JSON list, not an object"),
                                ("seq.json", None, "seq_len must be a whole number >= 1 (got None)"),
                                ("sets.json", None, "by_set must be a mapping")):
        path = tmp_path / name
        if text is None:
            data = json.loads(write_eval(path, "q50m_rebased_s0", 1024, 1.0, {}).read_text())
            data.update({"seq_len": None} if name == "seq.json" else {"by_set": []})
            text = json.dumps(data)
        path.write_text(text)
        with pytest.raises(SystemExit, match=f"{re.escape(name)}: .*{re.escape(message)}"):
            report.load_evals([path])


def t_two_sided_p_by_integration(t: float, df: int, steps: int = 20000) -> float:
    """P(|T| >= |t|) from Simpson's rule on the t density over [0, |t|] (independent of the report's beta function)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = abs(t) / steps
    total = sum((1 if k in (0, steps) else 4 if k % 2 else 2) * c * (1 + (k * h) ** 2 / df) ** (-(df + 1) / 2)
                for k in range(steps + 1))
    return 1 - 2 * total * h / 3


def test_paired_statistics_match_an_independent_computation():
    a = {0: 1.012, 1: 0.998, 2: 1.031, 3: 1.004, 4: 0.987}
    b = {0: 1.020, 1: 1.015, 2: 1.029, 3: 1.019, 4: 1.001}
    pr = report.paired(a, b)
    diffs = [a[s] - b[s] for s in range(5)]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)  # sample std, ddof = 1
    t = mean / (sd / math.sqrt(5))
    assert pr["std"] == pytest.approx(sd, rel=1e-12) and pr["t"] == pytest.approx(t, rel=1e-12)
    assert pr["p"] == pytest.approx(t_two_sided_p_by_integration(t, 4), abs=1e-9)
    half = 2.776445105 * sd / math.sqrt(5)  # t_{0.975, df=4}
    assert pr["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-8)
    for df in (1, 3, 6):
        for value in (0.4, 2.0, 5.5):
            assert report.t_two_sided_p(value, df) == pytest.approx(t_two_sided_p_by_integration(value, df), abs=1e-9)


@pytest.mark.parametrize("offset", [0.0, 0.05])
def test_equal_differences_have_no_test(offset):
    """Zero variance: no interval and no p (before: t = inf and p = 0, "significant" even for identical scores)."""
    b = {0: 1.0, 1: 1.1, 2: 1.2}
    pr = report.paired({s: v + offset for s, v in b.items()}, b)
    assert pr["mean"] == pytest.approx(offset) and pr["p"] is None and pr["t"] is None and pr["ci95"] is None
    assert "zero variance" in pr["note"]


def _summary_json(tmp_path, evals) -> tuple[str, dict]:
    out = tmp_path / "report"
    assert report.main(["--evals", *map(str, evals), "--out", str(out)]) == 0
    strict = json.loads((out / "quality_summary.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"{c} in the summary JSON"))
    return (out / "quality_table.md").read_text(), strict


def test_table_states_the_sign_and_what_was_left_out(tmp_path):
    evals = []
    for seed in range(3):  # rebased has seeds 0-2, based 0-1, transformer 0 only
        for model, bpb in (("rebased", 1.0 + seed / 100), ("based", 1.05 + seed / 50), ("transformer", 0.98)):
            if (model == "based" and seed == 2) or (model == "transformer" and seed > 0):
                continue
            sets = {"ManPages": bpb + 0.1} if seed else {"ManPages": bpb + 0.1, "GNU Info": bpb - 0.1}
            evals.append(write_eval(tmp_path / f"{model}{seed}.json", f"q50m_{model}_s{seed}", 1024, bpb, sets))
    text, summary = _summary_json(tmp_path, evals)
    assert "a negative difference means a (ReBased) is better" in text
    assert "rebased - based: seed(s) 2 left out" in text
    assert "| rebased - transformer | 1 | +0.0200 | 1 seed: no interval or test (needs 2) |" in text
    assert "| 0.9000 (n=1) |" in text and "(n=k): the subset is in only k of the model's runs" in text
    assert summary["50m"]["1024"]["pairs"]["rebased - based"]["unpaired"] == [2]


def test_identical_models_report_no_infinite_t(tmp_path):
    evals = [write_eval(tmp_path / f"{m}{s}.json", f"q50m_{m}_s{s}", 1024, 1.0 + s / 10, {})
             for m in ("rebased", "based") for s in range(2)]
    text, summary = _summary_json(tmp_path, evals)
    assert summary["50m"]["1024"]["pairs"]["rebased - based"]["p"] is None
    assert "all differences equal: no interval or test (zero variance)" in text and "inf" not in text


@pytest.mark.parametrize("field, value", [("bits_per_byte", float("nan")), ("loss", None), ("by_set", {"X": {}})])
def test_non_finite_or_missing_numbers_name_the_file(tmp_path, field, value):
    path = write_eval(tmp_path / "r.json", "q50m_rebased_s0", 1024, 1.0, {"X": 1.0})
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"r\.json: .*must be a finite number"):
        report.load_evals([path])


def test_curves_of_runs_with_non_finite_losses_and_different_lengths(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    runs = []
    for name, steps in (("q50m_rebased_s0", 300), ("q50m_based_s0", 50)):
        run = tmp_path / name
        run.mkdir()
        # the trainer writes a non-finite loss as the string "nan" (JSON has no NaN); eval lines have no "loss"
        lines = [{"step": s, "loss": "nan" if s == 20 else 5.0 / s} for s in range(1, steps + 1)]
        lines.append({"step": steps, "val_loss": 1.0})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs.append(run)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.plot_curves(runs, tmp_path / "curves.png")
    full, start = figures[0].axes
    assert full.yaxis.units is None  # numbers, not categories
    curves = {line.get_label(): line for line in full.get_lines()}
    assert len(curves["q50m_rebased_s0"].get_xdata()) == 300 and len(curves["q50m_based_s0"].get_xdata()) == 50
    y = curves["q50m_based_s0"].get_ydata()
    assert math.isnan(y[19]) and y[0] == pytest.approx(5.0)
    assert max(max(line.get_xdata()) for line in start.get_lines()) <= 100
