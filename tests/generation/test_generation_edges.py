"""Edge cases of generation: sampling at its limits (ties, tiny temperatures), caches at their capacity, and the
CLI's streaming and prompt files. The reference is the model's plain full-sequence forward (fp32, CPU)."""

import io
import json

import pytest
import torch

from pretrain.generation.decoder import generate
from pretrain.generation.sampling import Sampling, choose, filter_logits
from test_decoder import LAYOUTS, greedy_by_full_forward, model_for


def draws(logits, sampling, n=100):
    g = torch.Generator().manual_seed(0)
    return {int(choose(logits, sampling, g)) for _ in range(n)}


def test_top_k_keeps_exactly_k_tokens_on_ties():
    """top_k=1 is greedy also when the largest logit is tied (greedy takes the first of them)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert draws(logits, Sampling(temperature=1.0, top_k=1)) == {int(logits.argmax())} == {1}
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    assert draws(torch.zeros(1, 7), Sampling(temperature=1.0, top_p=1e-9)) == {0}


def test_top_k_one_equals_greedy_with_a_flat_model():
    model = model_for(LAYOUTS["rebased"])
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit ties
    prompts = [[1, 2, 3], [9]]
    assert generate(model, prompts, 4, sampling=Sampling(temperature=1.0, top_k=1, seed=0)) == \
        generate(model, prompts, 4) == [[0] * 4] * 2


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 1e-300])
def test_a_tiny_temperature_samples_the_top_token(temperature):
    logits = torch.tensor([[50.0, 10.0, -3.0], [-1.0, 2.0, 1.9]])
    assert choose(logits, Sampling(temperature=temperature), torch.Generator().manual_seed(0)).tolist() == [0, 1]


def test_a_sliding_window_cache_shorter_than_its_window_refuses_more_positions():
    """init_cache(max_len) below the window gives the ring max_len slots: up to max_len positions the logits are the
    full forward's, one more is an error (it would overwrite keys the window still sees)."""
    model = model_for(["sliding_window"], sliding_window={"num_heads": 2, "window": 16})
    ids = torch.tensor([[5, 9, 2, 7, 7, 1, 30, 4]])
    cache = model.init_cache(1, 6)
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        for t in (4, 5):
            torch.testing.assert_close(model(ids[:, t:t + 1], cache=cache)[0, -1], model(ids[:, :t + 1])[0, -1])
        with pytest.raises(ValueError, match="max_len=6"):
            model(ids[:, 6:7], cache=cache)


def test_vocab_size_keeps_padding_ids_out():
    """A model's vocabulary may be padded past its tokenizer's (50304 for a 50k tokenizer); ids past the tokenizer
    have no text, so they are never chosen."""
    model = model_for(LAYOUTS["rebased"])
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every id equally likely: 13 of the 53 are padding
    out = generate(model, [[1, 2, 3], [9]], 30, sampling=Sampling(temperature=1.0, seed=0), vocab_size=40)
    assert max(max(row) for row in out) < 40 and len(set(out[0] + out[1])) > 10
    with pytest.raises(ValueError, match="vocab_size=54"):
        generate(model, [[1]], 2, vocab_size=54)


def test_learned_positions_limit_is_checked_before_decoding():
    """Positions 0..max_seq_len-1 exist: a prompt of 6 with max_seq_len 8 takes 3 new tokens (the last one is not
    fed back); a 4th is refused at once, before any step is decoded or streamed."""
    model = model_for(LAYOUTS["rebased"], learned_positions=True, max_seq_len=8)
    prompt = [1, 2, 3, 4, 5, 6]
    assert generate(model, [prompt, [7]], 3) == [greedy_by_full_forward(model, p, 3) for p in (prompt, [7])]
    streamed = []
    with pytest.raises(ValueError, match="max_new_tokens=4 need 9 positions, more than max_seq_len=8"):
        generate(model, [prompt, [7]], 4, on_tokens=streamed.append)
    assert streamed == []


