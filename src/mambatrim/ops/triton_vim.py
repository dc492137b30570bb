"""Fused bidirectional Vim mixer (bimamba v2) on Triton kernels, in token-major layout end to end.

One layer runs: in_proj -> **one** conv kernel for both directions (causal with ``conv1d``, anti-causal with
``conv1d_b``, + SiLU, sharing the loads of x) -> x_proj and dt_proj of both directions as two batched matmuls ->
**one** scan launch for both directions (the backward one reads right to left and both write, summed and scaled,
into one token-major output) -> out_proj. No ``flip``, no transpose copies: every kernel reads the (B, L, channels)
activations the Linear layers produce.

Pruned sequences with hidden-state alignment (ToP, inference): the conv kernel takes a position map, so each
kept token sees its original neighbourhood without a full-length buffer, and the scan takes the pruned-position
gaps of both directions.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from . import policy
from .intmath import cdiv, next_power_of_2
from .triton_scan import selective_scan_pair_triton

__all__ = ["conv_pair_triton", "bimamba_forward_triton", "class_token_gate_triton"]

# launch settings: policy's conv_* settings (forward: best of an H100 sweep, 92 us at Vim-S b128; backward: one
# warp per (channel block, sequence segment, sample))


@triton.jit
def _conv_pair_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, on_ptr, pos_ptr, inv_ptr, L, E, FULL,
    sx_b, sx_t, sx_d,
    so_g, so_b, so_t,
    sp_b, sp_t, si_b,
    K: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ON: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """Both directions' conv + SiLU for one (channel block, block of BL tokens, sample).

    ``HAS_MAP`` (aligned pruning, inference): token t sits at original position p = pos[b, t] of a dense
    sequence of ``FULL`` tokens and sees the tokens at original positions p + o, read through the inverse map
    inv[b, p + o] (compact index, -1 where pruned: zeros, as in the dense sequence with pruned slots zeroed)."""
    pid_e = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_b = tl.program_id(2)
    t = pid_l * BL + tl.arange(0, BL)
    e = pid_e * BE + tl.arange(0, BE)
    emask = e < E
    acc_f = tl.zeros((BL, BE), dtype=tl.float32)
    acc_b = tl.zeros((BL, BE), dtype=tl.float32)
    base = x_ptr + pid_b * sx_b + e[None, :] * sx_d
    if HAS_MAP:
        p = tl.load(pos_ptr + pid_b * sp_b + t * sp_t, mask=t < L, other=0).to(tl.int32)
    # x[t + o] for o in -(K-1)..(K-1), each tile loaded once and used by both directions
    for i in tl.static_range(2 * K - 1):
        o = i - (K - 1)
        if HAS_MAP:  # the neighbour at original position p + o, if it was kept
            q = p + o
            tt = tl.load(inv_ptr + pid_b * si_b + q, mask=(t < L) & (q >= 0) & (q < FULL), other=-1)
            row_ok = tt >= 0
        else:
            tt = t + o
            row_ok = (tt >= 0) & (tt < L)
        xm = row_ok[:, None] & emask[None, :]
        xv = tl.load(base + tt[:, None] * sx_t, mask=xm, other=0.0).to(tl.float32)
        if o <= 0:  # causal: out[t] = sum_k w[k] x[t - (K-1) + k]
            wf = tl.load(w_ptr + e * K + (o + K - 1), mask=emask, other=0.0).to(tl.float32)
            acc_f += xv * wf[None, :]
        if o >= 0:  # anti-causal: out[t] = sum_k w_b[k] x[t + (K-1) - k]
            wb = tl.load(w_ptr + E * K + e * K + (K - 1 - o), mask=emask, other=0.0).to(tl.float32)
            acc_b += xv * wb[None, :]
    if HAS_BIAS:
        acc_f += tl.load(b_ptr + e, mask=emask, other=0.0).to(tl.float32)[None, :]
        acc_b += tl.load(b_ptr + E + e, mask=emask, other=0.0).to(tl.float32)[None, :]
    acc_f = acc_f / (1.0 + tl.exp2(-acc_f * 1.4426950408889634))
    acc_b = acc_b / (1.0 + tl.exp2(-acc_b * 1.4426950408889634))
    om = (t < L)[:, None] & emask[None, :]
    om_f = om
    om_b = om
    if HAS_ON:  # a direction switched off for this sample is not written (its scan never reads it)
        om_f = om & (tl.load(on_ptr + pid_b * 2) != 0)
        om_b = om & (tl.load(on_ptr + pid_b * 2 + 1) != 0)
    optr = out_ptr + pid_b * so_b + t[:, None] * so_t + e[None, :]
    tl.store(optr, acc_f.to(out_ptr.dtype.element_ty), mask=om_f)
    tl.store(optr + so_g, acc_b.to(out_ptr.dtype.element_ty), mask=om_b)


@triton.jit
def _silu_grad(g, a):
    """g * d silu(a) / da."""
    sig = 1.0 / (1.0 + tl.exp2(-a * 1.4426950408889634))
    return g * sig * (1.0 + a * (1.0 - sig))


@triton.jit
def _conv_pair_bwd_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, dx_ptr, dw_ptr, L, E, SEG,
    sx_b, sx_t, sx_d,
    sg_g, sg_b, sg_t,
    sdx_b, sdx_t,
    BE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Backward of the 4-tap pair conv + SiLU for one (channel block, segment of ``SEG`` positions, sample).

    One walk along the sequence with a sliding window in registers: at position p it holds x[p-3..p+3], the
    causal pre-activation gradient ga_f[p-3..p] and the anti-causal ga_b[p-6..p]; so every input row is read
    once, the pre-activations are recomputed (never stored), dx[p-3] is emitted (x[t] fed the causal output at
    t..t+3 and the anti-causal one at t-3..t), and the weight / bias sums of the segment's positions add up in
    registers, written once to this program's slot of ``dw`` (rows: causal taps 0..3, causal bias, anti-causal
    taps 0..3, anti-causal bias), summed over programs on the host."""
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    e = pid_e * BE + tl.arange(0, BE)
    em = e < E
    s0 = pid_s * SEG
    s1 = tl.minimum(s0 + SEG, L)
    xb = x_ptr + pid_b * sx_b + e * sx_d
    gf_b = g_ptr + pid_b * sg_b + e
    gb_b = gf_b + sg_g
    wf0 = tl.load(w_ptr + e * 4, mask=em, other=0.0)
    wf1 = tl.load(w_ptr + e * 4 + 1, mask=em, other=0.0)
    wf2 = tl.load(w_ptr + e * 4 + 2, mask=em, other=0.0)
    wf3 = tl.load(w_ptr + e * 4 + 3, mask=em, other=0.0)
    wb0 = tl.load(w_ptr + E * 4 + e * 4, mask=em, other=0.0)
    wb1 = tl.load(w_ptr + E * 4 + e * 4 + 1, mask=em, other=0.0)
    wb2 = tl.load(w_ptr + E * 4 + e * 4 + 2, mask=em, other=0.0)
    wb3 = tl.load(w_ptr + E * 4 + e * 4 + 3, mask=em, other=0.0)
    bf = tl.zeros((BE,), dtype=tl.float32)
    bb = tl.zeros((BE,), dtype=tl.float32)
    if HAS_BIAS:
        bf = tl.load(b_ptr + e, mask=em, other=0.0)
        bb = tl.load(b_ptr + E + e, mask=em, other=0.0)
    zero = tl.zeros((BE,), dtype=tl.float32)
    # x[p-3..p+3] for the first p = s0 - 3
    xm3 = _row(xb, s0 - 6, sx_t, L, em)
    xm2 = _row(xb, s0 - 5, sx_t, L, em)
    xm1 = _row(xb, s0 - 4, sx_t, L, em)
    x0 = _row(xb, s0 - 3, sx_t, L, em)
    xp1 = _row(xb, s0 - 2, sx_t, L, em)
    xp2 = _row(xb, s0 - 1, sx_t, L, em)
    xp3 = _row(xb, s0, sx_t, L, em)
    gf = _row(gf_b, s0 - 3, sg_t, L, em)
    gb = _row(gb_b, s0 - 3, sg_t, L, em)
    # ga_f[p-1..p-3] and ga_b[p-1..p-6]: each its own zeros (the compiler decides what a loop carries by
    # comparing values after one pass; windows all starting as the same tensor would look unchanged)
    f1, f2, f3 = _zeros(BE), _zeros(BE), _zeros(BE)
    b1, b2, b3, b4, b5, b6 = _zeros(BE), _zeros(BE), _zeros(BE), _zeros(BE), _zeros(BE), _zeros(BE)
    af0, af1, af2, af3, afb = zero, zero, zero, zero, zero
    ab0, ab1, ab2, ab3, abb = zero, zero, zero, zero, zero
    for p in range(s0 - 3, s1 + 3):
        x_next = _row(xb, p + 4, sx_t, L, em)  # issued a step ahead of their use
        gf_next = _row(gf_b, p + 1, sg_t, L, em)
        gb_next = _row(gb_b, p + 1, sg_t, L, em)
        ga_f = _silu_grad(gf, wf0 * xm3 + wf1 * xm2 + wf2 * xm1 + wf3 * x0 + bf)
        ga_b = _silu_grad(gb, wb0 * xp3 + wb1 * xp2 + wb2 * xp1 + wb3 * x0 + bb)
        own = ((p >= s0) & (p < s1)).to(tl.float32)  # this segment's positions count in the weight sums
        of = ga_f * own
        ob = ga_b * own
        af0 += of * xm3
        af1 += of * xm2
        af2 += of * xm1
        af3 += of * x0
        afb += of
        ab0 += ob * xp3
        ab1 += ob * xp2
        ab2 += ob * xp1
        ab3 += ob * x0
        abb += ob
        q = p - 3
        dx = wf0 * ga_f + wf1 * f1 + wf2 * f2 + wf3 * f3 + wb0 * b6 + wb1 * b5 + wb2 * b4 + wb3 * b3
        tl.store(dx_ptr + pid_b * sdx_b + q * sdx_t + e, dx.to(dx_ptr.dtype.element_ty),
                 mask=em & (q >= s0) & (q < s1))
        f3, f2, f1 = f2, f1, ga_f
        b6, b5, b4, b3, b2, b1 = b5, b4, b3, b2, b1, ga_b
        xm3, xm2, xm1, x0, xp1, xp2, xp3 = xm2, xm1, x0, xp1, xp2, xp3, x_next
        gf, gb = gf_next, gb_next
    slot = dw_ptr + ((pid_b * tl.num_programs(1) + pid_s) * 10) * E + e
    tl.store(slot, af0, mask=em)
    tl.store(slot + E, af1, mask=em)
    tl.store(slot + 2 * E, af2, mask=em)
    tl.store(slot + 3 * E, af3, mask=em)
    tl.store(slot + 4 * E, afb, mask=em)
    tl.store(slot + 5 * E, ab0, mask=em)
    tl.store(slot + 6 * E, ab1, mask=em)
    tl.store(slot + 7 * E, ab2, mask=em)
    tl.store(slot + 8 * E, ab3, mask=em)
    tl.store(slot + 9 * E, abb, mask=em)


