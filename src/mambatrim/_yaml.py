"""YAML reading for configs and ``key=value`` options: PyYAML's safe loader, plus exponent floats without a dot.

PyYAML follows YAML 1.1, where ``2e-4`` or ``1E5`` is a *string* (only ``2.0e-4`` is a float); a learning rate
written that way would reach the optimiser as text. Here they are floats, as in YAML 1.2 and Python.
"""
from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` with ``1e-4``-style floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
