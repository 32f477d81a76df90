"""The lm_eval adapter's scores against brute-force float64 forwards: token boundaries with real SentencePiece
models, empty context and continuation, contexts and continuations past ``max_length``, batching order, a model
vocabulary padded past the tokenizer's, rolling windows."""

import io
import random
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch

from pretrain.config import from_dict
from pretrain.data.tokenizer import Tokenizer
from pretrain.evaluation.lm_eval_adapter import LMEvalMethods
from pretrain.models import ModelConfig, build_model
from test_lm_eval_adapter import CharTokenizer

WORDS = "the cat sat on a mat and dog ran to its home while birds sang over green hills near quiet rivers".split()


def req(*args):
    return SimpleNamespace(args=args)


def train_sentencepiece(**options) -> Tokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice([",", ".", "!"]) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", pad_id=0,
                                   unk_id=1, bos_id=2, eos_id=3, minloglevel=2, **options)
    return Tokenizer(model_proto=buf.getvalue())


@pytest.fixture(scope="module")
def dummy_prefix_tokenizer():
    """SentencePiece's defaults (NFKC, a dummy prefix space, extra whitespace removed): "any other .model"."""
    return train_sentencepiece(vocab_size=80)


@pytest.fixture(scope="module")
def lossless_tokenizer():
    """The settings of data_prep/train_tokenizer.py: identity, no dummy prefix, whitespace kept, byte fallback."""
    return train_sentencepiece(vocab_size=300, normalization_rule_name="identity", add_dummy_prefix=False,
                               remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, byte_fallback=True)


def tiny_model(vocab_size: int, max_seq_len: int = 64):
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, dict(vocab_size=vocab_size, d_model=32, layers=["short_conv", "rebased"], mlp="none",
                                      max_seq_len=max_seq_len, rebased={"num_heads": 2, "feature_dim": 8}))
    return build_model(cfg).double().eval()


@torch.no_grad()
def brute_force(model, stream: list[int], first_target: int, max_length: int) -> tuple[float, bool]:
    """Log-probability of ``stream[first_target:]`` and whether each target is the argmax: the targets in chunks
    of ``max_length`` from the end, each chunk predicted by one full forward over the ``max_length`` tokens before
    its last target."""
    total, greedy, end = 0.0, True, len(stream)
    while end > first_target:
        first = max(first_target, end - max_length)
        start = max(0, end - 1 - max_length)
        logp = torch.log_softmax(model(torch.tensor([stream[start:end - 1]]))[0].double(), -1)
        for p in range(first, end):
            total += logp[p - 1 - start, stream[p]].item()
            greedy &= bool(logp[p - 1 - start].argmax() == stream[p])
        end = first
    return total, greedy


@pytest.mark.parametrize("which, context, continuation", [
    ("dummy_prefix", "the cat,", "sat"),  # no space: alone, "sat" would get the dummy prefix ("▁sat")
    ("dummy_prefix", "the cat sat on", " a mat"),
    ("lossless", "the cat ", "sat"),  # the trailing space goes with the continuation: "▁sat", not "▁" + "sat"
    ("lossless", "the cat sat on", " a mat"),
])
def test_continuation_is_split_from_the_joint_encoding(request, which, context, continuation):
    tok = request.getfixturevalue(f"{which}_tokenizer")
    lm = LMEvalMethods(tiny_model(tok.vocab_size), tok)
    (logp, greedy), = lm.loglikelihood([req(context, continuation)])
    # lm_eval's convention: trailing whitespace moves to the continuation, the pair is encoded as one text and
    # split where the context's own encoding ends
    stripped = context.rstrip()
    whole = tok.encode(stripped + context[len(stripped):] + continuation)
    ctx = tok.encode(stripped)
    assert whole[:len(ctx)] == ctx  # the cases are chosen so that the split is clean
    expected = brute_force(lm.model, [tok.eod_id] + whole, 1 + len(ctx), lm.max_length)
    assert logp == pytest.approx(expected[0], rel=1e-9)
    assert greedy == expected[1]


