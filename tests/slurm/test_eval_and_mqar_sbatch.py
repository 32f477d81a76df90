"""The other Slurm entry points under a running Slurm (the local cluster):

* ``launch/slurm/eval.sbatch`` on the reference run's export gives the perplexity of the direct
  ``python -m pretrain.evaluate`` command, to the bit;
* the MQAR sweep's ``--slurm-array`` script runs two tiny settings as an array; submitted again, every task finds
  its setting done and leaves its result alone; ``--slurm-array`` then has nothing left to submit.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .slurm_jobs import CPU_JOB, REPO, Job, job_env

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def test_eval_sbatch_equals_the_direct_command(tmp_path, shards, reference):
    export = reference[0] / "export"
    options = ["--seq-len", "32", "--eod-id", "0"]
    direct = tmp_path / "direct.json"
    p = subprocess.run([sys.executable, "-m", "pretrain.evaluate", "--checkpoint", str(export), "--data",
                        str(shards / "valid"), *options, "--out", str(direct)], cwd=REPO, env=job_env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]

    slurm_out = tmp_path / "slurm.json"
    job = Job.submit("launch/slurm/eval.sbatch", [export, shards / "valid", *options, "--out", slurm_out],
                     log=tmp_path / "eval.out", options=CPU_JOB, env=job_env())
    try:
        info = job.wait({"COMPLETED", "FAILED", "CANCELLED"})
    finally:
        job.cancel()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.log()[-4000:]
    a, b = json.loads(direct.read_text()), json.loads(slurm_out.read_text())
    assert a["tokens"] == b["tokens"] > 0 and b["world_size"] == 1
    assert (b["perplexity"], b["loss"], b["nll_sum"]) == (a["perplexity"], a["loss"], a["nll_sum"])


def sweep(out, *extra) -> subprocess.CompletedProcess:
    """Two tiny settings (lr 3e-3 and 1e-2), one epoch each, on CPU nodes (no GPU, one CPU per task)."""
    return subprocess.run(
        [sys.executable, "-m", "pretrain.mqar.sweep", "--out", str(out), "--config", "configs/mqar/tiny_cpu.yaml",
         "--mixers", "rebased", "--d-models", "64", "--seq-lens", "32", "--lrs", "3e-3", "1e-2", "--seeds", "0",
         *extra, "train.max_epochs=1"], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=240)


def test_mqar_slurm_array_runs_the_settings_and_skips_finished_ones(tmp_path):
    out = tmp_path / "mqar"
    p = sweep(out, "--slurm-array", "--slurm-opt", "gpus=", "--slurm-opt", "cpus-per-task=1")
    assert p.returncode == 0, p.stderr[-3000:]
    script = out / "slurm" / "mqar_sweep.sbatch"
    assert "#SBATCH --array=0-1" in script.read_text()

    def run_array() -> str:
        job = Job.submit(str(script), log=None, env=job_env())  # OUT/slurm/mqar-<job>_<task>.out
        try:
            states = job.wait_array()
        finally:
            job.cancel()
        assert states == ["COMPLETED", "COMPLETED"], states
        return job.id

    job_id = run_array()
    results = sorted(out.glob("rebased_*.json"))
    assert [r.name for r in results] == ["rebased_d64_L32_lr0.003_s0.json", "rebased_d64_L32_lr0.01_s0.json"]
    for task, result in enumerate(results):
        task_log = (out / "slurm" / f"mqar-{job_id}_{task}.out").read_text()
        assert f"running setting #{task} {result.stem}" in task_log and "done: best accuracy" in task_log, task_log
        assert json.loads(result.read_text())["epochs_run"] == 1
    written = {r: r.stat().st_mtime_ns for r in results}

    again = run_array()  # resubmitted as it is: each task finds its setting done
    for task, result in enumerate(results):
        task_log = (out / "slurm" / f"mqar-{again}_{task}.out").read_text()
        assert f"setting #{task} {result.stem} is done" in task_log, task_log
        assert result.stat().st_mtime_ns == written[result], f"{result} was rewritten"

    p = sweep(out, "--slurm-array")
    assert p.returncode == 0 and "all 2 settings are done" in p.stdout and "no array to submit" in p.stdout, p.stdout
