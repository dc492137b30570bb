"""Dense outputs from a reduced token sequence: every original token gets a feature back at the taps.

:class:`DenseRestore` wraps any :class:`Reducer` (or none) and reads only the :class:`TokenState` it leaves:

* **pruned** tokens (gone from ``positions``, or masked out by a training-time mask) are frozen: they keep the
  residual-stream feature ``hidden + residual`` they had when they were pruned (DyVM's segmentation backbone,
  also used for ToP and plain pruning);
* **merged** tokens (gone while the survivors' ``sizes`` grew) are unmerged as ToMe does for dense tasks: each
  takes the feature of the token it was merged into, followed through later merges. The destination is the
  grown token most cosine-similar to the merged token's ``hidden`` before the event: bipartite merging picks
  each source's most similar partner, and that partner is always among the grown tokens, so the choice is the
  method's own without reading its internals.

Taps are the features after the blocks in ``taps`` (as the official Vim segmentation backbone takes them: the
residual stream, hidden + residual), scattered to the dense sequence. The wrapper adds nothing when nothing is
reduced, so the dense outputs equal the plain model's then.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .reducer import Reducer
from .tokens import TokenState

DENSE_TAPS = "dense_taps"  # TokenState.extras key: list of (B, L0, D) features, one per tap, dense order


def protected_positions(state: TokenState) -> Tensor:
    """(B, P) dense positions of the protected tokens (class tokens, registers); P may be 0."""
    return state.positions.gather(1, state.protected)


class DenseRestore(Reducer):
    """Run ``inner`` (``None``: dense) and record dense features after each block in ``taps``.

    The records land in ``state.extras[DENSE_TAPS]`` in tap order, each (B, L0, D) over the dense sequence that
    ``positions`` index (class tokens included; drop them with :func:`protected_positions`).
    """

    def __init__(self, inner: Reducer | None, taps: Sequence[int], depth: int) -> None:
        super().__init__()
        taps = sorted({int(t) for t in taps})
        bad = [t for t in taps if not 0 <= t < depth]
        if bad:
            raise ValueError(f"feature taps {bad} are outside the model's blocks 0..{depth - 1}")
        self.inner, self.taps, self.depth = inner, taps, depth
        self._canvas: Tensor | None = None  # (B, L0, D) frozen features by dense position
        self._rep: Tensor | None = None  # (B, L0) dense position whose token carries each position's feature

    def begin(self, state: TokenState) -> TokenState:
        if self.inner is not None:
            state = self.inner.begin(state)
        bsz, length = state.positions.shape
        self._rep = torch.arange(length, device=state.positions.device).expand(bsz, length)
        self._canvas = None
        return state.replace(extras={**state.extras, DENSE_TAPS: []})

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        if layer_idx - 1 in self.taps:
            state.extras[DENSE_TAPS].append(self.dense(state))
        if self.inner is None:
            return state
        new = self.inner.before_layer(layer_idx, state)
        if new is not state and state.residual is not None:
            self._update(state, new)
        return new

    def mixer_context(self, layer_idx: int, state: TokenState):  # type: ignore[override]
        return None if self.inner is None else self.inner.mixer_context(layer_idx, state)

    def finish(self, state: TokenState) -> TokenState:
        if self.inner is not None:
            state = self.inner.finish(state)
        if self.depth - 1 in self.taps:
            state.extras[DENSE_TAPS].append(self.dense(state))
        return state

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        return 0.0 if self.inner is None else self.inner.flops_overhead(tokens_per_layer, dim)

    def extra_losses(self, state: TokenState, teacher_state: TokenState | None = None) -> dict[str, Tensor]:
        return {} if self.inner is None else self.inner.extra_losses(state, teacher_state)

    # ------------------------------------------------------------------ bookkeeping
    def dense(self, state: TokenState) -> Tensor:
        """(B, L0, D) feature of every dense position: its carrier's current feature, or its frozen one."""
        feature, rep = _feature(state), self._rep
        slot = _slot_of_position(state.positions, rep.shape[1])
        carried = feature.gather(1, slot.gather(1, rep)[..., None].expand(-1, -1, feature.shape[-1]))
        if self._canvas is None:
            return carried
        live = _live(state, rep.shape[1]).gather(1, rep)
        frozen = self._canvas.gather(1, rep[..., None].expand_as(self._canvas))
        return torch.where(live[..., None], carried, frozen.to(carried.dtype))

    def _update(self, old: TokenState, new: TokenState) -> None:
        """Follow one reduction event: freeze the pruned tokens, point the merged ones at their destination."""
        dense_len = self._rep.shape[1]
        live_old, live_new = _live(old, dense_len), _live(new, dense_len)
        gone = live_old & ~live_new  # (B, L0) dense positions that stopped being carried
        feature = _feature(old)
        if self._canvas is None:
            self._canvas = feature.new_zeros(feature.shape[0], dense_len, feature.shape[-1])
        slot = _slot_of_position(old.positions, dense_len)
        write = live_old[..., None]
        self._canvas = torch.where(write, feature.gather(1, slot[..., None].expand_as(self._canvas)), self._canvas)
        target = torch.arange(dense_len, device=gone.device).expand_as(gone)  # pruned: itself, frozen
        if new.sizes is not None:
            target = _merge_targets(old, new, gone, target)
        self._rep = target.gather(1, self._rep)


