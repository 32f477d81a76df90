"""MQAR edge cases found in an audit against the reference (Zoology's multiquery_ar, the ReBased trainer): the
ordered query-slot draws, foreign cache files, config errors that name the key, the early-stop rule, and results
made with an edited model YAML."""

import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pretrain.atomic import write_json_atomic
from pretrain.config import ConfigError, to_dict
from pretrain.mqar.__main__ import main as mqar_main
from pretrain.mqar.config import load_mqar_config
from pretrain.mqar.data import MQARSpec, generate_arrays, load_mqar, query_slot_probs
from pretrain.mqar.results import SCHEMA, read_result
from pretrain.mqar.sweep import Sweep, enumerate_settings, result_path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/mqar/tiny_cpu.yaml"


def test_the_ith_key_takes_the_ith_slot_drawn_without_replacement():
    """Zoology draws the N slots one after another, each ∝ (g+1)^(a-1) among the slots left, and puts key i at
    draw i: the ordered triples of a small case must follow exactly that law (sorted or i.i.d. slots would not)."""
    spec = MQARSpec(seq_len=20, num_kv_pairs=3, vocab_size=64, num_train=100_000, num_test=1, power_a=0.3, seed=5)
    slots = (generate_arrays(spec)["train_qpos"].astype(np.int64) - 6) // 2  # per key, in context order
    counts = Counter(map(tuple, slots.tolist()))
    p = query_slot_probs(spec.space, spec.power_a)
    chi2, cells = 0.0, 0
    for draws in itertools.permutations(range(spec.space), 3):
        prob, left = 1.0, 1.0
        for g in draws:
            prob, left = prob * p[g] / left, left - p[g]
        expected = prob * spec.num_train
        chi2 += (counts.get(draws, 0) - expected) ** 2 / expected
        cells += 1
    assert sum(counts.values()) == spec.num_train and len(counts) <= cells  # no slot twice in an example
    dof = cells - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, f"chi2 {chi2:.0f} over {dof} degrees of freedom"


def test_a_foreign_npy_file_at_the_cache_path_is_regenerated(tmp_path):
    spec = MQARSpec(seq_len=16, num_kv_pairs=2, vocab_size=32, num_train=20, num_test=8, seed=1)
    path = load_mqar(spec, tmp_path).cache_path
    np.save(path.open("wb"), np.zeros(3))  # np.load gives an array, not an archive
    messages = []
    ds = load_mqar(spec, tmp_path, log=messages.append)
    assert not ds.from_cache and any("unreadable cache" in m for m in messages)
    assert load_mqar(spec, tmp_path).from_cache


@pytest.mark.parametrize("override, named", [
    ("train.lr=-1", "lr=-1.0"), ("train.batch_size=0", "batch_size=0"), ("train.max_epochs=0", "max_epochs=0"),
    ("train.max_steps=0", "max_steps=0"), ("train.eval_every_steps=-1", "eval_every_steps=-1"),
    ("train.early_stop_accuracy=99", "early_stop_accuracy=99.0"),
    ("data.num_test=0", "num_test=0"), ("data.num_train=0", "num_train=0"),
    # accepted before: gradient ascent (clip_grad_norm_ with a negative limit), an empty evaluation, AdamW or numpy
    # tracebacks mid-run, NaN losses
    ("train.grad_clip=-1", "grad_clip=-1.0"), ("train.grad_clip=0", "grad_clip=0.0"),
    ("train.eval_batch_size=-5", "eval_batch_size=-5"), ("train.eval_batch_size=0", "eval_batch_size=0"),
    ("train.weight_decay=-1", "weight_decay=-1.0"), ("train.betas=[2,3]", r"betas=\[2.0, 3.0\]"),
    ("train.lr=.inf", "lr=inf"), ("train.device=tpu", "device='tpu'"), ("data.seed=-1", "seed=-1"),
])
def test_invalid_values_are_refused_naming_the_key(override, named):
    section = override.split(".")[0]
    with pytest.raises(ConfigError, match=rf"tiny_cpu\.yaml: {section}: {named} must"):
        load_mqar_config(TINY, [override])


