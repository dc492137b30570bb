"""ToP: token pruning for Vision Mamba with SSM-aware importance and pruning-aware hidden-state alignment.

After chosen blocks (default: after blocks 5, 10 and 15 of 24) each image keeps ``ceil((L-1) * keep)`` patch
tokens (rounded to an even count, so the class token sits exactly in the middle again), scored by the previous
mixer's SSM output: ``S_m = sum_d max(0, y_{m,d})`` with ``y`` the gated output of both scan directions in
original token order (the input of ``out_proj``). Survivors keep their original order; the class token is
never pruned and is re-inserted at the middle (``cls_placement='middle'``, as the released code does) or at its
original place among the survivors (``'original'``).

Hidden-state alignment (``align``), honoured by the mixer through ``MixerContext.positions``:
    None     plain pruning: the scan and the local conv see the compacted sequence.
    'hold'   (R1) the local conv sees each kept token's original neighbourhood (pruned slots read as zeros);
             the scan state passes unchanged across pruned positions.
    'decay'  (R2) 'hold' plus the state decays across the pruned positions at the previous kept token's rate.

Selection (``selection``): 'global' keeps the best-scored tokens (the released code); 'window' (our extension)
drops the lowest-scored token of each run of consecutive tokens, so the drops spread as evenly as static
pruning's (:func:`window_keep`; training-free on all 10,000 CIFAR-10 test images, ToP with it beat plain pruning
by 2.0 points, docs/top.md).

The pruning core (:class:`ProgressivePruner`) is shared with the baselines in :mod:`.baselines`, which only
change the score.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .core import MixerContext, Reducer, TokenState, others_index, scan_gap_pair

ALIGN_MODES = (None, "hold", "decay")
CLS_PLACEMENTS = ("middle", "original")
ORDERS = ("original", "score")
SELECTIONS = ("global", "window")
DEFAULT_LAYERS = (5, 10, 15)
DEFAULT_ALIGN = "hold"  # R1 recovered more accuracy than R2 on CIFAR-10 (tied on digits): docs/top.md
DENSE_TOKENS = "dense_tokens"  # TokenState.extras key: the token count before any pruning (set by begin)
SCAN_GAPS = "scan_gaps"  # TokenState.extras key: (2, B, L) decay gaps of the current positions (align='decay')


def kept_patches(num_tokens: int, keep: float) -> int:
    """Patch tokens kept out of ``num_tokens`` (class token included): ceil((L-1)*keep), rounded down to an even
    count so the class token can sit exactly in the middle (the released code's rule); all if that is >= L-1."""
    patches = num_tokens - 1
    n = math.ceil(patches * keep - 1e-9)
    if n >= patches:
        return patches
    return n - n % 2 if n >= 2 else n


def tokens_per_layer(num_tokens: int, depth: int, layers: Sequence[int], keep: float | Sequence[float]) -> list[int]:
    """Token count each block sees under a pruning schedule (for FLOPs and reports)."""
    keeps = _per_layer_keep(layers, keep)
    counts, n = [], num_tokens
    for i in range(depth):
        if i in keeps:
            n = kept_patches(n, keeps[i]) + 1
        counts.append(n)
    return counts


def stepwise_alignment_macs(tokens_per_layer: Sequence[int], d_inner: int, d_state: int) -> float:
    """MACs of an alignment kernel that steps through every pruned position (h <- exp(delta*A) * h: one exp
    argument and one multiply per state entry, one direction, the papers' convention) over the whole model.

    This accounting reproduces the FLOPs quoted for ToP with alignment (1.29 G Vim-Ti, 3.60 G Vim-S; see
    docs/top.md). Our scan folds the gap into the next kept step instead (``ToP.flops_overhead``), far cheaper.
    """
    full = tokens_per_layer[0] if tokens_per_layer else 0
    return float(sum(full - n for n in tokens_per_layer) * 2 * d_inner * d_state)


def window_keep(score: Tensor, cls_index: Tensor, n_keep: int) -> Tensor:
    """(B, n_keep) sequence indices of the patch tokens kept by window selection, in original order.

    The L-1 patch tokens (sequence order, the class token left out) are cut into near-equal runs of consecutive
    tokens: one run per dropped token, each dropping its lowest-scored token (or, when fewer than half are
    kept, one run per kept token, each keeping its best). The drops are spread as evenly as static pruning's
    and the score decides only inside each run. Two sorts, no host sync."""
    bsz, length = score.shape
    n = length - 1
    if not 1 <= n_keep <= n:
        raise ValueError(f"window selection keeps 1..{n} of {n} patch tokens, got {n_keep}")
    others = others_index(cls_index, length)
    patch_score = score.gather(1, others)
    drop = n - n_keep <= n_keep
    runs = n - n_keep if drop else n_keep
    if runs == 0:
        return others
    run = torch.arange(n, device=score.device) * runs // n  # (n,) run of each patch, non-decreasing
    by_score = patch_score.argsort(dim=1, descending=not drop)  # drop: worst first; keep: best first
    grouped = by_score.gather(1, torch.sort(run[by_score], dim=1, stable=True).indices)  # by run, then score
    picked = grouped[:, torch.searchsorted(run, torch.arange(runs, device=score.device))]  # (B, runs) ascending
    if drop:
        slot = torch.arange(n, device=score.device).expand(bsz, n)
        kept = slot.scatter(1, picked, n)  # dropped slots moved past every kept one
        picked = kept.sort(dim=1).values[:, :n_keep]
    return others.gather(1, picked)


def _per_layer_keep(layers: Sequence[int], keep: float | Sequence[float]) -> dict[int, float]:
    layers = [int(i) for i in layers]
    keeps = [float(keep)] * len(layers) if isinstance(keep, (int, float)) else [float(k) for k in keep]
    if len(keeps) != len(layers):
        raise ValueError(f"keep has {len(keeps)} values for {len(layers)} pruning layers {layers}")
    if sorted(set(layers)) != layers or any(i < 1 for i in layers):
        raise ValueError(f"pruning layers must be increasing block indices >= 1 (prune after that many blocks), "
                         f"got {layers}")
    bad = [k for k in keeps if not 0.0 < k <= 1.0]
    if bad:
        raise ValueError(f"keep ratios must lie in (0, 1], got {bad}")
    return dict(zip(layers, keeps))


class ProgressivePruner(Reducer):
    """Drop tokens before blocks ``layers`` (0-based, i.e. after that many blocks) by ``scores``.

    Subclasses implement :meth:`scores`. Works on variable-length batches only in the sense that every image
    keeps the same count (as ToP does), so the batch stays a dense tensor.
    """

    def __init__(self, layers: Sequence[int] = DEFAULT_LAYERS, keep: float | Sequence[float] = 0.8,
                 align: str | None = None, cls_placement: str = "middle", order: str = "original",
                 selection: str = "global") -> None:
        super().__init__()
        if align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
        if cls_placement not in CLS_PLACEMENTS:
            raise ValueError(f"cls_placement must be one of {CLS_PLACEMENTS}, got {cls_placement!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if order == "score" and (align is not None or cls_placement != "middle" or selection != "global"):
            raise ValueError("order='score' (survivors ranked by score, as ViT pruning does) keeps no positional "
                             "order: it needs align=None, cls_placement='middle' and selection='global'")
        self.keep_at = _per_layer_keep(layers, keep)
        self.layers = sorted(self.keep_at)
        self.align = align
        self.cls_placement = cls_placement
        # 'original': survivors keep their order (ToP); 'score': ranked by score, as top-k token pruning for ViTs
        # (EViT, DynamicViT's inference) leaves them -- harmless for attention, not for a scan (an ablation)
        self.order = order
        # 'global': the n_keep best-scored tokens (ToP); 'window': one drop per run of consecutive tokens, the
        # worst-scored of the run (drops spread like static pruning, the score decides within each run)
        self.selection = selection

    def scores(self, layer_idx: int, state: TokenState) -> Tensor:
        """(B, L) importance of each token (higher = kept); the class token's value is ignored."""
        raise NotImplementedError

    def begin(self, state: TokenState) -> TokenState:
        """Record the dense token count (what ``positions`` index into) in the state, for the aligned mixer:
        it then sizes its position map without reading ``positions.max()`` back from the device."""
        return state.replace(extras={**state.extras, DENSE_TOKENS: state.num_tokens})

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        keep = self.keep_at.get(layer_idx)
        if keep is None or state.num_tokens < 3:
            return state
        if state.mask is not None:
            raise ValueError("token pruning cannot follow a method that masks tokens (TokenState.mask is set)")
        length = state.num_tokens
        n_keep = kept_patches(length, keep)
        if n_keep >= length - 1:
            return state
        score = self.scores(layer_idx, state).float()
        is_cls = torch.arange(length, device=score.device)[None, :] == state.cls_index[:, None]
        # the class token is never a candidate (masked_fill: an indexed write of a Python float would copy a
        # host scalar every call, which also rules out CUDA-graph capture)
        score = score.masked_fill(is_cls, float("-inf"))
        if self.selection == "window":
            top = window_keep(score, state.cls_index, n_keep)  # in original order
        else:
            top = score.topk(n_keep, dim=1).indices  # by descending score
            if self.order == "original":
                top = top.sort(dim=1).values  # survivors in original order
        cls = state.cls_index[:, None]
        if self.cls_placement == "middle":
            mid = n_keep // 2
            index = torch.cat([top[:, :mid], cls, top[:, mid:]], 1)
            cls_index = torch.full_like(state.cls_index, mid)
        else:
            index = torch.cat([top, cls], 1).sort(dim=1).values
            cls_index = (index == cls).float().argmax(1)
        state = state.gather(index).replace(cls_index=cls_index)
        if self.align == "decay":  # the scan gaps of the new positions, once for the layers up to the next event
            state = state.replace(extras={**state.extras, SCAN_GAPS: scan_gap_pair(state.positions, cls_index)})
        return state

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        if self.align is None or layer_idx < self.layers[0]:
            return None
        return MixerContext(positions=state.positions, cls_index=state.cls_index, align=self.align,
                            full_length=state.extras.get(DENSE_TOKENS), gaps=state.extras.get(SCAN_GAPS))

    def tokens_per_layer(self, num_tokens: int, depth: int) -> list[int]:
        return tokens_per_layer(num_tokens, depth, self.layers, [self.keep_at[i] for i in self.layers])

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        """Alignment: the local conv runs over the original length (both directions, d_inner = 2*dim channels,
        kernel 4) instead of the kept tokens; the decay adds one multiply-add per state entry per step (folded
        into exp(delta*A)'s argument: L*d_inner*1). Counted as MACs, paper convention (one direction)."""
        if self.align is None or not tokens_per_layer:
            return 0.0
        full, d_inner, k = tokens_per_layer[0], 2 * dim, 4
        extra = 0.0
        for i, n in enumerate(tokens_per_layer):
            if i >= self.layers[0]:
                extra += (full - n) * d_inner * k  # conv over pruned slots
                if self.align == "decay":
                    extra += n * d_inner  # gap * delta_prev added to the exponent
        return extra

    def extra_repr(self) -> str:
        return (f"keep_at={self.keep_at}, align={self.align!r}, cls_placement={self.cls_placement!r}, "
                f"order={self.order!r}, selection={self.selection!r}")


def _record_ssm_output(module: nn.Module, args: tuple[Tensor, ...]) -> None:
    """Forward pre-hook on a mixer's ``out_proj``: while recording, keep each token's (clipped) channel sum.

    State lives on the hooked module itself, so deep copies of the model (EMA, teacher) record independently."""
    mode = getattr(module, "_top_record", None)
    if mode is not None:
        y = args[0].detach().float()  # (B, L, d_inner): gated SSM output, both directions, original order
        module._top_score = (y.clamp(min=0) if mode == "clip" else y).sum(-1)


class ToP(ProgressivePruner):
    """Token pruning scored by the clipped SSM output of the block before each pruning point.

    The score is recorded by a forward pre-hook on the previous mixer's ``out_proj`` (its input is the gated
    SSM output of both directions, (B, L, d_inner)), so the backbone needs no ToP-specific code.
    """

    def __init__(self, layers: Sequence[int] = DEFAULT_LAYERS, keep: float | Sequence[float] = 0.8,
                 align: str | None = DEFAULT_ALIGN, cls_placement: str = "middle", clip: bool = True,
                 selection: str = "global") -> None:
        super().__init__(layers, keep, align, cls_placement, selection=selection)
        self.clip = clip
        self._targets: list[nn.Module] = []  # a plain list: the hooked out_proj modules are not submodules

    def attach(self, model: nn.Module) -> "ToP":
        """Register the score hooks on ``model`` (done by :func:`apply`)."""
        layers = getattr(model, "layers", None)
        if layers is None or max(self.layers) > len(layers):
            raise ValueError(f"ToP prunes after blocks {self.layers} but the model has "
                             f"{0 if layers is None else len(layers)} blocks")
        self.detach()
        for i in self.layers:
            out_proj = getattr(getattr(layers[i - 1], "mixer", None), "out_proj", None)
            if out_proj is None:
                raise ValueError(f"block {i - 1} has no mixer.out_proj to read the SSM output from")
            out_proj.register_forward_pre_hook(_record_ssm_output)
            self._targets.append(out_proj)
        return self

    def detach(self) -> None:
        """Remove the score hooks."""
        for target in self._targets:
            for key, fn in list(target._forward_pre_hooks.items()):
                if fn is _record_ssm_output:
                    del target._forward_pre_hooks[key]
        self._targets = []

    def _set_recording(self, on: bool) -> None:
        for target in self._targets:
            target._top_record = ("clip" if self.clip else "sum") if on else None
            target.__dict__.pop("_top_score", None)

    def begin(self, state: TokenState) -> TokenState:
        if not self._targets:
            raise RuntimeError("ToP has no score hooks: attach it with mambatrim.reduce.top.apply(model, ...)")
        self._set_recording(True)
        return super().begin(state)

    def finish(self, state: TokenState) -> TokenState:
        self._set_recording(False)
        return state

    def scores(self, layer_idx: int, state: TokenState) -> Tensor:
        target = self._targets[self.layers.index(layer_idx)]
        score = target.__dict__.pop("_top_score", None)
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


def apply(model: nn.Module, keep: float | Sequence[float] = 0.8, layers: Sequence[int] = DEFAULT_LAYERS,
          align: str | None = DEFAULT_ALIGN, cls_placement: str = "middle", clip: bool = True,
          selection: str = "global") -> nn.Module:
    """Attach ToP to a Vim model (in place) and return it; ``align`` None | 'hold' | 'decay'; ``selection``
    'global' (the released top-k) | 'window' (one drop per run of consecutive tokens, our extension)."""
    previous = getattr(model, "reducer", None)
    if isinstance(previous, ToP):
        previous.detach()
    reducer = ToP(layers=layers, keep=keep, align=align, cls_placement=cls_placement, clip=clip,
                  selection=selection).attach(model)
    return model.set_reducer(reducer)


def _register() -> None:
    from . import MethodSpec, register_method

    register_method(MethodSpec(
        name="top", apply=apply,
        description="ToP token pruning: clipped-SSM-output importance, survivors in order, hidden-state "
                    "alignment (align=hold|decay|none)",
        demo_options=dict(keep=0.7, layers=[1, 2], align=DEFAULT_ALIGN)))


_register()
