"""DyVM block-selector policies for speed measurements of untrained (random-weight) DyVM models.

Random selectors decide nothing realistic, so a speed run sets them to a policy that fixes how much scan work is
skipped: a *static* one (the same (layer, direction) pairs off for every image), a *per-image* one (random
selector weights, biases calibrated so each direction runs for a given share of the images, as trained
selectors differ per image), or per-layer shares read from a trained model's result (``dyvm_cifar10.py``'s
``dyvm.direction_rates``). Used by the comparison harness (``selectors:`` of a DyVM configuration).
"""
from __future__ import annotations

import json
from typing import Any

import torch

from ..contract import gate_feature
from ..ops import policy
from .precision import autocast_to


def set_static_block_policy(model: torch.nn.Module, block_ratio: float) -> list[tuple[int, int]]:
    """Selectors that switch off the same (layer, direction) pairs for every image; returns the pairs."""
    selectors = model.reducer.selectors
    depth = len(selectors)
    n_off = round((1.0 - block_ratio) * 2 * depth)
    layers = [round(1 + i * (depth - 2) / max(1, n_off - 1)) for i in range(n_off)] if n_off else []
    off = [(layer, i % 2) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for sel in selectors:
            sel.weight.zero_()
            sel.bias.fill_(5.0)
        for layer, direction in off:
            selectors[layer].bias[direction] = -5.0
    return off


@torch.no_grad()
def set_per_image_block_policy(model: torch.nn.Module, images: torch.Tensor,
                               shares: float | list[tuple[float, float]], rounds: int = 3,
                               amp_dtype: torch.dtype | None = None) -> None:
    """Random selector weights; each bias set so that a direction runs for its share of ``images``: one
    ``block_ratio`` for every (layer, direction), or one (forward, backward) pair per layer, e.g. what a
    trained model's selectors chose (recalibrated ``rounds`` times, since upstream skipping shifts downstream
    inputs). Layer 0 runs both directions for every image with a single share: its class-token row does not
    depend on the image. The calibration forwards run under ``amp_dtype`` autocast (None: fp32), the precision
    the model is then timed in: the decisions depend on it."""
    # a selector's input is its layer's gate feature of the in_proj output (the class-token row, the registers'
    # mean, ...): the mixer's context gives the protected tokens, the in_proj output the rows (at inference the
    # selectors' weights go to the mixer, not a call)
    ctx_at: dict[int, Any] = {}
    inputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.mixer.register_forward_pre_hook(lambda mod, args, i=i: ctx_at.__setitem__(i, args[1])))
        hooks.append(layer.mixer.in_proj.register_forward_hook(
            lambda mod, inp, out, i=i: inputs.__setitem__(
                i, gate_feature(out, ctx_at[i].protected, ctx_at[i].token_mask).float())))
    selectors = model.reducer.selectors
    if isinstance(shares, (int, float)):
        shares = [(float(shares), float(shares))] * len(selectors)
    if len(shares) != len(selectors):
        raise ValueError(f"{len(shares)} per-layer direction shares for a model of {len(selectors)} layers")
    gen = torch.Generator(device="cpu").manual_seed(1)
    for sel in selectors:
        sel.weight.copy_(torch.randn(sel.weight.shape, generator=gen) / sel.weight.shape[1] ** 0.5)
        sel.bias.fill_(5.0)
    for _ in range(rounds):
        # the per-path PyTorch executor calls in_proj as a module (the fused one uses cached weight casts), so
        # the hooks above see its output
        with policy.override(fused_mixer=False), autocast_to(images.device, amp_dtype):
            model(images)
        for i, sel in enumerate(selectors):
            proj = inputs[i] @ sel.weight.float().t()
            share = torch.tensor(shares[i], dtype=proj.dtype, device=proj.device).clamp(0.0, 1.0)
            # ties at the threshold run (e.g. layer 0, whose class-token row is the same for every image: a
            # strict threshold at a quantile of equal values would switch that layer off for all of them)
            q = torch.stack([torch.quantile(proj[:, j], 1.0 - share[j]) for j in range(proj.shape[1])])
            bias = -q + 1e-4 * q.abs().clamp_min(1e-3)
            # a share of 0 or 1: every image the same way, with a margin
            bias = torch.where(share >= 1.0, torch.full_like(bias, 5.0) - proj.min(0).values, bias)
            bias = torch.where(share <= 0.0, torch.full_like(bias, -5.0) - proj.max(0).values, bias)
            sel.bias.copy_(bias)
    for h in hooks:
        h.remove()


def load_direction_shares(path: str, depth: int) -> dict[str, Any]:
    """Per-layer (forward, backward) shares of images running each scan, read from a ``dyvm_cifar10.py`` result
    or a plain ``{layer: [forward, backward]}`` map, stretched to ``depth`` layers."""
    with open(path) as f:
        data = json.load(f)
    rates = data.get("dyvm", {}).get("direction_rates") if isinstance(data.get("dyvm"), dict) else data
    if not isinstance(rates, dict) or not rates:
        raise ValueError(f"{path}: no per-layer direction shares (a dyvm_cifar10.py result's dyvm.direction_rates "
                         "or a {layer: [forward, backward]} map)")
    try:
        src = [tuple(float(x) for x in rates[k]) for k in sorted(rates, key=int)]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: direction shares must map layer numbers to [forward, backward]: {err}") from None
    if any(len(pair) != 2 or not all(0.0 <= x <= 1.0 for x in pair) for pair in src):
        raise ValueError(f"{path}: every layer needs two shares in [0, 1]")
    shares = [src[i * len(src) // depth] for i in range(depth)]
    return {"source": path, "source_depth": len(src), "shares": shares}


SELECTOR_POLICIES = ("static", "per_image", "a direction-shares JSON file")


def set_selector_policy(model: torch.nn.Module, spec: str, block_ratio: float | None, images: torch.Tensor,
                        amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Set a deployed DyVM model's selectors to policy ``spec`` ('static' or 'per_image' at ``block_ratio``, or
    a path to per-layer shares); returns what was set (the pairs switched off, or the shares' source)."""
    if spec in ("static", "per_image") and block_ratio is None:
        raise ValueError(f"selectors: {spec!r} needs DyVM's block_ratio option (block selection on)")
    if spec == "static":
        return {"selectors": spec, "directions_off": set_static_block_policy(model, block_ratio)}
    if spec == "per_image":
        set_per_image_block_policy(model, images, block_ratio, amp_dtype=amp_dtype)
        return {"selectors": spec}
    if not spec.endswith(".json"):
        raise ValueError(f"unknown selector policy {spec!r}; choose one of {', '.join(SELECTOR_POLICIES)}")
    profile = load_direction_shares(spec, len(model.reducer.selectors))
    set_per_image_block_policy(model, images, profile["shares"], amp_dtype=amp_dtype)
    return {"selectors": "trained shares", "direction_shares": profile}
