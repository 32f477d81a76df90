"""The MQAR report on synthetic results: best-lr choice, the table's numbers, provenance, the figure."""

import json
import math

import pytest
from matplotlib.image import imread

from pretrain.mqar.report import (FIGURE_FILE, SUMMARY_FILE, TABLE_FILE, load_results, main, mean_std, summarize,
                                  write_report)
from pretrain.atomic import write_json_atomic
from pretrain.mqar.results import SCHEMA

PROTOCOL = {"num_train": 100000, "num_test": 3000, "max_epochs": 64, "batch_size": 512}


def make_result(folder, mixer, d_model, seq_len, lr, seed, accuracy, *, final=None, total_s=100.0,
                device="NVIDIA H100 80GB HBM3", date="2026-01-02T03:04:05+00:00", protocol=PROTOCOL, config=None):
    name = f"{mixer}_d{d_model}_L{seq_len}_lr{lr:g}_s{seed}"
    data = {"schema": SCHEMA, "name": name,
            "setting": {"mixer": mixer, "d_model": d_model, "seq_len": seq_len, "num_kv_pairs": seq_len // 4,
                        "lr": lr, "seed": seed},
            "best_accuracy": accuracy, "final_accuracy": accuracy if final is None else final, "epochs_run": 3,
            "time": {"total_s": total_s}, "device": device, "date": date, "torch": "2.13.0", "git_commit": "abc123",
            "hostname": "node1", "protocol": protocol}
    if config is not None:
        data["config"] = config
    return write_json_atomic(folder / f"{name}.json", data)


@pytest.fixture
def results(tmp_path):
    """Two mixers, d_model 64/128, seq_len 256/512; rebased d64 L256 has a real lr choice to make."""
    runs, other = tmp_path / "runs", tmp_path / "more"
    # rebased d64 L256: lr 1e-3 mean 0.6; lr 3e-3 mean 0.85 (the best); lr 1e-2 mean 0.1
    for lr, accs, secs in ((1e-3, (0.5, 0.7), (50, 70)), (3e-3, (0.9, 0.8), (100, 140)), (1e-2, (0.1, 0.1), (9, 9))):
        for seed, (acc, s) in enumerate(zip(accs, secs)):
            make_result(runs, "rebased", 64, 256, lr, seed, acc, total_s=s)
    # a tie (mean 0.95 at both lrs, two seeds each): the smaller lr is reported
    for lr in (1e-3, 3e-3):
        make_result(runs, "rebased", 128, 256, lr, 0, 0.94)
        make_result(runs, "rebased", 128, 256, lr, 1, 0.96)
    make_result(runs, "rebased", 64, 512, 1e-3, 0, 0.4, final=0.3)
    make_result(other, "based", 64, 256, 1e-3, 0, 0.2, device="cpu (x86_64, 2 threads)",
                date="2026-01-05T00:00:00+00:00")
    make_result(other, "based", 64, 256, 1e-3, 1, 0.3, date="2025-12-30T00:00:00+00:00")
    make_result(other, "based", 128, 512, 1e-2, 0, 0.7)
    (runs / "sweep_notes.json").write_text(json.dumps({"not": "a result"}))
    (runs / "torn.json").write_text('{"schema": "mqar-result/1", "best_')
    return runs, other


def test_mean_std_is_the_sample_std():
    assert mean_std([0.9, 0.8]) == pytest.approx((0.85, math.sqrt(0.005)))
    assert mean_std([0.5]) == (0.5, None)


def test_best_lr_per_point(results):
    summary = summarize(load_results(results, log=lambda m: None))
    rows = {(r["mixer"], r["d_model"], r["seq_len"]): r for r in summary["rows"]}
    assert list(rows) == [("rebased", 64, 256), ("rebased", 64, 512), ("rebased", 128, 256),
                          ("based", 64, 256), ("based", 128, 512)]
    r = rows[("rebased", 64, 256)]
    assert r["best_lr"] == 3e-3 and r["n_seeds"] == 2 and r["seeds"] == [0, 1]
    assert r["accuracy_mean"] == pytest.approx(0.85) and r["accuracy_std"] == pytest.approx(0.0707107, abs=1e-6)
    assert r["time_per_run_s"] == pytest.approx(120.0) and r["num_kv_pairs"] == 64
    assert [(e["lr"], round(e["accuracy_mean"], 6)) for e in r["lrs"]] == [(1e-3, 0.6), (3e-3, 0.85), (1e-2, 0.1)]
    assert rows[("rebased", 128, 256)]["best_lr"] == 1e-3 and rows[("rebased", 128, 256)]["accuracy_mean"] == 0.95
    single = rows[("rebased", 64, 512)]
    assert single["n_seeds"] == 1 and single["accuracy_std"] is None and single["accuracy_mean"] == 0.4
    assert rows[("based", 64, 256)]["accuracy_mean"] == pytest.approx(0.25)
    final = {(r["mixer"], r["d_model"], r["seq_len"]): r for r in summarize(load_results(results), "final")["rows"]}
    assert final[("rebased", 64, 512)]["accuracy_mean"] == 0.3


