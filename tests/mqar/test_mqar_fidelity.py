"""The MQAR models against the original code's (corl-team/rebased, which vendors zoology's LanguageModel).

Each point of the original layout is pinned: parameter counts per width, the 12 value heads of floor(d/12) and the
recurrent state they give, the tied head, the normaliser eps, embedding dropout, the identity second sub-layer,
separate q/k feature maps and the init. ``official_forward`` re-derives the original forward pass from its
description (pre-LN blocks with an identity state mixer, BaseConv, the parallel ReBased/Based kernels) in float64
and must match our model to rounding.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import build_model, count_parameters
from pretrain.mqar.config import load_mqar_config

V, HEADS, FEAT = 8192, 12, 16
WIDTHS = (64, 128, 256, 512)


def model_config(mixer, d_model, seq_len=256, *extra):
    cfg = load_mqar_config("configs/mqar/base.yaml", [f"model.mixer={mixer}", f"model.d_model={d_model}",
                                                      f"data.seq_len={seq_len}", *extra])
    return cfg.model_config()


def official_parameter_count(mixer: str, d: int, seq_len: int) -> int:
    """The original LanguageModel's parameters, counted from its modules (tied head counted once)."""
    hd = d // HEADS
    embeddings = V * d + seq_len * d                      # word (tied with lm_head) + positions (max = seq_len)
    norms = 2 * (2 * d) * 2 + 2 * d                        # norm1, norm2 of two blocks, ln_f (weight + bias)
    base_conv = (d * d + d) + (3 * d + d)                  # projection (bias), depthwise Conv1d k=3 (bias)
    qk = 2 * d * FEAT * HEADS                              # proj_q, proj_k (no bias)
    v_o = d * HEADS * hd + HEADS * hd * d                  # proj_v, proj_o (no bias)
    feature_maps = 2 * (2 * FEAT * HEADS) if mixer == "rebased" else 0  # ln_q, ln_k over 192 features
    return embeddings + norms + base_conv + qk + v_o + feature_maps


@pytest.mark.parametrize("mixer", ["rebased", "based"])
@pytest.mark.parametrize("d_model", WIDTHS)
def test_parameter_counts_match_the_original(mixer, d_model):
    assert count_parameters(model_config(mixer, d_model))["total"] == official_parameter_count(mixer, d_model, 256)


@pytest.mark.parametrize("mixer", ["rebased", "based"])
@pytest.mark.parametrize("d_model", WIDTHS)
def test_value_heads_and_recurrent_state(mixer, d_model):
    """12 value heads of floor(d/12): the recurrent state is [12, features, d // 12], not 12 × d wide."""
    cfg = model_config(mixer, d_model)
    model = build_model(cfg).eval()
    attn = model.blocks[1].mixer
    hd = d_model // HEADS
    assert (attn.v_proj.in_features, attn.v_proj.out_features) == (d_model, HEADS * hd)
    assert (attn.o_proj.in_features, attn.o_proj.out_features) == (HEADS * hd, d_model)
    cache = model.init_cache()
    with torch.no_grad():
        model(torch.randint(0, V, (2, 5)), cache=cache)
    kv, z = cache.layers[1].state
    import kernels

    features = kernels.state_size(mixer, FEAT)
    assert kv.shape == (2, HEADS, features, hd) and z.shape == (2, HEADS, features)


def test_tied_head_eps_dropout_and_identity_sublayer():
    for mixer in ("rebased", "based"):
        cfg = model_config(mixer, 64)
        model = build_model(cfg)
        assert model.lm_head.weight is model.embed.weight
        assert model.blocks[1].mixer.eps == 1e-12
        assert cfg.embed_dropout == 0.1 and model.embed_dropout.p == 0.1
        assert cfg.mlp == "identity" and all(isinstance(b.mlp, torch.nn.Identity) for b in model.blocks)
        assert cfg.norm == "layernorm" and cfg.learned_positions and cfg.max_seq_len == 256


def test_embedding_dropout_only_while_training():
    model = build_model(model_config("rebased", 64))
    x = torch.randint(0, V, (2, 16))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.hidden_states(x), model.hidden_states(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.hidden_states(x), model.hidden_states(x))


def test_rebased_feature_maps_are_separate_and_joint():
    model = build_model(model_config("rebased", 64))
    attn = model.blocks[1].mixer
    assert attn.feature_map is not None and attn.k_feature_map is not None
    assert attn.feature_map.gamma is not attn.k_feature_map.gamma
    assert attn.feature_map.norm_scope == "joint"


