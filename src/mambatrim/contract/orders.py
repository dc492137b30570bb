"""Scan orders as data: how each scan path of a mixer visits the tokens.

Two kinds:

* **sequence orders** (:data:`SEQUENCE`, :data:`REVERSED`): the current token sequence, forwards or backwards
  (Vim, MambaReg, VideoMamba, whose space-time order is the sequence itself). Kernels read the reversed one in
  place, through a negative step, without a copy. After pruning or merging, the path walks the surviving
  sequence, whatever order a method left it in (DyVM's rearrangement, a re-inserted class token).
* **grid orders** (:func:`grid_order`, :func:`zigzag_orders`): a permutation of the dense token grid given as
  the step at which each raster token is visited (PlainMamba's zig-zags, GroupMamba's per-group directions).
  After pruning, the path visits the surviving tokens in that order; the pruned tokens between two visited ones
  are that order's gaps.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["ScanOrder", "SEQUENCE", "REVERSED", "grid_order", "zigzag_orders", "raster_orders"]

RankFn = Callable[[tuple[int, ...]], Tensor]


@dataclass(frozen=True)
class ScanOrder:
    """One scan path's visiting order. ``rank`` is ``None`` for sequence orders; for grid orders it maps a grid
    (e.g. (H, W)) to a (M,) long tensor, the visiting step of each raster-index token."""

    name: str
    reverse: bool = False
    rank: RankFn | None = None

    @property
    def is_sequence(self) -> bool:
        return self.rank is None

    def token_ranks(self, positions: Tensor, grid: tuple[int, ...] | None) -> Tensor:
        """(B, L) visiting step of each current token (its dense position along this order)."""
        return _rank_table(self._rank_fn(), self._grid(grid), positions.device)[positions]

    def dense_index(self, grid: tuple[int, ...] | None, device: torch.device) -> Tensor:
        """(M,) raster indices in visiting order of the whole grid (no token pruned), computed once per grid."""
        return _dense_index(self._rank_fn(), self._grid(grid), device)

    def _rank_fn(self) -> RankFn:
        if self.rank is None:
            raise ValueError(f"scan order {self.name!r} is a sequence order: it has no ranks")
        return self.rank

    def _grid(self, grid: tuple[int, ...] | None) -> tuple[int, ...]:
        if grid is None:
            raise ValueError(f"scan order {self.name!r} walks a token grid, but the mixer context has none "
                             "(the backbone must set MixerContext.grid)")
        return tuple(grid)

    def visit(self, positions: Tensor, grid: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
        """(index, ranks): ``index`` (B, L) the sequence indices in visiting order; ``ranks`` (B, L) their dense
        steps along this order, ascending (what gaps and the aligned conv read)."""
        ranks, index = torch.sort(self.token_ranks(positions, grid), dim=1)
        return index, ranks


@functools.lru_cache(maxsize=256)
def _rank_table(rank: RankFn, grid: tuple[int, ...], device: torch.device) -> Tensor:
    """A grid order's rank table on ``device``, built and copied once (no host-device copy per layer call)."""
    return rank(grid).to(device)


@functools.lru_cache(maxsize=256)
def _dense_index(rank: RankFn, grid: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.argsort(_rank_table(rank, grid, device))


SEQUENCE = ScanOrder("forward")
REVERSED = ScanOrder("reverse", reverse=True)


def grid_order(name: str, visits: Callable[[tuple[int, ...]], Iterable[int]]) -> ScanOrder:
    """A grid order from a function listing the raster indices of a grid in visiting order."""

    @functools.lru_cache(maxsize=32)
    def rank(grid: tuple[int, ...]) -> Tensor:
        sequence = torch.tensor(list(visits(grid)), dtype=torch.long)
        size = 1
        for side in grid:
            size *= side
        if sequence.numel() != size or not torch.equal(torch.sort(sequence).values, torch.arange(size)):
            raise ValueError(f"scan order {name!r} does not visit each of the {size} tokens of grid {grid} once")
        table = torch.empty(size, dtype=torch.long)
        table[sequence] = torch.arange(size)
        return table

    return ScanOrder(name, rank=rank)


def _reverse(order: ScanOrder) -> ScanOrder:
    assert order.rank is not None
    forward = order.rank

    def rank(grid: tuple[int, ...]) -> Tensor:
        table = forward(grid)
        return table.numel() - 1 - table

    return ScanOrder(f"reverse({order.name})", rank=rank)


def _row_snake(grid: tuple[int, ...]) -> Iterable[int]:
    height, width = grid
    for h in range(height):
        for w in (range(width) if h % 2 == 0 else range(width - 1, -1, -1)):
            yield h * width + w


def _column_snake(grid: tuple[int, ...]) -> Iterable[int]:
    height, width = grid
    for w in range(width):
        for h in (range(height) if w % 2 == 0 else range(height - 1, -1, -1)):
            yield h * width + w


def _rows(grid: tuple[int, ...]) -> Iterable[int]:
    height, width = grid
    return range(height * width)


def _columns(grid: tuple[int, ...]) -> Iterable[int]:
    height, width = grid
    return (h * width + w for w in range(width) for h in range(height))


@functools.cache  # one set of order objects: their rank tables are cached per grid and device
def zigzag_orders() -> tuple[ScanOrder, ...]:
    """PlainMamba's four orders of an (H, W) grid: a snake along rows from (0, 0), its reverse, a snake along
    columns from (0, 0), its reverse."""
    rows, columns = grid_order("row_snake", _row_snake), grid_order("column_snake", _column_snake)
    return rows, _reverse(rows), columns, _reverse(columns)


@functools.cache  # one set of order objects: their rank tables are cached per grid and device
def raster_orders() -> tuple[ScanOrder, ...]:
    """Row-major, column-major and their reverses (GroupMamba's four group directions)."""
    rows, columns = grid_order("rows", _rows), grid_order("columns", _columns)
    return rows, columns, _reverse(rows), _reverse(columns)
