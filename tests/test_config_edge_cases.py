"""Config loader traps: duplicate YAML keys, errors caused by overrides, YAML aliases, tuples, number strings."""

from dataclasses import dataclass, field

import pytest

from pretrain.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from pretrain.models import ModelConfig
from pretrain.training.config import RunConfig

GOOD = "vocab_size: 100\nd_model: 32\nlayer_unit: [short_conv, rebased]\nn_layers: 5\nrebased: {num_heads: 2}\n"


def write(tmp_path, text, name="model.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,key,line", [
    (GOOD + "d_model: 64\n", "'d_model'", 2),
    (GOOD.replace("{num_heads: 2}", "{num_heads: 2, eps: 1.0e-6, num_heads: 4}"), "'num_heads'", 5),
    (GOOD + "tie_embeddings: yes\ntie_embeddings: false\n", "'tie_embeddings'", 6),
])
def test_duplicate_keys_are_refused_with_the_first_line(tmp_path, text, key, line):
    """PyYAML silently keeps the last of two equal keys; a config must not depend on which one was read."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, path)
    message = str(err.value)
    assert str(path) in message and f"duplicate key {key}" in message and f"first at line {line}" in message


def test_duplicate_check_leaves_merge_keys_and_repeated_nested_keys_alone(tmp_path):
    text = GOOD.replace("rebased: {num_heads: 2}\n", "rebased: &heads {num_heads: 2, eps: 1.0e-6}\n"
                        "based:\n  <<: *heads\n  num_heads: 4\nattention: {num_heads: 4}\n")
    cfg = load_config(ModelConfig, write(tmp_path, text))
    assert (cfg.rebased.num_heads, cfg.based.num_heads, cfg.based.eps) == (2, 4, 1e-6)


def test_duplicate_keys_in_an_override_value_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'num_heads'"):
        load_config(ModelConfig, write(tmp_path, GOOD), ["rebased={num_heads: 2, num_heads: 4}"])


@pytest.mark.parametrize("override,expected", [
    ("rebased.use_gama=true", "unknown key 'rebased.use_gama'"),
    ("d_model=abc", "key 'd_model': expected an integer"),
    ("rebased.norm_scope=global", "'per_head', 'joint'"),
    ("rebased.eps=-1", "rebased.eps=-1.0 must be a finite number > 0"),  # the section's __post_init__
    ("rebased={eps: 1.0e-6, value_head: 2}", "unknown key 'rebased.value_head'"),  # a whole section replaced
])
def test_errors_caused_by_an_override_name_it(tmp_path, override, expected):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, path, ["norm_eps=1.0e-6", override, "init_std=0.01"])
    message = str(err.value)
    # the file first (where the rest of the config is), then the override that is at fault, and only that one
    assert message.startswith(f"{path}: ") and message.endswith(f" (from override '{override}')"), message
    assert expected in message and "norm_eps" not in message and "init_std" not in message, message


def test_file_errors_still_name_only_the_file_and_later_overrides_win(tmp_path):
    path = write(tmp_path, GOOD.replace("d_model: 32", "d_model: thirty"))
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, path, ["rebased.eps=1.0e-6"])
    assert str(err.value).startswith(f"{path}: key 'd_model'") and "override" not in str(err.value), err.value
    cfg = load_config(ModelConfig, path, ["d_model=thirty", "d_model=64"])  # the later override fixes the file
    assert cfg.d_model == 64


def test_errors_in_list_items_set_by_an_override_name_it(tmp_path):
    path = write(tmp_path, "model: m.yaml\ndata: {train: [{path: a}]}\n", "run.yaml")
    cfg = load_config(RunConfig, path, ["data.train=[{path: b, weight: 2}, {path: c}]"])
    assert [(s.path, s.weight) for s in cfg.data.train] == [("b", 2.0), ("c", 1.0)]
    with pytest.raises(ConfigError, match=r"run.yaml: missing required key 'data.train\[0\].path' .*"
                                          r"\(from override 'data.train=\[\{weight: 2\}\]'\)$"):
        load_config(RunConfig, path, ["data.train=[{weight: 2}]"])


def test_overrides_without_a_file_name_the_override():
    with pytest.raises(ConfigError, match=r"^<overrides>: rebased: rebased.eps=-1.0 must be a finite number > 0 "
                                          r"\(from override 'rebased.eps=-1'\)$"):
        load_config(ModelConfig, None, ["vocab_size=10", "d_model=8", "layers=[rebased]", "rebased.eps=-1"])


@pytest.mark.parametrize("override", ["layers=[rebased, based", "name=*undefined", "rebased={eps: [1}"])
def test_an_override_with_invalid_yaml_is_a_config_error(tmp_path, override):
    with pytest.raises(ConfigError) as err:
        load_config(ModelConfig, write(tmp_path, GOOD), [override])
    assert str(err.value).startswith(f"override '{override}': invalid YAML value"), err.value


@pytest.mark.parametrize("override", ["rebased..eps=1", ".eps=1", "rebased.=1"])
def test_an_override_with_an_empty_key_part_is_refused(tmp_path, override):
    with pytest.raises(ConfigError, match="empty key"):
        load_config(ModelConfig, write(tmp_path, GOOD), [override])


def test_spaces_around_override_keys_are_ignored(tmp_path):
    cfg = load_config(ModelConfig, write(tmp_path, GOOD), ["d_model = 64", " rebased . eps =1.0e-6"])
    assert cfg.d_model == 64 and cfg.rebased.eps == 1e-6


def test_an_override_changes_only_its_key_not_an_aliased_section(tmp_path):
    """A YAML alias (`based: *heads`) is the same mapping object as its anchor; an override of one must not
    silently change the other."""
    text = GOOD.replace("rebased: {num_heads: 2}\n", "rebased: &heads {num_heads: 2}\nbased: *heads\n")
    cfg = load_config(ModelConfig, write(tmp_path, text), ["rebased.num_heads=4"])
    assert (cfg.rebased.num_heads, cfg.based.num_heads) == (4, 2)


def test_apply_overrides_leaves_its_input_unchanged():
    data = {"rebased": {"num_heads": 2}}
    assert apply_overrides(data, ["rebased.num_heads=4", "d_model=8"]) == {"rebased": {"num_heads": 4}, "d_model": 8}
    assert data == {"rebased": {"num_heads": 2}}


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(GOOD.encode() + b"norm: rms\xff\n")
    with pytest.raises(ConfigError, match=r"model\.yaml: not UTF-8"):
        load_config(ModelConfig, path)


@dataclass
class Shapes:
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[int, str] = (1, "a")
    scale: float = 1.0
    derived: int = field(default=0, init=False)


def test_tuple_fields_are_tuples_checked_per_position_and_round_trip():
    cfg = from_dict(Shapes, {"sizes": [3, 4, 5], "pair": [2, "b"]})
    assert cfg.sizes == (3, 4, 5) and cfg.pair == (2, "b")
    assert from_dict(Shapes, to_dict(cfg)) == cfg  # to_dict leaves out init=False fields, which from_dict refuses
    with pytest.raises(ConfigError, match=r"key 'pair': expected 2 items"):
        from_dict(Shapes, {"pair": [1, "a", "b"]})
    with pytest.raises(ConfigError, match=r"key 'pair\[1\]': expected a string"):
        from_dict(Shapes, {"pair": [1, 2]})
    with pytest.raises(ConfigError, match=r"key 'sizes\[1\]': expected an integer"):
        from_dict(Shapes, {"sizes": [1, "x"]})


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("1E+5", 1e5), ("-2.5e-3", -2.5e-3), ("5e3", 5000.0)])
def test_exponent_numbers_yaml_reads_as_strings_are_floats(tmp_path, text, value):
    assert load_config(Shapes, write(tmp_path, f"scale: {text}\n")).scale == value


@pytest.mark.parametrize("text", ["nan", "inf", "-infinity", "'1_000'", "'  2'"])
def test_other_strings_python_would_parse_are_not_numbers(tmp_path, text):
    """Only the number forms YAML 1.1 misreads are converted: YAML spells NaN and infinity .nan and .inf, so a
    plain nan or inf is a string (likely a slip), and a quoted string is meant as one."""
    with pytest.raises(ConfigError, match="key 'scale': expected a number"):
        load_config(Shapes, write(tmp_path, f"scale: {text}\n"))
