"""The narrow interface between backbones and reduction methods.

A backbone builds a :class:`TokenState` after the embedding, hands it to its reducer before every block
(``Reducer.before_layer``) and asks the reducer for a per-layer :class:`MixerContext` that its mixers honour
generically. Methods (DyVM, R-MeeTo, ToP, baselines) are :class:`Reducer` subclasses; backbones never import
them.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import get_backend, policy


@dataclass
class TokenState:
    """Tokens flowing between blocks.

    hidden:    (B, L, D) the previous mixer's output (the embeddings before block 0).
    residual:  (B, L, D) fp32 residual stream, ``None`` before block 0.
    positions: (B, L) long, each token's index in the dense sequence (the class token included).
    cls_index: (B,) long, where the class token sits now (per sample: may differ in training-time pruning).
    sizes:     (B, L) float, how many original tokens each token stands for (merging); ``None`` = all ones.
    mask:      (B, L) float 0/1 keep mask for training-time (full-length, masked) pruning; ``None`` = all kept.
    extras:    method-owned scratch (decisions for losses, statistics).
    """

    hidden: Tensor
    residual: Tensor | None
    positions: Tensor
    cls_index: Tensor
    sizes: Tensor | None = None
    mask: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    def replace(self, **changes: Any) -> "TokenState":
        return replace(self, **changes)

    def gather(self, index: Tensor) -> "TokenState":
        """Keep tokens ``index`` (B, K) of every per-token field; the caller sets ``cls_index``."""

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else take_rows(t, index)

        return replace(self, hidden=take(self.hidden), residual=take(self.residual),
                       positions=take(self.positions), sizes=take(self.sizes), mask=take(self.mask))


def take_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t`` (B, L, ...) rows ``index`` (B, K) -> (B, K, ...). Advanced indexing copies whole rows; a ``gather``
    with an index expanded over the channels reads one index per element and was several times slower on a GPU.
    Where the 'triton' backend runs without autograd, the Triton row-copy kernel (policy ``fused_row_gather``)."""
    if (policy.get("fused_row_gather") and t.dim() == 3 and not (t.requires_grad and torch.is_grad_enabled())
            and get_backend(t.device.type) == "triton"):
        from ..ops.triton_rows import take_rows_triton  # noqa: PLC0415 (needs triton)

        return take_rows_triton(t, index)
    return t[torch.arange(t.shape[0], device=t.device)[:, None], index]


@dataclass
class MixerContext:
    """Per-layer instructions a bidirectional mixer honours, whatever method produced them.

    token_mask:     (B, L) 0/1: masked tokens are zeroed before and after the local conv in both directions,
                    so they feed nothing into the scan (training-time pruning).
    cls_index:      (B,) class-token position, for direction selectors that read it.
    direction_gate: (B, 2) [forward, backward] multipliers of each direction's output, or a callable mapping the
                    class token's in_proj output (B, 2*d_inner) to them (a learned selector), e.g. a
                    :class:`LinearDirectionGate` (which the fused Triton mixer computes in one kernel).
    skip_gated:     if True, a direction is not computed at all for samples whose gate is 0 (inference); if
                    False both are computed and multiplied by the gate (training, straight-through).
    positions:      (B, L) original indices of the tokens: consecutive kept tokens whose positions differ by
                    more than one have pruned tokens between them.
    align:          how the scan treats those gaps: None (compact sequence), 'hold' (state unchanged across a
                    gap, local conv sees the original neighbourhood) or 'decay' ('hold' plus the state decays
                    across the gap at the previous token's rate).
    full_length:    length of the dense sequence the positions index into (every position < full_length), so
                    the aligned conv needs no device-to-host read of ``positions.max()`` (no sync, capturable
                    in a CUDA graph); ``None``: derived from the positions.
    gaps:           (2, B, L) float, for 'decay': pruned positions before each token in forward (0) and backward
                    (1) scan order (:func:`scan_gap_pair`), computed once when the positions change instead of
                    in every layer; ``None``: the mixer derives them from the positions.
    """

    token_mask: Tensor | None = None
    cls_index: Tensor | None = None
    direction_gate: Tensor | Callable[[Tensor], Tensor] | None = None
    skip_gated: bool = False
    positions: Tensor | None = None
    align: str | None = None
    full_length: int | None = None
    gaps: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LinearDirectionGate:
    """A learned direction selector at inference: direction d runs for sample i iff ``weight[d] . xz + bias[d]
    > 0``, with ``xz`` the sample's class-token ``in_proj`` output (B, 2*d_inner), in fp32 (also under autocast:
    a bf16 product would flip decisions near 0). Callable like any gate -> (B, 2) 0/1 float; the fused Triton
    mixer instead reads the class-token row, multiplies and thresholds in one kernel."""

    weight: Tensor  # (2, 2*d_inner)
    bias: Tensor | None = None  # (2,)

    def logits(self, cls_xz: Tensor) -> Tensor:
        kind = cls_xz.device.type
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext():
            return F.linear(cls_xz.float(), self.weight.float(), bias)

    def __call__(self, cls_xz: Tensor) -> Tensor:
        return (self.logits(cls_xz) > 0).float()


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


def others_index(cls_index: Tensor, length: int) -> Tensor:
    """(B, L-1) indices of every token except each sample's class token, in sequence order."""
    ar = batch_arange(cls_index.shape[0], length - 1, cls_index.device)
    return ar + (ar >= cls_index[:, None]).long()


def batch_arange(batch: int, length: int, device: torch.device) -> Tensor:
    """(B, L) tensor of 0..L-1 per row."""
    return torch.arange(length, device=device).expand(batch, length)


def scan_gaps(positions: Tensor, reverse: bool, cls_index: Tensor | None = None) -> Tensor:
    """Pruned positions between each token and its predecessor in scan order, from original indices.

    The class token may sit out of positional order (pruning methods re-insert it at the middle of the kept
    tokens). Where it does not lie between its two neighbours' positions, it is transparent: it gets gap 0 and
    the pruned positions between its neighbours are charged to the neighbour that follows it in scan order.
    """
    diff = (positions[:, 1:] - positions[:, :-1] - 1).clamp(min=0)  # diff[k]: between tokens k and k+1
    bsz, length = positions.shape
    if cls_index is not None and length >= 3:
        c = cls_index.clamp(1, length - 2)
        rows = torch.arange(bsz, device=positions.device)
        before, at, after = positions[rows, c - 1], positions[rows, c], positions[rows, c + 1]
        out_of_order = (cls_index > 0) & (cls_index < length - 1) & ~((before < at) & (at < after))
        bridge = (after - before - 1).clamp(min=0)
        # forward: the token after the cls (pair c) carries the bridge; reverse: the token before it (pair c-1)
        carry, zero = (c - 1, c) if reverse else (c, c - 1)
        # scatters, not indexed writes: writing a Python 0 copies a host scalar (a sync, no CUDA-graph capture)
        fixed = diff.scatter(1, carry[:, None], bridge[:, None]).scatter(1, zero[:, None], torch.zeros_like(c)[:, None])
        diff = torch.where(out_of_order[:, None], fixed, diff)
    gap = diff.float()
    pad = gap.new_zeros(bsz, 1)
    return torch.cat([gap, pad], 1) if reverse else torch.cat([pad, gap], 1)


def scan_gap_pair(positions: Tensor, cls_index: Tensor | None = None) -> Tensor:
    """(2, B, L) :func:`scan_gaps` of the forward (0) and backward (1) scan directions."""
    return torch.stack([scan_gaps(positions, False, cls_index), scan_gaps(positions, True, cls_index)])
