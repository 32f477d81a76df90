"""The typed launch configurations of the Triton families: defaults, validation, scoped overrides."""

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from kernels.launch_config import LaunchSettings  # noqa: E402
from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH, ChunkLaunchConfig  # noqa: E402
from kernels.short_conv.config import SHORT_CONV_LAUNCH, ShortConvLaunchConfig  # noqa: E402


def test_defaults_are_in_force_and_documented_values():
    cfg = CHUNK_LAUNCH.get()
    assert cfg == ChunkLaunchConfig() == CHUNK_LAUNCH.default and cfg.overrides() == {}
    assert [cfg.block_v(w) for w in ("state", "out", "grad")] == [64, 64, 64]
    assert [cfg.num_warps(w) for w in ("state", "out", "grad")] == [2, 4, 4]
    assert [cfg.num_stages(w) for w in ("state", "out", "grad")] == [None, 2, 1]
    assert cfg.save_states is True and cfg.chunk is None and cfg.seg_tokens is None
    assert SHORT_CONV_LAUNCH.get() == ShortConvLaunchConfig()
    assert SHORT_CONV_LAUNCH.get().blocks("fwd") == (64, 64, 4) and SHORT_CONV_LAUNCH.get().blocks("bwd") == (64, 32, 2)


def test_tile_for_value_heads():
    cfg = ChunkLaunchConfig()
    assert cfg.tile_for(10, fp32=False) == 16 and cfg.tile_for(16, fp32=False) == 16
    assert cfg.tile_for(17, fp32=False) == 8 and cfg.tile_for(64, fp32=False) == 8
    # fp32 operands: tile 16 spills the gradient kernel's registers (benchmarks/kernels_resources.py)
    assert cfg.tile_for(5, fp32=True) == 8 and cfg.tile_for(10, fp32=True) == 8 and cfg.tile_for(64, fp32=True) == 8
    assert ChunkLaunchConfig(tile=4).tile_for(10, fp32=False) == 4
    assert ChunkLaunchConfig(tile=16).tile_for(64, fp32=True) == 16


def test_stages_precedence():
    cfg = ChunkLaunchConfig(stages=3)
    assert [cfg.num_stages(w) for w in ("state", "out", "grad")] == [3, 3, 3]
    cfg = ChunkLaunchConfig(stages=3, stages_grad=2)
    assert [cfg.num_stages(w) for w in ("state", "out", "grad")] == [3, 3, 2]


@pytest.mark.parametrize("bad", [dict(chunk=48), dict(tile=2), dict(bv_out=24), dict(bv_state=8),
                                 dict(warps_grad=3), dict(warps_state=64), dict(seg_tokens=0),
                                 dict(target_programs=-1), dict(stages_out=0), dict(save_states=None),
                                 dict(tile=True), dict(chunk=64.0)])
def test_chunk_config_rejects(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ChunkLaunchConfig(**bad)


@pytest.mark.parametrize("bad", [dict(block_t_fwd=12), dict(block_d_bwd=0), dict(warps_fwd=5), dict(bwd_tiles=0)])
def test_short_conv_config_rejects(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ShortConvLaunchConfig(**bad)


def test_unknown_knob_and_frozen():
    with pytest.raises(TypeError, match=r"unknown knob\(s\) tile_size; the knobs: .*\btile\b"):
        CHUNK_LAUNCH.get().replace(tile_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CHUNK_LAUNCH.get().tile = 4
    with pytest.raises(TypeError):
        CHUNK_LAUNCH.set(ShortConvLaunchConfig())


def test_override_scope_restores_what_was_set_inside():
    settings = LaunchSettings(ChunkLaunchConfig())
    with settings.override(tile=4) as cfg:
        assert settings.get() is cfg and cfg.tile == 4 and cfg.overrides() == {"tile": 4}
        settings.update(seg_tokens=16)
        assert settings.get().tile == 4 and settings.get().seg_tokens == 16
        with settings.override(ChunkLaunchConfig(), warps_out=8):
            assert settings.get().overrides() == {"warps_out": 8}
        assert settings.get().seg_tokens == 16
    assert settings.get() == ChunkLaunchConfig()
    with pytest.raises(ValueError):
        with settings.override(tile=5):
            pass
    assert settings.get() == ChunkLaunchConfig()
    settings.update(tile=8)
    settings.reset()
    assert settings.get() is settings.default


@pytest.mark.parametrize("dtype, tile", [(torch.bfloat16, 16), (torch.float32, 8), (torch.float16, 8)])
def test_op_picks_the_tile_by_operand_dtype(monkeypatch, dtype, tile):
    # the op's default tile for narrow value heads: 16 for bf16, 8 where the kernels get fp32 operands (fp16 inputs
    # run in fp32); the launch itself is replaced, so this runs without a GPU or the interpreter
    from kernels.linear_attention.triton_chunk import ops

    class Launched(Exception):
        pass

    def fake_fwd(q, k, v, cu_seqlens, S0, z0, scale, eps, normalize, based, tile, *rest):
        raise Launched(tile)

    monkeypatch.setattr(ops, "_fwd_impl", fake_fwd)
    q = torch.randn(1, 64, 2, 16, dtype=dtype)
    with pytest.raises(Launched) as info:
        ops.chunk_linear_attention("rebased", q, q, torch.randn(1, 64, 2, 10, dtype=dtype), scale=0.25)
    assert info.value.args[0] == tile
