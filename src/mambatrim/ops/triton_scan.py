"""Selective scan in Triton: fused forward and backward kernels, one or two directions per launch.

Design (see docs/gpu.md):
* Every tensor is seen as a 4-D *logical* view ``(group, batch, channel, time)`` with arbitrary strides, so the
  kernels read channel-major ``(B, D, L)`` inputs and Vim's token-major ``(B, L, D)`` activations alike, without
  copies. ``group`` is the scan direction of a fused bidirectional pair (stride 0 for shared tensors).
* Forward: one program per (batch, block of channels); the fp32 state (channels, N) lives in registers and the
  program walks the sequence (runtime L: no recompilation when L changes). Softplus of ``delta + bias``,
  ``exp2`` discretisation (log2(e) folded into A), C-contraction, D skip and ``silu(z)`` gating are fused.
  ``reverse`` only changes the addresses (no flipped copies). A pair writes both directions into one output,
  ``scale * (y_fwd + y_bwd)``. Two schedules: the tiled walk (the default, policy ``scan_fwd_tile`` = T) takes
  T steps at a time on a (T, states, channels) tile, one thread per channel holding all its states: the tile's
  exponentials are issued together and the recurrence runs inside each thread; its loop is software-pipelined
  (``scan_fwd_tile_stages``) and it reads 16-bit B and C from fp32 copies (``scan_fwd_bc_fp32``).
  ``scan_fwd_tile=0`` walks one step at a time, the state spread over a warp's threads.
* Training: the forward also stores the state every ``scan_ckpt_chunk`` steps (a policy setting; ``L / chunk``
  states, not L). The backward walks the chunks in reverse scan order. Two schedules: the tiled one (the
  default, policy ``scan_bwd_tile`` = T) recomputes the states entering each T-step tile of a chunk, then per
  tile, last first, scans the tile's states and their gradients inside each thread on a (T, states, channels)
  tile (4 states x 4 channels a thread) and sums dB / dC over the channels once a tile; ``scan_bwd_tile=0``
  (and any scan with gaps) recomputes a chunk's states into a small per-program scratch, then walks back one
  step at a time with the state gradient in registers.
  dB, dC (summed over channel blocks), dA, dD and d(delta_bias) use fp32 atomics (per-block partials of dB
  and dC, summed afterwards, cost two 90 MB buffers and a reduction per Vim-S layer at batch 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import policy
from .intmath import cdiv, next_power_of_2

__all__ = ["selective_scan_triton", "selective_scan_pair_triton", "seq_chunk", "fwd_block", "fwd_chunk"]

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (decided when the kernels are defined, as Triton does)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# log2 as the GPU's approximate instruction (MUFU.LG2, relative error ~1e-7): the libdevice log2 is ~30 dependent
# instructions at the head of every scan step; the interpreter cannot run inline PTX and keeps tl.log2
FAST_LOG2 = tl.constexpr(not _interpreting())


@triton.jit
def _log2(x):
    if FAST_LOG2:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _softplus(x):
    # log(1 + e^x) with the usual threshold (torch uses 20): exp2/log2 forms
    return tl.where(x > 20.0, x, _log2(1.0 + tl.exp2(x * 1.4426950408889634)) * 0.6931471805599453)


@triton.jit
def _time_index(s, L, rev: tl.constexpr):
    """Sequence position of scan step ``s`` (right to left when ``rev``)."""
    t = s
    if rev:
        t = L - 1 - s
    return t


@triton.jit
def _delta(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The step size in fp32: ``softplus(raw + bias)``, each part optional."""
    dt = raw.to(tl.float32)
    if HAS_BIAS:
        dt = dt + bias
    if SOFTPLUS:
        dt = _softplus(dt)
    return dt


@triton.jit
def _step_loads(t, ok, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, z_base, sz_t, dmask, nmask,
                HAS_Z: tl.constexpr, HAS_C: tl.constexpr):
    """u, delta, B, C and z at sequence position ``t`` in their raw dtypes (zeros where not ``ok``; z is u
    without a gate, C is B when not read)."""
    m = dmask & ok
    u = tl.load(u_base + t * su_t, mask=m, other=0.0)
    r = tl.load(d_base + t * sd_t, mask=m, other=0.0)
    Bt = tl.load(B_base + t * sB_t, mask=nmask & ok, other=0.0)
    Ct = Bt
    if HAS_C:
        Ct = tl.load(C_base + t * sC_t, mask=nmask & ok, other=0.0)
    if HAS_Z:
        zz = tl.load(z_base + t * sz_t, mask=m, other=0.0)
    else:
        zz = u
    return u, r, Bt, Ct, zz


