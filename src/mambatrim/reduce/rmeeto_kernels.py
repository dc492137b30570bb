"""R-MeeTo's merge event as two Triton launches (inference), instead of dozens of small PyTorch kernels.

1. ``_merge_plan_kernel``, one program per image: cosine similarity of the A (even) and B (odd) tokens with
   ``tl.dot`` over channel chunks (fp32 accumulation, norms from the same loads), each A token's best partner,
   the rank of every A token by its best similarity (the top ``r`` merge), which tokens stay, their slots
   (a prefix sum), the class token's slot, new positions and sizes, and for the ``r`` merged tokens: source
   row, destination slot and the size weight. Index lookups between the A, B and sequence spaces are one-hot
   reductions over at most 256 tokens (registers only, no scratch).
2. ``_merge_rows_kernel``, one program per output row (hidden and residual stream): the row's source copied,
   and where merged A tokens land in this slot, ``w (t[a] - t[row])`` added for each of them in fp32 (several
   may share a destination). The copy and the merge's weighted sum are one pass over the rows; they were two
   kernels (a copy, then a fold of the ``r`` merged rows per channel slice) before.

Same result as :func:`mambatrim.reduce.rmeeto.merge_arrays` (tests compare them); similarities are computed
in fp32 from the token values (the PyTorch path rounds the bf16 matmul's output to bf16 first), so a near-tie
may resolve differently in low precision. No autograd: re-training uses the PyTorch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

RULES = {"official": 0, "middle": 1, "boundary": 2}
CHUNK_D = 32  # channels per similarity step
PLAN_WARPS = 4


@triton.jit
def _pick(values, index, space):
    """values[index] for each entry of ``index`` (1-D), through a one-hot reduction over ``space``."""
    hit = index[:, None] == space[None, :]
    return tl.sum(tl.where(hit, values[None, :], 0), axis=1)


@triton.jit
def _merge_plan_kernel(
    h_ptr, size_ptr, pos_ptr, cls_ptr,
    out_seq_ptr, out_pos_ptr, out_size_ptr, q_ptr, src_ptr, slot_ptr, w_ptr,
    L, D, r, sh_b, sh_t,
    RULE: tl.constexpr, NP: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    b = tl.program_id(0)
    cls = tl.load(cls_ptr + b).to(tl.int32)
    n = L - 1  # tokens other than the class token
    na = (n + 1) // 2
    nb = n // 2
    i = tl.arange(0, NP)  # A (or B) index
    seq_a = 2 * i + (2 * i >= cls).to(tl.int32)
    seq_b = 2 * i + 1 + (2 * i + 1 >= cls).to(tl.int32)
    va = i < na
    vb = i < nb
    # cosine similarity: raw dot products and squared norms from the same channel chunks
    acc = tl.zeros((NP, NP), dtype=tl.float32)
    sq_a = tl.zeros((NP,), dtype=tl.float32)
    sq_b = tl.zeros((NP,), dtype=tl.float32)
    base = h_ptr + b.to(tl.int64) * sh_b
    for d0 in range(0, D, BK):
        dd = d0 + tl.arange(0, BK)
        dm = dd < D
        xa = tl.load(base + seq_a[:, None] * sh_t + dd[None, :], mask=va[:, None] & dm[None, :], other=0.0)
        xb = tl.load(base + seq_b[:, None] * sh_t + dd[None, :], mask=vb[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(xa, tl.trans(xb), acc, input_precision=PREC)
        fa = xa.to(tl.float32)
        fb = xb.to(tl.float32)
        sq_a += tl.sum(fa * fa, axis=1)
        sq_b += tl.sum(fb * fb, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(sq_a), 1e-12)
    inv_b = 1.0 / tl.maximum(tl.sqrt(sq_b), 1e-12)
    cos = acc * inv_a[:, None] * inv_b[None, :]
    cos = tl.where(vb[None, :], cos, float("-inf"))
    best = tl.max(cos, axis=1)
    partner = tl.argmax(cos, axis=1).to(tl.int32)
    best = tl.where(va, best, float("-inf"))
    # rank of each A token by best similarity (descending, ties to the lower index): the top r merge
    beats = (best[None, :] > best[:, None]) | ((best[None, :] == best[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum(beats.to(tl.int32), axis=1)
    merged = (rank < r) & va
    # raster space k (non-class tokens): A tokens at even k, B at odd k
    k = tl.arange(0, 2 * NP)
    is_a = (k % 2) == 0
    merged_k = (_pick(merged.to(tl.int32), k // 2, i) > 0) & is_a
    kept = (k < n) & (merged_k == 0)
    rank_k = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    seq_k = k + (k >= cls).to(tl.int32)
    row = b.to(tl.int64) * L
    pos_k = tl.load(pos_ptr + row + seq_k, mask=k < n, other=0)
    cls_pos = tl.load(pos_ptr + row + cls)
    if RULE == 0:  # official: int(p * (L - r) // L)
        q = cls * (L - r) // L
    elif RULE == 1:  # middle of the new sequence
        q = (L - r - 1) // 2
    else:  # boundary: after every kept token from the class token's left
        q = tl.sum((kept & (pos_k < cls_pos)).to(tl.int32), axis=0)
    slot_k = rank_k + (rank_k >= q).to(tl.int32)
    out_row = b.to(tl.int64) * (L - r)
    tl.store(out_seq_ptr + out_row + slot_k, seq_k, mask=kept)
    tl.store(out_seq_ptr + out_row + q, cls)
    tl.store(out_pos_ptr + out_row + slot_k, pos_k, mask=kept)
    tl.store(out_pos_ptr + out_row + q, cls_pos)
    # sizes: each B token absorbs the sizes of the A tokens merged into it
    size_a = tl.load(size_ptr + row + seq_a, mask=va, other=0.0)
    size_b = tl.load(size_ptr + row + seq_b, mask=vb, other=0.0)
    into = merged[:, None] & (partner[:, None] == i[None, :])  # (A, B)
    size_b_new = size_b + tl.sum(tl.where(into, size_a[:, None], 0.0), axis=0)
    size_k = tl.where(is_a, _pick(size_a, k // 2, i), _pick(size_b_new, k // 2, i))
    tl.store(out_size_ptr + out_row + slot_k, size_k, mask=kept)
    tl.store(out_size_ptr + out_row + q, tl.load(size_ptr + row + cls))
    tl.store(q_ptr + b, q)
    # the merged tokens, in rank order: source row, destination slot, size weight
    dst_rank = _pick(rank_k, 2 * partner + 1, k)
    dst_slot = dst_rank + (dst_rank >= q).to(tl.int32)
    weight = size_a / _pick(size_b_new, partner, i)
    m_row = b.to(tl.int64) * r
    tl.store(src_ptr + m_row + rank, seq_a, mask=merged)
    tl.store(slot_ptr + m_row + rank, dst_slot, mask=merged)
    tl.store(w_ptr + m_row + rank, weight, mask=merged)


@triton.jit
def _merge_rows_kernel(h_ptr, res_ptr, seq_ptr, src_ptr, slot_ptr, w_ptr, oh_ptr, ores_ptr, L, Lo, D, r,
                       HAS_RES: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr):
    """Output row ``j`` of image ``b``: its source row, plus ``w (t[a] - t[row])`` for every merged-away A token
    ``a`` whose destination slot is ``j`` (summed in fp32, one rounding at the store)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    row = tl.load(seq_ptr + b * Lo + j).to(tl.int64)
    d = tl.arange(0, BD)
    dm = d < D
    row_off = (b.to(tl.int64) * L + row) * D + d
    out_off = (b.to(tl.int64) * Lo + j) * D + d
    x = tl.load(h_ptr + row_off, mask=dm)
    if HAS_RES:
        xr = tl.load(res_ptr + row_off, mask=dm)
    mr = tl.arange(0, RP)
    slots = tl.load(slot_ptr + b * r + mr, mask=mr < r, other=-1)
    if tl.sum((slots == j).to(tl.int32), axis=0) == 0:  # most rows: an exact copy
        tl.store(oh_ptr + out_off, x, mask=dm)
        if HAS_RES:
            tl.store(ores_ptr + out_off, xr, mask=dm)
    else:
        xf = x.to(tl.float32)
        acc = xf
        if HAS_RES:
            xrf = xr.to(tl.float32)
            acc_r = xrf
        for m in range(r):  # several A tokens may share this destination
            hit = tl.load(slot_ptr + b * r + m) == j
            w = tl.where(hit, tl.load(w_ptr + b * r + m), 0.0)
            a_off = (b.to(tl.int64) * L + tl.load(src_ptr + b * r + m)) * D + d
            acc += w * (tl.load(h_ptr + a_off, mask=dm & hit, other=0.0).to(tl.float32) - xf)
            if HAS_RES:
                acc_r += w * (tl.load(res_ptr + a_off, mask=dm & hit, other=0.0).to(tl.float32) - xrf)
        tl.store(oh_ptr + out_off, acc.to(oh_ptr.dtype.element_ty), mask=dm)
        if HAS_RES:
            tl.store(ores_ptr + out_off, acc_r.to(ores_ptr.dtype.element_ty), mask=dm)


