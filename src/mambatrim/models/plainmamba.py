"""PlainMamba (ChenhongyiYang/PlainMamba, an mmcls backbone), faithful to the official code and its checkpoints.

Isotropic, no class token: a conv patch embedding (7x7 stride-2 stem, ``num_convs`` 3x3 convs, zero padding to
the projection's multiple, a ``patch_size/2`` patchify conv), a learnable ``pos_embed`` resampled bicubically for
other grids, blocks ``x + mamba(LayerNorm(x))`` (L1's layer 0 then replaces the stream by
``GELU(BN(dwconv3x3(x)))``), a final LayerNorm (eps 1e-6), the mean over the tokens and a linear head.

The mixer (:class:`PlainMamba2D`) runs the four zig-zag orders of :func:`~mambatrim.contract.zigzag_orders` with
ONE set of SSM parameters, reproducing the official code exactly (its checkpoints were trained with it):
a 2D depthwise 7x7 conv before the scan; per order, ``u`` is read in that order while delta, B and C stay in
sequence order; B gets the direction-aware term ``direction_Bs[label]`` of each step (0 start, 1 right, 2 left,
3 up, 4 down: the move that arrived at the step); the dt bias is applied twice (``dt_proj`` with its bias, and
again as the scan's ``delta_bias``); the four outputs go back to sequence order, are summed, then gated by SiLU(z).

After a reduction method removed tokens (``MixerContext.positions``): each order visits the survivors in its
order, with its own gaps (alignment works per order); a survivor's direction label is the move from the
previous visited survivor (within the order's run axis: along the run if both lie in the same row / column,
else the turn); the 2D convs (the mixer's 7x7 and L1's 3x3) see the survivors on the dense grid with pruned
cells zero-filled. Module and parameter names are the mmcls ones (``backbone.*``, ``head.fc.*``), so official
checkpoints load unchanged.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from torch import Tensor, nn

from ..contract import MixerContext, MixerPlan, Reducer, TokenState, zigzag_orders
from ..ops import scan_paths
from ..ops.table_lookup import lookup_rows

# Which orders of zigzag_orders() run along rows (the row snake and its reverse) and which along columns.
ROW_RUNS = (True, True, False, False)
START, RIGHT, LEFT, UP, DOWN = range(5)


def on_grid(x: Tensor, fn: Callable[[Tensor], Tensor], grid: tuple[int, int], positions: Tensor | None) -> Tensor:
    """Apply a 2D op ``fn`` (B, C, H, W) -> (B, C, H, W) to tokens ``x`` (B, L, C). With ``positions`` (B, L)
    (raster index of each token after pruning or merging), the tokens are placed on a zero-filled dense grid
    and read back at their positions; ``None``: ``x`` is the whole grid in raster order."""
    bsz, length, chans = x.shape
    height, width = grid
    if positions is None:
        out = fn(x.transpose(1, 2).reshape(bsz, chans, height, width))
        return out.flatten(2).transpose(1, 2)
    index = positions[:, :, None].expand(-1, -1, chans)
    dense = x.new_zeros(bsz, height * width, chans).scatter(1, index, x)
    out = fn(dense.transpose(1, 2).reshape(bsz, chans, height, width)).flatten(2).transpose(1, 2)
    return out.gather(1, index)


def direction_labels(raster: Tensor, width: int, row_runs: bool) -> Tensor:
    """(B, L) label of each scan step from the raster indices (B, L) of the visited tokens, in visiting order:
    0 for the first step, then the move from the previous visited token: 1 right, 2 left, 3 up, 4 down.
    Within a run (same row for row snakes, same column for column snakes) the move is along the run, else it
    is the turn to the next run; on the dense grid this is the official ``get_permute_order`` labelling."""
    row, col = raster // width, raster % width
    d_row, d_col = row.diff(dim=1), col.diff(dim=1)
    horizontal = torch.where(d_col > 0, RIGHT, LEFT)
    vertical = torch.where(d_row > 0, DOWN, UP)
    moves = torch.where(d_row == 0, horizontal, vertical) if row_runs else torch.where(d_col == 0, vertical, horizontal)
    return torch.cat([moves.new_full((raster.shape[0], 1), START), moves], 1)


class PlainMamba2D(nn.Module):
    """PlainMamba's mixer: four zig-zag orders sharing one set of SSM parameters (official names)."""

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, dt_rank: int | str = "auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_size: int = 7,
                 conv_bias: bool = True, bias: bool = False) -> None:
        super().__init__()
        if conv_size % 2 != 1:
            raise ValueError(f"conv_size must be odd (a centred 2D kernel), got {conv_size}")
        self.orders = zigzag_orders()
        self.d_model, self.d_state, self.conv_size = d_model, d_state, conv_size
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        E = self.d_inner
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv2d = nn.Conv2d(E, E, conv_size, padding=conv_size // 2, groups=E, bias=conv_bias)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(E, 1)))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=bias)
        self.direction_Bs = nn.Parameter(torch.zeros(len(self.orders) + 1, d_state))
        self._init_params(dt_min, dt_max, dt_init_floor)

    @property
    def num_paths(self) -> int:
        return len(self.orders)

    def macs_terms(self, tokens: int) -> tuple[float, float, float]:
        """(shared, per_path, paper_scale) MACs for ``tokens`` tokens of one image (the FLOPs counter's protocol).
        Shared: in_proj, the 7x7 depthwise conv at the tokens, x_proj, dt_proj, out_proj (the orders share them);
        per path: the scan, 9*L*E*N, and the D term, L*E. PlainMamba's own counter (tools/analysis_tools/
        get_flops.py) counts all four paths, so the paper convention equals the full one."""
        L, d, E, N, R = tokens, self.d_model, self.d_inner, self.d_state, self.dt_rank
        shared = L * d * 2 * E + L * E * self.conv_size ** 2 + L * E * (R + 2 * N) + L * R * E + L * E * d
        return float(shared), float(9 * L * E * N + L * E), 1.0

    @torch.no_grad()
    def _init_params(self, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's dt init (uniform weight, inverse-softplus bias of dt ~ logU(dt_min, dt_max)) as upstream."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        trunc_normal_(self.direction_Bs, std=0.02)

    def forward(self, hidden: Tensor, ctx: MixerContext) -> Tensor:
        """hidden (B, L, d_model) -> (B, L, d_model); ``ctx.grid`` is the (H, W) token grid, ``ctx.positions``
        the tokens' raster indices (``None``: the whole grid in raster order)."""
        if ctx.grid is None or len(ctx.grid) != 2:
            raise ValueError(f"PlainMamba2D needs the (height, width) token grid in MixerContext.grid, got "
                             f"{ctx.grid!r}")
        plan = MixerPlan.build(ctx, self.orders, hidden.shape[0], hidden.device)
        xz = self.in_proj(hidden)
        x, z = xz.chunk(2, dim=-1)  # (B, L, E) each
        gate = plan.gate(plan.gate_feature(xz)) if plan.callable_gate else plan.gate  # (B, K) or None
        self.last_stats = {"tokens": hidden.shape[1], "gate": None if gate is None else gate.detach()}
        mask = None if plan.mask is None else plan.mask[:, :, None].to(x.dtype)
        if mask is not None:  # training-time masked tokens feed nothing into the conv and the scans
            x = x * mask
        xc = F.silu(on_grid(x, self.conv2d, ctx.grid, ctx.positions))
        if mask is not None:
            xc = xc * mask
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt)  # with its bias: the scan adds it a second time (official)
        y = self.scan_orders(xc, delta, B, C, plan, ctx, gate)
        y = y * F.silu(z)
        if plan.tap is not None:
            plan.tap(y)
        return self.out_proj(y)

    def scan_orders(self, xc: Tensor, delta: Tensor, B: Tensor, C: Tensor, plan: MixerPlan, ctx: MixerContext,
                    gate: Tensor | None = None) -> Tensor:
        """Sum over the orders of the scans, in sequence order: (B, L, E), as ONE :func:`~mambatrim.ops.scan_paths`
        call: ``u`` read through each order's visiting index, delta / B / C at the scan step (sequence order),
        B plus each step's direction term, the outputs written back through the index and summed, times the
        path gates (B, K) if any (a gated-off path is zeroed, not skipped), in one launch on the 'triton'
        backend; the 'torch' / 'ref' backends gather, scan each order and scatter back (the reference)."""
        paths = len(plan.paths)
        index = torch.stack([path.index for path in plan.paths])  # (K, B, L) sequence indices, visiting order
        raster = index if ctx.positions is None else ctx.positions[None].expand(paths, -1, -1).gather(2, index)
        labels = torch.stack([direction_labels(r, ctx.grid[1], rows) for r, rows in zip(raster, ROW_RUNS)])
        gap = None if plan.paths[0].gap is None else torch.stack([path.gap for path in plan.paths])
        A = (-torch.exp(self.A_log.float()))[None].repeat(paths, 1, 1)  # one set of parameters for every order
        D, bias = (p.float()[None].repeat(paths, 1) for p in (self.D, self.dt_proj.bias))
        y = scan_paths(xc.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), index,
                       D=D, delta_bias=bias, delta_softplus=True, u_at="token", bc_at="step",
                       B_add=lookup_rows(self.direction_Bs, labels), gap=gap, weight=gate)
        return y.transpose(1, 2)


