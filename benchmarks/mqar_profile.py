"""Where an MQAR training step spends its GPU time, and the attention kernels at the MQAR models' shapes.

    python -m benchmarks.mqar_profile profile [--setting rebased:128:2048] [--steps 4]
    python -m benchmarks.mqar_profile errors [--precisions bf16,fp32,tf32x3] [--variants JSON]  # error vs float64
    python -m benchmarks.mqar_profile attention [--variants JSON] # fwd+bwd ms of the op per launch-config variant
    python -m benchmarks.mqar_profile head [--setting rebased:128:2048]  # the LM head's matmuls per precision

``profile`` builds the run exactly as ``python -m pretrain.mqar`` does (compiled body, fused LM head + loss),
warms it up, then records ``--steps`` optimizer steps with torch.profiler and prints the CUDA time per kernel
(ms per optimizer step, grouped by name) and the share of the step. ``attention`` times the op alone (batch 256 ×
2048 tokens × 12 heads, feature dim 16, value heads of 10 and bf16 unless a variant sets "dv" or "dtype"), each
variant in its own process. ``head`` times the three matmuls of the fused LM head (logits, hidden and weight
gradients) of one chunk of query rows at the setting's d_model, vocabulary 8192, in IEEE fp32 (cuBLAS, TF32 off),
3xTF32 (``kernels.matmul_tf32x3``), TF32 and bf16 (cuBLAS), with each one's relative error against float64.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

from benchmarks.kernels_tune import _inputs  # random q, k [B, T, H, 16], v and the output gradient on CUDA


def profile(setting: str, steps: int, overrides: list[str]) -> None:
    import torch

    from pretrain.mqar.config import load_mqar_config
    from pretrain.mqar.train import MQARRun

    mixer, d, L = setting.split(":")
    cfg = load_mqar_config(os.path.join(ROOT, "configs/mqar/base.yaml"),
                           [f"model.mixer={mixer}", f"model.d_model={d}", f"data.seq_len={L}", "log.tqdm=false",
                            f"train.max_steps={steps}", *overrides])
    run = MQARRun(cfg, log=lambda *a: None)
    t = time.time()
    run.train_epoch(0)  # compiles; stops after `steps` optimizer steps
    torch.cuda.synchronize()
    print(f"warm-up ({steps} steps, compile included): {time.time() - t:.1f} s", flush=True)
    run.progress.step = 0
    t = time.time()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run.train_epoch(0)
        torch.cuda.synchronize()
    wall = (time.time() - t) / steps * 1e3
    rows = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if us > 0:
            rows[ev.key] = rows.get(ev.key, 0.0) + us / 1e3 / steps
    total = sum(rows.values())
    print(f"{setting}: {wall:.2f} ms per optimizer step (profiled wall), {total:.2f} ms GPU time; micro batch "
          f"{run.micro}; per epoch ≈ {total * 196 / 1e3:.2f} s GPU")
    for name, ms in sorted(rows.items(), key=lambda r: -r[1])[:30]:
        print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  {name[:110]}")


def errors(precisions: list[str], tunings: list[dict]) -> None:
    """Relative error of o, dq, dk, dv against float64 at the MQAR shapes, per launch-config variant (a dict of
    ChunkLaunchConfig knobs) and precision: bf16 inputs, fp32 inputs multiplied in IEEE fp32 ("fp32") or in 3xTF32
    ("tf32x3")."""
    import torch

    import kernels
    from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH, ChunkLaunchConfig

    for tuning, precision in ((t, p) for t in tunings for p in precisions):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        CHUNK_LAUNCH.set(ChunkLaunchConfig(fp32_dot="tf32x3" if precision == "tf32x3" else "ieee", **tuning))
        label = f"{precision} {json.dumps(tuning)}" if tuning else precision
        for kind in ("rebased", "based"):
            fn = kernels.rebased_attention if kind == "rebased" else kernels.based_attention
            for dv in (5, 10, 16, 64):
                q, k, v, do = _inputs(8, 2048, 12, dv, dtype)
                o, _ = fn(q, k, v, backend="triton")
                g = torch.autograd.grad(o, (q, k, v), do)
                ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
                o_ref, _ = fn(*ref, backend="torch", mode="chunk")
                g_ref = torch.autograd.grad(o_ref, ref, do.double())
                err = {n: ((a.double() - r).norm() / r.norm()).item()
                       for n, a, r in zip(("o", "dq", "dk", "dv"), (o, *g), (o_ref, *g_ref))}
                errs = " ".join(f"{n} {e:.2e}" for n, e in err.items())
                print(f"{kind} dv={dv} {label} B=8 T=2048 H=12: {errs}", flush=True)


def attention_one(tuning: dict) -> dict:
    import torch
    import triton

    import kernels
    from kernels.linear_attention.triton_chunk import CHUNK_LAUNCH

    # this process runs one variant: a dict of ChunkLaunchConfig knobs, "dtype" (bfloat16 unless given), "dv"
    # (the value-head width: 10 unless given; the MQAR models' floor(d_model / 12)) and "batch" (sequences of 2048
    # tokens: 256 unless given, the micro-batch of the MQAR runs at seq 2048)
    tuning = dict(tuning)
    dtype = getattr(torch, tuning.pop("dtype", "bfloat16"))
    dv = tuning.pop("dv", 10)
    batch = tuning.pop("batch", 256)
    CHUNK_LAUNCH.update(**tuning)
    out = {"tuning": tuning, "dtype": str(dtype)[6:], "dv": dv, "batch": batch}
    for kind in ("rebased", "based"):
        fn = kernels.rebased_attention if kind == "rebased" else kernels.based_attention
        q, k, v, do = _inputs(batch, 2048, 12, dv, dtype)

        def step():
            o, _ = fn(q, k, v, backend="triton")
            torch.autograd.grad(o, (q, k, v), do)

        step()
        out[kind] = round(triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median"), 3)
    return out


def attention(variants: list[dict]) -> None:
    for tuning in variants:  # one process each: a tuning's compiled kernels and faults stay in it
        cmd = [sys.executable, "-m", "benchmarks.mqar_profile", "attention-one", json.dumps(tuning)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        print(lines[-1][7:] if lines else f"{tuning}: failed {proc.stderr[-400:]}", flush=True)


def head(setting: str) -> None:
    import torch
    import triton

    import kernels

    d = int(setting.split(":")[1])
    rows = 32768  # one chunk of the fused loss (train.loss_chunk_rows), what each matmul call sees
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(rows, d, device="cuda", generator=g)
    w = torch.randn(8192, d, device="cuda", generator=g) * d ** -0.5
    grad = torch.randn(rows, 8192, device="cuda", generator=g) * 1e-3
    shapes = {"logits h @ w.T": (h, w.T), "grad_hidden g @ w": (grad, w), "grad_weight g.T @ h": (grad.T, h)}

    def cublas(a, b, tf32):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            return a @ b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False

    ways = {"fp32 (cuBLAS, IEEE)": lambda a, b: cublas(a, b, False), "tf32x3 (Triton)": kernels.matmul_tf32x3,
            "tf32 (cuBLAS)": lambda a, b: cublas(a, b, True), "bf16 (cuBLAS)": lambda a, b: a.bfloat16() @ b.bfloat16()}
    print(f"{setting}: {rows} query rows, d_model {d}, vocabulary 8192; ms (do_bench median), relative error vs fp64")
    for name, (a, b) in shapes.items():
        ref = a.double() @ b.double()
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        for way, fn in ways.items():
            ms = triton.testing.do_bench(lambda: fn(a, b), warmup=10, rep=100, return_mode="median")
            err = ((fn(a, b).double() - ref).norm() / ref.norm()).item()
            print(f"  {name:22s} {way:20s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s  err {err:.1e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["profile", "errors", "attention", "attention-one", "head"])
    p.add_argument("arg", nargs="?")
    p.add_argument("--setting", default="rebased:128:2048")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variants", default='[{}]')
    p.add_argument("--precisions", default="bf16", help="errors: comma-separated bf16, fp32, tf32x3")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="MQAR config override")
    args = p.parse_args()
    if args.what == "profile":
        profile(args.setting, args.steps, args.override)
    elif args.what == "errors":
        errors(args.precisions.split(","), json.loads(args.variants))
    elif args.what == "head":
        head(args.setting)
    elif args.what == "attention":
        attention(json.loads(args.variants))
    else:
        print("RESULT " + json.dumps(attention_one(json.loads(args.arg))), flush=True)


if __name__ == "__main__":
    main()