def fused_merge(hidden: Tensor, residual: Tensor | None, positions: Tensor, cls: Tensor, sizes: Tensor, r: int,
                cls_position: str) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """:func:`~mambatrim.reduce.rmeeto.merge_arrays` in two launches (no autograd)."""
    bsz, length, dim = hidden.shape
    if length - 1 > 512:
        raise ValueError(f"fused_merge handles up to 513 tokens, got {length}")
    hidden = hidden.contiguous()
    residual = None if residual is None else residual.contiguous()
    out_len = length - r
    dev = hidden.device
    np_ = max(16, triton.next_power_of_2(length // 2))  # A tokens: ceil((length - 1) / 2); tl.dot needs >= 16
    out_seq = torch.empty(bsz, out_len, device=dev, dtype=torch.int32)
    out_pos = torch.empty(bsz, out_len, device=dev, dtype=positions.dtype)
    out_size = torch.empty(bsz, out_len, device=dev, dtype=torch.float32)
    q = torch.empty(bsz, device=dev, dtype=torch.int32)
    src = torch.empty(bsz, r, device=dev, dtype=torch.int32)
    slot = torch.empty_like(src)
    weight = torch.empty(bsz, r, device=dev, dtype=torch.float32)
    _merge_plan_kernel[(bsz,)](
        hidden, sizes.float().contiguous(), positions.contiguous(), cls.contiguous(),
        out_seq, out_pos, out_size, q, src, slot, weight,
        length, dim, r, hidden.stride(0), hidden.stride(1),
        RULE=RULES[cls_position], NP=np_, BK=CHUNK_D, num_warps=PLAN_WARPS,
        # fp32 tokens: full-precision products (tf32 would flip near-tied partners and ranks against the
        # PyTorch merge); bf16 products are exact either way
        PREC="ieee" if hidden.dtype == torch.float32 else "tf32")
    out_h = torch.empty(bsz, out_len, dim, device=dev, dtype=hidden.dtype)
    out_res = None if residual is None else torch.empty(bsz, out_len, dim, device=dev, dtype=residual.dtype)
    has_res = residual is not None
    res, res_out = (residual, out_res) if has_res else (hidden, out_h)  # unread stand-ins without a residual
    _merge_rows_kernel[(bsz, out_len)](hidden, res, out_seq, src, slot, weight, out_h, res_out, length, out_len,
                                       dim, r, HAS_RES=has_res, BD=triton.next_power_of_2(dim),
                                       RP=triton.next_power_of_2(r))
    return out_h, out_res, out_pos, q.to(cls.dtype), out_size