def test_duplicate_settings_keep_the_newest(results, tmp_path):
    runs, _ = results
    rerun = tmp_path / "rerun"
    make_result(rerun, "rebased", 64, 256, 3e-3, 0, 1.0, date="2026-02-01T00:00:00+00:00")  # newer: replaces 0.9
    make_result(rerun, "rebased", 64, 256, 3e-3, 1, 0.0, date="2025-01-01T00:00:00+00:00")  # older: ignored
    messages = []
    rows = summarize(load_results([runs, rerun], log=messages.append))["rows"]
    assert sum("appears twice" in m for m in messages) == 2
    r = next(r for r in rows if (r["mixer"], r["d_model"], r["seq_len"]) == ("rebased", 64, 256))
    assert r["best_lr"] == 3e-3 and r["accuracy_mean"] == pytest.approx(0.9)


def test_report_files(results, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([*map(str, results), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / TABLE_FILE).read_text()
    assert table in printed
    assert "| rebased | 64 | 256 | 64 | 0.8500 ± 0.0707 | 0.003 | 2 | 2.0 min |" in table
    assert "| rebased | 128 | 256 | 64 | 0.9500 ± 0.0141 | 0.001 | 2 | 100.0 s |" in table
    assert "| rebased | 64 | 512 | 128 | 0.4000 | 0.001 | 1 | 100.0 s |" in table
    assert "| based | 128 | 512 | 128 | 0.7000 | 0.01 | 1 | 100.0 s |" in table
    # the paper-style grid: rows mixer x d_model, one column per sequence length
    assert "| mixer | d_model | L=256 | L=512 |" in table
    assert "| rebased | 64 | 0.850 | 0.400 |" in table and "| based | 128 | – | 0.700 |" in table
    # provenance: devices with counts, the date range, 14 runs (torn and foreign JSON ignored)
    assert "14 runs. Devices: NVIDIA H100 80GB HBM3 (13), cpu (x86_64, 2 threads) (1)." in table
    assert "Dates: 2025-12-30T00:00:00+00:00 to 2026-01-05T00:00:00+00:00." in table
    assert "Warning" not in table

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["schema"] == "mqar-summary/1" and summary["metric"] == "best_accuracy"
    assert len(summary["rows"]) == 5 and summary["provenance"]["n_runs"] == 14
    assert summary["provenance"]["devices"] == {"NVIDIA H100 80GB HBM3": 13, "cpu (x86_64, 2 threads)": 1}
    assert summary["rows"][0]["accuracy_mean"] == pytest.approx(0.85)

    png = out / FIGURE_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    # two panels (seq_len 256 and 512) of 3.2 in plus 0.6 in at 150 dpi; not a blank canvas
    assert image.shape[1] == round((3.2 * 2 + 0.6) * 150) and image.shape[0] == round(3.2 * 150)
    assert image[..., :3].std() > 0.05


def test_mixed_protocols_are_flagged(tmp_path):
    make_result(tmp_path, "rebased", 64, 256, 1e-3, 0, 0.5)
    make_result(tmp_path, "rebased", 64, 256, 1e-3, 1, 0.5, protocol={**PROTOCOL, "max_epochs": 4})
    summary = write_report([tmp_path], tmp_path / "out", log=lambda m: None)
    assert len(summary["provenance"]["protocols"]) == 2
    assert "Warning: the runs follow different protocols" in (tmp_path / "out" / TABLE_FILE).read_text()


def test_runs_on_other_data_are_flagged(tmp_path):
    """The task's data settings (in each result's config) belong to its protocol: a run on another vocabulary or
    query-spacing exponent is another experiment, not a second seed of the same point."""
    data = {"seq_len": 256, "num_kv_pairs": None, "vocab_size": 8192, "power_a": 0.01, "random_non_queries": False,
            "seed": 42, "num_train": 100000, "num_test": 3000, "cache_dir": ".cache/mqar"}
    make_result(tmp_path, "rebased", 64, 256, 1e-3, 0, 0.5, config={"data": data})
    make_result(tmp_path, "rebased", 64, 256, 1e-3, 1, 0.5, config={"data": data})
    summary = write_report([tmp_path], tmp_path / "same", log=lambda m: None)
    assert len(summary["provenance"]["protocols"]) == 1
    assert summary["provenance"]["protocols"][0]["protocol"]["data.power_a"] == 0.01
    make_result(tmp_path, "rebased", 64, 256, 1e-3, 2, 0.9, config={"data": {**data, "power_a": 0.5}})
    summary = write_report([tmp_path], tmp_path / "out", log=lambda m: None)
    assert len(summary["provenance"]["protocols"]) == 2
    assert "Warning: the runs follow different protocols" in (tmp_path / "out" / TABLE_FILE).read_text()


def test_no_results_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert "no MQAR results" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / TABLE_FILE).exists()


def test_a_point_with_a_cut_run_is_a_lower_bound(tmp_path):
    """A run stopped by a time or step limit (not the early stop, not max_epochs) prints as '≥ accuracy'."""
    from pretrain.mqar.report import markdown_report

    runs = tmp_path / "runs"
    for stopped_by, d_model in (("time_limit", 64), ("max_epochs", 128), ("early_stop", 256)):
        path = make_result(runs, "rebased", d_model, 512, 1e-3, 0, 0.5)
        data = json.loads(path.read_text())
        write_json_atomic(path, {**data, "stopped_by": stopped_by})
    summary = summarize(load_results([runs], log=lambda m: None))
    assert [r["cut_runs"] for r in summary["rows"]] == [1, 0, 0]
    table = markdown_report(summary)
    assert "| rebased | 64 | 512 | 128 | ≥ 0.5000 |" in table and "| rebased | 128 | 512 | 128 | 0.5000 |" in table
    assert "| rebased | 64 | ≥ 0.500 |" in table and "lower bound" in table


def test_training_arms_are_never_averaged_or_taken_for_duplicates(tmp_path, capsys):
    """fp32 and bf16 (or model.variant=clean) runs of one setting: one replaced the other as a "duplicate" and
    other seeds were averaged into one cell. Mixed arms are refused; --arm reports one."""
    make_result(tmp_path / "fp32", "rebased", 64, 256, 1e-3, 0, 0.9, protocol={**PROTOCOL, "precision": "fp32"})
    make_result(tmp_path / "fp32", "rebased", 64, 256, 1e-3, 1, 0.8, protocol={**PROTOCOL, "precision": "fp32"})
    make_result(tmp_path / "bf16", "rebased", 64, 256, 1e-3, 0, 0.1, date="2026-02-01T00:00:00+00:00",
                protocol={**PROTOCOL, "precision": "bf16"})
    make_result(tmp_path / "clean", "rebased", 64, 256, 1e-3, 2, 0.2,
                protocol={**PROTOCOL, "precision": "fp32", "model_variant": "clean"})
    with pytest.raises(ValueError, match="mix training arms: 'fp32' \\(2 runs\\)"):
        load_results([tmp_path], log=lambda m: None)
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "--arm" in capsys.readouterr().err
    fp32 = load_results([tmp_path], log=lambda m: None, arms=["fp32"])
    assert sorted(r["best_accuracy"] for _, r in fp32) == [0.8, 0.9]
    assert [r["best_accuracy"] for _, r in load_results([tmp_path], arms=["fp32, clean"])] == [0.2]
    assert main([str(tmp_path), "--out", str(tmp_path / "out"), "--arm", "bf16"]) == 0


def test_a_result_without_a_number_for_the_metric_is_skipped(tmp_path):
    make_result(tmp_path, "rebased", 64, 256, 1e-3, 0, 0.5)
    bad = make_result(tmp_path, "rebased", 64, 256, 1e-3, 1, 0.5)
    data = json.loads(bad.read_text())
    data.update(best_accuracy=None, final_accuracy=float("nan"))
    bad.write_text(json.dumps(data))
    messages = []
    assert len(load_results([tmp_path], log=messages.append)) == 1
    assert any("best_accuracy is None" in m for m in messages)
    assert len(load_results([tmp_path], log=lambda m: None, field="final_accuracy")) == 1


def test_a_damaged_result_file_is_named_where_it_breaks(results):
    """A torn or edited result is not silently dropped from the table: the report names the file and the place
    the JSON breaks. Another kind of JSON beside the results (notes, summaries) is no problem."""
    runs, _ = results
    messages = []
    load_results([runs], log=messages.append)
    torn = [m for m in messages if "torn.json" in m]
    assert len(torn) == 1 and f"{runs / 'torn.json'}: not valid JSON (" in torn[0] and "line 1 column" in torn[0]
    assert not any("sweep_notes.json" in m for m in messages)


def test_micro_batch_sizes_are_execution_not_protocol(tmp_path):
    """The micro-batch follows the sequence length (seq 2048 takes 256 sequences, shorter ones 512) and leaves the
    batch-mean loss the same: runs that differ only there follow one protocol, and the sizes are listed apart."""
    make_result(tmp_path, "rebased", 64, 512, 1e-3, 0, 0.5, protocol={**PROTOCOL, "micro_batch_size": 512})
    make_result(tmp_path, "rebased", 64, 2048, 1e-3, 0, 0.5, protocol={**PROTOCOL, "micro_batch_size": 256})
    summary = write_report([tmp_path], tmp_path / "out", log=lambda m: None)
    assert len(summary["provenance"]["protocols"]) == 1
    assert summary["provenance"]["micro_batch_sizes"] == {"512": 1, "256": 1}
    table = (tmp_path / "out" / TABLE_FILE).read_text()
    assert "Warning" not in table and "Micro-batch sizes (sequences; execution only): 512 (1), 256 (1)." in table
