"""Fault tolerance of the trainer (CPU, gloo; the tiny runs of conftest: 20 steps, checkpoints every 5).

* A checkpoint interrupted mid-save is never resumed: ``find_latest`` trusts only ``step_<n>`` directories holding
  ``COMPLETE`` (written last, before the rename), the stale temp dir is removed on the next start, and that run
  resumes from the previous complete checkpoint and ends with the uninterrupted run's losses, bit for bit.
* SIGTERM / SIGUSR1 finish the step, save and exit 0; ``resume: auto`` continues from that step, bit for bit. On 2
  processes a signal that reaches one rank only still makes every rank save the same step and exit.
* A non-finite loss or gradient skips the update and is counted (``skipped_steps`` in metrics.jsonl);
  ``training.max_nonfinite_in_a_row`` consecutive ones stop the run with exit code 3 and a message naming the limit.

Step numbers: metrics.jsonl records the step count after the step (1..20), ``training.inject_nan_at_steps`` takes
the count before it, so injecting at 3 poisons the step recorded as 4.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from conftest import (REFERENCE_RUNS, REPO, STEPS, assert_same_losses, kill_run, losses, records, run, start,
                      torchrun_workers, wait_for_step)
from pretrain.training import checkpoint as ckpt

CRASH_STEP = 10  # a periodic save (every 5) that is interrupted; step 5 is the last complete checkpoint
SLOW_STEPS = {"REBASED_TEST_STEP_SLEEP": "0.25"}  # leaves time to signal the run mid-training


def _make_complete(root, step: int, keep_last: int = 0):
    """A complete checkpoint through the real commit protocol (the payload does not matter here)."""
    tmp = root / ckpt.temp_dir_name(step)
    tmp.mkdir(parents=True)
    ckpt.write_meta(str(tmp), {"step": step})
    return ckpt.commit(str(root), str(tmp), step, ckpt.checksum_share(str(tmp), ckpt.list_files(str(tmp))), keep_last)


# --- completeness: which directory `resume: auto` may pick ------------------------------------------------------
def test_find_latest_ignores_incomplete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    _make_complete(root, 5)
    newest_complete = _make_complete(root, 10)
    assert ckpt.find_latest(str(root)) == newest_complete

    # killed after COMPLETE was written but before the rename: still a temp dir, never picked
    died_before_rename = root / "step_00000030.tmp-123-456"
    died_before_rename.mkdir()
    (died_before_rename / "meta.json").write_text("{}")
    (died_before_rename / ckpt.COMPLETE).write_text("30\n")
    # a final-named directory without the marker (e.g. copied in part) that `latest` even points at
    unmarked = root / "step_00000020"
    unmarked.mkdir()
    (unmarked / "meta.json").write_text("{}")
    (root / ckpt.LATEST).write_text("step_00000020\n")
    assert not ckpt.is_complete(str(unmarked))
    assert ckpt.find_latest(str(root)) == newest_complete
    assert [step for step, _ in ckpt.list_complete(str(root))] == [5, 10]

    # a pointer to an older complete checkpoint, or garbage, never hides a newer complete one
    (root / ckpt.LATEST).write_text("step_00000005\n")
    assert ckpt.find_latest(str(root)) == newest_complete
    (root / ckpt.LATEST).write_text("../elsewhere\n")
    assert ckpt.find_latest(str(root)) == newest_complete

    ckpt.remove_stale_temps(str(root))
    assert not died_before_rename.exists() and (root / "step_00000010").is_dir()


# A real kill -9 inside the save: the model/optimizer shards of step CRASH_STEP are on disk, the RNG states,
# meta.json and COMPLETE are not (the trainer calls checkpoint.save_rng right after the strategy's DCP write).
KILL_AFTER_MODEL_FILES = f"""
import os, signal, sys
from pretrain import train
from pretrain.training import checkpoint

real_save_rng = checkpoint.save_rng