class PlainMambaLayer(nn.Module):
    """``x + drop_path(mamba(LayerNorm(x)))``; with ``with_dwconv`` the result then goes through
    ``GELU(BN(dwconv3x3))`` on the grid, with no residual around it (L1's layer 0).

    In the (hidden, residual) form of :class:`TokenState` the stream is ``residual + hidden``: the layer returns
    residual = the stream it received and hidden = what it added to it (the drop-path'ed mixer output; for the
    dwconv layer, its output minus its input stream)."""

    def __init__(self, embed_dims: int, with_dwconv: bool, drop_path_rate: float, mamba_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dims)
        self.with_dwconv = with_dwconv
        if with_dwconv:
            self.dw = nn.Sequential(nn.Conv2d(embed_dims, embed_dims, 3, padding=1, groups=embed_dims, bias=False),
                                    nn.BatchNorm2d(embed_dims), nn.GELU())
        self.mamba = PlainMamba2D(embed_dims, **mamba_cfg)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Tensor | None, ctx: MixerContext) -> tuple[Tensor, Tensor]:
        stream = hidden.float() if residual is None else residual + hidden.float()
        mixed = self.drop_path(self.mamba(self.norm(stream.to(self.norm.weight.dtype)), ctx))  # fp32 stream
        if not self.with_dwconv:
            return mixed, stream
        out = on_grid(stream + mixed, self.dw, ctx.grid, ctx.positions)
        return out - stream, stream


