"""Hard distillation ('hard' mode): 0.5 soft-target CE of the head + 0.5 CE of dist_head against the teacher's
argmax, any teacher architecture, a student with a second head; refused combinations; a short training run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
from timm.loss import SoftTargetCrossEntropy
import torch
import torch.nn.functional as F
from torch import nn

from mambatrim.engine.checkpointing import atomic_save
from mambatrim.engine.config import make_config
from mambatrim.engine.losses import LossWeights, StudentForward, TrainingLoss, check_teacher
from mambatrim.engine.train import train
from mambatrim.models import create_model

GM = dict(stem_hidden_dim=8, embed_dims=[16, 16, 32, 32], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1])


class TinyCNN(nn.Module):
    """A teacher of another architecture: only its logits matter."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.num_classes = classes
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_hard_loss_is_deit_hard_distillation():
    torch.manual_seed(0)
    student = create_model("groupmamba_tiny", num_classes=5, **GM).train()
    teacher = TinyCNN().eval()
    check_teacher(student, teacher, token_distill=False, mode="hard")
    soft_ce = SoftTargetCrossEntropy()
    loss_fn = TrainingLoss(soft_ce, LossWeights(cls=0.5, distill=0.5, mode="hard"), teacher)
    images = torch.randn(4, 3, 32, 32)
    targets = torch.softmax(torch.randn(4, 5), -1)  # mixed (soft) targets
    logits, state = StudentForward(student)(images)
    head, dist = logits
    total, terms = loss_fn(student, images, logits, state, targets)
    with torch.no_grad():
        hard_labels = teacher(images).argmax(-1)
    expected = 0.5 * (-(targets * F.log_softmax(head, -1)).sum(-1).mean()) + 0.5 * F.cross_entropy(dist, hard_labels)
    assert torch.allclose(total, expected, atol=1e-6)
    assert set(terms) == {"cls", "hard"}
    total.backward()
    assert student.head.weight.grad.abs().sum() > 0 and student.dist_head.weight.grad.abs().sum() > 0


def test_refused_combinations():
    plain = create_model("groupmamba_tiny", num_classes=5, distillation=False, **GM)
    with pytest.raises(ValueError, match="second head 'dist_head'"):
        check_teacher(plain, TinyCNN(), token_distill=False, mode="hard")
    two_heads = create_model("groupmamba_tiny", num_classes=5, **GM)
    with pytest.raises(ValueError, match="token distillation needs distill_mode='kl'"):
        check_teacher(two_heads, TinyCNN(), token_distill=True, mode="hard")
    with pytest.raises(ValueError, match="unknown distillation mode 'soft'"):
        check_teacher(two_heads, TinyCNN(), token_distill=False, mode="soft")
    loss_fn = TrainingLoss(nn.CrossEntropyLoss(), LossWeights(), None)
    images = torch.randn(2, 3, 32, 32)
    logits, state = StudentForward(two_heads.train())(images)
    with pytest.raises(ValueError, match="two heads"):
        loss_fn(two_heads, images, logits, state, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="distill_mode must be one of kl, hard"):
        make_config({"distill_mode": "soft"})


def test_training_run_with_a_cnn_teacher(tmp_path: Path):
    """Two optimizer steps of GroupMamba on 8x8 digits with a timm ResNet teacher in hard mode."""
    teacher = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    atomic_save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    cfg = make_config(dict(
        model="groupmamba_tiny", model_kwargs=dict(GM, in_chans=1), data_path="digits", input_size=8,
        in_chans=1, batch_size=64, epochs=1, stop_after_steps=2, lr=1e-3, unscale_lr=True, warmup_epochs=0,
        num_workers=0, progress=False, device="cpu", mean=(0.5,), std=(0.5,), mixup=0.8, cutmix=1.0,
        teacher=str(tmp_path / "teacher.pth"), teacher_model="resnet10t", distill_mode="hard",
        cls_weight=0.5, distill_weight=0.5, output_dir=str(tmp_path / "run")))
    result = train(cfg)
    assert result["global_step"] == 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logged if "hard" in entry]
    assert steps and all(math.isfinite(entry["hard"]) and math.isfinite(entry["cls"]) for entry in steps)
