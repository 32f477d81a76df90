"""PackedSequenceDataset: packing, determinism, rank sharding, exact resume (also at another world size), mixing."""

from __future__ import annotations

import collections
import itertools
import struct

import numpy as np
import pytest
import torch

from pretrain.data import FeistelPermutation, IndexedDataset, IndexedDatasetWriter, PackedSequenceDataset, TokenStream


def write_docs(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(d)
    return w.finalize()


def random_docs(n, seed, vocab=1000, eod=3, max_len=50):
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(4, vocab, rng.integers(1, max_len)), eod) for _ in range(n)]


@pytest.fixture
def shards(tmp_path):
    """A dataset in two shards (a directory) and a second single-file dataset."""
    docs_a = random_docs(300, 0)
    write_docs(tmp_path / "a" / "train-00000", docs_a[:170])
    write_docs(tmp_path / "a" / "train-00001", docs_a[170:])
    docs_b = random_docs(100, 1)
    write_docs(tmp_path / "b", docs_b)
    return {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "docs_a": docs_a, "docs_b": docs_b}


def test_feistel_is_a_permutation():
    for n in (1, 2, 3, 17, 1000, 4097):
        p = FeistelPermutation(n, key=42)
        assert sorted(p(i) for i in range(n)) == list(range(n))
    assert [FeistelPermutation(1000, 1)(i) for i in range(10)] != [FeistelPermutation(1000, 2)(i) for i in range(10)]


