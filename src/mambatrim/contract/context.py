"""What a reduction method asks of a mixer for one layer, and the gate protocol for per-sample path selection."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor


@runtime_checkable
class DirectionGate(Protocol):
    """A learned per-sample path selector: a per-sample feature of the mixer's ``in_proj`` output (B, 2*d_inner)
    -> (B, K) 0/1 (or soft) multipliers of the K scan paths' outputs. The feature
    (:func:`~mambatrim.contract.gate_feature`) is the class token's row when there is one protected token, the
    mean over the protected rows when there are several (MambaReg's registers), the mean over all (kept) tokens
    when there is none. A gate that is a linear threshold may also expose
    ``linear_form() -> (weight (K, 2*d_inner), bias (K,) | None)``, which fused kernels evaluate in place."""

    def __call__(self, feature: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class LinearDirectionGate:
    """Path k runs for sample i iff ``weight[k] . xz + bias[k] > 0``, with ``xz`` the sample's gate feature
    (:class:`DirectionGate`), in fp32 (also under autocast: a bf16 product would flip decisions near 0)."""

    weight: Tensor  # (K, 2*d_inner)
    bias: Tensor | None = None  # (K,)

    def logits(self, feature: Tensor) -> Tensor:
        kind = feature.device.type
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext():
            return F.linear(feature.float(), self.weight.float(), bias)

    def __call__(self, feature: Tensor) -> Tensor:
        return (self.logits(feature) > 0).float()

    def linear_form(self) -> tuple[Tensor, Tensor | None]:
        return self.weight, self.bias


@dataclass
class MixerContext:
    """Per-layer instructions a mixer honours, whatever method produced them.

    token_mask:     (B, L) 0/1: masked tokens are zeroed before and after the local conv in every path, so they
                    feed nothing into the scans (training-time pruning).
    protected:      (B, P) indices of the protected tokens (class token, registers; P may be 0), for path
                    selectors that read them and for the gaps of 'decay'.
    direction_gate: (B, K) multipliers of each scan path's output, or a :class:`DirectionGate` mapping the gate
                    feature of the in_proj output (B, 2*d_inner) to them.
    skip_gated:     if True, a path is not computed at all for samples whose gate is 0 (inference); if False
                    every path is computed and multiplied by its gate (training, straight-through).
    positions:      (B, L) original indices of the tokens: tokens adjacent in a scan order whose positions are
                    not adjacent in that order have pruned tokens between them.
    align:          how the scans treat those gaps: None (compact sequence), 'hold' (state unchanged across a
                    gap, local conv sees the original neighbourhood) or 'decay' ('hold' plus the state decays
                    across the gap at the previous token's rate).
    full_length:    length of the dense sequence the positions index into (every position < full_length), so
                    the aligned conv needs no device-to-host read of ``positions.max()`` (no sync, capturable
                    in a CUDA graph); ``None``: derived from the positions.
    gaps:           (K, B, L) float, for 'decay': pruned positions before each token in each path's scan order
                    (:func:`~mambatrim.contract.scan_gap_pair` for Vim's two), computed once when the positions
                    change instead of in every layer; ``None``: the mixer derives them.
    grid:           the dense token layout (e.g. (H, W)) for mixers whose orders walk a grid.
    tap:            called with the mixer's combined, gated SSM output (B, L, d_inner), the input of
                    ``out_proj``, before ``out_proj`` runs (e.g. ToP's importance score); no hooks needed.
    sources:        (B, M) long, for layers that read the dense grid (2-D convs) after merging: the current
                    token each of the M grid cells is merged into (they read it back there, and a token gets the
                    mean over its cells); ``None``: the tokens are the grid.
    """

    token_mask: Tensor | None = None
    protected: Tensor | None = None
    direction_gate: Tensor | Callable[[Tensor], Tensor] | None = None
    skip_gated: bool = False
    positions: Tensor | None = None
    align: str | None = None
    full_length: int | None = None
    gaps: Tensor | None = None
    grid: tuple[int, ...] | None = None
    tap: Callable[[Tensor], None] | None = None
    sources: Tensor | None = None