def test_bad_prompts_and_lengths_are_named():
    model = model_for(LAYOUTS["short_conv"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, [[1]], -1)
    vocab = model.config.vocab_size
    for prompts, message in [([[1, vocab]], f"prompt 0 holds token id {vocab}, outside the model's vocabulary"),
                             ([[2], [-1]], "prompt 1 holds token id -1"), ([[1.5]], "prompt 0 holds 1.5"),
                             ([[True]], "prompt 0 holds True"), ([], "non-empty list"), ("ab", "non-empty list"),
                             ([3], "prompt 0 must be a list of token ids, got int"),
                             (torch.ones(2, 3), "must be \\[batch, length\\] token ids")]:
        with pytest.raises(ValueError, match=message):
            generate(model, prompts, 2)
    for bad in (2.0, True):
        with pytest.raises(ValueError, match="must be an integer >= 0"):
            generate(model, [[1]], bad)


def test_prompts_as_a_tensor_or_numpy_ids_and_one_eos_id():
    import numpy as np

    model = model_for(LAYOUTS["rebased"])
    expected = generate(model, [[1, 2, 3], [4, 5, 6]], 3)
    assert generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 3) == expected
    assert generate(model, [np.array([1, 2, 3]), (4, 5, 6)], 3) == expected
    first = expected[0][0]
    assert generate(model, [[1, 2, 3]], 3, eos_ids=first) == [[first]]
    # a tensor or numpy ids (a set of 0-d tensors would never match a token), and None for none
    assert generate(model, [[1, 2, 3]], 3, eos_ids=torch.tensor([first])) == [[first]]
    assert generate(model, [[1, 2, 3]], 3, eos_ids=[torch.tensor(first)]) == [[first]]
    assert generate(model, [[1, 2, 3]], 3, eos_ids=np.array([first])) == [[first]]
    assert generate(model, [[1, 2, 3]], 3, eos_ids=None) == expected[:1]
    for bad in ([1.5], torch.tensor([1.0]), ["7"]):
        with pytest.raises(ValueError, match="eos_ids must hold integer token ids"):
            generate(model, [[1, 2, 3]], 3, eos_ids=bad)


@pytest.mark.parametrize("kwargs,message", [
    ({"top_k": 2.5}, "top_k=2.5 must be an integer"), ({"top_k": True}, "top_k=True"),
    ({"temperature": True}, "temperature=True"), ({"temperature": "1"}, "temperature='1'"),
    ({"top_p": "0.5"}, "top_p='0.5'"), ({"seed": 1.5}, "seed=1.5 must be an integer"),
    ({"seed": 2 ** 64}, "must be an integer in \\[0, 2\\*\\*64\\)"), ({"seed": -1}, "seed=-1"),
])
def test_sampling_settings_of_the_wrong_type_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


class ByteTokenizer:
    """Token i is the bytes PIECES[i]; decoding replaces an incomplete or invalid UTF-8 sequence with U+FFFD (as
    SentencePiece's byte fallback does)."""

    eod_id = 0
    PIECES = [b"", b"ab\n", b"\ncd", b"x", b"\xc3", b"y", b"\xa9", b"st", b"op"]

    def decode(self, ids):
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def stream(tokens, stops):
    from pretrain.generate import Streamer, cut_at_stop

    out, tok = io.StringIO(), ByteTokenizer()
    streamer = Streamer(tok, stops, out=out)
    for t in tokens:
        streamer([t])
    final = cut_at_stop(tok.decode(tokens), stops)[0]  # what the CLI records
    streamer.finish(final)
    return out.getvalue(), final


@pytest.mark.parametrize("tokens,stops", [
    ([3, 1, 2], ["\n\n"]),  # the stop's first "\n" ends one token, its second starts the next
    ([3, 7, 8], ["stop"]),  # a stop split as "st" + "op"
    ([3, 4, 5, 3], []),  # an invalid byte in the middle: the text after it still streams
    ([3, 4, 6, 5], []),  # a character in two tokens
    ([3, 4], []),  # cut in the middle of a character
])
def test_the_stream_is_the_final_text(tokens, stops):
    """The streamed text is the continuation the CLI records, nothing more (no partial stop string) and nothing
    less (no text held back for good)."""
    streamed, final = stream(tokens, stops)
    assert streamed == final


