"""Map which Triton attention configurations run correctly on this GPU: each case in a fresh process (a CUDA
fault poisons the context), CUDA_LAUNCH_BLOCKING=1 so a fault names its kernel; forward + backward vs the float64
reference, and a fwd+bwd time at 32768 tokens x 16 heads for the cases that pass.

    python -m benchmarks.kernels_diagnose [--out DIR]          # all cases
    python -m benchmarks.kernels_diagnose --case KIND,DTYPE,CHUNK,T,DV   # one case (used by the above)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback



def one(kind: str, dtype_name: str, chunk: int, t: int, dv: int) -> dict:
    import torch

    import kernels

    dtype = getattr(torch, dtype_name)
    fn = kernels.rebased_attention if kind == "rebased" else kernels.based_attention
    res = {"kind": kind, "dtype": dtype_name, "chunk": chunk, "T": t, "dv": dv}
    torch.manual_seed(0)
    b, h = 2, 4
    q, k = (torch.randn(b, t, h, 16, device="cuda") for _ in range(2))
    v = torch.randn(b, t, h, dv, device="cuda")
    leaves = [x.to(dtype).requires_grad_(True) for x in (q, k, v)]
    ref = [x.detach().double().requires_grad_(True) for x in leaves]
    try:
        o, _ = fn(*leaves, backend="triton", chunk_size=chunk)
        o_ref, _ = fn(*ref, backend="torch", mode="chunk")
        w = torch.randn_like(o_ref)
        g = torch.autograd.grad((o.double() * w).sum(), leaves)
        g_ref = torch.autograd.grad((o_ref * w).sum(), ref)
        torch.cuda.synchronize()
        rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()  # noqa: E731
        res["err"] = {"o": rel(o, o_ref), **{n: rel(a, r) for n, a, r in zip(("dq", "dk", "dv"), g, g_ref)}}
        res["ok"] = all(e <= (1e-2 if dtype == torch.bfloat16 else 1e-4) for e in res["err"].values())
    except Exception as e:  # noqa: BLE001
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["where"] = [ln for ln in traceback.format_exc().splitlines() if "triton_chunk" in ln][-2:]
        return res
    import triton.testing

    bb = max(1, 32768 // t)
    q, k = (torch.randn(bb, t, 16, 16, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(bb, t, 16, dv, device="cuda", dtype=dtype, requires_grad=True)
    do = torch.randn(bb, t, 16, dv, device="cuda", dtype=dtype)

    def step():
        o, _ = fn(q, k, v, backend="triton", chunk_size=chunk)
        torch.autograd.backward(o, do)

    res["fwd_bwd_ms_32k_tokens"] = triton.testing.do_bench(step, warmup=10, rep=50, return_mode="median")
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case")
    p.add_argument("--out")
    args = p.parse_args()
    if args.case:
        kind, dt, chunk, t, dv = args.case.split(",")
        print("RESULT " + json.dumps(one(kind, dt, int(chunk), int(t), int(dv))), flush=True)
        return
    cases = [("rebased", "bfloat16", c, 2048, 64) for c in (64, 32, 16)]
    cases += [("rebased", "float32", c, 2048, 64) for c in (64, 32)]
    cases += [("based", "bfloat16", c, 2048, 64) for c in (64, 32)]
    cases += [("rebased", "bfloat16", c, t, dv) for c in (32, 64) for t, dv in ((300, 64), (8192, 64), (2048, 128))]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    results = []
    for case in cases:
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels_diagnose", "--case", ",".join(map(str, case))], env=env,
                                  capture_output=True, text=True, timeout=120)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(line[-1][7:]) if line else {"case": case, "ok": False,
                                                        "crash": (proc.stdout + proc.stderr)[-600:]}
        except subprocess.TimeoutExpired:
            r = {"case": case, "ok": False, "crash": "timeout"}
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        with open(os.path.join(args.out, "kernels_diagnose.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