def save_rng_or_die(tmp, rank):
    if os.path.basename(tmp).startswith(checkpoint.step_dir_name({CRASH_STEP}) + ".tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_rng(tmp, rank)

checkpoint.save_rng = save_rng_or_die
sys.exit(train.main())
"""


@pytest.mark.parametrize("crash", ["sigkill_after_model_files", "exit_before_complete_marker"])
def test_checkpoint_interrupted_mid_save_is_never_resumed(runs, shards, tmp_path, crash):
    ref = losses(runs.reference("single"))
    out = tmp_path / "run"
    root = out / "checkpoints"
    if crash == "sigkill_after_model_files":
        p = run(shards, out, 1, "single", check=False, entry=("-c", KILL_AFTER_MODEL_FILES))
        assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    else:  # the trainer's own fault hook: everything incl. meta.json is written and fsynced, COMPLETE is not
        p = run(shards, out, 1, "single", check=False,
                extra_env={"REBASED_TEST_CRASH_BEFORE_COMPLETE": CRASH_STEP})
        assert p.returncode == 17, p.stderr[-3000:]
    assert max(losses(out)) == CRASH_STEP, "the run must have died while saving step 10"

    partial = [root / name for name in os.listdir(root) if name.startswith("step_00000010.tmp-")]
    assert len(partial) == 1, os.listdir(root)
    assert (partial[0] / "dcp" / ".metadata").is_file(), "the model/optimizer files were written"
    assert (partial[0] / "meta.json").is_file() == (crash == "exit_before_complete_marker")
    assert not ckpt.is_complete(str(partial[0]))
    assert [step for step, _ in ckpt.list_complete(str(root))] == [5]
    assert (root / ckpt.LATEST).read_text().strip() == "step_00000005"
    assert ckpt.find_latest(str(root)) == str(root / "step_00000005")

    p = run(shards, out, 1, "single")
    assert f"resumed from {root / 'step_00000005'} (step 5" in p.stderr, p.stderr[-3000:]
    assert not [name for name in os.listdir(root) if ".tmp-" in name], "the stale temp dir must be removed"
    assert_same_losses(losses(out), ref, crash)


# --- SIGTERM / SIGUSR1 -------------------------------------------------------------------------------------------
def _only_checkpoint_is_the_signal_one(out, signalled_after: int, world_size: int) -> str:
    """With periodic saves off, the one complete checkpoint is the signal's: at or after the step seen before the
    signal, with every rank's RNG state; no step was trained past it."""
    complete = ckpt.list_complete(str(out / "checkpoints"))
    assert len(complete) == 1, complete
    step, path = complete[0]
    meta = ckpt.read_meta(path)
    assert meta["reason"] == "signal" and meta["step"] == step and meta["world_size"] == world_size
    assert signalled_after <= step < STEPS
    assert max(losses(out)) == step
    assert sorted(os.listdir(os.path.join(path, "rng"))) == [f"rank_{r:05d}.pt" for r in range(world_size)]
    log = (out.parent / f"{out.name}.log").read_text()
    assert f"signal received: saving at step {step} and exiting" in log
    return path


def _signal_then_resume(runs, shards, tmp_path, key: str, send_signal, context: str):
    """Run the reference config ``key`` with periodic saves off, call ``send_signal(proc)`` after step 6: the run
    must save once and exit 0, and ``resume: auto`` must end with the uninterrupted run's losses, bit for bit."""
    nproc, strategy, _ = REFERENCE_RUNS[key]
    ref = losses(runs.reference(key))
    out = tmp_path / "run"
    no_periodic = ["checkpoint.every=0"]  # the signal's checkpoint is then the only one a resume can use
    proc = start(shards, out, nproc, strategy, no_periodic, extra_env=SLOW_STEPS)
    try:
        signalled_after = wait_for_step(out, 6, proc)
        send_signal(proc)
        returncode = proc.wait(timeout=30 + 30 * nproc)
    finally:
        if proc.poll() is None:  # only when the test failed: never leave a run behind
            kill_run(proc)
    assert returncode == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]
    saved = _only_checkpoint_is_the_signal_one(out, signalled_after, world_size=nproc)

    p = run(shards, out, nproc, strategy, no_periodic)
    assert f"resumed from {saved} " in p.stderr, p.stderr[-3000:]
    assert_same_losses(losses(out), ref, f"{context} after step {signalled_after}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_exits_0_and_resume_is_exact(runs, shards, tmp_path, signum):
    _signal_then_resume(runs, shards, tmp_path, "single", lambda proc: os.kill(proc.pid, signum), f"signal {signum}")


def test_a_signal_during_the_last_step_still_finishes_the_run(shards, tmp_path):
    """SIGTERM while the last step runs: the run ends as an unsignalled one would, with the final checkpoint, the
    final evaluation and the export, and exits 0 (it saved and exited 0 without them, so a scheduler saw a finished
    run whose export never came)."""
    import time

    out = tmp_path / "run"
    proc = start(shards, out, 1, "single", ["checkpoint.every=0", "checkpoint.export_final=true"],
                 extra_env=SLOW_STEPS, **{"data.valid": [{"path": str(shards / "valid")}]})
    try:
        wait_for_step(out, STEPS - 1, proc)
        time.sleep(0.05)  # past step 19's own signal check: the last step (and its 0.25 s sleep) is running
        os.kill(proc.pid, signal.SIGTERM)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    log = (out.parent / f"{out.name}.log").read_text()
    assert returncode == 0, log[-3000:]
    assert "signal received" not in log
    assert [ckpt.read_meta(path)["reason"] for _, path in ckpt.list_complete(str(out / "checkpoints"))] == ["final"]
    assert any("val_loss" in r and r["step"] == STEPS for r in records(out))
    assert (out / "export" / "model.safetensors").is_file()


def test_signal_to_one_rank_saves_on_every_rank(runs, shards, tmp_path):
    """DDP on 2 processes, SIGUSR1 to rank 1 only (rank 0 writes the metadata and never gets it): the ranks agree
    on it, both save the same step and exit 0, and the resume matches the uninterrupted DDP run bit for bit."""
    def signal_rank_1(proc):
        workers = torchrun_workers(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGUSR1)

    _signal_then_resume(runs, shards, tmp_path, "ddp", signal_rank_1, "SIGUSR1 to rank 1")


# --- non-finite losses -------------------------------------------------------------------------------------------
def test_nonfinite_steps_are_skipped_and_counted(shards, tmp_path):
    """NaN at recorded steps 4, 7 and 8 with max_nonfinite_in_a_row=3: three skips in all but at most two in a row,
    so the run goes on (the limit counts consecutive steps, a good step resets it) and ends with 3 skipped."""
    out = tmp_path / "run"
    p = run(shards, out, 1, "single", ["training.inject_nan_at_steps=[3,6,7]", "training.max_nonfinite_in_a_row=3",
                                       "checkpoint.every=0", "checkpoint.save_final=false"])
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    nonfinite = [s for s in got if not math.isfinite(float(got[s]["loss"]))]
    assert nonfinite == [4, 7, 8]
    assert all(got[s]["loss"] == "nan" and got[s]["grad_norm"] == "nan" for s in nonfinite)
    assert [got[s]["skipped_steps"] for s in range(1, STEPS + 1)] == \
        [0, 0, 0, 1, 1, 1, 2, 3] + [3] * (STEPS - 8)
    # an applied NaN update would poison every weight: all later losses must stay finite and the loss must fall
    assert all(math.isfinite(got[s]["loss"]) for s in range(9, STEPS + 1))
    assert got[STEPS]["loss"] < got[1]["loss"] - 0.1
    assert "step 8: non-finite loss/gradient" in p.stdout and "(2 in a row, 3 total)" in p.stdout


def test_skipped_step_leaves_weights_and_optimizer_state_untouched():
    """In-process, through the trainer's Strategy.step: after a skipped step (non-finite loss flagged by the
    trainer, or a non-finite gradient with a finite loss) parameters and AdamW state are unchanged and the gradients
    are cleared; a finite step then applies normally."""
    from pretrain.models import build_model, load_model_config
    from pretrain.training.config import RunConfig
    from pretrain.training.parallel import SingleStrategy

    model_config = str(REPO / "configs/models/tiny_rebased.yaml")
    torch.manual_seed(0)
    strategy = SingleStrategy(build_model(load_model_config(model_config)), RunConfig(model=model_config),
                              torch.device("cpu"), torch.float32, 1)
    strategy.set_lr(1e-3)
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))

    def backward():
        strategy.backward(strategy.model.loss(ids, ids), True)

    backward()
    assert strategy.step(skip=False)[1], "a finite step must apply"  # so that AdamW has state to protect
    for case in ("nonfinite_loss", "nonfinite_gradient"):
        before = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}
        optim_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in strategy.optimizer.state.items()}
        backward()
        if case == "nonfinite_gradient":
            next(strategy.model.parameters()).grad[0, 0] = float("inf")
        grad_norm, applied = strategy.step(skip=case == "nonfinite_loss")
        assert not applied, case
        assert case == "nonfinite_loss" or not math.isfinite(grad_norm)
        assert all(torch.equal(p, before[n]) for n, p in strategy.model.named_parameters()), case
        for p, s in strategy.optimizer.state.items():
            assert all(torch.equal(v, optim_before[id(p)][k]) for k, v in s.items()), case
        assert all(p.grad is None for p in strategy.model.parameters()), "gradients must be cleared"
    backward()
    assert strategy.step(skip=False)[1]
    assert not all(torch.equal(p, before[n]) for n, p in strategy.model.named_parameters())