@pytest.mark.parametrize("key, owner", [("d_model", "model.d_model"), ("vocab_size", "data.vocab_size"),
                                        ("max_seq_len", "data.seq_len")])
def test_model_overrides_of_what_the_setting_owns_are_refused(key, owner):
    """A result records the setting's d_model, vocabulary and length: an override of them trained another model
    than the result named (or one that could not read the data: an IndexError in the embedding mid-run)."""
    with pytest.raises(ConfigError, match=rf"tiny_cpu\.yaml: model: overrides: '{key}=32' sets {key}, which the "
                                          rf"setting owns: set {owner} instead"):
        load_mqar_config(TINY, [f"model.overrides=[{key}=32]"])
    load_mqar_config(TINY, ["model.overrides=[rebased.eps=1e-6]"])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_early_stop_needs_accuracy_above_the_threshold(tmp_path, one_thread, monkeypatch):
    """The paper's trainer stops when validation accuracy is strictly above the threshold: an epoch exactly at it
    trains on."""
    from pretrain.mqar import train as mqar_train

    monkeypatch.setattr(mqar_train.MQARRun, "evaluate", lambda self: {"valid_loss": 1.0, "valid_accuracy": 0.5})
    short = ["data.num_train=128", "data.num_test=8", "train.max_epochs=2", "train.checkpoint=false"]
    for threshold, epochs, stopped_by in ((0.5, 2, "max_epochs"), (0.49, 1, "early_stop")):
        out = tmp_path / f"stop{threshold}.json"
        assert mqar_main(["--config", str(TINY), *short, f"train.early_stop_accuracy={threshold}",
                          "--output", str(out)]) == 0
        result = read_result(out)
        assert (result["epochs_run"], result["stopped_by"]) == (epochs, stopped_by), threshold


def test_a_result_made_with_another_model_yaml_is_stale(tmp_path):
    """The run config only names the model YAML; editing the YAML changes the runs, so their results are stale.
    A model-config key the result predates (added since, with the old behaviour as its default) is no change."""
    model_yaml = tmp_path / "model.yaml"
    shutil.copy(REPO / "configs/models/mqar_rebased.yaml", model_yaml)
    settings = enumerate_settings(["rebased"], [64], [32], [0.01], [0])
    out = tmp_path / "out"
    sweep = Sweep(str(TINY), out, settings, [f"model.config={model_yaml}"])
    setting = settings[0]
    model_config = to_dict(load_mqar_config(TINY, sweep.run_overrides(setting)).model_config())
    del model_config["embed_init"]  # a result made before the key existed
    write_json_atomic(result_path(out, setting), {
        "schema": SCHEMA, "name": setting.name, "best_accuracy": 0.9,
        "config": json.loads(json.dumps(sweep.expected_config(setting))), "model_config": model_config})
    assert sweep.status(setting).state == "done"

    edited = yaml.safe_load(model_yaml.read_text())
    edited["rebased"]["eps"] = 1e-6
    model_yaml.write_text(yaml.safe_dump(edited))
    status = Sweep(str(TINY), out, settings, [f"model.config={model_yaml}"]).status(setting)
    assert status.state == "stale" and status.differences == ["model_config.rebased.eps: 1e-12 -> 1e-06"]


def test_an_output_that_is_a_folder_is_refused_before_training(tmp_path, capsys):
    """It trained the whole run and then failed to write the result (IsADirectoryError), losing it."""
    assert mqar_main(["--config", str(TINY), "--output", str(tmp_path)]) == 2
    assert f"output {tmp_path}: is a directory" in capsys.readouterr().err
    assert not Path(str(tmp_path) + ".ckpt").exists() and not Path(str(tmp_path) + ".lock").exists()
