"""Trainer edge cases (CPU, one process unless said; the tiny runs of conftest: 20 steps, checkpoints every 5,
keep_last 2).

* Bad values in a run config fail at load time naming the file, the section and the key with its value.
* Resume is exact with dropout on (the data loader does not draw from the global RNG a resume restores).
* Resume refuses a checkpoint of another model or data order (exit 2, the keys named) and warns about other
  changed settings.
* A run that resumed from an older checkpoint keeps what it saves: the newer checkpoints of the run it went back
  on are set aside, never counted by the rotation nor picked by ``resume: auto``.
* The cosine schedule starts at the peak and ends at the floor on the last step.
* ``checkpoint.export_final`` exports the final model, also of a run resumed at its end (a config that saves no
  final checkpoint is refused).
"""

from __future__ import annotations

import math
import os

import pytest

from conftest import STEPS, losses, records, run, write_config
from pretrain.config import ConfigError, load_config
from pretrain.training import checkpoint as ckpt
from pretrain.training.config import OptimConfig, RunConfig
from pretrain.training.optim import lr_at

NO_NAN = "training.inject_nan_at_steps=[]"


# --- config validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,section,message", [
    ("logging.every=0", "logging", "every must be >= 1, got 0"),  # was a ZeroDivisionError after step 1
    ("training.micro_batch_size=0", "training", "micro_batch_size must be >= 1, got 0"),
    ("training.global_batch_size=-8", "training", "global_batch_size must be >= 1, got -8"),
    ("training.eval_samples=0", "training", "eval_samples must be >= 1, got 0"),
    ("training.max_nonfinite_in_a_row=0", "training", "max_nonfinite_in_a_row must be >= 1, got 0"),
    ("training.grad_clip=-1", "training", "grad_clip must be >= 0, got -1.0"),
    ("optim.lr=-0.001", "optim", "lr must be >= 0, got -0.001"),
    ("optim.lr=.nan", "optim", "lr must be >= 0, got nan"),
    ("optim.warmup_steps=-5", "optim", "warmup_steps must be >= 0, got -5"),
    ("checkpoint.every=-1", "checkpoint", "every must be >= 0, got -1"),
    ("checkpoint.keep_last=-2", "checkpoint", "keep_last must be >= 0, got -2"),
    ("data.num_workers=-1", "data", "num_workers must be >= 0, got -1"),
    ("data.mix_block=0", "data", "mix_block must be >= 1, got 0"),
    ("checkpoint.export_final=true", "checkpoint", "export_final=true needs save_final=true"),
    ("optim.betas=[0.9, 1.5]", "optim", "betas=[0.9, 1.5] must be two numbers in [0, 1)"),  # AdamW raised later
    ("optim.betas=[-0.5, 0.9]", "optim", "betas=[-0.5, 0.9] must be two numbers in [0, 1)"),
    ("optim.betas=[0.9, .nan]", "optim", "betas=[0.9, nan] must be two numbers in [0, 1)"),
])
def test_bad_values_are_refused_naming_file_and_key(shards, tmp_path, override, section, message):
    path = write_config(shards, tmp_path / "run")
    overrides = [override, "checkpoint.save_final=false"] if "export_final" in override else [override]
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path, overrides)
    assert str(e.value).startswith(f"{path}: {section}: {message}"), str(e.value)


def test_logging_interval_zero_stops_before_training(shards, tmp_path):
    p = run(shards, tmp_path / "run", 1, "single", ["logging.every=0"], check=False)
    assert p.returncode == 2 and "logging: every must be >= 1, got 0" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and losses(tmp_path / "run") == {}


# --- learning-rate schedule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedule_starts_at_the_peak_and_ends_at_the_floor(warmup, schedule):
    cfg = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=warmup, schedule=schedule, decay_fraction=0.5)
    lrs = [lr_at(step, cfg, STEPS) for step in range(STEPS)]
    assert all(math.isfinite(x) and 1e-4 - 1e-12 <= x <= 1e-3 for x in lrs[warmup:]), lrs
    assert lrs[warmup] == 1e-3, "the first step after the warmup runs at the peak"
    assert lrs[0] == (1e-3 / warmup if warmup else 1e-3)
    assert math.isclose(lrs[-1], 1e-4, rel_tol=1e-12), f"the last step must run at the floor lr, not {lrs[-1]}"


