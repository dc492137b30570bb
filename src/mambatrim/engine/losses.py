"""The training objective: classification + distillation from a frozen dense teacher + method terms.

    loss = cls_weight * CE(student, targets)                       (soft-target CE under mixup)
         + distill_weight * T^2 * KL(teacher || student)           (mode 'kl': logits at temperature T)
         + distill_weight * CE(student dist_head, argmax teacher)  (mode 'hard': DeiT's hard distillation)
         + token_distill_weight * MSE(student tokens, teacher tokens at the same original positions)
         + sum(model.reducer.extra_losses(state, teacher_state))  (each method's own terms, already weighted)

One student forward (``forward_tokens``) gives both the logits and the final token state. In 'hard' mode the
student has a second head ``dist_head`` and returns ``(head, dist_head)`` logits in training (both reading the
same feature; their mean at eval), and the teacher is any classifier (a CNN, a Vim, RegNetY-160 as in
GroupMamba's recipe), frozen, seeing the same mixup/cutmix batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import TokenState, token_mse
from ..validation import check_choice


class StudentForward(nn.Module):
    """``forward(x) -> (logits, final token state)`` in one pass; this wrapper is what DDP wraps (DDP must see
    forward) and what a CUDA graph captures. The frozen teacher is run through it too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, TokenState]:
        state = self.model.forward_tokens(x)
        return self.model.forward_head(self.model.pool(state)), state


DISTILL_MODES = ("kl", "hard")


class LogitsForward(nn.Module):
    """``forward(x) -> (logits, None)``: a teacher of any architecture (hard distillation reads only logits).
    ``input_size``: the teacher sees the batch resized to this side (antialiased), e.g. a 32-px CIFAR teacher
    of a student trained on upsampled images."""

    def __init__(self, model: nn.Module, input_size: int | None = None) -> None:
        super().__init__()
        self.model, self.input_size = model, input_size

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size,) * 2:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return self.model(x), None


def check_teacher(student: nn.Module, teacher: nn.Module, token_distill: bool, mode: str = "kl") -> None:
    """Refuse a teacher the losses cannot be computed against, naming the difference."""
    check_choice(mode, "distillation mode", DISTILL_MODES)
    if mode == "hard":
        check_hard_student(student)
        if token_distill:
            raise ValueError("token distillation needs distill_mode='kl' (a hard-distillation teacher gives logits)")
    elif type(teacher) is not type(student):
        raise ValueError(f"teacher is a {type(teacher).__name__}, the student a {type(student).__name__}: "
                         f"distillation needs the same architecture family")
    s_classes, t_classes = getattr(student, "num_classes", None), getattr(teacher, "num_classes", None)
    if s_classes != t_classes:
        raise ValueError(f"teacher predicts {t_classes} classes, the student {s_classes}: their logits cannot be "
                         f"compared")
    if getattr(teacher, "reducer", None) is not None:
        raise ValueError("the teacher must be dense (no reduction method attached)")
    if mode == "hard":
        return
    s_grid, t_grid = student.patch_embed.grid_size, teacher.patch_embed.grid_size
    if s_grid != t_grid:
        raise ValueError(f"teacher token grid {t_grid} differs from the student's {s_grid}: token positions "
                         f"would not correspond")
    if token_distill and student.embed_dim != teacher.embed_dim:
        raise ValueError(f"token distillation needs equal widths: teacher {teacher.embed_dim}, "
                         f"student {student.embed_dim}")


def check_hard_student(student: nn.Module) -> None:
    """Hard distillation trains the student's second head: refuse a student without one."""
    if not isinstance(getattr(student, "dist_head", None), nn.Module):
        raise ValueError(f"distill_mode='hard' trains a second head 'dist_head', which the "
                         f"{type(student).__name__} student does not have (GroupMamba has one; use distill_mode="
                         f"'kl' otherwise)")


