"""Pruned positions between consecutive tokens of a scan order (the 'decay' alignment's input)."""
from __future__ import annotations

import torch
from torch import Tensor


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


def order_gaps(ranks: Tensor) -> Tensor:
    """(B, L) float pruned tokens skipped before each step of a grid order, from the visited tokens' dense steps
    ``ranks`` (B, L), ascending (:meth:`ScanOrder.visit`); step 0 gets 0."""
    diff = (ranks[:, 1:] - ranks[:, :-1] - 1).clamp(min=0).float()
    return torch.cat([diff.new_zeros(ranks.shape[0], 1), diff], 1)
