"""Reduction on GroupMamba, a hierarchical backbone: per-image selection of the group scans.

Token pruning is not defined across GroupMamba's downsampling (a strided conv reads the full grid), so the first
reduction is DyVM's block selection at group granularity: before each selected block a selector (DyVM's
:class:`~mambatrim.reduce.dyvm.BlockSelector`, one Linear per block) reads the gate feature of the layer (the
mean of its normalised tokens, the CAM's input) and decides per image which of the four group scans run; a
skipped group's quarter of the channels passes through as the normalised input. Training samples the decisions
with DyVM's hard Gumbel-sigmoid and adds DyVM's block-ratio loss; inference skips the gated-off scans image by
image (``skip_gated``), which the FLOPs counter sees.

Registered as ``group_select`` for the GroupMamba family (``apply_method(model, "group_select", keep=0.8)``,
``--method group_select`` on the CLI).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..contract import LinearDirectionGate, MixerContext, Reducer, TokenState
from ..models.groupmamba import GROUPS, GroupMamba
from ..validation import check
from .dyvm import BlockSelector, block_ratio_loss, gumbel_sigmoid_hard
from .options import method_options

GATES = "group_gates"


class GroupSelectReducer(Reducer):
    """One :class:`BlockSelector` (C -> 4 group logits) per selected block (``selectors[str(layer)]``)."""

    def __init__(self, widths: dict[int, int], keep: float, block_loss_weight: float = 10.0,
                 block_tau: float = 2.0, block_threshold: float = 0.5, selector_init_bias: float = 5.0,
                 start: str = "all") -> None:
        super().__init__()
        self.keep, self.block_loss_weight = float(keep), float(block_loss_weight)
        self.block_tau, self.block_threshold = float(block_tau), float(block_threshold)
        self.selectors = nn.ModuleDict({str(layer): BlockSelector(width, GROUPS) for layer, width in widths.items()})
        off = static_plan(len(widths), keep) if start == "static" else set()
        with torch.no_grad():  # zero weights, a large bias: +b (run) for every group ('all', DyVM's init)
            for i, selector in enumerate(self.selectors.values()):
                selector.weight.zero_()
                selector.bias.fill_(selector_init_bias)
                for g in range(GROUPS):
                    if (i, g) in off:
                        selector.bias[g] = -selector_init_bias

    def begin(self, state: TokenState) -> TokenState:
        state.extras.setdefault(GATES, [])  # one list for the whole forward pass (the hooks run per stage)
        return state

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        selector = self.selectors[str(layer_idx)] if str(layer_idx) in self.selectors else None
        if selector is None:
            return None
        gate: Callable[[Tensor], Tensor]
        if not self.training:
            gate = LinearDirectionGate(selector.weight, selector.bias)
        else:
            record = state.extras.setdefault(GATES, [])

            def gate(feature: Tensor) -> Tensor:
                g = gumbel_sigmoid_hard(selector(feature), self.block_tau, self.block_threshold)
                record.append(g)
                return g

        return MixerContext(protected=state.protected, direction_gate=gate, skip_gated=not self.training,
                            grid=state.grid)

    def extra_losses(self, state: TokenState, teacher_state: TokenState | None = None) -> dict[str, Tensor]:
        gates = state.extras.get(GATES) or []
        if not (gates and self.training):
            return {}
        return {"group_ratio": block_ratio_loss(gates, self.keep, self.block_loss_weight)}

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        return float(sum(s.in_features * s.out_features for s in self.selectors.values()))

    def extra_repr(self) -> str:
        return f"keep={self.keep}, layers={sorted(int(k) for k in self.selectors)}"


def static_plan(blocks: int, keep: float) -> set[tuple[int, int]]:
    """(block, group) pairs switched off so that ``keep`` of the ``blocks * 4`` group scans run: first one group
    per block (block b its group b mod 4, so every direction loses its share), then a second, and so on."""
    count = round((1 - keep) * blocks * GROUPS)
    pairs = [(b, (b + j) % GROUPS) for j in range(GROUPS) for b in range(blocks)]
    return set(pairs[:count])


STARTS = ("all", "static")


@method_options("group_select", aliases={"block_ratio": "keep"})
def apply_group_select(model: nn.Module, keep: float = 0.8, layers: Sequence[int] | None = None,
                       block_loss_weight: float = 10.0, block_tau: float = 2.0,
                       selector_init_bias: float = 5.0, start: str = "all") -> nn.Module:
    """Attach group selection to a GroupMamba: ``keep`` (alias ``block_ratio``) the target share of group scans
    run, ``layers`` the stage blocks (global indices, 0-based) with a selector (default all). ``start``: 'all'
    (every group runs until trained, DyVM's init) or 'static' (the same ``1 - keep`` of the (block, group) scans
    off for every image, spread round-robin: a fixed policy for speed measurements without training)."""
    if not isinstance(model, GroupMamba):
        raise ValueError(f"group_select applies to GroupMamba models, got {type(model).__name__}")
    check(keep, "group_select: keep (block_ratio)", "probability")
    if start not in STARTS:
        raise ValueError(f"group_select: start must be one of {', '.join(STARTS)}, got {start!r}")
    blocks = model.layers()
    chosen = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"group_select: layers {bad} out of range; the model has blocks 0..{len(blocks) - 1}")
    widths = {i: blocks[i].attn.input_dim for i in chosen}
    reducer = GroupSelectReducer(widths, keep, block_loss_weight, block_tau, selector_init_bias=selector_init_bias,
                                 start=start)
    ref = next(model.parameters())
    return model.set_reducer(reducer.to(device=ref.device))


def _register() -> None:
    from .registry import MethodSpec, register_method

    register_method(MethodSpec(
        name="group_select", apply=apply_group_select, families=("GroupMamba",), learned=True,
        description="GroupMamba group selection: per-image choice of the four group scans (DyVM's selectors "
                    "and block-ratio loss at group granularity)",
        demo_options=dict(keep=0.75)))


_register()
