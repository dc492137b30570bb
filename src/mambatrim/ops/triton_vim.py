"""Fused bidirectional Vim mixer (bimamba v2) on Triton kernels, in token-major layout end to end.

One layer runs: in_proj -> **one** conv kernel for both directions (causal with ``conv1d``, anti-causal with
``conv1d_b``, + SiLU, sharing the loads of x) -> x_proj and dt_proj of both directions as two batched matmuls ->
**one** scan launch for both directions (the backward one reads right to left and both write, summed and scaled,
into one token-major output) -> out_proj. No ``flip``, no transpose copies: every kernel reads the (B, L, channels)
activations the Linear layers produce.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from .conv import causal_conv1d
from .triton_scan import selective_scan_pair_triton

__all__ = ["conv_pair_triton", "bimamba_forward_triton"]

CONV_BLOCK_L, CONV_BLOCK_E, CONV_WARPS = 16, 128, 4  # best of an H100 sweep (92 us at Vim-S b128)


@triton.jit
def _conv_pair_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, on_ptr, L, E,
    sx_b, sx_t, sx_d,
    so_g, so_b, so_t,
    K: tl.constexpr, BL: tl.constexpr, BE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ON: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_b = tl.program_id(2)
    t = pid_l * BL + tl.arange(0, BL)
    e = pid_e * BE + tl.arange(0, BE)
    emask = e < E
    acc_f = tl.zeros((BL, BE), dtype=tl.float32)
    acc_b = tl.zeros((BL, BE), dtype=tl.float32)
    base = x_ptr + pid_b * sx_b + e[None, :] * sx_d
    # x[t + o] for o in -(K-1)..(K-1), each tile loaded once and used by both directions
    for i in tl.static_range(2 * K - 1):
        o = i - (K - 1)
        tt = t + o
        xm = ((tt >= 0) & (tt < L))[:, None] & emask[None, :]
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


def _conv_pair_torch(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Reference of the pair conv (used for its backward): x (b, L, d) -> (2, b, L, d)."""
    xc = x.transpose(1, 2)
    outs = [causal_conv1d(xc, weight[i], None if bias is None else bias[i], activation="silu", reverse=i == 1)
            for i in range(2)]
    return torch.stack([o.transpose(1, 2) for o in outs])


def _conv_pair_launch(x: Tensor, weight: Tensor, bias: Tensor | None, on: Tensor | None = None) -> Tensor:
    bsz, L, E = x.shape
    K = weight.shape[-1]
    out = torch.empty(2, bsz, L, E, device=x.device, dtype=x.dtype)
    BL, BE = CONV_BLOCK_L, CONV_BLOCK_E
    grid = (triton.cdiv(E, BE), triton.cdiv(L, BL), bsz)
    w = weight.contiguous()
    _conv_pair_kernel[grid](
        x, w, bias if bias is not None else w, out, on if on is not None else w, L, E,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        K=K, BL=BL, BE=BE, HAS_BIAS=bias is not None, HAS_ON=on is not None, num_warps=CONV_WARPS,
    )
    return out


class _ConvPairFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return _conv_pair_launch(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # depthwise k=4 conv backward is cheap next to the scan: recompute and differentiate the torch form
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
            if bias is not None:
                inputs.append(bias.detach().requires_grad_())
            out = _conv_pair_torch(inputs[0], inputs[1], inputs[2] if bias is not None else None)
            grads = torch.autograd.grad(out, inputs, grad)
        return grads[0], grads[1], grads[2] if bias is not None else None


def conv_pair_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                     direction_on: Tensor | None = None) -> Tensor:
    """Causal (direction 0) and anti-causal (direction 1) depthwise conv + SiLU of token-major x.

    x (b, L, d) any strides; weight (2, d, k); bias (2, d) or None. Returns (2, b, L, d) in x's dtype.
    ``direction_on`` (b, 2) int32, inference only: outputs of switched-off (sample, direction) pairs are left
    unwritten (undefined), for a scan that skips them.
    """
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[0] != 2 or weight.shape[1] != x.shape[2]:
        raise ValueError(f"conv_pair_triton: expected x (b, L, d) and weight (2, d, k), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if direction_on is not None:
        return _conv_pair_launch(x, weight, bias, direction_on)
    return _ConvPairFn.apply(x, weight, bias)


def _stack(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else torch.stack([a, b])


def _direction_params(mixer: nn.Module) -> tuple[Tensor, ...]:
    """Both directions' weights stacked on a leading axis of 2. Without autograd (inference) the stacks are
    cached on the mixer and rebuilt only when a parameter changes (in place or replaced)."""
    params = (mixer.conv1d.weight, mixer.conv1d_b.weight, mixer.conv1d.bias, mixer.conv1d_b.bias,
              mixer.x_proj.weight, mixer.x_proj_b.weight, mixer.dt_proj.weight, mixer.dt_proj_b.weight,
              mixer.A_log, mixer.A_b_log, mixer.D, mixer.D_b, mixer.dt_proj.bias, mixer.dt_proj_b.bias)
    grad = torch.is_grad_enabled()
    key = tuple((id(p), p.data_ptr(), p._version) if p is not None else None for p in params)
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


def bimamba_forward_triton(mixer: nn.Module, hidden: Tensor,
                           direction_gate: Tensor | Callable[[Tensor], Tensor] | None = None,
                           cls_index: Tensor | None = None) -> Tensor:
    """Vim v2 mixer forward (no mask or alignment) with fused Triton kernels. hidden (b, L, d_model).

    ``direction_gate`` (inference only): (b, 2) 0/1 per sample and direction, or a callable mapping the class
    token's ``in_proj`` output (b, 2E) to it (needs ``cls_index``). Switched-off directions are skipped inside
    the conv and scan kernels, without a host sync.
    """
    E, N, R = mixer.d_inner, mixer.d_state, mixer.dt_rank
    bsz, L, _ = hidden.shape
    xz = mixer.in_proj(hidden)  # (b, L, 2E)
    x, z = xz[..., :E], xz[..., E:]
    on = None
    if callable(direction_gate):
        if cls_index is None:
            raise ValueError("a direction selector needs the class-token index")
        direction_gate = direction_gate(xz[torch.arange(bsz, device=xz.device), cls_index])
    if direction_gate is not None:
        on = (direction_gate > 0.5).to(torch.int32).contiguous()
    conv_w, conv_b, w_x, w_dt, A, D, dt_bias = _direction_params(mixer)
    u2 = conv_pair_triton(x, conv_w, conv_b, direction_on=on)  # (2, b, L, E)
    u_flat = u2.view(2, bsz * L, E)
    x_dbl = torch.bmm(u_flat, w_x.transpose(1, 2).to(u_flat.dtype))  # under autocast: bf16 either way
    delta = torch.bmm(x_dbl[..., :R], w_dt.transpose(1, 2).to(x_dbl.dtype))
    Bm = x_dbl[..., R:R + N].view(2, bsz, L, N).permute(0, 1, 3, 2)
    Cm = x_dbl[..., R + N:].view(2, bsz, L, N).permute(0, 1, 3, 2)
    y = selective_scan_pair_triton(
        u2.permute(0, 1, 3, 2), delta.view(2, bsz, L, E).permute(0, 1, 3, 2), A, Bm, Cm, D, z.transpose(1, 2),
        dt_bias, delta_softplus=True,
        scale=0.5 if mixer.divide_out else 1.0, direction_on=on,
    )  # (b, E, L) logical, (b, L, E) memory
    mixer.last_stats = {"tokens": L, "gate": None if direction_gate is None else direction_gate.detach()}
    return mixer.out_proj(y.transpose(1, 2))
