"""The (Re)Based causal linear-attention family: public entry points (``api``), feature maps, PyTorch references;
the Triton backend registers itself from ``triton_ops``."""

from ..common import check_cu_seqlens, compute_dtype, pack_documents, unpack_documents
from .feature_maps import (KINDS, based_feature_map, default_scale, feature_map, kernel_from_dot,
                           rebased_feature_map, state_size, zero_state)
from .reference import MODES, linear_attention_reference, validate_attention_inputs

__all__ = [
    "KINDS", "MODES", "state_size", "rebased_feature_map", "based_feature_map", "feature_map",
    "kernel_from_dot", "default_scale", "zero_state", "compute_dtype", "linear_attention_reference",
    "validate_attention_inputs", "check_cu_seqlens", "pack_documents", "unpack_documents",
]
