"""AdamW with weight-decay groups, the timm cosine schedule with warm-up, and linear lr scaling."""
from __future__ import annotations

from typing import Iterable

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

# What each ``no_weight_decay`` entry exempts. The default ['1d', 'bias', 'model'] is timm 0.4's
# add_weight_decay used by the official Vim code: D/D_b, norms and biases are exempt through ndim <= 1,
# pos_embed/cls_token through model.no_weight_decay(); A_log/A_b_log (2-D) ARE decayed.
_RULES = {
    "1d": lambda name, p, model_skip: p.ndim <= 1,
    "bias": lambda name, p, model_skip: name.endswith(".bias"),
    "norm": lambda name, p, model_skip: "norm" in name.rsplit(".", 1)[0].split(".")[-1],
    "pos_embed": lambda name, p, model_skip: name.split(".")[-1] == "pos_embed",
    "cls_token": lambda name, p, model_skip: name.split(".")[-1] == "cls_token",
    "A_log": lambda name, p, model_skip: name.split(".")[-1] in ("A_log", "A_b_log"),
    "D": lambda name, p, model_skip: name.split(".")[-1] in ("D", "D_b"),
    "model": lambda name, p, model_skip: name in model_skip,
}


def param_groups(model: nn.Module, weight_decay: float, no_decay: Iterable[str]) -> list[dict]:
    """Two AdamW groups: decayed and exempt parameters (frozen ones left out)."""
    rules = [_RULES[k] for k in no_decay]
    skip_fn = getattr(model, "no_weight_decay", None)
    model_skip = set(skip_fn()) if callable(skip_fn) else set()
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (exempt if any(rule(name, param, model_skip) for rule in rules) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


def exempt_names(model: nn.Module, no_decay: Iterable[str]) -> list[str]:
    """Names of the parameters the rules exempt (for logs and tests)."""
    exempt = {id(p) for g in param_groups(model, 1.0, no_decay) if g["weight_decay"] == 0 for p in g["params"]}
    return [n for n, p in model.named_parameters() if id(p) in exempt]


def scaled_lr(lr: float, global_batch: int, unscale: bool) -> float:
    """Official Vim/DeiT rule: lr * global_batch / 512 (``unscale``: lr as given)."""
    return lr if unscale else lr * global_batch / 512.0


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, no_decay: Iterable[str],
                    eps: float = 1e-8, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay, no_decay), lr=lr, eps=eps, betas=betas)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float,
                    warmup_lr: float) -> CosineLRScheduler:
    """Cosine decay to ``min_lr`` over ``total_steps`` optimizer steps after a linear warm-up from
    ``warmup_lr``; updated every step (``step_update``)."""
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps), lr_min=min_lr, warmup_t=warmup_steps,
                             warmup_lr_init=warmup_lr, t_in_epochs=False)
