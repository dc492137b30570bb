"""Token and block reduction methods, all built on :mod:`mambatrim.reduce.core`.

Every method registers itself here, so the CLI (``--method NAME --method-opt key=value``), the demo and the
benchmarks can apply any of them by name::

    from mambatrim.reduce import apply_method
    model = apply_method(model, "rmeeto", ratio=0.31)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .core import MixerContext, Reducer, TokenState


@dataclass
class MethodSpec:
    name: str
    apply: Callable[..., nn.Module]  # apply(model, **options) -> model with the method attached
    description: str = ""
    # settings for the demo model (`mambatrim demo`: depth 4, 16 patch tokens + class token)
    demo_options: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True  # whether fine-tuning / re-training it makes sense
    learned: bool = False  # needs training before use (learned predictors): the demo fine-tunes it briefly


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"reduction method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec
    return spec


def apply_method(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Attach method ``name`` to ``model`` with ``options``; unknown names list the known ones."""
    if name not in METHODS:
        known = ", ".join(sorted(METHODS)) or "none registered"
        raise ValueError(f"unknown reduction method {name!r}; known methods: {known}")
    return METHODS[name].apply(model, **options)


def parse_method_options(items: list[str] | None) -> dict[str, Any]:
    """CLI ``key=value`` pairs -> dict, values parsed as YAML scalars/lists (``ratio=0.31``, ``layers=[6,12]``)."""
    from .._yaml import load_yaml_text

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"method option {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = load_yaml_text(value)
    return out


# Methods register themselves on import (one line per method module below).

__all__ = ["METHODS", "MethodSpec", "MixerContext", "Reducer", "TokenState", "apply_method",
           "parse_method_options", "register_method"]
from . import rmeeto  # noqa: E402,F401
from . import dyvm  # noqa: E402,F401
from . import top, baselines  # noqa: E402,F401
