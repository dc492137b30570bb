"""Fused residual add + RMSNorm on Triton: Vim's ``add -> norm`` step in one pass over the tokens.

``residual_out = residual + hidden`` (fp32), ``normed = residual_out * rstd * weight`` (in hidden's dtype), with
``rstd = 1 / sqrt(mean(residual_out^2) + eps)``. In eager PyTorch this is about eight elementwise kernels per
layer (cast, add, square, mean, rsqrt, two products, cast); here it is one, reading each row once.
The backward is one pass too (:func:`_rms_norm_bwd_kernel`): it recomputes rstd from the saved fp32 residual,
writes the input gradient once and sums the weight's gradient per program (PyTorch ops took about a dozen
full-size fp32 kernels a layer).

``add_layer_norm_triton``: the same one pass for a LayerNorm with fp32 output and no autograd, for DyVM's keep
predictor, whose input is the residual stream ``residual + hidden`` (its default at inference on the 'triton'
backend: ``mambatrim.reduce.dyvm.FUSED_PREDICTOR_NORM``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .intmath import cdiv, next_power_of_2
from .triton_scan import _sm_count

__all__ = ["add_layer_norm_triton", "add_rms_norm_triton"]

ROWS_PER_BLOCK = 8  # rows a step of the backward (a (8, width) tile)
BWD_PROGRAMS_PER_SM = 4  # the backward's programs (each sums its share of the weight gradient)


@triton.jit
def _add_rms_norm_kernel(h_ptr, r_ptr, w_ptr, y_ptr, res_ptr, D, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(h_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(r_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(res_ptr + row * D + cols, x, mask=m)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_bwd_kernel(res_ptr, dy_ptr, dres_ptr, w_ptr, dx_ptr, dr_ptr, dwp_ptr, M, D, eps, blocks,
                         HAS_DRES: tl.constexpr, HAS_DR: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr):
    """Gradients of ``y = res * rstd * w`` for ``blocks`` blocks of ``BM`` rows: dx = rstd (g - xhat mean(g xhat))
    with g = dy w (plus the residual stream's own gradient ``dres``), written in dx's dtype (and dr's, when it
    differs); the program's share of dw = sum(dy xhat) goes to row ``pid`` of ``dwp``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for b in range(blocks):
        rows = (pid * blocks + b) * BM + tl.arange(0, BM)
        m = (rows < M)[:, None] & cm[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(res_ptr + offs, mask=m, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None])
        if HAS_DRES:
            dx += tl.load(dres_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_DR:
            tl.store(dr_ptr + offs, dx.to(dr_ptr.dtype.element_ty), mask=m)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dwp_ptr + pid * D + cols, dw, mask=cm)


def _add_rms_norm_rows(h: Tensor, r: Tensor | None, weight: Tensor, y: Tensor, res: Tensor, eps: float) -> None:
    """One launch of :func:`_add_rms_norm_kernel` over the (rows, D) views: ``res = h (+ r)``, ``y = norm(res)``.
    The outputs may be the inputs' own storage (each program reads its row before writing it)."""
    block = next_power_of_2(h.shape[1])
    _add_rms_norm_kernel[(h.shape[0],)](h, r if r is not None else h, weight, y, res, h.shape[1], eps,
                                        HAS_RES=r is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8)


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float):
        shape, dim = hidden.shape, hidden.shape[-1]
        h = hidden.contiguous().view(-1, dim)
        r = residual.contiguous().view(-1, dim) if residual is not None else None
        y = torch.empty_like(h)
        res = torch.empty(h.shape, device=h.device, dtype=torch.float32)
        _add_rms_norm_rows(h, r, weight, y, res, eps)
        ctx.save_for_backward(res, weight)
        ctx.eps, ctx.has_res, ctx.h_dtype, ctx.shape = eps, residual is not None, hidden.dtype, shape
        ctx.r_dtype = residual.dtype if residual is not None else None
        return y.view(shape), res.view(shape)

    @staticmethod
    def backward(ctx, dy: Tensor, dres: Tensor):
        res, weight = ctx.saved_tensors
        rows, dim = res.shape
        dy = dy.reshape(res.shape).contiguous()
        dres = None if dres is None else dres.reshape(res.shape).contiguous()
        dh = torch.empty(res.shape, device=res.device, dtype=ctx.h_dtype)
        # the residual's gradient is the same values; a second buffer only where its dtype differs
        dr = (torch.empty(res.shape, device=res.device, dtype=ctx.r_dtype)
              if ctx.has_res and ctx.r_dtype != ctx.h_dtype else None)
        block, bm = next_power_of_2(dim), ROWS_PER_BLOCK
        n_blocks = cdiv(rows, bm)
        programs = max(1, min(n_blocks, BWD_PROGRAMS_PER_SM * _sm_count(res.device)))
        per_program = cdiv(n_blocks, programs)
        programs = cdiv(n_blocks, per_program)
        dw_part = torch.empty(programs, dim, device=res.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(programs,)](res, dy, dres if dres is not None else dy, weight, dh,
                                          dr if dr is not None else dh, dw_part, rows, dim, ctx.eps, per_program,
                                          HAS_DRES=dres is not None, HAS_DR=dr is not None, BM=bm, BLOCK=block,
                                          num_warps=4 if block <= 1024 else 8)
        dh = dh.view(ctx.shape)
        if ctx.has_res:
            dr = dh if dr is None else dr.view(ctx.shape)
        return dh, dr, dw_part.sum(0).to(weight.dtype), None


