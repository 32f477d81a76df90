"""Consolidated model export: ``model.safetensors`` + ``config.yaml`` (the model config) in one directory,
loadable without the trainer (``load_exported``). Written to a temporary directory, fsynced, then renamed;
``export.json`` beside them holds both files' SHA-256 (checked on load) and where the weights came from.

A tied LM head is stored once (as ``embed.weight``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from pretrain.atomic import publish_dir
from pretrain.config import ConfigError, from_dict, to_dict
from pretrain.data.tokenizer import file_sha256
from pretrain.models.config import ModelConfig
from pretrain.models.model import CausalLM

WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "config.yaml", "export.json"


def write_export(state_dict: dict[str, torch.Tensor], model_config: dict, out_dir: str | os.PathLike,
                 metadata: dict | None = None, dtype: torch.dtype | None = None,
                 provenance: dict | None = None) -> Path:
    """Write full (unsharded) weights and the model config to ``out_dir`` atomically; ``provenance`` (where the
    weights came from) goes to ``export.json`` beside them."""
    out = Path(out_dir)
    state = dict(state_dict)
    if model_config.get("tie_embeddings", True):
        state.pop("lm_head.weight", None)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={k: str(v) for k, v in (metadata or {}).items()})
        (tmp / CONFIG).write_text(yaml.safe_dump(model_config, sort_keys=False))
        record = {**(provenance or {}), "sha256": {name: file_sha256(tmp / name) for name in (WEIGHTS, CONFIG)}}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=1))
        return publish_dir(tmp, out)
    except BaseException:  # a failed export (a full disk, an interrupt) leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_model(model: CausalLM, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    return write_export(model.state_dict(), to_dict(model.config), out_dir, metadata)


def _verify_files(path: Path) -> None:
    """Check the files against the SHA-256 ``export.json`` records (exports written before it are not checked)."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return
    try:
        recorded = json.loads(manifest.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{manifest}: unreadable ({e})") from None
    # an export.json records both files' digests: one without them (or of another shape) vouches for nothing
    if not (isinstance(recorded, dict) and all(isinstance(recorded.get(n), str) for n in (WEIGHTS, CONFIG))):
        raise ConfigError(f"{manifest}: malformed: 'sha256' must map {WEIGHTS} and {CONFIG} to their digests; "
                          "export the checkpoint again")
    for name in (WEIGHTS, CONFIG):
        digest = recorded[name]
        if file_sha256(path / name) != digest:
            raise ConfigError(f"{path / name}: SHA-256 differs from the one {manifest} records (damaged or changed "
                              "since the export); export the checkpoint again")


def load_exported(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> CausalLM:
    """The exported model in eval mode; a missing, damaged or changed file raises ``ConfigError`` naming it."""
    path = Path(path)
    cfg_path = path / CONFIG
    for needed in (cfg_path, path / WEIGHTS):
        if not needed.is_file():
            raise ConfigError(f"{needed}: missing; {path} is not a complete export")
    _verify_files(path)
    try:
        raw = yaml.safe_load(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # one line: YAML's messages span several
        raise ConfigError(f"{cfg_path}: not a readable YAML model config ({type(e).__name__}: {reason})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_path}: expected a mapping of model settings, got {type(raw).__name__}")
    cfg = from_dict(ModelConfig, raw, source=str(cfg_path))
    with torch.device("meta"):
        model = CausalLM(cfg)
    try:
        state = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as e:  # safetensors' own error type for a torn or foreign file
        raise ConfigError(f"{path / WEIGHTS}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    _check_weights_match_config(model, state, path)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.load_state_dict(state, strict=False)  # checked above; only the tied head is absent
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def weight_problems(model: CausalLM, state: dict[str, torch.Tensor], tied_head_stored: bool = False) -> list[str]:
    """How the weights differ from the names and shapes of the config's ``model`` (built on the meta device), as
    'missing: ...', 'unexpected: ...', 'shape: ...'. A tied head is stored once, as ``embed.weight`` (an export), or
    also as ``lm_head.weight`` (a training checkpoint: ``tied_head_stored``)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and not (tied_head_stored and "lm_head.weight" in state):
        del expected["lm_head.weight"]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (config: {tuple(shape)})" for k, shape in expected.items()
              if k in state and state[k].shape != shape]
    return [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if names]


def _check_weights_match_config(model: CausalLM, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise ``ConfigError`` when the weights do not have the names and shapes the config's model has; a separate
    ``lm_head.weight`` with ``tie_embeddings: true`` means the weights were not tied."""
    problems = weight_problems(model, state)
    unexpected = [p for p in problems if p.startswith("unexpected:")]
    if problems:
        hint = (" (an untied LM head, but the config has tie_embeddings: true)"
                if unexpected and "lm_head.weight" in unexpected[0] else "")
        raise ConfigError(f"{path / WEIGHTS} does not match its config {path / CONFIG}{hint}: {'; '.join(problems)}")
