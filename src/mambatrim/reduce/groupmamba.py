"""Reduction on GroupMamba, a hierarchical backbone: per-image selection of the group scans, and token merging
inside one stage with ToMe's unmerge before the downsampling.

Token pruning is not defined across GroupMamba's downsampling (a strided conv reads the full grid), so the first
reduction is DyVM's block selection at group granularity: before each selected block a selector (DyVM's
:class:`~mambatrim.reduce.dyvm.BlockSelector`, one Linear per block) reads the gate feature of the layer (the
mean of its normalised tokens, the CAM's input) and decides per image which of the four group scans run; a
skipped group's quarter of the channels passes through as the normalised input. Training samples the decisions
with DyVM's hard Gumbel-sigmoid and adds DyVM's block-ratio loss; inference skips the gated-off scans image by
image (``skip_gated``), which the FLOPs counter sees.

Token merging (``stage_merge``): at the input of the chosen blocks of one stage (default: the first block of
the stage with the most tokens), ToMe's bipartite soft matching (alternate tokens as the two sets, cosine
similarity of the hidden states, the ``r`` most similar pairs merged as size-weighted means) shrinks the tokens;
the blocks then run on the merged tokens (the scans visit them at their grid positions in each group's order,
the 2-D depthwise convs read each grid cell from the token it is merged into and give a token the mean over its
cells: ``MixerContext.sources``), and before the downsampling every grid cell gets its token back (ToMe's
unmerge), so the next stage sees a full grid.

Both are registered for the GroupMamba family (``apply_method(model, "group_select", keep=0.8)``,
``--method stage_merge`` on the CLI).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import LinearDirectionGate, MixerContext, Reducer, TokenState, add_rows_, batch_arange, take_rows
from ..models.groupmamba import GROUPS, GroupMamba
from ..validation import check
from .dyvm import BlockSelector, block_ratio_loss, gumbel_sigmoid_hard
from .options import method_options

GATES = "group_gates"
SOURCES = "merge_sources"


class GroupSelectReducer(Reducer):
    """One :class:`BlockSelector` (C -> 4 group logits) per selected block (``selectors[str(layer)]``)."""

    def __init__(self, widths: dict[int, int], keep: float, block_loss_weight: float = 10.0,
                 block_tau: float = 2.0, block_threshold: float = 0.5, selector_init_bias: float = 5.0,
                 start: str = "all") -> None:
        super().__init__()
        self.keep, self.block_loss_weight = float(keep), float(block_loss_weight)
        self.block_tau, self.block_threshold = float(block_tau), float(block_threshold)
        self.selectors = nn.ModuleDict({str(layer): BlockSelector(width, GROUPS) for layer, width in widths.items()})
        off = static_plan(len(widths), keep) if start == "static" else set()
        with torch.no_grad():  # zero weights, a large bias: +b (run) for every group ('all', DyVM's init)
            for i, selector in enumerate(self.selectors.values()):
                selector.weight.zero_()
                selector.bias.fill_(selector_init_bias)
                for g in range(GROUPS):
                    if (i, g) in off:
                        selector.bias[g] = -selector_init_bias

    def begin(self, state: TokenState) -> TokenState:
        state.extras.setdefault(GATES, [])  # one list for the whole forward pass (the hooks run per stage)
        return state

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        selector = self.selectors[str(layer_idx)] if str(layer_idx) in self.selectors else None
        if selector is None:
            return None
        gate: Callable[[Tensor], Tensor]
        if not self.training:
            gate = LinearDirectionGate(selector.weight, selector.bias)
        else:
            record = state.extras.setdefault(GATES, [])

            def gate(feature: Tensor) -> Tensor:
                g = gumbel_sigmoid_hard(selector(feature), self.block_tau, self.block_threshold)
                record.append(g)
                return g

        return MixerContext(protected=state.protected, direction_gate=gate, skip_gated=not self.training,
                            grid=state.grid)

    def extra_losses(self, state: TokenState, teacher_state: TokenState | None = None) -> dict[str, Tensor]:
        gates = state.extras.get(GATES) or []
        if not (gates and self.training):
            return {}
        return {"group_ratio": block_ratio_loss(gates, self.keep, self.block_loss_weight)}

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        return float(sum(s.in_features * s.out_features for s in self.selectors.values()))

    def extra_repr(self) -> str:
        return f"keep={self.keep}, layers={sorted(int(k) for k in self.selectors)}"


def static_plan(blocks: int, keep: float) -> set[tuple[int, int]]:
    """(block, group) pairs switched off so that ``keep`` of the ``blocks * 4`` group scans run: first one group
    per block (block b its group b mod 4, so every direction loses its share), then a second, and so on."""
    count = round((1 - keep) * blocks * GROUPS)
    pairs = [(b, (b + j) % GROUPS) for j in range(GROUPS) for b in range(blocks)]
    return set(pairs[:count])


STARTS = ("all", "static")


@method_options("group_select", aliases={"block_ratio": "keep"})
def apply_group_select(model: nn.Module, keep: float = 0.8, layers: Sequence[int] | None = None,
                       block_loss_weight: float = 10.0, block_tau: float = 2.0,
                       selector_init_bias: float = 5.0, start: str = "all") -> nn.Module:
    """Attach group selection to a GroupMamba: ``keep`` (alias ``block_ratio``) the target share of group scans
    run, ``layers`` the stage blocks (global indices, 0-based) with a selector (default all). ``start``: 'all'
    (every group runs until trained, DyVM's init) or 'static' (the same ``1 - keep`` of the (block, group) scans
    off for every image, spread round-robin: a fixed policy for speed measurements without training)."""
    if not isinstance(model, GroupMamba):
        raise ValueError(f"group_select applies to GroupMamba models, got {type(model).__name__}")
    check(keep, "group_select: keep (block_ratio)", "probability")
    if start not in STARTS:
        raise ValueError(f"group_select: start must be one of {', '.join(STARTS)}, got {start!r}")
    blocks = model.layers()
    chosen = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"group_select: layers {bad} out of range; the model has blocks 0..{len(blocks) - 1}")
    widths = {i: blocks[i].attn.input_dim for i in chosen}
    reducer = GroupSelectReducer(widths, keep, block_loss_weight, block_tau, selector_init_bias=selector_init_bias,
                                 start=start)
    ref = next(model.parameters())
    return model.set_reducer(reducer.to(device=ref.device))


class StageMergeReducer(Reducer):
    """ToMe merging at the input of ``layers`` (blocks of one stage), unmerged at the end of that stage: the
    stage ends with ``keep`` of its grid's tokens, each merge removing an equal share."""

    def __init__(self, keep: float, layers: Sequence[int], widths: dict[int, int]) -> None:
        super().__init__()
        self.keep, self.layers, self.widths = float(keep), list(layers), dict(widths)
        self.entering: dict[int, int] = {}  # tokens entering each merge in the last forward (FLOPs)

    def merged_away(self, cells: int) -> list[int]:
        """Tokens merged away at each of the layers for a stage grid of ``cells`` tokens."""
        total = round((1 - self.keep) * cells)
        per, extra = divmod(total, len(self.layers))
        return [per + (1 if k < extra else 0) for k in range(len(self.layers))]

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        if layer_idx not in self.layers:
            return state
        if SOURCES not in state.extras:
            state.extras[SOURCES] = batch_arange(state.hidden.shape[0], state.num_tokens, state.hidden.device)
        cells = state.extras[SOURCES].shape[1]
        r = self.merged_away(cells)[self.layers.index(layer_idx)]
        if r > state.num_tokens // 2:
            raise ValueError(f"stage_merge: keep={self.keep} merges {r} of {state.num_tokens} tokens at block "
                             f"{layer_idx}; one merge can at most halve the tokens: give more layers or a larger keep")
        if r == 0:
            return state
        self.entering[layer_idx] = state.num_tokens
        merged, sources = bipartite_merge(state, r, state.extras[SOURCES])
        merged.extras[SOURCES] = sources
        return merged

    def mixer_context(self, layer_idx: int, state: TokenState) -> MixerContext | None:
        sources = state.extras.get(SOURCES)
        if sources is None:
            return None
        return MixerContext(protected=state.protected, positions=state.positions, grid=state.grid, sources=sources)

    def finish(self, state: TokenState) -> TokenState:
        """Unmerge: every grid cell gets the token it was merged into, in raster order (the next stage's input)."""
        sources = state.extras.pop(SOURCES, None)
        if sources is None:
            return state
        bsz, cells = sources.shape
        return state.replace(hidden=take_rows(state.hidden, sources), sizes=None,
                             positions=batch_arange(bsz, cells, sources.device))

    def flops_overhead(self, tokens_per_layer: list[int], dim: int) -> float:
        """The similarity products of the last forward's merges: |A| * |B| * C for the tokens entering each."""
        return float(sum(((n + 1) // 2) * (n // 2) * self.widths[layer] for layer, n in self.entering.items()))

    def extra_repr(self) -> str:
        return f"keep={self.keep}, layers={self.layers}"


def bipartite_merge(state: TokenState, r: int, sources: Tensor) -> tuple[TokenState, Tensor]:
    """ToMe's bipartite soft matching: tokens at even indices (set A) each find their most similar token at an odd
    index (set B, cosine of the hidden states); the ``r`` best-matched A tokens are merged into their B tokens as
    size-weighted means. Returns the state of the remaining tokens (unmerged A, then B; positions: a merged
    token keeps its B token's grid position) and the updated ``sources`` (B, M): each grid cell's token."""
    x, bsz, length = state.hidden, state.hidden.shape[0], state.num_tokens
    sizes = state.sizes if state.sizes is not None else x.new_ones(bsz, length)
    a_idx, b_idx = torch.arange(0, length, 2, device=x.device), torch.arange(1, length, 2, device=x.device)
    normed = F.normalize(x.float(), dim=-1)
    best, match = (normed[:, a_idx] @ normed[:, b_idx].transpose(1, 2)).max(dim=-1)  # (B, A)
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values
    dst = match.gather(1, merged_a)  # (B, r) index into B
    weighted = x * sizes[..., None].to(x.dtype)
    b_sum = add_rows_(weighted[:, b_idx], dst, take_rows(weighted[:, a_idx], merged_a))
    b_size = sizes[:, b_idx].scatter_add(1, dst, sizes[:, a_idx].gather(1, merged_a))
    keep_a = a_idx[kept_a]  # (B, A - r) current indices
    hidden = torch.cat([take_rows(x, keep_a), b_sum / b_size[..., None].to(x.dtype)], 1)
    new_sizes = torch.cat([sizes.gather(1, keep_a), b_size], 1)
    positions = torch.cat([state.positions.gather(1, keep_a), state.positions[:, b_idx]], 1)
    # old token index -> new token index: kept A to their slots, B to theirs, merged A to their B's slot
    slot = torch.zeros(bsz, length, dtype=torch.long, device=x.device)
    n_keep = keep_a.shape[1]
    slot.scatter_(1, keep_a, batch_arange(bsz, n_keep, x.device))
    slot[:, b_idx] = n_keep + torch.arange(b_idx.numel(), device=x.device)
    slot.scatter_(1, a_idx[merged_a], n_keep + dst)
    new = state.replace(hidden=hidden, positions=positions, sizes=new_sizes, residual=None, mask=None)
    return new, slot.gather(1, sources)


@method_options("stage_merge")
def apply_stage_merge(model: nn.Module, keep: float = 0.7, layers: Sequence[int] | None = None) -> nn.Module:
    """Attach token merging to a GroupMamba: ``keep`` the share of the stage's tokens left after the last merge
    (each of the ``layers`` merges an equal number; one merge can at most halve the tokens), ``layers`` the
    blocks (global indices, all in one stage) at whose input it merges; default the first block of the stage
    with the most tokens (stage 1)."""
    if not isinstance(model, GroupMamba):
        raise ValueError(f"stage_merge applies to GroupMamba models, got {type(model).__name__}")
    check(keep, "stage_merge: keep", "fraction")
    layers = [0] if layers is None else sorted(int(i) for i in layers)
    bounds, first = [], 0
    for depth in model.depths:
        bounds.append(range(first, first + depth))
        first += depth
    stages = {next((s for s, b in enumerate(bounds) if i in b), None) for i in layers}
    if None in stages or len(stages) != 1:
        raise ValueError(f"stage_merge: layers {layers} must be blocks of one stage; the stages hold blocks "
                         f"{', '.join(f'{b.start}..{b.stop - 1}' for b in bounds)}")
    blocks = model.layers()
    return model.set_reducer(StageMergeReducer(keep, layers, {i: blocks[i].attn.input_dim for i in layers}))


def _register() -> None:
    from .registry import MethodSpec, register_method

    register_method(MethodSpec(
        name="group_select", apply=apply_group_select, families=("GroupMamba",), learned=True,
        description="GroupMamba group selection: per-image choice of the four group scans (DyVM's selectors "
                    "and block-ratio loss at group granularity)",
        demo_options=dict(keep=0.75)))
    register_method(MethodSpec(
        name="stage_merge", apply=apply_stage_merge, families=("GroupMamba",), trainable=True,
        description="GroupMamba token merging in one stage (ToMe's bipartite matching), unmerged before the "
                    "downsampling", demo_options=dict(keep=0.7)))


_register()