class ConvPatchEmbed(nn.Module):
    """7x7 stride-2 conv + BN + ReLU, ``num_convs`` x (3x3 conv + BN + ReLU), zero padding at the bottom/right
    to a multiple of ``patch_size // 2``, then a ``patch_size // 2`` patchify conv: (B, M, D) tokens, raster."""

    def __init__(self, img_size: tuple[int, int], in_chans: int, embed_dims: int, num_convs: int,
                 patch_size: int = 16) -> None:
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"patch_size must be even (a stride-2 stem, then patch_size/2 patches), got {patch_size}")
        self.img_size, self.in_chans, self.patch_size = img_size, in_chans, patch_size
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(True))
        convs: list[nn.Module] = []
        for _ in range(num_convs):
            convs += [nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True)]
        self.convs = nn.Sequential(*convs) if convs else None
        self.projection = nn.Conv2d(64, embed_dims, patch_size // 2, stride=patch_size // 2)
        self.grid_size = self.grid_for(*img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of an input size: the stem halves each side (rounding up), the padding rounds up to the
        patchify conv's multiple."""
        k = self.patch_size // 2
        return (-(-((height + 1) // 2) // k), -(-((width + 1) // 2) // k))

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (batch, {self.in_chans}, height, width), got {tuple(x.shape)}")
        x = self.stem(x)
        if self.convs is not None:
            x = self.convs(x)
        k = self.patch_size // 2
        x = F.pad(x, (0, -x.shape[3] % k, 0, -x.shape[2] % k))
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class PlainMambaBackbone(nn.Module):
    """The mmcls ``PlainMamba`` backbone's modules (``backbone.*`` in the official checkpoints)."""

    def __init__(self, img_size: tuple[int, int], in_chans: int, patch_size: int, embed_dims: int, depth: int,
                 num_convs: int, layers_with_dwconv: Sequence[int], drop_path_rate: float,
                 mamba_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.patch_embed = ConvPatchEmbed(img_size, in_chans, embed_dims, num_convs, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dims))
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.layers = nn.ModuleList(PlainMambaLayer(embed_dims, i in layers_with_dwconv, dpr[i], dict(mamba_cfg))
                                    for i in range(depth))
        self.ln1 = nn.LayerNorm(embed_dims, eps=1e-6)


class LinearClsHead(nn.Module):
    """mmcls ``LinearClsHead``: one linear layer named ``fc``."""

    def __init__(self, embed_dims: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dims, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class PlainMamba(nn.Module):
    """PlainMamba classifier (the mmcls ImageClassifier: backbone, mean-pooling neck, linear head).

    ``forward(images) -> logits``; ``forward_tokens`` -> the final state (``hidden`` = ln1 of every token);
    ``forward_features`` -> the mean over the tokens. Reduction methods attach through :meth:`set_reducer`.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, embed_dim: int = 192,
                 depth: int = 24, num_convs_patch_embed: int = 1, layers_with_dwconv: Sequence[int] = (),
                 num_classes: int = 1000, in_chans: int = 3, d_state: int = 16, expand: int = 2,
                 conv_size: int = 7, bias: bool = True, conv_bias: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, channels: int | None = None, **timm_kwargs: Any) -> None:
        super().__init__()
        in_chans = in_chans if channels is None else channels  # ``channels``: the training engine's word
        unknown = set(timm_kwargs) - {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
        if unknown:
            raise TypeError(f"PlainMamba got unknown arguments {sorted(unknown)}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes, self.embed_dim, self.depth, self.expand = num_classes, embed_dim, depth, expand
        self.num_features = embed_dim
        mamba_cfg = dict(d_state=d_state, expand=expand, conv_size=conv_size, conv_bias=conv_bias, bias=bias)
        self.backbone = PlainMambaBackbone(size, in_chans, patch_size, embed_dim, depth, num_convs_patch_embed,
                                           layers_with_dwconv, drop_path_rate, mamba_cfg)
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = LinearClsHead(embed_dim, num_classes)
        self.reducer: Reducer | None = None
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The official init: trunc-normal(0.02) Linear weights with zero biases (the Mamba dt bias kept),
        LayerNorms at 1/0, trunc-normal(0.02) ``pos_embed``."""
        trunc_normal_(self.backbone.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and not getattr(module.bias, "_no_reinit", False):  # not dt_proj
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ what tools read
    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def patch_embed(self) -> ConvPatchEmbed:
        return self.backbone.patch_embed

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.patch_embed.in_chans, *self.patch_embed.img_size)

    @property
    def num_protected(self) -> int:
        """No class token: no token is protected from pruning or merging."""
        return 0

    @property
    def num_paths(self) -> int:
        """Scan paths per mixer (what a per-path selector gates): the four zig-zag orders."""
        return len(zigzag_orders())

    def no_weight_decay(self) -> set[str]:
        """The official exemptions beyond norms and biases: pos_embed, A_log, D, direction_Bs."""
        return {n for n, _ in self.named_parameters()
                if n.rsplit(".", 1)[-1] in ("pos_embed", "A_log", "D", "direction_Bs")}

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = LinearClsHead(self.embed_dim, num_classes)

    def adapt_checkpoint(self, sd: dict[str, Tensor], report: Any) -> dict[str, Tensor]:
        """Resample a checkpoint's ``backbone.pos_embed`` made for another (square) grid, and drop the ``ema_*``
        buffers the official EMA checkpoint hook registers on the classifier (the other copy of every weight:
        the parameters are the evaluated ones); called by :func:`~mambatrim.models.load_checkpoint`, which
        records the changes in ``report.resized`` / ``report.skipped``."""
        ema = [k for k in sd if k.startswith("ema_")]
        for k in ema:
            del sd[k]
        if ema:
            report.skipped.append(f"{len(ema)} ema_* buffers of the EMA checkpoint hook")
        key, target = "backbone.pos_embed", self.backbone.pos_embed
        pe = sd.get(key)
        if pe is not None and pe.dim() == 3 and pe.shape != target.shape and pe.shape[-1] == target.shape[-1]:
            side = math.isqrt(pe.shape[1])
            if side * side != pe.shape[1]:
                raise ValueError(f"{key} of the checkpoint has {pe.shape[1]} positions, not a square grid: "
                                 f"resize it to the model's grid {self.patch_embed.grid_size} first")
            sd[key] = self._resample(pe, self.patch_embed.grid_size, (side, side))
            report.resized.append(f"{key} {tuple(pe.shape)} -> {tuple(sd[key].shape)}")
        return sd

    @staticmethod
    def _resample(pos_embed: Tensor, grid: tuple[int, int], old: tuple[int, int]) -> Tensor:
        """Bicubic, ``align_corners=False``, no antialiasing (mmcls ``resize_pos_embed``)."""
        return resample_abs_pos_embed(pos_embed, list(grid), list(old), num_prefix_tokens=0,
                                      antialias=False).to(pos_embed.dtype)

    def set_reducer(self, reducer: Reducer | None) -> "PlainMamba":
        """Attach a reduction method (or ``None`` to restore the dense model). Returns the model."""
        self.reducer = reducer
        return self

    # ------------------------------------------------------------------ forward
    def embed(self, x: Tensor) -> TokenState:
        """Patch-embed and add the (resampled if needed) pos_embed: the dense state, no protected tokens."""
        tokens, grid = self.patch_embed(x)
        pos = self.backbone.pos_embed
        if grid != self.patch_embed.grid_size:
            pos = self._resample(pos, grid, self.patch_embed.grid_size)
        hidden = self.pos_drop(tokens + pos)
        bsz, length = hidden.shape[:2]
        positions = torch.arange(length, device=x.device).expand(bsz, -1)
        protected = torch.empty((bsz, 0), dtype=torch.long, device=x.device)
        return TokenState(hidden=hidden, residual=None, positions=positions, protected=protected,
                          protected_layout="none", grid=grid)

    def forward_tokens(self, x: Tensor) -> TokenState:
        """Run every layer (the reducer's hooks around each); the final state's ``hidden`` is ln1 of every
        remaining token, its ``residual`` the stream before ln1."""
        reducer = self.reducer
        state = self.embed(x) if reducer is None else reducer.begin(self.embed(x))
        for i, layer in enumerate(self.layers):
            if reducer is not None:
                state = reducer.before_layer(i, state)
            hidden, residual = layer(state.hidden, state.residual, self.layer_context(i, state))
            state = state.replace(hidden=hidden, residual=residual)
        if reducer is not None:
            state = reducer.finish(state)
        stream = state.hidden if state.residual is None else state.residual + state.hidden.float()
        ln1 = self.backbone.ln1
        return state.replace(hidden=ln1(stream.to(ln1.weight.dtype)), residual=stream)

    def layer_context(self, layer_idx: int, state: TokenState) -> MixerContext:
        """The reducer's context for this layer plus the grid, and the token positions once a reducer is
        attached (it may have moved tokens): the mixers' scan orders and 2D convs read them."""
        reducer = self.reducer
        ctx = None if reducer is None else reducer.mixer_context(layer_idx, state)
        if ctx is None:
            ctx = MixerContext()
        positions = ctx.positions
        if positions is None and reducer is not None:
            positions = state.positions
        return replace(ctx, grid=state.grid, positions=positions)

    def pool(self, state: TokenState) -> Tensor:
        """Mean over the tokens (masked-out tokens excluded): the mmcls average-pooling neck."""
        if state.mask is None:
            return state.hidden.mean(1)
        weight = state.mask[..., None].to(state.hidden.dtype)
        return (state.hidden * weight).sum(1) / weight.sum(1).clamp(min=1)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return features if pre_logits else self.head(features)

    def forward_features(self, x: Tensor) -> Tensor:
        """The mean of the final tokens (ln1 applied)."""
        return self.pool(self.forward_tokens(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))
