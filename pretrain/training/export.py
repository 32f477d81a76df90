"""Consolidated single-file export of a training checkpoint: ``model.safetensors`` + ``config.yaml``.

Works offline on one CPU process from any checkpoint the trainer wrote (DCP or DeepSpeed, any world size):

    python -m pretrain.training.export runs/x/checkpoints/step_00001000 runs/x/export

The result loads without the trainer::

    from pretrain.training.export import load_exported   # or by hand:
    cfg = pretrain.models.load_model_config("export/config.yaml"); model = build_model(cfg)
    model.load_state_dict(safetensors.torch.load_file("export/model.safetensors"), strict=False)  # tied head
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import yaml


def _model_state_from_checkpoint(path: str, meta: dict) -> dict[str, torch.Tensor]:
    if meta["format"] == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "full.pt")
            dcp_to_torch_save(os.path.join(path, "dcp"), out)
            full = torch.load(out, weights_only=False, map_location="cpu")
        return full["model"]
    if meta["format"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(os.path.join(path, "deepspeed"), tag="native")
    raise ValueError(f"{path}: unknown checkpoint format {meta['format']!r}")


def export_checkpoint(path: str, out_dir: str, dtype: str = "float32") -> str:
    from safetensors.torch import save_file

    from pretrain.training.checkpoint import read_meta

    meta = read_meta(path)
    state = _model_state_from_checkpoint(path, meta)
    model_cfg = meta["model_config"]
    if model_cfg.get("tie_embeddings", True):
        state.pop("lm_head.weight", None)  # the same tensor as embed.weight; safetensors stores it once
    target = getattr(torch, dtype)
    state = {k: v.detach().to("cpu", target).contiguous() for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".model.safetensors.tmp-{os.getpid()}")
    save_file(state, tmp, metadata={"format": "pt", "step": str(meta["step"])})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(model_cfg, f, sort_keys=False)
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump({"source": os.path.abspath(path), "step": meta["step"], "tokens_seen": meta.get("tokens_seen"),
                   "dtype": dtype}, f, indent=1)
    return out_dir


def load_exported(out_dir: str, device: str = "cpu"):
    """Build the CausalLM of an export (no trainer involved)."""
    from safetensors.torch import load_file

    from pretrain.models import build_model, load_model_config

    cfg = load_model_config(os.path.join(out_dir, "config.yaml"))
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")), strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"export does not match the model: missing {missing}, unexpected {unexpected}")
    return model.to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint dir (step_XXXXXXXX) or a checkpoint root (its latest is used)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    from pretrain.training.checkpoint import find_latest, is_complete

    path = a.checkpoint if is_complete(a.checkpoint) else find_latest(a.checkpoint)
    if path is None:
        raise SystemExit(f"no complete checkpoint at {a.checkpoint}")
    print(export_checkpoint(path, a.out_dir, a.dtype))


if __name__ == "__main__":
    main()
