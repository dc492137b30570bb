"""The sequence-split scan (chunk states, carried initial states, outputs per chunk; the backward's segment
carries) against the single pass and the sequential reference, through the Triton interpreter on CPU.

A forced small chunk (policy ``scan_seq_split='on'``) makes tiny shapes run several chunks: L not a multiple
of the chunk, L = 1, both directions of the fused pair, position gaps and per-sample direction switches.
Tolerance: relative L2 error 1e-5 in fp32 (the split only reorders fp32 sums).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from mambatrim.ops import policy, triton_scan  # noqa: E402
from mambatrim.ops.scan_ref import selective_scan_ref  # noqa: E402
from mambatrim.ops.triton_scan import (  # noqa: E402
    fwd_chunk, selective_scan_pair_triton, selective_scan_triton, seq_chunk)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
NAMES = ["y", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
# the step walks (scan_fwd_tile=0, scan_bwd_tile=0) with small channel blocks; the tiled walks (the defaults) have
# their own tests below
SMALL = dict(scan_fwd_tile=0, scan_bwd_tile=0, scan_fwd_block_d=4, scan_bwd_block_d=4, scan_ckpt_chunk=4,
             scan_pair_split_below=0)  # the pair's directions in one program (separate programs: their own test)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error; against an exactly zero ``b`` (dA at L = 1: one step from a zero state) the absolute
    error in units of 1e-5 (the GPU's fused multiply-adds leave ~1e-10 there)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    if b.norm() == 0:
        return (a.norm() * 1e-5 / 1e-6).item()
    return ((a - b).norm() / b.norm()).item()


def inputs(seed: int, bsz: int, dim: int, length: int, n: int, pair: bool):
    """Scan inputs; a pair's are (2, b, d, L) in token-major storage, z shared (b, d, L)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    lead = (2,) if pair else ()
    u = r(*lead, bsz, length, dim).transpose(-1, -2)
    delta = (r(*lead, bsz, length, dim) * 0.5).transpose(-1, -2)
    A = -torch.rand(*lead, dim, n, generator=g) - 0.2
    B, C = r(*lead, bsz, length, n).transpose(-1, -2), r(*lead, bsz, length, n).transpose(-1, -2)
    D, bias = r(*lead, dim), r(*lead, dim) * 0.3
    z = r(bsz, dim, length)
    gap = (torch.rand(*lead, bsz, length, generator=g) * 3).floor()
    return [u, delta, A, B, C, D, z, bias], gap, r


def single(u, delta, A, B, C, D, z, bias, gap):
    return selective_scan_triton(u, delta, A, B, C, D, z, bias, True, reverse=True, gap=gap)


def single_ref(u, delta, A, B, C, D, z, bias, gap):
    return selective_scan_ref(u, delta, A, B, C, D, z, bias, True, reverse=True, gap=gap)


def pair(u, delta, A, B, C, D, z, bias, gap):
    return selective_scan_pair_triton(u, delta, A, B, C, D, z, bias, True, 0.5, gap=gap)


def pair_ref(u, delta, A, B, C, D, z, bias, gap):
    ys = [selective_scan_ref(u[i], delta[i], A[i], B[i], C[i], D[i], z, bias[i], True, reverse=i == 1,
                             gap=None if gap is None else gap[i]) for i in range(2)]
    return (ys[0] + ys[1]) / 2


def values_and_grads(fn, tensors, gap, grad_out):
    xs = [t.clone().to(DEVICE).requires_grad_() for t in tensors]
    y = fn(*xs, None if gap is None else gap.to(DEVICE))
    (y * grad_out.to(DEVICE)).sum().backward()
    return [y.detach().cpu()] + [x.grad.cpu() for x in xs]


