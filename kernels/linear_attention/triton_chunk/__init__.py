"""Chunked linear-time (Re)Based causal attention in Triton: forward, backward, autograd, custom ops.

Modules: ``config`` (the typed launch configuration :class:`ChunkLaunchConfig` and :data:`CHUNK_LAUNCH`, the one in
force), ``jit`` (the @triton.jit kernels), ``tables`` (the state layout's sizes, tile and segment tables, block
sizes, warps and stages from the config), ``launch`` (buffers and launches of the forward and backward), ``ops``
(the custom ops, autograd and the entry point :func:`chunk_linear_attention`), ``state_layout`` (the public state
layout to and from the internal one).

Algorithm (the math, the backward and the state layout are derived in ``kernels/linear_attention/DESIGN.md``)
---------------------------------------------------------------------------------------------------------------
The second-order features are the pair products x_i x_j, built per chunk in registers from the 16-wide rows
(never stored in HBM). The state is symmetric in (i, j), so only the TS x TS tiles (I, J), I <= J, of the
Dk x Dk pair matrix are kept (TS = 8 by default: tiles (0,0), (0,1), (1,1), 192 rows instead of 256; TS = 4
keeps 10 of 16 tiles, TS = 16 is the full matrix). A contraction with psi weighs a diagonal tile 1 (it holds both
(i, j) and (j, i)) and an off-diagonal tile 2. The internal state per (document, head) is, in float32,

    rebased: S2 = scale * sum_s psi(k_s) v_s^T        [F2, Dv]          (psi: the kept tiles' rows)
    based:   S2 as above, S1 = sqrt(scale) * sum_s k_s v_s^T [Dk, Dv], S0 = sum_s v_s [Dv]

stacked as rows [S2; S1; S0] of one [FT, Dv] matrix (FT = F2 for rebased, F2 + Dk + 1 for based). The
normaliser z keeps the full Dk x Dk matrix Zm (+ Dk + 1 rows for based: FZ rows), so psi(q).z2 = q^T Zm q is a
16-wide product in fp32.
Output: num_t = c2 w psi(q_t).S2 + sqrt(s) q_t.S1 + S0 + intra-chunk, c2 = scale (rebased) or scale / 2 (based),
w the tile weights. The reverse pass stores dL/dS, whose rows carry the weights.
The public (contract) state layout of ``kernels.rebased_feature_map`` / ``based_feature_map`` is converted to and
from this one in PyTorch (differentiable) by :func:`state_to_internal` / :func:`state_from_internal`.

Work decomposition (chunk-parallel): every document (a batch row, or a cu_seqlens document) is cut into
*segments* of ``seg_tokens`` tokens (a multiple of the chunk size C), segments into chunks of C tokens, so no
chunk straddles a document boundary. Only the state kernel walks chunks in order: each of its programs holds one
block of a segment's state in registers (a [TS*TS, BV] tile of the second-order rows; or the normaliser z; or
Based's first/zeroth-order rows) and sums it from zero over the segment, storing it before (reversed: after) every
chunk (bf16 for bf16 inputs, as the tensor cores would round it anyway; fp32 otherwise). A segment's start state
(the sum over the document's earlier segments, and the initial state) is one small scan of the segments' totals;
the output and gradient kernels, one program per chunk looping over the tiles, add it to the chunk's stored
state as they load it (it stays in L2, shared by all the segment's chunks). So a long document costs no extra
pass over its tokens.

forward:  _state_kernel: per segment, the state before each chunk -> Hc, Zc, and the segment's total
          [documents of > 1 segment, an initial or a final state: _scan_kernel over a document's segment totals
          -> each segment's start state S_start (and the final state)]
          _out_kernel: per chunk, inter-chunk psi(q) (Hc + S_start) + masked intra C x C part, normaliser in fp32,
          division.
backward: [Hc not kept by the forward: _state_kernel again]
          _h_kernel: h_t = -(do_t.o_t)/(den_t+eps)
          _state_kernel in reverse: dL/dS after each chunk (from the later queries) -> dHc, dZc; reverse scan from
          dL/dS_final -> each segment's reverse start and dL/dS_initial;
          _grad_kernel: per chunk, dq, dk, dv from Hc + S_start, dHc + its start and the intra-chunk part.

Defaults of :class:`ChunkLaunchConfig`, from benchmarks/kernels_tune.py on an H100 (bf16, Dv 64; results in
benchmarks/results/kernels_tune_*.md):
C = 64, 8 x 8 tiles, a 64-row tile x 64 Dv per state program with 2 warps, 4 warps for the output and gradient
kernels (2 pipeline stages for the output kernel, 1 for the gradient kernel), and the forward's per-chunk states
kept for the backward (without cu_seqlens; 384 bytes per token and head in bf16) instead of a third state pass.
"""

from .config import CHUNK_LAUNCH, ChunkLaunchConfig
from .ops import chunk_linear_attention
from .state_layout import state_from_internal, state_to_internal
from .tables import MAX_CHUNK, MAX_CHUNK_FP32, supports

__all__ = [
    "chunk_linear_attention", "state_to_internal", "state_from_internal",
    "CHUNK_LAUNCH", "ChunkLaunchConfig", "supports", "MAX_CHUNK", "MAX_CHUNK_FP32",
]
