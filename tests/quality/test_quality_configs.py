"""The quality runs' configs: every model of a width loads into the one run config of that width, the models of
a width are parameter-matched, and the ablations differ from ReBased only in the feature map."""

from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.models import load_model_config
from pretrain.models.model import CausalLM
from pretrain.training.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "benchmarks" / "quality" / "configs"
MODELS = {"50m": [CONFIGS / f"q50m_{name}.yaml" for name in
                  ("rebased", "based", "transformer", "rebased_no_affine", "rebased_no_norm")],
          "150m": [REPO / "configs" / "models" / f"{name}_150m.yaml" for name in ("rebased", "based", "transformer")]}


@pytest.mark.parametrize("width", MODELS)
def test_each_width_runs_every_model_from_one_run_config(width):
    counts = {}
    for model in MODELS[width]:
        run = load_config(RunConfig, CONFIGS / f"run_q{width}.yaml", [f"model={model}", "training.seed=1"])
        assert run.training.seed == 1 and run.data.seq_len == 1024
        cfg = load_model_config(run.model, run.model_overrides)
        assert cfg.vocab_size == 32000 and cfg.embed_init == "readout" and cfg.tie_embeddings
        with torch.device("meta"):
            counts[model.name] = sum(p.numel() for p in CausalLM(cfg).parameters())
    target = {"50m": 55e6, "150m": 140e6}[width]
    for name, count in counts.items():
        assert abs(count / target - 1) < 0.05, (name, count)


def test_ablations_change_only_the_feature_map():
    base = load_model_config(CONFIGS / "q50m_rebased.yaml")
    no_affine = load_model_config(CONFIGS / "q50m_rebased_no_affine.yaml")
    no_norm = load_model_config(CONFIGS / "q50m_rebased_no_norm.yaml")
    assert (no_affine.rebased.use_gamma, no_affine.rebased.use_beta, no_affine.rebased.normalize) == (False, False, True)
    assert (no_norm.rebased.use_gamma, no_norm.rebased.use_beta, no_norm.rebased.normalize) == (True, True, False)
    for cfg in (no_affine, no_norm):
        cfg.rebased = base.rebased
        assert cfg == base
