"""The fused R-MeeTo merge against the PyTorch merge, through the Triton interpreter on CPU (tiny shapes) and with
the real kernels on a GPU: same kept rows in the same order, class-token slot, positions, sizes and merged values,
for every class-token rule, odd and even token counts, r up to its maximum, and a residual stream or none. Both
plans run: the single program per image (up to ``merge_single_max_tokens``) and the tiled plan for any length,
forced here onto tiny lengths with small tiles so that several similarity tiles and slot blocks are used."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

pytest.importorskip("triton")

import mambatrim  # noqa: E402
from mambatrim.ops import policy  # noqa: E402
from mambatrim.reduce import TokenState, rmeeto, rmeeto_kernels  # noqa: E402
from mambatrim.reduce.rmeeto import merge_arrays  # noqa: E402
from mambatrim.reduce.rmeeto_kernels import fused_merge  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("hidden", "residual", "positions", "protected", "sizes")
# the tiled plan at every length, 16 A x 16 B similarity tiles, slot passes of 16 tokens
TILED = dict(merge_single_max_tokens=1, merge_tile=16, merge_slot_block=16)


def _inputs(length: int, bsz: int, dim: int, with_residual: bool, shared: bool, seed: int) -> tuple:
    """Random (hidden, residual, positions, cls, sizes) on the CPU; class tokens in the middle, first and last.

    ``shared``: every A token's best partner is the same B token (sequence index 1 where the class token is not
    first), so all r merge into one destination."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(bsz, length, dim, generator=g)
    if shared:
        common = torch.randn(dim, generator=g)
        hidden = common + 0.3 * hidden
        hidden[:, 1] = common
    residual = torch.randn(bsz, length, dim, generator=g) if with_residual else None
    positions = torch.stack([torch.randperm(length, generator=g) for _ in range(bsz)])
    cls = torch.tensor([length // 2, 0, length - 1] * bsz)[:bsz, None]
    sizes = torch.randint(1, 4, (bsz, length), generator=g).float()
    return hidden, residual, positions, cls, sizes


def _fused(inputs: tuple, r: int, rule: str) -> tuple:
    dev = [None if t is None else t.to(DEVICE) for t in inputs]
    return tuple(None if t is None else t.cpu() for t in fused_merge(*dev, r, rule))


def _assert_same(got: tuple, ref: tuple) -> None:
    for name, a, b in zip(NAMES, got, ref):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape, name
        if name in ("positions", "protected"):
            assert torch.equal(a, b.to(a.dtype)), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def _check(length: int, r: int, rule: str, with_residual: bool, shared: bool, bsz: int = 3, dim: int = 20) -> None:
    """``dim`` 20 is not a power of two: the kernels mask their channel tails."""
    inputs = _inputs(length, bsz, dim, with_residual, shared, seed=length + r)
    _assert_same(_fused(inputs, r, rule), merge_arrays(*inputs, r, rule))


@pytest.mark.parametrize("length,r,rule,with_residual,shared", [
    (13, 3, "official", True, False), (14, 4, "middle", True, False), (21, 10, "boundary", True, False),
    (9, 1, "official", False, False), (15, 6, "middle", True, True), (45, 20, "official", True, True),
    (41, 17, "middle", False, False)])
def test_fused_merge_equals_the_pytorch_merge(length: int, r: int, rule: str, with_residual: bool,
                                              shared: bool) -> None:
    _check(length, r, rule, with_residual, shared)


@pytest.mark.parametrize("length,r,rule,with_residual,shared", [
    (71, 35, "official", True, False), (70, 34, "middle", False, False), (69, 34, "boundary", True, False),
    (45, 20, "boundary", True, True), (50, 17, "official", False, True), (38, 1, "middle", True, False),
    (34, 9, "boundary", False, False), (5, 2, "official", True, False)])
def test_tiled_plan_equals_the_pytorch_merge(length: int, r: int, rule: str, with_residual: bool,
                                             shared: bool) -> None:
    """Several similarity tiles (up to 3 x 3 per image), several slot blocks and merge blocks (r up to 35), a
    last tile cut short, and r = (L - 1) // 2, the most one event may merge."""
    with policy.override(**TILED):
        _check(length, r, rule, with_residual, shared)


@pytest.mark.parametrize("settings", [{}, TILED], ids=["single", "tiled"])
def test_images_merge_independently(settings: dict) -> None:
    """Each image's merge is the one it gets alone in a batch of one."""
    inputs = _inputs(47, 3, 20, True, False, seed=3)
    with policy.override(**settings):
        batched = _fused(inputs, 19, "boundary")
        for i in range(3):
            alone = _fused(tuple(t[i:i + 1] for t in inputs), 19, "boundary")
            for name, a, b in zip(NAMES, batched, alone):
                assert torch.equal(a[i:i + 1], b), name


class _Refused:
    """A kernel stand-in that fails when launched."""

    def __getitem__(self, grid: tuple) -> None:
        raise AssertionError("this plan must not run")


@pytest.mark.parametrize("length,refused", [(21, "_best_partner_kernel"), (22, "_merge_plan_kernel")])
def test_plan_follows_the_policy(monkeypatch: pytest.MonkeyPatch, length: int, refused: str) -> None:
    """Up to ``merge_single_max_tokens`` tokens the single-program plan runs, beyond it the tiled one."""
    monkeypatch.setattr(rmeeto_kernels, refused, _Refused())
    with policy.override(merge_single_max_tokens=21, merge_tile=16):
        _check(length, 5, "official", False, False, bsz=1, dim=8)


@pytest.mark.parametrize("settings,match", [
    (dict(merge_single_max_tokens=514), "at most 513"), (dict(merge_tile=24), "power of two >= 16"),
    (dict(merge_tile=8), "power of two >= 16"), (dict(merge_slot_block=48), "power of two")])
def test_bad_plan_settings_are_refused(settings: dict, match: str) -> None:
    inputs = _inputs(9, 1, 8, False, False, seed=0)
    with policy.override(**settings), pytest.raises(ValueError, match=match):
        fused_merge(*inputs, 2, "official")


def test_reducer_uses_the_fused_merge_without_grad_only() -> None:
    torch.manual_seed(0)
    state = TokenState(hidden=torch.randn(2, 11, 8, device=DEVICE), residual=torch.randn(2, 11, 8, device=DEVICE),
                       positions=torch.arange(11, device=DEVICE).repeat(2, 1),
                       protected=torch.tensor([[5], [5]], device=DEVICE))
    reducer = rmeeto.RMeeToReducer(r=2, layers=[1], fused=True)
    with torch.no_grad():
        fused = reducer.before_layer(1, state)
    plain = rmeeto.merge_tokens(state, 2)
    torch.testing.assert_close(fused.hidden, plain.hidden)
    assert torch.equal(fused.positions, plain.positions)
    needs_grad = state.replace(hidden=state.hidden.clone().requires_grad_())
    out = reducer.before_layer(1, needs_grad)  # training: the differentiable PyTorch merge
    assert out.hidden.requires_grad


gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="long sequences: real kernels only")


@gpu_only
@pytest.mark.parametrize("length,r", [(1025, 57), (1025, 512), (4097, 229), (3137, 1568)])
@pytest.mark.parametrize("rule", ["official", "middle", "boundary"])
def test_long_sequences_on_the_gpu(length: int, r: int, rule: str) -> None:
    """The default settings at 512² and 1024² (Vim-S's 1,025 and 4,097 tokens), video lengths, r up to the
    maximum, batch 8, Vim-S's width."""
    _check(length, r, rule, True, False, bsz=8, dim=384)


@gpu_only
@pytest.mark.parametrize("img_size", [512, 1024])
def test_vim_small_at_high_resolution_on_the_gpu(img_size: int) -> None:
    """R-MeeTo 0.31 on Vim-S (random weights, fp32, batch 8): the fused merge gives the PyTorch merge's logits."""
    torch.manual_seed(0)
    model = mambatrim.create_model("vim_small_patch16_224", img_size=img_size).cuda().eval()
    x = torch.randn(8, 3, img_size, img_size, device="cuda")
    rmeeto.apply(model, ratio=0.31)
    logits = {}
    for fused in (False, True):
        with policy.override(fused_merge=fused), torch.no_grad():
            logits[fused] = model(x)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-3, atol=1e-3)


@gpu_only
def test_tiled_plan_runs_in_a_cuda_graph() -> None:
    """No host sync in the tiled plan (the sort stays on the device): a captured graph replays the eager merge."""
    inputs = [None if t is None else t.cuda() for t in _inputs(1025, 8, 384, True, False, seed=1)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = fused_merge(*inputs, 57, "boundary")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_merge(*inputs, 57, "boundary")
    graph.replay()
    for name, a, b in zip(NAMES, captured, eager):
        assert torch.equal(a, b), name