@pytest.mark.parametrize("decay_fraction,max_steps", [(0.1, 5), (0.025, 20), (0.2, 2), (0.5, 1)])
def test_wsd_decays_to_the_floor_when_its_fraction_of_the_run_rounds_to_no_step(decay_fraction, max_steps):
    """round(0.1 * 5) is 0: the decay never started and the last step ran at the peak."""
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=0, schedule="wsd", decay_fraction=decay_fraction)
    lrs = [lr_at(step, cfg, max_steps) for step in range(max_steps)]
    assert math.isclose(lrs[-1], 0.1, rel_tol=1e-12) and lrs[:-1] == [1.0] * (max_steps - 1), lrs
    no_decay = OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.0)
    assert lr_at(max_steps - 1, no_decay, max_steps) == 1.0


def test_warmup_longer_than_the_run_is_named(shards, tmp_path):
    p = run(shards, tmp_path / "run", 1, "single", ["training.max_steps=3", "checkpoint.save_final=false"])
    assert "optim.warmup_steps=5 >= training.max_steps=3" in p.stderr, p.stderr[-2000:]
    lrs = [r["lr"] for r in records(tmp_path / "run") if "lr" in r]
    assert lrs == pytest.approx([3e-3 / 5, 2 * 3e-3 / 5, 3 * 3e-3 / 5]), lrs


# --- resume -------------------------------------------------------------------------------------------------------
DROPOUT = [NO_NAN, "model_overrides=[embed_dropout=0.1]"]


@pytest.fixture(scope="module")
def dropout_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dropout") / "ref"
    run(shards, out, 1, "single", DROPOUT)
    return out


def test_resume_is_exact_with_dropout(shards, tmp_path, dropout_run):
    """Dropout draws from the global torch RNG, which a resume restores from the checkpoint; starting the data
    loader's iterator after that must not draw from it."""
    out = tmp_path / "resumed"
    run(shards, out, 1, "single", [*DROPOUT, f"checkpoint.resume={dropout_run / 'checkpoints' / 'step_00000015'}"])
    ref, got = losses(dropout_run), losses(out)
    assert sorted(got) == list(range(16, STEPS + 1))
    assert [got[s]["loss"] for s in got] == [ref[s]["loss"] for s in got]


@pytest.mark.parametrize("override,named", [
    ("training.seed=8", "loader state mismatch for 'seed': checkpoint 7, now 8"),
    ("data.seq_len=16", "loader state mismatch for 'seq_len': checkpoint 32, now 16"),
    ("model_overrides=[embed_dropout=0.1,d_model=32]", "d_model: 64 -> 32"),
    ("parallel.strategy=deepspeed", "was saved by parallel.strategy=single, which parallel.strategy=deepspeed "
                                    "cannot load"),
])
def test_resume_with_another_model_or_data_order_is_refused(shards, tmp_path, dropout_run, override, named):
    checkpoint = dropout_run / "checkpoints" / "step_00000015"
    p = run(shards, tmp_path / "run", 1, "single", [*DROPOUT, override, f"checkpoint.resume={checkpoint}"],
            check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("config error: checkpoint.resume: ")]
    assert len(lines) == 1 and str(checkpoint) in lines[0] and named in lines[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def test_resume_with_changed_optimisation_names_the_changes(shards, tmp_path, dropout_run):
    checkpoint = dropout_run / "checkpoints" / "step_00000015"
    p = run(shards, tmp_path / "run", 1, "single", [*DROPOUT, "optim.lr=0.001", "training.max_steps=22",
                                                    f"checkpoint.resume={checkpoint}"])
    warning = [line for line in p.stderr.splitlines() if "resume: the config differs" in line]
    assert len(warning) == 1, p.stderr[-3000:]
    assert "optim.lr: 0.003 -> 0.001" in warning[0] and "training.max_steps: 20 -> 22" in warning[0], warning
    assert "out_dir" not in warning[0] and "checkpoint.resume" not in warning[0], "only what changes the training"


def _save(root, step: int, keep_last: int, timeline: str) -> str:
    """A complete checkpoint through the real commit protocol (the payload does not matter here)."""
    tmp = root / ckpt.temp_dir_name(step)
    tmp.mkdir(parents=True)
    ckpt.write_meta(str(tmp), {"step": step, "timeline": timeline})
    return ckpt.commit(str(root), str(tmp), step, ckpt.checksum_share(str(tmp), ckpt.list_files(str(tmp))), keep_last)


def test_saving_after_resuming_from_an_older_checkpoint_keeps_the_new_one(tmp_path):
    """A run that went back to step 5 (e.g. after a divergence) saves step 10 while step 15 and 20 of the run it
    abandoned still exist: the rotation (keep_last 1) must keep the new step 10, `latest` and a later
    `resume: auto` must name it, and the abandoned checkpoints are kept aside, not deleted."""
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20):
        _save(root, step, 0, "old")
    new = _save(root, 10, 1, "new")
    assert os.path.isdir(new) and ckpt.verify(new) == [], "the checkpoint just saved was deleted"
    assert ckpt.find_latest(str(root)) == new and ckpt.read_meta(new)["timeline"] == "new"
    assert [s for s, _ in ckpt.list_complete(str(root))] == [10]
    assert (root / "step_00000015.superseded").is_dir() and (root / "step_00000020.superseded").is_dir()


