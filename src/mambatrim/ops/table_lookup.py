"""Rows of a small parameter table picked by many labels, with a backward that scales.

``table[labels]`` is a gather; its PyTorch backward (advanced indexing) sorts the labels, then one thread per
feature adds up every duplicate of a label in sequence. PlainMamba picks its direction terms (5 rows) for every
scan step of every order and image: at batch 256 on a 16x16 grid that is about 65,000 duplicates per label and
layer, added one after another. :func:`lookup_rows` gathers the same way and sums each row's gradient as one
product of the one-hot labels with the incoming gradient, all positions in parallel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import policy

__all__ = ["lookup_rows"]


class _LookupRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(labels)
        ctx.rows = table.shape[0]
        return table[labels]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (labels,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1]).float()
        with torch.autocast(grad.device.type, enabled=False):
            one_hot = F.one_hot(labels.reshape(-1), ctx.rows).float()
            return one_hot.t() @ flat, None


def lookup_rows(table: Tensor, labels: Tensor) -> Tensor:
    """``table[labels]``: (R, N) rows picked by integer ``labels`` of any shape -> (*labels.shape, N), the same
    values. The table's gradient is each row's summed gradient, computed as one matrix product (setting
    ``table_lookup_grad``: 'onehot', the default, or 'index' for PyTorch's indexing backward)."""
    if table.dim() != 2:
        raise ValueError(f"lookup_rows: table must be 2-D (rows, features), got shape {tuple(table.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"lookup_rows: labels must be integers, got {labels.dtype}")
    if not table.requires_grad or policy.get("table_lookup_grad") == "index" or not torch.is_grad_enabled():
        return table[labels]
    return _LookupRows.apply(table, labels.long())
