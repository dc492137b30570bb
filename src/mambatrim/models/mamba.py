"""Vim's bidirectional "v2" Mamba mixer and RMSNorm, in pure PyTorch with a pluggable scan backend.

Parameter names and shapes follow hustvl/Vim (``mamba-1p1p1`` ``Mamba`` with ``bimamba_type='v2'``) so official
checkpoints load unchanged: the backward direction has its own ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``,
``A_b_log`` and ``D_b``; ``in_proj`` and ``out_proj`` are shared.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import causal_conv1d, get_backend, selective_scan
from ..reduce.core import LinearDirectionGate, MixerContext, scan_gap_pair, scan_gaps


class RMSNorm(nn.Module):
    """RMSNorm without bias, computed in fp32, output in the input dtype (Mamba's ``RMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)

    def add_and_norm(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """Vim's fused add-norm: ``residual += hidden`` in fp32, then (norm(residual) in hidden's dtype, residual).

        On the 'triton' backend this is one fused kernel per call instead of ~8 elementwise ones.
        """
        if hidden.is_cuda and get_backend("cuda") == "triton":
            from ..ops.triton_norm import add_rms_norm_triton  # noqa: PLC0415 (needs triton)

            return add_rms_norm_triton(hidden, residual, self.weight, self.eps)
        residual = hidden.float() if residual is None else residual + hidden.float()
        return self(residual).to(hidden.dtype), residual


def _conv_at_positions(x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor, reverse: bool,
                       full_length: int | None = None) -> Tensor:
    """Local conv where each kept token sees its original neighbourhood (pruned slots read as zeros).

    ``full_length``: the dense length the positions index into; ``None`` reads ``positions.max() + 1`` back
    from the device (a host sync). Either gives the same result: the extra slots are zeros."""
    if x.is_meta:  # shape-only runs (FLOPs counting): the output shape does not depend on the positions
        return causal_conv1d(x, weight, bias, activation="silu", reverse=reverse)
    bsz, dim, _ = x.shape
    full = int(positions.max()) + 1 if full_length is None else full_length
    index = positions[:, None, :].expand(-1, dim, -1)
    buf = x.new_zeros(bsz, dim, full).scatter(2, index, x)
    out = causal_conv1d(buf, weight, bias, activation="silu", reverse=reverse)
    return out.gather(2, index)


def _alignment(ctx: MixerContext | None) -> str | None:
    """The hidden-state alignment the context asks for ('hold' / 'decay'), None without positions."""
    return ctx.align if ctx is not None and ctx.positions is not None else None


def _fused_triton_applies(hidden: Tensor, ctx: MixerContext | None) -> bool:
    """The fused Triton mixer covers, on the 'triton' backend, the case without token mask or direction gate;
    with alignment only at inference (its position-mapped conv has no backward: fine-tuning runs the
    per-direction path)."""
    if ctx is not None and (ctx.token_mask is not None or ctx.direction_gate is not None):
        return False
    if _alignment(ctx) is not None and torch.is_grad_enabled():
        return False
    return get_backend(hidden.device.type) == "triton"


def _fused_alignment(ctx: MixerContext | None) -> dict[str, object]:
    """Keyword arguments of :func:`bimamba_forward_triton` for the context's alignment: the position map
    (both modes) and, for 'decay', the gaps of both scan directions (direction 0 forward, 1 backward)."""
    align = _alignment(ctx)
    if align is None:
        return {}
    return dict(positions=ctx.positions, full_length=ctx.full_length, gap=_decay_gaps(ctx))


def _decay_gaps(ctx: MixerContext) -> Tensor | None:
    """(2, B, L) gaps of both scan directions for 'decay' (None otherwise): the context's precomputed ones (a
    method computes them once per pruning event) or, without them, derived from the positions here."""
    if ctx.align != "decay":
        return None
    return ctx.gaps if ctx.gaps is not None else scan_gap_pair(ctx.positions, ctx.cls_index)


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer (Vim v2): shared in_proj/out_proj, one conv/x_proj/dt_proj/A/D per direction."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        divide_out: bool = True,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.divide_out = divide_out
        E, N = self.d_inner, d_state
        # own parameters first, then submodules: the official registration order
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(E))
        self.A_b_log = nn.Parameter(torch.log(A.clone()))
        self.D_b = nn.Parameter(torch.ones(E))
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)
        self.conv1d_b = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj_b = nn.Linear(E, self.dt_rank + 2 * N, bias=False)
        self.dt_proj_b = nn.Linear(self.dt_rank, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=bias)
        self._init_dt(dt_min, dt_max, dt_init_floor)
        self.last_stats: dict[str, object] = {}

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        """Forward dt_proj: uniform weight, inverse-softplus bias of dt ~ logU(dt_min, dt_max) (as upstream)."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

    def _direction(self, x: Tensor, z: Tensor, backward: bool, ctx: MixerContext | None,
                   mask: Tensor | None) -> Tensor:
        """One scan direction in original token order: conv -> x_proj -> dt_proj -> scan -> D skip -> gate."""
        conv, x_proj, dt_proj = (self.conv1d_b, self.x_proj_b, self.dt_proj_b) if backward else (
            self.conv1d, self.x_proj, self.dt_proj)
        A = -torch.exp((self.A_b_log if backward else self.A_log).float())
        D = (self.D_b if backward else self.D).float()
        if mask is not None:
            x = x * mask
        align = _alignment(ctx)
        if align is not None:
            u = _conv_at_positions(x, conv.weight, conv.bias, ctx.positions, reverse=backward,
                                   full_length=ctx.full_length)
        else:
            u = causal_conv1d(x, conv.weight, conv.bias, activation="silu", reverse=backward)
        if mask is not None:
            u = u * mask
        x_dbl = F.linear(u.transpose(1, 2), x_proj.weight)  # (B, L, R + 2N)
        dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # (B, E, L), bias added inside the scan
        gap = None
        if align == "decay":  # this direction's gaps only
            gap = ctx.gaps[int(backward)] if ctx.gaps is not None else scan_gaps(ctx.positions, backward, ctx.cls_index)
        return selective_scan(u, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), D, z,
                              delta_bias=dt_proj.bias.float(), delta_softplus=True, reverse=backward, gap=gap)

    def forward(self, hidden: Tensor, ctx: MixerContext | None = None) -> Tensor:
        """hidden (B, L, d_model) -> (B, L, d_model)."""
        if _fused_triton_applies(hidden, ctx):
            from ..ops.triton_vim import bimamba_forward_triton  # noqa: PLC0415 (needs triton)

            # aligned pruning at inference too: the position map inside the conv kernel, gaps in the scan
            return bimamba_forward_triton(self, hidden, **_fused_alignment(ctx))
        if (ctx is not None and ctx.skip_gated and ctx.direction_gate is not None and not torch.is_grad_enabled()
                and _fused_triton_applies(hidden, replace(ctx, direction_gate=None))):
            from ..ops.triton_vim import bimamba_forward_triton  # noqa: PLC0415 (needs triton)

            # per-sample direction skipping inside the fused kernels: no host sync, no sub-batches
            gate, selector = ctx.direction_gate, None
            if isinstance(gate, LinearDirectionGate):  # gather, product and threshold in one kernel
                gate, selector = None, (gate.weight, gate.bias)
            return bimamba_forward_triton(self, hidden, gate, ctx.cls_index, selector=selector,
                                          **_fused_alignment(ctx))
        bsz, length, _ = hidden.shape
        xz = self.in_proj(hidden)  # (B, L, 2E)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
        mask = None
        if ctx is not None and ctx.token_mask is not None:
            mask = ctx.token_mask[:, None, :].to(x.dtype)
        gate = None if ctx is None else ctx.direction_gate
        if callable(gate):
            if ctx.cls_index is None:
                raise ValueError("a direction selector needs MixerContext.cls_index")
            gate = gate(xz[torch.arange(bsz, device=xz.device), ctx.cls_index])
        outs = []
        for d, backward in enumerate((False, True)):
            if gate is None:
                outs.append(self._direction(x, z, backward, ctx, mask))
            elif ctx.skip_gated:
                outs.append(self._selected(x, z, backward, ctx, mask, gate[:, d]))
            else:
                outs.append(self._direction(x, z, backward, ctx, mask) * gate[:, d, None, None].to(x.dtype))
        self.last_stats = {"tokens": length, "gate": None if gate is None else gate.detach()}
        y = outs[0] + outs[1]
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))

    def _selected(self, x: Tensor, z: Tensor, backward: bool, ctx: MixerContext, mask: Tensor | None,
                  on: Tensor) -> Tensor:
        """Run one direction only for the samples with ``on`` set; the others get zeros (no wasted work)."""
        idx = torch.nonzero(on > 0.5, as_tuple=True)[0]
        if idx.numel() == x.shape[0]:
            return self._direction(x, z, backward, ctx, mask)
        out = x.new_zeros(x.shape)
        if idx.numel() == 0:
            return out
        sub = MixerContext(positions=None if ctx.positions is None else ctx.positions[idx], align=ctx.align,
                           cls_index=None if ctx.cls_index is None else ctx.cls_index[idx],
                           full_length=ctx.full_length)
        y = self._direction(x[idx], z[idx], backward, sub, None if mask is None else mask[idx])
        return out.index_copy(0, idx, y.to(out.dtype))
