"""``launch/slurm/pretrain.sbatch`` under a running Slurm (the local cluster: 2 nodes simulated on this host), with
both launchers: srun starting every trainer process, or srun starting one ``pretrain.torchrun`` per node.
Every run is compared with the uninterrupted reference run (outside Slurm), loss and batch by batch, to the bit.

* One job lives through three interruptions in a row: Slurm's warning signal to the batch shell at a random step
  (saves, the script requeues the job), ``scontrol requeue`` at a later random step (SIGTERM: saves, Slurm requeues)
  and a hard kill of the trainers (``scancel --signal=KILL JOB.STEP``: nothing saved; requeued, it resumes from the
  last periodic checkpoint); it then finishes with the reference's losses.
* A configuration error and the non-finite stop end the job with our exit code (2 / 3) and our one-line message
  once in the log.
* Two nodes (n1, n2: two slurmd daemons on their own ports) with one process each equal one node with two.
"""

from __future__ import annotations

import random

import pytest

from .slurm_jobs import CPU_JOB, Job, assert_same_losses, job_env, losses, slurm, wait_for_step, write_run_config
from pretrain.training import checkpoint as ckpt

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

SBATCH = "launch/slurm/pretrain.sbatch"
LAUNCHERS = ["srun", "torchrun"]
SLOW_STEPS = {"REBASED_TEST_STEP_SLEEP": "0.3"}  # time to signal a run between two steps


def submit(tmp_path, shards, launcher: str, overrides=(), options=("--ntasks-per-node=2",), **env):
    config = write_run_config(tmp_path / "run.yaml", shards, tmp_path / "run")
    return Job.submit(SBATCH, [config, *overrides], log=tmp_path / "job.out", options=(*CPU_JOB, *options),
                      env=job_env(LAUNCHER=launcher, **env))


def newest_checkpoint(out) -> tuple[int, dict]:
    step, path = ckpt.list_complete(str(out / "checkpoints"))[-1]
    meta = ckpt.read_meta(path)
    assert meta["world_size"] == 2 and ckpt.is_complete(path)
    return step, meta


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_preempt_requeue_and_hard_kill_resume_exactly(tmp_path, shards, reference, launcher):
    _, ref = reference
    out = tmp_path / "run"
    rng = random.Random()
    job = submit(tmp_path, shards, launcher, **SLOW_STEPS)
    try:
        # 1. Slurm's warning to the batch shell (what --signal=B:USR1@300 sends): save, exit, the script requeues
        at = rng.randint(2, 4)
        wait_for_step(out, at, job)
        slurm("scancel", "--signal=USR1", "--batch", job.id)
        job.wait({"PENDING"}, Restarts="1")
        saved1, meta = newest_checkpoint(out)
        context = f"{launcher}: USR1 after step {at}"
        assert meta["reason"] == "signal" and at <= saved1 <= 6, context
        log = job.log()
        assert "caught SIGUSR1" in log and f"requeueing job {job.id}" in log, log[-3000:]

        # 2. scontrol requeue: Slurm sends SIGTERM to the job; the trainers save, Slurm starts it again
        at = rng.randint(saved1 + 2, 8)
        wait_for_step(out, at, job)
        assert f"resumed from {out / 'checkpoints' / ckpt.step_dir_name(saved1)} " in job.log(), context
        slurm("scontrol", "requeue", job.id)
        job.wait({"PENDING"}, Restarts="2")
        saved2, meta = newest_checkpoint(out)
        context += f", scontrol requeue after step {at}"
        assert meta["reason"] == "signal" and at <= saved2 < 10, context

        # 3. the trainers killed hard after the periodic save of step 10: nothing is saved, the job fails; requeued,
        # it resumes from that checkpoint
        wait_for_step(out, 11, job)
        assert f"resumed from {out / 'checkpoints' / ckpt.step_dir_name(saved2)} " in job.log(), context
        [step] = job.steps()
        slurm("scancel", "--signal=KILL", step)
        info = job.wait({"FAILED"})
        assert info["ExitCode"] == "137:0", info
        saved3, meta = newest_checkpoint(out)
        assert (saved3, meta["reason"]) == (10, "periodic"), context
        slurm("scontrol", "requeue", job.id)

        info = job.wait({"COMPLETED", "FAILED"}, Restarts="3")
    finally:
        job.cancel()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "3"), job.log()[-4000:]
    assert f"resumed from {out / 'checkpoints' / ckpt.step_dir_name(10)} " in job.log()
    assert_same_losses(losses(out), ref, context + ", killed after step 10")


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("error", ["config", "paths", "nonfinite"])
def test_errors_end_the_job_with_our_code_and_message_once(tmp_path, shards, launcher, error):
    if error == "config":  # found by the trainer processes, once they know the world size
        overrides, code, message = ["training.micro_batch_size=3"], 2, "config error: training.global_batch_size=8 is"
    elif error == "paths":  # every path problem in one message of several lines, before any process group
        overrides, code = [f"data.valid=[{{path: {tmp_path / 'missing'}}}]"], 2
        message = (f"config error: {tmp_path / 'run.yaml'}: 1 problem(s) with paths:\n"
                   f"  data.valid[0].path: no indexed dataset (.idx/.bin) found at '{tmp_path / 'missing'}'")
    else:  # NaN losses at steps 6, 7, 8 (after the periodic checkpoint of step 5)
        overrides, code = ["training.inject_nan_at_steps=[5,6,7]", "training.max_nonfinite_in_a_row=3"], 3
        message = "error: stopping at step 8: 3 non-finite steps in a row"
    job = submit(tmp_path, shards, launcher, overrides)
    try:
        info = job.wait({"COMPLETED", "FAILED", "CANCELLED"})
    finally:
        job.cancel()
    log = job.log()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", f"{code}:0"), log[-4000:]
    assert log.count(message) == 1, log[-4000:]
    tail = log[log.index(message):].rstrip("\n")
    assert tail.count("\n") == message.count("\n"), f"the message must end the log:\n{tail}"
    assert "Traceback" not in log and "ChildFailedError" not in log, log[-4000:]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_nodes_equal_one(tmp_path, shards, reference, launcher):
    """n1 and n2 with one process each (srun: one trainer per node; torchrun: one launcher per node, static
    rendezvous on n1) give the reference's losses, which 2 processes on one node give."""
    job = submit(tmp_path, shards, launcher, options=("--nodes=2", "--ntasks-per-node=1"))
    try:
        info = job.wait({"COMPLETED", "FAILED", "CANCELLED"})
    finally:
        job.cancel()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.log()[-4000:]
    assert (info["NumNodes"], info["NodeList"]) == ("2", "n[1-2]"), info
    assert "2 nodes × 1 processes" in job.log()
    assert_same_losses(losses(tmp_path / "run"), reference[1], f"{launcher} on 2 nodes")
