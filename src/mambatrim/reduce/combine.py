"""Combined methods (ours): two registered methods chained into one reducer, e.g. R-MeeTo merging with DyVM's
per-image scan-direction selection, or ToP pruning followed by merging.

:class:`ChainedReducer` calls each hook of its parts in order (the first part's ``before_layer`` output is the
second's input, so a block can prune and then merge) and joins their per-layer mixer contexts field by field;
two parts that set the same context field differently in one layer are refused (e.g. two direction gates), as
is a merge after a method that masks tokens (R-MeeTo says so itself). Nothing of either method is copied: each
part is built by its own ``apply``. ``apply_method(model, 'combine', methods=[{name: rmeeto, ratio: 0.3},
{name: dyvm, keep: null, block_ratio: 0.8}])``; on the command line ``--method combine --method-opt
"methods=[{name: rmeeto, ratio: 0.3}, {name: dyvm, keep: null, block_ratio: 0.8}]"``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..contract import MixerContext, Reducer, TokenState
from .options import method_options
from .registry import MethodSpec, apply_method, method_spec, register_method


class ChainedReducer(Reducer):
    """Runs ``parts`` one after the other in every hook; their own state lives on them (parameters included,
    saved under ``reducer.parts.I.*``)."""

    def __init__(self, parts: Sequence[Reducer]) -> None:
        super().__init__()
        if len(parts) < 2:
            raise ValueError(f"a combined method needs at least two methods, got {len(parts)}")
        self.parts = nn.ModuleList(parts)

    def begin(self, state: TokenState) -> TokenState:
        for part in self.parts:
            state = part.begin(state)
        return state

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        for part in self.parts:
            state = part.before_layer(layer_idx, state)
        return state

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        contexts = [c for c in (part.mixer_context(layer_idx, state) for part in self.parts) if c is not None]
        return join_contexts(contexts, layer_idx)

    def finish(self, state: TokenState) -> TokenState:
        for part in self.parts:
            state = part.finish(state)
        return state

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        return sum(part.flops_overhead(tokens_per_layer, dim) for part in self.parts)

    def extra_losses(self, state: TokenState, teacher_state: TokenState | None = None) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for i, part in enumerate(self.parts):
            for name, value in part.extra_losses(state, teacher_state).items():
                losses[name if name not in losses else f"{name}_{i}"] = value
        return losses


def join_contexts(contexts: list[MixerContext], layer_idx: int) -> MixerContext | None:
    """One context holding every field any part set; a field two parts set to different values is refused."""
    if len(contexts) < 2:
        return contexts[0] if contexts else None
    joined: dict[str, Any] = {}
    for ctx in contexts:
        for f in dataclasses.fields(MixerContext):
            value = getattr(ctx, f.name)
            if value is None or value is False:  # the defaults: not set by this part
                continue
            if f.name in joined and not _same(joined[f.name], value):
                raise ValueError(f"combined methods: two methods set the mixer's {f.name} in block {layer_idx}; "
                                 "combine methods whose per-layer instructions do not overlap")
            joined[f.name] = value
    return MixerContext(**joined)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a is b or (a.shape == b.shape and bool((a == b).all()))
    return a is b or a == b


@method_options("combine")
def apply(model: nn.Module, methods: Sequence[Mapping[str, Any]] = ()) -> nn.Module:
    """Attach the methods ``methods`` (each ``{name: METHOD, option: value, ...}``, in the order they act in
    every block) as one chained reducer; returns the model."""
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Sequence) or len(methods) < 2 or not all(
            isinstance(m, Mapping) and isinstance(m.get("name"), str) for m in methods):
        raise ValueError("combine: methods must list at least two mappings with a 'name', e.g. "
                         "[{name: rmeeto, ratio: 0.3}, {name: dyvm, keep: null, block_ratio: 0.8}]")
    if any(m["name"] == "combine" for m in methods):
        raise ValueError("combine: list the methods themselves, not another combination")
    for entry in methods:
        method_spec(entry["name"])  # every name checked before any is applied
    parts = []
    for entry in methods:
        options = {k: v for k, v in entry.items() if k != "name"}
        model.set_reducer(None)
        parts.append(apply_method(model, entry["name"], **options).reducer)
    return model.set_reducer(ChainedReducer(parts))


register_method(MethodSpec(
    name="combine", apply=apply,
    description="two or more methods chained into one reducer (ours), e.g. R-MeeTo merging + DyVM block selection",
    demo_options={"methods": [{"name": "rmeeto", "ratio": 0.3, "layers": [1, 2, 3]},
                              {"name": "dyvm", "keep": None, "block_ratio": 0.8}]},
    learned=True, composite=True,
))
