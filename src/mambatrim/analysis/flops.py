"""The one FLOPs counter: analytical, per layer, fed by what actually ran in a forward pass; any backbone.

Every module that defines ``macs_terms(tokens) -> MixerMacs`` (the scan mixers of every family) is a counted
layer: forward hooks record the tokens entering it and which scan paths ran (from the direction gate of its
:class:`~mambatrim.contract.MixerContext`), so pruned, merged and path-skipping models are counted exactly.
Every other ``nn.Linear`` / ``nn.Conv{1,2,3}d`` (patch embeddings, FFNs, downsampling, necks, heads) is counted
from the shapes it ran on, and a module may take over the count of its own subtree with ``macs(args, output)``
(e.g. a patch embedding that runs its conv as a GEMM). The reducer's own modules are counted by its
``flops_overhead``. All counts are multiply-accumulates (MACs) for ONE input, the convention of the papers
(fvcore / DyVM / R-MeeTo), reported as "GFLOPs".

A mixer's terms: ``shared`` (run once whatever paths run: e.g. in_proj + out_proj), ``per_path`` (one scan path
at full rate) and ``paper_scale``: the share of the paths the family's papers count. Vim's mixer, with
L tokens, width d, E = d_inner, N = d_state, R = dt_rank, K = d_conv:

    shared terms          in_proj L*d*2E,  out_proj L*E*d
    per direction         conv (L+K-1)*E*K,  x_proj L*E*(R+2N),  dt_proj L*R*E,  scan 9*L*E*N + 2*L*E

Two conventions:

``paper``  ``shared + per_path * (sum of the paths' run fractions) * paper_scale``. Vim's ``paper_scale`` is 1/2:
           the DyVM / R-MeeTo counter counts one direction (the published 1.45 / 5.08 / 18.87 G for Vim-Ti/S/B).
``full``   every path that ran counted: the work really done.

Elementwise work outside the scan (norms, softplus, SiLU, residual adds) is left out of both (< 1%).
Models built on the meta device are counted without computing anything.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..validation import check_choice

CONVENTIONS = ("paper", "full")
_COUNTED_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerFlops:
    """MACs of one mixer for one input."""

    layer: int
    tokens: int
    directions: tuple[float, ...]  # fraction of samples that ran each scan path
    shared: float  # run once whatever paths run (in_proj + out_proj for Vim)
    per_direction: float  # one path at full rate (conv + x_proj + dt_proj + scan for Vim)
    paper_scale: float = 0.5  # share of the paths the family's papers count

    @property
    def paper(self) -> float:
        return self.shared + self.per_direction * sum(self.directions) * self.paper_scale

    @property
    def full(self) -> float:
        return self.shared + self.per_direction * sum(self.directions)


@dataclass
class FlopsReport:
    """Per-layer table and totals (MACs per input) of one counted forward pass.

    ``modules``: MACs outside the mixers, by the top-level child they ran in (``patch_embed``, ``head``, ...)."""

    img_size: tuple[int, ...]
    params: int
    modules: dict[str, float]
    reducer: float
    layers: list[LayerFlops] = field(default_factory=list)

    def total(self, convention: str = "paper") -> float:
        check_choice(convention, "FLOPs convention", CONVENTIONS)
        body = sum(getattr(layer, convention) for layer in self.layers)
        return sum(self.modules.values()) + self.reducer + body

    @property
    def patch_embed(self) -> float:
        return self.modules.get("patch_embed", 0.0)

    @property
    def head(self) -> float:
        return self.modules.get("head", 0.0)

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
            "modules": dict(self.modules), "reducer": self.reducer,
            "layers": [{**asdict(layer), "paper": layer.paper, "full": layer.full} for layer in self.layers],
        }

    def table(self) -> str:
        """Plain-text per-layer table (MMACs) and totals (G)."""
        rows = [f"{'layer':>5} {'tokens':>6} {'paths ran':>16} {'paper M':>9} {'full M':>9}"]
        for layer in self.layers:
            ran = " ".join(f"{d:.2f}" for d in layer.directions)
            rows.append(f"{layer.layer:>5} {layer.tokens:>6} {ran:>16} {layer.paper / 1e6:>9.2f} "
                        f"{layer.full / 1e6:>9.2f}")
        outside = ", ".join(f"{name} {macs / 1e6:.2f} M" for name, macs in self.modules.items())
        rows.append(f"{outside}, reducer {self.reducer / 1e6:.2f} M")
        rows.append(f"total: paper {self.gflops('paper'):.2f} G, full {self.gflops('full'):.2f} G, "
                    f"params {self.params / 1e6:.2f} M")
        return "\n".join(rows)


def leaf_macs(module: nn.Module, output: torch.Tensor, batch: int) -> float:
    """MACs per input of an ``nn.Linear`` or ``nn.ConvNd`` that produced ``output`` for ``batch`` inputs."""
    if isinstance(module, nn.Linear):
        return output.numel() / batch * module.in_features
    kernel = math.prod(module.kernel_size) * module.in_channels // module.groups
    return output.numel() / batch * kernel


def _executed_paths(ctx: Any, stats: dict[str, Any], num_paths: int) -> tuple[float, ...]:
    """Fraction of the batch that ran each path: all, unless a gate skipped some (``skip_gated``)."""
    gate = stats.get("gate")
    if gate is None and ctx is not None and torch.is_tensor(getattr(ctx, "direction_gate", None)):
        gate = ctx.direction_gate
    if gate is None or ctx is None or not getattr(ctx, "skip_gated", False) or gate.is_meta:
        return (1.0,) * num_paths
    ran = (gate.detach().float() > 0.5).float().mean(0)
    return tuple(float(r) for r in ran)


def _param_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def example_input(model: nn.Module, img_size: int | tuple[int, int] | None, batch: int | None) -> torch.Tensor:
    """Random input of the model's ``input_size`` ((C, H, W) or (C, T, H, W)), with (H, W) from ``img_size``."""
    size = getattr(model, "input_size", None)
    if size is None:
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None:
            raise ValueError(f"an example input needs a model with an input_size (or a patch_embed), got "
                             f"{type(model).__name__}")
        size = (patch_embed.in_chans, patch_embed.img_size, patch_embed.img_size)
    size = list(size)
    if img_size is not None:
        size[-2:] = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return torch.randn(batch or 1, *size, device=_param_device(model))


