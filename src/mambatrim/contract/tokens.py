"""Tokens flowing between blocks: the state every backbone hands to its reducer."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..ops import get_backend, policy
from .protected import check_layout, protected_mask


@dataclass
class TokenState:
    """Tokens flowing between blocks.

    hidden:    (B, L, D) the previous mixer's output (the embeddings before block 0).
    residual:  (B, L, D) fp32 residual stream, ``None`` before block 0.
    positions: (B, L) long, each token's index in the dense sequence (protected tokens included).
    protected: (B, P) long, ascending: where the tokens no method may prune or merge (class token, registers)
               sit now (per sample: may differ in training-time pruning); P = 0 without such tokens.
    sizes:     (B, L) float, how many original tokens each token stands for (merging); ``None`` = all ones.
    mask:      (B, L) float 0/1 keep mask for training-time (full-length, masked) pruning; ``None`` = all kept.
    grid:      the dense token layout the positions index into, e.g. (H, W) of a patch grid, for mixers whose
               scan orders walk the grid (the class token, if any, is not part of it); ``None`` = a plain
               sequence.
    protected_layout: where a method that rearranges tokens puts the protected ones among the kept tokens
               (:func:`~mambatrim.contract.layout_slots`): 'middle' (Vim's class token), 'first' (VideoMamba),
               'spread' (MambaReg's registers), 'none' (P = 0).
    extras:    method-owned scratch (decisions for losses, statistics).
    """

    hidden: Tensor
    residual: Tensor | None
    positions: Tensor
    protected: Tensor
    sizes: Tensor | None = None
    mask: Tensor | None = None
    grid: tuple[int, ...] | None = None
    protected_layout: str = "middle"
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protected.dim() != 2:
            raise ValueError(f"TokenState.protected must be (batch, P), got shape {tuple(self.protected.shape)}")
        check_layout(self.protected_layout, self.protected.shape[1])

    @property
    def num_protected(self) -> int:
        return self.protected.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1]

    def replace(self, **changes: Any) -> "TokenState":
        return replace(self, **changes)

    def gather(self, index: Tensor, protected: Tensor | None = None) -> "TokenState":
        """Keep tokens ``index`` (B, K) of every per-token field, in that order. ``index`` must hold every
        protected token, in their relative order; their new indices are ``protected`` where the caller knows
        them, else found here (one scatter and one gather, no sync)."""

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else take_rows(t, index)

        if protected is None:
            protected = self.protected
            if self.num_protected:
                slot = torch.arange(index.shape[1], device=index.device).expand_as(index)
                inverse = torch.zeros(self.positions.shape, dtype=torch.long, device=index.device)
                protected = inverse.scatter(1, index, slot).gather(1, self.protected)
        return replace(self, hidden=take(self.hidden), residual=take(self.residual), positions=take(self.positions),
                       protected=protected, sizes=take(self.sizes), mask=take(self.mask))


def take_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t`` (B, L, ...) rows ``index`` (B, K) -> (B, K, ...). Advanced indexing copies whole rows; a ``gather``
    with an index expanded over the channels reads one index per element and was several times slower on a GPU.
    Where the 'triton' backend runs without autograd, the Triton row-copy kernel (policy ``fused_row_gather``)."""
    if (policy.get("fused_row_gather") and t.dim() == 3 and not (t.requires_grad and torch.is_grad_enabled())
            and get_backend(t.device.type) == "triton"):
        from ..ops.triton_rows import take_rows_triton  # noqa: PLC0415 (needs triton)

        return take_rows_triton(t, index)
    return t[torch.arange(t.shape[0], device=t.device)[:, None], index]


def add_rows_(out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """``out[b, index[b, k]] += rows[b, k]`` in place for (B, L, D) ``out``, (B, K) ``index`` and (B, K, D)
    ``rows`` (cast to ``out``'s dtype), with the same result on every run: where ``scatter_add_`` adds duplicate
    indices in a run-dependent order (:func:`atomic_scatter`), each index's rows are summed first
    (:func:`group_sums`). Returns ``out``."""
    if atomic_scatter(out):
        index, rows = group_sums(index, rows)
    return out.scatter_add_(1, index[..., None].expand(-1, -1, out.shape[-1]), rows.to(out.dtype))


def atomic_scatter(t: Tensor) -> bool:
    """Whether ``scatter_add_`` on ``t``'s device adds duplicates in a run-dependent order (CUDA's atomics; the
    CPU kernel adds in index order)."""
    return t.is_cuda


def group_sums(slot: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """``(slot', delta')`` that ``scatter_add_`` into the same result in any order: each run of equal ``slot``
    (B, r) entries gets its ``delta`` (B, r, D) rows' sum on its last entry and exact zeros elsewhere.

    Why: several merged tokens (R-MeeTo, ToMe) can fold into one destination, and on a GPU the order of
    scatter_add_'s atomic adds varies from run to run, so the rounded sums (bf16 hidden states) did too, and
    later merges, which pick partners by similarity, then diverged: two eager forwards of the same segmentation
    batch differed by more than 0.1 in 46 % of the last tap's features. Adding exact zeros is order-free. The
    sums are float64 prefix sums along the slot-sorted rows (a deterministic scan), differenced at run
    boundaries."""
    slot, order = torch.sort(slot, dim=1, stable=True)
    prefix = delta.gather(1, order[..., None].expand_as(delta)).double().cumsum(1)
    steps = torch.arange(slot.shape[1], device=slot.device)
    first = torch.ones_like(slot, dtype=torch.bool)
    first[:, 1:] = slot[:, 1:] != slot[:, :-1]
    last = torch.ones_like(slot, dtype=torch.bool)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, steps, 0).cummax(1).values  # index of the first entry of each entry's run
    before = prefix.gather(1, (start - 1).clamp_min(0)[..., None].expand_as(prefix))
    sums = prefix - torch.where((start > 0)[..., None], before, 0.0)
    return slot, torch.where(last[..., None], sums, 0.0).to(delta.dtype)


def batch_arange(batch: int, length: int, device: torch.device) -> Tensor:
    """(B, L) tensor of 0..L-1 per row."""
    return torch.arange(length, device=device).expand(batch, length)


def token_mse(state: TokenState, teacher_state: TokenState) -> Tensor:
    """MSE between each remaining student token (protected tokens excluded; masked-out tokens excluded) and the
    dense teacher's token at the same original position."""
    hidden = state.hidden.float()
    bsz, length, dim = hidden.shape
    target = teacher_state.hidden.float().gather(1, state.positions[..., None].expand(-1, -1, dim))
    keep = (~protected_mask(state.protected, length)).float()
    if state.mask is not None:
        keep = keep * state.mask.float()
    per_token = (hidden - target).pow(2).mean(-1)
    return (per_token * keep).sum() / keep.sum().clamp(min=1)
