"""W&B logging never needs an account: offline mode writes a local run (and resumes the same run id), disabled
mode writes nothing; a broken wandb never stops training."""

import json

import pytest

from pretrain.training.config import RunConfig
from pretrain.training.metrics import MetricsLogger


def _cfg(tmp_path, mode):
    cfg = RunConfig(model="configs/models/tiny_rebased.yaml", out_dir=str(tmp_path / "run"))
    cfg.logging.wandb.mode = mode
    cfg.logging.progress_bar = False
    return cfg


def test_offline_wandb_logs_locally_and_keeps_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, "offline")
    ids = []
    for step in (0, 5):
        m = MetricsLogger(cfg, rank=0, start_step=step, max_steps=10, config_dict={"x": 1})
        assert m.wandb_run is not None, "offline wandb did not start"
        ids.append(m.wandb_run.id)
        m.log({"step": step + 1, "loss": 1.5, "tokens_per_s": 10.0}, console=False)
        m.close()
    assert ids[0] == ids[1], "a resumed run must continue the same W&B run"
    assert any((tmp_path / "run" / "wandb").glob("offline-run-*"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 6]


def test_disabled_wandb_writes_no_wandb_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    m = MetricsLogger(_cfg(tmp_path, "disabled"), rank=0, start_step=0, max_steps=1, config_dict={})
    assert m.wandb_run is None
    m.close()
    assert not (tmp_path / "run" / "wandb").exists()


@pytest.mark.parametrize("content", ["", "\n", "Not An Id!"])
def test_a_damaged_run_id_file_starts_a_new_run_instead_of_losing_the_logging(tmp_path, monkeypatch, content):
    """A torn or empty wandb_id (it was written in place) made every later start log "Run ID cannot be empty" and
    run without W&B; it is replaced by a new id, written atomically."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, "offline")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb_id").write_text(content)
    m = MetricsLogger(cfg, rank=0, start_step=0, max_steps=10, config_dict={"x": 1})
    assert m.wandb_run is not None
    assert (tmp_path / "run" / "wandb_id").read_text() == m.wandb_run.id
    m.close()
