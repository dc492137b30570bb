"""Pruned positions between consecutive tokens of a scan order (the 'decay' alignment's input)."""
from __future__ import annotations

import torch
from torch import Tensor

from .protected import protected_mask


def scan_gaps(positions: Tensor, reverse: bool, protected: Tensor | None = None) -> Tensor:
    """Pruned positions between each token and its predecessor in scan order, from original indices.

    A protected token (class token, register) may sit out of positional order: pruning methods re-insert it
    where the backbone's layout says (the middle of the kept tokens, spread among them). Where it does not lie
    between its two neighbours' positions (and is not at either end), it is transparent: it gets gap 0 and the
    pruned positions between the tokens around it are charged to the next non-transparent token in scan order.
    """
    bsz, length = positions.shape
    if reverse:  # the backward scan: the forward one of the flipped, negated positions
        flipped = None if protected is None else length - 1 - protected
        return scan_gaps(-positions.flip(1), False, flipped).flip(1)
    step = torch.arange(length, device=positions.device)
    transparent = torch.zeros(bsz, length, dtype=torch.bool, device=positions.device)
    if protected is not None and protected.shape[1] and length >= 3:
        before = torch.cat([positions[:, :1], positions[:, :-1]], 1)
        after = torch.cat([positions[:, 1:], positions[:, -1:]], 1)
        inner = (step > 0) & (step < length - 1)
        in_order = (before < positions) & (positions < after)
        transparent = protected_mask(protected, length) & inner & ~in_order
    # each token's predecessor in scan order, skipping transparent tokens (-1: none)
    visible = torch.where(transparent, -1, step.expand(bsz, -1))
    last = torch.cummax(visible, dim=1).values
    prev = torch.cat([last.new_full((bsz, 1), -1), last[:, :-1]], 1)
    diff = positions - positions.gather(1, prev.clamp(min=0)) - 1
    gap = torch.where((prev >= 0) & ~transparent, diff.clamp(min=0), 0)
    return gap.float()


def scan_gap_pair(positions: Tensor, protected: Tensor | None = None) -> Tensor:
    """(2, B, L) :func:`scan_gaps` of the forward (0) and backward (1) scan directions."""
    return torch.stack([scan_gaps(positions, False, protected), scan_gaps(positions, True, protected)])


def order_gaps(ranks: Tensor) -> Tensor:
    """(B, L) float pruned tokens skipped before each step of a grid order, from the visited tokens' dense steps
    ``ranks`` (B, L), ascending (:meth:`ScanOrder.visit`); step 0 gets 0."""
    diff = (ranks[:, 1:] - ranks[:, :-1] - 1).clamp(min=0).float()
    return torch.cat([diff.new_zeros(ranks.shape[0], 1), diff], 1)
