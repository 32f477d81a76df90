"""benchmarks/quality/report.py: Student's t against tabulated values, the paired comparison, the table, the
curves and the errors on bad input."""

import json
import math

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
    with pytest.raises(SystemExit, match="more than one evaluation of"):
        report.load_evals([a, b])
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        report.plot_curves([tmp_path], tmp_path / "c.png")