def add_rms_norm_triton(hidden: Tensor, residual: Tensor | None, weight: Tensor,
                        eps: float = 1e-5, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """(normed in hidden's dtype, fp32 residual_out) for hidden/residual (..., D); ``residual`` may be None.

    ``in_place`` (inference; the caller gives up both inputs): residual_out is written over ``residual`` and
    normed over ``hidden`` (each program reads its row before writing it), so a layer allocates neither: two
    stream tensors less at the layer's peak. Taken where both are contiguous and the residual is fp32; without
    a residual (the first layer), an fp32 ``hidden`` becomes residual_out itself and only normed is new."""
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} and hidden {tuple(hidden.shape)} differ")
    if weight.shape != hidden.shape[-1:]:
        raise ValueError(f"add_rms_norm: weight {tuple(weight.shape)} does not match width {hidden.shape[-1]}")
    first = residual is None  # the stream starts here: an fp32 hidden becomes the residual itself
    if not (in_place and hidden.is_contiguous() and (
            hidden.dtype == torch.float32 if first
            else residual.dtype == torch.float32 and residual.is_contiguous())):
        return _AddRMSNormFn.apply(hidden, residual, weight, eps)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (not first and residual.requires_grad)):
        raise ValueError("add_rms_norm: in_place is inference-only (it overwrites the inputs autograd would need)")
    dim = hidden.shape[-1]
    h = hidden.view(-1, dim)
    if first:  # res = h written over h itself; normed is new
        y = torch.empty_like(h)
        _add_rms_norm_rows(h, None, weight, y, h, eps)
        return y.view(hidden.shape), hidden
    r = residual.view(-1, dim)
    _add_rms_norm_rows(h, r, weight, h, r, eps)
    return hidden, residual


@triton.jit
def _add_layer_norm_kernel(h_ptr, r_ptr, w_ptr, b_ptr, norm_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(h_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    x += tl.load(r_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(norm_ptr + row * D + cols, xc * rstd * w + b, mask=m)


def add_layer_norm_triton(hidden: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                          eps: float = 1e-5) -> Tensor:
    """``layer_norm(residual + hidden)`` in fp32 for (..., D) inputs of any float dtypes, in one pass; no
    autograd (inference)."""
    if residual.shape != hidden.shape:
        raise ValueError(f"add_layer_norm: residual {tuple(residual.shape)} and hidden {tuple(hidden.shape)} differ")
    dim = hidden.shape[-1]
    if weight.shape != (dim,) or bias.shape != (dim,):
        raise ValueError(f"add_layer_norm: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not match "
                         f"width {dim}")
    h = hidden.contiguous().view(-1, dim)
    r = residual.contiguous().view(-1, dim)
    y = torch.empty(h.shape, device=h.device, dtype=torch.float32)
    if h.shape[0]:
        block = next_power_of_2(dim)
        _add_layer_norm_kernel[(h.shape[0],)](h, r, weight.contiguous(), bias.contiguous(), y, dim, eps,
                                              BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return y.view(hidden.shape)