def test_init_follows_the_original():
    """Linear and Embedding N(0, 0.02) (the linear-attention output projection is not scaled with depth: the
    original's name list misses it), biases zero, the depthwise Conv1d at PyTorch's default (bias too)."""
    torch.manual_seed(0)
    model = build_model(model_config("rebased", 512, 2048))
    attn, conv = model.blocks[1].mixer, model.blocks[0].mixer
    for weight in (attn.o_proj.weight, attn.q_proj.weight, attn.v_proj.weight, conv.proj.weight,
                   model.embed.weight, model.pos_embed.weight):
        assert abs(weight.std().item() - 0.02) < 0.002, weight.shape
    assert torch.count_nonzero(conv.proj.bias) == 0
    bound = 1 / math.sqrt(3)
    for p in (conv.conv_weight, conv.conv_bias):
        assert p.abs().max() <= bound and p.std() > 0.5 * bound / math.sqrt(3)


def test_clean_variant():
    cfg = model_config("rebased", 64, 256, "model.variant=clean")
    assert cfg.mlp == "none" and cfg.init_scheme == "scaled" and cfg.rebased.eps == 1e-6
    assert cfg.tie_embeddings and cfg.rebased.value_heads is None
    model = build_model(cfg)
    assert torch.count_nonzero(model.blocks[0].mixer.conv_bias) == 0


# ---------------------------------------------------------------- the original forward, re-derived


def official_forward(model, ids: torch.Tensor, mixer: str) -> torch.Tensor:
    """Logits of the original MQAR LanguageModel (eval mode) with our model's weights."""
    d = model.config.d_model
    hd = d // HEADS
    B, T = ids.shape

    def ln(x, norm):
        return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)

    hidden = model.embed(ids) + model.pos_embed(torch.arange(T))
    residual = None
    for block in model.blocks:
        # pre-norm block: residual += dropped(hidden); LN1 -> sequence mixer; residual += it; LN2 -> Identity
        residual = hidden if residual is None else hidden + residual
        h = ln(residual, block.mixer_norm)
        mix = block.mixer
        if block.kind == "short_conv":  # BaseConv: Conv1d(pad k-1, truncated) * Linear + u
            conv = F.conv1d(h.transpose(1, 2), mix.conv_weight[:, None, :], mix.conv_bias, padding=2,
                            groups=d)[..., :T].transpose(1, 2)
            out = conv * F.linear(h, mix.proj.weight, mix.proj.bias) + h
        else:
            q, k, v = F.linear(h, mix.q_proj.weight), F.linear(h, mix.k_proj.weight), F.linear(h, mix.v_proj.weight)
            if mixer == "rebased":  # nn.LayerNorm(192) each for q and k
                q = F.layer_norm(q, (HEADS * FEAT,), mix.feature_map.gamma.flatten(), mix.feature_map.beta.flatten())
                k = F.layer_norm(k, (HEADS * FEAT,), mix.k_feature_map.gamma.flatten(),
                                 mix.k_feature_map.beta.flatten())
            q, k = (t.view(B, T, HEADS, FEAT).transpose(1, 2) for t in (q, k))
            v = v.view(B, T, HEADS, hd).transpose(1, 2)
            s = (q * FEAT ** -0.5) @ k.transpose(-1, -2)  # the kernels scale q by 1/sqrt(feature dim)
            a = s * s if mixer == "rebased" else 1 + s + 0.5 * s * s
            a = a.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0)
            o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-12)
            out = F.linear(o.transpose(1, 2).reshape(B, T, HEADS * hd), mix.o_proj.weight)
        residual = out + residual
        hidden = ln(residual, block.mlp_norm)  # the identity state mixer's output
    residual = hidden + residual
    return F.linear(ln(residual, model.final_norm), model.embed.weight)


@pytest.mark.parametrize("mixer", ["rebased", "based"])
@pytest.mark.parametrize("d_model", [64, 128])
def test_forward_equals_the_original(mixer, d_model):
    torch.manual_seed(1)
    model = build_model(model_config(mixer, d_model, 64)).double().eval()
    with torch.no_grad():  # non-trivial norms and feature maps
        for p in model.parameters():
            if p.dim() == 1 or p.shape[0] == HEADS:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, V, (2, 64))
    with torch.no_grad():
        ours = model(ids)
        ref = official_forward(model, ids, mixer)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
