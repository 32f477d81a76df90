"""Model zoo: incremental decoding equals the full forward, documents stay separate, flags and configs work."""

import functools
import itertools
from pathlib import Path

import pytest
import torch

import kernels
from pretrain.models import CausalLM, ModelConfig, build_model, count_parameters, flops_per_token, load_model_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


def small_config(layers, **overrides) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, layers=list(layers), mlp="swiglu", mlp_hidden=48,
                rebased={"num_heads": 2, "feature_dim": 8}, based={"num_heads": 2, "feature_dim": 8},
                attention={"num_heads": 2}, sliding_window={"num_heads": 2, "window": 5})
    base.update(overrides)
    from pretrain.config import from_dict
    return from_dict(ModelConfig, base)


def make_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # move γ/β away from their init so the test sees them
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta", "conv_bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def decode(model, ids, pieces, cache=None):
    """model over ids [B, T] in consecutive pieces (lengths) through one cache (made here unless given): the
    outputs concatenated."""
    cache = model.init_cache() if cache is None else cache
    out, start = [], 0
    with torch.no_grad():
        for n in pieces:
            out.append(model(ids[:, start:start + n], cache=cache))
            start += n
    return torch.cat(out, dim=1)


def assert_close(a, b, tol=1e-10):
    err = ((a - b).norm() / b.norm()).item()
    assert err <= tol, f"relative error {err:.3e} > {tol}"


MIXER_LAYOUTS = {
    "rebased": ["rebased"],
    "based": ["based"],
    "short_conv": ["short_conv"],
    "sliding_window": ["sliding_window"],
    "attention": ["attention"],
    "hybrid": ["short_conv", "rebased", "sliding_window", "based", "attention"],
}


@pytest.mark.parametrize("name", MIXER_LAYOUTS)
@pytest.mark.parametrize("learned_positions", [False, True])
def test_incremental_decoding_matches_full_forward(name, learned_positions):
    cfg = small_config(MIXER_LAYOUTS[name], learned_positions=learned_positions, max_seq_len=64)
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    full = model(ids)
    cache = model.init_cache()
    # prefill, then one token at a time, then a block of 3
    assert_close(decode(model, ids, [7] + [1] * 9 + [3], cache), full)
    assert cache.seen_tokens == 19 and cache.seen.tolist() == [19, 19]


def test_360m_layout_at_reduced_width_decodes_exactly():
    cfg = load_model_config(CONFIGS / "rebased_360m.yaml", [
        "vocab_size=61", "d_model=32", "mlp_hidden=40", "rebased.num_heads=2", "rebased.feature_dim=8",
        "sliding_window.num_heads=2", "sliding_window.window=6"])
    assert cfg.n_layer == 27
    assert [i for i, k in enumerate(cfg.layers) if k == "rebased"] == [1, 6, 11, 16, 21]
    assert [i for i, k in enumerate(cfg.layers) if k == "sliding_window"] == [2, 7, 12, 17, 22]
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 14))
    assert_close(decode(model, ids, [5] + [1] * 9), model(ids))


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in vars(layer).values()
               if isinstance(t, torch.Tensor))


def test_generation_memory_is_constant_for_recurrent_layers():
    cfg = small_config(["short_conv", "rebased", "based", "sliding_window"])
    model = make_model(cfg).float()
    cache = model.init_cache()
    sizes = []
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 8)), cache=cache)
        for _ in range(12):
            model(torch.randint(0, 97, (1, 1)), cache=cache)
            sizes.append(_cache_bytes(cache))
    assert len(set(sizes)) == 1, sizes  # the window (5) is a ring: nothing grows
    out = model.generate(torch.randint(0, 97, (2, 4)), max_new_tokens=6, temperature=0.8, top_k=5)
    assert out.shape == (2, 10)


