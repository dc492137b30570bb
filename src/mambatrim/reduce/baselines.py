"""Simple token-pruning baselines sharing ToP's schedule and mechanics (:class:`~.pruning.ProgressivePruner`).

    prune_random  keep a uniformly random subset of patch tokens (a fixed seed per call at eval, for repeatability)
    prune_static  keep an evenly spread, input-independent subset (every k-th token, the same for all images)
    prune_norm    keep the tokens with the largest L2 norm of the residual stream: importance without any SSM
                  knowledge, the "plain token pruning" the papers compare against

By default none uses hidden-state alignment (``align=None``), so they are plain pruning; ``align`` is accepted
for ablations. ``order='score'`` leaves the survivors ranked by score instead of in their original order, as
top-k pruning for ViTs does (EViT-style pruning applied to Vim, what ToP's paper calls naive pruning).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor, nn

from ..contract import TokenState
from .options import method_options
from .pruning import DEFAULT_LAYERS, ProgressivePruner


class RandomPruner(ProgressivePruner):
    """Random scores. ``seed`` makes evaluation repeatable: the generator restarts at every forward pass."""

    def __init__(self, layers: Sequence[int] = DEFAULT_LAYERS, keep: float | Sequence[float] = 0.8,
                 align: str | None = None, cls_placement: str = "middle", seed: int | None = 0,
                 order: str = "original", selection: str = "global") -> None:
        super().__init__(layers, keep, align, cls_placement, order, selection)
        self.seed = seed
        self._gen: torch.Generator | None = None

    def begin(self, state: TokenState) -> TokenState:
        self._gen = None
        if self.seed is not None:
            self._gen = torch.Generator(device="cpu").manual_seed(self.seed)
        return super().begin(state)

    def scores(self, layer_idx: int, state: TokenState) -> Tensor:
        score = torch.rand(state.hidden.shape[:2], generator=self._gen)
        return score.to(state.hidden.device)


class StaticPruner(ProgressivePruner):
    """Evenly spread, input-independent: score = minus the distance to the nearest of an even grid of picks."""

    def scores(self, layer_idx: int, state: TokenState) -> Tensor:
        bsz, length = state.hidden.shape[:2]
        keep = self.keep_at[layer_idx]
        n = max(1, round((length - 1) * keep))
        picks = torch.linspace(0, length - 1, n, device=state.hidden.device)
        idx = torch.arange(length, device=state.hidden.device, dtype=torch.float32)
        dist = (idx[:, None] - picks[None, :]).abs().min(1).values
        # break ties deterministically towards lower indices
        return (-dist - idx * 1e-6).expand(bsz, length)


class NormPruner(ProgressivePruner):
    """Score = L2 norm of each token's residual stream entering the block (the embeddings before block 0)."""

    def scores(self, layer_idx: int, state: TokenState) -> Tensor:
        stream = state.hidden.float()
        if state.residual is not None:  # the block adds the previous mixer output to the residual stream
            stream = state.residual.float() + stream
        return stream.norm(dim=-1)

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        extra = super().flops_overhead(tokens_per_layer, dim)
        return extra + sum(tokens_per_layer[i] * dim for i in self.layers if i < len(tokens_per_layer))


def _applier(cls: type[ProgressivePruner], name: str):
    @method_options(name, extra=lambda: _extra_options(cls))
    def apply(model: nn.Module, keep: float | Sequence[float] = 0.8, layers: Sequence[int] = DEFAULT_LAYERS,
              align: str | None = None, cls_placement: str = "middle", **options) -> nn.Module:
        return model.set_reducer(cls(layers=layers, keep=keep, align=align, cls_placement=cls_placement,
                                     **options))
    apply.__doc__ = f"Attach {cls.__name__} to a Vim model (in place) and return it."
    return apply


def _extra_options(cls: type[ProgressivePruner]) -> list[str]:
    """The pruner's constructor options beyond those ``apply`` names."""
    return [name for name in inspect.signature(cls.__init__).parameters
            if name not in ("self", "layers", "keep", "align", "cls_placement")]


apply_random = _applier(RandomPruner, "prune_random")
apply_static = _applier(StaticPruner, "prune_static")
apply_norm = _applier(NormPruner, "prune_norm")


def _register() -> None:
    from .registry import MethodSpec, register_method

    demo = dict(keep=0.7, layers=[1, 2])
    register_method(MethodSpec("prune_random", apply_random, "random token pruning (baseline)", dict(demo),
                               trainable=True))
    register_method(MethodSpec("prune_static", apply_static, "static evenly spread token pruning (baseline)",
                               dict(demo), trainable=True))
    register_method(MethodSpec("prune_norm", apply_norm, "token pruning by residual-stream norm, no alignment "
                               "(plain pruning baseline)", dict(demo), trainable=True))


_register()
