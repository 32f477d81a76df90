"""Consolidated model export: ``model.safetensors`` + ``model_config.yaml`` in one directory, loadable without
the trainer (``load_exported``). Written to a temporary directory, fsynced, then renamed into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from pretrain.config import from_dict, to_dict
from pretrain.models.config import ModelConfig
from pretrain.models.model import CausalLM


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_model(model: CausalLM, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``model`` (full, unsharded weights on this process) to ``out_dir`` atomically."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"),
               metadata={k: str(v) for k, v in (metadata or {}).items()})  # tied weights are stored once
    (tmp / "model_config.yaml").write_text(yaml.safe_dump(to_dict(model.config), sort_keys=False))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    _fsync(out.parent)
    return out


def load_exported(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> CausalLM:
    path = Path(path)
    cfg_path = path / "model_config.yaml"
    cfg = from_dict(ModelConfig, yaml.safe_load(cfg_path.read_text()), source=str(cfg_path))
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    load_model(model, str(path / "model.safetensors"), device=str(device))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
