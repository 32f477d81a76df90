"""YAML → dataclass loading: good files load, bad ones fail with the file, the key and the valid choices."""

import pytest

from pretrain.config import ConfigError, load_config, to_dict, from_dict
from pretrain.models import ModelConfig


def write(tmp_path, text):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


GOOD = "vocab_size: 100\nd_model: 32\nlayer_unit: [short_conv, rebased]\nn_layers: 5\nrebased: {num_heads: 2}\n"


def test_layer_unit_repeats_and_overrides_apply(tmp_path):
    cfg = load_config(ModelConfig, write(tmp_path, GOOD), ["rebased.use_beta=false", "norm_eps=1e-6"])
    assert cfg.layers == ["short_conv", "rebased", "short_conv", "rebased", "short_conv"]
    assert cfg.rebased.use_beta is False and cfg.norm_eps == 1e-6
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg  # round trip


@pytest.mark.parametrize("text,expected", [
    (GOOD.replace("{num_heads: 2}", "{num_heads: 2, norm_scope: global}"), ["norm_scope", "'per_head'", "'joint'"]),
    (GOOD + "mlp: relu\n", ["'mlp'", "'swiglu'", "'gelu'", "'none'"]),
    (GOOD + "d_modle: 3\n", ["unknown key 'd_modle'", "did you mean 'd_model'"]),
    (GOOD.replace("{num_heads: 2}", "{num_heads: 2, use_gama: true}"), ["unknown key 'rebased.use_gama'", "use_gamma"]),
    (GOOD.replace("d_model: 32", "d_model: thirty"), ["'d_model'", "expected an integer"]),
    (GOOD.replace("[short_conv, rebased]", "[short_conv, mamba]"), ["layer_unit[1]", "'rebased'", "'attention'"]),
    (GOOD + "layers: [attention]\n", ["exactly one of 'layers'"]),
    (GOOD.replace("[short_conv, rebased]", "[short_conv, attention]") + "attention: {num_heads: 5}\n",
     ["not divisible"]),
    (GOOD.replace("d_model: 32", "d_model: 8").replace("{num_heads: 2}", "{num_heads: 12}"), ["smaller than the 12 value heads"]),
    ("d_model: 32\nlayers: [attention]\n", ["missing required key 'vocab_size'"]),
])
def test_errors_name_file_key_and_choices(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, path)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(ModelConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(ModelConfig, write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(ModelConfig, write(tmp_path, GOOD), ["d_model"])


def test_shipped_run_configs_load():
    """Every configs/runs/*.yaml validates, and its model config (with its overrides) builds a config."""
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.models.config import ModelConfig
    from pretrain.training.config import RunConfig

    root = Path(__file__).resolve().parents[1]
    paths = sorted((root / "configs" / "runs").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        run = load_config(RunConfig, str(path), [])
        model = load_config(ModelConfig, str(root / run.model), run.model_overrides)
        assert model.vocab_size > 0, path