@pytest.mark.parametrize("which", ["dummy_prefix", "lossless"])
def test_a_token_across_the_boundary_keeps_the_whole_continuation(request, which):
    """"the ca" + "t sat": the joint encoding merges "cat", so splitting it would drop the "t" (with the dummy-prefix
    model, the whole continuation: a score of 0, as if certain); the continuation is encoded on its own instead."""
    tok = request.getfixturevalue(f"{which}_tokenizer")
    lm = LMEvalMethods(tiny_model(tok.vocab_size), tok)
    ctx = tok.encode("the ca")
    assert tok.encode("the cat sat")[:len(ctx)] != ctx
    (logp, greedy), = lm.loglikelihood([req("the ca", "t sat")])
    stream = [tok.eod_id] + ctx + tok.encode("t sat")
    assert (logp, greedy) == pytest.approx(brute_force(lm.model, stream, 1 + len(ctx), lm.max_length), rel=1e-9)


def test_empty_context_starts_from_eod(lossless_tokenizer):
    tok = lossless_tokenizer
    lm = LMEvalMethods(tiny_model(tok.vocab_size), tok)
    (logp, greedy), = lm.loglikelihood([req("", "the cat")])
    assert (logp, greedy) == pytest.approx(brute_force(lm.model, [tok.eod_id] + tok.encode("the cat"), 1, 64),
                                           rel=1e-9)


def test_empty_continuation_scores_zero_and_is_greedy():
    lm = LMEvalMethods(tiny_model(27), CharTokenizer())
    assert lm.loglikelihood([req("abc", "")]) == [(0.0, True)]


@pytest.mark.parametrize("context, continuation", [
    ("abcdefghijklmnopqrst", "uvw"),  # context past max_length: cut on the left, the continuation whole
    ("abc", "defghijklmnopqrstuvwxy"),  # continuation past max_length: scored in windows of max_length
    ("", "abcdefghijklmnopq"),
])
def test_long_inputs_against_brute_force(context, continuation):
    lm = LMEvalMethods(tiny_model(27), CharTokenizer(), max_length=8)
    (logp, greedy), = lm.loglikelihood([req(context, continuation)])
    stream = [0] + CharTokenizer().encode(context + continuation)
    assert (logp, greedy) == pytest.approx(brute_force(lm.model, stream, 1 + len(context), 8), rel=1e-9)


def test_batched_results_come_back_in_request_order():
    rng = random.Random(1)
    pairs = [("".join(rng.choice("abcdefgh") for _ in range(rng.randrange(0, 14))),
              "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(1, 12)))) for _ in range(11)]
    lm = LMEvalMethods(tiny_model(27), CharTokenizer(), max_length=8, batch_size=3)
    got = lm.loglikelihood([req(c, x) for c, x in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        stream = [0] + CharTokenizer().encode(context + continuation)
        expected = brute_force(lm.model, stream, 1 + len(context), 8)
        assert logp == pytest.approx(expected[0], rel=1e-9)
        assert greedy == expected[1]


class PaddedVocabModel(torch.nn.Module):
    """Logits over 8 ids for a tokenizer of 5: padding id 7 always highest, then id 2."""

    config = SimpleNamespace(max_seq_len=16)

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, 8, dtype=torch.float64)
        logits[..., 2], logits[..., 7] = 1.0, 5.0
        return logits


def test_greedy_is_judged_over_the_tokenizers_ids():
    """Greedy decoding never picks a padding id of the model's vocabulary (generate_until neither), so a
    continuation of the best real ids is the greedy one."""
    tok = SimpleNamespace(eod_id=0, vocab_size=5, encode=lambda text: [2] * len(text))
    (logp, greedy), = LMEvalMethods(PaddedVocabModel(), tok).loglikelihood([req("x", "yy")])
    assert greedy
    assert logp == pytest.approx(2 * (1.0 - torch.logsumexp(torch.tensor([0.0] * 6 + [1.0, 5.0]), 0).item()))


def test_rolling_sums_non_overlapping_windows():
    """Windows of max_length targets; the first is predicted from EOD on, each later one from the last token of the
    window before (no more context), the last window may be shorter."""
    text = "thequickbrownfoxjumpsoverthelazydog"  # 35 tokens: windows of 8, 8, 8, 8, 3 targets
    lm = LMEvalMethods(tiny_model(27), CharTokenizer(), max_length=8, batch_size=2)
    (total,) = lm.loglikelihood_rolling([req(text)])
    stream = [0] + CharTokenizer().encode(text)
    expected = 0.0
    for start in range(0, len(stream) - 1, 8):
        window = stream[start:start + 9]
        logp = torch.log_softmax(lm.model(torch.tensor([window[:-1]]))[0], -1)
        expected += logp.gather(1, torch.tensor(window[1:])[:, None]).sum().item()
    assert total == pytest.approx(expected, rel=1e-9)
