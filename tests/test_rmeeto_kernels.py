"""The fused R-MeeTo merge (two Triton launches) against the PyTorch merge, through the Triton interpreter on
CPU (tiny shapes) and with the real kernels on a GPU: same kept rows in the same order, class-token slot,
positions, sizes and merged values, for every class-token rule, odd and even token counts, and a residual
stream or none."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

pytest.importorskip("triton")

from mambatrim.reduce import TokenState, rmeeto  # noqa: E402
from mambatrim.reduce.rmeeto import merge_arrays  # noqa: E402
from mambatrim.reduce.rmeeto_kernels import fused_merge  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("length,r,rule,with_residual,shared", [
    (13, 3, "official", True, False), (14, 4, "middle", True, False), (21, 10, "boundary", True, False),
    (9, 1, "official", False, False), (15, 6, "middle", True, True), (45, 20, "official", True, True),
    (41, 17, "middle", False, False)])
def test_fused_merge_equals_the_pytorch_merge(length: int, r: int, rule: str, with_residual: bool,
                                              shared: bool) -> None:
    """``shared``: every A token's best partner is the same B token, so all r merge into one destination."""
    g = torch.Generator().manual_seed(length + r)
    bsz, dim = 3, 20  # not a power of two: the rows kernel masks its channel tail
    hidden = torch.randn(bsz, length, dim, generator=g)
    if shared:
        common = torch.randn(dim, generator=g)
        hidden = common + 0.3 * hidden
        hidden[:, 1] = common  # sequence index 1 is the first B token whatever the class token's place

    residual = torch.randn(bsz, length, dim, generator=g) if with_residual else None
    positions = torch.stack([torch.randperm(length, generator=g) for _ in range(bsz)])
    cls = torch.tensor([length // 2, 0, length - 1])
    sizes = torch.randint(1, 4, (bsz, length), generator=g).float()
    ref = merge_arrays(hidden, residual, positions, cls, sizes, r, rule)
    dev = [None if t is None else t.to(DEVICE) for t in (hidden, residual, positions, cls, sizes)]
    got = fused_merge(*dev, r, rule)
    names = ["hidden", "residual", "positions", "cls_index", "sizes"]
    for name, a, b in zip(names, got, ref):
        if b is None:
            assert a is None
            continue
        a = a.cpu()
        assert a.shape == b.shape, name
        if name in ("positions", "cls_index"):
            assert torch.equal(a, b.to(a.dtype)), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_reducer_uses_the_fused_merge_without_grad_only() -> None:
    torch.manual_seed(0)
    state = TokenState(hidden=torch.randn(2, 11, 8, device=DEVICE), residual=torch.randn(2, 11, 8, device=DEVICE),
                       positions=torch.arange(11, device=DEVICE).repeat(2, 1),
                       cls_index=torch.tensor([5, 5], device=DEVICE))
    reducer = rmeeto.RMeeToReducer(r=2, layers=[1], fused=True)
    with torch.no_grad():
        fused = reducer.before_layer(1, state)
    plain = rmeeto.merge_tokens(state, 2)
    torch.testing.assert_close(fused.hidden, plain.hidden)
    assert torch.equal(fused.positions, plain.positions)
    needs_grad = state.replace(hidden=state.hidden.clone().requires_grad_())
    out = reducer.before_layer(1, needs_grad)  # training: the differentiable PyTorch merge
    assert out.hidden.requires_grad
