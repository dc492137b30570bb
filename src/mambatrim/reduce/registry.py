"""The registry of reduction methods: every method registers an apply function under its name."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn


@dataclass
class MethodSpec:
    name: str
    apply: Callable[..., nn.Module]  # apply(model, **options) -> model with the method attached
    description: str = ""
    # settings for the demo model (`mambatrim demo`: depth 4, 16 patch tokens + class token)
    demo_options: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True  # whether fine-tuning / re-training it makes sense
    learned: bool = False  # needs training before use (learned predictors): the demo fine-tunes it briefly
    families: tuple[str, ...] | None = None  # the backbone families it applies to; None: every token sequence
    composite: bool = False  # built from other methods given in its options (combine): no options of its own


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"reduction method {spec.name!r} is registered twice")
    METHODS[spec.name] = spec
    return spec


def sequence_methods() -> list[str]:
    """Names of the methods of their own (not composites) that apply to every token-sequence backbone (Vim and
    its kin), sorted."""
    return sorted(name for name, spec in METHODS.items() if spec.families is None and not spec.composite)


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name is one line suggesting the closest and listing all."""
    if name not in METHODS:
        known = ", ".join(sorted(METHODS)) or "none registered"
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reduction method {name!r}{hint}; known methods: {known}")
    return METHODS[name]


def apply_method(model: nn.Module, name: str, **options: Any) -> nn.Module:
    """Attach method ``name`` to ``model`` with ``options``; an unknown name or option gets one line naming the
    valid ones (:mod:`.options`)."""
    return method_spec(name).apply(model, **options)


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