@pytest.mark.parametrize("length,chunk,with_gap,is_pair", [
    (13, 4, False, True),   # 4 chunks, the last one partial; 4 backward segments of one checkpoint chunk
    (13, 8, True, True),    # 2 chunks with gaps across the chunk boundary (both directions)
    (10, 4, True, False),   # one reversed direction, gaps, the last chunk partial
    (1, 4, False, True),    # L = 1: one chunk of one step
])
def test_split_equals_single_pass_and_reference(length: int, chunk: int, with_gap: bool, is_pair: bool) -> None:
    tensors, gap, r = inputs(length + chunk, 2, 5, length, 3, is_pair)
    gap = gap if with_gap else None
    grad_out = r(2, 5, length)
    fn, ref_fn = (pair, pair_ref) if is_pair else (single, single_ref)
    with policy.override(scan_seq_split="on", scan_seq_chunk=chunk, **SMALL):
        split = values_and_grads(fn, tensors, gap, grad_out)
    with policy.override(scan_seq_split="off", **SMALL):
        one = values_and_grads(fn, tensors, gap, grad_out)
    ref = values_and_grads(ref_fn, tensors, gap, grad_out)
    for name, a, b, c in zip(NAMES, split, one, ref):
        assert rel(a, c) < 1e-5, f"{name}: split vs reference, rel err {rel(a, c):.2e}"
        assert rel(a, b) < 1e-5, f"{name}: split vs single pass, rel err {rel(a, b):.2e}"


def test_split_with_per_sample_direction_switch() -> None:
    """Each sample runs both, one or neither direction (inference); skipped inputs hold NaN, which no chunk
    may read, and a sample with neither direction gets zeros in every chunk."""
    on = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]])
    (u, delta, A, B, C, D, z, bias), gap, _ = inputs(5, 4, 5, 11, 3, True)
    refs = [selective_scan_ref(u[i], delta[i], A[i], B[i], C[i], D[i], z, bias[i], True, reverse=i == 1,
                               gap=gap[i]) for i in range(2)]
    expected = 0.5 * (refs[0] * on[:, 0, None, None] + refs[1] * on[:, 1, None, None])
    u = u.clone()
    u[0, on[:, 0] == 0] = float("nan")
    u[1, on[:, 1] == 0] = float("nan")
    args = [t.to(DEVICE) for t in (u, delta, A, B, C, D, z, bias)]
    with torch.no_grad(), policy.override(scan_seq_split="on", scan_seq_chunk=4, **SMALL):
        y = selective_scan_pair_triton(*args, True, 0.5, gap=gap.to(DEVICE), direction_on=on.to(DEVICE)).cpu()
    assert rel(y, expected) < 1e-5
    assert torch.equal(y[0], torch.zeros_like(y[0]))



@pytest.mark.parametrize("tile,length,chunk,is_pair,n", [
    (4, 13, 8, True, 3),    # tiles of 4 across 2 sequence chunks, the last tile partial, gaps across boundaries
    (8, 13, 64, True, 8),   # one pass; a tile holds two stored states (checkpoint every 4 steps); B and C
                            # strides multiples of 8 (read as such)
    (2, 10, 4, False, 3),   # one reversed direction
])
def test_tiled_forward_equals_reference(tile: int, length: int, chunk: int, is_pair: bool, n: int) -> None:
    """The tiled forward (``scan_fwd_tile``: T steps at a time, a channel's states in one thread) gives the
    reference's values, and the states it stores for the backward give the reference's gradients, split along
    the sequence or not; per-sample direction switches hold too."""
    tensors, gap, r = inputs(length + tile, 2, 5, length, n, is_pair)
    grad_out = r(2, 5, length)
    fn, ref_fn = (pair, pair_ref) if is_pair else (single, single_ref)
    with policy.override(**dict(SMALL, scan_fwd_tile=tile), scan_seq_split="on", scan_seq_chunk=chunk):
        got = values_and_grads(fn, tensors, gap, grad_out)
    ref = values_and_grads(ref_fn, tensors, gap, grad_out)
    for name, a, c in zip(NAMES, got, ref):
        assert rel(a, c) < 1e-5, f"{name}: tiled vs reference, rel err {rel(a, c):.2e}"
    if not is_pair:
        return
    on = torch.tensor([[0, 1], [1, 0]])
    (u, delta, A, B, C, D, z, bias) = tensors
    refs = [selective_scan_ref(u[i], delta[i], A[i], B[i], C[i], D[i], z, bias[i], True, reverse=i == 1,
                               gap=gap[i]) for i in range(2)]
    expected = 0.5 * (refs[0] * on[:, 0, None, None] + refs[1] * on[:, 1, None, None])
    u = u.clone()
    u[0, 0] = float("nan")  # sample 0 skips the forward direction: its input is never read
    u[1, 1] = float("nan")  # sample 1 the backward one: a pass gates the forward direction's output
    args = [t.to(DEVICE) for t in (u, delta, A, B, C, D, z, bias)]
    with torch.no_grad(), policy.override(**dict(SMALL, scan_fwd_tile=tile), scan_seq_split="on",
                                          scan_seq_chunk=chunk):
        y = selective_scan_pair_triton(*args, True, 0.5, gap=gap.to(DEVICE), direction_on=on.to(DEVICE)).cpu()
    assert rel(y, expected) < 1e-5

