"""The launch configuration of the short-convolution kernels: :class:`ShortConvLaunchConfig` and
:data:`SHORT_CONV_LAUNCH`, the one in force (see :mod:`kernels.launch_config` for how to set it for a scope)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from ..launch_config import LaunchConfig, LaunchSettings, check_int, check_power_of_two

__all__ = ["ShortConvLaunchConfig", "SHORT_CONV_LAUNCH", "PASSES"]

PASSES = ("fwd", "bwd")  # "fwd" also sets the decoding step's channel tile and warps


@dataclasses.dataclass(frozen=True)
class ShortConvLaunchConfig(LaunchConfig):
    """Knobs of the short-convolution kernels. The defaults were the fastest on an H100 for bf16 [16, 2048, 1024]
    and [8, 4096, 2048] inputs; the tests shrink the tiles so that tiny inputs span several.

    block_t_fwd, block_d_fwd, warps_fwd: tokens and channels per tile and warps per program of the forward (and of
        the decoding step: channels and warps). Defaults 64, 64, 4.
    block_t_bwd, block_d_bwd, warps_bwd: the same for the backward. Defaults 64, 32, 2.
        Tile sides are powers of two; a channel tile is capped at D rounded up to a power of two (at least 16).
    bwd_tiles: T tiles per backward program (fewer dweight / dbias partials to reduce). None (default): on CUDA, the
        most (up to 8) that still leave about 8 programs per SM; 1 off CUDA.
    """

    block_t_fwd: int = 64
    block_d_fwd: int = 64
    warps_fwd: int = 4
    block_t_bwd: int = 64
    block_d_bwd: int = 32
    warps_bwd: int = 2
    bwd_tiles: Optional[int] = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        for which in PASSES:
            check_power_of_two(name, f"block_t_{which}", getattr(self, f"block_t_{which}"))
            check_power_of_two(name, f"block_d_{which}", getattr(self, f"block_d_{which}"))
            check_power_of_two(name, f"warps_{which}", getattr(self, f"warps_{which}"), maximum=32)
        check_int(name, "bwd_tiles", self.bwd_tiles, optional=True)

    def blocks(self, which: str) -> Tuple[int, int, int]:
        """(block_t, block_d, warps) of pass ``which`` ("fwd" | "bwd"), before the cap of block_d at D."""
        if which not in PASSES:
            raise ValueError(f"unknown pass {which!r}; expected one of {PASSES}")
        return getattr(self, f"block_t_{which}"), getattr(self, f"block_d_{which}"), getattr(self, f"warps_{which}")


SHORT_CONV_LAUNCH: LaunchSettings[ShortConvLaunchConfig] = LaunchSettings(ShortConvLaunchConfig())
