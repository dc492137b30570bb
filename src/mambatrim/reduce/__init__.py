"""Token and block reduction methods, all built on :mod:`mambatrim.reduce.core`."""
from .core import MixerContext, Reducer, TokenState

__all__ = ["MixerContext", "Reducer", "TokenState"]
