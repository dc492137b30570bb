"""Depthwise causal (or anti-causal) conv1d, the local mixing step before the scan."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu_kernels import causal_conv1d_cpu, compiled_applies


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, reverse: bool = False
) -> Tensor:
    """x (b, d, L); weight (d, 1, k) or (d, k). Output[t] mixes x[t-k+1..t] (``reverse``: x[t..t+k-1]).

    The reverse form equals ``flip(causal_conv1d(flip(x)))`` without building flipped copies: it pads on the
    right and flips the (tiny) kernel instead of the sequence. CPU inference goes to the compiled kernel where
    the ``cpu_kernels`` setting allows (its output is token-major memory viewed as (b, d, L)).
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d expects x of shape (batch, channels, length), got {tuple(x.shape)}")
    if weight.dim() == 2:
        weight = weight[:, None, :]
    dim, _, k = weight.shape
    if x.shape[1] != dim:
        raise ValueError(f"causal_conv1d: x has {x.shape[1]} channels but the weight has {dim}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: unknown activation {activation!r} (use 'silu' or None)")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if compiled_applies(x.device, needs_grad):
        return causal_conv1d_cpu(x, weight, bias, activation is not None, reverse)
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    if reverse:
        out = F.conv1d(F.pad(x, (0, k - 1)), weight.flip(-1), bias, groups=dim)
    else:
        out = F.conv1d(F.pad(x, (k - 1, 0)), weight, bias, groups=dim)
    return F.silu(out) if activation is not None else out
