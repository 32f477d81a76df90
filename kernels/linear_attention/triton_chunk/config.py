"""The launch configuration of the chunked (Re)Based kernels: :class:`ChunkLaunchConfig` and :data:`CHUNK_LAUNCH`,
the configuration in force (see :mod:`kernels.launch_config` for how to set it for a scope)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ...launch_config import LaunchConfig, LaunchSettings, check_choice, check_int, check_power_of_two

__all__ = ["ChunkLaunchConfig", "CHUNK_LAUNCH", "KERNELS", "CHUNKS", "TILES"]

KERNELS = ("state", "out", "grad")  # the kernels with their own Dv block, warps and stages
CHUNKS = (16, 32, 64, 128)
TILES = (4, 8, 16)
FP32_DOTS = ("ieee", "tf32x3")
# pipeline stages when neither the kernel's own knob nor ``stages`` is set (the state kernel: Triton's default).
# Measured on an H100 (kernels_tune): 2 for the output kernel; 1 for the gradient kernel, whose 255 registers leave
# no room for prefetched tiles
DEFAULT_STAGES = {"out": 2, "grad": 1}


@dataclasses.dataclass(frozen=True)
class ChunkLaunchConfig(LaunchConfig):
    """Knobs of the chunked (Re)Based kernels (``benchmarks/kernels_tune.py`` sweeps them). The defaults are the
    fastest measured on an H100 (bf16, Dv 64; ``benchmarks/results/kernels_tune_*.md``).

    chunk: tokens per chunk, one of 16, 32, 64, 128. None (default): the call's ``chunk_size`` (another size counts
        as the largest), at most 64, at most 32 for fp32 inputs (fp32 operands at 64 overflow an H100's shared
        memory). Set, it is used as it is, above the clamp too (128 has not been checked on a GPU).
    seg_tokens: tokens per segment (rounded down to a multiple of the chunk, at least one chunk). None (default): the
        chunk doubled (up to 16384) while the call still gives about ``target_programs`` state-kernel programs.
    target_programs: state-kernel programs (segments x heads x state blocks) wanted when choosing the segment
        length. None (default): 4 per SM (16 off CUDA).
    tile: side of the stored tiles of the symmetric second-order state, one of 4, 8, 16 (dividing Dk). None
        (default): 16 (the full pair matrix, one tile) for bf16 value heads of 16 or less, else 8.
    bv_state, bv_out, bv_grad: the Dv block of the state, output and gradient kernels, a power of two >= 16, capped at
        Dv rounded up to a power of two (at least 16). Default 64.
    warps_state, warps_out, warps_grad: warps per program. Defaults 2 (one tile per state program), 4, 4.
    stages: software-pipelining stages of every kernel whose own knob is unset; stages_state, stages_out,
        stages_grad: one kernel's. None (default) everywhere: Triton's default for the state kernel, 2 for the
        output kernel, 1 for the gradient kernel.
    save_states: keep the forward's per-chunk states for the backward (only without ``cu_seqlens``) instead of
        recomputing them there. Default True.
    fp32_dot: how fp32 inputs are multiplied on the GPU. "ieee" (default): fp32 products on the CUDA cores, what
        fp32 means everywhere else. "tf32x3": each operand split into a TF32 high part and a TF32 remainder, three
        tensor-core products (hi·hi + hi·lo + lo·hi) summed in fp32: relative error of the order of fp32's own
        (about 1e-6 against about 1e-7, where TF32 alone gives 1e-3), on the tensor cores. The interpreter (CPU)
        always multiplies in fp32.
    """

    chunk: Optional[int] = None
    seg_tokens: Optional[int] = None
    target_programs: Optional[int] = None
    tile: Optional[int] = None
    bv_state: int = 64
    bv_out: int = 64
    bv_grad: int = 64
    warps_state: int = 2
    warps_out: int = 4
    warps_grad: int = 4
    stages: Optional[int] = None
    stages_state: Optional[int] = None
    stages_out: Optional[int] = None
    stages_grad: Optional[int] = None
    save_states: bool = True
    fp32_dot: str = "ieee"

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_choice(name, "chunk", self.chunk, CHUNKS, optional=True)
        check_int(name, "seg_tokens", self.seg_tokens, optional=True)
        check_int(name, "target_programs", self.target_programs, optional=True)
        check_choice(name, "tile", self.tile, TILES, optional=True)
        for which in KERNELS:
            check_power_of_two(name, f"bv_{which}", getattr(self, f"bv_{which}"), minimum=16)
            check_power_of_two(name, f"warps_{which}", getattr(self, f"warps_{which}"), maximum=32)
            check_int(name, f"stages_{which}", getattr(self, f"stages_{which}"), optional=True)
        check_int(name, "stages", self.stages, optional=True)
        check_choice(name, "fp32_dot", self.fp32_dot, FP32_DOTS)
        if not isinstance(self.save_states, bool):
            raise ValueError(f"{name}.save_states must be a bool, got {self.save_states!r}")

    @staticmethod
    def _check_kernel(which: str) -> None:
        if which not in KERNELS:
            raise ValueError(f"unknown kernel {which!r}; expected one of {KERNELS}")

    def block_v(self, which: str) -> int:
        """The Dv block of kernel ``which`` ("state" | "out" | "grad"), before the cap at Dv."""
        self._check_kernel(which)
        return getattr(self, f"bv_{which}")

    def num_warps(self, which: str) -> int:
        self._check_kernel(which)
        return getattr(self, f"warps_{which}")

    def num_stages(self, which: str) -> Optional[int]:
        """Pipeline stages of kernel ``which``; None: Triton's default."""
        self._check_kernel(which)
        return getattr(self, f"stages_{which}") or self.stages or DEFAULT_STAGES.get(which)

    def tile_for(self, dv: int, fp32: bool) -> int:
        """The tile side for value heads of width ``dv`` (``fp32``: fp32 operands, else bf16): the ``tile`` knob,
        else 16 for bf16 up to Dv 16, and 8 otherwise."""
        # narrow bf16 value heads: the full 16 x 16 pair matrix as one tile (fewer, larger feature blocks per program)
        # was 8% faster at Dv = 10 on an H200 (benchmarks/results/mqar/); 8 x 8 tiles from Dv 32 (kernels_tune, H100).
        # fp32 operands at tile 16 overflow the registers: compiled for sm_90, the gradient kernel gets 32 registers
        # and 8 KB of stack per thread (every block spilled; tile 8: none), benchmarks/kernels_resources.py
        return self.tile or (16 if dv <= 16 and not fp32 else 8)


CHUNK_LAUNCH: LaunchSettings[ChunkLaunchConfig] = LaunchSettings(ChunkLaunchConfig())
