"""The base class of every reduction method."""
from __future__ import annotations

from torch import Tensor, nn

from .context import MixerContext
from .tokens import TokenState


class Reducer(nn.Module):
    """Base class of reduction methods: by default it changes nothing.

    Subclasses override ``before_layer`` (prune / merge / reorder tokens), ``mixer_context`` (masks, direction
    gates, alignment) and optionally ``finish`` and ``flops_overhead``.
    """

    def begin(self, state: TokenState) -> TokenState:
        """Called once after the embedding, before block 0."""
        return state

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        return state

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        return None

    def finish(self, state: TokenState) -> TokenState:
        """Called after the last block, before the final norm."""
        return state

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        """MACs the method itself adds for one image (predictors, similarity, ...)."""
        return 0.0

    def extra_losses(self, state: TokenState, teacher_state: TokenState | None = None) -> dict[str, Tensor]:
        """Method-specific loss terms, already weighted, that the training engine adds to its loss.

        ``state`` is the student's final state (``model.forward_tokens``); ``teacher_state`` the dense teacher's
        when distilling. Keys name the terms in logs.
        """
        return {}
