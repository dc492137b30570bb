"""R-MeeTo: order-preserving token merging for Vision Mamba (Shi et al., arXiv 2412.12496).

Before every second block (2, 4, ..., depth-2), ``r`` tokens are merged away by bipartite soft matching:

1. the protected tokens (class token, registers) are set aside; the other tokens are split alternately into
   A (even) and B (odd);
2. each A token finds its most similar B token (cosine similarity of the block's input hidden state, i.e. the
   previous mixer's output, before it is added to the residual stream);
3. the ``r`` A tokens with the highest similarity are merged into their partners: hidden state and residual
   stream are both replaced by size-weighted averages, and sizes (original tokens per token) add up;
4. merged tokens stay at their B token's slot, every other token keeps its relative order, so the sequence
   stays in raster order (Mamba is order sensitive);
5. the protected tokens go back in, in their relative order (they are never merged, never a source or a
   destination): ``official`` rule ``int(p * (L - r) // L)`` (batch-wide proportional index), ``middle`` (the
   middle of the new sequence) or ``boundary`` (between the tokens that came from its left and its right, per
   sample, so positions stay sorted including the class token). With several protected tokens, slots that the
   rule gives twice are pushed apart (each at least one past the previous, at most where the tail still fits).

``pairing='temporal'`` (video models, :mod:`.rmeeto_temporal`) replaces step 1-2's alternate split by pairs
at the same spatial location in adjacent frames; steps 3-5 are the same.

Everything is batched index arithmetic (gather / topk / cumsum / scatter_add on the r merged rows) with no per-sample Python loop and
no host-device synchronisation; the merge weights carry no gradient but the merged values do, so the same code
serves training-free evaluation and re-training. ``apply(model, ratio=0.31)`` or ``apply(model, r=11)`` attaches
it; ``model.set_reducer(None)`` removes it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..ops import get_backend, policy
from ..validation import check, check_choice
from .options import method_options
from .registry import MethodSpec, register_method
from ..contract import Reducer, TokenState, add_rows_, free_slots, insert_at, take_rows, unprotected_index
from .rmeeto_temporal import frame_layout, temporal_pairs

CLS_POSITIONS = ("official", "middle", "boundary")
PAIRINGS = ("sequence", "temporal")  # alternate sequence neighbours (the paper); same location, adjacent frames
DEFAULT_RATIO = 0.31  # the paper's Vim-S / Vim-B setting (r = 11)


# ---------------------------------------------------------------------------------------------- schedule
def merge_layers(depth: int, interval: int = 2) -> tuple[int, ...]:
    """Blocks that merge at their input: ``interval, 2*interval, ...`` below ``depth`` (2, 4, ..., 22 for 24)."""
    if depth < 1 or interval < 1:
        raise ValueError(f"merge_layers needs depth >= 1 and interval >= 1, got depth={depth}, "
                         f"interval={interval}")
    return tuple(range(interval, depth, interval))


def capped_r(num_tokens: int, r: int, protected: int = 1, floor: int = 0) -> int:
    """Tokens one merge event removes from ``num_tokens`` (``protected`` tokens included): at most half the
    others, less ``floor`` (the temporal pairing's tokens per frame: it keeps one token per location)."""
    return max(0, min(r, (num_tokens - protected - floor) // 2))


def tokens_per_layer(num_tokens: int, depth: int, r: int, layers: Sequence[int], protected: int = 1,
                     floor: int = 0) -> list[int]:
    """Sequence length each block runs on when ``r`` tokens merge before every block in ``layers``."""
    out, length, events = [], num_tokens, set(layers)
    for i in range(depth):
        if i in events:
            length -= capped_r(length, r, protected, floor)
        out.append(length)
    return out


def ratio_for_r(r: int, num_tokens: int = 197, depth: int = 24, layers: Sequence[int] | None = None,
                protected: int = 1, floor: int = 0) -> float:
    """Reduction ratio = 1 - sum_l N_l / (depth * N_0): the share of token-block work removed.

    Without the cap this is ``r * sum_events(depth - l) / (depth * N_0)`` (132 r / 4728 for Vim at 224), i.e.
    0.14 / 0.28 / 0.31 / 0.42 / 0.54 for r = 5 / 10 / 11 / 15 / 20 (the last one capped in the final merges).
    """
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    layers = merge_layers(depth) if layers is None else layers
    return 1.0 - sum(tokens_per_layer(num_tokens, depth, r, layers, protected, floor)) / (depth * num_tokens)


def r_for_ratio(ratio: float, num_tokens: int = 197, depth: int = 24, layers: Sequence[int] | None = None,
                protected: int = 1, floor: int = 0) -> int:
    """The r whose :func:`ratio_for_r` is closest to ``ratio`` (ratio_for_r is monotone in r)."""
    layers = merge_layers(depth) if layers is None else layers
    r_max = max(0, (num_tokens - protected - floor) // 2)
    top = ratio_for_r(r_max, num_tokens, depth, layers, protected, floor)
    if not 0.0 <= ratio <= top + 0.005:
        raise ValueError(f"reduction ratio {ratio} is out of range: with {num_tokens} tokens, depth {depth} and "
                         f"merges before blocks {list(layers)} it must lie in [0, {top:.3f}]")
    return min(range(r_max + 1),
               key=lambda r: (abs(ratio_for_r(r, num_tokens, depth, layers, protected, floor) - ratio), r))


# ---------------------------------------------------------------------------------------------- merging
def _merge_rows(t: Tensor, out_seq: Tensor, src_seq: Tensor, dst_seq: Tensor, dst_slot: Tensor,
                weight: Tensor) -> Tensor:
    """Kept rows of ``t`` in output order, then each merged-away row folded into its partner's slot.

    ``out = t[b] + sum_a w_a (t[a] - t[b])`` with ``w_a = size_a / merged size``: the size-weighted average of the
    group, computed in >= fp32 on the r merged rows only. Unmerged rows are copied exactly.
    """
    out = take_rows(t, out_seq)
    work = torch.promote_types(t.dtype, torch.float32)
    delta = (take_rows(t, src_seq).to(work) - take_rows(t, dst_seq).to(work)) * weight[..., None]
    return add_rows_(out, dst_slot, delta)


def merge_tokens(state: TokenState, r: int, cls_position: str = "official",
                 merge_fn: Callable[..., tuple[Tensor, ...]] | None = None, pairing: str = "sequence") -> TokenState:
    """One R-MeeTo merge event on ``state``: ``r`` fewer tokens, order preserved (see the module docstring).

    ``merge_fn``: the tensor function doing the work (:func:`merge_arrays`, a ``torch.compile`` of it, or for
    ``pairing='temporal'`` :func:`temporal_merge_arrays`, called with the state's grid as its last argument).
    """
    check_choice(cls_position, "cls_position", CLS_POSITIONS, "rmeeto")
    check_choice(pairing, "pairing", PAIRINGS, "rmeeto")
    if state.mask is not None:
        raise ValueError("R-MeeTo merging cannot follow a masked (training-time) pruning method: the state "
                         "carries a token mask")
    hidden, extra, floor = state.hidden, (), 0
    if pairing == "temporal":
        floor = frame_layout(state.grid)[1]
        extra = (tuple(state.grid),)
    r = capped_r(hidden.shape[1], r, state.num_protected, floor)
    if r == 0:
        return state
    sizes = state.sizes
    if sizes is None:
        sizes = hidden.new_ones(hidden.shape[:2], dtype=torch.float32)
    fn = merge_fn or (temporal_merge_arrays if extra else merge_arrays)
    hidden, residual, positions, protected, sizes = fn(
        hidden, state.residual, state.positions, state.protected, sizes, r, cls_position, *extra)
    return state.replace(hidden=hidden, residual=residual, positions=positions, protected=protected, sizes=sizes)


def merge_arrays(hidden: Tensor, residual: Tensor | None, positions: Tensor, protected: Tensor, sizes: Tensor,
                 r: int, cls_position: str) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """The merge on plain tensors: (hidden, residual, positions, protected (B, P), sizes) after removing ``r``
    tokens (1 <= r <= (L - P) // 2), sequence pairing."""
    with torch.no_grad():
        seq_of_k = unprotected_index(protected, hidden.shape[1])  # sequence index of the k-th unprotected token
        src, dst = sequence_pairs(hidden, seq_of_k, r)
    return merge_pairs(hidden, residual, positions, protected, sizes, seq_of_k, src, dst, cls_position)


def temporal_merge_arrays(hidden: Tensor, residual: Tensor | None, positions: Tensor, protected: Tensor,
                          sizes: Tensor, r: int, cls_position: str, grid: tuple[int, ...]
                          ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """:func:`merge_arrays` with the temporal pairing (:mod:`.rmeeto_temporal`) on a ``grid`` (T, H, W) clip
    (1 <= r <= (L - P - H*W) // 2)."""
    with torch.no_grad():
        seq_of_k = unprotected_index(protected, hidden.shape[1])
        src, dst = temporal_pairs(hidden, positions, protected, seq_of_k, grid, r)
    return merge_pairs(hidden, residual, positions, protected, sizes, seq_of_k, src, dst, cls_position)


def sequence_pairs(hidden: Tensor, seq_of_k: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(src, dst) (B, r): ranks among the unprotected tokens ``seq_of_k`` of the ``r`` A (even) tokens merged
    away and of their most similar B (odd) tokens (cosine similarity of all A x B pairs)."""
    seq_a, seq_b = seq_of_k[:, 0::2], seq_of_k[:, 1::2]
    # cosine similarity without a normalised copy: raw dot products scaled by inverse norms
    work = torch.promote_types(hidden.dtype, torch.float32)
    inv_norm = torch.linalg.vector_norm(hidden, dim=-1, dtype=work).clamp_min(1e-12).reciprocal()
    scores = (take_rows(hidden, seq_a) @ take_rows(hidden, seq_b).transpose(1, 2)).to(work)
    scores = scores * inv_norm.gather(1, seq_a)[..., None] * inv_norm.gather(1, seq_b)[:, None, :]
    best, partner = scores.max(-1)  # (B, na): each A token's most similar B token
    src = best.topk(r, dim=-1).indices  # (B, r): A tokens merged away
    return 2 * src, 2 * partner.gather(1, src) + 1


def merge_pairs(hidden: Tensor, residual: Tensor | None, positions: Tensor, protected: Tensor, sizes: Tensor,
                seq_of_k: Tensor, src: Tensor, dst: Tensor, cls_position: str
                ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Merge unprotected tokens ``src`` (B, r) into ``dst`` (B, r) (ranks among ``seq_of_k``; no source is a
    destination), order preserved, the protected tokens re-inserted by ``cls_position``."""
    bsz, length, _ = hidden.shape
    n, r = seq_of_k.shape[1], src.shape[1]
    kept_len = n - r  # unprotected tokens left
    with torch.no_grad():
        kept = torch.ones(bsz, n, dtype=torch.bool, device=hidden.device).scatter_(1, src, False)
        rank = kept.cumsum(1) - 1  # slot of each kept token among the kept non-class tokens (raster order)
        # kept tokens' sequence indices in order; merged ones go to a spare last column that is dropped
        keep_seq = torch.zeros(bsz, kept_len + 1, dtype=torch.long, device=hidden.device).scatter_(
            1, torch.where(kept, rank, kept_len), seq_of_k)[:, :kept_len]
        q = _protected_slots(positions, protected, kept, seq_of_k, length, r, cls_position)
        out_seq = insert_at(keep_seq, protected, q)  # (B, L - r) sequence index per slot
        dst_slot = free_slots(q, rank.gather(1, dst))
        src_seq, dst_seq = seq_of_k.gather(1, src), seq_of_k.gather(1, dst)
        src_size = sizes.gather(1, src_seq)
        new_sizes = sizes.gather(1, out_seq).scatter_add_(1, dst_slot, src_size)
        weight = src_size / new_sizes.gather(1, dst_slot)
    return (_merge_rows(hidden, out_seq, src_seq, dst_seq, dst_slot, weight),
            None if residual is None else _merge_rows(residual, out_seq, src_seq, dst_seq, dst_slot, weight),
            positions.gather(1, out_seq), q, new_sizes)


def _protected_slots(positions: Tensor, protected: Tensor, kept: Tensor, seq_of_k: Tensor, length: int, r: int,
                     rule: str) -> Tensor:
    """(B, P) strictly ascending indices of the protected tokens in the merged sequence of ``length - r``."""
    count = protected.shape[1]
    kept_len = length - count - r
    i = torch.arange(count, device=protected.device)
    if rule == "official":  # int(p * (L - r) // L), as the released code: p <= L - 1 gives q <= L - r - 1
        q = protected * (length - r) // length
    elif rule == "middle":  # where Vim puts its class token: the middle of the other tokens
        q = (kept_len // 2 + i).expand_as(protected)
    else:  # boundary: after every kept token that came from the protected token's left
        pos_k = positions.gather(1, seq_of_k)
        pos_p = positions.gather(1, protected)
        q = (kept[:, :, None] & (pos_k[:, :, None] < pos_p[:, None, :])).sum(1) + i
    # strictly ascending (a slot given twice moves one past the previous) and room left for the later ones
    q = torch.cummax(q - i, dim=1).values + i if count else q
    return torch.minimum(q, kept_len + i)


# ---------------------------------------------------------------------------------------------- reducer
class RMeeToReducer(Reducer):
    """Merge ``r`` tokens before every block in ``layers`` (hidden and residual, size-weighted, order kept)."""

    def __init__(self, r: int, layers: Sequence[int], cls_position: str = "official", compile: bool = False,
                 fused: bool | None = None, pairing: str = "sequence") -> None:
        super().__init__()
        if int(r) != r or r < 0:
            raise ValueError(f"r (tokens merged per event) must be a non-negative integer, got {r!r}")
        check_choice(cls_position, "cls_position", CLS_POSITIONS, "rmeeto")
        self.pairing = check_choice(pairing, "pairing", PAIRINGS, "rmeeto")
        bad = [layer for layer in layers if int(layer) != layer or layer < 0]
        if bad:
            raise ValueError(f"merge layers must be non-negative block indices, got {bad}")
        self.r = int(r)
        self.layers = tuple(sorted({int(layer) for layer in layers}))
        self.cls_position = cls_position
        self.compile = bool(compile)
        self.fused = fused
        self._merge_fn: Callable[..., tuple[Tensor, ...]] | None = None

    def merge_fn(self) -> Callable[..., tuple[Tensor, ...]]:
        """:func:`merge_arrays` (:func:`temporal_merge_arrays` for the temporal pairing), or its
        ``torch.compile`` (fewer, fused kernels: GPU) when ``compile=True``."""
        if self._merge_fn is None:
            fn = temporal_merge_arrays if self.pairing == "temporal" else merge_arrays
            self._merge_fn = torch.compile(fn, dynamic=True) if self.compile else fn
        return self._merge_fn

    def extra_repr(self) -> str:
        return (f"r={self.r}, layers={list(self.layers)}, cls_position={self.cls_position!r}, "
                f"fused={self.fused}, pairing={self.pairing!r}")

    def use_fused(self, hidden: Tensor, protected: int = 1) -> bool:
        """The Triton merge (:mod:`.rmeeto_kernels`, two launches per event): by default (``fused=None``) at
        inference wherever the 'triton' backend runs and the policy's ``fused_merge`` is on; never with
        ``fused=False``, wherever Triton runs with ``fused=True``; training always uses the differentiable
        PyTorch merge. Its kernels set one class token aside: with ``protected`` != 1 tokens (no class token,
        registers) the PyTorch merge runs instead. They pair alternate sequence neighbours: the temporal pairing
        always runs in PyTorch (a sort and 2n neighbour similarities, no n^2 / 4 matrix to fuse)."""
        if (self.fused is False or protected != 1 or self.pairing != "sequence"
                or (torch.is_grad_enabled() and hidden.requires_grad)):
            return False
        if self.fused is None:
            return policy.get("fused_merge") and get_backend(hidden.device.type) == "triton"
        return True

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        if layer_idx in self.layers:
            fn = self.merge_fn()
            if self.use_fused(state.hidden, state.num_protected):
                from .rmeeto_kernels import fused_merge  # noqa: PLC0415 (needs triton)

                fn = fused_merge
            return merge_tokens(state, self.r, self.cls_position, fn, self.pairing)
        return state

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        """The paper's matching cost per event with T tokens before it: norm 6TC + similarity 2C(T/2)^2 + rC;
        the temporal pairing compares column neighbours only: similarity 2CT."""
        total = 0.0
        for layer in self.layers:
            if 0 < layer < len(tokens_per_layer):
                before, after = tokens_per_layer[layer - 1], tokens_per_layer[layer]
                if before > after:
                    similarity = 2 * dim * (before if self.pairing == "temporal" else (before / 2) ** 2)
                    total += 6 * before * dim + similarity + (before - after) * dim
        return total


@method_options("rmeeto")
def apply(model: nn.Module, keep: float | None = None, ratio: float | None = None, r: int | None = None,
          layers: Sequence[int] | None = None, interval: int = 2, cls_position: str = "official",
          compile: bool = False, fused: bool | None = None, pairing: str = "sequence") -> nn.Module:
    """Attach R-MeeTo to a Vim ``model`` (in place) and return it; ``model.set_reducer(None)`` undoes it.

    Give one of ``keep`` (fraction of the dense token-layers kept), ``ratio`` (the paper's reduction ratio,
    ``1 - keep``; both mapped to the nearest r for the model's token count and depth) or ``r`` (tokens merged
    per event); none means the paper's ratio 0.31. ``layers`` defaults to every ``interval``-th block from
    ``interval`` on. ``compile=True`` runs the merge through ``torch.compile`` (fused index arithmetic; worth it
    on a GPU, where the merge is otherwise dozens of tiny kernels). ``fused``: the Triton merge at inference
    (two launches per event); ``None`` = where the 'triton' backend runs (policy ``fused_merge``).
    ``pairing``: 'sequence' (the paper: alternate sequence neighbours) or 'temporal' (video models: the same
    location in adjacent frames, :mod:`.rmeeto_temporal`; PyTorch merge; at most half the tokens beyond one
    per location merge per event, so the ratio maps to r under that cap).
    """
    if not hasattr(model, "set_reducer") or not hasattr(model, "depth"):
        raise TypeError(f"R-MeeTo needs a mambatrim VisionMamba model, got {type(model).__name__}")
    given = [name for name, value in (("keep", keep), ("ratio", ratio), ("r", r)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"rmeeto: give only one of keep= (fraction kept), ratio= (reduction ratio, e.g. 0.31) "
                         f"or r= (tokens merged per event), got {' and '.join(given)}")
    if keep is not None:
        ratio = 1.0 - check(keep, "rmeeto: keep", "fraction")
    elif ratio is not None:
        ratio = check(ratio, "rmeeto: ratio (the reduction ratio, 1 - keep)", "fraction_below_one")
    elif r is None:
        ratio = DEFAULT_RATIO
    check_choice(cls_position, "cls_position", CLS_POSITIONS, "rmeeto")
    floor = temporal_floor(model) if check_choice(pairing, "pairing", PAIRINGS, "rmeeto") == "temporal" else 0
    depth = int(model.depth)
    layers = merge_layers(depth, interval) if layers is None else tuple(layers)
    out_of_range = [layer for layer in layers if not 0 <= layer < depth]
    if out_of_range:
        raise ValueError(f"rmeeto: merge layers {out_of_range} are outside the model's blocks 0..{depth - 1}")
    count = int(getattr(model, "num_protected", 1))
    num_tokens = model.patch_embed.num_patches + count
    if r is None:
        r = r_for_ratio(float(ratio), num_tokens, depth, layers, count, floor)
    elif isinstance(r, bool) or int(r) != r or not 0 <= r <= (num_tokens - count) // 2:
        raise ValueError(f"rmeeto: r (tokens merged per event) must be an integer in 0..{(num_tokens - count) // 2} "
                         f"for {num_tokens} tokens (one event merges at most half of the patch tokens), got {r!r}")
    return model.set_reducer(RMeeToReducer(int(r), layers, cls_position, compile, fused, pairing))


def temporal_floor(model: nn.Module) -> int:
    """Patch tokens per frame of a video ``model`` (what the temporal pairing never merges below); a one-line
    error for a model without frames."""
    per_frame = getattr(model.patch_embed, "frame_patches", None)
    if not getattr(model, "num_frames", None) or per_frame is None:
        raise ValueError(f"rmeeto: pairing='temporal' merges the same location across frames and needs a video "
                         f"model; {type(model).__name__} has no frames: use pairing='sequence'")
    return int(per_frame)


register_method(MethodSpec(
    name="rmeeto",
    apply=apply,
    description="R-MeeTo: order-preserving bipartite token merging every 2nd block (keep=, ratio= or r=; "
                "pairing=temporal on video)",
    demo_options={"ratio": 0.3, "layers": [2, 3]},  # the demo's setting (engine/demo.py): 64 patch tokens, 4 blocks
    trainable=True,
))
