"""ToP: token pruning for Vision Mamba with SSM-aware importance and pruning-aware hidden-state alignment.

After chosen blocks (default: after blocks 5, 10 and 15 of 24) each image keeps ``ceil((L-1) * keep)`` patch
tokens (rounded to an even count, so the class token sits exactly in the middle again), scored by the previous
mixer's SSM output: ``S_m = sum_d max(0, y_{m,d})`` with ``y`` the gated output of both scan directions in
original token order (the input of ``out_proj``). Survivors keep their original order; the protected tokens
(class token, registers) are never pruned and are re-inserted where the backbone's layout puts them
(``cls_placement='middle'``: Vim's class token at the middle, as the released code does; VideoMamba's first,
MambaReg's registers spread) or at their original places among the survivors (``'original'``).

Hidden-state alignment (``align``), honoured by the mixer through ``MixerContext.positions``:
    None     plain pruning: the scan and the local conv see the compacted sequence.
    'hold'   (R1) the local conv sees each kept token's original neighbourhood (pruned slots read as zeros);
             the scan state passes unchanged across pruned positions.
    'decay'  (R2) 'hold' plus the state decays across the pruned positions at the previous kept token's rate.

Selection (``selection``): 'global' keeps the best-scored tokens (the released code); 'window' (our extension)
drops the lowest-scored token of each run of consecutive tokens, so the drops spread as evenly as static
pruning's (:func:`window_keep`; training-free on all 10,000 CIFAR-10 test images, ToP with it beat plain pruning
by 2.0 points, docs/top.md).

The pruning core (:class:`~.pruning.ProgressivePruner`, :mod:`.pruning`) is shared with the baselines in
:mod:`.baselines`, which only change the score.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Sequence

from torch import Tensor, nn

from ..contract import MixerContext, TokenState
from .pruning import (ALIGN_MODES, CLS_PLACEMENTS, DEFAULT_LAYERS, DENSE_TOKENS, ORDERS, SCAN_GAPS,  # noqa: F401
                      SELECTIONS, ProgressivePruner, kept_patches, tokens_per_layer, window_keep)
from .options import method_options

DEFAULT_ALIGN = "hold"  # R1 recovered more accuracy than R2 on CIFAR-10 (tied on digits): docs/top.md


def stepwise_alignment_macs(tokens_per_layer: Sequence[int], d_inner: int, d_state: int) -> float:
    """MACs of an alignment kernel that steps through every pruned position (h <- exp(delta*A) * h: one exp
    argument and one multiply per state entry, one direction, the papers' convention) over the whole model.

    This accounting reproduces the FLOPs quoted for ToP with alignment (1.29 G Vim-Ti, 3.60 G Vim-S; see
    docs/top.md). Our scan folds the gap into the next kept step instead (``ToP.flops_overhead``), far cheaper.
    """
    full = tokens_per_layer[0] if tokens_per_layer else 0
    return float(sum(full - n for n in tokens_per_layer) * 2 * d_inner * d_state)


class ToP(ProgressivePruner):
    """Token pruning scored by the clipped SSM output of the block before each pruning point.

    The score is the previous mixer's combined, gated SSM output (B, L, d_inner), the input of its ``out_proj``,
    which the mixer hands to the context's ``tap`` (:class:`~mambatrim.contract.MixerContext`): the backbone
    needs no ToP-specific code, and every executor (PyTorch, fused Triton) honours it. The score lives on this
    reducer, so deep copies of the model (EMA, teacher) record independently.
    """

    def __init__(self, layers: Sequence[int] = DEFAULT_LAYERS, keep: float | Sequence[float] = 0.8,
                 align: str | None = DEFAULT_ALIGN, cls_placement: str = "middle", clip: bool = True,
                 selection: str = "global") -> None:
        super().__init__(layers, keep, align, cls_placement, selection=selection)
        self.clip = clip
        self._scores: dict[int, Tensor] = {}

    def attach(self, model: nn.Module) -> "ToP":
        """Check that ``model`` has the blocks this schedule prunes after (done by :func:`apply`)."""
        layers = getattr(model, "layers", None)
        if layers is None or max(self.layers) > len(layers):
            raise ValueError(f"ToP prunes after blocks {self.layers} but the model has "
                             f"{0 if layers is None else len(layers)} blocks")
        return self

    def begin(self, state: TokenState) -> TokenState:
        self._scores.clear()
        return super().begin(state)

    def _record(self, layer_idx: int, ssm_output: Tensor) -> None:
        y = ssm_output.detach().float()
        self._scores[layer_idx] = (y.clamp(min=0) if self.clip else y).sum(-1)

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        ctx = super().mixer_context(layer_idx, state)
        if layer_idx + 1 not in self.keep_at:
            return ctx
        return replace(ctx or MixerContext(), tap=functools.partial(self._record, layer_idx + 1))

    def scores(self, layer_idx: int, state: TokenState) -> Tensor:
        score = self._scores.pop(layer_idx, None)
        if score is None or score.shape != state.hidden.shape[:2]:
            raise RuntimeError(f"ToP: no SSM-output score recorded for the block before layer {layer_idx}")
        return score

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        """Alignment cost plus the score: one max and one add per SSM-output entry before each pruning."""
        extra = super().flops_overhead(tokens_per_layer, dim)
        for i in self.layers:
            if i - 1 < len(tokens_per_layer):
                extra += tokens_per_layer[i - 1] * 2 * dim
        return extra


@method_options("top")
def apply(model: nn.Module, keep: float | Sequence[float] = 0.8, layers: Sequence[int] = DEFAULT_LAYERS,
          align: str | None = DEFAULT_ALIGN, cls_placement: str = "middle", clip: bool = True,
          selection: str = "global") -> nn.Module:
    """Attach ToP to a Vim model (in place) and return it; ``align`` None | 'hold' | 'decay'; ``selection``
    'global' (the released top-k) | 'window' (one drop per run of consecutive tokens, our extension)."""
    reducer = ToP(layers=layers, keep=keep, align=align, cls_placement=cls_placement, clip=clip,
                  selection=selection).attach(model)
    return model.set_reducer(reducer)


def _register() -> None:
    from .registry import MethodSpec, register_method

    register_method(MethodSpec(
        name="top", apply=apply,
        description="ToP token pruning: clipped-SSM-output importance, survivors in order, hidden-state "
                    "alignment (align=hold|decay|none)",
        demo_options=dict(keep=0.7, layers=[1, 2], align=DEFAULT_ALIGN)))


_register()