@pytest.mark.parametrize("tile,length,seq_split,with_gap", [
    (4, 13, True, False),   # tiled, 2 sequence chunks per direction (chunk states stored per direction only)
    (0, 11, False, True),   # the step walk, one pass, gaps
])
def test_pair_directions_as_separate_programs(tile: int, length: int, seq_split: bool, with_gap: bool) -> None:
    """``scan_pair_split_below``: each direction of the pair runs in its own programs and writes its own output,
    added after the launch; values and gradients match the reference, with and without the sequence split, and
    so do per-sample direction switches (a sample with neither direction gets zeros)."""
    tensors, gap, r = inputs(length + 7, 2, 5, length, 3, True)
    gap = gap if with_gap else None
    grad_out = r(2, 5, length)
    settings = dict(dict(SMALL, scan_fwd_tile=tile), scan_pair_split_below=16,
                    scan_seq_split="on" if seq_split else "off", scan_seq_chunk=8)
    with policy.override(**settings):
        assert triton_scan.pair_split(length, 2, 5, 132)
        got = values_and_grads(pair, tensors, gap, grad_out)
    ref = values_and_grads(pair_ref, tensors, gap, grad_out)
    for name, a, c in zip(NAMES, got, ref):
        assert rel(a, c) < 1e-5, f"{name}: directions as separate programs vs reference, rel err {rel(a, c):.2e}"
    on = torch.tensor([[0, 1], [0, 0]])
    (u, delta, A, B, C, D, z, bias) = tensors
    expected = 0.5 * selective_scan_ref(u[1], delta[1], A[1], B[1], C[1], D[1], z, bias[1], True, reverse=True,
                                        gap=None if gap is None else gap[1]) * on[:, 1, None, None]
    u = u.clone()
    u[0] = float("nan")  # the forward direction is off for both samples: never read
    args = [t.to(DEVICE) for t in (u, delta, A, B, C, D, z, bias)]
    with torch.no_grad(), policy.override(**settings):
        y = selective_scan_pair_triton(*args, True, 0.5, gap=None if gap is None else gap.to(DEVICE),
                                       direction_on=on.to(DEVICE)).cpu()
    assert rel(y, expected) < 1e-5
    assert torch.equal(y[1], torch.zeros_like(y[1]))


def test_pair_split_doubles_the_programs_below_its_threshold() -> None:
    """The directions split where a pair pass (32 channels a program, tiled) runs fewer programs than
    ``scan_pair_split_below`` per multiprocessor (Vim-S, batch 8: 192 on 132; batch 16: 384), and the sequence
    split then counts the doubled programs. Where the pair pass would split the sequence, sequences longer than
    ``scan_pair_split_max_len`` keep that split (1024 px, batch 8); batch 16 at 768 px splits no sequence either
    way; 0 never splits."""
    with policy.override(scan_fwd_tile=4, scan_pair_split_below=4, scan_pair_split_max_len=2048,
                         scan_seq_split="auto", scan_fwd_tile_split_below=2, scan_seq_programs=16, scan_seq_chunk=64):
        assert triton_scan.pair_split(1025, 8, 768, 132)
        assert fwd_chunk(1025, 8, 768, 132, split_g=True) == 1025  # 384 programs: one pass
        assert fwd_chunk(1025, 8, 768, 132) < 1025
        assert not triton_scan.pair_split(4097, 8, 768, 132)
        assert triton_scan.pair_split(2305, 16, 768, 132)
        assert not triton_scan.pair_split(197, 128, 768, 132)
    with policy.override(scan_fwd_tile=4, scan_pair_split_below=0):
        assert not triton_scan.pair_split(197, 1, 768, 132)


