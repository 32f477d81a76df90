"""The MQAR generator: example structure checked position by position, the pair-count rule, seeds, the disk cache."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import ConfigError
from pretrain.mqar import data as mqar_data
from pretrain.mqar.config import load_mqar_config
from pretrain.mqar.data import IGNORE_INDEX, MQARSpec, default_num_kv_pairs, generate_arrays, load_mqar

REPO = Path(__file__).resolve().parents[2]
SPEC = MQARSpec(seq_len=64, num_kv_pairs=8, vocab_size=64, num_train=300, num_test=60, seed=3)


def check_example(inputs: list[int], labels: list[int], spec: MQARSpec) -> None:
    """Every structural promise of one example, with plain Python (independent of the generator's code)."""
    n, half, length = spec.num_kv_pairs, spec.vocab_size // 2, spec.seq_len
    assert len(inputs) == len(labels) == length
    keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
    assert len(set(keys)) == n and len(set(values)) == n, "keys and values are distinct within an example"
    assert all(1 <= k < half for k in keys), f"keys {keys} not in [1, {half})"
    assert all(half <= v < spec.vocab_size for v in values), f"values {values} not in [{half}, {spec.vocab_size})"
    binding = dict(zip(keys, values))
    assert labels[:2 * n] == [IGNORE_INDEX] * (2 * n), "no label inside the key-value context"
    queried = []
    for pos in range(2 * n, length):
        if labels[pos] == IGNORE_INDEX:
            assert inputs[pos] == 0, f"position {pos}: filler must be 0, got {inputs[pos]}"
            continue
        assert (pos - 2 * n) % 2 == 0, f"query at odd offset {pos - 2 * n} after the context"
        key = inputs[pos]
        assert key in binding, f"position {pos}: query token {key} is not a key of this example"
        assert labels[pos] == binding[key], f"position {pos}: label {labels[pos]} is not the value bound to {key}"
        queried.append(key)
    assert sorted(queried) == sorted(keys), "every key is queried exactly once"


def test_every_example_has_the_mqar_structure():
    ds = load_mqar(SPEC, cache_dir=None)
    for split in (ds.train, ds.test):
        inputs, labels = split.dense()
        assert inputs.dtype == labels.dtype == torch.long
        assert inputs.shape == labels.shape == (len(split), SPEC.seq_len)
        for i in range(len(split)):
            check_example(inputs[i].tolist(), labels[i].tolist(), SPEC)
    assert len(ds.train) == 300 and len(ds.test) == 60


def test_batches_of_indices_match_the_dense_split():
    ds = load_mqar(SPEC, cache_dir=None)
    all_inputs, all_labels = ds.train.dense()
    idx = torch.tensor([5, 0, 299, 17])
    inputs, labels = ds.train.batch(idx)
    assert torch.equal(inputs, all_inputs[idx]) and torch.equal(labels, all_labels[idx])
    # the compact query positions are exactly the labelled positions, with the values as labels
    qpos = ds.train.qpos[idx]
    assert torch.equal(torch.sort(qpos, dim=1).values, (labels != IGNORE_INDEX).nonzero()[:, 1].view(4, -1))
    assert torch.equal(labels.gather(1, qpos), ds.train.values[idx])


def test_random_filler_keeps_keys_values_and_queries():
    spec = MQARSpec(seq_len=64, num_kv_pairs=8, vocab_size=64, num_train=50, num_test=0, seed=0,
                    random_non_queries=True)
    inputs, labels = load_mqar(spec, cache_dir=None).train.dense()
    free = labels == IGNORE_INDEX
    free[:, :16] = False
    assert (inputs[free] != 0).float().mean() > 0.9  # uniform tokens, not zeros
    for i in range(len(inputs)):
        n = 8
        binding = dict(zip(inputs[i, 0:16:2].tolist(), inputs[i, 1:16:2].tolist()))
        for pos in (labels[i] != IGNORE_INDEX).nonzero().flatten().tolist():
            assert labels[i, pos].item() == binding[inputs[i, pos].item()]
        assert int((labels[i] != IGNORE_INDEX).sum()) == n


@pytest.mark.parametrize("seq_len, expected", [(64, 16), (128, 16), (256, 64), (512, 128), (1024, 256),
                                               (2048, 512)])
def test_default_num_kv_pairs(seq_len, expected):
    assert default_num_kv_pairs(seq_len) == expected
    cfg = load_mqar_config(REPO / "configs/mqar/base.yaml", [f"data.seq_len={seq_len}"])
    assert cfg.data.num_kv_pairs is None and cfg.data.spec().num_kv_pairs == expected


def test_query_slots_follow_the_power_law():
    def slots(power_a):
        spec = MQARSpec(seq_len=256, num_kv_pairs=16, vocab_size=128, num_train=2000, num_test=0, power_a=power_a,
                        seed=1)
        qpos = generate_arrays(spec)["train_qpos"].astype(np.int64)
        return (qpos - 32) // 2, spec.space

    near, space = slots(0.01)
    assert space == 112 and near.min() >= 0 and near.max() < space
    assert near.mean() < 40 and (near < space / 4).mean() > 0.5, "power_a=0.01 favours slots near the context"
    uniform, _ = slots(1.0)
    assert abs(uniform.mean() - (space - 1) / 2) < 3 and 0.2 < (uniform < space / 4).mean() < 0.3


def test_generation_is_deterministic_by_seed():
    a, b = generate_arrays(SPEC), generate_arrays(SPEC)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other = generate_arrays(MQARSpec(**{**SPEC.__dict__, "seed": 4}))
    assert not np.array_equal(a["train_keys"], other["train_keys"])
    assert not np.array_equal(a["train_qpos"], other["train_qpos"])
    # train and test are independent streams, not one the prefix of the other
    assert not np.array_equal(a["train_keys"][:60], a["test_keys"])


def _generate_in_one_thread(spec, num, seed, chunk=2048):
    """The generator as it was written first, one thread: every cached dataset and every result so far came from it."""
    rng = np.random.default_rng(seed)
    N, V, half = spec.num_kv_pairs, spec.vocab_size, spec.vocab_size // 2
    log_p = np.log(mqar_data.query_slot_probs(spec.space, spec.power_a))

    def distinct(rows, low, high):
        r = rng.random((rows, high - low), dtype=np.float32)
        if N < high - low:
            idx = np.argpartition(r, N - 1, axis=1)[:, :N]
            return np.take_along_axis(idx, np.take_along_axis(r, idx, axis=1).argsort(axis=1), axis=1) + low
        return r.argsort(axis=1) + low

    parts = {"keys": [], "values": [], "qpos": []}
    for start in range(0, num, chunk):
        rows = min(chunk, num - start)
        parts["keys"].append(distinct(rows, 1, half))
        parts["values"].append(distinct(rows, half, V))
        scores = log_p[None, :] + rng.gumbel(size=(rows, spec.space))
        parts["qpos"].append(2 * N + 2 * np.argsort(-scores, axis=1, kind="stable")[:, :N])
    out = {k: np.concatenate(v).astype(np.int16) for k, v in parts.items()}
    if spec.random_non_queries:
        out["filler"] = rng.integers(0, V, size=(num, spec.seq_len), dtype=np.int16)
    return out


@pytest.mark.parametrize("spec, num, chunk", [
    (MQARSpec(seq_len=256, num_kv_pairs=64), 1000, 96),
    (MQARSpec(seq_len=64, num_kv_pairs=7, vocab_size=16, random_non_queries=True), 333, 50),  # every key used
    (MQARSpec(seq_len=2048, num_kv_pairs=512), 300, 2048),
])
@pytest.mark.parametrize("workers", [1, 3])
def test_threaded_generation_equals_the_one_thread_generator(spec, num, chunk, workers):
    """The selections run on threads, the draws stay in one stream: the same examples, whatever the threads."""
    expected = _generate_in_one_thread(spec, num, seed=5, chunk=chunk)
    found = mqar_data._generate(spec, num, seed=5, chunk=chunk, workers=workers)
    assert sorted(found) == sorted(expected)
    for name, arr in expected.items():
        np.testing.assert_array_equal(found[name], arr, err_msg=name)


def test_cache_is_keyed_by_parameters_and_reused(tmp_path, monkeypatch):
    first = load_mqar(SPEC, cache_dir=tmp_path)
    assert not first.from_cache and first.cache_path.exists() and first.cache_path.parent == tmp_path
    name = first.cache_path.name
    assert "L64" in name and "kv8" in name and "V64" in name and "s3" in name

    def no_generation(spec):
        raise AssertionError("the cached dataset should have been read, not regenerated")

    monkeypatch.setattr(mqar_data, "generate_arrays", no_generation)
    again = load_mqar(SPEC, cache_dir=tmp_path)
    assert again.from_cache and again.cache_path == first.cache_path
    for split in ("train", "test"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(first, split).dense(), getattr(again, split).dense()))
    monkeypatch.undo()

    # any parameter change is another file
    names = {name}
    for change in ({"seed": 4}, {"power_a": 0.5}, {"num_train": 301}, {"vocab_size": 66},
                   {"random_non_queries": True}):
        names.add(load_mqar(MQARSpec(**{**SPEC.__dict__, **change}), cache_dir=tmp_path).cache_path.name)
    assert len(names) == 6 and len(list(tmp_path.glob("*.npz"))) == 6


