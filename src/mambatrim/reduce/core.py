"""Helpers shared by the reduction methods (the contract itself lives in :mod:`mambatrim.contract`)."""
from __future__ import annotations

from torch import Tensor

from ..contract import batch_arange


def others_index(cls_index: Tensor, length: int) -> Tensor:
    """(B, L-1) indices of every token except each sample's class token, in sequence order."""
    ar = batch_arange(cls_index.shape[0], length - 1, cls_index.device)
    return ar + (ar >= cls_index[:, None]).long()