def count_flops(model: nn.Module, img_size: int | tuple[int, int] | None = None, batch: int | None = None,
                images: torch.Tensor | None = None) -> FlopsReport:
    """Count MACs per input of ``model`` (any registered backbone, any reducer attached) in one eval forward.

    Args:
        img_size: input side (or (H, W)); default the model's configured size.
        batch: random inputs to run (default 1); path fractions are averaged over them.
        images: run these instead of random ones (for input-dependent methods).
    """
    if images is None:
        images = example_input(model, img_size, batch)
    bsz = images.shape[0]
    reducer = getattr(model, "reducer", None)
    records: dict[int, LayerFlops] = {}
    modules: dict[str, float] = {}
    handles = []

    def mixer_hooks(index: int):
        def pre(module: nn.Module, args: tuple) -> None:
            module.last_stats = {}

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            tokens = x.numel() // (x.shape[0] * x.shape[-1])  # (B, L, D), (B, H, W, D), ...
            ctx = args[1] if len(args) > 1 else None
            shared, per_path, scale = module.macs_terms(tokens)
            ran = _executed_paths(ctx, getattr(module, "last_stats", None) or {}, module.num_paths)
            records[index] = LayerFlops(index, tokens, ran, float(shared), float(per_path), float(scale))
        return pre, post

    def leaf_hook(group: str, custom: bool):
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            macs = module.macs(args, output) if custom else leaf_macs(module, out, bsz)
            modules[group] = modules.get(group, 0.0) + float(macs)
        return post

    def visit(module: nn.Module, name: str) -> None:
        if reducer is not None and module is reducer:
            return  # counted by its flops_overhead
        group = name.split(".")[0] if name else type(module).__name__
        if hasattr(module, "macs_terms"):
            pre, post = mixer_hooks(len(handles))
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
            return
        custom = callable(getattr(module, "macs", None))
        if custom or isinstance(module, _COUNTED_LEAVES):
            handles.append(module.register_forward_hook(leaf_hook(group, custom)))
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
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
    for i, layer in enumerate(layers):
        layer.layer = i
    reducer_macs = 0.0
    if reducer is not None:
        dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", 0)
        reducer_macs = float(reducer.flops_overhead([layer.tokens for layer in layers], dim))
    params = sum(p.numel() for p in model.parameters())
    return FlopsReport(img_size=tuple(int(v) for v in images.shape[2:]), params=params, modules=modules,
                       reducer=reducer_macs, layers=layers)