@triton.jit
def _zeros(BE: tl.constexpr):
    return tl.zeros((BE,), dtype=tl.float32)


@triton.jit
def _row(base, p, stride, L, em):
    """Row ``p`` of a (L, channels) slice as fp32; zeros outside [0, L)."""
    return tl.load(base + p * stride, mask=em & (p >= 0) & (p < L), other=0.0).to(tl.float32)


def _conv_pair_backward(x: Tensor, weight: Tensor, bias: Tensor | None, grad: Tensor) -> tuple[Tensor, ...]:
    """(dx, dweight, dbias) of :func:`conv_pair_triton` for upstream ``grad`` (2, b, L, d) in one launch.
    Kernels of up to 4 taps (Vim's is 4); shorter ones run as 4 taps with leading zeros."""
    bsz, L, E = x.shape
    K = weight.shape[-1]
    if K > 4:
        raise ValueError(f"conv_pair_triton's backward handles kernels of up to 4 taps, got {K}")
    w4 = torch.nn.functional.pad(weight.float(), (4 - K, 0)).contiguous()
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    seg = cdiv(L, policy.get("conv_bwd_segments"))
    block_e = policy.get("conv_bwd_block_e")
    segments = cdiv(L, seg)
    dx = torch.empty(bsz, L, E, device=x.device, dtype=x.dtype)
    dw = torch.empty(bsz, segments, 2, 5, E, device=x.device, dtype=torch.float32)
    _conv_pair_bwd_kernel[(cdiv(E, block_e), segments, bsz)](
        x, w4, bias.float().contiguous() if bias is not None else w4, grad, dx, dw, L, E, seg,
        x.stride(0), x.stride(1), x.stride(2), grad.stride(0), grad.stride(1), grad.stride(2),
        dx.stride(0), dx.stride(1), BE=block_e, HAS_BIAS=bias is not None,
        num_warps=policy.get("conv_bwd_warps"),
    )
    sums = dw.sum((0, 1))  # (2, 5, E): 4 taps, then the bias
    dweight = sums[:, 4 - K:4].transpose(1, 2).to(weight.dtype)
    dbias = None if bias is None else sums[:, 4].to(bias.dtype)
    return dx, dweight, dbias


