"""The shipped 150M configs start training near ln V: their tied embedding is initialised as the LM head (muP
readout, std 1/d_model); with the usual N(0, 0.02) a hybrid's stream top is a scaled copy of each input token's
embedding and the loss starts far above ln V."""

import math

import pytest
import torch

from pretrain.models import load_model_config
from pretrain.models.model import CausalLM


def initial_loss(config: str, **overrides) -> tuple[float, CausalLM]:
    cfg = load_model_config(config, [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    model = CausalLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 129), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).item()
    return loss, model


@pytest.mark.parametrize("name", ["rebased_150m", "based_150m", "transformer_150m"])
def test_shipped_configs_start_near_ln_vocab(name):
    loss, model = initial_loss(f"configs/models/{name}.yaml")
    cfg = model.config
    assert cfg.embed_init == "readout" and cfg.tie_embeddings
    assert model.embed.weight.std().item() == pytest.approx(1 / cfg.d_model, rel=0.01)
    assert model.lm_head.weight is model.embed.weight
    assert abs(loss - math.log(cfg.vocab_size)) < 0.05, loss


def test_normal_embedding_init_makes_a_hybrid_start_high():
    """The reason for the rule: with N(0, 0.02) the token's logit on itself is ~ d_model * 0.02."""
    loss, model = initial_loss("configs/models/rebased_150m.yaml", embed_init="normal")
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert loss > math.log(model.config.vocab_size) + 2.0, loss


def test_readout_init_needs_tied_embeddings():
    with pytest.raises(ValueError, match="embed_init 'readout'.*tie_embeddings: false"):
        load_model_config("configs/models/rebased_150m.yaml", ["tie_embeddings=false"])