@pytest.mark.parametrize("tile,length,ckpt,split,is_pair,with_gap", [
    (2, 13, 4, True, True, False),    # 2-step tiles, backward segments with carries, the last chunk partial
    (4, 13, 8, False, False, False),  # one reversed direction, two 4-step tiles a chunk, the last partial
    (2, 1, 4, False, True, False),    # L = 1
    (2, 10, 4, True, True, True),     # gaps: the step walk runs instead
])
def test_tiled_backward_equals_reference(tile: int, length: int, ckpt: int, split: bool, is_pair: bool,
                                         with_gap: bool) -> None:
    """The tiled backward (``scan_bwd_tile``: the states and their gradients scanned T steps at a time inside
    each thread, dB / dC summed once a tile) gives the reference's gradients, with the sequence split into
    segments or not."""
    tensors, gap, r = inputs(length + tile, 2, 5, length, 3, is_pair)
    gap = gap if with_gap else None
    grad_out = r(2, 5, length)
    fn, ref_fn = (pair, pair_ref) if is_pair else (single, single_ref)
    with policy.override(**dict(SMALL, scan_ckpt_chunk=ckpt, scan_bwd_tile=tile),
                         scan_seq_split="on" if split else "off", scan_seq_chunk=8):
        got = values_and_grads(fn, tensors, gap, grad_out)
    ref = values_and_grads(ref_fn, tensors, gap, grad_out)
    for name, a, c in zip(NAMES, got, ref):
        assert rel(a, c) < 1e-5, f"{name}: tiled backward vs reference, rel err {rel(a, c):.2e}"


def test_tiled_backward_needs_tiles_that_divide_the_checkpoint_chunk() -> None:
    tensors, _, r = inputs(0, 1, 4, 6, 2, True)
    xs = [t.clone().to(DEVICE).requires_grad_() for t in tensors]
    with policy.override(scan_bwd_tile=4, scan_ckpt_chunk=6):
        with pytest.raises(ValueError, match="scan_bwd_tile=4 must divide scan_ckpt_chunk=6"):
            pair(*xs, None)