def _inverse_positions(positions: Tensor, full_length: int) -> Tensor:
    """(b, full_length) int32: the compact index of the token at each original position, -1 where pruned.
    One scatter on the device (no host sync); ``positions`` (b, L) must be distinct and < full_length per row."""
    bsz, length = positions.shape
    inv = torch.full((bsz, full_length), -1, dtype=torch.int32, device=positions.device)
    compact = torch.arange(length, dtype=torch.int32, device=positions.device).expand(bsz, length)
    return inv.scatter_(1, positions.long(), compact)


def _conv_pair_launch(x: Tensor, weight: Tensor, bias: Tensor | None, on: Tensor | None = None,
                      positions: Tensor | None = None, inverse: Tensor | None = None) -> Tensor:
    bsz, L, E = x.shape
    K = weight.shape[-1]
    out = torch.empty(2, bsz, L, E, device=x.device, dtype=x.dtype)
    BL, BE = policy.get("conv_block_l"), policy.get("conv_block_e")
    grid = (cdiv(E, BE), cdiv(L, BL), bsz)
    w = weight.contiguous()
    has_map = positions is not None
    _conv_pair_kernel[grid](
        x, w, bias if bias is not None else w, out, on if on is not None else w,
        positions if has_map else w, inverse if has_map else w, L, E, inverse.shape[1] if has_map else 0,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        positions.stride(0) if has_map else 0, positions.stride(1) if has_map else 0,
        inverse.stride(0) if has_map else 0,
        K=K, BL=BL, BE=BE, HAS_BIAS=bias is not None, HAS_ON=on is not None, HAS_MAP=has_map,
        num_warps=policy.get("conv_warps"),
    )
    return out