def _feature(state: TokenState) -> Tensor:
    """The residual-stream feature of every token (hidden + residual; the embeddings before block 0)."""
    if state.residual is None:
        return state.hidden
    return state.residual + state.hidden.to(state.residual.dtype)


def _slot_of_position(positions: Tensor, dense_len: int) -> Tensor:
    """(B, L0) slot of each dense position in the current sequence (0 where absent)."""
    slots = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
    return positions.new_zeros(positions.shape[0], dense_len).scatter(1, positions, slots)


def _live(state: TokenState, dense_len: int) -> Tensor:
    """(B, L0) bool: dense positions carried by a live (present, unmasked) token of ``state``."""
    present = torch.ones_like(state.positions, dtype=torch.bool)
    if state.mask is not None:
        present = state.mask > 0.5
    out = torch.zeros(state.positions.shape[0], dense_len, dtype=torch.bool, device=state.positions.device)
    return out.scatter(1, state.positions, present)


def _merge_targets(old: TokenState, new: TokenState, gone: Tensor, target: Tensor) -> Tensor:
    """Point each merged-away position at the grown token most similar to it before the merge (ToMe's unmerge).

    Every sample loses the same count, the change in sequence length (merging is batch-uniform), so the sources
    and the grown destinations gather into (B, r) tensors and one (B, r, r) similarity decides."""
    dense_len = gone.shape[1]
    old_sizes = old.sizes if old.sizes is not None else torch.ones_like(old.positions, dtype=torch.float32)
    size_before = torch.zeros(gone.shape, dtype=old_sizes.dtype, device=gone.device).scatter(
        1, old.positions, old_sizes)
    grown_new = new.sizes > size_before.gather(1, new.positions) + 1e-6  # (B, L') tokens that absorbed others
    r = old.num_tokens - new.num_tokens  # from the shapes: no host sync, so the forward stays capturable
    if r <= 0:
        return target
    src_pos = gone.float().topk(r, dim=1).indices  # (B, r) dense positions merged away
    src_ok = gone.gather(1, src_pos)
    dst_slot_new = grown_new.float().topk(min(r, grown_new.shape[1]), dim=1).indices  # (B, <=r) in new
    dst_pos = new.positions.gather(1, dst_slot_new)
    dst_ok = grown_new.gather(1, dst_slot_new)
    slot_old = _slot_of_position(old.positions, dense_len)
    hidden = old.hidden.float()
    src_h = hidden.gather(1, slot_old.gather(1, src_pos)[..., None].expand(-1, -1, hidden.shape[-1]))
    dst_h = hidden.gather(1, slot_old.gather(1, dst_pos)[..., None].expand(-1, -1, hidden.shape[-1]))
    cos = torch.nn.functional.normalize(src_h, dim=-1) @ torch.nn.functional.normalize(dst_h, dim=-1).transpose(1, 2)
    cos = cos.masked_fill(~dst_ok[:, None, :], float("-inf"))
    chosen = dst_pos.gather(1, cos.argmax(-1))  # (B, r)
    return target.scatter(1, src_pos, torch.where(src_ok, chosen, target.gather(1, src_pos)))