def test_prompt_files_split_at_newlines_only_and_errors_name_file_and_line(tmp_path):
    from pretrain.generate import read_prompts

    text = tmp_path / "p.txt"
    text.write_text("one\u2028still one\x0c\n\n  \ntwo\r\nthree", encoding="utf-8")
    assert read_prompts(str(text)) == ["one\u2028still one\x0c", "two", "three"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n\n" + '{"prompt": 5}\n',
                     encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:3: 'prompt' must be a string, not int"):
        read_prompts(str(jsonl))
    jsonl.write_text('{"prompt": "a"}\n[1]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected a JSON object"):
        read_prompts(str(jsonl))
    text.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"p\.txt: not UTF-8"):
        read_prompts(str(text))


class CharTokenizer:
    """EOD is 0, 'a'..'z' are 1..26; ids from ``vocab_size`` on have no text."""

    eod_id = 0

    def __init__(self, vocab_size: int = 27):
        self.vocab_size = vocab_size

    def encode(self, text):
        return [ord(c) - 96 for c in text]

    def decode(self, ids):
        if any(i >= self.vocab_size for i in ids):
            raise IndexError(f"id {max(ids)} has no text")
        return "".join(chr(i + 96) for i in ids)


def req(context, **kwargs):
    return type("Request", (), {"args": (context, kwargs)})()


def test_lm_eval_generate_until_keeps_the_context_that_fits():
    """With learned positions (max_seq_len 16) a long context keeps its last 16 - max_gen_toks tokens, as lm_eval
    does, instead of failing: the text equals greedy decoding of that tail."""
    from pretrain.evaluation.lm_eval_adapter import LMEvalMethods

    model = model_for(LAYOUTS["hybrid"], vocab_size=27, learned_positions=True, max_seq_len=16,
                      tie_embeddings=False)  # untied: the continuation depends on how much context is kept
    adapter = LMEvalMethods(model, CharTokenizer())
    context = "thequickbrownfoxjumps"  # 22 tokens with EOD
    (text,) = adapter.generate_until([req(context, max_gen_toks=5)])
    tail = ([0] + CharTokenizer().encode(context))[-11:]
    expected = greedy_by_full_forward(model, tail, 5)
    assert 0 not in expected and text == CharTokenizer().decode(expected)
    # beside requests of other lengths (a request for no tokens gets none), in the requests' order
    mixed = [req(context, max_gen_toks=5), req(context, max_gen_toks=0), req("ab", max_gen_toks=2)]
    assert adapter.generate_until(mixed) == [text, "", adapter.generate_until([mixed[2]])[0]]


def test_lm_eval_generate_until_never_yields_padding_ids():
    from pretrain.evaluation.lm_eval_adapter import LMEvalMethods

    model = model_for(LAYOUTS["short_conv"], vocab_size=27, tie_embeddings=False)
    with torch.no_grad():  # ids 25 and 26 (padding for a 20-id tokenizer) get ±|h·v|, every other id 0
        model.lm_head.weight.zero_()
        model.lm_head.weight[25] = 10.0
        model.lm_head.weight[26] = -10.0
    adapter = LMEvalMethods(model, CharTokenizer(vocab_size=20))
    assert adapter.generate_until([req("abc", max_gen_toks=4)]) == [""]  # among ids < 20 all tie: EOD first


@pytest.mark.parametrize("name", ["rebased", "attention", "sliding_window"])
def test_rows_that_end_at_the_first_token_stay_ended(name):
    """EOS as some rows' first token: those rows hold just it (also with max_new_tokens 1), the other rows go on
    exactly as the full forward, and the stream shows None for the ended rows from the next step on."""
    model = model_for(LAYOUTS[name])
    prompts = [[5, 9, 2, 7], [3], [8, 8, 14]]
    firsts = [greedy_by_full_forward(model, p, 1)[0] for p in prompts]
    eos = firsts[1]
    steps = []
    out = generate(model, prompts, 6, eos_ids=(eos,), on_tokens=steps.append)
    for p, first, tokens in zip(prompts, firsts, out):
        if first == eos:
            assert tokens == [eos]
        else:
            ref = greedy_by_full_forward(model, p, 6)
            assert tokens == (ref[:ref.index(eos) + 1] if eos in ref else ref)
    assert all(step[1] is None for step in steps[1:]) and len(steps) == max(len(t) for t in out)
    assert generate(model, prompts, 1, eos_ids=(eos,)) == [[t] for t in firsts]
    assert generate(model, prompts, 0) == [[], [], []]


def test_generation_runs_without_dropout_and_keeps_the_models_mode():
    """A model left in train mode (embedding dropout 0.5) decodes as in eval mode, and is in train mode after."""
    model = model_for(LAYOUTS["rebased"], embed_dropout=0.5)
    prompts = [[1, 2, 3, 4], [7, 8]]
    expected = generate(model, prompts, 6)
    model.train()
    assert generate(model, prompts, 6) == expected
    assert model.training
    assert expected[0] == greedy_by_full_forward(model.eval(), prompts[0], 6)


def test_cache_buffers_are_every_tensor_a_step_updates_and_keep_their_addresses():
    """``ModelCache.buffers()`` lists each tensor a one-token step writes (what a compiled step marks as a static
    address): a step changes no tensor outside that list and leaves each listed one at its address."""
    model = model_for(LAYOUTS["hybrid"])
    cache = model.init_cache(2, 16)
    with torch.no_grad():
        model(torch.tensor([[5, 9, 2], [7, 1, 4]]), cache=cache)
        buffers = cache.buffers()
        before = [(b.data_ptr(), b.clone()) for b in buffers]
        model(torch.tensor([[3], [8]]), cache=cache)
    assert {id(b) for b in buffers} == {id(b) for b in cache.buffers()}
    assert all(b.data_ptr() == ptr for b, (ptr, _) in zip(buffers, before))
    assert all(not torch.equal(b, old) for b, (_, old) in zip(buffers, before))  # each one is a step's output
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert kinds == {"LinearAttentionCache", "ConvCache", "KVCache"}
    # seen, then per layer: kv and z; a conv state; k, v and slot_pos
    expected = 1 + sum({"LinearAttentionCache": 2, "ConvCache": 1, "KVCache": 3}[type(l).__name__]
                       for l in cache.layers)
    assert len(buffers) == expected


def test_a_seeded_prompt_samples_the_same_whatever_its_batch_mates():
    """Row r of a seeded call draws from its own stream (seed, r): the other prompts (their number, content and
    lengths, when they stop) do not change its sample; the same prompt in two rows still gets two samples."""
    model = model_for(LAYOUTS["hybrid"])
    with torch.no_grad():
        model.lm_head.weight.div_(20)  # flat logits: every draw matters
    sampling = Sampling(temperature=1.0, seed=11)
    alone = generate(model, [[1, 2, 3]], 12, sampling=sampling)[0]
    mates = generate(model, [[1, 2, 3], [9], [4, 4, 4, 4, 4, 4, 7]], 12, sampling=sampling,
                     should_stop=lambda row, toks: row > 0 and len(toks) == 2 * row)
    assert mates[0] == alone and [len(m) for m in mates] == [12, 2, 4]
    second = generate(model, [[30, 31], [9]], 12, sampling=sampling)[1]
    assert second == generate(model, [[2], [9]], 12, sampling=sampling)[1]
    twins = generate(model, [[1, 2, 3]] * 2, 12, sampling=sampling)
    assert twins[0] == alone and twins[1] != twins[0]


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_draws_follow_the_distribution(per_row):
    """The inverse-CDF draw picks each token with its probability (20000 draws; a token of probability 0 never)."""
    from pretrain.generation.sampling import row_uniforms

    probs = torch.tensor([0.5, 0.3, 0.0, 0.2])
    logits = probs.log().expand(20000, 4)
    gen = row_uniforms(0, 20000, 1)[:, 0] if per_row else torch.Generator().manual_seed(0)
    counts = torch.bincount(choose(logits, Sampling(temperature=1.0), gen), minlength=4) / 20000
    assert counts[2] == 0
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="one per row"):
        choose(logits[:3], Sampling(temperature=1.0), row_uniforms(0, 2, 1)[:, 0])


def test_a_seeded_row_draws_a_prefix_of_a_longer_calls_draws():
    """A seeded row's draws do not depend on how many steps a call asks for: 12 new tokens begin with the 5."""
    from pretrain.generation.sampling import row_uniforms

    assert torch.equal(row_uniforms(3, 2, 50)[:, :7], row_uniforms(3, 2, 7))
    model = model_for(LAYOUTS["hybrid"])
    with torch.no_grad():
        model.lm_head.weight.div_(20)
    sampling = Sampling(temperature=1.0, seed=2)
    assert generate(model, [[1, 2], [3]], 12, sampling=sampling)[1][:5] == \
        generate(model, [[1, 2], [3]], 5, sampling=sampling)[1]
