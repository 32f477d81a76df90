"""Tune the Triton (Re)Based chunk kernels on one GPU: check and time tuning variants, then profile the best.

Each variant (a dict of ``kernels.linear_attention.triton_chunk.ChunkLaunchConfig`` knobs) runs in its own process,
so a CUDA fault in one does not stop the others. Pass 1 compiles all variants in parallel (Triton's on-disk cache
keeps the binaries) and checks each against the float64 reference (B=2, T=2048, H=4, bf16); pass 2 times them one
after the other; then the fastest correct variant is profiled kernel by kernel (torch.profiler, CUDA time per kernel
name).

    python -m benchmarks.kernels_tune [--out DIR] [--lengths 2048,8192,32768] [--variants JSON_LIST]
    python -m benchmarks.kernels_tune --report RESULT.json [--out DIR]   # (re)write the .md of a saved run

Results: OUT/kernels_tune_<device>_<date>.{json,md} (OUT defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import os
import subprocess
import sys

from benchmarks.results_io import save_results


VARIANTS = [  # around the defaults of triton_chunk (each key overrides one)
    {},
    {"tile": 4},
    {"warps_state": 4},
    {"warps_state": 1},
    {"bv_state": 32},
    {"stages_state": 1},
    {"stages_out": 3, "stages_grad": 3},
    {"warps_out": 8},
    {"target_programs": 264},
]
TOKENS, HEADS, DK, DV = 32768, 16, 16, 64


def _inputs(batch, t, h, dv, dtype, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(batch, t, h, DK, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(batch, t, h, dv, device="cuda", generator=g).to(dtype).requires_grad_()
    do = torch.randn(batch, t, h, dv, device="cuda", generator=g).to(dtype)
    return q, k, v, do


def check(kind: str) -> dict:
    """Relative errors of o, dq, dk, dv vs the float64 chunked reference at B=2, T=2048, H=4, bf16."""
    import torch
    import kernels
    fn = kernels.rebased_attention if kind == "rebased" else kernels.based_attention
    q, k, v, do = _inputs(2, 2048, 4, DV, torch.bfloat16)
    o, _ = fn(q, k, v, backend="triton")
    g = torch.autograd.grad(o, (q, k, v), do)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, _ = fn(*ref, backend="torch", mode="chunk")
    g_ref = torch.autograd.grad(o_ref, ref, do.double())
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()  # noqa: E731
    errs = {"o": rel(o, o_ref), **{n: rel(a, r) for n, a, r in zip(("dq", "dk", "dv"), g, g_ref)}}
    return {"err": errs, "ok": all(e <= 1e-2 for e in errs.values())}


def timing(kind: str, t: int) -> tuple:
    """(forward, forward+backward) median ms per call, and forward+backward GPU time (replayed as a CUDA graph: the
    host's Python and launch overhead, about as large as the GPU work here, left out)."""
    from benchmarks.kernels_speed import bench, bench_graph, linear_calls
    fwd, fwd_bwd = linear_calls(kind, t)
    return round(bench(fwd), 4), round(bench(fwd_bwd), 4), round(bench_graph(fwd_bwd, calls=5), 4)


def profile(kind: str, t: int) -> list:
    """CUDA time per kernel name (ms per fwd+bwd call) for `kind` at length t."""
    import torch
    from benchmarks.kernels_speed import linear_calls
    step = linear_calls(kind, t)[1]
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if us > 0:
            rows[ev.key] = rows.get(ev.key, 0.0) + us / 1e3 / n
    return sorted(([name[:60], round(ms, 4)] for name, ms in rows.items()), key=lambda r: -r[1])


def kernel_stats(dump_dir=None) -> list:
    """Registers, spills, shared memory and layout conversions of every compiled chunk kernel (ttgir dumped)."""
    from kernels.linear_attention.triton_chunk import jit
    rows = []
    for name in ("_state_kernel", "_out_kernel", "_grad_kernel"):
        for entry in getattr(jit, name).device_caches.values():
            for i, ck in enumerate(entry[0].values()):
                ttgir = ck.asm.get("ttgir", "")
                rows.append({"kernel": name, "n_regs": ck.n_regs, "n_spills": ck.n_spills,
                             "shared": getattr(ck.metadata, "shared", None),
                             "convert_layout": ttgir.count("convert_layout"), "local_alloc": ttgir.count("local_alloc"),
                             "wgmma": ttgir.count("warp_group_dot"), "mma_v2": ttgir.count("tt.dot")})
                if dump_dir:
                    with open(os.path.join(dump_dir, f"{name}_{i}.ttgir"), "w") as f:
                        f.write(ttgir)
    return rows


def run_variant(cfg: dict, mode: str, lengths: list) -> dict:
    from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH
    res = {"cfg": cfg}
    try:
        CHUNK_LAUNCH.update(**cfg)  # this process runs one variant; an unknown or invalid knob is its result
        res["rebased"] = check("rebased")
        res["based"] = check("based")
        if mode == "time":
            for t in lengths:
                res[f"rebased_T{t}"] = timing("rebased", t)
            res[f"based_T{lengths[0]}"] = timing("based", lengths[0])
        if mode == "profile":
            res["profile"] = {f"ReBased T={t}": profile("rebased", t) for t in lengths}
            res["profile"][f"Based T={lengths[0]}"] = profile("based", lengths[0])
            dump = os.environ.get("TUNE_DUMP")
            if dump:
                dump = os.path.join(dump, "_".join(f"{k}{v}" for k, v in cfg.items()))
                os.makedirs(dump, exist_ok=True)
            res["kernels"] = kernel_stats(dump)
    except Exception as exc:  # noqa: BLE001 (a fault in one variant is a result, not a crash)
        res["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return res


def _spawn(cfg, mode, lengths, timeout):
    cmd = [sys.executable, "-m", "benchmarks.kernels_tune", "--one", json.dumps(cfg), "--mode", mode, "--lengths",
           ",".join(map(str, lengths))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"cfg": cfg, "error": f"timeout after {timeout} s ({mode})"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[-1][7:]) if line else {"cfg": cfg, "error": (proc.stdout + proc.stderr)[-800:]}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lengths = meta.get("lengths", [2048, 32768])  # runs before 2026-11-23 03:15 UTC timed these two
    lines = [f"# Kernel tuning: {meta['device']}, {meta['date_utc']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; {meta['tokens_per_call']} "
             f"tokens per call, H={meta['heads']}, Dv={meta['dv']}, bf16. Every variant first passed the float64 "
             "check (B=2, T=2048, H=4; relative error of o, dq, dk, dv <= 1e-2). Times: median ms per call (fwd / "
             "fwd+bwd), and fwd+bwd GPU time (CUDA graph) after the bar when measured.", "",
             "| variant (ChunkLaunchConfig) | " + " | ".join(f"ReBased T={t}" for t in lengths)
             + f" | Based T={lengths[0]} |", "|---" * (len(lengths) + 2) + "|"]
    for r in result["variants"]:
        cells = [r.get(key) for key in [f"rebased_T{t}" for t in lengths] + [f"based_T{lengths[0]}"]]
        text = [(f"{c[0]:.3f} / {c[1]:.3f}" + (f" \\| {c[2]:.3f}" if len(c) > 2 else "")) if c
                else r.get("error", "failed check")[:60] for c in cells]
        lines.append(f"| `{json.dumps(r['cfg'])}` | " + " | ".join(text) + " |")
    for prof in result.get("profiles", []):
        lines += ["", f"Profile of `{json.dumps(prof['cfg'])}` (ms per fwd+bwd call, CUDA time per kernel):", ""]
        for case, rows in prof.get("profile", {}).items():
            case = case if "=" in case else f"T={case}"  # runs before 2026-11-23 05:30 UTC profiled ReBased only
            lines.append(f"- {case}: " + ", ".join(f"{name} {ms:.3f}" for name, ms in rows[:5]))
        lines += ["", "| kernel | registers | spills | shared bytes | layout conversions | wgmma dots |",
                  "|---|---|---|---|---|---|"]
        for k in prof.get("kernels", []):
            lines.append(f"| {k['kernel']} | {k['n_regs']} | {k['n_spills']} | {k['shared']} | {k['convert_layout']} "
                         f"| {k['wgmma']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--mode", default="time")
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--variants")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--report", help="a saved kernels_tune JSON: only rewrite its markdown")
    ap.add_argument("--compile-timeout", type=int, default=240)
    ap.add_argument("--profile-all", action="store_true", help="profile every correct variant, not only the best")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.report:
        result = json.load(open(args.report))
        save_results(args.out, "kernels_tune", result["meta"]["device"], result["meta"]["date_utc"][:10], result,
                     markdown(result))
        return
    if args.one is not None:
        print("RESULT " + json.dumps(run_variant(json.loads(args.one), args.mode, lengths)), flush=True)
        return
    import torch
    import triton
    variants = json.loads(args.variants) if args.variants else VARIANTS
    meta = {"device": torch.cuda.get_device_name(), "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds"), "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
        "triton": triton.__version__, "tokens_per_call": TOKENS, "heads": HEADS, "dv": DV, "dtype": "bfloat16",
        "lengths": lengths}
    print(meta, flush=True)
    with cf.ThreadPoolExecutor(max_workers=len(variants)) as pool:  # compile + check, in parallel
        checked = list(pool.map(lambda c: _spawn(c, "check", lengths, args.compile_timeout), variants))
    for r in checked:
        print("check", json.dumps(r), flush=True)
    timed = []
    for r in checked:
        if "error" in r or not (r["rebased"]["ok"] and r["based"]["ok"]):
            timed.append(r)
            continue
        t = _spawn(r["cfg"], "time", lengths, 120)
        print("time", json.dumps(t), flush=True)
        timed.append(t)
    ok = [r for r in timed if f"rebased_T{lengths[0]}" in r]
    best = min(ok, key=lambda r: sum(r[f"rebased_T{t}"][-1] for t in lengths)) if ok else None
    profiles = []
    for r in (ok if args.profile_all else [best] if best else []):
        prof = _spawn(r["cfg"], "profile", lengths, 120)
        profiles.append(prof)
        print("profile of", json.dumps(r["cfg"]), flush=True)
        for row in prof.get("kernels", []):
            print("  kernel", json.dumps(row), flush=True)
        for case, rows in prof.get("profile", {}).items():
            print(f"  {case}:", *(f"    {ms:8.4f} ms  {name}" for name, ms in rows[:6]), sep="\n", flush=True)
    result = {"meta": meta, "variants": timed, "best": best and best["cfg"], "profiles": profiles}
    stem = save_results(args.out, "kernels_tune", meta["device"], meta["date_utc"][:10], result, markdown(result))
    print("wrote", stem + ".{json,md}")


if __name__ == "__main__":
    main()
