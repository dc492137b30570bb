"""The one FLOPs counter: analytical, per layer, fed by what actually ran in a forward pass.

Forward hooks on every :class:`~mambatrim.models.mamba.BiMambaMixer` record the number of tokens entering the
layer and which scan directions ran (from the direction gate of its :class:`~mambatrim.reduce.MixerContext`),
so pruned, merged and direction-skipping models are counted exactly. All counts are multiply-accumulates (MACs)
for ONE image, the convention of the papers (fvcore / DyVM / R-MeeTo), reported as "GFLOPs".

Per mixer with L tokens, model width d, E = d_inner, N = d_state, R = dt_rank, K = d_conv:

    shared terms          in_proj L*d*2E,  out_proj L*E*d
    per direction         conv (L+K-1)*E*K,  x_proj L*E*(R+2N),  dt_proj L*R*E,  scan 9*L*E*N + 2*L*E

plus the patch embedding (M*d*C*p*p), the head (d*classes, one token) and the reducer's own
``flops_overhead``. Two conventions:

``paper``  the per-direction terms counted ONCE, scaled by the mean fraction of directions that ran (the
           DyVM / R-MeeTo counter; gives the published 1.45 / 5.08 / 18.87 G for Vim-Ti/S/B at 224).
``full``   every direction that ran counted (both, for a dense Vim): the work really done.

Elementwise work outside the scan (RMSNorm, softplus, SiLU, residual adds) is left out of both (< 1%).
Models built on the meta device are counted without computing anything.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.mamba import BiMambaMixer

CONVENTIONS = ("paper", "full")


@dataclass
class LayerFlops:
    """MACs of one mixer for one image."""

    layer: int
    tokens: int
    directions: tuple[float, float]  # fraction of samples that ran the forward / backward scan
    shared: float  # in_proj + out_proj
    per_direction: float  # conv + x_proj + dt_proj + scan, one direction at full rate

    @property
    def paper(self) -> float:
        return self.shared + self.per_direction * sum(self.directions) / 2

    @property
    def full(self) -> float:
        return self.shared + self.per_direction * sum(self.directions)


@dataclass
class FlopsReport:
    """Per-layer table and totals (MACs per image) of one counted forward pass."""

    img_size: tuple[int, int]
    params: int
    patch_embed: float
    head: float
    reducer: float
    layers: list[LayerFlops] = field(default_factory=list)

    def total(self, convention: str = "paper") -> float:
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown FLOPs convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
        body = sum(getattr(layer, convention) for layer in self.layers)
        return self.patch_embed + self.head + self.reducer + body

    @property
    def paper(self) -> float:
        return self.total("paper")

    @property
    def full(self) -> float:
        return self.total("full")

    def gflops(self, convention: str = "paper") -> float:
        return self.total(convention) / 1e9

    @property
    def tokens_per_layer(self) -> list[int]:
        return [layer.tokens for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "img_size": list(self.img_size), "params": self.params,
            "gflops": {c: round(self.gflops(c), 4) for c in CONVENTIONS},
            "patch_embed": self.patch_embed, "head": self.head, "reducer": self.reducer,
            "layers": [{**asdict(layer), "paper": layer.paper, "full": layer.full} for layer in self.layers],
        }

    def table(self) -> str:
        """Plain-text per-layer table (MMACs) and totals (G)."""
        rows = [f"{'layer':>5} {'tokens':>6} {'fwd':>5} {'bwd':>5} {'paper M':>9} {'full M':>9}"]
        for layer in self.layers:
            rows.append(f"{layer.layer:>5} {layer.tokens:>6} {layer.directions[0]:>5.2f} {layer.directions[1]:>5.2f} "
                        f"{layer.paper / 1e6:>9.2f} {layer.full / 1e6:>9.2f}")
        rows.append(f"patch_embed {self.patch_embed / 1e6:.2f} M, head {self.head / 1e6:.2f} M, "
                    f"reducer {self.reducer / 1e6:.2f} M")
        rows.append(f"total: paper {self.gflops('paper'):.2f} G, full {self.gflops('full'):.2f} G, "
                    f"params {self.params / 1e6:.2f} M")
        return "\n".join(rows)


def mixer_macs(mixer: BiMambaMixer, tokens: int) -> tuple[float, float]:
    """(shared, per_direction) MACs of ``mixer`` on ``tokens`` tokens of one image."""
    L, d, E = tokens, mixer.d_model, mixer.d_inner
    N, R, K = mixer.d_state, mixer.dt_rank, mixer.d_conv
    shared = L * d * 2 * E + L * E * d
    per_direction = (L + K - 1) * E * K + L * E * (R + 2 * N) + L * R * E + 9 * L * E * N + 2 * L * E
    return float(shared), float(per_direction)


def _executed_directions(ctx: Any, stats: dict[str, Any]) -> tuple[float, float]:
    """Fraction of the batch that ran each direction: all, unless a gate skipped some (``skip_gated``)."""
    gate = stats.get("gate")
    if gate is None and ctx is not None and torch.is_tensor(getattr(ctx, "direction_gate", None)):
        gate = ctx.direction_gate
    if gate is None or ctx is None or not getattr(ctx, "skip_gated", False) or gate.is_meta:
        return (1.0, 1.0)
    ran = (gate.detach().float() > 0.5).float().mean(0)
    return (float(ran[0]), float(ran[1]))


def _param_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def count_flops(model: nn.Module, img_size: int | tuple[int, int] | None = None, batch: int | None = None,
                images: torch.Tensor | None = None) -> FlopsReport:
    """Count MACs per image of ``model`` (a VisionMamba, any reducer attached) in one eval forward.

    Args:
        img_size: input side (or (H, W)); default the model's configured size.
        batch: random images to run (default 1); direction fractions are averaged over them.
        images: run these instead of random ones (for input-dependent methods).
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        raise ValueError(f"count_flops expects a Vision Mamba model with a patch_embed, got {type(model).__name__}")
    if images is None:
        size = img_size if img_size is not None else patch_embed.img_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        images = torch.randn(batch or 1, patch_embed.in_chans, height, width, device=_param_device(model))
    height, width = images.shape[-2:]
    grid = patch_embed.grid_for(height, width)  # clear error for sizes that cannot tile

    records: dict[int, LayerFlops] = {}
    mixers = [m for m in model.modules() if isinstance(m, BiMambaMixer)]

    def make_hook(index: int, mixer: BiMambaMixer):
        def pre(module: nn.Module, args: tuple) -> None:
            module.last_stats = {}

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            tokens = int(args[0].shape[1])
            ctx = args[1] if len(args) > 1 else None
            shared, per_direction = mixer_macs(mixer, tokens)
            records[index] = LayerFlops(index, tokens, _executed_directions(ctx, mixer.last_stats or {}),
                                        shared, per_direction)
        return pre, post

    handles = []
    for i, mixer in enumerate(mixers):
        pre, post = make_hook(i, mixer)
        handles += [mixer.register_forward_pre_hook(pre), mixer.register_forward_hook(post)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    layers = [records[i] for i in sorted(records)]
    proj = patch_embed.proj
    patch_macs = grid[0] * grid[1] * proj.out_channels * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    head = getattr(model, "head", None)
    head_macs = head.in_features * head.out_features if isinstance(head, nn.Linear) else 0
    reducer = getattr(model, "reducer", None)
    reducer_macs = 0.0
    if reducer is not None:
        reducer_macs = float(reducer.flops_overhead([layer.tokens for layer in layers], model.embed_dim))
    params = sum(p.numel() for p in model.parameters())
    return FlopsReport(img_size=(int(height), int(width)), params=params, patch_embed=float(patch_macs),
                       head=float(head_macs), reducer=reducer_macs, layers=layers)
