"""Does the precision of the attention change what a trained MQAR model recalls? A CPU probe.

    python -m benchmarks.mqar_precision_probe CKPT [CKPT ...] [--examples 256] [--out DIR]

Each CKPT is an MQAR run checkpoint (``<output>.ckpt``, e.g. brought back from a GPU session). Its weights are
evaluated on the first ``--examples`` sequences of the setting's test split four ways, on the CPU:

* ``float64``: the model and the attention (the torch chunk form) in float64, the exact answer;
* ``fp32``: the same in float32;
* ``bf16 kernel``: the model in float32, the attention as the bf16 Triton kernels compute it, emulated: q, k, v
  rounded to bf16, every matmul operand rounded to bf16 with fp32 sums (the tensor cores), the chunk states and
  normaliser states stored in bf16 (as ``_state_dtype`` stores them for bf16 inputs);
* ``bf16 autocast + bf16 kernel``: the above, and the rest of the model under CPU bf16 autocast, as the training
  run's evaluation ran on the GPU.

Accuracy over that many queries has a standard error of about sqrt(p(1-p)/queries) (0.001 at 131k queries, p 0.2).
If the bf16 rows match float64 to within that, the precision at inference does not limit recall at this point of
training (training in bf16 may still differ: not what this measures).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os

import torch
import torch.nn.functional as F

from kernels.linear_attention import reference
from kernels.linear_attention.feature_maps import feature_map, kernel_from_dot
from pretrain.atomic import write_text_atomic
from pretrain.models import build_model
from pretrain.mqar.config import load_mqar_config
from pretrain.mqar.data import load_mqar
from pretrain.mqar.train import evaluate

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def _chunk_as_bf16_kernel(kind, q, k, v, scale, valid, kv0, z0, want_state, chunk_size):
    """reference._core_chunk with the bf16 kernels' roundings (see the module docstring)."""
    q, k, v = _bf16(q), _bf16(k), _bf16(v)
    n, t, h, dk = q.shape
    dv, c = v.shape[-1], chunk_size
    n_chunks = max(1, -(-t // c))
    pad = n_chunks * c - t
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        valid = F.pad(valid, (0, pad), value=False)
    qc, kc = q.reshape(n, n_chunks, c, h, dk), k.reshape(n, n_chunks, c, h, dk)
    vc = v.reshape(n, n_chunks, c, h, dv)
    validc = valid.reshape(n, n_chunks, c)
    phi_q = feature_map(kind, qc, scale)
    phi_k = feature_map(kind, kc, scale) * validc[..., None, None].to(q.dtype)
    d_kv = torch.einsum("ncihf,ncihv->nchfv", _bf16(phi_k), vc)
    kv_all = _bf16(torch.cumsum(torch.cat([kv0[:, None], d_kv], dim=1), dim=1))
    z_all = _bf16(torch.cumsum(torch.cat([z0[:, None], phi_k.sum(2)], dim=1), dim=1))
    num = torch.einsum("ncihf,nchfv->ncihv", _bf16(phi_q), kv_all[:, :-1])
    den = torch.einsum("ncihf,nchf->ncih", phi_q, z_all[:, :-1])
    a = kernel_from_dot(kind, torch.einsum("ncihd,ncjhd->nchij", qc, kc) * scale)
    mask = torch.ones(c, c, dtype=torch.bool).tril() & validc[:, :, None, None, :]
    a = torch.where(mask, a, torch.zeros((), dtype=a.dtype))
    num = num + torch.einsum("nchij,ncjhv->ncihv", _bf16(a), vc)
    den = den + a.sum(-1).permute(0, 1, 3, 2)
    num = num.reshape(n, n_chunks * c, h, dv)[:, :t]
    den = den.reshape(n, n_chunks * c, h)[:, :t]
    return num, den, ((kv_all[:, -1], z_all[:, -1]) if want_state else None)


@contextlib.contextmanager
def _attention_as_bf16_kernel():
    exact = reference._core_chunk
    reference._core_chunk = _chunk_as_bf16_kernel
    try:
        yield
    finally:
        reference._core_chunk = exact


def probe(path: str, examples: int) -> list[dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg_dict = state["config"]
    m, d = cfg_dict["model"], cfg_dict["data"]
    cfg = load_mqar_config(os.path.join(ROOT, "configs/mqar/base.yaml"),
                           [f"model.mixer={m['mixer']}", f"model.d_model={m['d_model']}",
                            f"data.seq_len={d['seq_len']}", "train.device=cpu"])
    model = build_model(cfg.model_config())
    model.load_state_dict(state["model"])
    model.eval()
    data = load_mqar(cfg.data.spec(), cache_dir=os.path.join(ROOT, ".cache/mqar"))
    split = data.test
    keep = torch.arange(min(examples, len(split)))
    split.keys, split.values, split.qpos = split.keys[keep], split.values[keep], split.qpos[keep]
    progress = state["progress"]
    gpu = progress["history"][-1] if progress["history"] else {}
    rows = []
    ways = [("float64", torch.float64, False, False), ("fp32", torch.float32, False, False),
            ("bf16 kernel", torch.float32, True, False), ("bf16 autocast + bf16 kernel", torch.float32, True, True)]
    for name, dtype, bf16_kernel, autocast in ways:
        model.to(dtype)

        def amp():
            return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

        with torch.no_grad(), (_attention_as_bf16_kernel() if bf16_kernel else contextlib.nullcontext()):
            out = evaluate(lambda inputs, qpos: model.hidden_states(inputs, select=qpos), model.lm_head, split, 16,
                           amp)
        rows.append({"checkpoint": os.path.basename(path), "setting": f"{m['mixer']} d{m['d_model']} L{d['seq_len']}",
                     "epoch": progress["epoch"], "way": name, "queries": int(split.values.numel()), **out,
                     "gpu_valid_accuracy": gpu.get("valid_accuracy")})
        print(rows[-1], flush=True)
    return rows


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--out", help="write mqar_precision_probe_<date>.md here")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = [r for path in args.checkpoints for r in probe(path, args.examples)]
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# MQAR precision probe (CPU), {date}", "",
             f"Command: `python -m benchmarks.mqar_precision_probe {' '.join(os.path.basename(c) for c in args.checkpoints)} "
             f"--examples {args.examples}`; torch {torch.__version__}.", "",
             "| checkpoint | setting | epoch | way | queries | valid accuracy | valid loss | the GPU run's accuracy (full split) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['setting']} | {r['epoch']} | {r['way']} | {r['queries']} | "
                     f"{r['valid_accuracy']:.4f} | {r['valid_loss']:.4f} | {_fmt(r['gpu_valid_accuracy'])} |")
    print("\n".join(lines))
    if args.out:
        write_text_atomic(os.path.join(args.out, f"mqar_precision_probe_{date[:10]}.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
