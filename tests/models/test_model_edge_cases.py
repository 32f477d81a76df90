"""Model configs and exports at their edges: invalid values fail when the config is read, naming the field, and an
export whose config disagrees with its weights is refused instead of loaded wrong."""

import shutil

import pytest
import torch
import yaml

from pretrain.config import ConfigError, from_dict
from pretrain.models import ModelConfig, build_model


def config(**overrides) -> dict:
    base = dict(vocab_size=50, d_model=32, layers=["short_conv", "rebased", "sliding_window", "attention"],
                mlp_hidden=16, rebased={"num_heads": 2, "feature_dim": 4}, attention={"num_heads": 2},
                sliding_window={"num_heads": 2, "window": 3})
    base.update(overrides)
    return base


@pytest.mark.parametrize("overrides,field", [
    ({"attention": {"num_heads": 0}}, "attention.num_heads"),
    ({"sliding_window": {"num_heads": 0, "window": 3}}, "sliding_window.num_heads"),
    # 30 / 10 = 3 features per head: rotary rotates pairs, an odd width would silently widen q and k
    ({"d_model": 30, "attention": {"num_heads": 10}, "sliding_window": {"num_heads": 3, "window": 3}},
     "attention.num_heads"),
    ({"d_model": 30, "attention": {"num_heads": 3}, "sliding_window": {"num_heads": 10, "window": 3}},
     "sliding_window.num_heads"),
    ({"mlp_hidden": 0}, "mlp_hidden"),
    ({"mlp_hidden": -4}, "mlp_hidden"),
    ({"norm_eps": -1e-5}, "norm_eps"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"init_std": -0.02}, "init_std"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"rope_theta": -10000.0}, "rope_theta"),
    ({"init_std": float("inf")}, "init_std"),  # built a model whose loss was NaN
    ({"norm_eps": float("nan")}, "norm_eps"),
    ({"rebased": {"num_heads": 2, "feature_dim": 4, "eps": float("inf")}}, "rebased.eps"),  # failed in the forward
    ({"n_layers": 3}, "give exactly one of 'layers'"),  # beside a full pattern it was ignored
])
def test_invalid_values_fail_at_config_time_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(ModelConfig, config(**overrides))


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_even_head_widths_and_positive_values_build_and_train(mlp):
    cfg = from_dict(ModelConfig, config(d_model=36, attention={"num_heads": 3}, mlp=mlp, mlp_hidden=1,
                                        sliding_window={"num_heads": 6, "window": 3}, rope_theta=500.0))
    model = build_model(cfg)
    model.loss(torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 9))).backward()
    assert all(p.grad is not None for p in model.parameters())


def _export(tmp_path, **overrides):
    from pretrain.models.io import export_model
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, config(**overrides)))
    export_model(model, tmp_path / "export")
    return model, tmp_path / "export"


def _with_config(export, tmp_path, **changes):
    """A copy of ``export`` whose config.yaml has ``changes``, without export.json (whose SHA-256 would refuse the
    edited file first): an export written by hand or before the checksums, so the weight checks are what is tested."""
    out = tmp_path / "changed"
    shutil.copytree(export, out)
    (out / "export.json").unlink()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg.update(changes)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("trained,changes,named", [
    # untied weights read as tied: the head's table would silently replace the embedding
    ({"tie_embeddings": False}, {"tie_embeddings": True}, "lm_head.weight"),
    ({}, {"tie_embeddings": False}, "lm_head.weight"),
    ({}, {"d_model": 64}, "embed.weight"),
    ({}, {"short_conv": {"kernel_size": 4}}, "conv_weight"),
    ({}, {"learned_positions": True}, "pos_embed.weight"),
    ({}, {"norm": "layernorm"}, "mixer_norm.bias"),
])
def test_export_whose_config_disagrees_with_its_weights_is_refused(tmp_path, trained, changes, named):
    from pretrain.models.io import load_exported
    _, export = _export(tmp_path, **trained)
    with pytest.raises(ConfigError, match=rf"model\.safetensors does not match its config.*{named}"):
        load_exported(_with_config(export, tmp_path, **changes))


def test_untied_export_loads_both_tables(tmp_path):
    from pretrain.models.io import load_exported
    model, export = _export(tmp_path, tie_embeddings=False)
    loaded = load_exported(export)
    assert torch.equal(loaded.embed.weight, model.embed.weight)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("overrides,field", [
    ({"mlp": "relu"}, "mlp"),  # built a GELU MLP
    ({"norm": "batchnorm"}, "norm"),  # built LayerNorm
    ({"init_scheme": "gpt2"}, "init_scheme"),
    ({"embed_init": "xavier"}, "embed_init"),
    ({"layers": ["short_conv", "mamba"]}, "layers"),
])
def test_configs_built_in_code_check_their_choices_too(overrides, field):
    from pretrain.models.config import ReBasedConfig
    with pytest.raises(ValueError, match=rf"^{field}\b.*valid choices"):
        ModelConfig(**{**dict(vocab_size=50, d_model=32, layers=["short_conv"]), **overrides})
    with pytest.raises(ValueError, match=r"^rebased\.norm_scope='global'.*valid choices"):
        ReBasedConfig(norm_scope="global")  # built the joint LayerNorm


@pytest.mark.parametrize("offsets, message", [([0, 5, 10], "must end at the sequence length T=12"),
                                              ([2, 5, 12], "must start at 0"),
                                              ([0, 7, 5, 12], "must be non-decreasing")])
def test_bad_document_offsets_are_named(offsets, message):
    """cu_seqlens not covering [0, T]: a shape error from the positions before, not naming cu_seqlens."""
    model = build_model(from_dict(ModelConfig, config()))
    with pytest.raises(ValueError, match=f"cu_seqlens {message}"):
        model(torch.randint(0, 50, (1, 12)), cu_seqlens=torch.tensor(offsets, dtype=torch.int32))
