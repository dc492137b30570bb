"""Protected tokens (class token, registers): the tokens no method may prune or merge, and where a method that
rearranges tokens puts them back.

A backbone declares them in :class:`~mambatrim.contract.TokenState` (``protected`` (B, P) current indices,
ascending, and ``protected_layout``); the helpers here are what every method uses to leave them out of its
candidates and to re-insert them, so no method assumes a single class token.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..validation import check_choice

# where a rearranging method puts the protected tokens among the kept ones (set by the backbone in ``embed``)
PROTECTED_LAYOUTS = ("middle", "first", "spread", "none")


def check_layout(layout: str, count: int) -> None:
    """ValueError unless ``layout`` is a known layout that fits ``count`` protected tokens (any layout fits none:
    there is nothing to place)."""
    check_choice(layout, "protected_layout", PROTECTED_LAYOUTS)
    if layout == "none" and count:
        raise ValueError(f"protected_layout 'none' declares no protected tokens, but there are {count}: choose "
                         "'middle', 'first' or 'spread'")


def protected_mask(protected: Tensor, length: int) -> Tensor:
    """(B, L) bool: True at the protected tokens."""
    mask = torch.zeros(protected.shape[0], length, dtype=torch.bool, device=protected.device)
    return mask.scatter(1, protected, True)


def free_slots(protected: Tensor, ranks: Tensor) -> Tensor:
    """Sequence index of the unprotected token of rank ``ranks`` (B, K) (0 = the first unprotected token),
    given the protected indices (B, P) ascending: ``rank + #{j : protected[j] - j <= rank}``. No sort, no sync."""
    shifted = protected - torch.arange(protected.shape[1], device=protected.device)
    return ranks + (shifted[:, None, :] <= ranks[..., None]).sum(-1)


def unprotected_index(protected: Tensor, length: int) -> Tensor:
    """(B, L-P) indices of every unprotected token, in sequence order."""
    bsz, count = protected.shape
    ranks = torch.arange(length - count, device=protected.device).expand(bsz, -1)
    return free_slots(protected, ranks)


def layout_slots(layout: str, num_keep: Tensor, count: int) -> Tensor:
    """(B, P) where the P protected tokens go among ``num_keep`` (B,) kept tokens (sequence ``[protected and
    kept interleaved..., anything after]``), in their relative order.

    middle: a block at ``num_keep // 2`` (Vim's class token at the middle of the kept tokens); first: ``0..P-1``;
    spread: each after ``interval = num_keep // (P + 1)`` kept tokens, i.e. index ``(interval + 1) * (i + 1) - 1``
    (MambaReg's rule, the same positions as its inference ``arange(interval, ..., interval + 1)``); none: P = 0.
    """
    check_layout(layout, count)
    i = torch.arange(count, device=num_keep.device)
    if layout == "first":
        return i.expand(num_keep.shape[0], -1)
    if layout == "spread":
        interval = num_keep[:, None] // (count + 1)
        return (interval + 1) * (i + 1) - 1
    return num_keep[:, None] // 2 + i  # middle (P = 0, 'none': an empty (B, 0))


def insert_at(rows: Tensor, values: Tensor, slots: Tensor) -> Tensor:
    """(B, K+P): ``rows`` (B, K) with ``values`` (B, P) inserted so that they land at indices ``slots`` (B, P),
    strictly ascending, the other entries keeping their order. Any dtype (indices, masks)."""
    bsz, k = rows.shape
    j = torch.arange(k + slots.shape[1], device=rows.device).expand(bsz, -1)
    before = (slots[:, None, :] < j[..., None]).sum(-1)  # protected slots before each output index
    hit = slots[:, None, :] == j[..., None]  # (B, K+P, P)
    out = rows.gather(1, (j - before).clamp(0, max(k - 1, 0))) if k else rows.new_zeros(j.shape)
    which = before.clamp(max=max(slots.shape[1] - 1, 0))
    picked = values.gather(1, which) if slots.shape[1] else out
    return torch.where(hit.any(-1), picked, out)


def gate_feature(xz: Tensor, protected: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, C) the per-sample input of a callable direction gate from the ``in_proj`` output ``xz`` (B, L, C):
    the class token's row when P == 1; the fp32 mean over the protected rows when P > 1 (MambaReg: the
    registers); the fp32 mean over all tokens when P == 0 (over the kept ones where a training ``mask`` is
    given, so training reads what inference, with the masked tokens removed, reads)."""
    bsz, count = protected.shape
    if count == 1:
        return xz[torch.arange(bsz, device=xz.device), protected[:, 0]]
    if count > 1:
        return xz[torch.arange(bsz, device=xz.device)[:, None], protected].float().mean(1)
    return masked_mean(xz.float(), mask)


def masked_mean(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, D) mean of ``x`` (B, L, D) over the tokens, the kept ones only where a 0/1 ``mask`` (B, L) is given."""
    if mask is None:
        return x.mean(1)
    weight = mask.to(x.dtype)[..., None]
    return (x * weight).sum(1) / weight.sum(1).clamp(min=1)
