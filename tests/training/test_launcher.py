"""``launch/pretrain.sh`` under torchrun (``python -m pretrain.torchrun``, 2 processes, DDP) as a scheduler sees it:

* a configuration error and the non-finite stop end the launcher with the trainer's exit code (2 / 3) and its
  one-line message once, at the end, with no torchrun error dump (plain torchrun exits 1 around a dump);
* SIGUSR1 or SIGTERM sent to the launcher alone (not to the workers: what srun or a scheduler delivers to the task
  it started) reaches every worker: each rank saves, the launcher exits 0, no worker is left running, and a
  resume ends with the uninterrupted run's losses (plain torchrun dies on SIGUSR1 leaving the workers training,
  and exits 1 on SIGTERM).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_same_losses, env, losses, torchrun_workers, wait_for_step, write_config
from pretrain.training import checkpoint as ckpt


def launcher_env(**extra) -> dict:
    # the interpreter running the tests, as it is (no install step in launch/env.sh)
    return env(NPROC_PER_NODE=2, LAUNCHER="torchrun", REBASED_SKIP_INSTALL=1,
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **extra)


def pretrain_sh(config: Path, overrides=()) -> list[str]:
    return ["bash", "launch/pretrain.sh", str(config), "parallel.strategy=ddp", *overrides]


def _is_trainer(pid: int) -> bool:
    try:
        return b"pretrain.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize("error", ["config", "paths", "nonfinite"])
def test_errors_exit_with_the_trainers_code_and_message_once(shards, tmp_path, error):
    if error == "config":  # found by the workers, once they know the world size
        overrides, code, message = ["training.micro_batch_size=3"], 2, "config error: training.global_batch_size=8 is"
    elif error == "paths":  # every path problem in one message of several lines, before any process group
        overrides, code = [f"data.valid=[{{path: {tmp_path / 'missing'}}}]"], 2
        message = (f"config error: {tmp_path / 'run.yaml'}: 1 problem(s) with paths:\n"
                   f"  data.valid[0].path: no indexed dataset (.idx/.bin) found at '{tmp_path / 'missing'}'")
    else:
        overrides, code = ["training.inject_nan_at_steps=[9,10,11]", "training.max_nonfinite_in_a_row=3"], 3
        message = "error: stopping at step 12: 3 non-finite steps in a row"
    config = write_config(shards, tmp_path / "run")
    p = subprocess.run(pretrain_sh(config, overrides), cwd=REPO, env=launcher_env(), capture_output=True, text=True,
                       timeout=240)
    output = p.stdout + p.stderr
    assert p.returncode == code, output[-4000:]
    assert output.count(message) == 1, output[-4000:]
    tail = p.stderr[p.stderr.index(message):].rstrip("\n")
    assert tail.count("\n") == message.count("\n"), f"the message must come last:\n{tail}"
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-4000:]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_signal_to_the_launcher_saves_on_every_rank(runs, shards, tmp_path, signum):
    out = tmp_path / "run"
    config = write_config(shards, out)
    no_periodic = ["checkpoint.every=0"]  # the signal's checkpoint is then the only one
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(pretrain_sh(config, no_periodic), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=launcher_env(REBASED_TEST_STEP_SLEEP="0.25"), start_new_session=True)
    workers = {}
    try:
        signalled_after = wait_for_step(out, 4, proc)
        workers = torchrun_workers(proc.pid)  # pretrain.sh execs the launcher: proc.pid is the launcher
        assert sorted(workers) == [0, 1], workers
        os.kill(proc.pid, signum)
        # and again until it exits, as a scheduler may (SIGTERM after SIGUSR1): the saved run must still exit 0 (a
        # late one killed a worker whose handlers were gone, or the launcher while Python shut down)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            os.kill(proc.pid, signum)
            time.sleep(0.05)
        returncode = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:  # only when the test failed: never leave a run behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = [pid for pid in workers.values() if _is_trainer(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert returncode == 0, text[-4000:]
    assert not left, f"workers left running: {left}"
    [(step, path)] = ckpt.list_complete(str(out / "checkpoints"))
    meta = ckpt.read_meta(path)
    assert (meta["reason"], meta["step"], meta["world_size"]) == ("signal", step, 2)
    assert signalled_after <= step == max(losses(out)) < 20
    assert sorted(os.listdir(os.path.join(path, "rng"))) == ["rank_00000.pt", "rank_00001.pt"]

    p = subprocess.run(pretrain_sh(config, no_periodic), cwd=REPO, env=launcher_env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0 and f"resumed from {path} " in p.stderr, p.stderr[-4000:]
    assert_same_losses(losses(out), losses(runs.reference("ddp")), f"{signum.name} after step {signalled_after}")


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_while_the_workers_start_is_one_line(shards, tmp_path, signum):
    """The workers install their handlers when training begins: one killed by the forwarded signal before that had
    nothing to save, and the launcher says so in one line with 128 + the signal (it exited 1 around torchrun's
    ChildFailedError dump)."""
    config = write_config(shards, tmp_path / "run")
    proc = subprocess.Popen(pretrain_sh(config), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=launcher_env(), start_new_session=True, text=True)
    try:
        deadline = time.time() + 60
        while len(torchrun_workers(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signum)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, output[-3000:]
    assert f"pretrain.torchrun: the workers were stopped by {signum.name} while starting" in output
    assert "ChildFailedError" not in output and "Traceback" not in output
