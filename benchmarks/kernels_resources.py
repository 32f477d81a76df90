"""Registers, spills and instruction mix of the chunked (Re)Based kernels, compiled for a GPU that need not be here.

    python -m benchmarks.kernels_resources [--dtype fp32] [--dv 10] [--variants JSON] [--arch 90] [--out DIR]

Triton compiles each kernel (the state pass in both directions, the output and the gradient kernel) for the target
(default sm_90: H100 / H200) with its own ptxas; no GPU and no driver are needed. For every variant (a JSON list of
objects: ``ChunkLaunchConfig`` knobs such as ``tile``, ``chunk``, ``warps_grad``, ``fp32_dot``, plus optional
``dtype``, ``dv`` and ``kind``) it prints, per kernel, what the cubin declares (registers per thread, stack bytes
per thread, static shared memory) and what its SASS holds: local-memory stores and loads (register spills),
Hopper warp-group MMAs (HGMMA), warp-level MMAs (HMMA) and fp32 FMAs. A kernel whose stack is kilobytes spills
its working set to local memory on every iteration; this shows it before any GPU time is spent. Speed itself is
measured on the GPU (``benchmarks/mqar_profile.py attention``, ``benchmarks/kernels_tune.py``).

The numbers depend on the Triton version (its code generation and its ptxas): compare variants from one run, and
state the version, as the results file does.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

KERNELS = ("state", "state_rev", "out", "grad")
_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}


def _launch(which: str, dtype: str, dv: int, based: bool, config) -> tuple:
    """(kernel, pointer types, scalar types, constexprs, compile options) of one launch, as launch.py makes it."""
    from kernels.linear_attention.triton_chunk import jit
    from kernels.linear_attention.triton_chunk.tables import MAX_CHUNK, MAX_CHUNK_FP32, _cfg, _layout, _stages

    base = "state" if which.startswith("state") else which
    ts, f2, ft, fz = _layout(based, 16, config.tile_for(dv, fp32=dtype == "fp32"))
    bv, nvb, warps = _cfg(base, dv, config)
    mm = {"bf16": 1, "fp32": 5 if config.fp32_dot == "tf32x3" else 0}[dtype]
    chunk = config.chunk or (MAX_CHUNK_FP32 if dtype == "fp32" else MAX_CHUNK)  # as ops.py picks it
    x = "*" + dtype
    st = "*bf16" if dtype == "bf16" else "*fp32"  # the stored chunk / segment start states (tables._state_dtype)
    f32 = "*fp32"
    layout = dict(DK=16, DV=dv, BV=bv, NVB=nvb, TS=ts, C=chunk, F2=f2, FT=ft, FZ=fz, BASED=based, MM=mm)
    options = {"num_warps": warps, **_stages(base, config)}
    if base == "state":
        ptrs = dict(x_ptr=x, y_ptr=x, den_ptr=f32, h_ptr=f32, seg_ptr="*i32", tile_ptr="*i32", ch_ptr=st,
                    chz_ptr=f32, tot_ptr=f32, totz_ptr=f32)
        scalars = dict(H="i32", scale="fp32", c_psi="fp32", eps="fp32")
        consts = dict(layout, REVERSE=which == "state_rev", NORMALIZE=True, STORE_TOTAL=True)
        return jit._state_kernel, ptrs, scalars, consts, options
    if base == "out":
        ptrs = dict(q_ptr=x, k_ptr=x, v_ptr=x, o_ptr=x, den_ptr=f32, hc_ptr=st, hz_ptr=f32, ss_ptr=st, sz_ptr=f32,
                    seg_ptr="*i32", tile_ptr="*i32")
        scalars = dict(H="i32", scale="fp32", eps="fp32")
        consts = dict(layout, NORMALIZE=True, HAS_START=True)
        return jit._out_kernel, ptrs, scalars, consts, options
    grad_out = x if nvb == 1 else f32  # several Dv blocks: fp32 partials of dq, dk
    ptrs = dict(q_ptr=x, k_ptr=x, v_ptr=x, do_ptr=x, den_ptr=f32, h_ptr=f32, hc_ptr=st, hz_ptr=f32, ss_ptr=st,
                sz_ptr=f32, rc_ptr=st, rz_ptr=f32, rs_ptr=st, rsz_ptr=f32, dq_ptr=grad_out, dk_ptr=grad_out,
                dv_ptr=x, seg_ptr="*i32", tile_ptr="*i32")
    scalars = dict(H="i32", NTOK="i32", scale="fp32", eps="fp32")
    consts = dict(layout, NORMALIZE=True, HAS_START=True, HAS_RSTART=True)
    return jit._grad_kernel, ptrs, scalars, consts, options


def _tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _resources(cubin: bytes, workdir: str, name: str) -> Dict[str, int]:
    path = os.path.join(workdir, name + ".cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    cuobjdump = os.path.join(_tools_dir(), "cuobjdump")
    usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line for {path}:\n{usage}")
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    count = lambda pattern: len(re.findall(pattern, sass))  # noqa: E731
    return dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)), static_shared=int(m.group(3)),
                spill_stores=count(r"\bSTL\b"), spill_loads=count(r"\bLDL\b"), hgmma=count(r"\bHGMMA\b"),
                hmma=count(r"\bHMMA\b"), ffma=count(r"\bFFMA\b"), sass_instructions=count(r"/\*[0-9a-f]{4,}\*/ "))


def _require_compiled_kernels(workdir: str) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 makes the kernels interpreted Python, which compiles to nothing: "
                           "unset it")
    os.makedirs(workdir, exist_ok=True)


def _compile_into(row: dict, fn, signature: dict, consts: dict, options: dict, arch: int, workdir: str,
                  name: str) -> dict:
    """``row`` with the resources of ``fn`` compiled for sm_``arch`` (its cubin kept as ``workdir/name.cubin``), or
    the compile error (a variant that does not compile is a result too, e.g. out of shared memory), and the time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = time.time()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                           target=GPUTarget("cuda", arch, 32), options=options)
        row.update(_resources(k.asm["cubin"], workdir, name))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    row["compile_s"] = round(time.time() - t, 1)
    return row


