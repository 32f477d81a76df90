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