def test_greedy_generation_follows_full_forward_argmax():
    cfg = small_config(["short_conv", "rebased", "attention"])
    model = make_model(cfg)
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=5, temperature=0)
    for t in range(5, 10):
        assert torch.equal(model(out[:, :t])[:, -1].argmax(-1), out[:, t])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decoding_steps_states_in_place_like_the_full_forward(backend, monkeypatch):
    """Decoding advances rebased/based states in place with kernels.linear_attention_step (torch, or the Triton
    kernel: on the CPU through the interpreter); the logits of every step equal the full forward's, and the
    state buffers are the ones the prefill made."""
    device = "cpu"
    if backend == "triton":
        pytest.importorskip("triton")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        monkeypatch.setattr(kernels, "linear_attention_step",
                            functools.partial(kernels.linear_attention_step, backend="triton"))
    heads = {"num_heads": 2, "feature_dim": 16}
    cfg = small_config(["short_conv", "rebased", "sliding_window", "based"], rebased=heads, based=heads)
    model = make_model(cfg).float().to(device)
    ids = torch.randint(0, 97, (3, 14)).to(device)
    cache = model.init_cache()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :6], cache=cache)]
        buffers = [cache.layers[i].kv for i in (1, 3)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(6, 14)]
    assert all(cache.layers[i].kv is b for i, b in zip((1, 3), buffers))
    assert_close(torch.cat(steps, 1), full, tol=1e-5)


def test_caches_are_for_inference_only():
    model = make_model(small_config(["short_conv", "rebased"]))
    with pytest.raises(ValueError, match="no_grad"):
        model(torch.randint(0, 97, (1, 3)), cache=model.init_cache())


@pytest.mark.parametrize("name", ["hybrid", "attention", "sliding_window"])
def test_packed_documents_equal_separate_forwards(name):
    cfg = small_config(MIXER_LAYOUTS[name], learned_positions=True, max_seq_len=64)
    model = make_model(cfg)
    lengths = [6, 1, 11, 4]
    docs = [torch.randint(0, 97, (1, n)) for n in lengths]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    packed = model(torch.cat(docs, dim=1), cu_seqlens=cu)
    separate = torch.cat([model(d) for d in docs], dim=1)
    assert_close(packed, separate)


@pytest.mark.parametrize("use_gamma,use_beta,normalize", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("norm_scope", ["per_head", "joint"])
def test_rebased_feature_map_options(use_gamma, use_beta, normalize, norm_scope):
    cfg = small_config(["short_conv", "rebased"], rebased={
        "num_heads": 2, "feature_dim": 8, "use_gamma": use_gamma, "use_beta": use_beta,
        "normalize": normalize, "norm_scope": norm_scope})
    model = make_model(cfg)
    ids = torch.randint(0, 97, (2, 9))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    fmap = model.blocks[1].mixer.feature_map
    assert (fmap.gamma is not None) == use_gamma and (fmap.beta is not None) == use_beta
    for p in (fmap.gamma, fmap.beta):
        if p is not None:
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert_close(decode(model, ids, [1] * 9), model(ids))


def test_norm_scopes_differ():
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64) * torch.linspace(0.5, 3, 4, dtype=torch.float64)[:, None]
    from pretrain.models.mixers import FeatureMap
    per_head = FeatureMap(4, 8, use_gamma=False, use_beta=False, normalize=True, norm_scope="per_head")(x)
    joint = FeatureMap(4, 8, use_gamma=False, use_beta=False, normalize=True, norm_scope="joint")(x)
    assert per_head.mean(-1).abs().max() < 1e-12
    assert joint.flatten(-2).mean(-1).abs().max() < 1e-12
    assert not torch.allclose(per_head, joint)


def test_value_heads_share_one_wide_value():
    cfg = small_config(["rebased"], rebased={"num_heads": 4, "feature_dim": 8, "value_heads": 1})
    model = make_model(cfg)
    mixer = model.blocks[0].mixer
    assert mixer.v_proj.out_features == 32 and mixer.o_proj.in_features == 4 * 32
    ids = torch.randint(0, 97, (1, 6))
    assert_close(decode(model, ids, [1] * 6), model(ids))


