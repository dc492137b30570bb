"""Segmentation metrics from an accumulated confusion matrix: mIoU, per-class IoU, pixel accuracy.

The matrix is summed over batches and, under DDP, over processes (one all-reduce at the end), so the result is
the dataset's, not an average of per-batch or per-process scores. Classes absent from both prediction and
label (union 0) are left out of the mean, as mmseg's ``nanmean``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..data.segmentation import IGNORE_INDEX


class ConfusionMatrix:
    """(num_classes, num_classes) counts, rows = label, columns = prediction; ignored pixels skipped."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add a batch: ``pred`` (B, H, W) class ids or (B, C, H, W) logits, ``label`` (B, H, W)."""
        if pred.dim() == label.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} shapes differ")
        valid = label != self.ignore_index
        bad = label[valid][(label[valid] < 0) | (label[valid] >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"label value {int(bad[0])} is outside 0..{self.num_classes - 1} and is not the "
                             f"ignore index {self.ignore_index}")
        index = label[valid].long() * self.num_classes + pred[valid].long().to(label.device)
        counts = torch.bincount(index, minlength=self.num_classes ** 2)
        self.matrix += counts.view(self.num_classes, self.num_classes).to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over DDP processes (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, Any]:
        """``mIoU``, ``aAcc`` (pixel accuracy), ``mAcc`` and per-class ``IoU`` / ``Acc`` (None where undefined)."""
        m = self.matrix.double()
        inter, label_area, pred_area = m.diag(), m.sum(1), m.sum(0)
        union = label_area + pred_area - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.nan)
        acc = torch.where(label_area > 0, inter / label_area.clamp(min=1), torch.nan)
        total = m.sum()
        return {
            "mIoU": float(iou.nanmean()) if bool((union > 0).any()) else float("nan"),
            "aAcc": float(inter.sum() / total) if total > 0 else float("nan"),
            "mAcc": float(acc.nanmean()) if bool((label_area > 0).any()) else float("nan"),
            "IoU": [None if v != v else float(v) for v in iou.tolist()],
            "Acc": [None if v != v else float(v) for v in acc.tolist()],
        }
