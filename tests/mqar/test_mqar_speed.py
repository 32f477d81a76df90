"""benchmarks/mqar_speed.py on the CPU smoke config: one real timed run per variant, and the table written after
every row, so a run the machine's time limit cuts keeps what it measured."""

import json

import pytest

from benchmarks import mqar_speed

TINY = "configs/mqar/tiny_cpu.yaml"


def test_speed_table_is_written_after_every_row(tmp_path, monkeypatch):
    real_run_one = mqar_speed.run_one
    calls = []

    def cut_after_first(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the lease ends during the second variant
            raise KeyboardInterrupt
        return real_run_one(*args, **kwargs)

    monkeypatch.setattr(mqar_speed, "run_one", cut_after_first)
    out = tmp_path / "speed"
    with pytest.raises(KeyboardInterrupt):
        mqar_speed.main(["--out", str(out), "--config", TINY, "--settings", "rebased:64:32", "--epochs", "2",
                         "--variant", "short=train.max_steps=3,train.num_threads=1",
                         "--variant", "never=train.max_steps=3"])
    table = json.loads((out / "mqar_speed.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["short"]
    row = table["rows"][0]
    assert row["exit_codes"] == [0] and row["steady_epoch_s"] > 0 and row["precision"] in ("fp32", "tf32", "bf16")
    assert row["overrides"] == ["train.max_steps=3", "train.num_threads=1"]
    assert "-m benchmarks.mqar_speed --out" in table["meta"]["command"]
