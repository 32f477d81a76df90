"""The lm_eval adapter's methods, without lm_eval installed."""

from types import SimpleNamespace

import pytest
import torch

from pretrain.config import from_dict
from pretrain.evaluation.lm_eval_adapter import LMEvalMethods, make_lm_eval_model
from pretrain.models import ModelConfig, build_model


class CharTokenizer:
    eod_id = 0

    def encode(self, text):
        return [ord(c) - 96 for c in text]  # 'a' -> 1 ... 'z' -> 26

    def decode(self, ids):
        return "".join(chr(i + 96) for i in ids)


@pytest.fixture
def adapter():
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, dict(vocab_size=27, d_model=32, layers=["short_conv", "rebased"], mlp="none",
                                      max_seq_len=64, rebased={"num_heads": 2, "feature_dim": 8}))
    return LMEvalMethods(build_model(cfg).double(), CharTokenizer())


def req(*args):
    return SimpleNamespace(args=args)


def test_loglikelihood_matches_manual_sum(adapter):
    (logp, greedy), = adapter.loglikelihood([req("abc", "de")])
    ids = torch.tensor([[0, 1, 2, 3, 4]])  # EOD a b c d -> predicts a b c d e
    logprobs = torch.log_softmax(adapter.model(ids)[0], -1)
    assert logp == pytest.approx((logprobs[3, 4] + logprobs[4, 5]).item(), rel=1e-12)
    assert greedy == bool(logprobs[3].argmax() == 4 and logprobs[4].argmax() == 5)


def test_rolling_is_total_loglikelihood_of_the_text(adapter):
    text = "thequickbrownfox"
    (total,) = adapter.loglikelihood_rolling([req(text)])
    ids = torch.tensor([[0] + CharTokenizer().encode(text)])
    logprobs = torch.log_softmax(adapter.model(ids[:, :-1])[0], -1)
    assert total == pytest.approx(logprobs.gather(1, ids[0, 1:, None]).sum().item(), rel=1e-12)


def test_generate_until_follows_greedy_and_stops(adapter):
    (free,) = adapter.generate_until([req("ab", {"max_gen_toks": 6})])
    assert len(free) <= 6
    expected = adapter.model.generate(torch.tensor([[0, 1, 2]]), max_new_tokens=6, temperature=0)[0, 3:]
    assert free == CharTokenizer().decode([i for i in expected.tolist()][:len(free)])
    if len(free) >= 2:
        (stopped,) = adapter.generate_until([req("ab", {"until": [free[1]], "max_gen_toks": 6})])
        assert stopped == free.split(free[1])[0]


def test_lm_eval_is_optional():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lm_eval"):
            make_lm_eval_model("nowhere", "nothing.model")


def test_generate_until_ignores_an_empty_stop_string(adapter):
    (free,) = adapter.generate_until([req("ab", {"max_gen_toks": 6})])
    assert adapter.generate_until([req("ab", {"until": [""], "max_gen_toks": 6})]) == [free]
    assert adapter.generate_until([req("ab", {"until": "", "max_gen_toks": 6})]) == [free]
