"""Perplexity / bits-per-byte arithmetic against models whose probabilities are known in closed form."""

import math

import pytest
import torch

from pretrain.evaluation.scoring import Document, score_documents, totals_by_set, windows

V, EOD = 11, 10


def uniform(ids):
    return torch.zeros(*ids.shape, V, dtype=torch.float64)


def bigram_table(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g, dtype=torch.float64)


def bigram(ids, table=bigram_table()):
    return table[ids]  # logits for the next token depend only on the current one


def position_model(ids):
    """log-probability of any token != 0 is -log(e^(p+1) + V - 1) at window position p: it reveals the context."""
    B, T = ids.shape
    logits = torch.zeros(B, T, V, dtype=torch.float64)
    logits[..., 0] = torch.arange(1, T + 1, dtype=torch.float64)
    return logits


def nll_at(p):
    return math.log(math.exp(p + 1) + V - 1)


def docs_from(lengths, seed=1, set_names=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        toks = torch.randint(1, EOD, (n,), generator=g).tolist() + [EOD]
        out.append(Document(toks, num_bytes=3 * n + 1, set_name=None if set_names is None else set_names[i]))
    return out


def test_uniform_model_perplexity_is_vocab_size():
    docs = docs_from([5, 17, 1])
    overall, _ = totals_by_set(docs, score_documents(uniform, docs, seq_len=8, eod_id=EOD))
    s = overall.summary()
    assert s["tokens"] == 6 + 18 + 2
    assert s["perplexity"] == pytest.approx(V, rel=1e-12)
    # bits per byte by hand: tokens·log2(V) / bytes
    assert s["bits_per_byte"] == pytest.approx(26 * math.log2(V) / (16 + 52 + 4), rel=1e-12)


@pytest.mark.parametrize("layout", ["separate", "packed"])
def test_bigram_model_matches_hand_count(layout):
    docs = docs_from([4, 9, 2], set_names=["A", "B", "A"])
    table = bigram_table()
    logp = torch.log_softmax(table, dim=-1)
    expected = {}
    # Bigram context is one token, so windows and layout don't matter: each token is scored after its predecessor
    prev = EOD
    for i, d in enumerate(docs):
        if layout == "separate":
            prev = EOD
        total = 0.0
        for tok in d.tokens:
            total -= logp[prev, tok].item()
            prev = tok
        expected[i] = total
    got = score_documents(bigram, docs, seq_len=3, eod_id=EOD, layout=layout, batch_size=2)
    for i in expected:
        assert got[i] == pytest.approx(expected[i], rel=1e-12)
    overall, by_set = totals_by_set(docs, got)
    assert set(by_set) == {"A", "B"}
    assert by_set["A"].tokens == 5 + 3 and by_set["B"].documents == 1
    assert overall.nll == pytest.approx(sum(expected.values()), rel=1e-12)


def contexts(seq_len, stride, n_targets):
    docs = [Document([1] * (n_targets - 1) + [EOD])]
    nll = score_documents(position_model, docs, seq_len=seq_len, eod_id=EOD, stride=stride, batch_size=3)[0]
    # EOD (id 10) is a target too: it is != 0, so every target follows the same formula
    return nll


@pytest.mark.parametrize("seq_len,stride,positions", [
    (4, None, [0, 1, 2, 3, 0, 1, 2, 3, 0]),  # non-overlapping: context resets every 4 targets
    (4, 2, [0, 1, 2, 3, 2, 3, 2, 3, 3]),     # sliding: each later target sees at least 4 - 2 + 1 tokens
    (4, 4, [0, 1, 2, 3, 0, 1, 2, 3, 3]),     # stride = seq_len: like non-overlapping, but the last window
                                             # reaches back for a full seq_len of context
    (4, 1, [0, 1, 2, 3, 3, 3, 3, 3, 3]),     # stride 1: full context for every token
    (16, None, list(range(9))),              # one window holds everything
])
def test_window_and_stride_give_documented_context(seq_len, stride, positions):
    assert contexts(seq_len, stride, 9) == pytest.approx(sum(nll_at(p) for p in positions), rel=1e-12)


def test_windows_cover_each_target_once():
    for n in range(2, 30):
        for seq_len in (1, 3, 8):
            for stride in (None, 1, 2, seq_len):
                if stride is not None and stride > seq_len:
                    continue
                scored = []
                for w in windows(n, seq_len, stride):
                    assert w.end - w.start - 1 <= seq_len
                    scored.extend(range(w.score_from, w.end))
                assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


class _Captured(Exception):
    pass


@pytest.mark.parametrize("layout", ["separate", "packed"])
def test_data_parallel_sums_equal_single_process_exactly(layout):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V))
    fn = lambda ids: net(ids).float()  # float32 on purpose: batches must be computed identically
    docs = docs_from([7, 3, 20, 1, 9, 14, 2])
    kw = dict(seq_len=5, eod_id=EOD, layout=layout, batch_size=2, stride=3)
    single = score_documents(fn, docs, **kw)
    shards = []

    def capture(mine):
        shards.append(mine)
        raise _Captured

    for r in range(3):
        with pytest.raises(_Captured):
            score_documents(fn, docs, rank=r, world_size=3, all_gather=capture, **kw)
    assert all(shards) and sum(map(len, shards)) > len(shards[0])
    for r in range(3):  # every rank reduces the gathered parts in window order: identical, and equal to 1 process
        assert score_documents(fn, docs, rank=r, world_size=3, all_gather=lambda mine: shards, **kw) == single
    with pytest.raises(RuntimeError, match="cover"):
        score_documents(fn, docs, rank=0, world_size=3, all_gather=lambda mine: [mine], **kw)
