"""GroupMamba (Amshaker/GroupMamba): a hierarchical backbone whose Modulated Group Mamba layer scans each channel
quarter in its own spatial direction, with official state_dict keys so released checkpoints load unchanged.

Four stages of (B, H*W, C) tokens (strides 4/8/16/32). A block is ``x + GML(x)`` then ``x + FFN(norm2(x))``;
the GML normalises, computes channel-affinity weights (CAM), runs one single-direction SS2D scan per channel
quarter (row-major, column-major and their reverses: :func:`~mambatrim.contract.raster_orders`), multiplies
the concatenation by ``skip_scale * xn`` and the CAM weights, normalises again with the same LayerNorm and
projects. The head averages the stage-4 tokens into a class token, runs one class block, and reads ``head``
and ``dist_head`` (their mean at eval).

Reducers attach with ``set_reducer``; inside every stage the tokens then flow as a
:class:`~mambatrim.contract.TokenState` through ``begin`` / per layer ``before_layer`` + ``mixer_context`` /
``finish`` (a hierarchical model calls the hooks once per stage, since each stage is a token grid of its own).
A :class:`~mambatrim.contract.MixerContext` with a (B, 4) ``direction_gate`` selects, per image, which group
scans run; a skipped group's quarter passes through as the normalised input.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from ..contract import MixerContext, Reducer, ScanOrder, TokenState, raster_orders
from ..ops import scan_paths

GROUPS = 4


def group_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
               orders: Sequence[ScanOrder], grid: tuple[int, int], positions: Tensor | None = None) -> Tensor:
    """Each group's selective scan along its own grid order, outputs back in token order.

    u, delta: (B, G, E, L); A: (G, E, N); B, C: (B, G, N, L); D, delta_bias: (G, E). The L tokens are the raster
    grid, or (after merging) the tokens at grid ``positions`` (B, L), visited in each order's sequence of their
    positions. All groups run as one :func:`~mambatrim.ops.scan_paths` call (softplus of
    ``delta + delta_bias``, no gate): one Triton launch reading the inputs through the visiting index and
    writing each output to its token on the 'triton' backend; gather, scan and scatter per group on the others
    (the reference). Returns (B, G, E, L) in u's dtype.
    """
    if positions is None:
        index = torch.stack([order.dense_index(grid, u.device) for order in orders])  # (G, L)
    else:
        index = torch.stack([order.visit(positions, grid)[0] for order in orders])  # (G, B, L)
    y = scan_paths(u.transpose(0, 1), delta.transpose(0, 1), A, B.transpose(0, 1), C.transpose(0, 1), index, D=D,
                   delta_bias=delta_bias, delta_softplus=True, combine="concat")
    return y.unflatten(1, (len(orders), u.shape[2]))


def to_grid(x: Tensor, grid: tuple[int, int], sources: Tensor | None) -> Tensor:
    """(B, L, C) tokens -> (B, C, H, W) map; after merging each grid cell reads the token it is merged into."""
    if sources is not None:
        x = x.gather(1, sources[..., None].expand(-1, -1, x.shape[-1]))
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)


def from_grid(y: Tensor, sources: Tensor | None, length: int) -> Tensor:
    """(B, C, H, W) map -> (B, L, C) tokens; after merging each token is the mean over its grid cells."""
    y = y.flatten(2).transpose(1, 2)
    if sources is None:
        return y
    total = y.new_zeros(y.shape[0], length, y.shape[-1]).scatter_add(1, sources[..., None].expand_as(y), y)
    count = y.new_zeros(y.shape[0], length, 1).scatter_add(1, sources[..., None], y.new_ones(sources.shape)[..., None])
    return total / count


class SS2D(nn.Module):
    """One group's single-direction VSSS scan (VMamba's SS2D with K=1): in_proj -> (x, z); depthwise 3x3 conv +
    SiLU on x; x_proj -> (dt, B, C); dt_proj; selective scan; out_norm; times SiLU(z); out_proj. The scan itself
    runs in :func:`group_scan` (all groups of a layer together), so this module prepares its inputs and finishes
    its output. Parameter names and shapes are the official ones (``x_proj_weight`` (1, R+2N, E), ...)."""

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        e = int(ssm_ratio * d_model)
        self.d_inner, self.d_state, self.dt_rank = e, d_state, math.ceil(d_model / 16)
        self.out_norm = nn.LayerNorm(e)
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        self.conv2d = nn.Conv2d(e, e, d_conv, padding=(d_conv - 1) // 2, groups=e, bias=True)
        x_proj = nn.Linear(e, self.dt_rank + 2 * d_state, bias=False)
        self.x_proj_weight = nn.Parameter(x_proj.weight.detach()[None].clone())
        self.out_proj = nn.Linear(e, d_model, bias=False)
        std = self.dt_rank ** -0.5
        self.dt_projs_weight = nn.Parameter(torch.empty(1, e, self.dt_rank).uniform_(-std, std))
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt)))[None])
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(e, 1))
        self.Ds = nn.Parameter(torch.ones(e))

    def scan_inputs(self, x: Tensor, grid: tuple[int, int], sources: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B, L, d_model) tokens -> u, delta (B, E, L), B, C (B, N, L), and SiLU(z) (B, L, E); the depthwise
        conv runs on the grid (``sources``: see :func:`to_grid`)."""
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        u = from_grid(F.silu(self.conv2d(to_grid(xi, grid, sources))), sources, x.shape[1]).transpose(1, 2)
        x_dbl = torch.einsum("bel,ce->bcl", u, self.x_proj_weight[0])
        dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = torch.einsum("brl,er->bel", dt, self.dt_projs_weight[0])
        return u, delta, Bm, Cm, F.silu(z)

    def finish(self, y: Tensor, z: Tensor) -> Tensor:
        """Scan output y (B, E, L) -> out_proj(out_norm(y) * SiLU(z)) (B, L, d_model)."""
        return self.out_proj(self.out_norm(y.transpose(1, 2)) * z)


