"""The multi-path Mamba mixer (K scan paths, each with its own parameters and :class:`ScanOrder`) and RMSNorm.

Vim's bidirectional "v2" mixer is its two-path case (:class:`BiMambaMixer`). Parameter names and shapes follow
hustvl/Vim (``mamba-1p1p1`` ``Mamba`` with ``bimamba_type='v2'``) so official checkpoints load unchanged: path 0
owns ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``; path 1 (the backward direction) ``conv1d_b``,
``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b``; further paths the suffixes ``_2``, ``_3``, ...; ``in_proj``
and ``out_proj`` are shared.

A call builds a :class:`~mambatrim.contract.MixerPlan` from its context once, then runs the first executor
that declares support for that plan: the fused Triton pair (:class:`FusedTritonPair`) or the per-path PyTorch
executor (:class:`TorchPaths`, which supports every plan). Grid orders run on :class:`TritonPaths` (one
:func:`~mambatrim.ops.scan_paths` launch reading every path's order through its index) on the 'triton' backend.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import REVERSED, SEQUENCE, MixerContext, MixerPlan, ScanOrder
from ..ops import causal_conv1d, get_backend, policy, scan_paths, selective_scan
from ..ops.cpu_kernels import add_rms_norm_cpu, compiled_applies, selective_scan_cpu
from ..ops.scan_paths import put_tokens as _put
from ..ops.scan_paths import take_tokens as _take
from ..validation import check_choice

COMBINES = ("mean", "sum", "concat")


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

    def add_and_norm(self, hidden: Tensor, residual: Tensor | None,
                     in_place: bool = False) -> tuple[Tensor, Tensor]:
        """Vim's fused add-norm: ``residual += hidden`` in fp32, then (norm(residual) in hidden's dtype, residual).

        On the 'triton' backend this is one fused kernel per call instead of ~8 elementwise ones; at fp32 CPU
        inference on the compiled kernels, one compiled pass. ``in_place`` (inference, where the caller gives
        up both inputs): the Triton kernel writes the results over them (other paths allocate as usual).
        """
        if hidden.is_cuda and get_backend("cuda") == "triton":
            from ..ops.triton_norm import add_rms_norm_triton  # noqa: PLC0415 (needs triton)

            return add_rms_norm_triton(hidden, residual, self.weight, self.eps, in_place=in_place)
        if (hidden.dtype == torch.float32 and get_backend(hidden.device.type) == "torch"
                and compiled_applies(hidden.device, torch.is_grad_enabled() and (
                    hidden.requires_grad or self.weight.requires_grad
                    or (residual is not None and residual.requires_grad)))):
            return add_rms_norm_cpu(hidden, residual, self.weight, self.eps)
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


def _path_suffix(k: int) -> str:
    """Parameter-name suffix of path k: Vim's '' and '_b', then '_2', '_3', ..."""
    return ("", "_b")[k] if k < 2 else f"_{k}"