def test_a_torn_cache_file_is_regenerated(tmp_path):
    path = load_mqar(SPEC, cache_dir=tmp_path).cache_path
    reference = path.read_bytes()
    path.write_bytes(reference[:100])
    messages = []
    ds = load_mqar(SPEC, cache_dir=tmp_path, log=messages.append)
    assert not ds.from_cache and any("unreadable cache" in m for m in messages)
    check_example(*(t[0].tolist() for t in ds.train.batch(torch.tensor([0]))), SPEC)
    assert load_mqar(SPEC, cache_dir=tmp_path).from_cache


def _rewrite_cache(path, change):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    change(arrays)
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage, message", [
    (lambda a: a["train_qpos"].__setitem__((0, 0), SPEC.seq_len), "'train_qpos' holds values outside"),
    (lambda a: a["test_qpos"].__setitem__((1, 2), a["test_qpos"][1, 3]), "'test_qpos' repeats an entry"),
    (lambda a: a["train_qpos"].__setitem__((2, 0), a["train_qpos"][2, 0] + 1), "odd positions"),
    (lambda a: a["train_keys"].__setitem__((0, 0), 0), "'train_keys' holds values outside"),
    (lambda a: a["train_values"].__setitem__((3, 1), 1), "'train_values' holds values outside"),
    (lambda a: a["test_keys"].__setitem__((0, 1), a["test_keys"][0, 0]), "'test_keys' repeats an entry"),
    (lambda a: a.__setitem__("train_keys", a["train_keys"].astype(np.float32)), "expected integers"),
])
def test_a_cache_with_the_right_shapes_but_wrong_contents_is_regenerated(tmp_path, damage, message):
    """Nothing is trained on unverified: a well-formed archive whose examples break the task is regenerated."""
    path = load_mqar(SPEC, cache_dir=tmp_path).cache_path
    reference = load_mqar(SPEC, cache_dir=None)
    _rewrite_cache(path, damage)
    messages = []
    ds = load_mqar(SPEC, cache_dir=tmp_path, log=messages.append)
    assert not ds.from_cache and any(message in m for m in messages), messages
    assert torch.equal(ds.train.dense()[0], reference.train.dense()[0])
    assert load_mqar(SPEC, cache_dir=tmp_path).from_cache  # rewritten whole


