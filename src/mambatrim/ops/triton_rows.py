"""Row gather on Triton: ``out[b, k] = t[b, index[b, k]]`` for (B, L, D) activations, a straight copy of rows.

What token pruning does between blocks (hidden states and the fp32 residual, every kept token). PyTorch's
advanced indexing runs a generic index kernel that computes an offset per element; this kernel reads one index
per row and copies the row in wide vectors, so it moves the bytes at about the memory's rate. The default of
:func:`~mambatrim.contract.take_rows` at inference on the 'triton' backend (policy
``fused_row_gather``; measured in ``benchmarks/results/dyvm_speed_fused_steps.md``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .intmath import cdiv

__all__ = ["take_rows_triton"]

ROWS_PER_PROGRAM = 8
BLOCK_D = 256


@triton.jit
def _take_rows_kernel(src_ptr, idx_ptr, dst_ptr, L, K, D, s_b, s_l, i_b, d_b, d_k,
                      BK: tl.constexpr, BD: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    k = pid_k * BK + tl.arange(0, BK)
    km = k < K
    rows = tl.load(idx_ptr + pid_b * i_b + k, mask=km, other=0).to(tl.int64)
    src = src_ptr + pid_b * s_b + rows[:, None] * s_l
    dst = dst_ptr + pid_b * d_b + k[:, None].to(tl.int64) * d_k
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        m = km[:, None] & (d[None, :] < D)
        tl.store(dst + d[None, :], tl.load(src + d[None, :], mask=m), mask=m)


def take_rows_triton(t: Tensor, index: Tensor) -> Tensor:
    """``t`` (B, L, D) with unit stride along D, ``index`` (B, K) integer rows in [0, L) -> (B, K, D) contiguous,
    in ``t``'s dtype. No autograd (inference). Indices are not range-checked on the device (that would need a
    host sync); the caller's index must be valid, as for a CUDA gather."""
    if t.dim() != 3 or index.dim() != 2 or index.shape[0] != t.shape[0]:
        raise ValueError(f"take_rows_triton: t must be (B, L, D) and index (B, K), got {tuple(t.shape)} and "
                         f"{tuple(index.shape)}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"take_rows_triton: index must be an integer tensor, got {index.dtype}")
    bsz, length, dim = t.shape
    k = index.shape[1]
    out = torch.empty(bsz, k, dim, device=t.device, dtype=t.dtype)
    if out.numel() == 0:
        return out
    index = index.contiguous()
    grid = (cdiv(k, ROWS_PER_PROGRAM), bsz)
    _take_rows_kernel[grid](t, index, out, length, k, dim, t.stride(0), t.stride(1), index.stride(0),
                            out.stride(0), out.stride(1), BK=ROWS_PER_PROGRAM, BD=BLOCK_D, num_warps=4)
    return out