class GroupMambaLayer(nn.Module):
    """The Modulated Group Mamba layer (GML): LN, channel-affinity weights, four group scans, product with
    ``skip_scale * xn``, CAM, the same LN again, ``proj``."""

    def __init__(self, input_dim: int, output_dim: int, d_state: int = 1, d_conv: int = 3, expand: float = 1,
                 reduction: int = 16) -> None:
        super().__init__()
        if input_dim % GROUPS:
            raise ValueError(f"GroupMamba splits {input_dim} channels into {GROUPS} groups: embed_dims must be "
                             f"multiples of {GROUPS}")
        self.input_dim, self.output_dim = input_dim, output_dim
        self.fc1 = nn.Linear(input_dim, input_dim // reduction)
        self.fc2 = nn.Linear(input_dim // reduction, output_dim)
        self.norm = nn.LayerNorm(input_dim)
        for g in range(GROUPS):
            setattr(self, f"mamba_g{g + 1}", SS2D(input_dim // GROUPS, d_state, expand, d_conv))
        self.proj = nn.Linear(input_dim, output_dim)
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.orders = raster_orders()
        self.last_stats: dict[str, Any] = {}

    @property
    def groups(self) -> list[SS2D]:
        return [getattr(self, f"mamba_g{g + 1}") for g in range(GROUPS)]

    @property
    def num_paths(self) -> int:
        return GROUPS

    def macs_terms(self, tokens: int) -> tuple[float, float, float]:
        """(shared, per group, paper share) MACs of one input with ``tokens`` tokens (the FLOPs counter's
        protocol): shared = CAM's fc1, fc2 (one token) + proj; per group = in_proj, 3x3 depthwise conv, x_proj,
        dt_proj, scan (9*L*E*N, + L*E each for D and the gate), out_proj. Every group is one direction on its
        own channels, so the papers count all four (share 1)."""
        c, ss = self.input_dim, self.groups[0]
        e, n, r, k = ss.d_inner, ss.d_state, ss.dt_rank, ss.conv2d.kernel_size[0]
        q = c // GROUPS
        shared = c * self.fc1.out_features + self.fc1.out_features * self.output_dim + tokens * c * self.output_dim
        group = tokens * (q * 2 * e + e * k * k + e * (r + 2 * n) + r * e + 9 * e * n + 2 * e + e * q)
        return float(shared), float(group), 1.0

    def scan(self, quarters: Sequence[Tensor], groups: Sequence[int], grid: tuple[int, int],
             where: tuple[Tensor | None, Tensor | None] = (None, None)) -> list[Tensor]:
        """The VSSS outputs (B, L, C/4) of ``groups`` on their quarters (B, L, C/4), in one group scan;
        ``where``: the tokens' (positions, sources) after merging, (None, None) for the dense grid."""
        positions, sources = where
        ss2d = [self.groups[g] for g in groups]
        parts = [ss.scan_inputs(q, grid, sources) for ss, q in zip(ss2d, quarters)]
        u, delta, Bm, Cm = (torch.stack([p[i] for p in parts], 1) for i in range(4))
        A = torch.stack([-torch.exp(ss.A_logs.float()) for ss in ss2d])
        D = torch.stack([ss.Ds.float() for ss in ss2d])
        bias = torch.stack([ss.dt_projs_bias[0].float() for ss in ss2d])
        ys = group_scan(u, delta, A, Bm, Cm, D, bias, [self.orders[g] for g in groups], grid, positions)
        return [ss.finish(ys[:, k], p[4]) for k, (ss, p) in enumerate(zip(ss2d, parts))]

    def forward(self, x: Tensor, ctx: MixerContext | None, grid: tuple[int, int]) -> Tensor:
        """x (B, L, C) tokens of ``grid`` (in raster order, or merged: ``ctx.positions`` / ``ctx.sources``) ->
        (B, L, C). ``ctx.direction_gate``: (B, 4) group gates, or a :class:`~mambatrim.contract.DirectionGate`
        of the gate feature (here the mean of the normalised tokens, the CAM's input); a gated-off group's
        quarter passes through as the normalised input, and with ``skip_gated`` its scan is not computed for
        that image."""
        bsz, length, chans = x.shape
        xn = self.norm(x)
        pooled = xn.mean(1)
        cam = torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))
        quarters = xn.chunk(GROUPS, dim=-1)
        where = (None, None) if ctx is None else (ctx.positions, ctx.sources)
        gate = None if ctx is None else ctx.direction_gate
        if gate is not None and not torch.is_tensor(gate):
            gate = gate(pooled)
        if gate is not None and gate.shape != (bsz, GROUPS):
            raise ValueError(f"GroupMamba's direction_gate must be (batch, {GROUPS}), got {tuple(gate.shape)}")
        if gate is not None and ctx is not None and ctx.skip_gated:
            mixed = [self._selected(q, g, gate[:, g] > 0.5, grid, where) for g, q in enumerate(quarters)]
        else:
            mixed = [y * self.skip_scale * q for y, q in zip(self.scan(quarters, range(GROUPS), grid, where),
                                                             quarters)]
            if gate is not None:
                mixed = [gate[:, g, None, None].to(q.dtype) * (m - q) + q
                         for g, (m, q) in enumerate(zip(mixed, quarters))]
        self.last_stats = {"tokens": length, "gate": None if gate is None else gate.detach()}
        return self.proj(self.norm(torch.cat(mixed, -1) * cam[:, None, :]))

    def _selected(self, quarter: Tensor, g: int, on: Tensor, grid: tuple[int, int],
                  where: tuple[Tensor | None, Tensor | None]) -> Tensor:
        """Group g's modulated quarter for the images with ``on`` set (its scan run on those only); the others
        keep the normalised input."""
        idx = torch.nonzero(on, as_tuple=True)[0]
        if idx.numel() == quarter.shape[0]:
            return self.scan([quarter], [g], grid, where)[0] * self.skip_scale * quarter
        if idx.numel() == 0:
            return quarter
        part = quarter[idx]
        sub = tuple(None if t is None else t[idx] for t in where)
        y = self.scan([part], [g], grid, sub)[0] * self.skip_scale * part  # type: ignore[arg-type]
        return quarter.index_copy(0, idx, y.to(quarter.dtype))


class DWConv(nn.Module):
    """Depthwise 3x3 conv of (B, L, C) tokens on their grid (``sources``: see :func:`to_grid`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, grid: tuple[int, int], sources: Tensor | None = None) -> Tensor:
        return from_grid(self.dwconv(to_grid(x, grid, sources)), sources, x.shape[1])


class FFN(nn.Module):
    """fc1 -> (depthwise 3x3 conv) -> GELU -> fc2; the conv only in the stages (PVT2FFN), not the class block."""

    def __init__(self, dim: int, hidden: int, dwconv: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, grid: tuple[int, int], sources: Tensor | None = None) -> Tensor:
        x = self.fc1(x)
        if self.dwconv is not None:
            x = self.dwconv(x, grid, sources)
        return self.fc2(self.act(x))


class Block(nn.Module):
    """``x + GML(x)`` (the GML normalises its own input), then ``x + FFN(norm2(x))``."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.norm2 = norm_layer(dim)
        self.attn = GroupMambaLayer(dim, dim)
        self.mlp = FFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: tuple[int, int], ctx: MixerContext | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(x, ctx, grid))
        return x + self.drop_path(self.mlp(self.norm2(x), grid, None if ctx is None else ctx.sources))


class ClassBlock(nn.Module):
    """The head's class block on the class token alone: ``cls + norm1(GML(cls))`` (a 1x1 grid), then
    ``cls + FFN(norm2(cls))`` without the depthwise conv."""

    def __init__(self, dim: int, mlp_ratio: float, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.norm1, self.norm2 = norm_layer(dim), norm_layer(dim)
        self.attn = GroupMambaLayer(dim, dim)
        self.mlp = FFN(dim, int(dim * mlp_ratio), dwconv=False)

    def forward(self, cls: Tensor) -> Tensor:
        cls = cls + self.norm1(self.attn(cls, None, (1, 1)))
        return cls + self.mlp(self.norm2(cls), (1, 1))


class Stem(nn.Module):
    """conv 7x7 s2 -> BN -> ReLU -> 2 x (conv 3x3 -> BN -> ReLU) -> conv 3x3 s2 (bias) -> LayerNorm."""

    def __init__(self, in_chans: int, hidden: int, out_chans: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(in_chans if i == 0 else hidden, hidden, 7 if i == 0 else 3, 2 if i == 0 else 1,
                                 3 if i == 0 else 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden, out_chans, 3, 2, 1)
        self.norm = nn.LayerNorm(out_chans)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(self.conv(x))
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class DownSamples(nn.Module):
    """conv 3x3 s2 (bias) -> LayerNorm, between stages."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, out_chans, 3, 2, 1)
        self.norm = nn.LayerNorm(out_chans)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])


class GroupMamba(nn.Module):
    """GroupMamba classifier. ``forward(images)``: ``(head, dist_head)`` logits in training with
    ``distillation``, their mean at eval (``head`` alone without ``distillation``)."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        stem_hidden_dim: int = 32,
        embed_dims: Sequence[int] = (64, 128, 348, 448),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        depths: Sequence[int] = (3, 4, 6, 3),
        num_stages: int = 4,
        distillation: bool = True,
        norm_eps: float = 1e-5,
        img_size: int = 224,
        channels: int | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        in_chans = channels if channels is not None else in_chans  # the engine's name for in_chans
        unknown = set(unused) - {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
        if unknown:
            raise TypeError(f"GroupMamba got unknown arguments {sorted(unknown)}")
        if not len(embed_dims) == len(mlp_ratios) == len(depths) == num_stages:
            raise ValueError(f"embed_dims, mlp_ratios and depths need one entry per stage ({num_stages}), got "
                             f"{len(embed_dims)}, {len(mlp_ratios)}, {len(depths)}")
        norm = norm_layer or (lambda dim: nn.LayerNorm(dim, eps=norm_eps))
        self.num_classes, self.depths, self.num_stages = num_classes, list(depths), num_stages
        self.embed_dims, self.dist, self.img_size = list(embed_dims), distillation, img_size
        self.num_features = embed_dims[-1]
        total = sum(depths)
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        cur = 0
        for i in range(num_stages):
            embed = Stem(in_chans, stem_hidden_dim, embed_dims[0]) if i == 0 else \
                DownSamples(embed_dims[i - 1], embed_dims[i])
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(embed_dims[i], mlp_ratios[i], dpr[cur + j], norm) for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", norm(embed_dims[i]))
            cur += depths[i]
        self.post_network = nn.ModuleList([ClassBlock(embed_dims[-1], mlp_ratios[-1], norm)])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if distillation:
            self.dist_head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.reducer: Reducer | None = None
        self.apply(_init_weights)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.patch_embed1.conv[0].in_channels, self.img_size, self.img_size)

    def layers(self) -> list[Block]:
        """Every stage block in order (the reducer hooks' layer index)."""
        return [blk for i in range(self.num_stages) for blk in getattr(self, f"block{i + 1}")]

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_reducer(self, reducer: Reducer | None) -> "GroupMamba":
        """Attach a reduction method (or ``None`` to restore the dense model). Returns the model."""
        self.reducer = reducer
        return self

    # ------------------------------------------------------------------ forward
    def run_stage(self, stage: int, x: Tensor, grid: tuple[int, int], first_layer: int,
                  extras: dict[str, Any]) -> Tensor:
        """The blocks of one stage on (B, L, C) tokens; with a reducer the tokens flow as a TokenState whose
        ``extras`` (the method's scratch) is shared by every stage of the forward pass."""
        blocks = getattr(self, f"block{stage + 1}")
        reducer = self.reducer
        if reducer is None:
            for blk in blocks:
                x = blk(x, grid)
            return x
        state = reducer.begin(_stage_state(x, grid, extras))
        for j, blk in enumerate(blocks):
            state = reducer.before_layer(first_layer + j, state)
            ctx = reducer.mixer_context(first_layer + j, state)
            state = state.replace(hidden=blk(state.hidden, grid, ctx))
        return reducer.finish(state).hidden

    def forward_stages(self, x: Tensor, extras: dict[str, Any] | None = None) -> list[Tensor]:
        """Each stage's output: stages 1..S-1 after their norm as (B, C, H, W), the last as (B, L, C) tokens."""
        outs, first, extras = [], 0, {} if extras is None else extras
        for i in range(self.num_stages):
            x, grid = getattr(self, f"patch_embed{i + 1}")(x)
            x = self.run_stage(i, x, grid, first, extras)
            first += self.depths[i]
            if i != self.num_stages - 1:
                x = getattr(self, f"norm{i + 1}")(x)
                x = x.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs

    def forward_tokens(self, x: Tensor) -> TokenState:
        """The final state the training engine reads: ``hidden`` (B, 1, C) the normalised class feature (mean of
        the last stage's tokens through the class block, then the last norm), ``extras`` the reducer's scratch
        of every stage."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (batch, channels, height, width), got {tuple(x.shape)}")
        extras: dict[str, Any] = {}
        cls = self.forward_stages(x, extras)[-1].mean(dim=1, keepdim=True)
        for blk in self.post_network:
            cls = blk(cls)
        return _stage_state(getattr(self, f"norm{self.num_stages}")(cls), (1, 1), extras)

    def pool(self, state: TokenState) -> Tensor:
        """(B, C) the heads' input from the final state: its one token, the class feature."""
        return state.hidden[:, 0]

    def forward_features(self, x: Tensor) -> Tensor:
        """The normalised class feature (B, C)."""
        return self.pool(self.forward_tokens(x))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if pre_logits:
            return features
        if not self.dist:
            return self.head(features)
        out, dist = self.head(features), self.dist_head(features)
        return (out, dist) if self.training else (out + dist) / 2

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return self.forward_head(self.forward_features(x))


def _stage_state(x: Tensor, grid: tuple[int, int], extras: dict[str, Any]) -> TokenState:
    """Tokens as a TokenState: raster positions on ``grid``; no protected token (the class token exists only
    after the last stage)."""
    bsz, length, _ = x.shape
    positions = torch.arange(length, device=x.device).expand(bsz, -1)
    return TokenState(hidden=x, residual=None, positions=positions,
                      protected=torch.zeros(bsz, 0, dtype=torch.long, device=x.device), grid=grid,
                      protected_layout="none", extras=extras)


@torch.no_grad()
def _init_weights(m: nn.Module) -> None:
    """The official initialisation: Linear trunc-normal 0.02 with zero bias, LayerNorm ones/zeros, Conv2d
    normal with fan-out variance (the SS2D scan parameters keep their Mamba initialisation)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.zero_()
