"""DyVM's keep-score MLP head on Triton: the three linears, two GELUs and the 2-way log-softmax in one kernel.

Per token row ``x`` (the local half of the predictor's features) with a per-sample bias ``g`` (the global half's
product, the same for every token of a sample):

    h1 = gelu(W1 x + g)        (H1 features)
    h2 = gelu(W2 h1 + b2)      (H2 features)
    out = log_softmax(W3 h2 + b3)   (2: keep, drop)

In PyTorch this is about nine kernels a stage, each writing its fp32 intermediate to memory (three GEMMs, an
add, two GELUs, a log-softmax and their copies). Here each program keeps a block of rows in registers from the
first product to the scores and writes only the two log-probabilities. GELU is the exact (erf) one, as
``nn.GELU()``. Inference only (no autograd). The default of DyVM's predictor at inference on the 'triton'
backend (``mambatrim.reduce.dyvm.FUSED_PREDICTOR_HEAD``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .intmath import cdiv, next_power_of_2

__all__ = ["keep_head_triton"]

BLOCK_M = 64  # rows per program (half that above 256 first-layer features: its (rows, H1) block is in registers)
BLOCK_K = 32  # reduction step of the first product
BLOCK_C = 32  # H2 features per step of the second product
# the fastest of eleven settings at DyVM-Vim-S's stages on an H200 (benchmarks/results/keep_head.md)
NUM_WARPS = 8
NUM_STAGES = 2


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _keep_head_kernel(feat_ptr, gbias_ptr, w1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr,
                      M, TOKENS, K, H1, H2, sx_m, sg_b, sw1_h, sw1_k, sw2_c, sw2_h, sw3_o,
                      BM: tl.constexpr, BK: tl.constexpr, H1P: tl.constexpr, BC: tl.constexpr,
                      PRECISION: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    h1c = tl.arange(0, H1P)
    h1m = h1c < H1
    # h1 = gelu(x W1^T + g): W1 is (H1, K), read transposed through its strides
    acc = tl.zeros((BM, H1P), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        x = tl.load(feat_ptr + rows[:, None] * sx_m + kk[None, :], mask=rmask[:, None] & km[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w1_ptr + kk[:, None] * sw1_k + h1c[None, :] * sw1_h, mask=km[:, None] & h1m[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    sample = rows // TOKENS
    g = tl.load(gbias_ptr + sample[:, None] * sg_b + h1c[None, :], mask=rmask[:, None] & h1m[None, :],
                other=0.0).to(tl.float32)
    h1 = _gelu(acc + g)  # padded features are gelu(0) = 0 and meet zero weights below
    # the second product in blocks of H2 features, each folded at once into the two output logits
    o0 = tl.zeros((BM,), dtype=tl.float32)
    o1 = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, H2, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc < H2
        w2 = tl.load(w2_ptr + h1c[:, None] * sw2_h + cc[None, :] * sw2_c, mask=h1m[:, None] & cm[None, :],
                     other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + cc, mask=cm, other=0.0).to(tl.float32)
        h2 = _gelu(tl.dot(h1, w2, input_precision=PRECISION) + b2[None, :])
        w30 = tl.load(w3_ptr + cc, mask=cm, other=0.0).to(tl.float32)
        w31 = tl.load(w3_ptr + sw3_o + cc, mask=cm, other=0.0).to(tl.float32)
        o0 += tl.sum(h2 * w30[None, :], axis=1)
        o1 += tl.sum(h2 * w31[None, :], axis=1)
    o0 += tl.load(b3_ptr).to(tl.float32)
    o1 += tl.load(b3_ptr + 1).to(tl.float32)
    top = tl.maximum(o0, o1)
    lse = top + tl.log(tl.exp(o0 - top) + tl.exp(o1 - top))
    tl.store(out_ptr + rows * 2, o0 - lse, mask=rmask)
    tl.store(out_ptr + rows * 2 + 1, o1 - lse, mask=rmask)


def keep_head_triton(x: Tensor, g: Tensor, w1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
                     precision: str = "tf32") -> Tensor:
    """``log_softmax(W3 gelu(W2 gelu(W1 x + g) + b2) + b3)`` for x (B, T, K), g (B, H1) per-sample bias,
    w1 (H1, K), w2 (H2, H1), b2 (H2,), w3 (2, H2), b3 (2,) -> (B, T, 2) fp32. ``precision`` of the two products
    on a GPU: 'tf32' (TF32 inputs, fp32 accumulation) or 'fp32'. No autograd (inference)."""
    if x.dim() != 3 or g.dim() != 2 or g.shape[0] != x.shape[0]:
        raise ValueError(f"keep_head_triton: x must be (B, T, K) and g (B, H1), got {tuple(x.shape)} and "
                         f"{tuple(g.shape)}")
    bsz, tokens, k = x.shape
    h1, h2 = w1.shape[0], w2.shape[0]
    if (w1.shape != (h1, k) or g.shape[1] != h1 or w2.shape != (h2, h1) or b2.shape != (h2,)
            or w3.shape != (2, h2) or b3.shape != (2,)):
        raise ValueError(f"keep_head_triton: weights do not chain: x (..., {k}), g {tuple(g.shape)}, w1 "
                         f"{tuple(w1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}, w3 {tuple(w3.shape)}, "
                         f"b3 {tuple(b3.shape)}")
    if precision not in ("tf32", "fp32"):
        raise ValueError(f"keep_head_triton: precision must be 'tf32' or 'fp32', got {precision!r}")
    if x.stride(2) != 1 or x.stride(0) != tokens * x.stride(1):  # rows must be one stride apart
        x = x.contiguous()
    g, b2, b3, w3 = g.contiguous(), b2.contiguous(), b3.contiguous(), w3.contiguous()
    out = torch.empty(bsz, tokens, 2, device=x.device, dtype=torch.float32)
    rows = bsz * tokens
    if rows == 0:
        return out
    h1p = max(16, next_power_of_2(h1))
    block_m = BLOCK_M if h1p <= 256 else BLOCK_M // 2
    _keep_head_kernel[(cdiv(rows, block_m),)](
        x, g, w1, w2, b2, w3, b3, out, rows, tokens, k, h1, h2, x.stride(1), g.stride(0),
        w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), w3.stride(0),
        BM=block_m, BK=BLOCK_K, H1P=h1p, BC=BLOCK_C,
        PRECISION="tf32" if precision == "tf32" else "ieee", num_warps=NUM_WARPS,
        num_stages=NUM_STAGES if h1p <= 256 else 1)
    return out