class MultiPathMixer(nn.Module):
    """Mamba mixer running K scan paths over one ``in_proj`` output, each path with its own local conv,
    ``x_proj``, ``dt_proj``, ``A`` and ``D`` and its own :class:`ScanOrder`.

    ``combine``: 'mean' or 'sum' of the paths' gated outputs (every path sees all channels), or 'concat' (path k
    owns the k-th of K equal channel slices; GroupMamba's per-group directions).
    """

    def __init__(
        self,
        d_model: int,
        orders: Sequence[ScanOrder] = (SEQUENCE, REVERSED),
        combine: str = "mean",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        check_choice(combine, "combine", COMBINES)
        if not orders:
            raise ValueError("a mixer needs at least one scan order")
        self.orders, self.combine = tuple(orders), combine
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        if combine == "concat" and self.d_inner % len(self.orders):
            raise ValueError(f"combine='concat' splits {self.d_inner} channels into {len(self.orders)} equal "
                             "slices: they must divide evenly")
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        E, N = self.path_width, d_state
        # own parameters first, then submodules: the official registration order
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
        for k in range(len(self.orders)):
            s = _path_suffix(k)
            setattr(self, f"A{s}_log", nn.Parameter(torch.log(A.clone())))
            setattr(self, f"D{s}", nn.Parameter(torch.ones(E)))
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        for k in range(len(self.orders)):
            s = _path_suffix(k)
            setattr(self, f"conv1d{s}", nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias))
            setattr(self, f"x_proj{s}", nn.Linear(E, self.dt_rank + 2 * N, bias=False))
            setattr(self, f"dt_proj{s}", nn.Linear(self.dt_rank, E, bias=True))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self._init_dt(dt_min, dt_max, dt_init_floor)
        self.last_stats: dict[str, object] = {}

    paper_paths = 1  # scan paths the family's papers count in their FLOPs (Vim's: one direction)

    @property
    def num_paths(self) -> int:
        return len(self.orders)

    def macs_terms(self, tokens: int) -> tuple[float, float, float]:
        """(shared, per_path, paper_scale) MACs for ``tokens`` tokens of one input (the FLOPs counter's
        protocol): in_proj + out_proj; one path's conv, x_proj, dt_proj and scan; the share papers count."""
        L, d, N, R, K = tokens, self.d_model, self.d_state, self.dt_rank, self.d_conv
        E = self.path_width
        shared = L * d * 2 * self.d_inner + L * self.d_inner * d
        per_path = (L + K - 1) * E * K + L * E * (R + 2 * N) + L * R * E + 9 * L * E * N + 2 * L * E
        return float(shared), float(per_path), self.paper_paths / self.num_paths

    @property
    def path_width(self) -> int:
        """Channels each path scans."""
        return self.d_inner // self.num_paths if self.combine == "concat" else self.d_inner

    def path_params(self, k: int) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, nn.Parameter, nn.Parameter]:
        """(conv1d, x_proj, dt_proj, A_log, D) of path k."""
        s = _path_suffix(k)
        return (getattr(self, f"conv1d{s}"), getattr(self, f"x_proj{s}"), getattr(self, f"dt_proj{s}"),
                getattr(self, f"A{s}_log"), getattr(self, f"D{s}"))

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float, floor: float) -> None:
        """Path 0's dt_proj: uniform weight, inverse-softplus bias of dt ~ logU(dt_min, dt_max) (as upstream,
        which leaves the other paths' dt_proj at nn.Linear's initialisation)."""
        dt_proj = self.dt_proj
        std = self.dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.path_width) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ forward
    def forward(self, hidden: Tensor, ctx: MixerContext | None = None) -> Tensor:
        """hidden (B, L, d_model) -> (B, L, d_model)."""
        plan = MixerPlan.build(ctx, self.orders, hidden.shape[0], hidden.device)
        executor = next(e for e in EXECUTORS if e.supports(self, hidden, plan))
        return executor.run(self, hidden, plan)

    def run_path(self, k: int, x: Tensor, z: Tensor, plan: MixerPlan, mask: Tensor | None) -> Tensor:
        """Path k in sequence order: (visit order) conv -> x_proj -> dt_proj -> scan -> D skip -> gate by z.
        x, z (B, E, L) in sequence order (this path's channels); mask (B, 1, L) or None."""
        path = plan.paths[k]
        _, _, dt_proj, A_log, D = self.path_params(k)
        if path.index is not None:
            z = _take(z, path.index)
            mask = None if mask is None else _take(mask, path.index)
        u, delta, Bm, Cm = self.path_inputs(k, x, plan, mask)
        y = selective_scan(u, delta, -torch.exp(A_log.float()), Bm, Cm, D.float(), z,
                           delta_bias=dt_proj.bias.float(), delta_softplus=True, reverse=path.reverse, gap=path.gap)
        return y if path.index is None else _put(y, path.index)

    def path_inputs(self, k: int, x: Tensor, plan: MixerPlan, mask: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Path k's scan inputs in its visiting order: u (conv output), delta (without its bias), B, C
        ((B, E, L), (B, E, L), (B, N, L), (B, N, L)). x (B, E, L) in sequence order; mask (B, 1, L) in visiting
        order or None."""
        u, dt, Bm, Cm = self.path_projections(k, x, plan, mask)
        delta = F.linear(dt.transpose(1, 2), self.path_params(k)[2].weight).transpose(1, 2)
        return u, delta, Bm, Cm

    def path_projections(self, k: int, x: Tensor, plan: MixerPlan, mask: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`path_inputs` before dt_proj: u, dt_proj's low-rank input (B, R, L), B, C."""
        path = plan.paths[k]
        conv, x_proj, _, _, _ = self.path_params(k)
        if path.index is not None:
            x = _take(x, path.index)
        if mask is not None:
            x = x * mask
        if path.positions is not None:
            u = _conv_at_positions(x, conv.weight, conv.bias, path.positions, reverse=path.reverse,
                                   full_length=plan.full_length)
        else:
            u = causal_conv1d(x, conv.weight, conv.bias, activation="silu", reverse=path.reverse)
        if mask is not None:
            u = u * mask
        x_dbl = F.linear(u.transpose(1, 2), x_proj.weight)  # (B, L, R + 2N)
        dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return u, dt.transpose(1, 2), Bm.transpose(1, 2), Cm.transpose(1, 2)

    def combine_paths(self, outs: list[Tensor]) -> Tensor:
        if self.combine == "concat":
            return torch.cat(outs, 1)
        y = outs[0]
        for out in outs[1:]:
            y = y + out
        return y / len(outs) if self.combine == "mean" else y

    def project_out(self, y: Tensor, plan: MixerPlan) -> Tensor:
        """The combined SSM output (B, L, d_inner) -> out_proj, after the context's tap (if any) saw it."""
        if plan.tap is not None:
            plan.tap(y)
        return self.out_proj(y)


class TorchPaths:
    """Executor: every path in PyTorch ops on the selected scan backend. Supports every plan: token masks,
    soft or skipped gates, alignment, grid orders, training."""

    @staticmethod
    def supports(mixer: MultiPathMixer, hidden: Tensor, plan: MixerPlan) -> bool:
        return True

    @staticmethod
    def run(mixer: MultiPathMixer, hidden: Tensor, plan: MixerPlan) -> Tensor:
        bsz, length, _ = hidden.shape
        xz = mixer.in_proj(hidden)  # (B, L, 2E)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
        mask = None if plan.mask is None else plan.mask[:, None, :].to(x.dtype)
        gate = plan.gate
        if plan.callable_gate:
            gate = gate(plan.gate_feature(xz))
        width = mixer.path_width
        outs = []
        for k in range(mixer.num_paths):
            xk, zk = (x[:, k * width:(k + 1) * width], z[:, k * width:(k + 1) * width]) \
                if mixer.combine == "concat" else (x, z)
            if gate is None:
                outs.append(mixer.run_path(k, xk, zk, plan, mask))
            elif plan.skip_gated:
                outs.append(TorchPaths._selected(mixer, k, xk, zk, plan, mask, gate[:, k]))
            else:
                outs.append(mixer.run_path(k, xk, zk, plan, mask) * gate[:, k, None, None].to(x.dtype))
        mixer.last_stats = {"tokens": length, "gate": None if gate is None else gate.detach()}
        return mixer.project_out(mixer.combine_paths(outs).transpose(1, 2), plan)

    @staticmethod
    def _selected(mixer: MultiPathMixer, k: int, x: Tensor, z: Tensor, plan: MixerPlan, mask: Tensor | None,
                  on: Tensor) -> Tensor:
        """Path k only for the samples with ``on`` set; the others get zeros (no wasted work)."""
        idx = torch.nonzero(on > 0.5, as_tuple=True)[0]
        if idx.numel() == x.shape[0]:
            return mixer.run_path(k, x, z, plan, mask)
        out = x.new_zeros(x.shape)
        if idx.numel() == 0:
            return out
        y = mixer.run_path(k, x[idx], z[idx], plan.select(idx), None if mask is None else mask[idx])
        return out.index_copy(0, idx, y.to(out.dtype))


class FusedTritonPair:
    """Executor: Vim's two sequence paths as fused Triton kernels (one conv launch, batched projections, one
    scan launch for both directions), in token-major layout. Declares support for: the 'triton' backend with the
    policy's ``fused_mixer`` on; the forward + backward sequence pair, averaged or summed; no token mask; gates
    only skipped at inference (per-sample, inside the kernels); alignment at inference (its position-mapped conv
    has no backward)."""

    @staticmethod
    def supports(mixer: MultiPathMixer, hidden: Tensor, plan: MixerPlan) -> bool:
        return (plan.sequence_pair and mixer.combine in ("mean", "sum") and plan.mask is None
                and (plan.gate is None or (plan.skip_gated and not plan.grad))
                and (plan.align is None or not plan.grad)
                and policy.get("fused_mixer") and get_backend(hidden.device.type) == "triton")

    @staticmethod
    def run(mixer: MultiPathMixer, hidden: Tensor, plan: MixerPlan) -> Tensor:
        from ..ops.triton_vim import bimamba_forward_triton  # noqa: PLC0415 (needs triton)

        gate, selector, cls_index = plan.gate, plan.linear_gate, None
        if plan.callable_gate:
            if selector is not None and plan.protected.shape[1] == 1:  # row, product, threshold in one kernel
                gate, cls_index = None, plan.protected[:, 0]
            else:  # the gate feature in PyTorch (several or no protected tokens), then the gate
                gate, selector = functools.partial(_gate_of_rows, plan), None
        gap = None
        if plan.align == "decay":
            gap = torch.stack([plan.paths[0].gap, plan.paths[1].gap])
        return bimamba_forward_triton(
            mixer, hidden, gate, cls_index, selector=selector,
            positions=plan.paths[0].positions, full_length=plan.full_length, gap=gap, tap=plan.tap)


def _gate_of_rows(plan: MixerPlan, xz: Tensor) -> Tensor:
    """The plan's callable gate on its feature of the in_proj output ``xz`` (B, L, C)."""
    return plan.gate(plan.gate_feature(xz))


class TritonPaths:
    """Executor: grid-order paths (PlainMamba's zig-zags, GroupMamba's per-group directions) in one
    :func:`~mambatrim.ops.scan_paths` launch on the 'triton' backend, training and inference. Each path's conv
    runs on its input gathered into visiting order (the one gather left; aligned plans use the position-mapped
    conv); the scan reads the gate z through the path's index and writes every output straight to its token,
    summing the paths (mean / sum) or filling each path's channel slice (concat): no scatter back and no
    separate combine. Declares support for: every path a grid order, no token mask, gates as per-sample path
    weights (no gradient through them)."""

    @staticmethod
    def supports(mixer: MultiPathMixer, hidden: Tensor, plan: MixerPlan) -> bool:
        gate_ok = plan.gate is None or not (plan.grad and (plan.callable_gate or plan.gate.requires_grad))
        return (all(p.index is not None for p in plan.paths) and plan.mask is None and gate_ok
                and get_backend(hidden.device.type) == "triton")

    @staticmethod
    def run(mixer: MultiPathMixer, hidden: Tensor, plan: MixerPlan) -> Tensor:
        length = hidden.shape[1]
        xz = mixer.in_proj(hidden)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
        gate = plan.gate
        if plan.callable_gate:
            gate = gate(plan.gate_feature(xz))
        width, concat = mixer.path_width, mixer.combine == "concat"
        ins = [mixer.path_inputs(k, x[:, k * width:(k + 1) * width] if concat else x, plan)
               for k in range(mixer.num_paths)]
        u, delta, Bm, Cm = (torch.stack(parts) for parts in zip(*ins))
        A, D, bias = (torch.stack(parts) for parts in zip(*(
            (-torch.exp(A_log.float()), Dk.float(), dt_proj.bias.float())
            for _, _, dt_proj, A_log, Dk in map(mixer.path_params, range(mixer.num_paths)))))
        gap = None if plan.paths[0].gap is None else torch.stack([p.gap for p in plan.paths])
        y = scan_paths(u, delta, A, Bm, Cm, torch.stack([p.index for p in plan.paths]), D=D, z=z, delta_bias=bias,
                       delta_softplus=True, u_at="step", bc_at="step", gap=gap, weight=gate,
                       combine="concat" if concat else "sum", scale=1 / mixer.num_paths if mixer.combine == "mean"
                       else 1.0, backend="triton")
        mixer.last_stats = {"tokens": length, "gate": None if gate is None else gate.detach()}
        return mixer.project_out(y.transpose(1, 2), plan)


class CompiledCpuPaths:
    """Executor: sequence-order paths (Vim's pair, MambaReg's, VideoMamba's) at CPU inference on the compiled
    kernels of :mod:`mambatrim.ops.cpu_kernels`: per path the compiled conv (the position-mapped one under
    alignment), x_proj, then one scan pass that forms delta from dt_proj's low-rank input in registers and adds
    its output, times the path's per-sample gate, into the paths' shared buffer (no (B, E, L) delta, no thin
    dt_proj matmul, no separate gating or combine: each of those was a pass over (B, E, L) memory and a fresh
    allocation per layer; a sample gated 0 is not scanned). Declares support for: the policy's ``fused_mixer``
    on, the 'torch' backend on a CPU with the compiled kernels available and chosen (``cpu_kernels``), no
    autograd, every path a sequence order, no token mask, paths averaged or summed."""

    @staticmethod
    def supports(mixer: MultiPathMixer, hidden: Tensor, plan: MixerPlan) -> bool:
        return (mixer.combine in ("mean", "sum") and plan.mask is None and all(p.index is None for p in plan.paths)
                and policy.get("fused_mixer") and get_backend(hidden.device.type) == "torch"
                and compiled_applies(hidden.device, plan.grad))

    @staticmethod
    def run(mixer: MultiPathMixer, hidden: Tensor, plan: MixerPlan) -> Tensor:
        xz = mixer.in_proj(hidden)  # (B, L, 2E)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each, token-major memory
        gate = plan.gate(plan.gate_feature(xz)) if plan.callable_gate else plan.gate
        # skipping reads a gate as on (> 0.5) or off, as TorchPaths does; otherwise it multiplies the output
        weight = None if gate is None else (gate > 0.5).float() if plan.skip_gated else gate.float()
        scale = 1 / mixer.num_paths if mixer.combine == "mean" else 1.0
        y = None
        for k, path in enumerate(plan.paths):
            u, dt, Bm, Cm = mixer.path_projections(k, x, plan)
            _, _, dt_proj, A_log, D = mixer.path_params(k)
            y = selective_scan_cpu(u, dt, -torch.exp(A_log.float()), Bm, Cm, D.float(), z,
                                   delta_bias=dt_proj.bias.float(), delta_softplus=True, reverse=path.reverse,
                                   gap=path.gap, dt_weight=dt_proj.weight, scale=scale, add_to=y,
                                   weight=None if weight is None else weight[:, k], out_dtype=torch.float32)
        mixer.last_stats = {"tokens": hidden.shape[1], "gate": None if gate is None else gate.detach()}
        return mixer.project_out(y.transpose(1, 2).to(hidden.dtype), plan)


EXECUTORS = (FusedTritonPair, TritonPaths, CompiledCpuPaths, TorchPaths)  # the first that supports a plan runs it


class BiMambaMixer(MultiPathMixer):
    """Vim's bidirectional v2 mixer: the sequence forwards and backwards, ``(y_f + y_b) / 2`` (``divide_out``)
    or their sum."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 divide_out: bool = True) -> None:
        super().__init__(d_model, (SEQUENCE, REVERSED), "mean" if divide_out else "sum", d_state=d_state,
                         d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min, dt_max=dt_max,
                         dt_init_floor=dt_init_floor, conv_bias=conv_bias, bias=bias)
