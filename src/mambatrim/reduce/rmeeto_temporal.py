"""R-MeeTo's temporal pairing for video (our extension): merge within the same spatial location across adjacent
frames, instead of between alternate sequence neighbours.

Video tokens are ``[cls, frame 0 raster, frame 1 raster, ...]``: dense patch ``t*H*W + h*W + w`` is (t, h, w),
and the model reports ``TokenState.grid = (T, H, W)``. Every token's location comes from its original position
(``TokenState.positions``, the protected tokens' dense slots left out), which a merged token takes from its
destination. The pairing:

1. the surviving tokens of one location (h, w) form a *column*, in time order; along each column tokens
   alternate between the sides: rank 0, 2, 4, ... are destinations (B), rank 1, 3, ... sources (A);
2. each source's candidates are its column neighbours, the previous and the next surviving token at the same
   location (ties go to the previous one); its score is the better cosine similarity;
3. the ``r`` sources with the highest score merge into their partners (R-MeeTo's order-preserving merge).

On a dense clip the sources are the odd frames and the partners the same location in frame t-1 or t+1. After
merges the grid is irregular: "the adjacent frame" is then the nearest surviving token at the same location,
earlier or later, so no source is ever left without a partner and no fallback is needed. Since every merge stays
within a location, a merged token always covers one (h, w) over consecutive frames (a tube). One event can merge
at most ``sum_columns floor(c / 2) >= (n - H*W) / 2`` tokens, so ``r`` is capped at ``(n - H*W) // 2`` (n:
unprotected tokens): the sequence cannot shrink below one token per location, and a one-frame clip merges
nothing. Everything is batched (a sort by location, neighbour dot products, topk): no per-sample loop, no host
sync, and only 2n similarities instead of the sequence pairing's n^2 / 4.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..contract import take_rows


def frame_layout(grid: tuple[int, ...] | None) -> tuple[int, int]:
    """(frames, patches per frame) of a video token grid ``(T, H, W)``; ValueError for anything else."""
    if grid is None or len(grid) != 3:
        raise ValueError(f"rmeeto: pairing='temporal' needs a video model, whose tokens carry a (frames, height, "
                         f"width) grid; got grid {grid!r}. Use pairing='sequence' for image models")
    return int(grid[0]), int(grid[1]) * int(grid[2])


def patch_index(positions: Tensor, protected: Tensor, seq: Tensor) -> Tensor:
    """(B, K) dense patch index of the tokens at sequence indices ``seq``: their original position less the
    protected tokens placed before it in the dense sequence (the class token is no patch)."""
    pos = positions.gather(1, seq)
    pos_p = positions.gather(1, protected)
    return pos - (pos_p[:, None, :] < pos[..., None]).sum(-1)


def temporal_pairs(hidden: Tensor, positions: Tensor, protected: Tensor, seq_of_k: Tensor,
                   grid: tuple[int, ...], r: int) -> tuple[Tensor, Tensor]:
    """(src, dst), each (B, r): ranks among the unprotected tokens ``seq_of_k`` of the merged-away tokens and
    of their partners (see the module docstring; ``r <= (n - H*W) // 2``)."""
    frames, per_frame = frame_layout(grid)
    bsz, n = seq_of_k.shape
    patch = patch_index(positions, protected, seq_of_k)
    loc = patch % per_frame
    order = torch.argsort(loc * (frames * per_frame) + patch, dim=1)  # columns, each in time order
    loc = loc.gather(1, order)
    idx = torch.arange(n, device=hidden.device).expand(bsz, n)
    same = torch.zeros_like(loc, dtype=torch.bool)  # column position i continues the column of i - 1
    same[:, 1:] = loc[:, 1:] == loc[:, :-1]
    rank = idx - torch.where(same, 0, idx).cummax(1).values
    work = torch.promote_types(hidden.dtype, torch.float32)
    rows = take_rows(hidden, seq_of_k.gather(1, order)).to(work)
    inv = torch.linalg.vector_norm(rows, dim=-1).clamp_min(1e-12).reciprocal()
    adjacent = (rows[:, 1:] * rows[:, :-1]).sum(-1) * inv[:, 1:] * inv[:, :-1]  # (B, n-1): i and i+1
    low = torch.full((bsz, 1), float("-inf"), dtype=work, device=hidden.device)
    prev = torch.where(same, torch.cat([low, adjacent], 1), float("-inf"))
    nxt = torch.where(torch.cat([same[:, 1:], torch.zeros_like(same[:, :1])], 1), torch.cat([adjacent, low], 1),
                      float("-inf"))
    use_next = nxt > prev
    score = torch.where(rank % 2 == 1, torch.maximum(prev, nxt), float("-inf"))
    src = score.topk(r, dim=-1).indices  # column positions of the merged-away tokens
    partner = src - 1 + 2 * use_next.gather(1, src).long()
    return order.gather(1, src), order.gather(1, partner)