def test_reads_foreign_file_written_from_format_description(tmp_path):
    """An .idx/.bin pair written with struct (as gpt-neox/Megatron would), with a multi-sequence document."""
    seqs = [[5, 6, 7], [8, 9], [10, 3], [11, 12, 13, 3]]
    doc_idx = [0, 3, 4]  # document 0 = sequences 0-2
    sizes = [len(s) for s in seqs]
    pointers = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * 4
    with open(tmp_path / "x.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4) + struct.pack("<QQ", 4, 3))
        f.write(struct.pack("<4i", *sizes) + struct.pack("<4q", *pointers) + struct.pack("<3q", *doc_idx))
    with open(tmp_path / "x.bin", "wb") as f:
        f.write(struct.pack(f"<{sum(sizes)}i", *[t for s in seqs for t in s]))
    ds = IndexedDataset(tmp_path / "x")
    assert ds.dtype == np.int32 and len(ds) == 4 and ds.num_documents == 2
    assert ds[1].tolist() == [8, 9] and ds.document(0).tolist() == [5, 6, 7, 8, 9, 10, 3]
    assert ds.document_start_tokens().tolist() == [0, 7]
    stream = TokenStream(str(tmp_path / "x"))
    assert stream.document_starts(0, 11).tolist() == [0, 7]


def test_packing_windows_and_cu_seqlens(shards):
    L = 32
    ds = PackedSequenceDataset([shards["a"]], seq_len=L, seed=0, return_cu_seqlens=True)
    flat = np.concatenate(shards["docs_a"])
    starts = np.cumsum([0] + [len(d) for d in shards["docs_a"]])
    assert ds.num_sequences == [(len(flat) - 1) // L]
    for i in range(40):
        _, j = ds.locate(i)
        s = ds[i]
        window = flat[j * L: j * L + L + 1]
        assert s["input_ids"].tolist() == window[:-1].tolist() and s["labels"].tolist() == window[1:].tolist()
        assert s["input_ids"].dtype == torch.long
        inner = [int(x) - j * L for x in starts if j * L < x < j * L + L]
        assert s["cu_seqlens"].tolist() == [0, *inner, L]


def test_deterministic_and_seed_dependent(shards):
    def first(seed, n=30):
        ds = PackedSequenceDataset([shards["a"]], seq_len=16, seed=seed)
        return [tuple(x["input_ids"].tolist()) for _, x in zip(range(n), ds)]

    assert first(1) == first(1)
    assert first(1) != first(2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_sharding_covers_each_sequence_once_per_epoch(shards, world_size):
    probe = PackedSequenceDataset([shards["a"]], seq_len=16, seed=5)
    n = probe.num_sequences[0]
    seen = []
    for r in range(world_size):
        ds = PackedSequenceDataset([shards["a"]], seq_len=16, seed=5, rank=r, world_size=world_size,
                                   max_samples=n)
        seen += [probe.locate(i)[1] for i in ds.global_indices()]
        assert len(list(zip(range(3), ds))) == 3
    assert sorted(seen) == list(range(n))
    # The next epoch visits every sequence once again, in a different order.
    epoch2 = [probe.locate(i)[1] for i in range(n, 2 * n)]
    assert sorted(epoch2) == list(range(n)) and epoch2 != [probe.locate(i)[1] for i in range(n)]


def collect(ds, n):
    out = []
    for s in ds:
        out.append(tuple(s["input_ids"].tolist()))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("new_world", [2, 4, 1])
def test_state_restore_continues_exactly(shards, new_world):
    mix = [(shards["a"], 0.7), (shards["b"], 0.3)]
    kw = dict(seq_len=16, seed=11)
    W, per_rank_steps, micro = 2, 5, 3
    # Uninterrupted: global samples in order.
    ref = PackedSequenceDataset(mix, **kw)
    expected = [tuple(ref[i]["input_ids"].tolist()) for i in range(60)]
    # Interrupted run at world size 2: every rank runs 5 steps of micro-batch 3, then rank 0's state is saved.
    ranks = [PackedSequenceDataset(mix, rank=r, world_size=W, **kw) for r in range(W)]
    got = {}
    for r, ds in enumerate(ranks):
        for k, s in enumerate(collect(ds, per_rank_steps * micro)):
            got[r + k * W] = s
    state = ranks[0].state_dict()
    consumed = W * per_rank_steps * micro
    assert state["consumed_samples"] == consumed
    assert [got[i] for i in range(consumed)] == expected[:consumed]
    # Resume on a different world size: continues with no repeat and no gap.
    resumed = {}
    for r in range(new_world):
        ds = PackedSequenceDataset(mix, rank=r, world_size=new_world, **kw)
        ds.load_state_dict(state)
        indices = list(itertools.islice(ds.global_indices(), 6))
        for i, s in zip(indices, collect(ds, 6)):
            resumed[i] = s
    assert sorted(resumed) == list(range(consumed, consumed + 6 * new_world))
    assert [resumed[i] for i in sorted(resumed)] == expected[consumed: consumed + 6 * new_world]


def test_state_mismatch_is_rejected(shards):
    ds = PackedSequenceDataset([shards["a"]], seq_len=16, seed=1)
    other = PackedSequenceDataset([shards["a"]], seq_len=16, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(ds.state_dict())


def test_mixing_weights_are_realised(shards):
    ds = PackedSequenceDataset([(shards["a"], 3.0), (shards["b"], 1.0)], seq_len=8, seed=0, mix_block=100)
    counts = collections.Counter(ds.locate(i)[0] for i in range(1000))
    assert counts == {0: 750, 1: 250}
    # Within a dataset, ordinals advance by one: the first epoch of b is a permutation of its sequences.
    nb = ds.num_sequences[1]
    b_seqs = [j for d, j in (ds.locate(i) for i in range(4 * nb + 100)) if d == 1][:nb]
    assert sorted(b_seqs) == list(range(nb))


def test_dataloader_workers_keep_order(shards):
    ds = PackedSequenceDataset([shards["a"]], seq_len=16, seed=4, rank=1, world_size=2, max_samples=40,
                               micro_batch_size=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = [b["input_ids"] for b in loader]
    plain = torch.stack([ds[i]["input_ids"] for i in range(1, 40, 2)])
    assert torch.equal(torch.cat(batches), plain)
    assert ds.state_dict(consumed_samples=24)["consumed_samples"] == 24


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_dataloader_workers_started_by_pickling_keep_order_and_do_not_copy_the_shards(shards, start_method):
    """spawn/forkserver workers (macOS's default; Linux's from Python 3.14) receive the dataset pickled: the shards
    travel as their paths and are reopened (memmaps pickled as full copies of every shard before), and a restored
    position travels with it."""
    import pickle

    ds = PackedSequenceDataset([(shards["a"], 2.0), (shards["b"], 1.0)], seq_len=16, seed=4, max_samples=40,
                               micro_batch_size=4, return_cu_seqlens=True)
    shard_bytes = sum(s.tokens.nbytes for stream in ds.streams for s in stream.shards)
    assert len(pickle.dumps(ds)) < shard_bytes / 4
    copy = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(copy[i]["input_ids"], ds[i]["input_ids"]) for i in range(40))
    ds.load_state_dict(ds.state_dict(consumed_samples=12))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=start_method,
                                         collate_fn=_input_ids)
    assert torch.equal(torch.cat(list(loader)), torch.stack([ds[i]["input_ids"] for i in range(12, 40)]))


def _input_ids(samples):  # module level: spawned workers unpickle it by name
    return torch.stack([s["input_ids"] for s in samples])


def test_empty_documents_leave_no_empty_segment_in_cu_seqlens(tmp_path):
    """Other MMIDIDX writers may store empty documents: each starts where the next one does, and cu_seqlens must
    not repeat that boundary (a zero-length segment)."""
    write_docs(tmp_path / "x", [np.array([5, 6, 7]), np.array([], dtype=np.int64), np.array([], dtype=np.int64),
                                np.array([8, 9, 10, 11]), np.array([12]), np.array([13, 14])])
    ds = PackedSequenceDataset([str(tmp_path / "x")], seq_len=8, seed=0, return_cu_seqlens=True)
    assert ds[0]["cu_seqlens"].tolist() == [0, 3, 7, 8]
    assert TokenStream(str(tmp_path / "x")).document_starts(0, 10).tolist() == [0, 3, 7, 8]


@pytest.mark.parametrize("weight,message", [(float("nan"), "got nan"), (float("inf"), "got inf"), (0, "got 0.0"),
                                            (-1.5, "got -1.5")])
def test_mixing_weights_must_be_positive_and_finite(shards, weight, message):
    with pytest.raises(ValueError, match=f"mixing weight of '.*b' must be a positive finite number, {message}"):
        PackedSequenceDataset([(shards["a"], 1.0), (shards["b"], weight)], seq_len=8)


def test_numpy_mixing_weights_are_weights(shards):
    ds = PackedSequenceDataset([(shards["a"], np.float32(3.0)), (shards["b"], np.int64(1))], seq_len=8, mix_block=100)
    assert ds.weights == [0.75, 0.25]
