"""Kill -9 at a random step and `resume: auto`: the losses after the resume equal those of the uninterrupted run
bit for bit (CPU, same world size), for every strategy. Resume at another world size (2 → 1 and 1 → 2, FSDP via
DCP resharding, DeepSpeed via universal-checkpoint conversion) continues with exactly the same samples (the
per-step batch fingerprints match) and the same losses within the float tolerance of test_equivalence."""

import os
import random

import pytest

from conftest import (REFERENCE_RUNS, STEPS, assert_same_losses, kill_run, losses, max_rel_diff, run, start,
                      wait_for_step)
from test_equivalence import LOSS_RTOL


@pytest.mark.parametrize("key", ["single", "ddp", "fsdp", "zero3"])
def test_kill9_then_resume_auto_is_exact(runs, shards, tmp_path, key):
    ref = losses(runs.reference(key))
    nproc, strategy, _ = REFERENCE_RUNS[key]
    seed = int.from_bytes(os.urandom(2), "little")
    kill_at = random.Random(seed).randint(6, 16)
    out = tmp_path / "run"
    proc = start(shards, out, nproc, strategy, runs.overrides(key), extra_env={"REBASED_TEST_STEP_SLEEP": "0.25"})
    try:
        wait_for_step(out, kill_at, proc)
    finally:
        kill_run(proc)  # the launcher and every torchrun worker (each runs in a session of its own)
    before = max(losses(out))
    assert before < STEPS, f"run finished before the kill (seed {seed})"
    p = run(shards, out, nproc, strategy, runs.overrides(key))
    assert "resumed from" in p.stdout + p.stderr, f"no resume after kill at step {before} (seed {seed})"
    assert_same_losses(losses(out), ref, f"kill at step {before} (seed {seed})")


def _resume_elsewhere(runs, shards, tmp_path, src: str, nproc: int, strategy: str, extra=()):
    src_ckpt = runs.reference(src) / "checkpoints" / "step_00000015"
    out = tmp_path / "resumed"
    p = run(shards, out, nproc, strategy, [*extra, f"checkpoint.resume={src_ckpt}"])
    assert "resumed from" in p.stdout + p.stderr
    return losses(out)


@pytest.mark.parametrize("src,nproc,strategy,extra", [
    ("fsdp", 1, "fsdp", []),             # FSDP 2 → 1 process (DCP reshards)
    ("single", 2, "fsdp", []),           # 1 → 2 processes (and single's DCP checkpoint into FSDP)
    ("zero3", 1, "deepspeed", ["parallel.zero_stage=3"]),  # ZeRO-3 2 → 1 (universal checkpoint)
])
def test_resume_at_other_world_size(runs, shards, tmp_path, src, nproc, strategy, extra):
    if strategy == "deepspeed":
        extra = [f"parallel.deepspeed_config={runs.ds_config}", *extra]
    got = _resume_elsewhere(runs, shards, tmp_path, src, nproc, strategy, extra)
    ref = losses(runs.reference("single"))
    assert sorted(got) == list(range(16, STEPS + 1))
    assert [got[s]["batch_fp"] for s in got] == [ref[s]["batch_fp"] for s in got], "samples repeated or skipped"
    assert max_rel_diff(got, ref) <= LOSS_RTOL


def test_deepspeed_resume_one_to_two_processes(runs, shards, tmp_path):
    """ZeRO-2 trained on 1 process, continued on 2 (universal checkpoint conversion)."""
    one = runs.get("zero2_one_process", 1, "deepspeed", ["parallel.zero_stage=2"])
    out = tmp_path / "two"
    run(shards, out, 2, "deepspeed", [f"parallel.deepspeed_config={runs.ds_config}", "parallel.zero_stage=2",
                                      f"checkpoint.resume={one / 'checkpoints' / 'step_00000015'}"])
    assert (one / "checkpoints" / "step_00000015" / "deepspeed" / "universal").is_dir()
    ref, got = losses(runs.reference("single")), losses(out)
    assert sorted(got) == list(range(16, STEPS + 1))
    assert [got[s]["batch_fp"] for s in got] == [ref[s]["batch_fp"] for s in got]
    assert max_rel_diff(got, ref) <= LOSS_RTOL


SPAWNED_WORKERS = ("import multiprocessing, sys; multiprocessing.set_start_method('spawn'); "
                   "from pretrain.train import main; sys.exit(main())")


def test_dataloader_workers_started_by_spawn_resume_exactly(runs, shards, tmp_path):
    """data.num_workers=2 with workers started by spawn (macOS's default; Linux's from Python 3.14: the dataset,
    at its restored position, and the collate function travel pickled), resumed from the single-process reference
    run's step 15: the reference's losses and batches, bit for bit."""
    reference = runs.reference("single")
    ref = losses(reference)
    out = tmp_path / "resumed"
    run(shards, out, 1, "single",
        ["data.num_workers=2", f"checkpoint.resume={reference}/checkpoints/step_00000015"],
        entry=("-c", SPAWNED_WORKERS))
    got = losses(out)
    assert sorted(got) == list(range(16, STEPS + 1))
    assert [(got[s]["loss"], got[s]["batch_fp"]) for s in got] == [(ref[s]["loss"], ref[s]["batch_fp"]) for s in got]
