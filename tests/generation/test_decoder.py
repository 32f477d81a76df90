"""The batched decoder: greedy tokens equal the full forward's argmax at every step (every mixer), prompts of
different lengths in one batch equal each prompt alone, sampling filters, seeds, EOS and stop conditions."""

import pytest
import torch

from pretrain.config import from_dict
from pretrain.generation.decoder import DecodeStep, generate, prefill
from pretrain.generation.sampling import Sampling, choose, filter_logits
from pretrain.models import ModelConfig, build_model

LAYOUTS = {
    "rebased": ["short_conv", "rebased"],
    "based": ["based"],
    "short_conv": ["short_conv"],
    "sliding_window": ["sliding_window", "short_conv"],
    "attention": ["attention"],
    "hybrid": ["short_conv", "rebased", "sliding_window", "based", "attention"],
}


def model_for(layers, **overrides):
    base = dict(vocab_size=53, d_model=32, layers=list(layers), mlp="swiglu", mlp_hidden=48, max_seq_len=64,
                rebased={"num_heads": 2, "feature_dim": 16}, based={"num_heads": 2, "feature_dim": 16},
                attention={"num_heads": 2}, sliding_window={"num_heads": 2, "window": 5})
    base.update(overrides)
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, base)).eval()
    with torch.no_grad():  # sharper logits than the init's: greedy choices are then far from ties
        model.lm_head.weight.mul_(20)
    return model