@pytest.mark.parametrize("kind", ["rebased", "based"])
def test_value_heads_of_floor_width_decode_like_the_full_pass(kind):
    """d_model 32 over 3 value heads: heads of 10, projections 30 wide (the original MQAR code's rule); the
    identity second sub-layer, separate q/k maps and embedding dropout (off in eval) keep the cache exact."""
    cfg = small_config([kind, "short_conv"], mlp="identity", embed_dropout=0.1, init_scheme="zoology",
                       **{kind: {"num_heads": 3, "feature_dim": 8, **({"qk_feature_map": "separate"}
                                                                       if kind == "rebased" else {})}})
    model = make_model(cfg)
    mixer = model.blocks[0].mixer
    assert (mixer.v_proj.out_features, mixer.o_proj.in_features, mixer.o_proj.out_features) == (30, 30, 32)
    assert isinstance(model.blocks[0].mlp, torch.nn.Identity)
    ids = torch.randint(0, 97, (2, 7))
    assert_close(decode(model, ids, [1] * 7), model(ids))


def test_identity_sublayer_adds_the_normed_stream():
    cfg = small_config(["short_conv"], mlp="identity", norm="layernorm")
    model = make_model(cfg)
    block = model.blocks[0]
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    positions = torch.arange(5)
    y = x + block.mixer(block.mixer_norm(x), positions=positions)
    assert_close(block(x, positions), y + block.mlp_norm(y))