class _ConvPairFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return _conv_pair_launch(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias = ctx.saved_tensors
        return _conv_pair_backward(x, weight, bias, grad)


def conv_pair_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                     direction_on: Tensor | None = None, positions: Tensor | None = None,
                     full_length: int | None = None) -> Tensor:
    """Causal (direction 0) and anti-causal (direction 1) depthwise conv + SiLU of token-major x.

    x (b, L, d) any strides; weight (2, d, k); bias (2, d) or None. Returns (2, b, L, d) in x's dtype.
    ``direction_on`` (b, 2) int32, inference only: outputs of switched-off (sample, direction) pairs are left
    unwritten (undefined), for a scan that skips them.

    ``positions`` (b, L) integer, inference only (no backward): the tokens are the kept ones of a dense
    sequence of ``full_length`` tokens, token t at original index ``positions[b, t]`` (distinct per row, any
    order), and each sees its original neighbourhood, pruned slots reading as zeros: the conv of the dense
    sequence with pruned tokens zeroed, at the kept positions (ToP's aligned conv). ``full_length`` None reads
    ``positions.max() + 1`` back from the device (a host sync).
    """
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[0] != 2 or weight.shape[1] != x.shape[2]:
        raise ValueError(f"conv_pair_triton: expected x (b, L, d) and weight (2, d, k), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if positions is not None:
        if positions.shape != x.shape[:2]:
            raise ValueError(f"conv_pair_triton: positions must be (b, L) = {tuple(x.shape[:2])}, got "
                             f"{tuple(positions.shape)}")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            raise ValueError("conv_pair_triton: the position-mapped conv (aligned pruning) is inference-only (no "
                             "backward); run under torch.no_grad(), or train through the per-direction PyTorch "
                             "path (BiMambaMixer does so whenever autograd is on)")
        if full_length is None:
            full_length = int(positions.max()) + 1
        inverse = _inverse_positions(positions, full_length)
        return _conv_pair_launch(x, weight, bias, direction_on, positions, inverse)
    if direction_on is not None:
        return _conv_pair_launch(x, weight, bias, direction_on)
    return _ConvPairFn.apply(x, weight, bias)


class _SplitHalves(torch.autograd.Function):
    """``xz[..., :E], xz[..., E:]`` (views) whose backward writes both gradients into one new tensor. Autograd's
    slice backward fills a zero tensor of xz's size per slice and adds the two: five full-size passes a layer
    instead of two copies."""

    @staticmethod
    def forward(ctx, xz: Tensor, E: int):
        ctx.E = E
        return xz[..., :E], xz[..., E:]

    @staticmethod
    def backward(ctx, dx: Tensor | None, dz: Tensor | None):
        E = ctx.E
        ref = dx if dx is not None else dz
        out = ref.new_empty(*ref.shape[:-1], 2 * E)
        for part, grad in ((out[..., :E], dx), (out[..., E:], dz)):
            if grad is None:
                part.zero_()
            else:
                part.copy_(grad)
        return out, None


def _stack(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else torch.stack([a, b])


def _direction_params(mixer: nn.Module) -> tuple[Tensor, ...]:
    """Both directions' weights stacked on a leading axis of 2. Without autograd (inference) the stacks are
    cached on the mixer and rebuilt only when a parameter changes (in place or replaced)."""
    (conv_f, x_f, dt_f, a_f, d_f), (conv_b, x_b, dt_b, a_b, d_b) = mixer.path_params(0), mixer.path_params(1)
    params = (conv_f.weight, conv_b.weight, conv_f.bias, conv_b.bias, x_f.weight, x_b.weight, dt_f.weight,
              dt_b.weight, a_f, a_b, d_f, d_b, dt_f.bias, dt_b.bias)
    grad = torch.is_grad_enabled()
    key = tuple((id(p), p.data_ptr(), _version(p)) if p is not None else None for p in params)
    cached = getattr(mixer, "_triton_stack_cache", None)
    if not grad and cached is not None and cached[0] == key:
        return cached[1]
    stacks = (
        torch.stack([params[0], params[1]]).flatten(2, 3),  # conv weight (2, E, k)
        _stack(params[2], params[3]),
        torch.stack([params[4], params[5]]),  # x_proj (2, R + 2N, E)
        torch.stack([params[6], params[7]]),  # dt_proj (2, E, R)
        -torch.exp(torch.stack([params[8], params[9]]).float()),
        torch.stack([params[10], params[11]]),
        torch.stack([params[12], params[13]]),
    )
    if not grad:
        mixer._triton_stack_cache = (key, stacks)
    return stacks


def _version(t: Tensor) -> int:
    """In-place update counter; inference-mode tensors have none (and cannot be updated outside that mode)."""
    return -1 if t.is_inference() else t._version


def _linear(module: nn.Module, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``module(x)``, or with the cached compute-dtype ``weight`` where given (inference)."""
    if weight is None:
        return module(x)
    return F.linear(x.to(weight.dtype), weight, bias)


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` written into ``out`` (..., out_features), whose rows may be strided (a column
    range of a wider buffer): cuBLAS writes there directly (leading dimension = the row stride)."""
    rows = out.view(-1, out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    if bias is None:
        torch.mm(x2, weight.t(), out=rows)
    else:
        torch.addmm(bias, x2, weight.t(), out=rows)
    return out


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _inference_linears(mixer: nn.Module, w_x: Tensor, w_dt: Tensor, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """in_proj, out_proj, x_proj and dt_proj weights (and biases) in the compute dtype, cached on the mixer.

    Without autograd the casts autocast would otherwise repeat at every forward (4 kernels a layer, also inside
    a CUDA graph: a fixed cost that token reduction cannot shrink) are done once and redone only when a weight
    changes (in place or replaced) or the dtype does."""
    params = (mixer.in_proj.weight, mixer.in_proj.bias, mixer.out_proj.weight, mixer.out_proj.bias, w_x, w_dt)
    key = (dtype,) + tuple(None if p is None else (id(p), p.data_ptr(), _version(p)) for p in params)
    cached = getattr(mixer, "_triton_cast_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    casts = tuple(None if p is None else p.detach().to(dtype) for p in params[:4]) + (
        w_x.transpose(1, 2).to(dtype).contiguous(), w_dt.transpose(1, 2).to(dtype).contiguous())
    mixer._triton_cast_cache = (key, casts)
    return casts


@triton.jit
def _class_token_gate_kernel(xz_ptr, cls_ptr, w_ptr, b_ptr, gate_ptr, on_ptr, K, sx_b, sx_t, sw_o,
                             HAS_BIAS: tl.constexpr, BK: tl.constexpr):
    """One sample: logits = W . xz[b, cls[b], :] + bias (fp32), gate = logits > 0 as float and int32."""
    pid = tl.program_id(0)
    row = xz_ptr + pid * sx_b + tl.load(cls_ptr + pid) * sx_t
    acc_f = tl.zeros((BK,), dtype=tl.float32)
    acc_b = tl.zeros((BK,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        km = k < K
        x = tl.load(row + k, mask=km, other=0.0).to(tl.float32)
        acc_f += x * tl.load(w_ptr + k, mask=km, other=0.0).to(tl.float32)
        acc_b += x * tl.load(w_ptr + sw_o + k, mask=km, other=0.0).to(tl.float32)
    logit_f = tl.sum(acc_f, axis=0)
    logit_b = tl.sum(acc_b, axis=0)
    if HAS_BIAS:
        logit_f += tl.load(b_ptr).to(tl.float32)
        logit_b += tl.load(b_ptr + 1).to(tl.float32)
    on_f = (logit_f > 0).to(tl.int32)
    on_b = (logit_b > 0).to(tl.int32)
    tl.store(on_ptr + 2 * pid, on_f)
    tl.store(on_ptr + 2 * pid + 1, on_b)
    tl.store(gate_ptr + 2 * pid, on_f.to(tl.float32))
    tl.store(gate_ptr + 2 * pid + 1, on_b.to(tl.float32))


def class_token_gate_triton(xz: Tensor, cls_index: Tensor, weight: Tensor,
                            bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Direction gates of a linear selector on the class token: xz (b, L, 2E) ``in_proj`` output, cls_index (b,),
    weight (2, 2E), bias (2,) -> gate (b, 2) 0/1 float, on (b, 2) int32, where gate = W . xz[i, cls_i] + b > 0
    (fp32). One launch replaces the row gather, the casts, a skinny GEMM and the thresholds (~1 ms of a DyVM
    Vim-S forward over 24 layers)."""
    bsz, _, K = xz.shape
    if weight.shape != (2, K) or (bias is not None and bias.shape != (2,)):
        raise ValueError(f"class_token_gate_triton: weight must be (2, {K}) and bias (2,), got "
                         f"{tuple(weight.shape)} / {None if bias is None else tuple(bias.shape)}")
    if cls_index.shape != (bsz,):
        raise ValueError(f"class_token_gate_triton: cls_index must be ({bsz},), got {tuple(cls_index.shape)}")
    if xz.stride(-1) != 1:
        xz = xz.contiguous()
    weight = weight.contiguous()
    gate = torch.empty(bsz, 2, device=xz.device, dtype=torch.float32)
    on = torch.empty(bsz, 2, device=xz.device, dtype=torch.int32)
    _class_token_gate_kernel[(bsz,)](
        xz, cls_index.contiguous(), weight, bias if bias is not None else weight, gate, on, K,
        xz.stride(0), xz.stride(1), weight.stride(0),
        HAS_BIAS=bias is not None, BK=min(1024, next_power_of_2(K)), num_warps=4)
    return gate, on


def bimamba_forward_triton(mixer: nn.Module, hidden: Tensor,
                           direction_gate: Tensor | Callable[[Tensor], Tensor] | None = None,
                           cls_index: Tensor | None = None, *, selector: tuple[Tensor, Tensor | None] | None = None,
                           positions: Tensor | None = None, full_length: int | None = None,
                           gap: Tensor | None = None, tap: Callable[[Tensor], None] | None = None) -> Tensor:
    """Vim v2 mixer forward (no token mask) with fused Triton kernels. hidden (b, L, d_model).

    ``direction_gate`` (inference only): (b, 2) 0/1 per sample and direction, or a callable mapping the
    ``in_proj`` output (b, L, 2E) to it (the caller picks the rows it reads: the class token's, the registers'
    mean); or ``selector`` = (weight (2, 2E), bias): the gate of a linear selector on the class token's row
    ``cls_index`` (b,), computed by :func:`class_token_gate_triton`.
    Switched-off directions are skipped inside the conv and scan kernels, without a host sync.

    Hidden-state alignment of pruned tokens (inference only): ``positions`` (b, L) original indices into a
    dense sequence of ``full_length`` tokens make the conv see each token's original neighbourhood (see
    :func:`conv_pair_triton`); ``gap`` (2, b, L) float, pruned positions before each token in the forward
    (0) and backward (1) scan order, makes the state decay across them (``align='decay'``; ``None`` holds it).

    ``tap``: called with the combined, gated SSM output (b, L, E) before ``out_proj`` (see ``MixerContext.tap``).
    """
    E, N, R = mixer.d_inner, mixer.d_state, mixer.dt_rank
    bsz, L, _ = hidden.shape
    conv_w, conv_b, w_x, w_dt, A, D, dt_bias = _direction_params(mixer)
    buf = None  # inference with policy mixer_in_place: (b, L, 3E) = [x, later the first direction's step
    # sizes, later the output | z | the second direction's step sizes]
    if torch.is_grad_enabled():  # training: autocast casts (and differentiates through) the fp32 weights
        w_in = b_in = w_out = b_out = None
        w_x_t, w_dt_t = w_x.transpose(1, 2), w_dt.transpose(1, 2)
        xz = mixer.in_proj(hidden)  # (b, L, 2E)
    else:
        dtype = _compute_dtype(hidden)
        w_in, b_in, w_out, b_out, w_x_t, w_dt_t = _inference_linears(mixer, w_x, w_dt, dtype)
        if policy.get("mixer_in_place") and gap is None:
            buf = torch.empty(bsz, L, 3 * E, device=hidden.device, dtype=dtype)
            xz = _linear_into(buf[..., :2 * E], hidden, w_in, b_in)
        else:
            xz = _linear(mixer.in_proj, hidden, w_in, b_in)  # (b, L, 2E)
    x, z = _SplitHalves.apply(xz, E) if torch.is_grad_enabled() else (xz[..., :E], xz[..., E:])
    on = None
    if selector is not None and cls_index is None:
        raise ValueError("a linear selector needs the class-token index")
    if selector is not None:
        if direction_gate is not None:
            raise ValueError("give either direction_gate or selector, not both")
        direction_gate, on = class_token_gate_triton(xz, cls_index, *selector)
    elif callable(direction_gate):
        direction_gate = direction_gate(xz)
    if direction_gate is not None and on is None:
        on = (direction_gate > 0.5).to(torch.int32).contiguous()
    u2 = conv_pair_triton(x, conv_w, conv_b, direction_on=on, positions=positions,
                          full_length=full_length)  # (2, b, L, E)
    u_flat = u2.view(2, bsz * L, E)
    x_dbl = torch.bmm(u_flat, w_x_t.to(u_flat.dtype))  # under autocast: bf16 either way
    if buf is None:
        delta = torch.bmm(x_dbl[..., :R], w_dt_t.to(x_dbl.dtype))
    else:  # the step sizes go to buf's first third (x: dead once the conv has read it) and its last third
        delta = torch.bmm(x_dbl[..., :R], w_dt_t, out=buf.view(bsz * L, 3, E)[:, ::2].transpose(0, 1))
    Bm = x_dbl[..., R:R + N].view(2, bsz, L, N).permute(0, 1, 3, 2)
    Cm = x_dbl[..., R + N:].view(2, bsz, L, N).permute(0, 1, 3, 2)
    delta = delta.view(2, bsz, L, E).permute(0, 1, 3, 2)
    y = selective_scan_pair_triton(
        u2.permute(0, 1, 3, 2), delta, A, Bm, Cm, D, z.transpose(1, 2), dt_bias, delta_softplus=True,
        scale=0.5 if mixer.combine == "mean" else 1.0, gap=gap, direction_on=on,
        out=None if buf is None else delta[0],  # written over the first direction's step sizes, each read first
    )  # (b, E, L) logical, (b, L, E) memory (row stride 3E with buf)
    del u2, u_flat, x_dbl, delta, Bm, Cm  # not needed by out_proj: freed before its output is allocated
    mixer.last_stats = {"tokens": L, "gate": None if direction_gate is None else direction_gate.detach()}
    if tap is not None:
        tap(y.transpose(1, 2))
    return _linear(mixer.out_proj, y.transpose(1, 2), w_out, b_out)