def greedy_by_full_forward(model, prompt: list[int], new: int) -> list[int]:
    """The reference: the whole sequence through the model (no cache) for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("learned_positions", [False, True])
@pytest.mark.parametrize("name", LAYOUTS)
def test_greedy_equals_full_forward_for_every_mixer(name, learned_positions):
    model = model_for(LAYOUTS[name], learned_positions=learned_positions)
    prompts = [[5, 9, 2, 7, 7, 1, 30, 4, 12], [3], [8, 8, 14, 40, 2, 6]]  # windows of 5: longer and shorter
    out = generate(model, prompts, 12)
    for prompt, tokens in zip(prompts, out):
        assert tokens == greedy_by_full_forward(model, prompt, 12)


def test_compiled_step_gives_the_same_tokens():
    """``compile=True`` runs the step through torch.compile: the same greedy tokens, and one compilation serves
    every step (no recompiling on the per-step counters)."""
    import torch._dynamo

    model = model_for(LAYOUTS["hybrid"])
    prompts = [[5, 9, 2, 7, 7, 1, 30, 4, 12], [3], [8, 8, 14, 40, 2, 6]]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, prompts, 10, compile=True)
    assert compiled == generate(model, prompts, 10)


def test_packed_prompts_of_different_lengths_equal_each_prompt_alone():
    model = model_for(LAYOUTS["hybrid"])
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [7, 6, 5]]
    cache, logits = prefill(model, prompts, max_len=20)
    assert cache.seen.tolist() == [11, 1, 3] and cache.seen_tokens == 11
    for i, p in enumerate(prompts):
        with torch.no_grad():
            alone = model(torch.tensor([p]))[0, -1]
        torch.testing.assert_close(logits[i], alone, rtol=1e-5, atol=1e-5)
    # the rows then step on from their own positions
    step = DecodeStep(model, cache, cuda_graph=False)
    nxt = torch.tensor([3, 4, 5])
    with torch.no_grad():
        stepped = step(nxt)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + [int(nxt[i])]]))[0, -1]
            torch.testing.assert_close(stepped[i], alone, rtol=1e-5, atol=1e-5)
    assert cache.seen.tolist() == [12, 2, 4]


def test_attention_cache_must_hold_every_position():
    model = model_for(["attention"])
    cache, _ = prefill(model, [[1, 2, 3]], max_len=4)
    with torch.no_grad():
        model(torch.tensor([[4]]), cache=cache)
        with pytest.raises(ValueError, match="max_len=4"):
            model(torch.tensor([[5]]), cache=cache)


def test_eos_and_stop_end_rows_independently():
    model = model_for(LAYOUTS["rebased"])
    prompts = [[1, 2, 3], [4, 5], [6]]
    free = generate(model, prompts, 10)
    eos = free[0][3]  # row 0 stops at its 4th token (and keeps it); other rows stop only if they meet it too
    seen_steps = []
    out = generate(model, prompts, 10, eos_ids=(eos,), should_stop=lambda row, toks: row == 2 and len(toks) == 2,
                   on_tokens=seen_steps.append)
    assert out[0] == free[0][:free[0].index(eos) + 1]
    assert out[2] == free[2][:2]
    assert out[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])
    assert all(step[2] is None for step in seen_steps[2:]) and seen_steps[0] == [t[0] for t in out]


def test_sampling_is_seeded_and_filters_apply():
    model = model_for(LAYOUTS["hybrid"])
    with torch.no_grad():
        model.lm_head.weight.div_(20)  # flat logits: samples differ from greedy
    prompts = [[1, 2, 3], [9]]
    a = generate(model, prompts, 8, sampling=Sampling(temperature=1.0, seed=3))
    b = generate(model, prompts, 8, sampling=Sampling(temperature=1.0, seed=3))
    c = generate(model, prompts, 8, sampling=Sampling(temperature=1.0, seed=4))
    assert a == b and a != c
    greedy = generate(model, prompts, 8)
    assert generate(model, prompts, 8, sampling=Sampling(temperature=1.0, top_k=1, seed=5)) == greedy
    assert generate(model, prompts, 8, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=5)) == greedy


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]  # 0.5 reaches p
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.86)) == [True, True, True, True, False]
    assert kept(filter_logits(logits[:, [3, 0, 4, 1, 2]], top_p=0.6)) == [False, True, False, True, False]
    g = torch.Generator().manual_seed(0)
    draws = {int(choose(logits, Sampling(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert draws == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_equal_eager_steps():
    model = model_for(LAYOUTS["hybrid"]).cuda()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9]]
    eager = generate(model, prompts, 20, cuda_graph=False)
    graphed = generate(model, prompts, 20, cuda_graph=True)
    assert graphed == eager


def test_learned_positions_end_at_max_seq_len():
    model = model_for(LAYOUTS["rebased"], learned_positions=True, max_seq_len=8)
    cache, _ = prefill(model, [[1, 2, 3, 4, 5, 6]], max_len=8)
    with torch.no_grad():
        model(torch.tensor([[7, 8]]), cache=cache)
        with pytest.raises(ValueError, match="position 8 exceeds max_seq_len=8"):
            model(torch.tensor([[9]]), cache=cache)


def cache_buffers(cache) -> dict[str, torch.Tensor]:
    """Every tensor the cache holds, by layer and field."""
    out = {}
    for i, layer in enumerate(cache.layers):
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                out[f"{i}.{name}"] = value
    return out


@pytest.mark.parametrize("name", ["rebased", "based", "sliding_window"])
def test_decoding_state_does_not_grow_with_the_prompt(name):
    """Without full attention the state has one size whatever the prompt's length, and the decoding steps update
    the same buffers in place (no allocation per token)."""
    model = model_for(LAYOUTS[name], max_seq_len=256)
    sizes = []
    for length in (6, 150):
        cache, _ = prefill(model, [[1 + i % 50 for i in range(length)], [1, 2, 3]], max_len=length + 8)
        buffers = cache_buffers(cache)
        assert buffers, "the cache holds no state"
        pointers = {k: t.data_ptr() for k, t in buffers.items()}
        with torch.no_grad():
            step = DecodeStep(model, cache, cuda_graph=False)
            for token in (4, 5, 6):
                step(torch.tensor([token, token]))
        assert {k: t.data_ptr() for k, t in cache_buffers(cache).items()} == pointers
        sizes.append({k: (tuple(t.shape), t.dtype) for k, t in buffers.items()})
    assert sizes[0] == sizes[1]


def test_full_attention_cache_holds_prompt_and_new_tokens():
    model = model_for(LAYOUTS["attention"], max_seq_len=256)
    cache, _ = prefill(model, [[1 + i % 50 for i in range(150)]], max_len=158)
    (k,) = [t for name, t in cache_buffers(cache).items() if name.endswith(".k")]
    assert k.shape[1] == 158