# --- export -------------------------------------------------------------------------------------------------------
def test_export_final_of_a_run_resumed_at_its_end(shards, tmp_path, dropout_run):
    """Nothing left to train (resumed from another run's final checkpoint): the export is that checkpoint's model,
    not skipped because this run's checkpoint directory is empty."""
    out = tmp_path / "run"
    final = dropout_run / "checkpoints" / "step_00000020"
    p = run(shards, out, 1, "single", [*DROPOUT, "checkpoint.export_final=true", f"checkpoint.resume={final}"])
    assert (out / "export" / "model.safetensors").is_file(), p.stderr[-2000:]
    assert "(step 20)" in p.stdout + p.stderr


def test_config_differences_ignore_fields_added_since_the_checkpoint():
    """A checkpoint made before a model field existed (here embed_init) resumes: the new field's default keeps the
    old behaviour, so only the keys the checkpoint recorded are compared."""
    from pretrain.train import config_differences

    saved = {"d_model": 64, "rebased": {"num_heads": 2}}
    now = {"d_model": 64, "rebased": {"num_heads": 2, "eps": 1e-6}, "embed_init": "normal"}
    assert config_differences(saved, now) == []
    assert config_differences(saved, {**now, "d_model": 32}) == ["d_model: 64 -> 32"]
    assert config_differences({"rebased": {"num_heads": 2}}, {"rebased": {}}) == ["rebased.num_heads: 2 -> None"]


# --- data the model cannot read -----------------------------------------------------------------------------------
def test_token_ids_past_the_vocabulary_stop_the_run_with_one_line(shards, tmp_path):
    """Shards of a larger vocabulary (the synthetic ones hold ids up to 1023) against vocab_size 512: a config error
    (exit 2) naming the id, the step and the vocabulary, instead of an IndexError traceback (a device-side assert on
    CUDA)."""
    p = run(shards, tmp_path / "run", 1, "single", ["model_overrides=[vocab_size=512]", NO_NAN], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "data.train: token id" in p.stderr and "in the batch of step 0" in p.stderr
    assert "vocab_size=512" in p.stderr


def test_a_split_tokenized_with_a_larger_vocabulary_is_named_before_the_start(tmp_path):
    """tokenize_pile's manifest records the tokenizer's vocabulary: the path check names the mismatch at once."""
    import json

    from pretrain.data.synthetic import write_synthetic_shard
    from pretrain.training.config import DataConfig, DataSource, check_paths

    split = tmp_path / "train"
    split.mkdir()
    write_synthetic_shard(str(split / "train-00000"), 5_000, 1000, seed=0)
    (split / "manifest.json").write_text(json.dumps({"shards": [{"name": "train-00000"}],
                                                     "tokenizer": {"vocab_size": 1000}}))
    model = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "models", "tiny_rebased.yaml")
    cfg = RunConfig(model=model, out_dir=str(tmp_path / "out"), model_overrides=["vocab_size=512"],
                    data=DataConfig(train=[DataSource(str(split))], seq_len=32))
    problems = check_paths(cfg)
    assert any("data.train[0].path: tokenized with a 1000-token vocabulary" in p and "vocab_size=512" in p
               for p in problems), problems
    cfg.model_overrides = ["vocab_size=1024"]
    assert check_paths(cfg) == []


def test_batch_fingerprint_with_document_masking_does_not_depend_on_the_micro_batch(shards, tmp_path):
    """Document masking packs a micro batch into one row; the fingerprint counts each sample's positions from its
    own start, so it names the same sequences at micro-batch sizes 4 and 1 (it differed before)."""
    runs = {}
    for micro in (4, 1):
        out = tmp_path / f"m{micro}"
        run(shards, out, 1, "single", [f"training.micro_batch_size={micro}", "data.document_masking=true", NO_NAN,
                                       "training.max_steps=3", "checkpoint.every=0"])
        runs[micro] = {s: r["batch_fp"] for s, r in losses(out).items()}
    assert runs[4] == runs[1] and len(runs[4]) == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has GPUs for nccl")
