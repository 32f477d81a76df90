"""MQAR training: the query-only logits, and a tiny end-to-end run through the CLI that must learn recall."""

import json
from pathlib import Path

import pytest
import torch

from pretrain.mqar.__main__ import main as mqar_main
from pretrain.mqar.config import load_mqar_config
from pretrain.mqar.data import load_mqar
from pretrain.mqar.results import SCHEMA, read_result
from pretrain.mqar.train import query_logits

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/mqar/tiny_cpu.yaml"


@pytest.fixture
def one_thread():
    """The tiny config asks torch for one thread; give the rest of the session its own setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mixer", ["rebased", "based"])
def test_query_logits_equal_the_full_logits_at_the_queries(mixer):
    from pretrain.models import build_model

    torch.manual_seed(0)
    cfg = load_mqar_config(TINY, [f"model.mixer={mixer}"])
    model = build_model(cfg.model_config()).double().eval()
    data = load_mqar(cfg.data.spec(), cache_dir=None)
    idx = torch.arange(6)
    inputs, _ = data.test.batch(idx)
    qpos = data.test.qpos[idx]
    with torch.no_grad():
        full = model(inputs)
        gathered = query_logits(model, inputs, qpos)
    assert gathered.shape == (6, cfg.data.spec().num_kv_pairs, cfg.data.vocab_size)
    torch.testing.assert_close(gathered, full.gather(1, qpos[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=0, atol=1e-12)


def test_tiny_run_learns_recall(tmp_path, one_thread):
    """configs/mqar/tiny_cpu.yaml: about 30 s on 2 shared cores, best validation accuracy 0.991 at epoch 3."""
    out = tmp_path / "tiny.json"
    assert mqar_main(["--config", str(TINY), "--output", str(out)]) == 0
    result = read_result(out)
    assert result is not None and result["schema"] == SCHEMA
    assert result["best_accuracy"] >= 0.95, f"tiny MQAR run reached only {result['best_accuracy']:.3f}"
    assert result["stopped_by"] == "early_stop" and result["epochs_run"] <= 5
    assert result["setting"] == {"mixer": "rebased", "d_model": 64, "seq_len": 32, "num_kv_pairs": 4,
                                 "lr": 0.01, "seed": 0}
    history = result["history"]
    assert len(history) == result["epochs_run"] and history[-1]["valid_accuracy"] == result["final_accuracy"]
    assert max(h["valid_accuracy"] for h in history) == result["best_accuracy"]
    assert history[0]["valid_accuracy"] < 0.5, "the first epoch should still be far from solved"
    assert result["steps"] == 128 * result["epochs_run"]
    assert result["time"]["total_s"] > 0 and result["device"].startswith("cpu")
    assert result["date"] and result["config"]["output"] == str(out)
    json.dumps(result)  # plain JSON all the way down


def test_cli_rejects_bad_keys_naming_the_file(capsys):
    assert mqar_main(["--config", str(TINY), "train.learning_rate=0.1"]) == 2
    err = capsys.readouterr().err
    assert "tiny_cpu.yaml" in err and "unknown key 'train.learning_rate'" in err
    assert mqar_main(["--config", str(TINY), "model.mixer=mamba"]) == 2
    err = capsys.readouterr().err
    assert "model.mixer" in err and "'rebased'" in err


def test_attention_launch_knobs_reach_the_kernels_and_bad_ones_are_named(capsys, one_thread):
    from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH
    from pretrain.mqar import train as mqar_train

    assert mqar_main(["--config", str(TINY), "train.attention_launch.tiles=8"]) == 2
    err = capsys.readouterr().err
    assert "unknown knob(s) tiles" in err and "warps_grad" in err and "tiny_cpu.yaml" in err
    assert mqar_main(["--config", str(TINY), "train.attention_launch.tile=5"]) == 2
    assert "tile must be one of" in capsys.readouterr().err
    assert mqar_main(["--config", str(TINY), "train.attention_launch.fp32_dot=ieee"]) == 2
    assert "set by precision" in capsys.readouterr().err
    default = CHUNK_LAUNCH.get()
    with CHUNK_LAUNCH.override():  # the run sets the process's configuration; the other tests keep theirs
        cfg = load_mqar_config(TINY, ["train.attention_launch.tile=8", "train.attention_launch.warps_grad=8"])
        mqar_train.MQARRun(cfg, log=lambda *a, **k: None)
        assert CHUNK_LAUNCH.get() == default.replace(tile=8, warps_grad=8)
    assert CHUNK_LAUNCH.get() == default


def test_git_commit_says_when_the_tree_differs_from_head(tmp_path):
    import subprocess

    from pretrain.mqar.train import git_commit

    assert git_commit(str(tmp_path)) is None  # not a checkout
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "code.py").write_text("x = 2\n")  # what a copied tree with an older .git looks like
    assert git_commit(str(tmp_path)) == head + "-dirty"


SHORT = ["data.num_train=1000", "data.num_test=256", "train.max_epochs=3", "train.early_stop_accuracy=null"]


def _killed_after_epoch_2(out: Path, overrides: list, monkeypatch) -> None:
    """Run the tiny config with --output `out` and stop it right after epoch 2's checkpoint is written."""
    from pretrain.mqar import train as mqar_train

    save = mqar_train.MQARRun.save_checkpoint

    def save_then_die(self):
        save(self)
        if self.progress.epoch == 2:
            raise KeyboardInterrupt("killed after epoch 2")

    monkeypatch.setattr(mqar_train.MQARRun, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        mqar_main(["--config", str(TINY), *overrides, "--output", str(out)])
    monkeypatch.setattr(mqar_train.MQARRun, "save_checkpoint", save)
    assert Path(str(out) + ".ckpt").exists() and not out.exists()


# CUDA runs only where a GPU is (the device machine): a CUDA map_location once broke every resume there
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path, one_thread, monkeypatch, capsys,
                                                                   device):
    """A run killed after epoch 2 resumes from <output>.ckpt and ends with the same numbers; the checkpoint goes."""
    overrides = [*SHORT, f"train.device={device}"]
    whole = tmp_path / "whole.json"
    assert mqar_main(["--config", str(TINY), *overrides, "--output", str(whole)]) == 0
    assert not Path(str(whole) + ".ckpt").exists()

    out = tmp_path / "resumed.json"
    _killed_after_epoch_2(out, overrides, monkeypatch)
    capsys.readouterr()
    assert mqar_main(["--config", str(TINY), *overrides, "--output", str(out)]) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = read_result(whole), read_result(out)
    assert b["time"]["attempts"] == 2 and not Path(str(out) + ".ckpt").exists()
    keys = ("epoch", "step", "lr", "train_loss", "valid_loss", "valid_accuracy")
    assert [[h[k] for k in keys] for h in b["history"]] == [[h[k] for k in keys] for h in a["history"]]
    assert (b["best_accuracy"], b["steps"]) == (a["best_accuracy"], a["steps"])