def test_an_unwritable_cache_costs_only_the_cache(tmp_path):
    (tmp_path / SPEC.cache_name()).mkdir()  # in the way of the cache file
    messages = []
    ds = load_mqar(SPEC, cache_dir=tmp_path, log=messages.append)
    assert not ds.from_cache and any("could not cache" in m for m in messages)
    check_example(*(t[0].tolist() for t in ds.train.batch(torch.tensor([0]))), SPEC)


def test_query_positions_past_the_int16_range():
    """seq_len above 32768: positions are stored as int32 (they wrapped negative in int16 before)."""
    spec = MQARSpec(seq_len=40000, num_kv_pairs=4, vocab_size=64, num_train=8, num_test=2, power_a=1.0, seed=1)
    ds = load_mqar(spec, cache_dir=None)
    assert ds.train.qpos.max() > 32767 or ds.test.qpos.max() > 32767
    for split in (ds.train, ds.test):
        inputs, labels = split.dense()
        for i in range(len(split)):
            check_example(inputs[i].tolist(), labels[i].tolist(), spec)
    # below the limit the storage (and so every cached file) is unchanged
    assert generate_arrays(SPEC)["train_qpos"].dtype == np.int16


def test_invalid_pair_counts_name_the_file_and_key():
    with pytest.raises(ValueError, match="num_kv_pairs=17"):
        MQARSpec(seq_len=64, num_kv_pairs=17)
    with pytest.raises(ValueError, match="vocab_size=16"):
        MQARSpec(seq_len=64, num_kv_pairs=8, vocab_size=16)
    with pytest.raises(ConfigError, match=r"tiny_cpu\.yaml: data: num_kv_pairs=40"):
        load_mqar_config(REPO / "configs/mqar/tiny_cpu.yaml", ["data.num_kv_pairs=40"])


@pytest.mark.parametrize("power_a", [200.0, float("inf"), float("nan"), 0.0])
def test_a_power_law_exponent_without_finite_slot_weights_is_refused(power_a):
    """(g+1)^(a-1) past float64 made the slot probabilities NaN, and every example put its queries in the first
    slots, the opposite of what a > 1 asks (the official np.random.choice raises on them)."""
    with pytest.raises(ValueError, match=f"power_a={power_a}"):
        MQARSpec(seq_len=2048, num_kv_pairs=64, power_a=power_a)
    MQARSpec(seq_len=2048, num_kv_pairs=64, power_a=50.0)  # large but finite: accepted