@triton.jit
def _eighths(x, BC8: tl.constexpr):
    """``x`` as a multiple of 8 where the host found it so (``BC8``): Triton specialises only integers divisible
    by 16, and a Vim layer's B and C are columns of x_proj's output (row stride dt_rank + 2 x d_state = 56 for
    Vim-S); told, the compiler reads their rows with 16-byte vector loads and can prefetch them asynchronously."""
    if BC8:
        x = (x // 8) * 8
    return x


@triton.jit
def _prefetch(ptrs):
    """Ask the memory system to bring ``ptrs``' lines into L2 ahead of their loads: a hint (no register, no wait,
    no fault). The software pipeline copies u and the step sizes ahead asynchronously where their channel stride
    is 1 (as launched), not the accumulated output (read and written by the same walk); the hint covers every
    16-bit row at little cost. Into L1 instead measured the same (H100)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gap_ptr, out_ptr, out2_ptr, ckpt_ptr, on_ptr,
    st_ptr, sum_ptr,
    L, E, n_chunks, scale, TC, NS,
    su_g, su_b, su_d, su_t,
    sd_g, sd_b, sd_d, sd_t,
    sB_g, sB_b, sB_n, sB_t,
    sC_g, sC_b, sC_n, sC_t,
    sz_g, sz_b, sz_d, sz_t,
    so_b, so_d, so_t,
    sg_g, sg_b, sg_t,
    G: tl.constexpr, PAIR: tl.constexpr, REVERSE: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
    BD: tl.constexpr, CHUNK_T: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GAP: tl.constexpr, STORE_CKPT: tl.constexpr, HAS_ON: tl.constexpr,
    STATE_ONLY: tl.constexpr, CARRY_IN: tl.constexpr, BC8: tl.constexpr, T: tl.constexpr, STAGES: tl.constexpr,
    SPLIT_G: tl.constexpr, GATE_LAST: tl.constexpr, PF: tl.constexpr = 0,
):
    """One (channel block, sample, sequence chunk of ``TC`` positions). Single pass: one chunk (TC = L).
    Split: ``STATE_ONLY`` scans each chunk from a zero state and stores its final state and its summed decay
    exponent (per channel: the chunk's total decay is exp2(A2 * sum)); ``CARRY_IN`` then folds the states of
    the chunks before this one (in scan order) into its true initial state and writes the outputs. The walk
    goes one step at a time (``T`` = 0, :func:`_walk_steps`) or ``T`` steps at a time (:func:`_walk_tiles`).
    ``SPLIT_G`` (pair): the directions run as separate programs (grid axis 0 holds channel blocks x 2), the
    second writing its own output to ``out2_ptr`` (same strides) for the host to add: twice the programs where
    a pair pass would leave the GPU idle. ``GATE_LAST`` (pair, one program both directions): the gate multiplies
    the sum of both directions, so the first writes its output ungated and the second gates the sum (one silu a
    position instead of two); where a per-sample switch turned the second off, the first gates its own. ``PF``
    (tiled walk): each tile prefetches the rows of u, the step sizes, z and the accumulated output ``PF`` steps
    ahead (:func:`_prefetch`), for launches with too few warps a multiprocessor to hide memory latency."""
    pid_d = tl.program_id(0)
    pid_g = 0
    if SPLIT_G:
        pid_g = pid_d // tl.cdiv(E, BD)
        pid_d = pid_d % tl.cdiv(E, BD)
    pid_b = tl.program_id(1)
    pid_c = tl.program_id(2)
    sB_g, sB_b, sB_t = _eighths(sB_g, BC8), _eighths(sB_b, BC8), _eighths(sB_t, BC8)
    sC_g, sC_b, sC_t = _eighths(sC_g, BC8), _eighths(sC_b, BC8), _eighths(sC_t, BC8)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    dmask = d < E
    nmask = n < N
    mask2 = nmask[:, None] & dmask[None, :]  # state is (N, channels): one thread owns a channel's states
    p0 = pid_c * TC  # this program's positions: [p0, p1)
    p1 = tl.minimum(p0 + TC, L)
    n_on = 0
    for g in tl.static_range(G):
        if PAIR:
            rev = g == 1
            acc = g == 1  # the second direction adds to the first one's output
        else:
            rev = REVERSE
            acc = False
        mine = 1  # this program runs direction g
        if SPLIT_G:
            acc = False
            mine = (pid_g == g).to(tl.int32)
        if STATE_ONLY:
            acc = False
        s0 = p0  # first scan step of the chunk
        if rev:
            s0 = L - p1
        steps = (p1 - p0) * mine
        acc_on = 1
        if HAS_ON:  # per-sample direction switch (inference): a switched-off direction costs no scan step
            on_g = (tl.load(on_ptr + pid_b * G + g) != 0).to(tl.int32)
            steps = steps * on_g
            acc_on = n_on  # add to the first direction's output only if it was written
            n_on = n_on + on_g * mine
        s_end = s0 + steps
        gate_on = 0  # GATE_LAST with switches: whether the first direction gates its own (the second is off)
        if GATE_LAST and HAS_ON and g == 0:
            gate_on = (tl.load(on_ptr + pid_b * G + 1) == 0).to(tl.int32)
        A2 = tl.load(A_ptr + g * E * N + d[None, :] * N + n[:, None], mask=mask2, other=0.0).to(tl.float32)
        A2 = A2 * 1.4426950408889634
        Dv = tl.zeros((BD,), dtype=tl.float32)  # read only with HAS_D
        if HAS_D:
            Dv = tl.load(D_ptr + g * E + d, mask=dmask, other=0.0).to(tl.float32)
        bias = tl.zeros((BD,), dtype=tl.float32)  # read only with HAS_BIAS
        if HAS_BIAS:
            bias = tl.load(bias_ptr + g * E + d, mask=dmask, other=0.0).to(tl.float32)
        u_base = u_ptr + g * su_g + pid_b * su_b + d * su_d
        d_base = dl_ptr + g * sd_g + pid_b * sd_b + d * sd_d
        z_base = z_ptr + g * sz_g + pid_b * sz_b + d * sz_d
        o_base = _out_rows(out_ptr, out2_ptr, g, SPLIT_G, pid_b, so_b, d, so_d)
        B_base = B_ptr + g * sB_g + pid_b * sB_b + n * sB_n
        C_base = C_ptr + g * sC_g + pid_b * sC_b + n * sC_n
        ck_base = ckpt_ptr + ((g * tl.num_programs(1) + pid_b) * E + d[None, :]) * (n_chunks * N) + n[:, None]
        gp_base = gap_ptr + g * sg_g + pid_b * sg_b
        st_base, sm_base = _chunk_bases(st_ptr, sum_ptr, g, pid_b, tl.num_programs(1), NS, N, E, n, d)
        h = tl.zeros((NP, BD), dtype=tl.float32)
        if CARRY_IN:
            h = _carry_in(st_base, sm_base, A2, pid_c, NS, rev, (steps > 0).to(tl.int32), N, E, mask2,
                          dmask, NP, BD)
        # GATE_LAST: the first direction writes ungated (no z; with switches, gated where the second is off),
        # the second gates the sum after adding
        if T == 0:
            h, ex_sum = _walk_steps(
                h, s0, s_end, steps, L, rev, acc, acc_on, GATE_LAST and HAS_ON and g == 0, gate_on, A2, Dv, bias,
                scale, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, z_base, sz_t, o_base, so_t, gp_base,
                sg_t, ck_base, dmask, nmask, mask2, N, BD,
                CHUNK_T, SOFTPLUS, HAS_D, HAS_Z and not (GATE_LAST and g == 0), GATE_LAST and g == 1, HAS_BIAS,
                HAS_GAP, STORE_CKPT, STATE_ONLY)
        else:
            h, ex_sum = _walk_tiles(
                h, s0, s_end, steps, L, rev, acc, acc_on, GATE_LAST and HAS_ON and g == 0, gate_on, A2, Dv, bias,
                scale, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, z_base, sz_t, o_base, so_t, gp_base,
                sg_t, ck_base, dmask, nmask, mask2, N, BD,
                CHUNK_T, SOFTPLUS, HAS_D, HAS_Z and not (GATE_LAST and g == 0), GATE_LAST and g == 1, HAS_BIAS,
                HAS_GAP, STORE_CKPT, STATE_ONLY, T, STAGES, PF,
                u_ptr + g * su_g + pid_b * su_b + pid_d * BD * su_d,
                dl_ptr + g * sd_g + pid_b * sd_b + pid_d * BD * sd_d,
                z_ptr + g * sz_g + pid_b * sz_b + pid_d * BD * sz_d,
                _out_rows(out_ptr, out2_ptr, g, SPLIT_G, pid_b, so_b, pid_d * BD, so_d))
        if STATE_ONLY:
            tl.store(st_base + pid_c * (N * E), h, mask=mask2 & (mine != 0))
            tl.store(sm_base + pid_c * E, ex_sum, mask=dmask & (mine != 0))
    if HAS_ON:  # every direction (of this program) switched off: the output is zero
        if not STATE_ONLY:
            for g in tl.static_range(1 + SPLIT_G):  # SPLIT_G: the program's own output
                o_base = _out_rows(out_ptr, out2_ptr, g, SPLIT_G, pid_b, so_b, d, so_d)
                for t in range(p0, p0 + (p1 - p0) * ((n_on == 0) & (pid_g == g)).to(tl.int32)):
                    tl.store(o_base + t * so_t, tl.zeros((BD,), dtype=out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _out_rows(out_ptr, out2_ptr, g: tl.constexpr, SPLIT_G: tl.constexpr, pid_b, so_b, d, so_d):
    """Where direction ``g`` writes sample ``pid_b``'s channels ``d`` (time 0): the shared output, or under
    ``SPLIT_G`` the second direction's own."""
    base = out_ptr
    if SPLIT_G:
        if g == 1:
            base = out2_ptr
    return base + pid_b * so_b + d * so_d


@triton.jit
def _gate(y, z):
    """``y * silu(z)`` (fp32; z in its raw dtype)."""
    zz = z.to(tl.float32)
    return y * zz / (1.0 + tl.exp2(-zz * 1.4426950408889634))


@triton.jit
def _skip_and_gate(y, u, z, Dv, scale, HAS_D: tl.constexpr, HAS_Z: tl.constexpr):
    """A scan output's tail: ``scale * (y + D u) * silu(z)``, each part optional (fp32; z in its raw dtype)."""
    if HAS_D:
        y = y + Dv * u
    if HAS_Z:
        y = _gate(y, z)
    return y * scale


@triton.jit
def _walk_steps(h, s0, s_end, steps, L, rev: tl.constexpr, acc: tl.constexpr, acc_on, GATE_IF: tl.constexpr,
                gate_on, A2, Dv, bias, scale, u_base,
                su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, z_base, sz_t, o_base, so_t, gp_base, sg_t, ck_base,
                dmask, nmask, mask2, N: tl.constexpr, BD: tl.constexpr, CHUNK_T: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GATE_AFTER: tl.constexpr,
                HAS_BIAS: tl.constexpr,
                HAS_GAP: tl.constexpr, STORE_CKPT: tl.constexpr, STATE_ONLY: tl.constexpr):
    """One direction's scan steps ``s0 .. s_end`` from state ``h``, one step at a time (a warp holds a block of
    channels, 4 states a thread); returns the final state and the summed decay exponent."""
    dt_prev = _delta_before(s0, L, rev, d_base, sd_t, bias, dmask, HAS_GAP, HAS_BIAS, SOFTPLUS, BD)
    ex_sum = tl.zeros((BD,), dtype=tl.float32)
    # loads run two steps ahead of the arithmetic (registers as a software pipeline): each step's inputs
    # sit in other cache lines, so without this every step waits a full memory latency
    u0, r0, B0, C0, z0, g0, p0v = _fwd_loads(s0, s_end, L, rev, u_base, su_t, d_base, sd_t, B_base, sB_t,
                                             C_base, sC_t, z_base, sz_t, o_base, so_t, gp_base, sg_t, dmask,
                                             nmask, HAS_Z or GATE_IF, HAS_GAP, acc, acc_on, STATE_ONLY)
    u1, r1, B1, C1, z1, g1, p1v = _fwd_loads(s0 + 1, s_end, L, rev, u_base, su_t, d_base, sd_t, B_base,
                                             sB_t, C_base, sC_t, z_base, sz_t, o_base, so_t, gp_base, sg_t,
                                             dmask, nmask, HAS_Z or GATE_IF, HAS_GAP, acc, acc_on, STATE_ONLY)
    # the step size runs one step ahead too: its softplus (independent of the state) then overlaps the
    # previous step's state update instead of heading every step's dependent chain
    dt = _delta(r0, bias, HAS_BIAS, SOFTPLUS)
    ex = dt  # the decay exponent: with gaps, a skipped position's step size too (dt_prev is 0 at the start)
    if HAS_GAP:
        ex = dt + g0 * dt_prev
    for j in range(steps):
        s = s0 + j
        u2, r2, B2, C2, z2, g2, p2v = _fwd_loads(s + 2, s_end, L, rev, u_base, su_t, d_base, sd_t, B_base,
                                                 sB_t, C_base, sC_t, z_base, sz_t, o_base, so_t, gp_base,
                                                 sg_t, dmask, nmask, HAS_Z or GATE_IF, HAS_GAP, acc, acc_on, STATE_ONLY)
        dt_next = _delta(r1, bias, HAS_BIAS, SOFTPLUS)
        ex_next = dt_next
        if HAS_GAP:
            ex_next = dt_next + g1 * dt
        t = _time_index(s, L, rev)
        u = u0.to(tl.float32)
        if STATE_ONLY:
            ex_sum += ex
        h = tl.exp2(ex[None, :] * A2) * h + B0.to(tl.float32)[:, None] * (dt * u)[None, :]
        if not STATE_ONLY:
            y = _skip_and_gate(tl.sum(h * C0.to(tl.float32)[:, None], axis=0), u, z0, Dv, scale, HAS_D,
                               HAS_Z and not GATE_AFTER)
            if acc:
                y = y + p0v.to(tl.float32)
            if GATE_AFTER:  # the pair's gate on the sum of both directions
                y = _gate(y, z0)
            if GATE_IF:  # the pair's first direction, where the second is off for this sample (z loaded ahead)
                if gate_on != 0:
                    y = _gate(y, z0)
            tl.store(o_base + t * so_t, y.to(o_base.dtype.element_ty), mask=dmask)
        if STORE_CKPT:
            if (s + 1) % CHUNK_T == 0:
                if s + 1 < L:
                    tl.store(ck_base + ((s + 1) // CHUNK_T) * N, h, mask=mask2)
        u0, r0, B0, C0, z0, g0, p0v = u1, r1, B1, C1, z1, g1, p1v
        u1, r1, B1, C1, z1, g1, p1v = u2, r2, B2, C2, z2, g2, p2v
        dt = dt_next
        ex = ex_next
    return h, ex_sum


@triton.jit
def _combine_decay(a1, b1, a2, b2):
    """(decay, value) pairs of consecutive steps: applying the first, then the second."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _tile_states(h, ex, dt, u, Bt, A3, first):
    """The states after each step of a (T, states, channels) tile entered with state ``h``, and the tile's decays
    exp2(ex A) and inputs (B dt u); ``ex`` the steps' decay exponents (dt, plus the gaps' share), ``A3`` A in
    log2 units, (1, states, channels). The carried state enters at the first row; the recurrence
    h_s = dA_s h_(s-1) + bx_s runs within each thread, so the scan's decay products are unused."""
    dA = tl.exp2(ex[:, None, :] * A3)
    bx = Bt[:, :, None] * (dt * u)[:, None, :]
    _, hs = tl.associative_scan((dA, tl.where(first, dA * h[None, :, :] + bx, bx)), 0, _combine_decay)
    return hs, dA, bx


@triton.jit
def _tile_delta(s, lo, s_end, L, rev: tl.constexpr, d_base, sd_t, bias, dmask, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr):
    """Step sizes of scan steps ``s`` (a (T,) vector), (T, channels), zero from ``s_end`` on and before ``lo``;
    also the (T, channels) mask, the steps' time indices and which steps are in range."""
    ok = (s < s_end) & (s >= lo)
    m = ok[:, None] & dmask[None, :]
    t = _time_index(s, L, rev)
    raw = tl.load(d_base + t[:, None] * sd_t, mask=m, other=0.0)
    return tl.where(m, _delta(raw, bias[None, :], HAS_BIAS, SOFTPLUS), 0.0), m, t, ok


@triton.jit
def _walk_tiles(h, s0, s_end, steps, L, rev: tl.constexpr, acc: tl.constexpr, acc_on, GATE_IF: tl.constexpr,
                gate_on, A2, Dv, bias, scale, u_base,
                su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, z_base, sz_t, o_base, so_t, gp_base, sg_t, ck_base,
                dmask, nmask, mask2, N: tl.constexpr, BD: tl.constexpr, CHUNK_T: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, GATE_AFTER: tl.constexpr,
                HAS_BIAS: tl.constexpr,
                HAS_GAP: tl.constexpr, STORE_CKPT: tl.constexpr, STATE_ONLY: tl.constexpr, T: tl.constexpr,
                STAGES: tl.constexpr, PF: tl.constexpr, pf_u, pf_d, pf_z, pf_o):
    """The same walk ``T`` steps at a time (the tiled schedule, ``scan_fwd_tile``): the (T, states, channels)
    tile's step exponentials do not depend on the state and are issued together; one thread holds all states of
    its channel (BD = 32 x warps), so the recurrence runs inside each thread (one FMA a state and step) and the
    C-contraction needs no shuffle. The loop must be software-pipelined (``STAGES`` > 1) to pay."""
    k = tl.arange(0, T)
    first = (k == 0)[:, None, None]
    last = (k == T - 1)[:, None, None]
    ex_sum = tl.zeros((BD,), dtype=tl.float32)
    start = s0
    if STORE_CKPT and CHUNK_T % T == 0:
        # tiles on multiples of T, so that a stored state (every CHUNK_T steps) is always a tile's last one; the
        # rows before s0 of the first tile are masked (step size 0: no decay, no input)
        start = s0 - s0 % T
    for c in tl.range(tl.cdiv(s_end - start, T) * (steps > 0).to(tl.int32), num_stages=STAGES):
        s = start + c * T + k
        if PF > 0:  # one address a row and tensor (``pf_*``: the block's first channel; its 32 channels lie in one
            # or two lines where the channel stride is 1, as launched)
            tp = _time_index(tl.minimum(s + PF, s_end - 1), L, rev)
            _prefetch(pf_d + tp * sd_t)
            _prefetch(pf_u + tp * su_t)
            if not STATE_ONLY:
                if HAS_Z or GATE_IF:
                    _prefetch(pf_z + tp * sz_t)
                if acc:
                    _prefetch(pf_o + tp * so_t)
        dt, m, t, ok = _tile_delta(s, s0, s_end, L, rev, d_base[None, :], sd_t, bias, dmask, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_base[None, :] + t[:, None] * su_t, mask=m, other=0.0).to(tl.float32)
        Bt = tl.load(B_base[None, :] + t[:, None] * sB_t, mask=ok[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        ex = dt
        if HAS_GAP:  # a skipped position's step size decays the state too (zero before the first step); the
            # previous steps' sizes are loaded and computed again (moving rows inside a tile has no cheap form)
            dtp, _, _, _ = _tile_delta(s - 1, 0, s_end, L, rev, d_base[None, :], sd_t, bias, dmask, HAS_BIAS,
                                    SOFTPLUS)
            gp = tl.load(gp_base + t * sg_t, mask=ok, other=0.0).to(tl.float32)
            ex = dt + gp[:, None] * dtp
        if STATE_ONLY:
            ex_sum += tl.sum(ex, axis=0)
        hs, _, _ = _tile_states(h, ex, dt, u, Bt, A2[None, :, :], first)
        # the state after the tile's last step (-0.0 + x is x: the masked sum folds to a copy)
        h = tl.sum(tl.where(last, hs, -0.0), axis=0)
        if not STATE_ONLY:
            Ct = tl.load(C_base[None, :] + t[:, None] * sC_t, mask=ok[:, None] & nmask[None, :], other=0.0)
            zz = u
            if HAS_Z or GATE_IF:  # GATE_IF: loaded every tile, so that it issues early (not inside the branch below)
                zz = tl.load(z_base[None, :] + t[:, None] * sz_t, mask=m, other=0.0)
            y = _skip_and_gate(tl.sum(hs * Ct.to(tl.float32)[:, :, None], axis=1), u, zz, Dv[None, :], scale, HAS_D,
                               HAS_Z and not GATE_AFTER)
            if acc:
                y = y + tl.load(o_base[None, :] + t[:, None] * so_t, mask=m & (acc_on != 0), other=0.0).to(tl.float32)
            if GATE_AFTER:  # the pair's gate on the sum of both directions
                y = _gate(y, zz)
            if GATE_IF:  # the pair's first direction, where the second is off for this sample
                if gate_on != 0:
                    y = _gate(y, zz)
            tl.store(o_base[None, :] + t[:, None] * so_t, y.to(o_base.dtype.element_ty), mask=m)
        if STORE_CKPT:
            if CHUNK_T % T == 0:  # the state after the tile, where a checkpoint chunk ends there
                nxt = start + (c + 1) * T
                keep = (nxt % CHUNK_T == 0) & (nxt <= s_end) & (nxt < L)
                tl.store(ck_base + (nxt // CHUNK_T) * N, h, mask=mask2 & keep)
            else:
                nxt = s + 1
                keep = ok & (nxt % CHUNK_T == 0) & (nxt < L)
                tl.store(ck_base[None, :, :] + (nxt // CHUNK_T)[:, None, None] * N, hs,
                         mask=keep[:, None, None] & mask2[None, :, :])
    return h, ex_sum


@triton.jit
def _chunk_bases(st_ptr, sum_ptr, g, pid_b, bsz, NS, N: tl.constexpr, E, n, d):
    """Where chunk 0's (N, channels) state and (channels,) exponent sum of (direction g, sample) live in the
    (G, b, NS, E, N) and (G, b, NS, E) fp32 buffers. The states lie like A, (channels, states): loads of
    another order make the compiler pick another register layout for the whole scan loop (H100, Triton 3.6:
    241 instead of 159 registers a thread, 463 instead of 363 instructions a step; scan_compare results)."""
    row = (g * bsz + pid_b).to(tl.int64) * NS
    return st_ptr + row * (N * E) + d[None, :] * N + n[:, None], sum_ptr + row * E + d


@triton.jit
def _carry_in(st_base, sm_base, A2, c, NS, rev: tl.constexpr, active, N: tl.constexpr, E, mask2, dmask,
              NP: tl.constexpr, BD: tl.constexpr):
    """The true state entering chunk ``c``: the chunks before it in scan order (0..c-1, or NS-1..c+1 when
    ``rev``) folded as h = exp2(A2 * sum_k) * h + h_k. ``active`` 0 skips the walk."""
    h = tl.zeros((NP, BD), dtype=tl.float32)
    count = c
    if rev:
        count = NS - 1 - c
    for i in range(count * active):
        k = i
        if rev:
            k = NS - 1 - i
        ssum = tl.load(sm_base + k * E, mask=dmask, other=0.0)
        h = tl.exp2(ssum[None, :] * A2) * h + tl.load(st_base + k * (N * E), mask=mask2, other=0.0)
    return h


@triton.jit
def _bwd_bases(g, pid_b, d, n, u_ptr, su_g, su_b, su_d, dl_ptr, sd_g, sd_b, sd_d, z_ptr, sz_g, sz_b, sz_d, o_ptr,
               so_b, so_d, B_ptr, sB_g, sB_b, sB_n, C_ptr, sC_g, sC_b, sC_n):
    """A backward program's row pointers at time 0: u, delta, z and the output gradient per channel ``d``, B and C
    per state ``n``, of direction ``g`` and sample ``pid_b``."""
    return (u_ptr + g * su_g + pid_b * su_b + d * su_d, dl_ptr + g * sd_g + pid_b * sd_b + d * sd_d,
            z_ptr + g * sz_g + pid_b * sz_b + d * sz_d, o_ptr + pid_b * so_b + d * so_d,
            B_ptr + g * sB_g + pid_b * sB_b + n * sB_n, C_ptr + g * sC_g + pid_b * sC_b + n * sC_n)


@triton.jit
def _segment_carry(cr_ptr, csum_ptr, g, pid_b, seg_i, NSEG, A2, N: tl.constexpr, E, n, d, mask2, dmask,
                   NP: tl.constexpr, BD: tl.constexpr, CARRY_IN: tl.constexpr):
    """The state gradient entering a backward segment from the later ones (folded from their local carries,
    :func:`_scan_bwd_carry_kernel`), or zeros without ``CARRY_IN``."""
    carry = tl.zeros((NP, BD), dtype=tl.float32)
    if CARRY_IN:
        cr_base, cs_base = _chunk_bases(cr_ptr, csum_ptr, g, pid_b, tl.num_programs(1), NSEG, N, E, n, d)
        carry = _carry_in(cr_base, cs_base, A2, seg_i, NSEG, True, 1, N, E, mask2, dmask, NP, BD)
    return carry


@triton.jit
def _delta_before(s, L, rev: tl.constexpr, d_base, sd_t, bias, dmask, HAS_GAP: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BD: tl.constexpr):
    """The step size of scan step ``s - 1`` (zero at the first step, or without gaps, which alone read it)."""
    dt_prev = tl.zeros((BD,), dtype=tl.float32)
    if HAS_GAP:
        tp = _time_index(s - 1, L, rev)
        mp = dmask & (s > 0)
        rp = _delta(tl.load(d_base + tp * sd_t, mask=mp, other=0.0), bias, HAS_BIAS, SOFTPLUS)
        dt_prev = tl.where(mp, rp, 0.0)
    return dt_prev


@triton.jit
def _fwd_loads(s, s_end, L, rev: tl.constexpr, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, z_base,
               sz_t, o_base, so_t, gp_base, sg_t, dmask, nmask, HAS_Z: tl.constexpr, HAS_GAP: tl.constexpr,
               ACC: tl.constexpr, acc_on, STATE_ONLY: tl.constexpr):
    """Inputs of scan step ``s`` (raw dtypes; zeros from ``s_end`` on). The state-only pass reads no C or z."""
    ok = s < s_end
    t = _time_index(s, L, rev)
    m = dmask & ok
    u, r, Bt, Ct, zz = _step_loads(t, ok, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, z_base, sz_t,
                                   dmask, nmask, HAS_Z and not STATE_ONLY, not STATE_ONLY)
    if HAS_GAP:
        gp = tl.load(gp_base + t * sg_t, mask=ok, other=0.0).to(tl.float32)
    else:
        gp = 0.0
    if ACC:
        prev = tl.load(o_base + t * so_t, mask=m & (acc_on != 0), other=0.0)
    else:
        prev = u
    return u, r, Bt, Ct, zz, gp, prev


@triton.jit
def _direction_reverse(g, PAIR: tl.constexpr, REVERSE: tl.constexpr):
    """Whether direction ``g`` scans right to left (a pair's second direction does)."""
    rev = REVERSE
    if PAIR:
        rev = g == 1
    return rev


@triton.jit
def _bwd_program(A_ptr, bias_ptr, D_ptr, E, pid_d, pid_q, PAIR: tl.constexpr, REVERSE: tl.constexpr,
                 N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """What the backward kernels derive from their program ids: the direction ``g`` and segment of grid axis 2
    (a pair interleaves its two directions), whether it scans right to left, the channel / state index vectors
    and masks, A in log2 units, the delta bias and D (zeros where absent)."""
    if PAIR:
        g = pid_q % 2
        seg_i = pid_q // 2
    else:
        g = 0
        seg_i = pid_q
    rev = _direction_reverse(g, PAIR, REVERSE)
    d = pid_d * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    dmask = d < E
    nmask = n < N
    mask2 = nmask[:, None] & dmask[None, :]
    A2 = tl.load(A_ptr + g * E * N + d[None, :] * N + n[:, None], mask=mask2, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634
    bias = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + g * E + d, mask=dmask, other=0.0).to(tl.float32)
    Dv = tl.zeros((BD,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + g * E + d, mask=dmask, other=0.0).to(tl.float32)
    return g, seg_i, rev, d, n, dmask, nmask, mask2, A2, bias, Dv


@triton.jit
def _exponent_back(s, t, ok, m, dt, L, rev, gp_base, sg_t, d_base, sd_t, bias, HAS_GAP: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Decay exponent of scan step ``s`` (at position ``t``) and its gap: dt, plus gap * dt of step s - 1."""
    ex = dt
    gp = 0.0
    if HAS_GAP:
        gp = tl.load(gp_base + t * sg_t, mask=ok & (s > 0), other=0.0).to(tl.float32)
        tpp = t - 1
        if rev:
            tpp = t + 1
        mp = m & (s > 0)
        rp = _delta(tl.load(d_base + tpp * sd_t, mask=mp, other=0.0), bias, HAS_BIAS, SOFTPLUS)
        ex = dt + gp * tl.where(mp, rp, 0.0)
    return ex, gp


@triton.jit
def _gate_back(dout, zz):
    """Gradient reaching the ungated output through ``y * silu(z)``, and sigmoid(z)."""
    sig = 1.0 / (1.0 + tl.exp2(-zz * 1.4426950408889634))
    return dout * zz * sig, sig


@triton.jit
def _carry_back(carry, ex, A2, dout_ptrs, z_ptrs, C_ptrs, scale, dmask, nmask, HAS_Z: tl.constexpr):
    """One step of a backward segment's local carry: exp(ex A) * (C gy + carry), gy the output gradient (read
    at ``dout_ptrs``, times ``scale``) through the gate at ``z_ptrs``."""
    gy = tl.load(dout_ptrs, mask=dmask, other=0.0).to(tl.float32) * scale
    if HAS_Z:
        gy, sig = _gate_back(gy, tl.load(z_ptrs, mask=dmask, other=0.0).to(tl.float32))
    Ct = tl.load(C_ptrs, mask=nmask, other=0.0).to(tl.float32)
    return tl.exp2(ex[None, :] * A2) * (Ct[:, None] * gy[None, :] + carry)


@triton.jit
def _state_back(h, Bt, Ct, gy, dt, u, ex, A2, carry):
    """One step of the backward walk, state (N, channels) ``h`` after the step: the state gradient passed to the
    step before, d(loss)/d(decay exponent), this step's dA share, <dh, B>, and the step's dB and dC (summed over
    the program's channels)."""
    dtu = dt * u
    dh = Ct[:, None] * gy[None, :] + carry
    q = dh * (h - Bt[:, None] * dtu[None, :])  # = dh * dA * h_prev, without dividing by dA
    de = tl.sum(q * A2, axis=0) * 0.6931471805599453
    dhB = tl.sum(dh * Bt[:, None], axis=0)
    return (tl.exp2(ex[None, :] * A2) * dh, de, q * ex[None, :], dhB, tl.sum(dh * dtu[None, :], axis=1),
            tl.sum(h * gy[None, :], axis=1))


@triton.jit
def _scan_bwd_carry_kernel(
    dl_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, gap_ptr, dout_ptr, cr_ptr, csum_ptr,
    L, E, scale, SEG, NSEG,
    sd_g, sd_b, sd_d, sd_t,
    sC_g, sC_b, sC_n, sC_t,
    sz_g, sz_b, sz_d, sz_t,
    so_b, so_d, so_t,
    sg_g, sg_b, sg_t,
    PAIR: tl.constexpr, REVERSE: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAP: tl.constexpr,
    BC8: tl.constexpr,
):
    """Level one of the split backward, per (channel block, sample, direction, segment of ``SEG`` scan steps):
    the state gradient the segment passes to the one before it (dA_s0 * dh_s0) when nothing enters it from
    later steps, and the segment's summed decay exponent. dh_s = C_s * gy_s + dA_{s+1} * dh_{s+1} is a reverse
    linear recurrence, so the carries fold like the forward's chunk states."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_q = tl.program_id(2)
    sC_g, sC_b, sC_t = _eighths(sC_g, BC8), _eighths(sC_b, BC8), _eighths(sC_t, BC8)
    g, seg_i, rev, d, n, dmask, nmask, mask2, A2, bias, _ = _bwd_program(
        A_ptr, bias_ptr, A_ptr, E, pid_d, pid_q, PAIR, REVERSE, N, NP, BD, HAS_BIAS, False)
    d_base = dl_ptr + g * sd_g + pid_b * sd_b + d * sd_d
    z_base = z_ptr + g * sz_g + pid_b * sz_b + d * sz_d
    o_base = dout_ptr + pid_b * so_b + d * so_d
    C_base = C_ptr + g * sC_g + pid_b * sC_b + n * sC_n
    gp_base = gap_ptr + g * sg_g + pid_b * sg_b
    s_first = seg_i * SEG
    s_last = tl.minimum(s_first + SEG, L)
    carry = tl.zeros((NP, BD), dtype=tl.float32)
    ex_sum = tl.zeros((BD,), dtype=tl.float32)
    for jj in range(s_last - s_first):
        s = s_last - 1 - jj
        t = _time_index(s, L, rev)
        dt = tl.where(dmask, _delta(tl.load(d_base + t * sd_t, mask=dmask, other=0.0), bias, HAS_BIAS, SOFTPLUS),
                      0.0)
        ex, gp = _exponent_back(s, t, s >= 0, dmask, dt, L, rev, gp_base, sg_t, d_base, sd_t, bias, HAS_GAP,
                                HAS_BIAS, SOFTPLUS)
        carry = _carry_back(carry, ex, A2, o_base + t * so_t, z_base + t * sz_t, C_base + t * sC_t, scale, dmask,
                            nmask, HAS_Z)
        ex_sum += ex
    cr_base, cs_base = _chunk_bases(cr_ptr, csum_ptr, g, pid_b, tl.num_programs(1), NSEG, N, E, n, d)
    tl.store(cr_base + seg_i * (N * E), carry, mask=mask2)
    tl.store(cs_base + seg_i * E, ex_sum, mask=dmask)


@triton.jit
def _scan_bwd_seq_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gap_ptr, dout_ptr, ckpt_ptr,
    du_ptr, ddl_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, gs_ptr, scratch_ptr, cr_ptr, csum_ptr,
    L, E, n_chunks, scale, KS, NSEG,
    su_g, su_b, su_d, su_t,
    sd_g, sd_b, sd_d, sd_t,
    sB_g, sB_b, sB_n, sB_t,
    sC_g, sC_b, sC_n, sC_t,
    sz_g, sz_b, sz_d, sz_t,
    so_b, so_d, so_t,
    sg_g, sg_b, sg_t,
    gx_g, gx_b, gx_d, gx_t,
    PAIR: tl.constexpr, REVERSE: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
    BD: tl.constexpr, T: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GAP: tl.constexpr, CARRY_IN: tl.constexpr, BC8: tl.constexpr,
):
    """Sequential backward of one (channel block, sample, direction, segment of ``KS`` checkpoint chunks): per
    chunk (reverse scan order), recompute its states from the stored one into a small per-program scratch
    (cache-resident), then walk the chunk backwards with the state gradient in registers. Layout (N, channels)
    as in the forward: one thread owns a channel. ``CARRY_IN``: the state gradient entering the segment from
    the later ones is folded from their local carries (:func:`_scan_bwd_carry_kernel`)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_q = tl.program_id(2)
    sB_g, sB_b, sB_t = _eighths(sB_g, BC8), _eighths(sB_b, BC8), _eighths(sB_t, BC8)
    sC_g, sC_b, sC_t = _eighths(sC_g, BC8), _eighths(sC_b, BC8), _eighths(sC_t, BC8)
    g, seg_i, rev, d, n, dmask, nmask, mask2, A2, bias, Dv = _bwd_program(
        A_ptr, bias_ptr, D_ptr, E, pid_d, pid_q, PAIR, REVERSE, N, NP, BD, HAS_BIAS, HAS_D)
    prog = (pid_q * tl.num_programs(1) + pid_b) * tl.num_programs(0) + pid_d
    ck_base = ckpt_ptr + ((g * tl.num_programs(1) + pid_b) * E + d[None, :]) * (n_chunks * N) + n[:, None]
    sc_base = scratch_ptr + prog.to(tl.int64) * (T * NP * BD) + n[:, None] * BD + tl.arange(0, BD)[None, :]
    part = (g * tl.num_programs(1) + pid_b).to(tl.int64) * L * N
    u_base, d_base, z_base, o_base, B_base, C_base = _bwd_bases(
        g, pid_b, d, n, u_ptr, su_g, su_b, su_d, dl_ptr, sd_g, sd_b, sd_d, z_ptr, sz_g, sz_b, sz_d, dout_ptr, so_b,
        so_d, B_ptr, sB_g, sB_b, sB_n, C_ptr, sC_g, sC_b, sC_n)
    gp_base = gap_ptr + g * sg_g + pid_b * sg_b
    gx_base = g * gx_g + pid_b * gx_b + d * gx_d
    # dA_{s+1} * dh_{s+1}
    carry = _segment_carry(cr_ptr, csum_ptr, g, pid_b, seg_i, NSEG, A2, N, E, n, d, mask2, dmask, NP, BD, CARRY_IN)
    dA_acc = tl.zeros((NP, BD), dtype=tl.float32)
    dD_acc, db_acc = tl.zeros((BD,), dtype=tl.float32), tl.zeros((BD,), dtype=tl.float32)
    k_end = tl.minimum((seg_i + 1) * KS, n_chunks)  # the segment's chunks, walked last first
    for kk in range(k_end - seg_i * KS):
        k = k_end - 1 - kk
        h = tl.load(ck_base + k * N, mask=mask2 & (k > 0), other=0.0)
        dt_prev = _delta_before(k * T, L, rev, d_base, sd_t, bias, dmask, HAS_GAP, HAS_BIAS, SOFTPLUS, BD)
        # pass 1: the chunk's states, forwards
        for j in range(T):
            s = k * T + j
            ok = s < L
            t = _time_index(s, L, rev)
            m = dmask & ok
            u = tl.load(u_base + t * su_t, mask=m, other=0.0).to(tl.float32)
            dt = tl.where(m, _delta(tl.load(d_base + t * sd_t, mask=m, other=0.0), bias, HAS_BIAS, SOFTPLUS), 0.0)
            ex = dt
            if HAS_GAP:
                gp = tl.load(gp_base + t * sg_t, mask=ok, other=0.0).to(tl.float32)
                ex = dt + gp * dt_prev
                dt_prev = dt
            Bt = tl.load(B_base + t * sB_t, mask=nmask & ok, other=0.0).to(tl.float32)
            h = tl.exp2(ex[None, :] * A2) * h + Bt[:, None] * (dt * u)[None, :]
            tl.store(sc_base + j * (NP * BD), h)
        # pass 2: backwards through the chunk; the next step's loads are issued one step ahead
        pu, pr, pB, pC, po, pz, ph = _bwd_loads(k * T + T - 1, T - 1, L, rev, u_base, su_t, d_base, sd_t, B_base,
                                                sB_t, C_base, sC_t, o_base, so_t, z_base, sz_t, sc_base,
                                                dmask, nmask, NP, BD, HAS_Z)
        for jj in range(T):
            j = T - 1 - jj
            s = k * T + j
            ok = s < L
            t = _time_index(s, L, rev)
            m = dmask & ok
            nu, nr, nB, nC, no, nz, nh = _bwd_loads(s - 1, j - 1, L, rev, u_base, su_t, d_base, sd_t, B_base,
                                                    sB_t, C_base, sC_t, o_base, so_t, z_base, sz_t, sc_base,
                                                    dmask, nmask, NP, BD, HAS_Z)
            u = pu.to(tl.float32)
            raw = _delta(pr, bias, HAS_BIAS, False)
            dt = tl.where(m, _delta(raw, bias, False, SOFTPLUS), 0.0)
            ex, gp = _exponent_back(s, t, ok, m, dt, L, rev, gp_base, sg_t, d_base, sd_t, bias, HAS_GAP, HAS_BIAS,
                                    SOFTPLUS)
            Bt = pB.to(tl.float32)
            Ct = pC.to(tl.float32)
            dout = po.to(tl.float32) * scale
            h = ph
            if HAS_Z:
                y = tl.sum(h * Ct[:, None], axis=0) + Dv * u
                zz = pz.to(tl.float32)
                gy, sig = _gate_back(dout, zz)
                dz = dout * y * sig * (1.0 + zz * (1.0 - sig))
                tl.store(dz_ptr + gx_base + t * gx_t, dz.to(dz_ptr.dtype.element_ty), mask=m)
            else:
                gy = dout
            carry, de, dA_step, dhB, dB_t, dC_t = _state_back(h, Bt, Ct, gy, dt, u, ex, A2, carry)
            dA_acc += dA_step
            ddt = dhB * u + de
            du = dhB * dt + gy * Dv
            dD_acc += gy * u
            # every channel block adds its share into one (group, batch, L, N) fp32 buffer
            tl.atomic_add(dB_ptr + part + t * N + n, dB_t, mask=nmask & ok, sem="relaxed")
            tl.atomic_add(dC_ptr + part + t * N + n, dC_t, mask=nmask & ok, sem="relaxed")
            tl.store(du_ptr + gx_base + t * gx_t, du.to(du_ptr.dtype.element_ty), mask=m)
            if HAS_GAP:
                tl.store(gs_ptr + gx_base + t * gx_t, gp * de, mask=m)
                tl.store(ddl_ptr + gx_base + t * gx_t, ddt, mask=m)
            else:
                if SOFTPLUS:
                    ddt = ddt / (1.0 + tl.exp2(-raw * 1.4426950408889634))
                ddt = tl.where(m, ddt, 0.0)
                db_acc += ddt
                tl.store(ddl_ptr + gx_base + t * gx_t, ddt.to(ddl_ptr.dtype.element_ty), mask=m)
            pu, pr, pB, pC, po, pz, ph = nu, nr, nB, nC, no, nz, nh
    tl.atomic_add(dA_ptr + g * E * N + d[None, :] * N + n[:, None], dA_acc, mask=mask2)
    if HAS_D:
        tl.atomic_add(dD_ptr + g * E + d, dD_acc, mask=dmask)
    if HAS_BIAS:
        if not HAS_GAP:
            tl.atomic_add(dbias_ptr + g * E + d, db_acc, mask=dmask)



@triton.jit
def _bwd_loads(s, j, L, rev: tl.constexpr, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, o_base, so_t,
               z_base, sz_t, sc_base, dmask, nmask, NP: tl.constexpr, BD: tl.constexpr, HAS_Z: tl.constexpr):
    """Inputs of backward step ``s`` (chunk slot ``j``); zeros where out of range."""
    ok = (s < L) & (j >= 0)
    t = _time_index(s, L, rev)
    u, r, Bt, Ct, zz = _step_loads(t, ok, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, z_base, sz_t,
                                   dmask, nmask, HAS_Z, True)
    dout = tl.load(o_base + t * so_t, mask=dmask & ok, other=0.0)
    h = tl.load(sc_base + j * (NP * BD), mask=(j >= 0) & (nmask[:, None] | True), other=0.0)
    return u, r, Bt, Ct, dout, zz, h


@triton.jit
def _reverse_rows(v, dA, k, T: tl.constexpr):
    """The state gradients of a (T, states, channels) tile, dh_s = v_s + dA_(s+1) dh_(s+1), its last row first.
    Row by row inside each thread: ``tl.associative_scan(reverse=True)`` lowers to cross-lane shuffles even along
    an axis that lies within the thread (sm_90, Triton 3.6: 400 more shuffles a 2-step tile)."""
    x = tl.sum(tl.where((k == T - 1)[:, None, None], v, -0.0), axis=0)
    dh = v
    for i in tl.static_range(T - 2, -1, -1):
        f = tl.sum(tl.where((k == i + 1)[:, None, None], dA, -0.0), axis=0)
        x = tl.sum(tl.where((k == i)[:, None, None], v, -0.0), axis=0) + f * x
        dh = tl.where((k == i)[:, None, None], x[None, :, :], dh)
    return dh


@triton.jit
def _tile_loads(s, lo, L, rev: tl.constexpr, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t, o_base, so_t,
                z_base, sz_t, dmask, nmask, HAS_C: tl.constexpr, HAS_Z: tl.constexpr):
    """Raw inputs of scan steps ``s`` (a (T,) vector) of a backward tile, zero outside [lo, L): step size, u, B,
    and where asked C, the output gradient and z ((T, channels) or (T, states))."""
    ok = (s < L) & (s >= lo)
    t = _time_index(s, L, rev)
    m = ok[:, None] & dmask[None, :]
    bn = ok[:, None] & nmask[None, :]
    raw = tl.load(d_base[None, :] + t[:, None] * sd_t, mask=m, other=0.0)
    u = tl.load(u_base[None, :] + t[:, None] * su_t, mask=m, other=0.0)
    Bt = tl.load(B_base[None, :] + t[:, None] * sB_t, mask=bn, other=0.0)
    Ct = Bt
    dout = u
    zz = u
    if HAS_C:
        Ct = tl.load(C_base[None, :] + t[:, None] * sC_t, mask=bn, other=0.0)
        dout = tl.load(o_base[None, :] + t[:, None] * so_t, mask=m, other=0.0)
        if HAS_Z:
            zz = tl.load(z_base[None, :] + t[:, None] * sz_t, mask=m, other=0.0)
    return raw, u, Bt, Ct, dout, zz


@triton.jit
def _tile_step_sizes(raw, m, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """fp32 (raw step size + bias, step size) of a (T, channels) tile; the step size is zero outside ``m``."""
    raw = _delta(raw, bias[None, :], HAS_BIAS, False)
    return raw, tl.where(m, _delta(raw, bias, False, SOFTPLUS), 0.0)


@triton.jit
def _scan_bwd_tile_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, ckpt_ptr,
    du_ptr, ddl_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, scratch_ptr, cr_ptr, csum_ptr,
    L, E, n_chunks, scale, KS, NSEG,
    su_g, su_b, su_d, su_t,
    sd_g, sd_b, sd_d, sd_t,
    sB_g, sB_b, sB_n, sB_t,
    sC_g, sC_b, sC_n, sC_t,
    sz_g, sz_b, sz_d, sz_t,
    so_b, so_d, so_t,
    gx_g, gx_b, gx_d, gx_t,
    PAIR: tl.constexpr, REVERSE: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr,
    CHUNK_T: tl.constexpr, T: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, CARRY_IN: tl.constexpr, BC8: tl.constexpr,
):
    """The backward ``T`` steps at a time (policy ``scan_bwd_tile``; no position gaps), per (channel block,
    sample, direction, segment of ``KS`` checkpoint chunks), chunks in reverse scan order. Per chunk: the states
    entering its tiles, from the stored one, into a per-program scratch (one (states, channels) state a tile);
    then per tile, last first (its loads issued one tile ahead): its states again (an in-tile scan), the state
    gradients dh_s = C_s gy_s + dA_(s+1) dh_(s+1) (row by row inside each thread), and every gradient of the
    tile at once: dB and dC as (T, states) sums over the program's channels, one atomic add a tile instead of
    one a step."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_q = tl.program_id(2)
    sB_g, sB_b, sB_t = _eighths(sB_g, BC8), _eighths(sB_b, BC8), _eighths(sB_t, BC8)
    sC_g, sC_b, sC_t = _eighths(sC_g, BC8), _eighths(sC_b, BC8), _eighths(sC_t, BC8)
    g, seg_i, rev, d, n, dmask, nmask, mask2, A2, bias, Dv = _bwd_program(
        A_ptr, bias_ptr, D_ptr, E, pid_d, pid_q, PAIR, REVERSE, N, NP, BD, HAS_BIAS, HAS_D)
    R: tl.constexpr = CHUNK_T // T
    # A as a (1, states, channels) tile: a 3-D load with states contiguous sets the tiles' register layout (4
    # states x 4 channels a thread, so sums over states and over channels both stay mostly inside the thread)
    A3 = tl.load(A_ptr + g * E * N + d[None, None, :] * N + n[None, :, None], mask=mask2[None, :, :],
                 other=0.0).to(tl.float32) * 1.4426950408889634
    prog = (pid_q * tl.num_programs(1) + pid_b) * tl.num_programs(0) + pid_d
    ck_base = ckpt_ptr + ((g * tl.num_programs(1) + pid_b) * E + d[None, :]) * (n_chunks * N) + n[:, None]
    sc_base = scratch_ptr + prog.to(tl.int64) * (R * NP * BD) + tl.arange(0, BD)[None, :] * NP + n[:, None]
    part = (g * tl.num_programs(1) + pid_b).to(tl.int64) * L * N
    u_base, d_base, z_base, o_base, B_base, C_base = _bwd_bases(
        g, pid_b, d, n, u_ptr, su_g, su_b, su_d, dl_ptr, sd_g, sd_b, sd_d, z_ptr, sz_g, sz_b, sz_d, dout_ptr, so_b,
        so_d, B_ptr, sB_g, sB_b, sB_n, C_ptr, sC_g, sC_b, sC_n)
    gx_base = g * gx_g + pid_b * gx_b + d * gx_d
    k = tl.arange(0, T)
    first = (k == 0)[:, None, None]
    last = (k == T - 1)[:, None, None]
    # dA_(s+1) dh_(s+1) for the step s before the current tile
    carry = _segment_carry(cr_ptr, csum_ptr, g, pid_b, seg_i, NSEG, A2, N, E, n, d, mask2, dmask, NP, BD, CARRY_IN)
    dA_acc = tl.zeros((NP, BD), dtype=tl.float32)
    dD_acc, db_acc = tl.zeros((BD,), dtype=tl.float32), tl.zeros((BD,), dtype=tl.float32)
    k_end = tl.minimum((seg_i + 1) * KS, n_chunks)  # the segment's chunks, walked last first
    for kk in range(k_end - seg_i * KS):
        c = k_end - 1 - kk
        h = tl.load(ck_base + c * N, mask=mask2 & (c > 0), other=0.0)
        for i in tl.static_range(R - 1):  # the state entering each tile of the chunk
            tl.store(sc_base + i * (NP * BD), h)
            si = c * CHUNK_T + i * T + k
            raw_i, u_i, B_i, _, _, _ = _tile_loads(si, 0, L, rev, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base,
                                                   sC_t, o_base, so_t, z_base, sz_t, dmask, nmask, False, False)
            _, dt_i = _tile_step_sizes(raw_i, (si < L)[:, None] & dmask[None, :], bias, HAS_BIAS, SOFTPLUS)
            hs_i, _, _ = _tile_states(h, dt_i, dt_i, u_i.to(tl.float32), B_i.to(tl.float32), A3, first)
            h = tl.sum(tl.where(last, hs_i, -0.0), axis=0)
        tl.store(sc_base + (R - 1) * (NP * BD), h)
        tl.debug_barrier()  # the scratch is read back in another register layout
        # the tiles' loads are issued one tile ahead
        nxt = _tile_loads(c * CHUNK_T + (R - 1) * T + k, 0, L, rev, u_base, su_t, d_base, sd_t, B_base, sB_t,
                          C_base, sC_t, o_base, so_t, z_base, sz_t, dmask, nmask, True, HAS_Z)
        for jj in range(R):
            j = R - 1 - jj
            s = c * CHUNK_T + j * T + k
            raw_n, u_n, B_n, C_n, g_n, z_n = nxt
            nxt = _tile_loads(s - T, c * CHUNK_T, L, rev, u_base, su_t, d_base, sd_t, B_base, sB_t, C_base, sC_t,
                              o_base, so_t, z_base, sz_t, dmask, nmask, True, HAS_Z)
            ok = s < L
            t = _time_index(s, L, rev)
            m = ok[:, None] & dmask[None, :]
            raw, dt = _tile_step_sizes(raw_n, m, bias, HAS_BIAS, SOFTPLUS)
            u, Bt, Ct = u_n.to(tl.float32), B_n.to(tl.float32), C_n.to(tl.float32)
            gy = g_n.to(tl.float32) * scale
            h = tl.load(sc_base + j * (NP * BD))
            hs, dA, bx = _tile_states(h, dt, dt, u, Bt, A3, first)
            if HAS_Z:
                zz = z_n.to(tl.float32)
                y = tl.sum(hs * Ct[:, :, None], axis=1) + Dv[None, :] * u
                dout = gy
                gy, sig = _gate_back(dout, zz)
                dz = dout * y * sig * (1.0 + zz * (1.0 - sig))
                tl.store(dz_ptr + gx_base[None, :] + t[:, None] * gx_t, dz.to(dz_ptr.dtype.element_ty), mask=m)
            v = Ct[:, :, None] * gy[:, None, :]
            v = tl.where(last, v + carry[None, :, :], v)
            dh = _reverse_rows(v, dA, k, T)
            carry = tl.sum(tl.where(first, dA * dh, -0.0), axis=0)
            q = dh * (hs - bx)  # dh_s dA_s h_(s-1)
            dA_acc += tl.sum(q * dt[:, None, :], axis=0)
            de = tl.sum(q * A3, axis=1) * 0.6931471805599453
            dhB = tl.sum(dh * Bt[:, :, None], axis=1)
            dB_t = tl.sum(dh * (dt * u)[:, None, :], axis=2)
            dC_t = tl.sum(hs * gy[:, None, :], axis=2)
            bn = ok[:, None] & nmask[None, :]
            tl.atomic_add(dB_ptr + part + t[:, None] * N + n[None, :], dB_t, mask=bn, sem="relaxed")
            tl.atomic_add(dC_ptr + part + t[:, None] * N + n[None, :], dC_t, mask=bn, sem="relaxed")
            du = dhB * dt + gy * Dv[None, :]
            dD_acc += tl.sum(gy * u, axis=0)
            ddt = dhB * u + de
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp2(-raw * 1.4426950408889634))
            ddt = tl.where(m, ddt, 0.0)
            db_acc += tl.sum(ddt, axis=0)
            tl.store(du_ptr + gx_base[None, :] + t[:, None] * gx_t, du.to(du_ptr.dtype.element_ty), mask=m)
            tl.store(ddl_ptr + gx_base[None, :] + t[:, None] * gx_t, ddt.to(ddl_ptr.dtype.element_ty), mask=m)
    tl.atomic_add(dA_ptr + g * E * N + d[None, :] * N + n[:, None], dA_acc, mask=mask2)
    if HAS_D:
        tl.atomic_add(dD_ptr + g * E + d, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + g * E + d, db_acc, mask=dmask)



# ----------------------------------------------------------------------------------------------- host side
LAST_FWD = LAST_BWD = None  # the last compiled kernels (resource reports in benchmarks)
# launch settings: policy's scan_* settings (H100 sweep: one warp per 64 channels forward, one per 32 channels
# backward with 8-step chunks)


def _strides4(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _strides_of_8(B: Tensor, C: Tensor) -> bool:
    """Whether B's and C's (group, batch, time) strides are all multiples of 8 (the kernels' ``BC8``)."""
    return all(st % 8 == 0 for t in (B, C) for st in (t.stride(0), t.stride(1), t.stride(3)))


def _bc_fp32(B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 copies of 16-bit B and C (logical (G, b, N, L)), one step's B and C side by side in memory.

    Every program of the forward reads all of B and C (they are shared by the channels), and each thread of the
    tiled schedule converts every value it reads: from bf16 that is two instructions a state and step, a fifth
    of the tile loop (sm_90 compile). One conversion per call here is a small fraction of that. B and C that are
    adjacent columns of one tensor (x_proj's output) are copied in one kernel."""
    G, bsz, N, L = B.shape
    both = torch.empty(G, bsz, L, 2, N, device=B.device, dtype=torch.float32)
    adjacent = (B.stride() == C.stride() and B.stride(2) == 1
                and C.data_ptr() - B.data_ptr() == N * B.element_size())
    if adjacent:
        sg, sb, _, st = B.stride()
        both.view(G, bsz, L, 2 * N).copy_(B.as_strided((G, bsz, L, 2 * N), (sg, sb, st, 1)))
    else:
        both[:, :, :, 0].copy_(B.transpose(2, 3))
        both[:, :, :, 1].copy_(C.transpose(2, 3))
    return both[:, :, :, 0].transpose(2, 3), both[:, :, :, 1].transpose(2, 3)


def _alloc_like(ref: Tensor, groups: int, dtype: torch.dtype, zero: bool = False) -> Tensor:
    """(groups, *ref.shape[1:]) buffer whose inner dims have the memory order of ``ref[0]`` (coalesced I/O)."""
    inner = ref[0]
    order = sorted(range(inner.dim()), key=lambda i: (-inner.stride(i), -i))
    shape = [inner.shape[i] for i in order]
    maker = torch.zeros if zero else torch.empty
    buf = maker([groups] + shape, device=ref.device, dtype=dtype)
    inverse = [0] + [1 + order.index(i) for i in range(inner.dim())]
    return buf.permute(*inverse)


class _ScanFn(torch.autograd.Function):
    """Autograd wrapper over 4-D logical views (group, batch, channel|state, time)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, gap, softplus: bool, reverse: bool, pair: bool,
                scale: float):
        G, bsz, E, L = u.shape
        if pair:
            out = _token_major(bsz, E, L, u)[None]
        else:
            out = torch.empty(1, bsz, E, L, device=u.device, dtype=u.dtype)
        N = A.shape[-1]
        need_grad = any(ctx.needs_input_grad[:9])
        chunk = policy.get("scan_ckpt_chunk")
        tile = policy.get("scan_bwd_tile")
        if need_grad and tile and chunk % tile:
            raise ValueError(f"policy scan_bwd_tile={tile} must divide scan_ckpt_chunk={chunk} (or be 0)")
        n_chunks = cdiv(L, chunk)
        ckpt = (torch.empty(G, bsz, E, n_chunks, N, device=u.device, dtype=torch.float32) if need_grad
                else u.new_empty(1, dtype=torch.float32))
        _launch_fwd(u, delta, A, B, C, D, z, bias, gap, out, ckpt, softplus, reverse, pair, scale, need_grad,
                    chunk=chunk)
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, bias, gap, ckpt)
            ctx.flags = (softplus, reverse, pair, scale, chunk, tile)  # the backward runs as the forward saw
        return out[0]

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, bias, gap, ckpt = ctx.saved_tensors
        softplus, reverse, pair, scale, chunk, tile = ctx.flags
        G, bsz, E, L = u.shape
        N = A.shape[-1]
        n_chunks = ckpt.shape[3]
        has_gap = gap is not None
        du = _alloc_like(u, G, u.dtype)
        # written with du's strides (gx_*): laid out like u, whatever delta's own layout
        ddl = _alloc_like(u, G, torch.float32 if has_gap else delta.dtype)
        gs = _alloc_like(u, G, torch.float32) if has_gap else ddl
        dz = _alloc_like(u, G, z.dtype) if z is not None else du  # written with du's strides
        block_d, warps = policy.get("scan_bwd_block_d"), policy.get("scan_bwd_warps")
        n_blocks = cdiv(E, block_d)
        per_seg = cdiv(seq_chunk(L, n_blocks * bsz * G, _sm_count(u.device), multiple=chunk,
                                 backward=True), chunk)
        seg, n_seg = per_seg * chunk, cdiv(n_chunks, per_seg)  # scan steps per segment, segments
        dB = torch.zeros(G, bsz, L, N, device=u.device, dtype=torch.float32)  # atomic sums over channel blocks
        dC = torch.zeros_like(dB)
        dA = torch.zeros(G, E, N, device=u.device, dtype=torch.float32)
        dD = torch.zeros(G, E, device=u.device, dtype=torch.float32)
        dbias = torch.zeros(G, E, device=u.device, dtype=torch.float32)
        dummy = u
        dout4 = dout.unsqueeze(0) if dout.dim() == 3 else dout
        gp = gap if has_gap else dummy
        grid = (n_blocks, bsz, G * n_seg)
        np2 = next_power_of_2(N)
        z_arg, z_strides = (z, _strides4(z)) if z is not None else (dummy, (0, 0, 0, 0))
        gap_strides = tuple(gap.stride()) if has_gap else (0, 0, 0)
        carries, sums = _chunk_buffers(u, G, bsz, n_seg, N, E)
        shared = dict(PAIR=pair, REVERSE=reverse, N=N, NP=np2, BD=block_d, SOFTPLUS=softplus,
                      HAS_Z=z is not None, HAS_BIAS=bias is not None, num_warps=warps, BC8=_strides_of_8(B, C))
        if n_seg > 1:  # level one: each segment's own carry; the main kernel folds those of later segments
            _scan_bwd_carry_kernel[grid](
                delta, A, C, z_arg, bias if bias is not None else dummy, gp, dout4, carries, sums,
                L, E, scale, seg, n_seg, *_strides4(delta), *_strides4(C), *z_strides, *_strides4(dout4)[1:],
                *gap_strides, HAS_GAP=has_gap, **shared)
        global LAST_BWD
        tiled = bool(tile) and not has_gap  # the tiled schedule has no gap path
        # per program, the states entering each tile of a chunk (tiled) or every state of a chunk (step walk)
        slots = chunk // tile if tiled else chunk
        scratch = torch.empty(G * bsz * n_seg * n_blocks * slots * np2 * block_d, device=u.device,
                              dtype=torch.float32)
        if tiled:
            LAST_BWD = _scan_bwd_tile_kernel[grid](
                u, delta, A, B, C, D if D is not None else dummy, z_arg, bias if bias is not None else dummy,
                dout4, ckpt, du, ddl, dA, dB, dC, dD, dz, dbias, scratch, carries, sums,
                L, E, n_chunks, scale, per_seg, n_seg,
                *_strides4(u), *_strides4(delta), *_strides4(B), *_strides4(C), *z_strides,
                *_strides4(dout4)[1:], *_strides4(du),
                CHUNK_T=chunk, T=tile, HAS_D=D is not None, CARRY_IN=n_seg > 1, **shared)
            return _scan_grads(ctx, du, ddl, dA, dB, dC, dD, dz, dbias, A, B, C, D, z, bias)
        LAST_BWD = _scan_bwd_seq_kernel[grid](
            u, delta, A, B, C, D if D is not None else dummy, z_arg,
            bias if bias is not None else dummy, gp, dout4, ckpt,
            du, ddl, dA, dB, dC, dD, dz, dbias, gs, scratch, carries, sums,
            L, E, n_chunks, scale, per_seg, n_seg,
            *_strides4(u), *_strides4(delta), *_strides4(B), *_strides4(C), *z_strides,
            *_strides4(dout4)[1:], *gap_strides, *_strides4(du),
            T=chunk, HAS_D=D is not None, HAS_GAP=has_gap, CARRY_IN=n_seg > 1, **shared,
        )
        if has_gap:
            # d(exponent at s)/d(dt at s-1) = gap_s: add each step's term to the previous step in scan order
            if reverse and not pair:
                shifted = F.pad(gs[..., :-1], (1, 0))
            elif not pair:
                shifted = F.pad(gs[..., 1:], (0, 1))
            else:
                shifted = torch.stack([F.pad(gs[0, ..., 1:], (0, 1)), F.pad(gs[1, ..., :-1], (1, 0))])
            ddt = ddl + shifted
            if softplus:
                raw = delta.float() + (bias.float()[:, None, :, None] if bias is not None else 0.0)
                ddt = ddt * torch.sigmoid(raw)
            if bias is not None:
                dbias = ddt.sum(dim=(1, 3))
            ddl = ddt.to(delta.dtype)
        return _scan_grads(ctx, du, ddl, dA, dB, dC, dD, dz, dbias, A, B, C, D, z, bias)


def _scan_grads(ctx, du, ddl, dA, dB, dC, dD, dz, dbias, A, B, C, D, z, bias) -> tuple:
    """The backward's outputs in the inputs' dtypes, None where no gradient is needed."""
    dB = dB.to(B.dtype).transpose(2, 3)  # (G, B, N, L) logical
    dC = dC.to(C.dtype).transpose(2, 3)
    grads = [du, ddl, dA.to(A.dtype), dB, dC,
             dD.to(D.dtype) if D is not None else None, dz if z is not None else None,
             dbias.to(bias.dtype) if bias is not None else None]
    needs = ctx.needs_input_grad
    grads = [gr if needs[i] else None for i, gr in enumerate(grads)]
    return (*grads, None, None, None, None, None)


def _launch_fwd(u, delta, A, B, C, D, z, bias, gap, out, ckpt, softplus, reverse, pair, scale, store_ckpt,
                on=None, chunk=None):
    """The forward in one pass, or split along the sequence (:func:`seq_chunk`): chunk states, then outputs."""
    G, bsz, E, L = u.shape
    N = A.shape[-1]
    dummy = u
    tile = policy.get("scan_fwd_tile")
    if tile and policy.get("scan_fwd_bc_fp32") and B.dtype != torch.float32:
        B, C = _bc_fp32(B, C)
    block_d, warps = fwd_block()
    chunk = chunk or policy.get("scan_ckpt_chunk")
    n_blocks = cdiv(E, block_d)
    sms = _sm_count(u.device)
    split_g = pair and pair_split(L, bsz, E, sms)
    tc = fwd_chunk(L, bsz, E, sms, split_g)
    n_seq = cdiv(L, tc)
    states, sums = _chunk_buffers(u, G, bsz, n_seq, N, E)
    target = out
    if split_g and not out.transpose(-1, -2).is_contiguous():
        # a strided output (in the fused mixer: the first direction's step sizes in its (b, L, 3E) buffer): both
        # directions write token-major buffers, whose sum goes there (the kernel writes its two outputs with one
        # set of strides)
        out = _token_major(bsz, E, L, out)[None]
    out2 = torch.empty_like(out) if split_g else dummy  # the second direction's own output
    args = (u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            bias if bias is not None else dummy, gap if gap is not None else dummy, out, out2, ckpt,
            on if on is not None else dummy, states, sums, L, E, cdiv(L, chunk), scale, tc, n_seq,
            *_strides4(u), *_strides4(delta), *_strides4(B), *_strides4(C),
            *(_strides4(z) if z is not None else (0, 0, 0, 0)),
            *_strides4(out)[1:],
            *(tuple(gap.stride()) if gap is not None else (0, 0, 0)))
    flags = dict(G=G, PAIR=pair, REVERSE=reverse, N=N, NP=next_power_of_2(N), BD=block_d, CHUNK_T=chunk,
                 SOFTPLUS=softplus, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
                 HAS_GAP=gap is not None, HAS_ON=on is not None, BC8=_strides_of_8(B, C), T=tile,
                 STAGES=policy.get("scan_fwd_tile_stages") if tile else 1, SPLIT_G=split_g,
                 GATE_LAST=pair and z is not None and not split_g, num_warps=warps)
    grid = (n_blocks * (2 if split_g else 1), bsz, n_seq)
    pf = policy.get("scan_fwd_prefetch") if tile and not _interpreting() else 0
    if grid[0] * grid[1] * grid[2] >= policy.get("scan_fwd_prefetch_below") * sms:
        pf = 0
    flags.update(PF=pf)
    if n_seq > 1:
        _scan_fwd_kernel[grid](*args, STORE_CKPT=False, STATE_ONLY=True, CARRY_IN=False, **flags)
    global LAST_FWD
    LAST_FWD = _scan_fwd_kernel[grid](*args, STORE_CKPT=store_ckpt, STATE_ONLY=False, CARRY_IN=n_seq > 1,
                                      **flags)
    if split_g:
        torch.add(out, out2, out=target)


def _token_major(bsz: int, E: int, L: int, like: Tensor) -> Tensor:
    """A new (b, E, L) tensor laid out token-major ((b, L, E) memory), like ``like``'s device and dtype: the
    pair's output layout, which feeds out_proj without a transpose copy."""
    return torch.empty(bsz, L, E, device=like.device, dtype=like.dtype).transpose(1, 2)


def fwd_block() -> tuple[int, int]:
    """Channels and warps per program of the forward scan under the current policy (the tiled schedule holds
    32 channels a warp, one per thread)."""
    if policy.get("scan_fwd_tile"):
        warps = policy.get("scan_fwd_tile_warps")
        return 32 * warps, warps
    return policy.get("scan_fwd_block_d"), policy.get("scan_fwd_warps")


def pair_split(length: int, bsz: int, dim: int, sms: int) -> bool:
    """Whether the fused pair's forward runs its two directions as separate programs (each writing its own
    output, added on the host): where one program a channel block and sample, walking both directions, would
    run fewer than ``scan_pair_split_below`` programs per multiprocessor. Where that pair pass would split the
    sequence instead (:func:`fwd_chunk`), only up to ``scan_pair_split_max_len`` positions: a longer walk of
    one direction per program is slower than the split's two passes with many programs."""
    if cdiv(dim, fwd_block()[0]) * bsz >= policy.get("scan_pair_split_below") * sms:
        return False
    return length <= policy.get("scan_pair_split_max_len") or fwd_chunk(length, bsz, dim, sms) == length


def fwd_chunk(length: int, bsz: int, dim: int, sms: int, split_g: bool = False) -> int:
    """Sequence positions per program of the forward scan under the current policy (``length``: one pass);
    ``split_g``: the pair's directions run as separate programs (:func:`pair_split`)."""
    tile = policy.get("scan_fwd_tile")
    return seq_chunk(length, cdiv(dim, fwd_block()[0]) * bsz * (2 if split_g else 1), sms,
                     split_below=policy.get("scan_fwd_tile_split_below") if tile else None)


def _chunk_buffers(ref: Tensor, G: int, bsz: int, n: int, N: int, E: int) -> tuple[Tensor, Tensor]:
    """Per-chunk (E, N) states and (E,) exponent sums of a split scan (fp32); placeholders when not split."""
    if n == 1:
        return ref, ref
    return (torch.empty(G, bsz, n, E, N, device=ref.device, dtype=torch.float32),
            torch.empty(G, bsz, n, E, device=ref.device, dtype=torch.float32))


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; an H100's 132 elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def seq_chunk(length: int, programs: int, sms: int, multiple: int = 1, backward: bool = False,
              split_below: int | None = None) -> int:
    """Sequence positions per program of a scan whose single pass runs ``programs`` programs on ``sms``
    multiprocessors; ``length`` means one pass.

    Policy ``scan_seq_split``: 'off' never splits; 'on' always splits into ``scan_seq_chunk`` positions;
    'auto' splits only when a single pass would run fewer than ``split_below`` (default
    ``scan_seq_split_below``) programs per multiprocessor (a split scans every step twice, so it pays only where
    it fills an idle GPU), into chunks enough for ``scan_seq_programs`` (``scan_bwd_seq_programs`` for the
    ``backward``) programs per multiprocessor, each at least ``scan_seq_chunk`` long. Rounded up to a
    ``multiple``."""
    mode = policy.get("scan_seq_split")
    if mode == "off":
        return length
    chunk = policy.get("scan_seq_chunk")
    if mode == "auto":
        if programs >= (split_below or policy.get("scan_seq_split_below")) * sms:
            return length
        target = policy.get("scan_bwd_seq_programs" if backward else "scan_seq_programs") * sms
        chunk = max(chunk, cdiv(length, cdiv(target, programs)))
    chunk = cdiv(chunk, multiple) * multiple
    return length if chunk >= length else chunk


def _check_device(*tensors: Tensor | None) -> None:
    import os

    dev = tensors[0].device
    for t in tensors:
        if t is not None and t.device != dev:
            raise ValueError(f"selective_scan_triton: all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the 'triton' scan backend needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    gap: Tensor | None = None,
) -> Tensor:
    """Same contract as :func:`mambatrim.ops.scan_ref.selective_scan_ref`; u, delta, z (b, d, L) any strides."""
    _check_device(u, delta, A, B, C, D, z, delta_bias, gap)
    return _ScanFn.apply(
        u[None], delta[None], A.float().contiguous()[None], B[None], C[None],
        None if D is None else D.float().contiguous()[None],
        None if z is None else z[None],
        None if delta_bias is None else delta_bias.float().contiguous()[None],
        None if gap is None else gap.float()[None],
        delta_softplus, reverse, False, 1.0,
    )


def selective_scan_pair_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool = True,
    scale: float = 0.5,
    gap: Tensor | None = None,
    direction_on: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Both Vim directions in one launch: ``scale * (scan(g=0) + reverse_scan(g=1))``.

    Shapes (logical; any strides): u, delta (2, b, d, L); A (2, d, n); B, C (2, b, n, L); D, delta_bias (2, d);
    z (b, d, L), shared by the directions; gap (2, b, L). Direction 1 scans right to left and writes in original
    order: nothing is flipped. Returns (b, d, L) laid out token-major (``(b, L, d)`` memory) in u's dtype.

    ``direction_on`` (b, 2), inference only: sample i runs direction g only where ``direction_on[i, g]`` is
    nonzero; a switched-off direction contributes zero and costs no scan step (no host sync, graph-capturable).

    ``out`` (b, d, L) in u's dtype, any strides, inference only: written in place and returned instead of a new
    tensor. It must not overlap the inputs, except that it may be exactly the first direction's step sizes
    ``delta[0]`` (same addresses and strides) where there is no ``gap``: each position's step size is read before
    its output is written, by the same walk (the fused Vim mixer writes its output there).
    """
    _check_device(u, delta, A, B, C, D, z, delta_bias, gap, direction_on, out)
    if u.dim() != 4 or u.shape[0] != 2:
        raise ValueError(f"selective_scan_pair_triton: u must be (2, batch, dim, length), got {tuple(u.shape)}")
    z4 = None if z is None else z[None].expand(2, -1, -1, -1)
    A, D = A.float().contiguous(), None if D is None else D.float().contiguous()
    delta_bias = None if delta_bias is None else delta_bias.float().contiguous()
    gap = None if gap is None else gap.float()
    if direction_on is None and out is None:
        return _ScanFn.apply(u, delta, A, B, C, D, z4, delta_bias, gap, delta_softplus, False, True, scale)
    bsz, E, L = u.shape[1:]
    if direction_on is not None and direction_on.shape != (bsz, 2):
        raise ValueError(f"selective_scan_pair_triton: direction_on must be (batch, 2) = ({bsz}, 2), "
                         f"got {tuple(direction_on.shape)}")
    if out is not None and (out.shape != (bsz, E, L) or out.dtype != u.dtype):
        raise ValueError(f"selective_scan_pair_triton: out must be (batch, dim, length) = ({bsz}, {E}, {L}) in "
                         f"{u.dtype}, got {tuple(out.shape)} in {out.dtype}")
    if (out is not None and gap is not None and out.data_ptr() == delta[0].data_ptr()
            and out.stride() == delta[0].stride()):
        raise ValueError("selective_scan_pair_triton: out may take the first direction's step sizes' place only "
                         "without gap (a gap's decay reads the step size before each position again)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, B, C, z)):
        raise ValueError("selective_scan_pair_triton: direction_on and out are inference-only (no backward); run "
                         "under torch.no_grad() or gate the outputs instead")
    if out is None:
        out = _token_major(bsz, E, L, u)
    on = None if direction_on is None else direction_on.to(torch.int32).contiguous()
    _launch_fwd(u, delta, A, B, C, D, z4, delta_bias, gap, out[None], u.new_empty(1, dtype=torch.float32),
                delta_softplus, False, True, scale, False, on=on)
    return out

