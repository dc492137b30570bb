"""Position-embedding resampling that knows Vim's class token sits in the MIDDLE of the sequence.

The official resize code (and timm's ``resample_abs_pos_embed``) assumes leading prefix tokens; with Vim's
middle class token that interpolates the class slot into the grid (hustvl/Vim issues 108, 112). Here the class
slot at index M//2 is taken out, the patch grid is resampled, and the class slot is re-inserted unchanged at the
new middle.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def split_middle_cls(pos_embed: Tensor) -> tuple[Tensor, Tensor]:
    """(1, M+1, D) -> (class slot (1, 1, D), patch slots (1, M, D)) with the class slot at M//2."""
    m = pos_embed.shape[1] - 1
    c = m // 2
    return pos_embed[:, c : c + 1], torch.cat([pos_embed[:, :c], pos_embed[:, c + 1 :]], dim=1)


def join_middle_cls(cls_slot: Tensor, patches: Tensor) -> Tensor:
    c = patches.shape[1] // 2
    return torch.cat([patches[:, :c], cls_slot, patches[:, c:]], dim=1)


def resize_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
    mode: str = "bicubic", cls_token: bool = True,
) -> Tensor:
    """Resample a middle-class-token pos_embed (1, M+1, D) to ``new_grid`` (1, gh*gw+1, D), or one without a
    class slot (``cls_token=False``: (1, M, D) -> (1, gh*gw, D)).

    ``old_grid`` defaults to the square grid implied by M. The class slot is copied exactly.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got {tuple(pos_embed.shape)}")
    m = pos_embed.shape[1] - int(cls_token)
    if old_grid is None:
        side = int(round(math.sqrt(m)))
        if side * side != m:
            raise ValueError(f"pos_embed has {m} patch slots, not a square grid: pass old_grid explicitly")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != m:
        raise ValueError(f"pos_embed has {m} patch slots but old_grid {old_grid} has {old_grid[0] * old_grid[1]}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls_slot, patches = split_middle_cls(pos_embed) if cls_token else (None, pos_embed)
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return patches if cls_slot is None else join_middle_cls(cls_slot, patches)
