"""Host-side tables of the chunked kernels: the internal state layout's sizes, the tile table, the segment tables,
the Dv blocks, warps and pipeline stages of each kernel (from the launch configuration, :mod:`.config`), and the
matmul mode."""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from ...common import cdiv, next_power_of_2
from .config import CHUNK_LAUNCH, ChunkLaunchConfig
from .jit import INTERPRETED

MAX_CHUNK = 64
MAX_CHUNK_FP32 = 32  # fp32 operands at C = 64, Dv 128 need 263 KB of shared memory; an H100 has 227 KB


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    return q.shape[-1] == 16 and q.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _mm_mode(dtype: torch.dtype, config: ChunkLaunchConfig) -> int:
    # fp16 inputs never get here: chunk_linear_attention runs them in fp32 (fp16's range is too small for states)
    mode = {torch.float32: 0, torch.bfloat16: 1}[dtype]
    if mode == 0 and not INTERPRETED and config.fp32_dot == "tf32x3":
        return 5
    if mode and INTERPRETED:
        # the interpreter's tl.dot on bf16 operands is wrong (triton 3.9): round the operands to bf16, multiply in
        # fp32 (the same rounding as the tensor cores' products with fp32 accumulation)
        return 3
    return mode


def _layout(based: bool, dk: int = 16, tile: Optional[int] = None) -> Tuple[int, int, int, int]:
    """(tile side TS, second-order state rows F2, state rows FT, normaliser rows FZ) of the internal layout.

    The second-order rows are the TS x TS tiles (I, J), I <= J, of the Dk x Dk pair matrix (i, j), tile after tile,
    row-major inside a tile: the state is symmetric in (i, j), so the tiles below the diagonal are left out
    (Dk = 16: TS = 8 keeps 3 of 4 tiles, 192 rows instead of 256; TS = 4 keeps 10 of 16, 160 rows). The normaliser
    z keeps its full Dk x Dk matrix."""
    ts = tile or CHUNK_LAUNCH.get().tile or 8
    if ts not in (4, 8, 16) or dk % ts:
        raise ValueError(f"tile = {ts}: the tile side must be 4, 8 or 16 and divide Dk = {dk}")
    ng = dk // ts
    f2 = ng * (ng + 1) // 2 * ts * ts
    extra = dk + 1 if based else 0
    return ts, f2, f2 + extra, dk * dk + extra


_TILE_TABLES: dict = {}


