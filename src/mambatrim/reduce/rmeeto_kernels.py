"""R-MeeTo's merge event as a few Triton launches (inference), instead of dozens of small PyTorch kernels.

1. The plan: which A (even) tokens merge into which B (odd) tokens, where every token lands, new positions and
   sizes, and for the ``r`` merged tokens their source row, destination slot and size weight. Two versions,
   chosen by the policy setting ``merge_single_max_tokens`` (default 513, also the most it allows):

   * ``_merge_plan_kernel``, one program per image, up to 513 tokens: cosine similarity of all A and B tokens
     with ``tl.dot`` over channel chunks (fp32 accumulation, norms from the same loads), each A token's best
     partner, the rank of every A token by its best similarity (the top ``r`` merge), which tokens stay, their
     slots (a prefix sum), the class token's slot, positions and sizes. Index lookups between the A, B and
     sequence spaces are one-hot reductions over at most 256 tokens (registers only, no scratch).
   * the tiled plan, any length: ``_best_partner_kernel`` (one program per ``merge_tile`` A tokens and image)
     walks the B tokens in tiles of ``merge_tile`` with a running (best similarity, partner); a stable
     descending sort on the device ranks the A tokens (ties to the lower index, as above; no host sync, so
     CUDA graphs capture it); ``_merge_slots_kernel`` (one program per image) makes passes of
     ``merge_slot_block`` tokens: kept flags and sizes (partners grow by atomic adds), the class token's slot,
     the kept tokens' slots as a running prefix sum, then the merged tokens' lists. Scratch: a few int32 /
     fp32 rows per image, no ``L x L`` table.
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

from ..ops import policy
from ..ops.intmath import cdiv, next_power_of_2

RULES = {"official": 0, "middle": 1, "boundary": 2}
CHUNK_D = 32  # channels per similarity step
PLAN_WARPS = 4
SINGLE_MAX_TOKENS = 513  # the single-program plan's limit: 256 A x 256 B similarities in registers
ROWS_SLOT_BLOCK = 256  # destination slots a row program compares at a time


@triton.jit
def _pick(values, index, space):
    """values[index] for each entry of ``index`` (1-D), through a one-hot reduction over ``space``."""
    hit = index[:, None] == space[None, :]
    return tl.sum(tl.where(hit, values[None, :], 0), axis=1)


@triton.jit
def _cosine(base, seq_a, seq_b, va, vb, D, sh_t, TA: tl.constexpr, TB: tl.constexpr, BK: tl.constexpr,
            PREC: tl.constexpr):
    """(TA, TB) cosine similarities of the rows ``seq_a`` and ``seq_b`` of one image: raw dot products and
    squared norms from the same channel chunks (fp32); ``-inf`` in the columns of invalid B tokens."""
    acc = tl.zeros((TA, TB), dtype=tl.float32)
    sq_a = tl.zeros((TA,), dtype=tl.float32)
    sq_b = tl.zeros((TB,), dtype=tl.float32)
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
    return tl.where(vb[None, :], cos, float("-inf"))


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
    base = h_ptr + b.to(tl.int64) * sh_b
    cos = _cosine(base, seq_a, seq_b, va, vb, D, sh_t, NP, NP, BK, PREC)
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
def _best_partner_kernel(h_ptr, cls_ptr, best_ptr, partner_ptr, L, D, sh_b, sh_t,
                         TA: tl.constexpr, TB: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Tiled plan, step 1: for ``TA`` A tokens of one image, the best B partner and its similarity, over tiles
    of ``TB`` B tokens with a running (best, index); a later tile must be strictly better, so ties go to the
    lower index as in one ``argmax``."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    cls = tl.load(cls_ptr + b).to(tl.int32)
    n = L - 1
    na = (n + 1) // 2
    nb = n // 2
    ia = t * TA + tl.arange(0, TA)
    va = ia < na
    seq_a = 2 * ia + (2 * ia >= cls).to(tl.int32)
    base = h_ptr + b.to(tl.int64) * sh_b
    best = tl.full((TA,), float("-inf"), tl.float32)
    partner = tl.zeros((TA,), tl.int32)
    for b0 in range(0, nb, TB):
        ib = b0 + tl.arange(0, TB)
        seq_b = 2 * ib + 1 + (2 * ib + 1 >= cls).to(tl.int32)
        cos = _cosine(base, seq_a, seq_b, va, ib < nb, D, sh_t, TA, TB, BK, PREC)
        tile_best = tl.max(cos, axis=1)
        better = tile_best > best
        partner = tl.where(better, tl.argmax(cos, axis=1).to(tl.int32) + b0, partner)
        best = tl.where(better, tile_best, best)
    a_row = b.to(tl.int64) * na
    tl.store(best_ptr + a_row + ia, best, mask=va)
    tl.store(partner_ptr + a_row + ia, partner, mask=va)


@triton.jit
def _merge_slots_kernel(
    size_ptr, pos_ptr, cls_ptr, order_ptr, partner_ptr, ksize_ptr, kept_ptr, kslot_ptr,
    out_seq_ptr, out_pos_ptr, out_size_ptr, q_ptr, src_ptr, slot_ptr, w_ptr,
    L, r, RULE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Tiled plan, step 2, one program per image, in passes of ``BLOCK`` tokens over the raster space ``k`` of
    the non-class tokens (A at even ``k``, B at odd) and over the merged tokens (``order``: A indices by
    descending best similarity, the first ``r`` merge). Scratch rows of ``n`` tokens: sizes (``ksize``, partners
    grow by atomic adds), kept flags, output slots; passes that read what another thread wrote follow a barrier
    and read through L2 (``.cg``), past any stale L1 line."""
    b = tl.program_id(0)
    cls = tl.load(cls_ptr + b).to(tl.int32)
    n = L - 1
    row = b.to(tl.int64) * L
    k_row = b.to(tl.int64) * n
    a_row = b.to(tl.int64) * ((n + 1) // 2)
    m_row = b.to(tl.int64) * r
    out_row = b.to(tl.int64) * (L - r)
    lane = tl.arange(0, BLOCK)
    # 1. every token kept, with its own size
    for k0 in range(0, n, BLOCK):
        k = k0 + lane
        km = k < n
        size = tl.load(size_ptr + row + k + (k >= cls).to(tl.int32), mask=km)
        tl.store(ksize_ptr + k_row + k, size, mask=km)
        tl.store(kept_ptr + k_row + k, km.to(tl.int32), mask=km)
    tl.debug_barrier()
    # 2. the top r A tokens leave; each B partner absorbs its merged A tokens' sizes
    for m0 in range(0, r, BLOCK):
        mm = m0 + lane < r
        a = tl.load(order_ptr + a_row + m0 + lane, mask=mm, other=0).to(tl.int32)
        dst = 2 * tl.load(partner_ptr + a_row + a, mask=mm, other=0) + 1
        tl.store(kept_ptr + k_row + 2 * a, tl.zeros((BLOCK,), tl.int32), mask=mm)
        size_a = tl.load(ksize_ptr + k_row + 2 * a, mask=mm, other=0.0, cache_modifier=".cg")
        tl.atomic_add(ksize_ptr + k_row + dst, size_a, mask=mm)
    tl.debug_barrier()
    cls_pos = tl.load(pos_ptr + row + cls)
    if RULE == 0:  # official: int(p * (L - r) // L)
        q = (cls.to(tl.int64) * (L - r) // L).to(tl.int32)
    elif RULE == 1:  # middle of the new sequence
        q = (L - r - 1) // 2
    else:  # boundary: after every kept token from the class token's left
        q = cls * 0
        for k0 in range(0, n, BLOCK):
            k = k0 + lane
            kept = tl.load(kept_ptr + k_row + k, mask=k < n, other=0, cache_modifier=".cg") > 0
            pos = tl.load(pos_ptr + row + k + (k >= cls).to(tl.int32), mask=kept, other=0)
            q += tl.sum((kept & (pos < cls_pos)).to(tl.int32), axis=0)
    # 3. kept tokens' slots: a running prefix sum in raster order, the class token's slot skipped
    before = cls * 0
    for k0 in range(0, n, BLOCK):
        k = k0 + lane
        km = k < n
        kept = tl.load(kept_ptr + k_row + k, mask=km, other=0, cache_modifier=".cg") > 0
        rank = before + tl.cumsum(kept.to(tl.int32), axis=0) - 1
        slot = rank + (rank >= q).to(tl.int32)
        seq = k + (k >= cls).to(tl.int32)
        tl.store(kslot_ptr + k_row + k, slot, mask=km)
        tl.store(out_seq_ptr + out_row + slot, seq, mask=kept)
        tl.store(out_pos_ptr + out_row + slot, tl.load(pos_ptr + row + seq, mask=kept), mask=kept)
        size = tl.load(ksize_ptr + k_row + k, mask=kept, cache_modifier=".cg")
        tl.store(out_size_ptr + out_row + slot, size, mask=kept)
        before += tl.sum(kept.to(tl.int32), axis=0)
    tl.store(out_seq_ptr + out_row + q, cls)
    tl.store(out_pos_ptr + out_row + q, cls_pos)
    tl.store(out_size_ptr + out_row + q, tl.load(size_ptr + row + cls))
    tl.store(q_ptr + b, q)
    tl.debug_barrier()
    # 4. the merged tokens, in rank order: source row, destination slot, size weight
    for m0 in range(0, r, BLOCK):
        mm = m0 + lane < r
        a2 = 2 * tl.load(order_ptr + a_row + m0 + lane, mask=mm, other=0).to(tl.int32)
        dst = 2 * tl.load(partner_ptr + a_row + a2 // 2, mask=mm, other=0) + 1
        size_a = tl.load(ksize_ptr + k_row + a2, mask=mm, other=0.0, cache_modifier=".cg")
        weight = size_a / tl.load(ksize_ptr + k_row + dst, mask=mm, other=1.0, cache_modifier=".cg")
        tl.store(src_ptr + m_row + m0 + lane, a2 + (a2 >= cls).to(tl.int32), mask=mm)
        dst_slot = tl.load(kslot_ptr + k_row + dst, mask=mm, other=0, cache_modifier=".cg")
        tl.store(slot_ptr + m_row + m0 + lane, dst_slot, mask=mm)
        tl.store(w_ptr + m_row + m0 + lane, weight, mask=mm)


@triton.jit
def _merge_rows_kernel(h_ptr, res_ptr, seq_ptr, src_ptr, slot_ptr, w_ptr, oh_ptr, ores_ptr, L, Lo, D, r,
                       HAS_RES: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr):
    """Output row ``j`` of image ``b``: its source row, plus ``w (t[a] - t[row])`` for every merged-away A token
    ``a`` whose destination slot is ``j`` (summed in fp32 in rank order, one rounding at the store). The image's
    ``r`` destination slots are compared ``RP`` at a time; a destination row then walks them one by one and
    loads only the rows merged into it."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    row = tl.load(seq_ptr + b * Lo + j).to(tl.int64)
    d = tl.arange(0, BD)
    dm = d < D
    row_off = (b.to(tl.int64) * L + row) * D + d
    out_off = (b.to(tl.int64) * Lo + j) * D + d
    x = tl.load(h_ptr + row_off, mask=dm)
    if HAS_RES:
        xr = tl.load(res_ptr + row_off, mask=dm)
    mr = tl.arange(0, RP)
    m_row = b * r
    hits = j * 0
    for m0 in range(0, r, RP):
        slots = tl.load(slot_ptr + m_row + m0 + mr, mask=m0 + mr < r, other=-1)
        hits += tl.sum((slots == j).to(tl.int32), axis=0)
    if hits == 0:  # most rows: an exact copy
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
            if tl.load(slot_ptr + m_row + m) == j:
                w = tl.load(w_ptr + m_row + m)
                a_off = (b.to(tl.int64) * L + tl.load(src_ptr + m_row + m)) * D + d
                acc += w * (tl.load(h_ptr + a_off, mask=dm).to(tl.float32) - xf)
                if HAS_RES:
                    acc_r += w * (tl.load(res_ptr + a_off, mask=dm).to(tl.float32) - xrf)
        tl.store(oh_ptr + out_off, acc.to(oh_ptr.dtype.element_ty), mask=dm)
        if HAS_RES:
            tl.store(ores_ptr + out_off, acc_r.to(ores_ptr.dtype.element_ty), mask=dm)


def _plan_settings(length: int) -> tuple[bool, int, int]:
    """(single program?, similarity tile, slot-pass block) from the policy, checked."""
    single_max, tile, block = (policy.get(name) for name in
                               ("merge_single_max_tokens", "merge_tile", "merge_slot_block"))
    if single_max > SINGLE_MAX_TOKENS:
        raise ValueError(f"merge_single_max_tokens must be at most {SINGLE_MAX_TOKENS} (the single-program plan "
                         f"holds every A x B similarity in registers), got {single_max}")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"merge_tile must be a power of two >= 16 (a tl.dot tile), got {tile}")
    if block & (block - 1):
        raise ValueError(f"merge_slot_block must be a power of two, got {block}")
    return length <= single_max, tile, block


def _tiled_plan(hidden: Tensor, sizes: Tensor, positions: Tensor, cls: Tensor, r: int, rule: int, prec: str,
                tile: int, block: int, outputs: tuple[Tensor, ...]) -> None:
    """The plan at any length: best partners in (A tile, image) programs, the ranking as a stable sort on the
    device (no host sync: CUDA-graph safe), then slots and merge lists in one program per image."""
    bsz, length, dim = hidden.shape
    n, na = length - 1, length // 2
    best = torch.empty(bsz, na, device=hidden.device, dtype=torch.float32)
    partner = torch.empty(bsz, na, device=hidden.device, dtype=torch.int32)
    _best_partner_kernel[(cdiv(na, tile), bsz)](
        hidden, cls, best, partner, length, dim, hidden.stride(0), hidden.stride(1),
        TA=tile, TB=tile, BK=CHUNK_D, PREC=prec, num_warps=policy.get("merge_tile_warps"))
    order = torch.sort(best, dim=1, descending=True, stable=True).indices  # ties: the lower A index first
    ksize = torch.empty(bsz, n, device=hidden.device, dtype=torch.float32)
    kept, kslot = torch.empty(2, bsz, n, device=hidden.device, dtype=torch.int32)
    _merge_slots_kernel[(bsz,)](sizes, positions, cls, order, partner, ksize, kept, kslot, *outputs, length, r,
                                RULE=rule, BLOCK=block, num_warps=PLAN_WARPS)


def fused_merge(hidden: Tensor, residual: Tensor | None, positions: Tensor, protected: Tensor, sizes: Tensor,
                r: int, cls_position: str) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """:func:`~mambatrim.reduce.rmeeto.merge_arrays` in two launches up to ``merge_single_max_tokens`` tokens,
    in four (three kernels and a sort) at any length beyond (no autograd). The kernels set exactly one protected
    token (the class token) aside: ``protected`` must be (B, 1) (the reducer runs the PyTorch merge otherwise)."""
    if protected.dim() != 2 or protected.shape[1] != 1:
        raise ValueError(f"fused_merge: the Triton merge handles exactly one protected (class) token, got "
                         f"protected of shape {tuple(protected.shape)}; use merge_arrays")
    cls = protected[:, 0]
    bsz, length, dim = hidden.shape
    single, tile, block = _plan_settings(length)
    hidden = hidden.contiguous()
    residual = None if residual is None else residual.contiguous()
    sizes, positions, cls = sizes.float().contiguous(), positions.contiguous(), cls.contiguous()
    out_len = length - r
    dev = hidden.device
    out_seq = torch.empty(bsz, out_len, device=dev, dtype=torch.int32)
    out_pos = torch.empty(bsz, out_len, device=dev, dtype=positions.dtype)
    out_size = torch.empty(bsz, out_len, device=dev, dtype=torch.float32)
    q = torch.empty(bsz, device=dev, dtype=torch.int32)
    src = torch.empty(bsz, r, device=dev, dtype=torch.int32)
    slot = torch.empty_like(src)
    weight = torch.empty(bsz, r, device=dev, dtype=torch.float32)
    outputs = (out_seq, out_pos, out_size, q, src, slot, weight)
    # fp32 tokens: full-precision products (tf32 would flip near-tied partners and ranks against the PyTorch
    # merge); bf16 products are exact either way
    prec = "ieee" if hidden.dtype == torch.float32 else "tf32"
    if single:
        np_ = max(16, next_power_of_2(length // 2))  # A tokens: ceil((length - 1) / 2); tl.dot needs >= 16
        _merge_plan_kernel[(bsz,)](
            hidden, sizes, positions, cls, *outputs, length, dim, r, hidden.stride(0), hidden.stride(1),
            RULE=RULES[cls_position], NP=np_, BK=CHUNK_D, num_warps=PLAN_WARPS, PREC=prec)
    else:
        _tiled_plan(hidden, sizes, positions, cls, r, RULES[cls_position], prec, tile, block, outputs)
    out_h = torch.empty(bsz, out_len, dim, device=dev, dtype=hidden.dtype)
    out_res = None if residual is None else torch.empty(bsz, out_len, dim, device=dev, dtype=residual.dtype)
    has_res = residual is not None
    res, res_out = (residual, out_res) if has_res else (hidden, out_h)  # unread stand-ins without a residual
    _merge_rows_kernel[(out_len, bsz)](hidden, res, out_seq, src, slot, weight, out_h, res_out, length, out_len,
                                       dim, r, HAS_RES=has_res, BD=next_power_of_2(dim),
                                       RP=min(next_power_of_2(r), ROWS_SLOT_BLOCK))
    return out_h, out_res, out_pos, q.to(cls.dtype)[:, None], out_size
