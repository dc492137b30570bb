"""Token and block reduction methods, all built on the contract in :mod:`mambatrim.contract`.

Every method registers itself here, so the CLI (``--method NAME --method-opt key=value``), the demo and the
benchmarks can apply any of them by name, with one vocabulary of options (:mod:`.options`)::

    from mambatrim.reduce import apply_method
    model = apply_method(model, "rmeeto", ratio=0.31)
"""
from __future__ import annotations

from ..contract import MixerContext, Reducer, TokenState
from .registry import METHODS, MethodSpec, apply_method, method_spec, parse_method_options, register_method

__all__ = ["METHODS", "MethodSpec", "MixerContext", "Reducer", "TokenState", "apply_method",
           "method_spec", "parse_method_options", "register_method"]

# Methods register themselves on import (one line per method module below).
from . import rmeeto  # noqa: E402,F401
from . import dyvm  # noqa: E402,F401
from . import top, baselines  # noqa: E402,F401
from . import groupmamba  # noqa: E402,F401