def test_init_schemes_differ_only_where_the_original_names_differ():
    layers = ["short_conv", "rebased", "attention"]
    scaled, zoology = (build_model(small_config(layers, d_model=256, init_scheme=s, mlp="gelu", mlp_hidden=1024))
                       for s in ("scaled", "zoology"))
    residual_std = 0.02 / (2 * 3) ** 0.5
    for model, linear_attention_out in ((scaled, residual_std), (zoology, 0.02)):
        blocks = model.blocks
        assert abs(blocks[1].mixer.o_proj.weight.std().item() - linear_attention_out) < 0.1 * linear_attention_out
        assert abs(blocks[2].mixer.o_proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert abs(blocks[0].mlp.down_proj.weight.std().item() - residual_std) < 0.1 * residual_std
    assert torch.count_nonzero(scaled.blocks[0].mixer.conv_bias) == 0
    assert torch.count_nonzero(zoology.blocks[0].mixer.conv_bias) == 256


def expected_parameters(cfg: ModelConfig) -> int:
    """Closed-form count, written independently of the model code."""
    d = cfg.d_model
    norm = d if cfg.norm == "rmsnorm" else 2 * d
    total = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + norm
    total += cfg.max_seq_len * d if cfg.learned_positions else 0
    for kind in cfg.layers:
        total += norm
        if kind in ("rebased", "based"):
            sub = getattr(cfg, kind)
            vh = sub.value_heads or sub.num_heads
            dv = d // vh
            total += 2 * d * sub.num_heads * sub.feature_dim + d * vh * dv + sub.num_heads * dv * d
            if kind == "rebased":
                maps = 2 if sub.qk_feature_map == "separate" else 1
                total += maps * sub.num_heads * sub.feature_dim * (sub.use_gamma + sub.use_beta)
        elif kind == "short_conv":
            total += d * d + d + d * cfg.short_conv.kernel_size + d
        else:
            total += 4 * d * d
        if cfg.mlp == "identity":
            total += norm
        elif cfg.mlp != "none":
            total += norm + (3 if cfg.mlp == "swiglu" else 2) * d * cfg.mlp_hidden
    return total


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_config_parameter_counts(path):
    cfg = load_model_config(path)
    counted = count_parameters(cfg)
    assert counted["total"] == expected_parameters(cfg)
    if path.stem.endswith("360m"):
        assert 330e6 < counted["total"] < 390e6
    if path.stem.endswith("150m"):
        assert 130e6 < counted["total"] < 175e6


def test_summary_command_prints_every_config(capsys):
    from pretrain.models.summary import main
    rows = main([str(p) for p in sorted(CONFIGS.glob("*.yaml"))])
    out = capsys.readouterr().out
    assert len(rows) == len(list(CONFIGS.glob("*.yaml")))
    assert "rebased_360m" in out and "transformer_150m" in out


def test_flops_linear_attention_is_flat_in_sequence_length():
    hybrid = load_model_config(CONFIGS / "rebased_360m.yaml")
    transformer = load_model_config(CONFIGS / "transformer_360m.yaml")
    f = lambda cfg, T: flops_per_token(cfg, T)["train"]
    # ReBased and short_conv cost the same per token at any length; sliding window saturates at W.
    assert f(hybrid, 8192) == pytest.approx(f(hybrid, 65536), rel=1e-3)
    assert f(transformer, 65536) > 1.5 * f(transformer, 2048)
    # forward of a plain attention layer: 8d² projections + 4·d·(T+1)/2 for scores and values
    from pretrain.config import from_dict
    one = from_dict(ModelConfig, dict(vocab_size=1, d_model=64, layers=["attention"], mlp="none",
                                      attention={"num_heads": 4}))
    assert flops_per_token(one, 9)["breakdown"]["attention"] == 8 * 64 * 64 + 4 * 64 * 5


@pytest.mark.parametrize("tie", [True, False])
def test_export_round_trip(tmp_path, tie):
    from pretrain.models.io import export_model, load_exported
    cfg = small_config(["short_conv", "rebased", "attention"], tie_embeddings=tie)
    model = make_model(cfg).float()
    export_model(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.yaml", "export.json", "model.safetensors"]
    loaded = load_exported(tmp_path / "export")
    ids = torch.randint(0, 97, (2, 7))
    assert torch.equal(loaded(ids), model(ids))
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie


@pytest.mark.parametrize("t,window", [(9, 4), (16, 4), (23, 5), (64, 8), (7, 3)])
def test_blocked_window_attention_matches_dense_mask(t, window):
    """The O(T·W) sliding-window path equals SDPA with the dense T×T window mask (float64, forward and grads)."""
    import torch.nn.functional as F

    from pretrain.models.mixers import _blocked_window_attention

    torch.manual_seed(t)
    q, k, v = (torch.randn(2, 3, t, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pos = torch.arange(t)
    mask = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < window)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_same_output_and_grads(_blocked_window_attention(q, k, v, window), ref, (q, k, v))


def assert_same_output_and_grads(got, ref, inputs, tol=1e-12):
    assert torch.allclose(got, ref, rtol=tol, atol=tol)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    g = torch.autograd.grad((got * w).sum(), inputs)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """FlexAttention runs on the CPU eagerly (unfused, from the materialised scores), but its entry check refuses
    inputs that need gradients there; the autograd formula behind it is not device-specific, so lift the check."""
    from torch.nn.attention import flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)


def _packed_cu(t):  # uneven documents: one of 2 tokens (shorter than the smallest window), one of t/2 or more
    return torch.tensor(sorted({0, 2, t // 3, t // 2 + 1, t}), dtype=torch.int32)


def _cpu_attention(q, k, v, window, cu):
    """What the mixer runs on the CPU: blocked SDPA for a window alone, SDPA with the dense mask for documents."""
    import torch.nn.functional as F

    from pretrain.models.mixers import _blocked_window_attention, _dense_mask

    if cu is None:
        return _blocked_window_attention(q, k, v, window)
    pos = torch.arange(q.shape[2]) - cu[:-1].repeat_interleave(cu.diff())  # restarting per document, as the model's
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense_mask(pos, pos, window, cu))


def _qkv(t, seed, requires_grad=True):
    torch.manual_seed(seed)
    return [torch.randn(2, 3, t, 8, dtype=torch.float64, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("t", [9, 100, 130, 257])
@pytest.mark.parametrize("window,packed", [(3, False), (16, False), (64, False), (3, True), (16, True), (64, True),
                                          (None, True)])
def test_flex_attention_matches_the_cpu_paths(t, window, packed, flex_backward_on_cpu):
    """The FlexAttention path (CUDA, block mask from create_block_mask) equals the blocked / dense-mask paths, forward
    and gradients, float64; run eagerly on the CPU. T is not a multiple of 128 or of the window, or is below it."""
    from pretrain.models.mixers import _flex_causal_attention

    cu = _packed_cu(t) if packed else None
    q, k, v = _qkv(t, seed=t)
    ref = _cpu_attention(q, k, v, window, cu)
    assert_same_output_and_grads(_flex_causal_attention(q, k, v, window, cu), ref, (q, k, v))


@pytest.mark.parametrize("packed", [False, True])
def test_flex_attention_check_sees_a_wrong_mask(packed):
    """The comparison above can fail: a window one too long or too short, or the documents ignored, all differ."""
    from pretrain.models.mixers import _flex_causal_attention

    t, window = 257, 16
    cu = _packed_cu(t) if packed else None
    q, k, v = _qkv(t, seed=1, requires_grad=False)
    ref = _cpu_attention(q, k, v, window, cu)
    assert torch.allclose(_flex_causal_attention(q, k, v, window, cu), ref, rtol=1e-12, atol=1e-12)
    wrong = [_flex_causal_attention(q, k, v, window + 1, cu), _flex_causal_attention(q, k, v, window - 1, cu)]
    if packed:
        wrong.append(_flex_causal_attention(q, k, v, window, None))
    for o in wrong:
        assert not torch.allclose(o, ref, rtol=1e-6, atol=1e-6)


def test_flex_block_mask_is_cached_per_length_window_and_cu_seqlens_tensor():
    """The layers of one forward share a mask; a new cu_seqlens tensor (next batch) or one changed in place gets a
    new one, equal to the dense mask."""
    from torch.nn.attention.flex_attention import create_mask

    from pretrain.models.mixers import _block_mask, _dense_mask

    cpu, t = torch.device("cpu"), 200
    assert _block_mask(t, 16, None, cpu) is _block_mask(t, 16, None, cpu)
    assert _block_mask(t, 8, None, cpu) is not _block_mask(t, 16, None, cpu)
    cu = torch.tensor([0, 50, t], dtype=torch.int32)
    mask = _block_mask(t, 16, cu, cpu)
    assert _block_mask(t, 16, cu, cpu) is mask and _block_mask(t, None, cu, cpu) is not mask
    cu[1] = 120
    changed = _block_mask(t, 16, cu, cpu)
    assert changed is not mask and _block_mask(t, 16, cu.clone(), cpu) is not changed
    pos = torch.arange(t) - cu[:-1].repeat_interleave(cu.diff())
    assert torch.equal(create_mask(changed.mask_mod, 1, 1, t, t, cpu)[0, 0], _dense_mask(pos, pos, 16, cu))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlexAttention path is taken on CUDA")
@pytest.mark.parametrize("layers,packed", [(["sliding_window"], False), (["sliding_window"], True),
                                           (["attention"], True)])
@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_on_cuda_matches_the_cpu_model(layers, packed, compiled):
    """The model on CUDA (FlexAttention, compiled; each block compiled as by training.compile) equals the float64
    CPU model (blocked / dense-mask SDPA), logits and gradients; head dim 64, T = 300."""
    import copy

    heads = {"num_heads": 2, "window": 64} if layers == ["sliding_window"] else {"num_heads": 2}
    cfg = small_config(layers, d_model=128, **{layers[0]: heads})
    model = make_model(cfg).train()
    ids = torch.randint(0, 97, (1 if packed else 2, 300))
    cu = _packed_cu(300) if packed else None
    gpu = copy.deepcopy(model).float().cuda()
    if compiled:
        for block in gpu.blocks:
            block.compile()
    ref = model(ids, cu_seqlens=cu)
    got = gpu(ids.cuda(), cu_seqlens=None if cu is None else cu.cuda())
    assert_close(got.double().cpu(), ref, tol=1e-4)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    (got * w.cuda().float()).sum().backward()
    for p, p_gpu in zip(model.parameters(), gpu.parameters()):
        assert_close(p_gpu.grad.double().cpu(), p.grad, tol=1e-4)


@pytest.mark.parametrize("mixer", ["rebased", "based"])
def test_linear_attention_under_bf16_autocast(mixer):
    """The trainer's single/ddp bf16 path runs the model under autocast (feature-map LayerNorm in fp32, v in bf16)."""
    cfg = small_config(["short_conv", mixer])
    model = make_model(cfg).float()
    attn = model.blocks[1].mixer
    # CUDA autocast runs layer_norm in fp32 (CPU autocast does not): mimic it with an fp32 q/k path
    module = attn.feature_map if attn.feature_map is not None else attn.q_proj
    forward = module.forward
    module.forward = lambda x: forward(x).float()
    ids = torch.randint(0, 97, (2, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    logits.float().sum().backward()
    assert torch.isfinite(logits.float()).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
