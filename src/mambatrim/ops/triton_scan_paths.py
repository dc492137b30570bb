"""The multi-order selective scan in Triton: K paths reading their inputs through a visiting index.

Contract: :func:`mambatrim.ops.scan_paths.scan_paths`. Design (as :mod:`.triton_scan`, whose helpers it
uses):
* Every input is a 4-D logical view ``(path, batch, channel|state, position)`` with arbitrary strides: a tensor
  shared by the paths has path stride 0, a per-path channel slice is a strided view; nothing is copied.
* Forward: one program per (channel block, sample) loops over the K paths when they are summed (the output is
  read-added-written in path order: deterministic, no atomics), or one program per (channel block, sample,
  path) when each path owns its output slice. Step t of path k loads ``tok = index[k, b, t]`` and reads u,
  delta, B, C at ``tok`` or at t (``U_TOKEN`` / ``BC_TOKEN``), z at ``tok``, and writes y to ``tok``. The
  fp32 state stays in registers, the sequence length is a runtime value (no recompilation per L), and loads
  run two steps ahead of the arithmetic. Training stores the state every ``scan_ckpt_chunk`` steps.
* Backward: one program per (channel block, sample, path) walks the checkpoint chunks in reverse scan order
  (recompute the chunk's states into a per-program scratch, then walk back with the state gradient in
  registers). du, d(delta), dz go through the same index into per-path buffers (autograd sums the paths of a
  shared input); dB, dC are fp32 atomic sums over channel blocks; the gap's term on the previous step's delta
  is carried in registers to that step. No sequence split (a path's scan is one program).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import policy
from .intmath import cdiv, next_power_of_2
from .triton_scan import _carry_back, _carry_in, _check_device, _chunk_bases, _chunk_buffers, _delta, _gate_back, \
    _sm_count, _state_back, seq_chunk

__all__ = ["scan_paths_triton"]


@triton.jit
def _positions(s, ok, i_base, si_t, U_TOKEN: tl.constexpr, BC_TOKEN: tl.constexpr):
    """Token of step ``s`` and where u and (delta, B, C) are read for it."""
    tok = tl.load(i_base + s * si_t, mask=ok, other=0)
    pu = s
    if U_TOKEN:
        pu = tok
    pb = s
    if BC_TOKEN:
        pb = tok
    return tok, pu, pb


@triton.jit
def _path_loads(s, L, i_base, si_t, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, a_base, sa_t,
                z_base, sz_t, g_base, sg_t, o_base, so_t, dmask, nmask, acc_on,
                U_TOKEN: tl.constexpr, BC_TOKEN: tl.constexpr, HAS_BADD: tl.constexpr, HAS_Z: tl.constexpr,
                HAS_GAP: tl.constexpr, ACCUM: tl.constexpr):
    """Inputs of scan step ``s`` of one path (zeros from L on): its token, u, raw delta, B (+ B_add) and C in
    fp32, z, the gap, and what earlier paths wrote at the token (summed paths)."""
    ok = s < L
    m = dmask & ok
    tok, pu, pb = _positions(s, ok, i_base, si_t, U_TOKEN, BC_TOKEN)
    u = tl.load(u_base + pu * su_t, mask=m, other=0.0)
    r = tl.load(d_base + pb * sd_t, mask=m, other=0.0)
    Bt = tl.load(B_base + pb * sB_t, mask=nmask & ok, other=0.0).to(tl.float32)
    if HAS_BADD:
        Bt += tl.load(a_base + s * sa_t, mask=nmask & ok, other=0.0).to(tl.float32)
    Ct = tl.load(C_base + pb * sC_t, mask=nmask & ok, other=0.0).to(tl.float32)
    zz = u
    if HAS_Z:
        zz = tl.load(z_base + tok * sz_t, mask=m, other=0.0)
    gp = 0.0
    if HAS_GAP:
        gp = tl.load(g_base + s * sg_t, mask=ok, other=0.0).to(tl.float32)
    prev = u
    if ACCUM:
        prev = tl.load(o_base + tok * so_t, mask=m & acc_on, other=0.0)
    return tok, u, r, Bt, Ct, zz, gp, prev


@triton.jit
def _paths_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ba_ptr, gap_ptr, idx_ptr, w_ptr, out_ptr,
    ckpt_ptr, st_ptr, sum_ptr,
    L, E, K, n_loop, n_chunks, scale, TC, NS,
    su_k, su_b, su_d, su_t, sd_k, sd_b, sd_d, sd_t, sB_k, sB_b, sB_n, sB_t, sC_k, sC_b, sC_n, sC_t,
    sz_k, sz_b, sz_d, sz_t, sa_k, sa_b, sa_t, sa_n, sg_k, sg_b, sg_t, si_k, si_b, si_t,
    so_k, so_b, so_d, so_t,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, CHUNK_T: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BADD: tl.constexpr,
    HAS_GAP: tl.constexpr, HAS_W: tl.constexpr, STORE_CKPT: tl.constexpr, U_TOKEN: tl.constexpr,
    BC_TOKEN: tl.constexpr, ACCUM: tl.constexpr, STATE_ONLY: tl.constexpr, CARRY_IN: tl.constexpr,
):
    """One (channel block, sample[, path, sequence chunk]): every path over the whole sequence (``ACCUM``,
    ``n_loop`` = K, the output summed in path order), or steps [c*TC, (c+1)*TC) of path k alone, with
    ``program_id(2) = k * NS + c``. A split scan (NS > 1, as :mod:`.triton_scan`'s): ``STATE_ONLY`` stores each
    chunk's final state from a zero start and its summed decay exponent; ``CARRY_IN`` folds the earlier chunks'
    into the true initial state, then writes the outputs."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    c = tl.program_id(2) % NS
    p0 = c * TC  # this program's scan steps: [p0, p1)
    p1 = tl.minimum(p0 + TC, L)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    dmask = d < E
    nmask = n < N
    mask2 = nmask[:, None] & dmask[None, :]  # state (N, channels): one thread owns a channel's states
    for kk in range(n_loop):
        k = tl.program_id(2) // NS + kk
        if ACCUM:
            tl.debug_barrier()  # the previous path's stores are visible to every thread of the program
        _, _, _, _, _, A2, Dv, bias, w = _path_setup(A_ptr, D_ptr, bias_ptr, w_ptr, k, pid_d, pid_b, K, E, scale,
                                                     N, NP, BD, HAS_D, HAS_BIAS, HAS_W)
        acc_on = kk > 0
        i_base = idx_ptr + k * si_k + pid_b * si_b
        u_base = u_ptr + k * su_k + pid_b * su_b + d * su_d
        d_base = dl_ptr + k * sd_k + pid_b * sd_b + d * sd_d
        z_base = z_ptr + k * sz_k + pid_b * sz_b + d * sz_d
        o_base = out_ptr + k * so_k + pid_b * so_b + d * so_d
        B_base = B_ptr + k * sB_k + pid_b * sB_b + n * sB_n
        C_base = C_ptr + k * sC_k + pid_b * sC_b + n * sC_n
        a_base = ba_ptr + k * sa_k + pid_b * sa_b + n * sa_n
        g_base = gap_ptr + k * sg_k + pid_b * sg_b
        ck_base = ckpt_ptr + ((k * tl.num_programs(1) + pid_b) * E + d[None, :]) * (n_chunks * N) + n[:, None]
        st_base, sm_base = _chunk_bases(st_ptr, sum_ptr, k, pid_b, tl.num_programs(1), NS, N, E, n, d)
        h = tl.zeros((NP, BD), dtype=tl.float32)
        if CARRY_IN:
            h = _carry_in(st_base, sm_base, A2, c, NS, False, 1, N, E, mask2, dmask, NP, BD)
        dt_prev = tl.zeros((BD,), dtype=tl.float32)
        if HAS_GAP:
            dt_prev = _delta_at(p0 - 1, L, i_base, si_t, d_base, sd_t, bias, dmask, BC_TOKEN, HAS_BIAS, SOFTPLUS)
        ex_sum = tl.zeros((BD,), dtype=tl.float32)
        t0, u0, r0, B0, C0, z0, g0, q0 = _path_loads(p0, p1, i_base, si_t, u_base, su_t, d_base, sd_t, B_base, sB_t,
                C_base, sC_t, a_base, sa_t, z_base, sz_t, g_base, sg_t, o_base, so_t, dmask, nmask, acc_on, U_TOKEN,
                BC_TOKEN, HAS_BADD, HAS_Z, HAS_GAP, ACCUM)
        t1, u1, r1, B1, C1, z1, g1, q1 = _path_loads(p0 + 1, p1, i_base, si_t, u_base, su_t, d_base, sd_t, B_base,
                sB_t, C_base, sC_t, a_base, sa_t, z_base, sz_t, g_base, sg_t, o_base, so_t, dmask, nmask, acc_on,
                U_TOKEN, BC_TOKEN, HAS_BADD, HAS_Z, HAS_GAP, ACCUM)
        dt = _delta(r0, bias, HAS_BIAS, SOFTPLUS)  # one step ahead, as in the single-order scan
        for s in range(p0, p1):
            t2, u2, r2, B2, C2, z2, g2, q2 = _path_loads(s + 2, p1, i_base, si_t, u_base, su_t, d_base, sd_t,
                    B_base, sB_t, C_base, sC_t, a_base, sa_t, z_base, sz_t, g_base, sg_t, o_base, so_t, dmask, nmask,
                    acc_on, U_TOKEN, BC_TOKEN, HAS_BADD, HAS_Z, HAS_GAP, ACCUM)
            dt_next = _delta(r1, bias, HAS_BIAS, SOFTPLUS)
            u = u0.to(tl.float32)
            ex = dt
            if HAS_GAP:
                ex = dt + g0 * dt_prev
                dt_prev = dt
            if STATE_ONLY:
                ex_sum += ex
            h = tl.exp2(ex[None, :] * A2) * h + B0[:, None] * (dt * u)[None, :]
            if not STATE_ONLY:
                y = tl.sum(h * C0[:, None], axis=0) + Dv * u
                if HAS_Z:
                    zz = z0.to(tl.float32)
                    y = y * zz / (1.0 + tl.exp2(-zz * 1.4426950408889634))
                y = y * w
                if ACCUM:
                    y += q0.to(tl.float32)
                tl.store(o_base + t0 * so_t, y.to(out_ptr.dtype.element_ty), mask=dmask)
            if STORE_CKPT:
                if (s + 1) % CHUNK_T == 0:
                    if s + 1 < L:
                        tl.store(ck_base + ((s + 1) // CHUNK_T) * N, h, mask=mask2)
            t0, u0, r0, B0, C0, z0, g0, q0 = t1, u1, r1, B1, C1, z1, g1, q1
            t1, u1, r1, B1, C1, z1, g1, q1 = t2, u2, r2, B2, C2, z2, g2, q2
            dt = dt_next
        if STATE_ONLY:
            tl.store(st_base + c * (N * E), h, mask=mask2)
            tl.store(sm_base + c * E, ex_sum, mask=dmask)


@triton.jit
def _delta_at(s, L, i_base, si_t, d_base, sd_t, bias, dmask, BC_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
              SOFTPLUS: tl.constexpr):
    """The step size of scan step ``s`` in fp32 (zero outside [0, L))."""
    ok = (s >= 0) & (s < L)
    _, _, pb = _positions(s, ok, i_base, si_t, False, BC_TOKEN)
    m = dmask & ok
    return tl.where(m, _delta(tl.load(d_base + pb * sd_t, mask=m, other=0.0), bias, HAS_BIAS, SOFTPLUS), 0.0)


@triton.jit
def _path_setup(A_ptr, D_ptr, bias_ptr, w_ptr, k, pid_d, pid_b, K, E, scale, N: tl.constexpr, NP: tl.constexpr,
                BD: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr):
    """A program's channel / state vectors and masks, and path k's A (log2 units), D, delta bias and
    output weight ``scale * weight[b, k]``."""
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    dmask = d < E
    nmask = n < N
    mask2 = nmask[:, None] & dmask[None, :]
    A2 = tl.load(A_ptr + (k * E + d[None, :]) * N + n[:, None], mask=mask2, other=0.0) * 1.4426950408889634
    Dv = tl.zeros((BD,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + k * E + d, mask=dmask, other=0.0)
    bias = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * E + d, mask=dmask, other=0.0)
    w = scale
    if HAS_W:
        w = scale * tl.load(w_ptr + pid_b * K + k)
    return d, n, dmask, nmask, mask2, A2, Dv, bias, w


@triton.jit
def _paths_bwd_carry_kernel(
    dl_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, idx_ptr, w_ptr, dout_ptr, cr_ptr, cs_ptr,
    L, E, K, scale, SEG, NSEG,
    sd_k, sd_b, sd_d, sd_t, sC_k, sC_b, sC_n, sC_t, sz_k, sz_b, sz_d, sz_t, si_k, si_b, si_t,
    so_k, so_b, so_d, so_t,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr, BC_TOKEN: tl.constexpr,
):
    """Level one of the split backward (no gaps), per (channel block, sample, path k * NSEG + segment of
    ``SEG`` steps): the state gradient the segment passes to the one before it when nothing enters it from later
    steps, and its summed decay exponent (dh_s = C_s gy_s + exp(ex_{s+1} A) dh_{s+1} folds like the forward's
    chunk states)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    k = tl.program_id(2) // NSEG
    seg_i = tl.program_id(2) % NSEG
    d, n, dmask, nmask, mask2, A2, Dv, bias, w = _path_setup(A_ptr, A_ptr, bias_ptr, w_ptr, k, pid_d, pid_b, K, E,
                                                             scale, N, NP, BD, False, HAS_BIAS, HAS_W)
    i_base = idx_ptr + k * si_k + pid_b * si_b
    d_base = dl_ptr + k * sd_k + pid_b * sd_b + d * sd_d
    z_base = z_ptr + k * sz_k + pid_b * sz_b + d * sz_d
    o_base = dout_ptr + k * so_k + pid_b * so_b + d * so_d
    C_base = C_ptr + k * sC_k + pid_b * sC_b + n * sC_n
    s_first = seg_i * SEG
    s_last = tl.minimum(s_first + SEG, L)
    carry = tl.zeros((NP, BD), dtype=tl.float32)
    ex_sum = tl.zeros((BD,), dtype=tl.float32)
    for jj in range(s_last - s_first):
        s = s_last - 1 - jj
        tok, _, pb = _positions(s, s >= 0, i_base, si_t, False, BC_TOKEN)
        dt = tl.where(dmask, _delta(tl.load(d_base + pb * sd_t, mask=dmask, other=0.0), bias, HAS_BIAS, SOFTPLUS),
                      0.0)
        carry = _carry_back(carry, dt, A2, o_base + tok * so_t, z_base + tok * sz_t, C_base + pb * sC_t, w, dmask,
                            nmask, HAS_Z)
        ex_sum += dt
    cr_base, cs_base = _chunk_bases(cr_ptr, cs_ptr, k, pid_b, tl.num_programs(1), NSEG, N, E, n, d)
    tl.store(cr_base + seg_i * (N * E), carry, mask=mask2)
    tl.store(cs_base + seg_i * E, ex_sum, mask=dmask)


@triton.jit
def _paths_bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ba_ptr, gap_ptr, idx_ptr, w_ptr, dout_ptr,
    ckpt_ptr, du_ptr, ddl_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, scratch_ptr, cr_ptr, cs_ptr,
    L, E, K, n_chunks, scale, KS, NSEG,
    su_k, su_b, su_d, su_t, sd_k, sd_b, sd_d, sd_t, sB_k, sB_b, sB_n, sB_t, sC_k, sC_b, sC_n, sC_t,
    sz_k, sz_b, sz_d, sz_t, sa_k, sa_b, sa_t, sa_n, sg_k, sg_b, sg_t, si_k, si_b, si_t,
    so_k, so_b, so_d, so_t, gx_k, gx_b, gx_d, gx_t,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BADD: tl.constexpr,
    HAS_GAP: tl.constexpr, HAS_W: tl.constexpr, U_TOKEN: tl.constexpr, BC_TOKEN: tl.constexpr,
    CARRY_IN: tl.constexpr,
):
    """Backward of path k for one (channel block, sample, segment of ``KS`` checkpoint chunks), with
    ``program_id(2) = k * NSEG + segment``: per chunk, in reverse scan order, its states recomputed into
    scratch, then the walk back. Gradients of u, delta, z go to per-path (K, b, E, L) buffers at the positions
    they were read from; dB, dC to (K, b, L, N) fp32 sums. ``CARRY_IN``: the state gradient entering the
    segment is folded from the later segments' local carries (:func:`_paths_bwd_carry_kernel`)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    k = tl.program_id(2) // NSEG
    seg_i = tl.program_id(2) % NSEG
    d, n, dmask, nmask, mask2, A2, Dv, bias, w = _path_setup(A_ptr, D_ptr, bias_ptr, w_ptr, k, pid_d, pid_b, K, E,
                                                             scale, N, NP, BD, HAS_D, HAS_BIAS, HAS_W)
    prog = (tl.program_id(2) * tl.num_programs(1) + pid_b) * tl.num_programs(0) + pid_d
    sc_base = scratch_ptr + prog.to(tl.int64) * (T * NP * BD) + n[:, None] * BD + tl.arange(0, BD)[None, :]
    ck_base = ckpt_ptr + ((k * tl.num_programs(1) + pid_b) * E + d[None, :]) * (n_chunks * N) + n[:, None]
    part = (k * tl.num_programs(1) + pid_b).to(tl.int64) * L * N
    i_base = idx_ptr + k * si_k + pid_b * si_b
    u_base = u_ptr + k * su_k + pid_b * su_b + d * su_d
    d_base = dl_ptr + k * sd_k + pid_b * sd_b + d * sd_d
    z_base = z_ptr + k * sz_k + pid_b * sz_b + d * sz_d
    o_base = dout_ptr + k * so_k + pid_b * so_b + d * so_d
    B_base = B_ptr + k * sB_k + pid_b * sB_b + n * sB_n
    C_base = C_ptr + k * sC_k + pid_b * sC_b + n * sC_n
    a_base = ba_ptr + k * sa_k + pid_b * sa_b + n * sa_n
    g_base = gap_ptr + k * sg_k + pid_b * sg_b
    gx_base = k * gx_k + pid_b * gx_b + d * gx_d
    carry = tl.zeros((NP, BD), dtype=tl.float32)  # exp(ex_{s+1} A) * dh_{s+1}
    if CARRY_IN:
        cr_base, cs_base = _chunk_bases(cr_ptr, cs_ptr, k, pid_b, tl.num_programs(1), NSEG, N, E, n, d)
        carry = _carry_in(cr_base, cs_base, A2, seg_i, NSEG, True, 1, N, E, mask2, dmask, NP, BD)
    gcarry = tl.zeros((BD,), dtype=tl.float32)  # gap_{s+1} * d(loss)/d(ex_{s+1}): step s's share via dt_s
    dA_acc = tl.zeros((NP, BD), dtype=tl.float32)
    dD_acc = tl.zeros((BD,), dtype=tl.float32)
    db_acc = tl.zeros((BD,), dtype=tl.float32)
    c_end = tl.minimum((seg_i + 1) * KS, n_chunks)
    for cc in range(c_end - seg_i * KS):
        c = c_end - 1 - cc
        h = tl.load(ck_base + c * N, mask=mask2 & (c > 0), other=0.0)
        dt_prev = tl.zeros((BD,), dtype=tl.float32)
        if HAS_GAP:
            dt_prev = _delta_at(c * T - 1, L, i_base, si_t, d_base, sd_t, bias, dmask, BC_TOKEN, HAS_BIAS,
                                SOFTPLUS)
        for j in range(T):  # pass 1: the chunk's states, forwards
            s = c * T + j
            tok, u0, r0, B0, C0, z0, g0, p0 = _path_loads(
                s, L, i_base, si_t, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, a_base, sa_t,
                z_base, sz_t, g_base, sg_t, o_base, so_t, dmask, nmask, False, U_TOKEN, BC_TOKEN, HAS_BADD,
                False, HAS_GAP, False)
            dt = tl.where(dmask & (s < L), _delta(r0, bias, HAS_BIAS, SOFTPLUS), 0.0)
            ex = dt
            if HAS_GAP:
                ex = dt + g0 * dt_prev
                dt_prev = dt
            h = tl.exp2(ex[None, :] * A2) * h + B0[:, None] * (dt * u0.to(tl.float32))[None, :]
            tl.store(sc_base + j * (NP * BD), h)
        for jj in range(T):  # pass 2: backwards through the chunk
            j = T - 1 - jj
            s = c * T + j
            ok = s < L
            m = dmask & ok
            tok, u0, r0, Bt, Ct, z0, gp, p0 = _path_loads(
                s, L, i_base, si_t, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, a_base, sa_t,
                z_base, sz_t, g_base, sg_t, o_base, so_t, dmask, nmask, False, U_TOKEN, BC_TOKEN, HAS_BADD,
                HAS_Z, HAS_GAP, False)
            _, pu, pb = _positions(s, ok, i_base, si_t, U_TOKEN, BC_TOKEN)
            h = tl.load(sc_base + j * (NP * BD))
            u = u0.to(tl.float32)
            raw = _delta(r0, bias, HAS_BIAS, False)
            dt = tl.where(m, _delta(raw, bias, False, SOFTPLUS), 0.0)
            ex = dt
            if HAS_GAP:
                ex = dt + gp * _delta_at(s - 1, L, i_base, si_t, d_base, sd_t, bias, dmask, BC_TOKEN, HAS_BIAS,
                                         SOFTPLUS)
            dout = tl.load(o_base + tok * so_t, mask=m, other=0.0).to(tl.float32) * w
            gy = dout
            if HAS_Z:
                y = tl.sum(h * Ct[:, None], axis=0) + Dv * u
                zz = z0.to(tl.float32)
                gy, sig = _gate_back(dout, zz)
                dz = dout * y * sig * (1.0 + zz * (1.0 - sig))
                tl.store(dz_ptr + gx_base + tok * gx_t, dz.to(dz_ptr.dtype.element_ty), mask=m)
            carry, de, dA_step, dhB, dB_t, dC_t = _state_back(h, Bt, Ct, gy, dt, u, ex, A2, carry)
            dA_acc += dA_step
            ddt = dhB * u + de + gcarry
            if HAS_GAP:
                gcarry = tl.where(m, gp * de, 0.0)
            du = dhB * dt + gy * Dv
            dD_acc += gy * u
            tl.atomic_add(dB_ptr + part + pb * N + n, dB_t, mask=nmask & ok, sem="relaxed")
            tl.atomic_add(dC_ptr + part + pb * N + n, dC_t, mask=nmask & ok, sem="relaxed")
            tl.store(du_ptr + gx_base + pu * gx_t, du.to(du_ptr.dtype.element_ty), mask=m)
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp2(-raw * 1.4426950408889634))
            ddt = tl.where(m, ddt, 0.0)
            db_acc += ddt
            tl.store(ddl_ptr + gx_base + pb * gx_t, ddt.to(ddl_ptr.dtype.element_ty), mask=m)
    tl.atomic_add(dA_ptr + (k * E + d[None, :]) * N + n[:, None], dA_acc, mask=mask2)
    if HAS_D:
        tl.atomic_add(dD_ptr + k * E + d, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + k * E + d, db_acc, mask=dmask)


# ----------------------------------------------------------------------------------------------- host side
def _strides(t: Tensor | None, dims: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * dims


def _token_major(bsz: int, channels: int, length: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, channels, L) logical in (b, L, channels) memory: what out_proj reads without a copy."""
    return torch.empty(bsz, length, channels, device=like.device, dtype=dtype).transpose(1, 2)


def _grad_buffer(ref: Tensor) -> Tensor:
    """Zeroed (K, b, E, L) gradient in (K, b, L, E) memory: a program's channels are adjacent at every token."""
    K, bsz, E, L = ref.shape
    return torch.zeros(K, bsz, L, E, device=ref.device, dtype=ref.dtype).transpose(2, 3)


def _per_path_out(out: Tensor, paths: int, accum: bool) -> Tensor:
    """The (K, b, E, L) view kernels write or read: the summed output repeated (stride 0), or its slices."""
    if accum:
        return out[None].expand(paths, -1, -1, -1)
    return out.unflatten(1, (paths, out.shape[1] // paths)).transpose(0, 1)


def _launch(kernel, grid, tensors, geometry, **flags):
    """Launch a path kernel: placeholders for absent tensors, then every strided view's strides in the
    kernels' order (u, delta, B, C, z, B_add, gap, index, output[, gradients])."""
    u = tensors[0]
    ptrs = [t if t is not None else u for t in tensors]
    return kernel[grid](*ptrs, *geometry, **flags)


class _PathsFn(torch.autograd.Function):
    """Autograd over the 4-D per-path views (autograd itself sums the paths of a shared or expanded input)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, badd, gap, index, weight, softplus: bool, u_token: bool,
                bc_token: bool, accum: bool, scale: float, need_grad: bool):
        K, bsz, E, L = u.shape
        N = A.shape[-1]
        out = _token_major(bsz, E if accum else K * E, L, u, u.dtype)
        out4 = _per_path_out(out, K, accum)
        chunk = policy.get("scan_ckpt_chunk")
        n_chunks = cdiv(L, chunk)
        ckpt = (torch.empty(K, bsz, E, n_chunks, N, device=u.device, dtype=torch.float32) if need_grad
                else u.new_empty(1, dtype=torch.float32))
        block_d = min(policy.get("scan_paths_fwd_block_d"), next_power_of_2(E))
        n_loop = K if accum else 1
        n_blocks = cdiv(E, block_d)
        # summed paths share their output tokens: one program walks them all, unsplit
        tc = L if accum else seq_chunk(L, n_blocks * bsz * K, _sm_count(u.device), multiple=chunk)
        ns = cdiv(L, tc)
        states, sums = _chunk_buffers(u, K, bsz, ns, N, E)
        grid = (n_blocks, bsz, K // n_loop * ns)
        strides = (*_strides(u, 4), *_strides(delta, 4), *_strides(B, 4), *_strides(C, 4), *_strides(z, 4),
                   *_strides(badd, 4), *_strides(gap, 3), *_strides(index, 3), *_strides(out4, 4))
        flags = _flags(D, z, bias, badd, gap, weight, softplus, u_token, bc_token, N)
        tensors = (u, delta, A, B, C, D, z, bias, badd, gap, index, weight, out4, ckpt, states, sums)
        geometry = (L, E, K, n_loop, n_chunks, scale, tc, ns, *strides)
        shared = dict(BD=block_d, CHUNK_T=chunk, ACCUM=accum, num_warps=policy.get("scan_fwd_warps"), **flags)
        if ns > 1:
            _launch(_paths_fwd_kernel, grid, tensors, geometry, STORE_CKPT=False, STATE_ONLY=True, CARRY_IN=False,
                    **shared)
        _launch(_paths_fwd_kernel, grid, tensors, geometry, STORE_CKPT=need_grad, STATE_ONLY=False,
                CARRY_IN=ns > 1, **shared)
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, bias, badd, gap, index, weight, ckpt)
            ctx.flags = (softplus, u_token, bc_token, accum, scale, chunk)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, bias, badd, gap, index, weight, ckpt = ctx.saved_tensors
        softplus, u_token, bc_token, accum, scale, chunk = ctx.flags
        K, bsz, E, L = u.shape
        N = A.shape[-1]
        dout4 = _per_path_out(dout, K, accum)
        du, ddl = _grad_buffer(u), _grad_buffer(delta)
        dz = _grad_buffer(z) if z is not None else None
        dB = torch.zeros(K, bsz, L, N, device=u.device, dtype=torch.float32)  # position order, summed over blocks
        dC = torch.zeros_like(dB)
        dA = torch.zeros(K, E, N, device=u.device, dtype=torch.float32)
        dD = torch.zeros(K, E, device=u.device, dtype=torch.float32)
        dbias = torch.zeros(K, E, device=u.device, dtype=torch.float32)
        block_d = min(policy.get("scan_paths_bwd_block_d"), next_power_of_2(E))
        n_blocks, n_chunks = cdiv(E, block_d), ckpt.shape[3]
        per_seg = n_chunks  # gaps tie each step to the one before it: those scans stay one program per path
        if gap is None:
            per_seg = cdiv(seq_chunk(L, n_blocks * bsz * K, _sm_count(u.device), multiple=chunk,
                                     backward=True), chunk)
        n_seg = cdiv(n_chunks, per_seg)
        grid = (n_blocks, bsz, K * n_seg)
        np2 = max(2, next_power_of_2(N))
        scratch = torch.empty(n_blocks * bsz * K * n_seg * chunk * np2 * block_d, device=u.device,
                              dtype=torch.float32)
        carries, sums = _chunk_buffers(u, K, bsz, n_seg, N, E)
        flags = _flags(D, z, bias, badd, gap, weight, softplus, u_token, bc_token, N)
        if n_seg > 1:  # level one: each segment's own carry; the main kernel folds those of later segments
            _paths_bwd_carry_kernel[grid](
                delta, A, C, z if z is not None else u, bias if bias is not None else u, index,
                weight if weight is not None else u, dout4, carries, sums, L, E, K, scale, per_seg * chunk, n_seg,
                *_strides(delta, 4), *_strides(C, 4), *_strides(z, 4), *_strides(index, 3), *_strides(dout4, 4),
                BD=block_d, num_warps=policy.get("scan_bwd_warps"),
                **{f: flags[f] for f in ("N", "NP", "SOFTPLUS", "HAS_Z", "HAS_BIAS", "HAS_W", "BC_TOKEN")})
        strides = (*_strides(u, 4), *_strides(delta, 4), *_strides(B, 4), *_strides(C, 4), *_strides(z, 4),
                   *_strides(badd, 4), *_strides(gap, 3), *_strides(index, 3), *_strides(dout4, 4),
                   *_strides(du, 4))
        _launch(_paths_bwd_kernel, grid,
                (u, delta, A, B, C, D, z, bias, badd, gap, index, weight, dout4, ckpt, du, ddl, dA, dB, dC, dD,
                 dz if dz is not None else du, dbias, scratch, carries, sums),
                (L, E, K, n_chunks, scale, per_seg, n_seg, *strides),
                BD=block_d, T=chunk, CARRY_IN=n_seg > 1, num_warps=policy.get("scan_bwd_warps"), **flags)
        dbadd = None
        if badd is not None:  # B_add is read at step t: the B gradient of the position step t read
            at = dB.gather(2, index[..., None].expand(-1, -1, -1, N)) if bc_token else dB
            dbadd = at.to(badd.dtype)
        grads = [du, ddl, dA, dB.to(B.dtype).transpose(2, 3), dC.to(C.dtype).transpose(2, 3),
                 dD if D is not None else None, dz, dbias if bias is not None else None, dbadd]
        grads = [g if ctx.needs_input_grad[i] else None for i, g in enumerate(grads)]
        return (*grads, None, None, None, None, None, None, None, None, None)


def _flags(D, z, bias, badd, gap, weight, softplus, u_token, bc_token, N) -> dict:
    return dict(N=N, NP=max(2, next_power_of_2(N)), SOFTPLUS=softplus, HAS_D=D is not None,
                HAS_Z=z is not None, HAS_BIAS=bias is not None, HAS_BADD=badd is not None, HAS_GAP=gap is not None,
                HAS_W=weight is not None, U_TOKEN=u_token, BC_TOKEN=bc_token)


def scan_paths_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, index, u_at, bc_at, B_add, gap,
                      weight, combine, scale) -> Tensor:
    """:func:`~mambatrim.ops.scan_paths.scan_paths` on the Triton kernels; inputs as it normalises them."""
    _check_device(u, delta, A, B, C, D, z, delta_bias, index, B_add, gap, weight)
    if weight is not None and torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("scan_paths: the triton backend has no gradient for weight; detach it or use "
                         "backend='torch'")
    fp32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, B_add))
    return _PathsFn.apply(u, delta, fp32(A), B, C, fp32(D), z, fp32(delta_bias), B_add, fp32(gap), index,
                          fp32(None if weight is None else weight.detach()), delta_softplus, u_at == "token",
                          bc_at == "token", combine == "sum", float(scale), need_grad)
