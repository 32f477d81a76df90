"""The LM head's loss and gradients: the chunked path (cuBLAS logits, Triton softmax-gradient kernel written over
them, two cuBLAS products) against the fused Triton kernels (``kernels.linear_cross_entropy_grad``: no logits in
memory), at the MQAR head (one micro-batch of query rows, vocabulary 8192) and the given hidden sizes.

    python -m benchmarks.linear_cross_entropy_speed [--rows 131072] [--vocab 8192] [--hidden 64 128 256]
        [--variants JSON] [--out FILE.json]

Each line: median ms of one call as the trainer makes it (forward and backward of ``chunked_cross_entropy``; the
fused op's call with both gradients), from ``triton.testing.do_bench``, and each fused variant's relative error
against the chunked path's loss and gradients (both bf16; the float64 check is tests/kernels). Variants: a JSON list
of {"blocks": [rows, words], "num_warps": n}; {} is the default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch


def main() -> None:
    import triton

    import kernels
    from pretrain.atomic import write_json_atomic
    from kernels.linear_cross_entropy.triton_ops import linear_cross_entropy_grad_triton
    from pretrain.models.loss import chunked_cross_entropy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--variants", default='[{}, {"blocks": [64, 64]}, {"blocks": [128, 64]}, '
                                              '{"blocks": [64, 128], "num_warps": 4}, {"blocks": [128, 128]}]')
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = json.loads(args.variants)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    results = []
    for d in args.hidden:
        torch.manual_seed(0)
        h = torch.randn(args.rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(args.vocab, d, device="cuda") / d ** 0.5).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, args.vocab, (args.rows,), device="cuda")
        scale = torch.full((args.rows,), 1.0 / args.rows, device="cuda")

        def chunked():
            h.grad = w.grad = None
            loss = chunked_cross_entropy(h, w, labels)
            loss.backward()
            return loss

        ref_loss = chunked().detach()
        ref_dh, ref_dw = h.grad.clone(), w.grad.clone()
        ms = triton.testing.do_bench(chunked, warmup=50, rep=300)
        results.append({"hidden": d, "path": "chunked", "ms": ms})
        print(f"d {d:4d}  chunked                            {ms:8.3f} ms", flush=True)
        for variant in variants:
            kwargs = {k: tuple(v) if k == "blocks" else v for k, v in variant.items()}
            if d > kernels.linear_cross_entropy.MAX_HIDDEN:
                continue

            def fused():
                return linear_cross_entropy_grad_triton(h.detach(), w.detach(), labels, scale, **kwargs)

            try:
                loss, dh, dw = fused()
                ms = triton.testing.do_bench(fused, warmup=50, rep=300)
            except Exception as err:  # a variant that does not compile (registers, shared memory) is reported
                print(f"d {d:4d}  fused {json.dumps(variant):28s} failed: {type(err).__name__}: {err}"[:300])
                continue
            errors = {"loss": rel(loss.sum() / args.rows, ref_loss), "dh": rel(dh, ref_dh), "dw": rel(dw, ref_dw)}
            results.append({"hidden": d, "path": "fused", "variant": variant, "ms": ms, "rel_error": errors})
            print(f"d {d:4d}  fused {json.dumps(variant):28s} {ms:8.3f} ms  errors vs chunked "
                  + " ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    if args.out:
        write_json_atomic(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "triton": triton.__version__, "date": datetime.datetime.now(
                                         datetime.timezone.utc).isoformat(timespec="seconds"),
                                     "command": " ".join(["python -m benchmarks.linear_cross_entropy_speed",
                                                          *sys.argv[1:]]),
                                     "rows": args.rows, "vocab": args.vocab, "dtype": "bf16", "results": results})


if __name__ == "__main__":
    main()
