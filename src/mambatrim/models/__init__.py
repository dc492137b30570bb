"""Backbones, their config registry and the checkpoint loader."""
from .checkpoint import CheckpointError, CheckpointMismatchError, load_checkpoint, register_key_mapper
from .mamba import BiMambaMixer, RMSNorm
from .pos_embed import resize_pos_embed
from .registry import (
    MODEL_CONFIGS,
    MODELS,
    OFFICIAL_ALIASES,
    create_model,
    list_models,
    register_family,
    resolve_name,
)
from .vim import VisionMamba

__all__ = [
    "BiMambaMixer", "CheckpointError", "CheckpointMismatchError", "MODELS", "MODEL_CONFIGS", "OFFICIAL_ALIASES",
    "RMSNorm", "VisionMamba", "create_model", "list_models", "load_checkpoint", "register_key_mapper",
    "register_family", "resize_pos_embed", "resolve_name",
]
