"""The MQAR sweep: the grid, skipping finished settings, stale and failed runs, GPU pinning, the Slurm array.

One test starts the real ``python -m pretrain.mqar`` (two one-step runs); the others replace the child command
with a stand-in script that writes a result at once (``fake_runs``), so they test the bookkeeping in seconds.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pretrain.mqar import estimate as mqar_estimate
from pretrain.mqar import sweep as mqar_sweep
from pretrain.atomic import write_json_atomic
from pretrain.mqar.results import SCHEMA, read_result
from pretrain.mqar.sweep import (Sweep, compress_indices, enumerate_settings, log_path, main, result_path,
                                 split_overrides, worker_slots)

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/mqar/tiny_cpu.yaml")
GRID = ["--config", TINY, "--mixers", "rebased", "--d-models", "64", "--seq-lens", "32", "--lrs", "0.01",
        "--seeds", "0", "1", "2"]
SETTING_LINE = re.compile(r"^\s*\d+\s+rebased_\S+\s+(\w+)")
NAMES = ["rebased_d64_L32_lr0.01_s0", "rebased_d64_L32_lr0.01_s1", "rebased_d64_L32_lr0.01_s2"]

FAKE_RUN = textwrap.dedent("""
    import json, os, sys, time
    out, config = sys.argv[1], json.load(open(sys.argv[2]))
    print("fake run", out)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    rc = int(os.environ.get("FAKE_RC", "0"))
    if rc == 0:
        json.dump({"schema": "mqar-result/1", "best_accuracy": 0.5, "config": config,
                   "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}, open(out, "w"))
    sys.exit(rc)
""")


def sweep_for(out, overrides=("train.max_steps=1",)) -> Sweep:
    settings = enumerate_settings(["rebased"], [64], [32], [0.01], [0, 1, 2])
    return Sweep(TINY, out, settings, list(overrides))


def write_done(sweep: Sweep, index: int, **changes) -> Path:
    """A finished result for setting ``index`` as the sweep expects it (``changes``: dotted config keys altered)."""
    setting = sweep.settings[index]
    config = json.loads(json.dumps(sweep.expected_config(setting)))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[last] = value
    path = result_path(sweep.out_dir, setting)
    write_json_atomic(path, {"schema": SCHEMA, "name": setting.name, "best_accuracy": 0.25, "config": config})
    return path


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
    """Children run FAKE_RUN instead of training: it writes a result with the expected config (FAKE_RC=n fails)."""
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)

    def command(self, setting):
        config = tmp_path / f"expected_{setting.name}.json"
        config.write_text(json.dumps(self.expected_config(setting)))
        return [sys.executable, str(script), str(result_path(self.out_dir, setting)), str(config)]

    monkeypatch.setattr(Sweep, "command", command)
    return monkeypatch


def dry_run_states(out, capsys, *extra) -> list[str]:
    assert main(["--out", str(out), *GRID, "train.max_steps=1", "--dry-run", *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [m.group(1) for m in map(SETTING_LINE.match, lines) if m]


def test_default_grid_is_the_papers(tmp_path, capsys):
    settings = enumerate_settings(*(mqar_sweep.DEFAULT_MIXERS, mqar_sweep.DEFAULT_D_MODELS,
                                    mqar_sweep.DEFAULT_SEQ_LENS, mqar_sweep.DEFAULT_LRS, mqar_sweep.DEFAULT_SEEDS))
    assert len(settings) == 2 * 4 * 5 * 4 * 1 == 160
    assert [s.index for s in settings] == list(range(160))
    assert settings[0].name == "rebased_d64_L128_lr0.0005_s0" and settings[1].name == "rebased_d64_L128_lr0.001_s0"
    assert settings[4].name == "rebased_d64_L256_lr0.0005_s0" and settings[-1].name == "based_d512_L2048_lr0.01_s0"
    assert len({s.name for s in settings}) == 160
    assert main(["--out", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "160 settings: 0 done, 160 pending, 0 failed, 0 stale" in out
    assert "  17  rebased_d64_L2048_lr0.001_s0 " in out
    assert not (tmp_path / "r").exists(), "a dry run writes nothing"


def test_overrides_may_stand_anywhere():
    parser = mqar_sweep.build_parser()
    flags, overrides = split_overrides(parser, ["--seeds", "0", "1", "train.max_epochs=4", "--slurm-opt",
                                                "partition=gpu", "--out", "a=b", "--", "data.seed=3"])
    assert overrides == ["train.max_epochs=4", "data.seed=3"]
    args = parser.parse_args(flags)
    assert args.seeds == [0, 1] and args.slurm_opt == ["partition=gpu"] and args.out == "a=b"


def test_grid_keys_cannot_be_overridden(tmp_path, capsys):
    assert main(["--out", str(tmp_path), *GRID, "train.seed=5", "--dry-run"]) == 2
    assert "'train.seed' is set by the sweep" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), *GRID, "train.max_epoch=5", "--dry-run"]) == 2
    assert "tiny_cpu.yaml: unknown key 'train.max_epoch'" in capsys.readouterr().err


def test_real_runs_skip_finished_settings(tmp_path, capsys):
    out = tmp_path / "results"
    sweep = sweep_for(out)
    done_path = write_done(sweep, 1)
    done_bytes = done_path.read_bytes()
    torn = result_path(out, sweep.settings[2])
    torn.write_text('{"schema": "mqar-result/1", "best_acc')  # a damaged file: not a result, and said so
    damaged = sweep.status(sweep.settings[2]).damaged
    assert damaged.startswith(f"{torn}: not valid JSON (") and "line 1 column" in damaged, damaged
    assert sweep.status(sweep.settings[0]).damaged is None, "a missing result is no damage"
    assert dry_run_states(out, capsys) == ["pending", "done", "pending"]

    assert main(["--out", str(out), *GRID, "train.max_steps=1", "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert f"warning: {torn}: not valid JSON" in captured.err and "setting #2 counts as not done" in captured.err
    printed = captured.out
    assert "3 settings, 1 done, 2 to run on 2 CPU worker(s)" in printed
    assert "2 finished, 0 failed, 1 were already done" in printed
    assert done_path.read_bytes() == done_bytes, "a finished setting is not run again"
    assert not log_path(out, sweep.settings[1]).exists()
    for i in (0, 2):
        result = read_result(result_path(out, sweep.settings[i]))
        assert result is not None and result["name"] == NAMES[i] and result["steps"] == 1
        assert result["stopped_by"] == "max_steps" and result["config"]["train"]["seed"] == i
        log = log_path(out, sweep.settings[i]).read_text()
        assert "-m pretrain.mqar --config" in log and "best valid accuracy" in log
        assert log.rstrip().splitlines()[-1].startswith("=== exit code 0")
    assert dry_run_states(out, capsys) == ["done", "done", "done"]

    mtimes = [result_path(out, s).stat().st_mtime_ns for s in sweep.settings]
    assert main(["--out", str(out), *GRID, "train.max_steps=1"]) == 0
    assert "all 3 settings are done" in capsys.readouterr().out
    assert [result_path(out, s).stat().st_mtime_ns for s in sweep.settings] == mtimes


def test_stale_results_are_refused_unless_asked(tmp_path, capsys, fake_runs):
    out = tmp_path / "results"
    sweep = sweep_for(out)
    stale = write_done(sweep, 0, **{"train.max_steps": 7})
    write_done(sweep, 1, **{"log.tqdm": True, "data.cache_dir": "/elsewhere"})  # no effect on the result
    assert dry_run_states(out, capsys) == ["stale", "done", "pending"]
    assert main(["--out", str(out), *GRID, "train.max_steps=1", "--dry-run"]) == 0
    assert "train.max_steps: 7 -> 1" in capsys.readouterr().out

    assert main(["--out", str(out), *GRID, "train.max_steps=1"]) == 2
    assert "--rerun-stale" in capsys.readouterr().err
    assert read_result(stale)["best_accuracy"] == 0.25 and not result_path(out, sweep.settings[2]).exists()

    assert main(["--out", str(out), *GRID, "train.max_steps=1", "--rerun-stale"]) == 0
    assert read_result(stale)["best_accuracy"] == 0.5 and read_result(stale)["config"]["train"]["max_steps"] == 1
    assert dry_run_states(out, capsys) == ["done", "done", "done"]


def test_failed_runs_are_reported_and_retried(tmp_path, capsys, fake_runs):
    out = tmp_path / "results"
    fake_runs.setenv("FAKE_RC", "3")
    assert main(["--out", str(out), *GRID, "train.max_steps=1", "--seeds", "0"]) == 1
    assert "FAILED #0 rebased_d64_L32_lr0.01_s0: exit code 3" in capsys.readouterr().out
    log = (out / f"{NAMES[0]}.log").read_text()
    assert "fake run" in log and log.rstrip().splitlines()[-1].startswith("=== exit code 3")
    assert not (out / f"{NAMES[0]}.json").exists()
    assert dry_run_states(out, capsys)[0] == "failed"

    fake_runs.setenv("FAKE_RC", "0")
    assert main(["--out", str(out), *GRID, "train.max_steps=1", "--seeds", "0"]) == 0
    log = (out / f"{NAMES[0]}.log").read_text()
    assert log.count("=== start") == 2 and log.rstrip().splitlines()[-1].startswith("=== exit code 0")
    assert dry_run_states(out, capsys)[0] == "done"


def test_one_worker_per_gpu_pins_each_run(tmp_path, fake_runs):
    assert worker_slots("0,1", None, 2) == [{"CUDA_VISIBLE_DEVICES": d, "MQAR_RUNS_PER_DEVICE": "2"}
                                            for d in ("0", "0", "1", "1")]
    fake_runs.delenv("OMP_NUM_THREADS", raising=False)
    cores = os.cpu_count()
    # one pending setting on a GPU meant for 2 runs: it runs alone and records so; a GPU named twice counts once
    assert worker_slots("0", None, 2, pending=1) == [{"CUDA_VISIBLE_DEVICES": "0", "MQAR_RUNS_PER_DEVICE": "1"}]
    assert worker_slots("0,0", None, 1) == [{"CUDA_VISIBLE_DEVICES": "0", "MQAR_RUNS_PER_DEVICE": "1"}]
    assert worker_slots("none", 2, 1) == [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, cores // 2))}] * 2
    assert worker_slots("none", None, 1) == [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(cores)}]
    assert worker_slots("", 3, 1)[0]["OMP_NUM_THREADS"] == str(max(1, cores // 3))

    fake_runs.setenv("FAKE_SLEEP", "0.5")  # both workers get work before either finishes
    settings = enumerate_settings(["rebased", "based"], [64], [32], [0.01], [0, 1])
    sweep = Sweep(TINY, tmp_path / "results", settings, ["train.max_steps=1"])
    outcome = mqar_sweep.run_parallel(sweep, settings, worker_slots("0,1", None, 1), log=lambda m: None)
    assert len(outcome["done"]) == 4 and not outcome["failed"]
    devices = [read_result(result_path(sweep.out_dir, s))["visible_devices"] for s in settings]
    assert set(devices) == {"0", "1"}
    for s, d in zip(settings, devices):
        assert f"CUDA_VISIBLE_DEVICES='{d}'" in log_path(sweep.out_dir, s).read_text()


def test_sigterm_stops_the_sweep_and_its_running_settings(tmp_path, fake_runs, capsys):
    """kill/timeout/a scheduler send SIGTERM: the sweep stops its children as on Ctrl-C (they ran on, orphaned,
    holding their settings' locks, and a rerun failed on them) and exits 130 with the settings pending."""
    import threading

    fake_runs.setenv("FAKE_SLEEP", "60")
    out = tmp_path / "results"
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t0 = time.time()
    assert main(["--out", str(out), *GRID, "train.max_steps=1", "--workers", "2"]) == 130
    assert time.time() - t0 < 30 and "sweep: interrupted" in capsys.readouterr().out
    time.sleep(0.5)
    alive = [d for d in Path("/proc").iterdir() if d.name.isdigit() and _cmdline_has(d, str(tmp_path / "fake_run.py"))]
    assert not alive, "a setting's process outlived the sweep"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back
    assert dry_run_states(out, capsys) == ["pending"] * 3


def test_a_setting_another_process_runs_is_left_to_it(tmp_path, fake_runs, capsys):
    """Two sweeps on one folder: each counted the setting the other ran as failed (its child exited 2 on the
    setting's lock) and both exited 1. A setting whose lock is held is 'running', not started again."""
    import fcntl

    out = tmp_path / "results"
    out.mkdir()
    held = result_path(out, sweep_for(out).settings[1])
    with open(str(held) + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running pretrain.mqar holds
        assert dry_run_states(out, capsys) == ["pending", "running", "pending"]
        assert main(["--out", str(out), *GRID, "train.max_steps=1"]) == 0
        assert "2 to run" in capsys.readouterr().out
    assert not held.exists() and dry_run_states(out, capsys) == ["done", "pending", "done"]


def _cmdline_has(proc_dir: Path, text: str) -> bool:
    try:
        return text.encode() in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False


def test_compress_indices():
    assert compress_indices([]) == ""
    assert compress_indices([4]) == "4"
    assert compress_indices([0, 1, 2, 5, 7, 8, 127]) == "0-2,5,7-8,127"
    assert compress_indices([3, 1, 2, 2]) == "1-3"


def test_slurm_array_covers_the_unfinished_settings(tmp_path, capsys, fake_runs):
    out = tmp_path / "results"
    write_done(sweep_for(out), 1)
    args = ["--out", str(out), *GRID, "train.max_steps=1"]
    assert main([*args, "--slurm-array", "--max-concurrent", "2", "--slurm-opt", "partition=gpu",
                 "--slurm-opt", "gpus=", "--slurm-opt", "gres=gpu:1"]) == 0
    script_path = out / "slurm" / "mqar_sweep.sbatch"
    script = script_path.read_text()
    assert script in capsys.readouterr().out
    assert "#SBATCH --array=0,2%2\n" in script and "#SBATCH --partition=gpu\n" in script
    assert "#SBATCH --gres=gpu:1\n" in script and "#SBATCH --gpus" not in script
    assert f"#SBATCH --output={out}/slurm/" in script
    subprocess.run(["bash", "-n", str(script_path)], check=True)

    # the task's command line, as the array runs it: a valid sweep invocation naming setting i
    exec_line = next(line for line in script.splitlines() if line.startswith("exec "))
    words = shlex.split(exec_line)
    task_args = words[words.index("pretrain.mqar.sweep") + 1:]
    assert "train.max_steps=1" in task_args and "--task-index" in task_args
    task_args = [("2" if w == "$SLURM_ARRAY_TASK_ID" else w) for w in task_args]
    assert main(task_args) == 0
    assert f"running setting #2 {NAMES[2]}" in capsys.readouterr().out
    assert read_result(result_path(out, enumerate_settings(["rebased"], [64], [32], [0.01], [0, 1, 2])[2]))
    assert not result_path(out, sweep_for(out).settings[0]).exists(), "--task-index runs that setting only"

    assert main([*args, "--task-index", "1"]) == 0
    assert "is done" in capsys.readouterr().out
    assert main([*args, "--task-index", "3"]) == 2
    assert "outside the grid's 0..2" in capsys.readouterr().err

    # once everything is done there is nothing to submit
    assert main([*args, "--task-index", "0"]) == 0
    capsys.readouterr()
    assert main([*args, "--slurm-array"]) == 0
    assert "all 3 settings are done" in capsys.readouterr().out


def test_slurm_array_into_a_folder_with_a_space(tmp_path, capsys):
    """An unquoted --output value with a space was an invalid directive to sbatch."""
    out = tmp_path / "mq sp"
    assert main(["--out", str(out), *GRID, "--slurm-array"]) == 0
    script = (out / "slurm" / "mqar_sweep.sbatch").read_text()
    assert f'#SBATCH --output="{out}/slurm/%x-%A_%a.out"\n' in script
    assert f"submit with: sbatch '{out}/slurm/mqar_sweep.sbatch'" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--max-concurrent", "--runs-per-gpu"])
def test_counts_below_one_are_refused(tmp_path, capsys, flag):
    assert main(["--out", str(tmp_path), *GRID, flag, "0", "--dry-run"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_a_grid_valid_for_every_setting_is_not_checked_against_the_base_config(tmp_path, capsys):
    """The dry run reloaded the base config without the grid's keys (seq_len 32 there): 20 pairs fit the grid's
    seq_len 128 but not 32, and the sweep ended in a traceback."""
    args = ["--out", str(tmp_path), "--config", TINY, "--mixers", "rebased", "--d-models", "64", "--seq-lens", "128",
            "--lrs", "0.01", "--seeds", "0", "data.num_kv_pairs=20", "data.vocab_size=256", "--dry-run"]
    assert main(args) == 0, capsys.readouterr().err


def test_a_result_without_its_run_config_is_not_done(tmp_path, capsys):
    """Nothing says what such a file ran (a foreign or cut-down result): it runs again, with a warning."""
    out = tmp_path / "results"
    sweep = sweep_for(out)
    path = result_path(out, sweep.settings[0])
    out.mkdir()
    write_json_atomic(path, {"schema": SCHEMA, "best_accuracy": 0.5})
    status = sweep.status(sweep.settings[0])
    assert status.state == "pending" and status.damaged == f"{path}: no run config recorded"
    write_json_atomic(path, {"schema": SCHEMA, "best_accuracy": float("nan"), "config": {}})
    assert sweep.status(sweep.settings[0]).state == "pending"


def test_dry_run_estimates_gpu_time_from_measured_epochs(tmp_path, capsys):
    """Measured GPU seconds per epoch (a speed table, finished results shared by 2 runs per GPU) give each pending
    setting's time: measured at the sweep's precision, else scaled by length from the same width (this mixer, else
    the other). Rows without a precision field are bf16 (the protocol's default when they were written)."""
    table = tmp_path / "mqar_speed.json"
    table.write_text(json.dumps({"rows": [
        {"tree": "now", "setting": "rebased:64:2048", "overrides": [], "gpu_s_per_epoch": 8.0},
        {"tree": "before", "setting": "rebased:64:1024", "overrides": [], "gpu_s_per_epoch": 99.0},  # other code
        {"tree": "now", "setting": "rebased:64:1024", "overrides": ["train.compile=false"], "gpu_s_per_epoch": 50},
        {"tree": "now", "setting": "rebased:64:2048", "overrides": [], "gpu_s_per_epoch": 24.0, "precision": "fp32"},
        # mqar_speed's precision variants: the override is the row's precision, so the row counts for it
        {"tree": "now", "setting": "based:64:4096", "overrides": ["train.precision=fp32"], "gpu_s_per_epoch": 40.0,
         "precision": "fp32"},
    ]}))
    out = tmp_path / "r"
    out.mkdir()
    write_json_atomic(out / "based_d64_L512_lr0.001_s0.json", {
        "schema": SCHEMA, "best_accuracy": 0.5, "setting": {"mixer": "based", "d_model": 64, "seq_len": 512},
        "time": {"steady_epoch_s": 6.0, "runs_sharing_device": 2}, "config": {"train": {"precision": "bf16"}},
        "protocol": {"num_train": 100_000}})
    # skipped: a run on 1000 examples (its epochs are 100x shorter), and results of another shape
    write_json_atomic(out / "based_d64_L256_lr0.001_s0.json", {
        "schema": SCHEMA, "best_accuracy": 0.5, "setting": {"mixer": "based", "d_model": 64, "seq_len": 256},
        "time": {"steady_epoch_s": 0.01}, "config": {"train": {"precision": "bf16"}}, "protocol": {"num_train": 1000}})
    for name, broken in (("a", {"time": None}), ("b", {"setting": {"mixer": "based"}}), ("c", {"config": "x"})):
        write_json_atomic(out / f"{name}.json", {
            "schema": SCHEMA, "best_accuracy": 0.5, "setting": {"mixer": "based", "d_model": 64, "seq_len": 128},
            "time": {"steady_epoch_s": 0.01}, "config": {"train": {"precision": "bf16"}},
            "protocol": {"num_train": 100_000}, **broken})
    measured = mqar_estimate.measured_epoch_times([table, out], "bf16")
    assert measured == {("rebased", 64, 2048): 8.0, ("based", 64, 512): 3.0}
    # a sweep on fewer examples: only results of that workload (the speed tables measured the default)
    assert mqar_estimate.measured_epoch_times([table, out], "bf16", num_train=1000) == {("based", 64, 256): 0.01}
    assert mqar_estimate.measured_epoch_times([table, out], "fp32") == {("rebased", 64, 2048): 24.0,
                                                                         ("based", 64, 4096): 40.0}
    est = mqar_estimate.estimate_epoch_s
    assert est(measured, "rebased", 64, 2048) == 8.0
    assert est(measured, "rebased", 64, 1024) == 4.0  # half the length of the nearest same-mixer measurement
    assert est(measured, "based", 64, 1024) == 6.0  # twice the based measurement at 512
    assert est(measured, "rebased", 128, 2048) is None
    assert main(["--out", str(out), "--mixers", "rebased", "--d-models", "64", "128", "--seq-lens", "1024", "2048",
                 "--lrs", "0.001", "--dry-run", "--epoch-times", str(table), "train.max_epochs=10",
                 "train.precision=bf16"]) == 0
    printed = capsys.readouterr().out
    hours = 10 * (4.0 + 8.0) / 3600
    assert f"estimate: {hours:.2f} GPU-hours for the 2 pending settings" in printed
    assert "no epoch time for 2 (d_model [128])" in printed
    # the breakdown by width and length: d_model 64's two lengths, nothing for the unmeasured width
    lines = printed.splitlines()
    header = lines.index("GPU-hours by d_model (rows) and seq_len (columns), all mixers, lrs and seeds:")
    assert lines[header + 1].split() == ["1024", "2048"]
    assert lines[header + 2].split() == ["64", f"{10 * 4.0 / 3600:.2f}", f"{10 * 8.0 / 3600:.2f}"]
    assert not any(line.split()[:1] == ["128"] for line in lines[header + 1:])
    assert main(["--out", str(out), "--mixers", "rebased", "--d-models", "64", "--seq-lens", "1024", "2048",
                 "--lrs", "0.001", "--dry-run", "--epoch-times", str(table), "train.max_epochs=10",
                 "train.precision=fp32"]) == 0
    assert f"estimate: {10 * (12.0 + 24.0) / 3600:.2f} GPU-hours for the 2 pending settings" in capsys.readouterr().out


def test_epoch_flops_counts_the_head_at_query_positions_and_the_test_split_forward_only():
    """An epoch's matmul FLOPs: the LM head costs 2·d·vocab per query (not per token), and each test sequence costs
    a third of a train sequence (forward only). Varying one factor at a time isolates each term."""
    def flops(*overrides):
        cfg = mqar_sweep.load_mqar_config(TINY, ["model.d_model=64", "data.seq_len=32", "data.num_kv_pairs=4",
                                                 *overrides])
        return mqar_estimate.epoch_flops(cfg, cfg.model_config())

    base = flops("data.vocab_size=64", "data.num_train=10", "data.num_test=5")
    sequences = 3 * 10 + 5
    assert flops("data.vocab_size=96", "data.num_train=10", "data.num_test=5") - base == pytest.approx(
        2 * 64 * 32 * 4 * sequences)  # 32 more words at 4 queries per sequence
    per_train = flops("data.vocab_size=64", "data.num_train=11", "data.num_test=5") - base
    per_test = flops("data.vocab_size=64", "data.num_train=10", "data.num_test=6") - base
    assert per_train == pytest.approx(3 * per_test) and per_test > 2 * 64 * 64 * 4
    assert base == pytest.approx(per_test * sequences)


def test_dry_run_prints_the_flop_floor(tmp_path, capsys, monkeypatch):
    """The floor is the pending settings' FLOPs per epoch x epochs at the peak rate of the sweep's precision (IEEE
    fp32 runs on the CUDA cores, about 15x slower than bf16 on the tensor cores)."""
    out = tmp_path / "r"
    monkeypatch.setattr(mqar_sweep, "epoch_flops", lambda cfg, model_cfg: 3.6e15 * cfg.data.seq_len)
    for precision, peak in (("bf16", 989.0), ("fp32", 67.0)):
        assert main([*GRID[:2], "--out", str(out), "--mixers", "rebased", "--d-models", "64", "--seq-lens", "16",
                     "32", "--lrs", "0.01", "--dry-run", "--epoch-times", "train.max_epochs=5",
                     f"train.precision={precision}"]) == 0
        hours = 5 * 3.6e15 * (16 + 32) / (peak * 1e12) / 3600
        assert f"floor: {hours:.2f} GPU-hours for the 2 pending settings" in capsys.readouterr().out


def test_cheapest_first_starts_the_shortest_estimated_epochs(tmp_path, fake_runs, capsys):
    """--order cheapest-first: estimated seconds per epoch ascending (unmeasured widths last, by d_model x seq_len)."""
    measured = {("rebased", 64, 2048): 8.0, ("based", 64, 512): 1.0}
    settings = enumerate_settings(["rebased", "based"], [64, 128], [512, 2048], [0.001], [0])
    ordered = [s.name for s in mqar_estimate.order_cheapest_first(settings, measured)]
    assert ordered == ["based_d64_L512_lr0.001_s0", "rebased_d64_L512_lr0.001_s0",  # 1.0, then 8.0 / 4 = 2.0
                       "based_d64_L2048_lr0.001_s0", "rebased_d64_L2048_lr0.001_s0",  # 1.0 * 4, then 8.0
                       "rebased_d128_L512_lr0.001_s0", "based_d128_L512_lr0.001_s0",
                       "rebased_d128_L2048_lr0.001_s0", "based_d128_L2048_lr0.001_s0"]
    table = tmp_path / "mqar_speed.json"
    table.write_text(json.dumps({"rows": [{"tree": "now", "setting": "rebased:64:64", "overrides": [],
                                           "gpu_s_per_epoch": 1.0, "precision": "fp32"}]}))
    out = tmp_path / "r"
    assert main(["--out", str(out), "--config", TINY, "--mixers", "rebased", "--d-models", "64", "--seq-lens", "64",
                 "32", "--lrs", "0.01", "--gpus", "none", "--order", "cheapest-first", "--epoch-times", str(table),
                 "train.max_steps=1"]) == 0
    starts = [line.split()[3] for line in capsys.readouterr().out.splitlines() if "] start #" in line]
    assert starts == ["rebased_d64_L32_lr0.01_s0", "rebased_d64_L64_lr0.01_s0"]  # 0.5 (scaled), then 1.0


SESSION = Path(__file__).resolve().parents[2] / "benchmarks" / "mqar_gpu_session.sh"


def test_gpu_session_script_records_the_machine(tmp_path):
    """`machine FILE` writes what a results README quotes, and a missing GPU tool does not fail the session."""
    import torch

    record = tmp_path / "gpu.txt"
    done = subprocess.run(["bash", str(SESSION), "machine", str(record)], env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = record.read_text().splitlines()
    assert f"torch {torch.__version__} triton " in "\n".join(lines) and lines[-1].endswith(time.strftime("%Y")), lines


def test_gpu_session_script_runs_a_detached_sweep_and_packs_it(tmp_path):
    """`start` runs the sweep detached; `wait` packs results and logs (never checkpoints) into one archive and, with
    --checkpoints, copies each unfinished run's checkpoint beside it so the next machine can resume the run."""
    import tarfile

    env = dict(os.environ, PYTHON=sys.executable)
    out, packs = tmp_path / "out", tmp_path / "packs"
    packs.mkdir()
    start = subprocess.run(["bash", str(SESSION), "start", str(out), "--config", TINY, "--mixers", "rebased",
                            "--d-models", "64", "--seq-lens", "32", "--lrs", "0.01", "--gpus", "none",
                            "train.max_steps=2"], env=env, capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stderr
    (out / "rebased_d64_L16_lr0.01_s0.json.ckpt").write_bytes(b"state of a run the lease cut")  # as a cut run leaves
    wait = subprocess.run(["bash", str(SESSION), "wait", str(out), "300", str(packs / "a.tgz"), "--checkpoints"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert wait.returncode == 0, wait.stderr
    assert "sweep finished" in wait.stdout
    with tarfile.open(packs / "a.tgz") as tar:
        names = sorted(Path(n).name for n in tar.getnames())
    assert "rebased_d64_L32_lr0.01_s0.json" in names and "rebased_d64_L32_lr0.01_s0.log" in names
    assert "sweep.log" in names and not any(n.endswith(".ckpt") for n in names)
    assert (packs / "rebased_d64_L16_lr0.01_s0.json.ckpt").read_bytes() == b"state of a run the lease cut"
    assert read_result(out / "rebased_d64_L32_lr0.01_s0.json")["stopped_by"] == "max_steps"

    # a checkpoint over the part size travels in parts, and `start` joins them (a torn set is left alone)
    big = bytes(range(256)) * 40 + b"tail"
    (out / "rebased_d64_L16_lr0.01_s0.json.ckpt").write_bytes(big)
    split_env = dict(env, MQAR_CKPT_PART_BYTES="4000")
    wait = subprocess.run(["bash", str(SESSION), "wait", str(out), "1", str(packs / "c.tgz"), "--checkpoints"],
                          env=split_env, capture_output=True, text=True, timeout=60)
    assert wait.returncode == 0, wait.stderr
    parts = sorted(p.name for p in packs.glob("rebased_d64_L16_lr0.01_s0.json.ckpt.part*"))
    assert parts == [f"rebased_d64_L16_lr0.01_s0.json.ckpt.part{i}of3" for i in (1, 2, 3)]
    back = tmp_path / "back"
    back.mkdir()
    for name in parts:
        (back / name).write_bytes((packs / name).read_bytes())
    torn = back / "other.json.ckpt.part1of2"
    torn.write_bytes(b"half")
    rejoin = subprocess.run(["bash", str(SESSION), "start", str(back), "--config", TINY, "--mixers", "rebased",
                             "--d-models", "64", "--seq-lens", "32", "--lrs", "0.01", "--gpus", "none",
                             "train.max_steps=1"], env=env, capture_output=True, text=True, timeout=60)
    assert rejoin.returncode == 0, rejoin.stderr
    assert (back / "rebased_d64_L16_lr0.01_s0.json.ckpt").read_bytes() == big
    assert not list(back.glob("rebased_d64_L16_lr0.01_s0.json.ckpt.part*"))
    assert torn.exists() and not (back / "other.json.ckpt").exists() and "incomplete parts" in rejoin.stderr
    subprocess.run(["bash", str(SESSION), "wait", str(back), "300", str(packs / "d.tgz")], env=env,
                   capture_output=True, text=True, timeout=400)

    bad = subprocess.run(["bash", str(SESSION), "wait", str(out), "1", str(packs / "b.tgz"), "--ckpt"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option '--ckpt'" in bad.stderr and not (packs / "b.tgz").exists()


def test_gpu_session_script_packs_every_n_seconds_while_the_sweep_runs(tmp_path):
    """`wait ... --checkpoints --every N` refreshes the archive and the checkpoint copies every N seconds, so a
    command the lease cuts at any moment still returns the latest state; a copy of a run that has finished goes,
    files beside the archive that the command did not copy stay."""
    fake = tmp_path / "fake_python"  # stands in for the sweep: a run that checkpoints twice, then finishes
    fake.write_text("#!/usr/bin/env bash\nout=$4\n"
                    "echo first > \"$out/r.json.ckpt\"; sleep 4\n"
                    "echo second > \"$out/r.json.ckpt.tmp\"; mv \"$out/r.json.ckpt.tmp\" \"$out/r.json.ckpt\"; sleep 4\n"
                    "echo '{}' > \"$out/r.json\"; rm \"$out/r.json.ckpt\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), TMPDIR=str(tmp_path))
    out, packs = tmp_path / "out", tmp_path / "packs"
    packs.mkdir()
    (packs / "kept.json.ckpt").write_text("a checkpoint from another session")
    assert subprocess.run(["bash", str(SESSION), "start", str(out)], env=env, capture_output=True,
                          timeout=60).returncode == 0
    wait = subprocess.Popen(["bash", str(SESSION), "wait", str(out), "60", str(packs / "a.tgz"), "--checkpoints",
                             "--every", "1"], env=env, stdout=subprocess.PIPE, text=True)

    def copy_reads(text, timeout=15.0):
        t0 = time.time()
        while time.time() - t0 < timeout:
            copy = packs / "r.json.ckpt"
            if (copy.read_text() if copy.exists() else None) == text:
                return True
            time.sleep(0.1)
        return False

    assert copy_reads("first\n") and copy_reads("second\n")
    stdout, _ = wait.communicate(timeout=60)
    assert wait.returncode == 0 and "sweep finished" in stdout
    assert not (packs / "r.json.ckpt").exists() and "removed the copy of checkpoint r.json.ckpt" in stdout
    assert (packs / "kept.json.ckpt").read_text() == "a checkpoint from another session"
    import tarfile

    with tarfile.open(packs / "a.tgz") as tar:
        assert "r.json" in {Path(n).name for n in tar.getnames()}
    bad = subprocess.run(["bash", str(SESSION), "wait", str(out), "1", str(packs / "b.tgz"), "--every", "0"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--every" in bad.stderr and not (packs / "b.tgz").exists()


def test_gpu_session_script_runs_then_separated_sweeps_in_the_order_given(tmp_path):
    """`start OUT A --then B` runs sweep A to its end, then sweep B, into one folder: a short lease spends its time
    on the settings named first."""
    env = dict(os.environ, PYTHON=sys.executable)
    out = tmp_path / "out"
    grid = ["--config", TINY, "--d-models", "64", "--seq-lens", "32", "--lrs", "0.01", "--gpus", "none",
            "train.max_steps=1"]
    start = subprocess.run(["bash", str(SESSION), "start", str(out), "--mixers", "based", *grid, "--then",
                            "--mixers", "rebased", *grid], env=env, capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stderr
    wait = subprocess.run(["bash", str(SESSION), "wait", str(out), "300", str(tmp_path / "a.tgz")], env=env,
                          capture_output=True, text=True, timeout=400)
    assert wait.returncode == 0 and "sweep finished" in wait.stdout, wait.stderr
    first, second = (read_result(out / f"{m}_d64_L32_lr0.01_s0.json") for m in ("based", "rebased"))
    assert first["stopped_by"] == second["stopped_by"] == "max_steps"
    log = (out / "sweep.log").read_text()
    assert log.count("== sweep") == 2 and log.index("--mixers based") < log.index("--mixers rebased")
    assert (out / "based_d64_L32_lr0.01_s0.json").stat().st_mtime \
        <= (out / "rebased_d64_L32_lr0.01_s0.json").stat().st_mtime


def test_gpu_session_script_refuses_a_second_sweep_into_a_folder_replaced_under_a_running_one(tmp_path):
    """On a warm machine the device tool replaces a carried-in OUT, pid file included, while the sweep an earlier
    call started still writes into it; `start` must refuse rather than run every setting twice."""
    slow = tmp_path / "slow_python"
    slow.write_text("#!/usr/bin/env bash\nexec sleep 60\n")  # stands in for a sweep still training
    slow.chmod(0o755)
    env = dict(os.environ, PYTHON=str(slow), TMPDIR=str(tmp_path))
    out = tmp_path / "out"
    first = subprocess.run(["bash", str(SESSION), "start", str(out)], env=env, capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    pid = int((out / "sweep.pid").read_text())
    try:
        shutil.rmtree(out)  # what carrying the folder in again does
        out.mkdir()
        second = subprocess.run(["bash", str(SESSION), "start", str(out)], env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 3 and f"still running (pid {pid})" in second.stderr
        assert not (out / "sweep.pid").exists()
    finally:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # the kill lands (the sweep is not our child: it may stay a zombie, which counts as ended)
    third = subprocess.run(["bash", str(SESSION), "start", str(out)], env=env, capture_output=True, text=True,
                           timeout=60)
    assert third.returncode == 0, third.stderr
    os.kill(int((out / "sweep.pid").read_text()), signal.SIGKILL)


def test_gpu_session_go_starts_from_carried_state_on_a_fresh_machine_and_waits_on_a_warm_one(tmp_path):
    """`go` is one command to repeat while a lease lasts: on a fresh machine it brings the carried results, logs and
    checkpoints into OUT and starts the sweep; on the machine that still runs it, it only waits. `collect` turns what
    a call brought back into the next carried folder; `wait` where nothing was started says so."""
    import tarfile

    fake = tmp_path / "fake_python"  # stands in for the sweep: notes its arguments and checkpoint, then finishes r
    fake.write_text("#!/usr/bin/env bash\nout=$4\n"
                    "echo \"$@\" > \"$out/args.log\"\n"
                    "cat \"$out/r.json.ckpt\" > \"$out/resumed.log\"; sleep 3\n"
                    "echo '{}' > \"$out/r.json\"; rm \"$out/r.json.ckpt\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), TMPDIR=str(tmp_path))
    out, packs, carry = tmp_path / "out", tmp_path / "packs", tmp_path / "carry"
    packs.mkdir()
    carry.mkdir()
    (carry / "r.json.ckpt").write_text("epoch 34")
    (carry / "r.log").write_text("epochs 1-34\n")
    (carry / "done.json").write_text("{}")
    (carry / "sweep.log").write_text("the last machine's sweep")

    def go(seconds):
        return subprocess.run(["bash", str(SESSION), "go", str(out), str(seconds), str(packs / "a.tgz"),
                               "--checkpoints", "--from", str(carry), "--", "--mixers", "based"], env=env,
                              capture_output=True, text=True, timeout=120)

    first = go(1)
    assert first.returncode == 0, first.stderr
    assert "sweep started" in first.stdout and "sweep still running" in first.stdout
    assert all(f"brought {name} from {carry}" in first.stdout for name in ("r.json.ckpt", "r.log", "done.json"))
    assert "brought sweep.log" not in first.stdout  # the new sweep writes its own log
    assert (out / "resumed.log").read_text() == "epoch 34"
    assert (packs / "r.json.ckpt").read_text() == "epoch 34"  # cut now, the run still resumes on the next machine
    second = go(60)  # the same machine: the sweep still runs, so nothing starts twice
    assert second.returncode == 0, second.stderr
    assert "waiting for it" in second.stdout and "sweep started" not in second.stdout
    assert "sweep finished" in second.stdout
    assert "-m pretrain.mqar.sweep --out" in (out / "args.log").read_text()
    assert (out / "args.log").read_text().rstrip().endswith("--mixers based")
    with tarfile.open(packs / "a.tgz") as tar:
        assert {"r.json", "r.log", "done.json"} <= {Path(n).name for n in tar.getnames()}

    # here: what came back becomes the next carried folder; a finished run's checkpoint goes, parts replace a whole
    nxt = tmp_path / "next"
    nxt.mkdir()
    (nxt / "r.json.ckpt").write_text("stale")
    (nxt / "big.json.ckpt").write_text("older, whole")
    for i in (1, 2):
        (packs / f"big.json.ckpt.part{i}of2").write_text(f"part {i}")
    collect = subprocess.run(["bash", str(SESSION), "collect", str(packs), str(nxt)], env=env, capture_output=True,
                             text=True, timeout=60)
    assert collect.returncode == 0, collect.stderr
    assert (nxt / "r.json").exists() and (nxt / "done.json").exists() and not (nxt / "sweep.log").exists()
    assert not (nxt / "r.json.ckpt").exists() and "dropped r.json.ckpt: its run finished" in collect.stdout
    assert not (nxt / "big.json.ckpt").exists()
    assert [(nxt / f"big.json.ckpt.part{i}of2").read_text() for i in (1, 2)] == ["part 1", "part 2"]

    nothing = subprocess.run(["bash", str(SESSION), "wait", str(tmp_path / "fresh"), "1", str(packs / "b.tgz")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 4 and "no sweep was started" in nothing.stderr
    itself = subprocess.run(["bash", str(SESSION), "go", str(carry), "1", str(packs / "c.tgz"), "--from", str(carry),
                             "--"], env=env, capture_output=True, text=True, timeout=60)
    assert itself.returncode == 2 and "--from must not be OUT" in itself.stderr


def test_gpu_session_wait_exits_with_the_sweeps_exit_code(tmp_path):
    """A sweep run detached still reports its failure: `wait` exits with the sweep's exit code, and with 1 when the
    sweep ended without one (killed)."""
    failing = tmp_path / "failing_python"
    failing.write_text("#!/usr/bin/env bash\necho 'a setting failed'; exit 3\n")
    failing.chmod(0o755)
    env = dict(os.environ, PYTHON=str(failing), TMPDIR=str(tmp_path))
    out = tmp_path / "out"
    assert subprocess.run(["bash", str(SESSION), "start", str(out)], env=env, timeout=60).returncode == 0
    wait = subprocess.run(["bash", str(SESSION), "wait", str(out), "60", str(tmp_path / "a.tgz")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert wait.returncode == 3 and "sweep finished, exit code 3" in wait.stdout and "a setting failed" in wait.stdout

    slow = tmp_path / "slow_python"
    slow.write_text("#!/usr/bin/env bash\nexec sleep 60\n")
    slow.chmod(0o755)
    env["PYTHON"] = str(slow)
    assert subprocess.run(["bash", str(SESSION), "start", str(out)], env=env, timeout=60).returncode == 0
    assert not (out / "sweep.exit").exists()  # the last sweep's code is not this one's
    os.killpg(int((out / "sweep.pid").read_text()), signal.SIGKILL)  # the sweep and its child, as a lost lease
    wait = subprocess.run(["bash", str(SESSION), "wait", str(out), "60", str(tmp_path / "b.tgz")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert wait.returncode == 1 and "without an exit code" in wait.stdout


def test_learning_rates_keep_every_digit_in_names_and_overrides():
    """A setting's name and its train.lr override read back as the lr asked for: with 6 significant digits,
    0.0012345678 trained as 0.00123457, and 0.001 and 0.0010000001 wrote one result file."""
    from pretrain.mqar.config import format_lr, setting_name
    from pretrain.mqar.sweep import enumerate_settings

    for lr in (5e-4, 1e-3, 3e-3, 1e-2):  # the paper's grid keeps its names
        assert format_lr(lr) == f"{lr:g}"
    for lr in (0.0012345678, 1e-3 + 1e-13, 2.5e-7):
        assert float(format_lr(lr)) == lr
    settings = enumerate_settings(["rebased"], [64], [256], [0.001, 0.0010000001], [0])
    names = {setting_name(s.mixer, s.d_model, s.seq_len, s.lr, s.seed) for s in settings}
    assert len(names) == 2
    for s in settings:
        (lr_override,) = [o for o in s.overrides() if o.startswith("train.lr=")]
        assert float(lr_override.split("=", 1)[1]) == s.lr