@pytest.mark.parametrize("tile,adjacent", [(4, True), (2, False)])
def test_fp32_copies_of_b_and_c_change_nothing(tile: int, adjacent: bool) -> None:
    """The forward's fp32 copies of 16-bit B and C (``scan_fwd_bc_fp32``) give bit-identical outputs and
    gradients, whether B and C are adjacent columns of one tensor (x_proj's output, copied in one go) or not."""
    bsz, dim, length, n = 2, 5, 11, 3
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = r(2, bsz, length, dim).transpose(-1, -2).bfloat16()
    delta = (r(2, bsz, length, dim) * 0.5).transpose(-1, -2).bfloat16()
    A, D, bias = -torch.rand(2, dim, n, generator=g) - 0.2, r(2, dim), r(2, dim) * 0.3
    z = r(bsz, dim, length).bfloat16()
    bc = r(2, bsz, length, 2 + 2 * n).bfloat16() if adjacent else r(2, bsz, n, 2 * length).bfloat16()
    grad_out = r(bsz, dim, length).bfloat16()

    def split(bc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if adjacent:  # (dt | B | C) columns, 2 + 2n wide
            return bc[..., 2:2 + n].transpose(-1, -2), bc[..., 2 + n:].transpose(-1, -2)
        return bc[..., :length], bc[..., length:]  # time-contiguous halves

    B, C = split(bc)
    for got, want in zip(triton_scan._bc_fp32(B, C), (B, C)):
        assert torch.equal(got, want.float())
    results = []
    for copy in (True, False):
        xs = [t.clone().to(DEVICE).requires_grad_() for t in (u, delta, A, bc, D, z, bias)]
        with policy.override(**dict(SMALL, scan_fwd_tile=tile), scan_fwd_bc_fp32=copy):
            y = pair(*xs[:3], *split(xs[3]), *xs[4:], None)
            (y.float() * grad_out.float().to(DEVICE)).sum().backward()
        results.append([y.detach().cpu()] + [x.grad.cpu() for x in xs])
    for name, a, b in zip(["y", "u", "delta", "A", "B and C", "D", "z", "delta_bias"], *results):
        assert torch.equal(a, b), f"{name}: differs with the fp32 copies of B and C"
    want = pair_ref(*[t.float() for t in (u, delta, A, B, C, D, z, bias)], None)
    assert rel(results[0][0].float(), want) < 5e-2


def test_chunk_choice_splits_long_sequences_at_small_batch_only() -> None:
    """'auto', with a split below 4 programs per multiprocessor and 16 (backward 32) per multiprocessor when
    split: a single pass of Vim-S at 1024 px, batch 8 (8 samples x 12 channel blocks = 96 programs on 132
    multiprocessors) is split into chunks enough to reach the target; batch 64 (768 programs) and batch 128 at
    224 px (1,536) keep one pass; the backward splits finer; 'off' and 'on' do as told; a multiple rounds the
    chunk up."""
    with policy.override(scan_seq_split="auto", scan_seq_split_below=4, scan_seq_programs=16,
                         scan_bwd_seq_programs=32, scan_seq_chunk=64):
        chunk = seq_chunk(4097, 96, 132)
        assert 64 <= chunk < 4097
        assert 96 * triton.cdiv(4097, chunk) >= 16 * 132
        assert triton.cdiv(4097, seq_chunk(4097, 96, 132, backward=True)) > triton.cdiv(4097, chunk)
        assert seq_chunk(4097, 768, 132) == 4097
        assert seq_chunk(197, 128 * 12, 132) == 197
        assert seq_chunk(64, 96, 132) == 64  # too short for two chunks of at least 64
        assert seq_chunk(4097, 96, 132, multiple=8) % 8 == 0
    with policy.override(scan_seq_split="off"):
        assert seq_chunk(4097, 96, 132) == 4097
    with policy.override(scan_seq_split="on", scan_seq_chunk=50):
        assert seq_chunk(4097, 10_000, 132) == 50
        assert seq_chunk(4097, 10_000, 132, multiple=8) == 56
        assert seq_chunk(30, 10_000, 132) == 30


def test_tiled_forward_splits_below_its_own_threshold() -> None:
    """The tiled forward holds 32 channels a program (twice the step walk's programs for the same work), so its
    split has its own threshold (``scan_fwd_tile_split_below``, 2 programs per multiprocessor): at 768 channels
    and 2,305 tokens, batch 8 (192 programs on 132 multiprocessors) splits, batch 16 (384) runs one pass; the
    step walk (64 channels a program, 4 per multiprocessor) splits both."""
    with policy.override(scan_seq_split="auto", scan_seq_split_below=4, scan_fwd_tile_split_below=2,
                         scan_seq_programs=16, scan_seq_chunk=64):
        with policy.override(scan_fwd_tile=4):
            assert fwd_chunk(2305, 8, 768, 132) < 2305
            assert fwd_chunk(2305, 16, 768, 132) == 2305
        with policy.override(scan_fwd_tile=0):
            assert fwd_chunk(2305, 8, 768, 132) < 2305
            assert fwd_chunk(2305, 16, 768, 132) < 2305
            assert fwd_chunk(2305, 64, 768, 132) == 2305


def test_bad_split_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, on, off"):
        policy.set(scan_seq_split="always")