def split_heads(logits: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(head logits, dist_head logits or None) of a student's training output."""
    if isinstance(logits, (tuple, list)):
        return logits[0], logits[1]
    return logits, None


def hard_distillation(dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """CE of the distillation head against the teacher's argmax (DeiT's hard distillation), mean over the batch."""
    return F.cross_entropy(dist_logits.float(), teacher_logits.argmax(-1))


def kl_teacher_student(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) at temperature T, scaled by T^2, mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


@dataclass
class LossWeights:
    cls: float = 1.0
    distill: float = 0.5
    temperature: float = 1.0
    token: float = 0.0
    mode: str = "kl"  # 'kl' | 'hard'
    teacher_input_size: int | None = None  # 'hard': the side the teacher sees the batch at (None: as is)


MAX_TEACHER_GRAPHS = 4  # input shapes captured (the full batch, a short last one, ...); others run eagerly


class TrainingLoss:
    """Callable giving (total loss, {term: value}) from the student's outputs.

    ``cuda_graph=True``: on a GPU the frozen teacher's forward is captured once per input shape and replayed
    (an eager Vim forward is bound by kernel launches, and the teacher runs every step). Its outputs are then
    the graph's buffers, valid until the next step's teacher call, which is all the losses need.
    """

    def __init__(self, criterion: nn.Module, weights: LossWeights, teacher: nn.Module | None,
                 cuda_graph: bool = False, autocast_dtype: torch.dtype | None = None) -> None:
        self.criterion, self.weights, self.teacher = criterion, weights, teacher
        self.teacher_forward: nn.Module | None = None  # the student's two outputs, from any teacher
        if teacher is not None:
            self.teacher_forward = StudentForward(teacher) if weights.mode == "kl" else \
                LogitsForward(teacher, weights.teacher_input_size)
        self.cuda_graph, self.autocast_dtype = cuda_graph, autocast_dtype
        self._graphs: dict[tuple, object] = {}

    def teacher_outputs(self, images: Tensor) -> tuple[Tensor, TokenState] | None:
        if self.teacher_forward is None:
            return None
        if self.cuda_graph and images.is_cuda:
            key = (tuple(images.shape), images.dtype)
            graphed = self._graphs.get(key)
            if graphed is None and len(self._graphs) < MAX_TEACHER_GRAPHS:
                from .cuda_graph import GraphedForward

                graphed = self._graphs[key] = GraphedForward(self.teacher_forward, images, self.autocast_dtype)
            if graphed is not None:
                return graphed(images)
        with torch.no_grad():
            return self.teacher_forward(images)

    def __call__(self, model: nn.Module, images: Tensor, logits: Tensor | tuple[Tensor, Tensor],
                 state: TokenState, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.weights
        logits, dist_logits = split_heads(logits)
        if dist_logits is not None and (w.mode != "hard" or self.teacher is None):
            raise ValueError("the student returns two heads (head, dist_head): train it with a teacher and "
                             "distill_mode='hard', or build it without its distillation head (distillation=False)")
        cls_loss = self.criterion(logits.float(), targets)
        total = w.cls * cls_loss
        terms = {"cls": cls_loss.detach()}
        teacher = self.teacher_outputs(images)
        teacher_state = None
        if teacher is not None:
            teacher_logits, teacher_state = teacher
            if w.mode == "hard":
                hard = hard_distillation(dist_logits, teacher_logits)
                total = total + w.distill * hard
                terms["hard"] = hard.detach()
            elif w.distill > 0:
                kl = kl_teacher_student(logits, teacher_logits, w.temperature)
                total = total + w.distill * kl
                terms["kl"] = kl.detach()
            if w.token > 0:
                mse = token_mse(state, teacher_state)
                total = total + w.token * mse
                terms["token_mse"] = mse.detach()
        reducer = getattr(model, "reducer", None)
        if reducer is not None:
            for name, value in reducer.extra_losses(state, teacher_state).items():
                total = total + value
                terms[name] = value.detach()
        return total, terms