def test_a_checkpoint_of_another_config_or_a_torn_file_is_not_used(tmp_path, one_thread, capsys):
    out = tmp_path / "r.json"
    ckpt = Path(str(out) + ".ckpt")
    ckpt.write_bytes(b"not a checkpoint")
    assert mqar_main(["--config", str(TINY), *SHORT, "train.max_epochs=1", "--output", str(out)]) == 0
    assert "ignoring unreadable checkpoint" in capsys.readouterr().out
    assert read_result(out)["time"]["attempts"] == 1


def test_a_checkpoint_of_another_config_is_not_used_and_the_difference_is_named(tmp_path, one_thread, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "r.json"
    _killed_after_epoch_2(out, SHORT, monkeypatch)
    capsys.readouterr()
    assert mqar_main(["--config", str(TINY), *SHORT, "train.lr=3e-3", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out}.ckpt was saved by a run with another config (train.lr: 0.01 -> 0.003); starting afresh" in printed
    assert "resuming from" not in printed and read_result(out)["epochs_run"] == 3


def test_a_checkpoint_resumes_under_other_limits_but_not_with_another_model(tmp_path, one_thread, capsys,
                                                                              monkeypatch):
    """max_steps and time_limit_s only say where a run stops: a rerun that raises them resumes (the result records
    the new values). A model YAML edited between attempts changes the model though the run config is the same:
    that checkpoint is not used."""
    import yaml

    out = tmp_path / "r.json"
    _killed_after_epoch_2(out, [*SHORT, "train.time_limit_s=3600"], monkeypatch)
    capsys.readouterr()
    assert mqar_main(["--config", str(TINY), *SHORT, "train.time_limit_s=7200", "--output", str(out)]) == 0
    assert "resuming from" in capsys.readouterr().out
    result = read_result(out)
    assert result["time"]["attempts"] == 2 and result["protocol"]["time_limit_s"] == 7200

    model_yaml = tmp_path / "mqar_rebased.yaml"
    model_yaml.write_text((REPO / "configs/models/mqar_rebased.yaml").read_text())
    out = tmp_path / "m.json"
    edited = [*SHORT, f"model.config={model_yaml}"]
    _killed_after_epoch_2(out, edited, monkeypatch)
    model = yaml.safe_load(model_yaml.read_text())
    model["rebased"]["eps"] = 1e-3
    model_yaml.write_text(yaml.safe_dump(model))
    capsys.readouterr()
    assert mqar_main(["--config", str(TINY), *edited, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "another config (model_config.rebased.eps: 1e-12 -> 0.001); starting afresh" in printed
    assert read_result(out)["time"]["attempts"] == 1


def test_a_second_run_of_the_same_output_is_refused_while_the_first_runs(tmp_path, one_thread, capsys):
    """Two processes on one setting would resume from and overwrite one checkpoint; the second exits with 2."""
    import fcntl

    out = tmp_path / "r.json"
    with open(str(out) + ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running MQAR process holds
        assert mqar_main(["--config", str(TINY), *SHORT, "train.max_epochs=1", "--output", str(out)]) == 2
        assert "another process is running this setting" in capsys.readouterr().err
        assert not out.exists() and not Path(str(out) + ".ckpt").exists()
    assert mqar_main(["--config", str(TINY), *SHORT, "train.max_epochs=1", "--output", str(out)]) == 0


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, one_thread, capsys, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "r.json"
    assert mqar_main(["--config", str(TINY), *SHORT, "train.max_epochs=1", "--output", str(out)]) == 0
    assert "cannot lock" in capsys.readouterr().err and read_result(out) is not None


@pytest.mark.parametrize("field, value", [("perm_generator", torch.zeros(16)), ("cpu_rng", torch.zeros(3, dtype=torch.uint8)),
                                          ("progress", {"epochs": 2}), ("optimizer", {"state": {}})])
def test_a_checkpoint_that_cannot_be_restored_leaves_nothing_half_restored(tmp_path, one_thread, monkeypatch, capsys,
                                                                        field, value):
    """A checkpoint with one bad field is ignored as a whole, naming the field: the run equals a fresh one (the
    weights of epoch 2 are not kept while the epoch count starts again, which restarted the cosine schedule)."""
    fresh = tmp_path / "fresh.json"
    assert mqar_main(["--config", str(TINY), *SHORT, "--output", str(fresh)]) == 0
    out = tmp_path / "r.json"
    _killed_after_epoch_2(out, SHORT, monkeypatch)
    ckpt = Path(str(out) + ".ckpt")
    state = torch.load(ckpt, weights_only=False)
    state[field] = value
    torch.save(state, ckpt)
    capsys.readouterr()
    assert mqar_main(["--config", str(TINY), *SHORT, "--output", str(out)]) == 0
    assert f"ignoring unreadable checkpoint {ckpt}: ValueError: field '{field}'" in capsys.readouterr().out
    a, b = read_result(fresh), read_result(out)
    assert b["time"]["attempts"] == 1
    keys = ("epoch", "step", "lr", "train_loss", "valid_loss", "valid_accuracy")
    assert [[h[k] for k in keys] for h in b["history"]] == [[h[k] for k in keys] for h in a["history"]]


def test_padded_micro_batches_leave_the_loss_and_gradients_unchanged():
    """A short last micro-batch is padded to the full size with ignored rows: same loss, same gradients."""
    from pretrain.models import build_model
    from pretrain.models.loss import chunked_cross_entropy
    from pretrain.mqar.train import _padded, _query_labels

    cfg = load_mqar_config(TINY, [])
    data = load_mqar(cfg.data.spec(), cache_dir=None)
    torch.manual_seed(0)
    model = build_model(cfg.model_config()).double().eval()

    def loss_and_grads(idx, real):
        model.zero_grad()
        hidden = model.hidden_states(data.train.inputs(idx), select=data.train.qpos[idx])
        loss = chunked_cross_entropy(hidden, model.lm_head.weight, _query_labels(data.train, idx, real),
                                     reduction="sum", chunk_tokens=7)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    idx = torch.tensor([5, 3, 9])
    padded, real = _padded(idx, 8)
    assert real == 3 and padded.shape == (8,) and torch.equal(padded[:3], idx)
    loss, grads = loss_and_grads(idx, 3)
    loss_p, grads_p = loss_and_grads(padded, real)
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=0)
    for g, gp in zip(grads, grads_p):
        torch.testing.assert_close(gp, g, rtol=1e-10, atol=1e-14)


def test_evaluation_in_chunks_of_sequences_equals_one_pass(monkeypatch):
    """The evaluation's head runs over a few sequences at a time (bounded memory): the same accuracy and loss as
    one pass over the batch, also with a padded last batch."""
    import contextlib

    import pretrain.mqar.train as mqar_train
    from pretrain.models import build_model

    cfg = load_mqar_config(TINY, [])
    data = load_mqar(cfg.data.spec(), cache_dir=None)
    torch.manual_seed(0)
    model = build_model(cfg.model_config()).double().eval()

    def hidden(inputs, qpos):
        return model.hidden_states(inputs, select=qpos)

    def run(logits_per_chunk):
        monkeypatch.setattr(mqar_train, "_EVAL_LOGITS", logits_per_chunk)
        return mqar_train.evaluate(hidden, model.lm_head, data.test, 48, contextlib.nullcontext)

    one_pass = run(1 << 40)
    queries, vocab = data.test.qpos.shape[1], cfg.data.vocab_size
    for rows in (1, 5):  # 1 sequence per chunk; 5 (48 = 9 × 5 + 3: a short last chunk)
        chunked = run(rows * queries * vocab)
        assert chunked["valid_accuracy"] == one_pass["valid_accuracy"]
        # the loss is summed in fp32 per chunk, then in float64: only the order of the fp32 sums differs
        assert chunked["valid_loss"] == pytest.approx(one_pass["valid_loss"], rel=1e-6)
    assert len(data.test) % 48, "the test split should end in a padded batch"


@pytest.mark.parametrize("limit, stopped_by, epochs", [
    ("train.max_steps=20", "max_epochs", 2),     # the limit falls on the last step of the last epoch
    ("train.max_steps=15", "max_steps", 2),      # inside the last epoch: cut short
    ("train.max_steps=10", "max_steps", 1),      # at the end of epoch 1 of 2
    ("train.time_limit_s=1e-9", "max_epochs", 1),  # crossed during the only epoch, which still ends
])
def test_stopped_by_names_a_cut_only_before_the_protocols_end(tmp_path, one_thread, limit, stopped_by, epochs):
    """A run that trained every epoch is complete (the report prints no lower bound for it), whatever limit its
    last step also reached; only a run a limit ended early says so."""
    max_epochs = 1 if "time" in limit else 2
    out = tmp_path / "r.json"
    assert mqar_main(["--config", str(TINY), "data.num_train=640", "data.num_test=64", "train.batch_size=64",
                      f"train.max_epochs={max_epochs}", limit, "--output", str(out)]) == 0
    result = read_result(out)
    assert (result["stopped_by"], result["epochs_run"]) == (stopped_by, epochs)
    assert result["steps"] == int(limit.split("=")[1]) if "steps" in limit else result["steps"] == 10