def compile_variant(variant: dict, arch: int, workdir: str, kernels=KERNELS) -> List[dict]:
    """One row per kernel (of ``kernels``) of ``variant``: its resources, or the compile error."""
    from kernels.linear_attention.triton_chunk.config import ChunkLaunchConfig

    _require_compiled_kernels(workdir)
    variant = dict(variant)
    dtype = _DTYPES[variant.pop("dtype", "bf16")]
    dv = int(variant.pop("dv", 10))
    kind = variant.pop("kind", "rebased")
    config = ChunkLaunchConfig(**variant)
    rows = []
    for which in kernels:
        fn, ptrs, scalars, consts, options = _launch(which, dtype, dv, kind == "based", config)
        names = list(inspect.signature(fn.fn).parameters)
        signature = {n: "constexpr" if n in consts else ptrs.get(n) or scalars[n] for n in names}
        row = dict(kernel=which, warps=options["num_warps"], stages=options.get("num_stages"), chunk=consts["C"],
                   tile=consts["TS"], bv=consts["BV"])
        tag = "_".join(f"{key}{val}" for key, val in sorted(variant.items()))
        rows.append(_compile_into(row, fn, signature, consts, options, arch, workdir,
                                  f"{which}_{dtype}_dv{dv}_{kind}_{tag}"))
    return rows


def _table(results: List[dict]) -> str:
    head = ("| variant | kernel | warps | regs | stack B | spill st / ld (SASS) | HGMMA | HMMA | FFMA |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for res in results:
        label = json.dumps(res["variant"], separators=(",", ":"))
        for r in res["kernels"]:
            if "error" in r:
                lines.append(f"| `{label}` | {r['kernel']} | {r['warps']} | {r['error']} | | | | | |")
                continue
            lines.append(f"| `{label}` | {r['kernel']} | {r['warps']} | {r['registers']} | {r['stack_bytes']} | "
                         f"{r['spill_stores']} / {r['spill_loads']} | {r['hgmma']} | {r['hmma']} | {r['ffma']} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default='[{"dtype": "bf16"}, {"dtype": "fp32"}, {"dtype": "fp32", "fp32_dot": '
                                           '"tf32x3"}]',
                    help="JSON list of variants (ChunkLaunchConfig knobs + dtype, dv, kind)")
    ap.add_argument("--dtype", default=None, help="default dtype of every variant that names none")
    ap.add_argument("--dv", type=int, default=None, help="default value-head width of every variant (10)")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="which kernels (all)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: sm_90)")
    ap.add_argument("--workdir", default="/tmp/kernels_resources", help="where the cubins are kept")
    ap.add_argument("--out", default=None, help="write kernels_resources_<triton>_<date>.json/.md here")
    args = ap.parse_args(argv)

    import triton

    from benchmarks.results_io import save_results

    variants = json.loads(args.variants)
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise SystemExit("--variants must be a JSON list of objects")
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    for v in variants:
        v = dict(v)
        if args.dtype and "dtype" not in v:
            v["dtype"] = args.dtype
        if args.dv and "dv" not in v:
            v["dv"] = args.dv
        rows = compile_variant(v, args.arch, args.workdir, args.kernels)
        results.append(dict(variant=v, kernels=rows))
        print(_table([results[-1]]), end="", flush=True)
    date = time.strftime("%Y-%m-%d")
    command = "python -m benchmarks.kernels_resources " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = (f"# Chunked kernels' resources, compiled for sm_{args.arch} without a GPU: triton {triton.__version__}, "
              f"{date}\n\nCommand: `{command}`. Per thread: registers, stack bytes; static counts in the SASS: "
              "local stores / loads (spills), HGMMA, HMMA, FFMA.\n\n")
    if args.out:
        stem = save_results(args.out, "kernels_resources", f"triton{triton.__version__}", date,
                            dict(triton=triton.__version__, arch=args.arch, date=date, command=command,
                                 results=results), header + _table(results))
        print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
