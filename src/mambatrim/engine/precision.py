"""The one mixed-precision vocabulary (``fp32`` | ``bf16`` | ``fp16``) and the one autocast helper.

Benchmarks, training and evaluation all name precisions this way; PyTorch's names (``float32``, ``bfloat16``,
``float16``) are accepted as aliases so recipes and checkpoints written with them keep working.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def canonical_dtype(name: str, option: str = "dtype") -> str:
    """``bfloat16`` -> ``bf16``; an unknown name is a one-line ValueError listing the valid ones."""
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(DTYPES)} (or {', '.join(ALIASES)}), got {name!r}")
    return name


def torch_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (``None`` for fp32)."""
    return DTYPES[canonical_dtype(name)]


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (weights stay fp32); ``fp32`` is a no-op."""
    return autocast_to(device, torch_dtype(dtype))


def autocast_to(device: torch.device | str, target: torch.dtype | None,
                cache_enabled: bool = True) -> AbstractContextManager:
    """Autocast to the torch dtype ``target`` (a value of :data:`DTYPES`; ``None``: no-op). ``cache_enabled``
    False for CUDA-graph capture and replay, whose weight casts must run inside the graph."""
    if target is None:
        return nullcontext()
    kind = device if isinstance(device, str) else device.type
    return torch.autocast(device_type=kind, dtype=target, cache_enabled=cache_enabled)
