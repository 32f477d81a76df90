"""Which parameters the trainer's AdamW decays: the weights of every linear and convolution map, the short conv's
depthwise weight included (a plain parameter, not an nn.Conv1d); no norm, bias, feature-map γ/β or embedding."""

from pathlib import Path

import pytest
import torch

from pretrain.models import build_model, load_model_config
from pretrain.training.optim import decay_parameter_names

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


@pytest.mark.parametrize("name", ["tiny_rebased", "tiny_transformer", "rebased_150m", "based_150m"])
def test_every_weight_matrix_decays_and_nothing_else(name):
    cfg = load_model_config(CONFIGS / f"{name}.yaml", ["vocab_size=256"] if name.endswith("150m") else [])
    model = build_model(cfg)
    decay, no_decay = decay_parameter_names(model)
    params = dict(model.named_parameters())
    assert sorted(decay + no_decay) == sorted(params)
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    kept = {n for n in params if n.rsplit(".", 1)[0] in embeddings or ".feature_map." in n or params[n].dim() == 1}
    assert set(no_decay) == kept and all(params[n].dim() >= 2 for n in decay)
    convs = [n for n in params if n.endswith("conv_weight")]
    assert (len(convs) > 0) == (name != "tiny_transformer") and set(convs) <= set(decay)
