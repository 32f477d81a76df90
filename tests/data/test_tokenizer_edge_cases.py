"""The SentencePiece wrapper at its edges: Unicode that round-trips, text that is not valid Unicode, ids outside
the vocabulary and model files that are not SentencePiece models."""

import pytest

from pretrain.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return Tokenizer(tokenizer_model)


@pytest.mark.parametrize("text", [
    "emoji 😀👍🏽 and a family 👨‍👩‍👧", "漢字かな交じり文", "e\u0301 n\u0303 combining",
    "nul\x00inside\x00",
    "meta\u2581space\u2581\u2581", "\ufeffbom", "\U0010ffff\U0001f600", "tabs\t\r\nand  spaces ", " ",
])
def test_unicode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff"])
def test_a_lone_surrogate_is_a_clear_error(tok, text):
    with pytest.raises(ValueError, match="lone surrogate .* at position"):
        tok.encode(text)
    with pytest.raises(ValueError, match="lone surrogate .* at position"):
        tok.encode_batch(["fine", text])


def test_an_id_outside_the_vocabulary_is_named(tok):
    with pytest.raises(IndexError, match=f"id {tok.vocab_size} .*vocab_size {tok.vocab_size}"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(IndexError, match="id -1 "):
        tok.decode([-1])


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_a_corrupt_model_file_is_named(tok, tokenizer_model, tmp_path, damage):
    good = open(tokenizer_model, "rb").read()
    data = {"garbage": b"this is not a model", "empty": b"", "truncated": good[:len(good) // 2]}[damage]
    bad = tmp_path / "broken.model"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=f"{bad}: .*not a SentencePiece model"):
        Tokenizer(bad)
