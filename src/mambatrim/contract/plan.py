"""A mixer context normalised once per layer call: what every executor of a multi-path mixer reads.

:meth:`MixerPlan.build` resolves the context's mask, gates, alignment and per-path orders and gaps in one
place; executors (the PyTorch per-path one, the fused Triton one) declare which plans they support and run
them, so a new capability is one field here plus the executors that honour it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from .context import MixerContext
from .gaps import order_gaps, scan_gaps
from .orders import ScanOrder
from .protected import gate_feature

ALIGN_MODES = (None, "hold", "decay")


@dataclass(frozen=True)
class PathPlan:
    """One scan path for this call.

    index:     (B, L) sequence indices in visiting order (grid orders), ``None`` for sequence orders, which the
               kernels walk in place (``order.reverse``: right to left).
    positions: (B, L) with alignment: each visited token's dense position along this path (sequence orders:
               the original positions in sequence order; grid orders: the dense steps, in visiting order).
    gap:       (B, L) float with 'decay': pruned tokens skipped before each step, laid out like the scan's
               inputs (sequence orders: sequence order; grid orders: visiting order).
    """

    order: ScanOrder
    index: Tensor | None = None
    positions: Tensor | None = None
    gap: Tensor | None = None

    @property
    def reverse(self) -> bool:
        return self.order.reverse


@dataclass(frozen=True)
class MixerPlan:
    """Everything a mixer call needs from its context, resolved once.

    mask:        (B, L) 0/1 training-time keep mask, or ``None``.
    gate:        (B, K) per-sample path multipliers, a gate callable (evaluated by the executor on
                 :meth:`gate_feature`), or ``None``.
    linear_gate: the gate's ``(weight, bias)`` where it is a linear threshold (fused kernels evaluate it).
    skip_gated:  a path gated 0 is not computed for that sample (inference).
    protected:   (B, P) the protected tokens' indices (what a callable gate reads).
    align:       None | 'hold' | 'decay'; with it ``full_length`` is the dense length the positions index.
    grad:        autograd is on (the fused inference-only steps do not apply).
    """

    paths: tuple[PathPlan, ...]
    mask: Tensor | None = None
    gate: Tensor | Callable[[Tensor], Tensor] | None = None
    linear_gate: tuple[Tensor, Tensor | None] | None = None
    skip_gated: bool = False
    protected: Tensor | None = None
    align: str | None = None
    full_length: int | None = None
    grad: bool = False
    tap: Callable[[Tensor], None] | None = None

    @property
    def num_paths(self) -> int:
        return len(self.paths)

    @property
    def sequence_pair(self) -> bool:
        """Vim's two paths: the sequence forwards, then backwards."""
        return (self.num_paths == 2 and all(p.index is None for p in self.paths)
                and not self.paths[0].reverse and self.paths[1].reverse)

    @property
    def callable_gate(self) -> bool:
        return self.gate is not None and not torch.is_tensor(self.gate)

    def gate_feature(self, xz: Tensor) -> Tensor:
        """(B, C) what a callable gate reads from the in_proj output ``xz`` (B, L, C): :func:`gate_feature`."""
        return gate_feature(xz, self.protected, self.mask)

    @staticmethod
    def build(ctx: MixerContext | None, orders: Sequence[ScanOrder], batch: int,
              device: torch.device) -> "MixerPlan":
        grad = torch.is_grad_enabled()
        if ctx is None:
            ctx = MixerContext()
        if ctx.align not in ALIGN_MODES:
            raise ValueError(f"unknown alignment {ctx.align!r}; choose one of None, 'hold', 'decay'")
        align = ctx.align if ctx.positions is not None else None
        gate = ctx.direction_gate
        if torch.is_tensor(gate) and gate.shape != (batch, len(orders)):
            raise ValueError(f"direction_gate must be (batch, paths) = ({batch}, {len(orders)}), got "
                             f"{tuple(gate.shape)}")
        if gate is not None and not torch.is_tensor(gate) and ctx.protected is None:
            raise ValueError("a direction selector needs MixerContext.protected (a (batch, 0) tensor if the "
                             "model has no class token)")
        linear_form = getattr(gate, "linear_form", None)
        paths = tuple(_path_plan(order, k, ctx, align, batch, device) for k, order in enumerate(orders))
        full_length = ctx.full_length
        if align is not None and not all(o.is_sequence for o in orders) and ctx.grid is not None:
            full_length = 1
            for side in ctx.grid:
                full_length *= side
        return MixerPlan(paths=paths, mask=ctx.token_mask, gate=gate,
                         linear_gate=linear_form() if callable(linear_form) else None,
                         skip_gated=ctx.skip_gated and gate is not None, protected=ctx.protected, align=align,
                         full_length=full_length, grad=grad, tap=ctx.tap)

    def select(self, index: Tensor) -> "MixerPlan":
        """The plan of the samples ``index`` (per-path sub-batches of skipped gating), ungated."""

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        paths = tuple(replace(p, index=take(p.index), positions=take(p.positions), gap=take(p.gap))
                      for p in self.paths)
        return replace(self, paths=paths, mask=take(self.mask), gate=None, linear_gate=None, skip_gated=False,
                       protected=take(self.protected), tap=None)


def _path_plan(order: ScanOrder, k: int, ctx: MixerContext, align: str | None, batch: int,
               device: torch.device) -> PathPlan:
    if order.is_sequence:
        gap = None
        if align == "decay":
            gap = ctx.gaps[k] if ctx.gaps is not None else scan_gaps(ctx.positions, order.reverse, ctx.protected)
        return PathPlan(order, positions=ctx.positions if align is not None else None, gap=gap)
    if ctx.positions is None:  # the whole grid (alignment needs positions): one visiting sequence for all
        return PathPlan(order, index=order.dense_index(ctx.grid, device).expand(batch, -1))
    index, ranks = order.visit(ctx.positions, ctx.grid)
    gap = order_gaps(ranks) if align == "decay" else None  # a method's precomputed gaps are sequence orders'
    return PathPlan(order, index=index, positions=ranks if align is not None else None, gap=gap)