def test_nccl_without_gpus_is_a_config_error(shards, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, env

    path = write_config(shards, tmp_path / "run")
    p = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(path), "parallel.strategy=ddp",
                        "parallel.backend=nccl"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "parallel.backend=nccl needs CUDA GPUs" in p.stderr


def _train_directly(shards, tmp_path, name, *overrides):
    """``python -m pretrain.train`` in one process (a non-single strategy at world size 1), no launcher."""
    import subprocess
    import sys

    from conftest import REPO, env

    path = write_config(shards, tmp_path / name)
    return subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(path), NO_NAN, *overrides],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.zero_stage=3", "training.activation_checkpointing=selective"], "selective does not give the same"),
    (["parallel.zero_stage=4"], "zero_stage=4: DeepSpeed ZeRO stages 1, 2 and 3"),
])
def test_deepspeed_settings_it_cannot_run_are_config_errors(shards, tmp_path, overrides, message):
    """They raised a plain ValueError inside the strategy: a traceback per rank and exit 1 under torchrun."""
    p = _train_directly(shards, tmp_path, "run", "parallel.strategy=deepspeed", *overrides)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert message in p.stderr


def test_resuming_zero2_under_zero3_is_refused_by_name(shards, tmp_path):
    """DeepSpeed converts the checkpoint to a universal one, then fails to load it between stage 3 and 1/2 (an
    assertion deep in DeepSpeed, exit 1): refused before, naming the stage to resume with."""
    first = _train_directly(shards, tmp_path, "run", "parallel.strategy=deepspeed", "parallel.zero_stage=2",
                            "training.max_steps=5", "checkpoint.every=5")
    assert first.returncode == 0, first.stderr[-2000:]
    again = _train_directly(shards, tmp_path, "run", "parallel.strategy=deepspeed", "parallel.zero_stage=3",
                            "training.max_steps=10", "checkpoint.every=5")
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert "saved under ZeRO stage 2, which stage 3 cannot load; resume with parallel.zero_stage=2" in again.stderr


# --- teardown -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ending", ["finished", "nonfinite"])  # nonfinite: stopped by too many in a row (exit 3)
def test_a_finished_run_gives_back_its_signal_handlers_and_can_be_freed(shards, tmp_path, monkeypatch, ending):
    """After ``run()`` the SIGTERM/SIGUSR1 handlers are the ones from before and nothing keeps the trainer alive:
    under torchrun its model holds the process group, which must go before ``destroy_process_group``, not at
    interpreter exit (where gloo aborted a finished run now and then: 'terminate called without an active
    exception')."""
    import gc
    import signal
    import weakref

    from pretrain.train import Trainer

    monkeypatch.setenv("WANDB_MODE", "disabled")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    overrides = ["parallel.strategy=single", "training.max_steps=4", "checkpoint.every=0"]
    if ending == "nonfinite":
        overrides += ["training.inject_nan_at_steps=[0,1]", "training.max_nonfinite_in_a_row=2"]
    trainer = Trainer(load_config(RunConfig, str(write_config(shards, tmp_path / "run")), overrides))
    code = trainer.run()
    assert code == {"finished": 0, "nonfinite": 3}[ending]
    assert {sig: signal.getsignal(sig) for sig in before} == before
    alive = weakref.ref(trainer)
    del trainer
    gc.collect()
    assert alive() is None, [type(r) for r in gc.get_referrers(alive())]


def test_main_in_process_leaves_the_callers_signal_handlers(shards, tmp_path, monkeypatch):
    """main() ignores SIGTERM/SIGUSR1 while it tears down (a late signal must not fail a saved run), then gives the
    caller's handlers back."""
    import signal

    from pretrain.train import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    config = write_config(shards, tmp_path / "run")
    assert main(["--config", str(config), "parallel.strategy=single", "training.max_steps=2", NO_NAN]) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_deterministic_mode_is_on_for_the_run_only_and_keeps_the_losses(shards, tmp_path, monkeypatch):
    """training.deterministic turns PyTorch's deterministic algorithms on while the run trains (an op without one
    warns) and puts the process's settings back afterwards; the losses are the default run's (on the CPU both are
    deterministic)."""
    import torch

    from pretrain.train import Trainer

    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = ["parallel.strategy=single", "training.max_steps=3", "checkpoint.every=0", NO_NAN]
    seen = []
    step = Trainer.train_step

    def spy(self):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark))
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", spy)
    for name, extra in (("default", []), ("deterministic", ["training.deterministic=true"])):
        cfg = load_config(RunConfig, str(write_config(shards, tmp_path / name)), overrides + extra)
        assert Trainer(cfg).run() == 0
        assert not torch.are_deterministic_algorithms_enabled()
    assert seen == [(False, False, False)] * 3 + [(True, True, False)] * 3
    got, ref = ({s: r["loss"] for s, r in losses(tmp_path / name).items()} for name in ("deterministic", "default"))
    assert got == ref and sorted(ref) == [1, 2, 3]
