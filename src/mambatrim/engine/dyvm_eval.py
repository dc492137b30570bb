"""Evaluating a DyVM model on a data set: top-1, how per-image its block selectors decide, and how far its
token predictor strays from the coverage prior's grid. Used by ``benchmarks/dyvm_cifar10.py``."""
from __future__ import annotations

from typing import Any

import torch

from ..reduce import dyvm
from .precision import autocast


@torch.no_grad()
def measure(model: torch.nn.Module, loader: Any, device: torch.device, amp: bool) -> dict[str, Any]:
    """Top-1, the executed-direction fraction (over layers, directions and images) and, per layer, the share of
    images that ran the forward / backward scan on ``loader``: how per-image the selectors' decisions are."""
    model.eval()
    correct = count = 0
    per_layer: dict[int, torch.Tensor] = {}
    for images, targets in loader:
        with autocast(device, "bf16" if amp and device.type == "cuda" else "fp32"):
            logits = model(images)
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.shape[0]
        for i, layer in enumerate(model.layers):
            gate = layer.mixer.last_stats.get("gate")
            if gate is not None:
                on = gate.reshape(gate.shape[0], -1).float().sum(0).cpu()
                per_layer[i] = per_layer.get(i, 0) + on
    rates = {i: (v / count).tolist() for i, v in sorted(per_layer.items())}
    flat = [r for pair in rates.values() for r in pair]
    return {"top1": 100.0 * correct / count, "block_ratio": sum(flat) / len(flat) if flat else 1.0,
            "num_images": count, "direction_rates": rates}


def inference_keep(log_probs: torch.Tensor, policy: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) 0/1: the ``k`` alive tokens with the best keep log-probability, the deployed top-k's decision in
    the form a ``keep_override`` returns it."""
    score = log_probs[..., 0].float().masked_fill(policy == 0, float("-inf"))
    return torch.zeros_like(policy).scatter(1, score.topk(k, dim=1).indices, 1.0)


@torch.no_grad()
def grid_agreement(model: torch.nn.Module, loader: Any, device: torch.device, amp: bool) -> dict[str, Any] | None:
    """How far a DyVM model with the coverage prior strays from the prior's evenly spread grid: per pruning
    stage, the share of kept patch tokens that lie on the grid (1.0: the learned predictor changed nothing and
    the kept set is static pruning's). The decisions are the inference top-k, taken through ``keep_override``
    (same scores, same k), so this pass also reports its own top-1, which must equal the deployed model's."""
    reducer = getattr(model, "reducer", None)
    if not isinstance(reducer, dyvm.DyVMReducer) or reducer.coverage_prior == 0:
        return None
    ratios, num_patches = reducer.token_ratios, model.patch_embed.num_patches
    on_grid, kept = [0.0] * len(ratios), [0.0] * len(ratios)

    def top_k(stage: int, log_probs: torch.Tensor, policy: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        keep = inference_keep(log_probs, policy, int(ratios[stage] * num_patches))
        grid = reducer.stage_grid(stage, policy)
        on_grid[stage] += float((keep * grid).sum())
        kept[stage] += float(keep.sum())
        return keep

    reducer.keep_override = top_k
    try:
        top1 = measure(model, loader, device, amp)["top1"]
    finally:
        reducer.keep_override = None
    return {"on_grid_share": [round(g / max(n, 1.0), 4) for g, n in zip(on_grid, kept)], "top1": round(top1, 2)}
