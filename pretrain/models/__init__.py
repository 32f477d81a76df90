"""Model zoo: ReBased / Based hybrids and the Transformer++ baseline."""

from pretrain.config import load_config
from pretrain.models.config import MIXERS, ModelConfig
from pretrain.models.cache import ModelCache
from pretrain.models.model import CausalLM
from pretrain.models.flops import count_parameters, flops_per_token


def load_model_config(path, overrides=None) -> ModelConfig:
    return load_config(ModelConfig, path, overrides)


def build_model(cfg: ModelConfig) -> CausalLM:
    return CausalLM(cfg)


__all__ = ["MIXERS", "ModelConfig", "CausalLM", "ModelCache", "build_model", "load_model_config",
           "count_parameters", "flops_per_token"]