@pytest.mark.parametrize("nproc,strategy", [(1, "single"), (2, "fsdp")])
def test_too_many_nonfinite_steps_in_a_row_stop_the_run(shards, tmp_path, nproc, strategy):
    """NaN at recorded steps 10, 11, 12 with max_nonfinite_in_a_row=3: the run stops after step 12 with exit code 3
    (torchrun reports the failed workers with its own non-zero code), names the limit and the newest checkpoint
    saved before the non-finite steps began (step 5: the one of step 10 was saved during them), records the stopping
    step in metrics.jsonl and saves nothing more (no final checkpoint of a diverged run). With keep_last=1 the save
    of step 10 would have deleted step 5: the rotation keeps the last checkpoint from before the streak."""
    out = tmp_path / "run"
    p = run(shards, out, nproc, strategy, ["training.inject_nan_at_steps=[9,10,11]",
                                           "training.max_nonfinite_in_a_row=3", "checkpoint.keep_last=1"],
            check=False, timeout=120)
    root = out / "checkpoints"
    if nproc == 1:
        assert p.returncode == 3, p.stderr[-3000:]
    else:
        assert p.returncode != 0 and "exitcode  : 3" in p.stderr, p.stderr[-3000:]
    assert ("stopping at step 12: 3 non-finite steps in a row (training.max_nonfinite_in_a_row=3); the newest "
            f"checkpoint saved before they began (step 10) is {root / 'step_00000005'}.") in p.stderr
    got = losses(out)
    assert sorted(got) == list(range(1, 13)), "nothing after the stopping step"
    assert [got[s]["skipped_steps"] for s in (9, 10, 11, 12)] == [0, 1, 2, 3]
    assert [step for step, _ in ckpt.list_complete(str(root))] == [5, 10]
    assert json.loads((root / "step_00000010" / "meta.json").read_text())["nonfinite_in_a_row"] == 1
    assert json.loads((root / "step_00000005" / "meta.json").read_text())["nonfinite_in_a_row"] == 0