def _tile_table(dk: int, ts: int, device) -> torch.Tensor:
    """int32 [tiles, 2]: (I, J) of each stored tile, in the order of the state rows."""
    key = (dk, ts, str(device))
    if key not in _TILE_TABLES:
        ng = dk // ts
        pairs = [[i, j] for i in range(ng) for j in range(i, ng)]
        _TILE_TABLES[key] = torch.tensor(pairs, dtype=torch.int32).to(device)
    return _TILE_TABLES[key]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_seg_tokens(total_tokens: int, n_docs: int, heads: int, chunk: int, device: torch.device,
                      blocks: int = 1, config: Optional[ChunkLaunchConfig] = None) -> int:
    """Tokens per segment: a multiple of ``chunk`` giving about ``target_programs`` state-kernel programs
    (segments x heads x ``blocks`` state blocks), or the config's ``seg_tokens``. A document of several segments
    costs a scan of their totals and the chunks' loads of their segment's start state. ``config``: the launch
    configuration (default: the one in force)."""
    config = config or CHUNK_LAUNCH.get()
    if config.seg_tokens:
        return max(chunk, (config.seg_tokens // chunk) * chunk)
    target = config.target_programs or 4 * _num_sms(device)
    per = max(1, total_tokens * heads * blocks // max(1, target))
    seg = chunk
    while seg * 2 <= per and seg < 16384:
        seg *= 2
    return seg


def _segments(offsets: List[int], seg_tokens: int, ns_max: int, chunk: int, device):
    """Segment table int32 [ns_max, 3] = (start, end, first chunk index), doc table [N, 2] = (first segment,
    segments); also the most segments in one document, the number of chunks and the most chunks in one segment."""
    rows, docs = [], []
    n_chunks = 0
    for n in range(len(offsets) - 1):
        a, b = offsets[n], offsets[n + 1]
        first = len(rows)
        s = a
        while True:
            e = min(b, s + seg_tokens)
            rows.append([s, e, n_chunks])
            n_chunks += -(-(e - s) // chunk)
            s = e
            if s >= b:
                break
        docs.append([first, len(rows) - first])
    nseg = len(rows)
    assert nseg <= ns_max, (nseg, ns_max)
    max_chunks = max(-(-(r[1] - r[0]) // chunk) for r in rows)
    rows.extend([[0, 0, 0]] * (ns_max - nseg))
    seg = torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)
    doc = torch.tensor(docs, dtype=torch.int32).to(device, non_blocking=True)
    max_per_doc = max(cnt for _, cnt in docs)
    return seg, doc, max_per_doc, n_chunks, max_chunks


_TABLES: dict = {}


def _segment_tables(cu_seqlens, b, t, seg_tokens, ns_max, chunk, device):
    """_segments for this call. Without cu_seqlens the tables depend only on the shapes: cached, so a call costs
    no host work and no host-to-device copy (a pageable copy would also wait for the GPU queue to drain)."""
    if cu_seqlens is not None:
        return _segments(_offsets_of(cu_seqlens, b, t), seg_tokens, ns_max, chunk, device)
    key = (b, t, seg_tokens, ns_max, chunk, str(device))
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = _segments(_offsets_of(None, b, t), seg_tokens, ns_max, chunk, device)
    return _TABLES[key]


def _saved_chunks(save_states: bool, b: int, t: int, chunk: int) -> int:
    # rows of the per-chunk states the forward returns for the backward: every chunk when saving (no cu_seqlens,
    # so the count follows from the shapes, as the custom op's fake needs), else none
    return b * -(-t // chunk) if save_states else 0


def _ns_max(total_tokens: int, n_docs: int, seg_tokens: int) -> int:
    return total_tokens // seg_tokens + n_docs


def _cfg(which: str, dv: int, config: ChunkLaunchConfig) -> Tuple[int, int, int]:
    """(Dv block, Dv blocks, warps) of kernel `which` ("state" | "out" | "grad"); a feature block is one tile."""
    dvp = max(16, next_power_of_2(dv))
    bv = min(config.block_v(which), dvp)
    return bv, cdiv(dv, bv), config.num_warps(which)


@functools.lru_cache(maxsize=256)
def _kernel_args(which: str, dv: int, dk: int, based: bool, tile: Optional[int], device, config: ChunkLaunchConfig):
    """(Dv blocks, the layout and launch keywords, the tile table) of kernel `which` ("state" | "out" | "grad").
    Cached (the configuration is frozen, so a new one is a new key): every launch asks, and the answer is ~20 µs of
    Python. Callers must not mutate the returned keywords."""
    ts, f2, ft, fz = _layout(based, dk, tile)
    bv, nvb, warps = _cfg(which, dv, config)
    return nvb, dict(DK=dk, DV=dv, BV=bv, NVB=nvb, TS=ts, F2=f2, FT=ft, FZ=fz, num_warps=warps,
                     **_stages(which, config)), _tile_table(dk, ts, device)


def _state_blocks(dv: int, dk: int, tile: int, config: ChunkLaunchConfig) -> int:
    ts, f2, _, _ = _layout(False, dk, tile)
    _, nvb, _ = _cfg("state", dv, config)
    return f2 // (ts * ts) * nvb


def _offsets_of(cu_seqlens: Optional[torch.Tensor], b: int, t: int) -> List[int]:
    if cu_seqlens is None:
        return [i * t for i in range(b + 1)]
    return [int(x) for x in cu_seqlens.tolist()]


def _stages(which: str, config: ChunkLaunchConfig):
    s = config.num_stages(which)
    return {"num_stages": s} if s else {}


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # the stored per-chunk and segment start states: bf16 for bf16 inputs (the tensor cores round them to bf16
    # anyway), fp32 otherwise
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
