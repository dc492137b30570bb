"""The pruning core shared by ToP and the baselines: a schedule of pruning events, each keeping the best-scored
patch tokens (globally or one drop per window of consecutive tokens), survivors in order, the protected tokens
(class token, registers) never candidates and re-inserted where the backbone's layout says, with optional
hidden-state alignment. Methods differ only in :meth:`ProgressivePruner.scores`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..contract import (MixerContext, Reducer, TokenState, insert_at, layout_slots, protected_mask, scan_gap_pair,
                        unprotected_index)

ALIGN_MODES = (None, "hold", "decay")
# 'middle': where the backbone's protected_layout puts the protected tokens (Vim: its class token at the middle);
# 'original': at their original places among the survivors
CLS_PLACEMENTS = ("middle", "original")
ORDERS = ("original", "score")
SELECTIONS = ("global", "window")
DEFAULT_LAYERS = (5, 10, 15)
DENSE_TOKENS = "dense_tokens"  # TokenState.extras key: the token count before any pruning (set by begin)
SCAN_GAPS = "scan_gaps"  # TokenState.extras key: (2, B, L) decay gaps of the current positions (align='decay')



def kept_patches(num_tokens: int, keep: float, protected: int = 1) -> int:
    """Patch tokens kept out of ``num_tokens`` (``protected`` tokens included): ceil((L-P)*keep), rounded down to
    an even count so a class token can sit exactly in the middle (the released code's rule); all if that is
    >= L-P."""
    patches = num_tokens - protected
    n = math.ceil(patches * keep - 1e-9)
    if n >= patches:
        return patches
    return n - n % 2 if n >= 2 else n


def tokens_per_layer(num_tokens: int, depth: int, layers: Sequence[int], keep: float | Sequence[float],
                     protected: int = 1) -> list[int]:
    """Token count each block sees under a pruning schedule (for FLOPs and reports)."""
    keeps = _per_layer_keep(layers, keep)
    counts, n = [], num_tokens
    for i in range(depth):
        if i in keeps and n - protected >= 2:
            n = kept_patches(n, keeps[i], protected) + protected
        counts.append(n)
    return counts


def window_keep(score: Tensor, protected: Tensor, n_keep: int) -> Tensor:
    """(B, n_keep) sequence indices of the patch tokens kept by window selection, in original order.

    The L-P patch tokens (sequence order, the protected tokens (B, P) left out) are cut into near-equal runs of
    consecutive tokens: one run per dropped token, each dropping its lowest-scored token (or, when fewer than
    half are kept, one run per kept token, each keeping its best). The drops are spread as evenly as static pruning's
    and the score decides only inside each run. Two sorts, no host sync."""
    bsz, length = score.shape
    n = length - protected.shape[1]
    if not 1 <= n_keep <= n:
        raise ValueError(f"window selection keeps 1..{n} of {n} patch tokens, got {n_keep}")
    others = unprotected_index(protected, length)
    patch_score = score.gather(1, others)
    drop = n - n_keep <= n_keep
    runs = n - n_keep if drop else n_keep
    if runs == 0:
        return others
    run = torch.arange(n, device=score.device) * runs // n  # (n,) run of each patch, non-decreasing
    by_score = patch_score.argsort(dim=1, descending=not drop)  # drop: worst first; keep: best first
    grouped = by_score.gather(1, torch.sort(run[by_score], dim=1, stable=True).indices)  # by run, then score
    picked = grouped[:, torch.searchsorted(run, torch.arange(runs, device=score.device))]  # (B, runs) ascending
    if drop:
        slot = torch.arange(n, device=score.device).expand(bsz, n)
        kept = slot.scatter(1, picked, n)  # dropped slots moved past every kept one
        picked = kept.sort(dim=1).values[:, :n_keep]
    return others.gather(1, picked)


def _per_layer_keep(layers: Sequence[int], keep: float | Sequence[float]) -> dict[int, float]:
    layers = [int(i) for i in layers]
    keeps = [float(keep)] * len(layers) if isinstance(keep, (int, float)) else [float(k) for k in keep]
    if len(keeps) != len(layers):
        raise ValueError(f"keep has {len(keeps)} values for {len(layers)} pruning layers {layers}")
    if sorted(set(layers)) != layers or any(i < 1 for i in layers):
        raise ValueError(f"pruning layers must be increasing block indices >= 1 (prune after that many blocks), "
                         f"got {layers}")
    bad = [k for k in keeps if not 0.0 < k <= 1.0]
    if bad:
        raise ValueError(f"keep ratios must lie in (0, 1], got {bad}")
    return dict(zip(layers, keeps))


class ProgressivePruner(Reducer):
    """Drop tokens before blocks ``layers`` (0-based, i.e. after that many blocks) by ``scores``.

    Subclasses implement :meth:`scores`. Works on variable-length batches only in the sense that every image
    keeps the same count (as ToP does), so the batch stays a dense tensor.
    """

    def __init__(self, layers: Sequence[int] = DEFAULT_LAYERS, keep: float | Sequence[float] = 0.8,
                 align: str | None = None, cls_placement: str = "middle", order: str = "original",
                 selection: str = "global") -> None:
        super().__init__()
        if align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
        if cls_placement not in CLS_PLACEMENTS:
            raise ValueError(f"cls_placement must be one of {CLS_PLACEMENTS}, got {cls_placement!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if order == "score" and (align is not None or cls_placement != "middle" or selection != "global"):
            raise ValueError("order='score' (survivors ranked by score, as ViT pruning does) keeps no positional "
                             "order: it needs align=None, cls_placement='middle' and selection='global'")
        self.keep_at = _per_layer_keep(layers, keep)
        self.layers = sorted(self.keep_at)
        self.align = align
        self.cls_placement = cls_placement
        # 'original': survivors keep their order (ToP); 'score': ranked by score, as top-k token pruning for ViTs
        # (EViT, DynamicViT's inference) leaves them -- harmless for attention, not for a scan (an ablation)
        self.order = order
        # 'global': the n_keep best-scored tokens (ToP); 'window': one drop per run of consecutive tokens, the
        # worst-scored of the run (drops spread like static pruning, the score decides within each run)
        self.selection = selection

    def scores(self, layer_idx: int, state: TokenState) -> Tensor:
        """(B, L) importance of each token (higher = kept); the protected tokens' values are ignored."""
        raise NotImplementedError

    def begin(self, state: TokenState) -> TokenState:
        """Record the dense token count (what ``positions`` index into) in the state, for the aligned mixer:
        it then sizes its position map without reading ``positions.max()`` back from the device."""
        return state.replace(extras={**state.extras, DENSE_TOKENS: state.num_tokens})

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        keep = self.keep_at.get(layer_idx)
        count, length = state.num_protected, state.num_tokens
        if keep is None or length - count < 2:
            return state
        if state.mask is not None:
            raise ValueError("token pruning cannot follow a method that masks tokens (TokenState.mask is set)")
        n_keep = kept_patches(length, keep, count)
        if n_keep >= length - count:
            return state
        score = self.scores(layer_idx, state).float()
        # protected tokens are never candidates (masked_fill: an indexed write of a Python float would copy a
        # host scalar every call, which also rules out CUDA-graph capture)
        score = score.masked_fill(protected_mask(state.protected, length), float("-inf"))
        if self.selection == "window":
            top = window_keep(score, state.protected, n_keep)  # in original order
        else:
            top = score.topk(n_keep, dim=1).indices  # by descending score
            if self.order == "original":
                top = top.sort(dim=1).values  # survivors in original order
        if self.cls_placement == "middle":  # where the backbone's layout puts them (Vim: the middle)
            kept = torch.full((top.shape[0],), n_keep, dtype=torch.long, device=top.device)
            slots = layout_slots(state.protected_layout, kept, count)
            state = state.gather(insert_at(top, state.protected, slots), protected=slots)
        else:  # at their original places among the survivors
            state = state.gather(torch.cat([top, state.protected], 1).sort(dim=1).values)
        if self.align == "decay":  # the scan gaps of the new positions, once for the layers up to the next event
            gaps = scan_gap_pair(state.positions, state.protected)
            state = state.replace(extras={**state.extras, SCAN_GAPS: gaps})
        return state

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        if self.align is None or layer_idx < self.layers[0]:
            return None
        return MixerContext(positions=state.positions, protected=state.protected, align=self.align,
                            full_length=state.extras.get(DENSE_TOKENS), gaps=state.extras.get(SCAN_GAPS))

    def tokens_per_layer(self, num_tokens: int, depth: int) -> list[int]:
        return tokens_per_layer(num_tokens, depth, self.layers, [self.keep_at[i] for i in self.layers])

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        """Alignment: the local conv runs over the original length (both directions, d_inner = 2*dim channels,
        kernel 4) instead of the kept tokens; the decay adds one multiply-add per state entry per step (folded
        into exp(delta*A)'s argument: L*d_inner*1). Counted as MACs, paper convention (one direction)."""
        if self.align is None or not tokens_per_layer:
            return 0.0
        full, d_inner, k = tokens_per_layer[0], 2 * dim, 4
        extra = 0.0
        for i, n in enumerate(tokens_per_layer):
            if i >= self.layers[0]:
                extra += (full - n) * d_inner * k  # conv over pruned slots
                if self.align == "decay":
                    extra += n * d_inner  # gap * delta_prev added to the exponent
        return extra

    def extra_repr(self) -> str:
        return (f"keep_at={self.keep_at}, align={self.align!r}, cls_placement={self.cls_placement!r}, "
                f"order={self.order!r}, selection={self.selection!r}")