def test_nonfinite_stop_without_an_earlier_checkpoint_says_so(shards, tmp_path):
    out = tmp_path / "run"
    p = run(shards, out, 1, "single", ["training.inject_nan_at_steps=[4,5]", "training.max_nonfinite_in_a_row=2"],
            check=False, timeout=120)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "stopping at step 6: 2 non-finite steps in a row (training.max_nonfinite_in_a_row=2); no checkpoint was " \
           "saved before they began (step 5)." in p.stderr, p.stderr[-3000:]
    assert [step for step, _ in ckpt.list_complete(str(out / "checkpoints"))] == [5]


def test_final_checkpoint_is_saved_before_the_final_evaluation(shards, tmp_path):
    """A run whose end-of-run evaluation fails (here: validation tokens outside the model's vocabulary, which no
    cheap start-up check sees) still keeps all its training: the final checkpoint is written first, also when
    training.eval_every divides max_steps (the last step's evaluation ran before the save, and lost it)."""
    from pretrain.data.synthetic import write_synthetic_shard

    bad_valid = tmp_path / "valid_vocab_4096"
    write_synthetic_shard(str(bad_valid), 8_000, 4096, seed=3)
    out = tmp_path / "run"
    p = run(shards, out, 1, "single", ["checkpoint.every=0", f"training.eval_every={STEPS}"], check=False,
            **{"data.valid": [{"path": str(bad_valid)}]})
    assert p.returncode != 0, "the evaluation must fail for this test to mean anything"
    assert max(losses(out)) == STEPS
    assert [step for step, _ in ckpt.list_complete(str(out / "checkpoints"))] == [STEPS]
    assert ckpt.verify(str(out / "checkpoints" / f"step_{STEPS:08d}")) == []


def test_a_periodic_checkpoint_due_with_an_evaluation_is_saved_before_it(shards, tmp_path):
    from pretrain.data.synthetic import write_synthetic_shard

    bad_valid = tmp_path / "valid_vocab_4096"
    write_synthetic_shard(str(bad_valid), 8_000, 4096, seed=3)
    out = tmp_path / "run"
    p = run(shards, out, 1, "single", ["checkpoint.every=10", "training.eval_every=10"], check=False,
            **{"data.valid": [{"path": str(bad_valid)}]})
    assert p.returncode == 2 and max(losses(out)) == 10, p.stderr[-2000:]
    assert [step for step, _ in ckpt.list_complete(str(out / "checkpoints"))] == [10]
