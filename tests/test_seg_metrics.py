"""Segmentation metrics against a hand computation; accumulation over batches and processes."""
from __future__ import annotations

import math

import pytest
import torch

from mambatrim.engine.seg_metrics import ConfusionMatrix

IGN = 255


def test_hand_computed_iou_and_accuracy() -> None:
    # 3 classes; label / prediction pairs written out pixel by pixel (255 = ignored, not counted)
    label = torch.tensor([[0, 0, 1, 1], [2, 2, IGN, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    meter = ConfusionMatrix(3)
    meter.update(pred[None], label[None])
    out = meter.compute()
    # class 0: inter 1 (pixel 0), label area 2, pred area 3 (pixels 0, 5, 7) -> IoU 1/4
    # class 1: inter 2, label area 3, pred area 3 (pixels 1, 2, 3) -> IoU 2/4
    # class 2: inter 1, label area 2, pred area 1 (the ignored pixel's 2 is not counted) -> IoU 1/2
    assert out["IoU"] == pytest.approx([1 / 4, 1 / 2, 1 / 2])
    assert out["mIoU"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2) / 3)
    assert out["aAcc"] == pytest.approx(4 / 7)
    assert out["Acc"] == pytest.approx([1 / 2, 2 / 3, 1 / 2])


def test_absent_class_left_out_of_mean() -> None:
    meter = ConfusionMatrix(3)
    meter.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    out = meter.compute()
    assert out["IoU"][2] is None and out["mIoU"] == 1.0


def test_accumulation_equals_one_pass_and_logits_accepted() -> None:
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (6, 8, 8), generator=gen)
    label[0, :2] = IGN
    logits = torch.randn(6, 5, 8, 8, generator=gen)
    whole = ConfusionMatrix(5)
    whole.update(logits, label)
    parts = [ConfusionMatrix(5) for _ in range(3)]  # three "processes", two batches each
    for i, meter in enumerate(parts):
        meter.update(logits[2 * i:2 * i + 1], label[2 * i:2 * i + 1])
        meter.update(logits[2 * i + 1:2 * i + 2], label[2 * i + 1:2 * i + 2])
    summed = ConfusionMatrix(5)
    summed.matrix = sum(m.matrix for m in parts)  # what all_reduce computes
    assert torch.equal(summed.matrix, whole.matrix)
    # not the mean of per-part scores
    per_part = sum(m.compute()["mIoU"] for m in parts) / 3
    assert not math.isclose(per_part, whole.compute()["mIoU"], rel_tol=1e-9)


def test_bad_label_is_one_line_error() -> None:
    with pytest.raises(ValueError, match="outside 0..2"):
        ConfusionMatrix(3).update(torch.tensor([[0, 7]]), torch.tensor([[0, 7]]))
