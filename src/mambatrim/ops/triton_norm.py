"""Fused residual add + RMSNorm on Triton: Vim's ``add -> norm`` step in one pass over the tokens.

``residual_out = residual + hidden`` (fp32), ``normed = residual_out * rstd * weight`` (in hidden's dtype), with
``rstd = 1 / sqrt(mean(residual_out^2) + eps)``. In eager PyTorch this is about eight elementwise kernels per
layer (cast, add, square, mean, rsqrt, two products, cast); here it is one, reading each row once.
The backward is plain PyTorch on the saved fp32 residual (cheap next to the mixer).

``add_layer_norm_triton``: the same one pass for a LayerNorm with fp32 output and no autograd, for DyVM's keep
predictor, whose input is the residual stream ``residual + hidden`` (its default at inference on the 'triton'
backend: ``mambatrim.reduce.dyvm.FUSED_PREDICTOR_NORM``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["add_layer_norm_triton", "add_rms_norm_triton"]


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


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float):
        shape, dim = hidden.shape, hidden.shape[-1]
        h = hidden.contiguous().view(-1, dim)
        r = residual.contiguous().view(-1, dim) if residual is not None else None
        y = torch.empty_like(h)
        res = torch.empty(h.shape, device=h.device, dtype=torch.float32)
        block = triton.next_power_of_2(dim)
        _add_rms_norm_kernel[(h.shape[0],)](h, r if r is not None else h, weight, y, res, dim, eps,
                                            HAS_RES=r is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8)
        ctx.save_for_backward(res, weight)
        ctx.eps, ctx.has_res, ctx.h_dtype, ctx.shape = eps, residual is not None, hidden.dtype, shape
        ctx.r_dtype = residual.dtype if residual is not None else None
        return y.view(shape), res.view(shape)

    @staticmethod
    def backward(ctx, dy: Tensor, dres: Tensor):
        res, weight = ctx.saved_tensors
        dy = dy.reshape(res.shape)
        dres = None if dres is None else dres.reshape(res.shape)
        rstd = torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + ctx.eps)
        xhat = res * rstd
        g = dy.float() * weight.float()
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        if dres is not None:
            dx = dx + dres.float()
        dw = (dy.float() * xhat).sum(0).to(weight.dtype)
        dx = dx.view(ctx.shape)
        dh = dx.to(ctx.h_dtype)
        dr = dx.to(ctx.r_dtype) if ctx.has_res else None
        return dh, dr, dw, None


def add_rms_norm_triton(hidden: Tensor, residual: Tensor | None, weight: Tensor,
                        eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(normed in hidden's dtype, fp32 residual_out) for hidden/residual (..., D); ``residual`` may be None."""
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} and hidden {tuple(hidden.shape)} differ")
    if weight.shape != hidden.shape[-1:]:
        raise ValueError(f"add_rms_norm: weight {tuple(weight.shape)} does not match width {hidden.shape[-1]}")
    return _AddRMSNormFn.apply(hidden, residual, weight, eps)


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
        block = triton.next_power_of_2(dim)
        _add_layer_norm_kernel[(h.shape[0],)](h, r, weight.contiguous(), bias.contiguous(), y, dim, eps,
                                              BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return y.view(hidden.shape)
