"""Consolidated single-file export of a training checkpoint: ``model.safetensors`` + ``config.yaml``.

Works offline on one CPU process from any checkpoint the trainer wrote (DCP or DeepSpeed, any world size):

    python -m pretrain.training.export runs/x/checkpoints/step_00001000 runs/x/export

The result loads without the trainer: ``pretrain.models.io.load_exported("runs/x/export")``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from pretrain.config import ConfigError, from_dict
from pretrain.models.config import ModelConfig
from pretrain.models.io import WEIGHTS, weight_problems, write_export
from pretrain.models.model import CausalLM
from pretrain.training.checkpoint import CheckpointError, find_latest, is_complete, read_meta, verify


def _model_state_from_checkpoint(path: str, meta: dict) -> dict[str, torch.Tensor]:
    if meta["format"] == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # only for DCP checkpoints

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "full.pt")
            dcp_to_torch_save(os.path.join(path, "dcp"), out)
            full = torch.load(out, weights_only=False, map_location="cpu")
        return full["model"]
    if meta["format"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional and heavy

        return get_fp32_state_dict_from_zero_checkpoint(os.path.join(path, "deepspeed"), tag="native")
    raise ValueError(f"{path}: unknown checkpoint format {meta['format']!r}")


def _check_replaceable(out_dir: str) -> None:
    """The export replaces ``out_dir`` whole: only a previous export or an empty folder may be there (a checkpoint
    root or a run folder given by mistake would be deleted)."""
    out = Path(out_dir)
    if out.exists() and not (out / WEIGHTS).is_file() and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an export (no {WEIGHTS}); not replacing it, choose a new or "
                          "empty folder")


def _check_model(path: str, meta: dict, state: dict) -> None:
    """The model config in the checkpoint's meta.json is one this code builds, and the weights fit it: checked here,
    naming the checkpoint, so that no export is published that cannot be loaded (a checkpoint of another code
    version)."""
    source = os.path.join(path, "meta.json")
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{source}: no model_config recorded; cannot export this checkpoint")
    cfg = from_dict(ModelConfig, meta["model_config"], source=f"{source} (model_config)")
    with torch.device("meta"):
        model = CausalLM(cfg)
    problems = weight_problems(model, state, tied_head_stored=True)
    if problems:
        raise CheckpointError(f"{path}: its weights do not match the model config in {source}: {'; '.join(problems)}")


def export_checkpoint(path: str, out_dir: str, dtype: str = "float32") -> str:
    out_dir = os.path.abspath(out_dir)  # "." or "run/" name the folder itself (the export replaces it whole)
    _check_replaceable(out_dir)
    problems = verify(path)
    if problems:
        raise CheckpointError(f"{path} fails verification, not exporting it: {'; '.join(problems)}")
    meta = read_meta(path)
    state = _model_state_from_checkpoint(path, meta)
    _check_model(path, meta, state)
    write_export(state, meta["model_config"], out_dir, metadata={"format": "pt", "step": meta["step"]},
                 dtype=getattr(torch, dtype),
                 provenance={"source": os.path.abspath(path), "step": meta["step"],
                             "tokens_seen": meta.get("tokens_seen"), "dtype": dtype})
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint dir (step_XXXXXXXX) or a checkpoint root (its latest is used)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    path = a.checkpoint if is_complete(a.checkpoint) else find_latest(a.checkpoint)
    try:
        if path is None:
            raise ConfigError(f"no complete checkpoint at {a.checkpoint}")
        print(export_checkpoint(path, a.out_dir, a.dtype))
    except ConfigError as e:  # a checkpoint that fails verification, an output folder it must not replace
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None  # as the trainer and the evaluation: 2 for input the user can fix


if __name__ == "__main__":
    main()
