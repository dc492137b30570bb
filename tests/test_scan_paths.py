"""The multi-order scan (``scan_paths``) against the sequential reference on explicitly permuted inputs.

The reference here permutes every input by hand (Python lists of visiting orders, plain indexing), runs
``selective_scan_ref`` per path and sample, and puts each step's output back at its token; gradients come from
autograd through it. Three layouts are covered, as their backbones use them:

* PlainMamba: four zig-zags sharing one set of parameters; u read at the order's token, delta / B / C at
  raster index t (the official code's quirk), a per-order additive B term, outputs summed;
* GroupMamba: four raster directions, each on its channel group with its own delta / B / C (d_state 1),
  outputs concatenated by channel;
* the multi-path mixer: per-path inputs already in visiting order, the gate z read through the index, mean.

Each runs dense and pruned (per-sample orders of the surviving tokens, with their gaps), on the Triton kernels
(interpreter on CPU, tiny shapes) and on the torch backend. ``tests/test_scan_orders.py`` is also run through
the ``TritonPaths`` executor.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the kernels

from mambatrim.ops import policy, scan_paths  # noqa: E402
from mambatrim.ops.scan_ref import selective_scan_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
H, W = 3, 4  # the token grid


@pytest.fixture(autouse=True)
def small_blocks() -> Iterator[None]:
    """Narrow channel blocks and short checkpoint chunks on CPU: several of each get exercised."""
    if DEVICE == "cpu":
        with policy.override(scan_paths_fwd_block_d=2, scan_paths_bwd_block_d=2, scan_ckpt_chunk=4):
            yield
    else:
        yield


def zigzags() -> list[list[int]]:
    """PlainMamba's four orders of the H x W grid, written out: a row snake, its reverse, a column snake, its
    reverse."""
    rows = [r * W + (c if r % 2 == 0 else W - 1 - c) for r in range(H) for c in range(W)]
    cols = [(r if c % 2 == 0 else H - 1 - r) * W + c for c in range(W) for r in range(H)]
    return [rows, rows[::-1], cols, cols[::-1]]


def rasters() -> list[list[int]]:
    """GroupMamba's four directions: row-major, column-major and their reverses."""
    rows = list(range(H * W))
    cols = [r * W + c for c in range(W) for r in range(H)]
    return [rows, cols, rows[::-1], cols[::-1]]


def pruned_visits(orders: list[list[int]], kept: list[list[int]]) -> tuple[list, list]:
    """Per order and sample: the surviving tokens' sequence indices in that order, and the pruned tokens skipped
    before each step (the gaps)."""
    visits, gaps = [], []
    for order in orders:
        step_of = {p: s for s, p in enumerate(order)}
        per_v, per_g = [], []
        for keep in kept:
            seq = sorted(range(len(keep)), key=lambda i: step_of[keep[i]])
            steps = [step_of[keep[i]] for i in seq]
            per_v.append(seq)
            per_g.append([0] + [steps[i] - steps[i - 1] - 1 for i in range(1, len(steps))])
        visits.append(per_v)
        gaps.append(per_g)
    return visits, gaps


def reference(case: str, ins: dict, visits: list, gaps: list | None) -> torch.Tensor:
    """Path by path and sample by sample on inputs permuted with the lists ``visits[k][b]``."""
    K, E = ins["A"].shape[:2]
    bsz = ins["u"].shape[-3]
    out = []
    for b in range(bsz):
        total = []
        for k in range(K):
            perm = visits[k][b]
            if case == "plain":  # u at the order's token; delta, B, C at raster index t; B += the order's term
                u, delta = ins["u"][b][:, perm], ins["delta"][b]
                Bm, Cm, z = ins["B"][b] + ins["B_add"][k].T, ins["C"][b], None
            elif case == "group":  # everything at the token, path k's channel group
                sl = slice(k * E, (k + 1) * E)
                u, delta = ins["u"][b][sl][:, perm], ins["delta"][b][sl][:, perm]
                Bm, Cm, z = ins["B"][k, b][:, perm], ins["C"][k, b][:, perm], None
            else:  # mixer: inputs already in visiting order, the gate read at the token
                u, delta, Bm, Cm = ins["u"][k, b], ins["delta"][k, b], ins["B"][k, b], ins["C"][k, b]
                z = ins["z"][b][:, perm]
            gap = None if gaps is None else torch.tensor(gaps[k][b], dtype=torch.float32)[None]
            y = selective_scan_ref(u[None], delta[None], ins["A"][k], Bm[None], Cm[None], ins["D"][k],
                                   None if z is None else z[None], ins["delta_bias"][k], True, gap=gap)[0]
            back = torch.zeros_like(y)
            back[:, perm] = y  # step t's output goes to token perm[t]
            total.append(back)
        out.append(torch.cat(total) if case == "group" else sum(total) * (1 / K if case == "mixer" else 1.0))
    return torch.stack(out)


def make(case: str, pruned: bool, seed: int = 0):
    """Inputs of a case (tiny), its per-path visiting lists and gaps, and the scan_paths keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    K, bsz, E, N = 4, 2, 3, (1 if case == "group" else 4)
    orders = zigzags() if case == "plain" else rasters()
    kept = [[0, 2, 3, 5, 6, 8, 11], [1, 2, 4, 7, 9, 10, 11]] if pruned else [list(range(H * W))] * bsz
    L = len(kept[0])
    visits, gaps = pruned_visits(orders, kept)
    ins = dict(A=-torch.rand(K, E, N, generator=g) - 0.2, D=r(K, E), delta_bias=r(K, E) * 0.3)
    if case == "plain":  # one set of SSM parameters shared by the orders
        ins.update(A=ins["A"][:1].expand(K, -1, -1).clone(), D=ins["D"][:1].expand(K, -1).clone(),
                   delta_bias=ins["delta_bias"][:1].expand(K, -1).clone())
        ins.update(u=r(bsz, E, L), delta=r(bsz, E, L) * 0.5, B=r(bsz, N, L), C=r(bsz, N, L), B_add=r(K, L, N) * 0.3)
        kw = dict(u_at="token", bc_at="step", combine="sum")
    elif case == "group":
        ins.update(u=r(bsz, K * E, L), delta=r(bsz, K * E, L) * 0.5, B=r(K, bsz, N, L), C=r(K, bsz, N, L))
        kw = dict(u_at="token", bc_at="token", combine="concat")
    else:
        ins.update(u=r(K, bsz, E, L), delta=r(K, bsz, E, L) * 0.5, B=r(K, bsz, N, L), C=r(K, bsz, N, L),
                   z=r(bsz, E, L))
        kw = dict(u_at="step", bc_at="step", combine="sum", scale=1 / K)
    index = torch.tensor(visits) if pruned else torch.tensor([v[0] for v in visits])  # (K, b, L) or (K, L)
    gap = torch.tensor(gaps, dtype=torch.float32) if pruned else None
    return ins, visits, gaps if pruned else None, dict(kw, index=index, gap=gap)


def run_op(ins: dict, kw: dict, backend: str, grad_out: torch.Tensor, dtype: torch.dtype = torch.float32):
    """scan_paths forward + backward: (y, {name: grad}); u, delta, B, C, z in ``dtype``."""
    low = {"u", "delta", "B", "C", "z"}
    xs = {k: (v.to(dtype) if k in low else v).to(DEVICE).requires_grad_() for k, v in ins.items()}
    extra = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in kw.items()}
    y = scan_paths(xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], D=xs["D"], z=xs.get("z"),
                   delta_bias=xs["delta_bias"], delta_softplus=True, B_add=xs.get("B_add"), backend=backend,
                   **extra)
    assert y.dtype == dtype
    (y.float() * grad_out.to(DEVICE)).sum().backward()
    return y.detach().float().cpu(), {k: v.grad.float().cpu() for k, v in xs.items()}


def run_reference(case: str, ins: dict, visits, gaps, grad_out: torch.Tensor, dtype=torch.float32):
    xs = {k: (v.to(dtype).float() if k in {"u", "delta", "B", "C", "z"} else v).clone().requires_grad_()
          for k, v in ins.items()}
    y = reference(case, xs, visits, gaps)
    (y * grad_out).sum().backward()
    return y.detach(), {k: v.grad for k, v in xs.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(case: str, pruned: bool, backend: str, dtype=torch.float32, tol: float = 1e-5) -> None:
    ins, visits, gaps, kw = make(case, pruned)
    shape = reference(case, ins, visits, gaps).shape
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want, want_grads = run_reference(case, ins, visits, gaps, grad_out, dtype)
    got, grads = run_op(ins, kw, backend, grad_out, dtype)
    assert got.shape == want.shape
    assert rel(got, want) < tol, f"{case} y: rel err {rel(got, want):.2e}"
    assert set(grads) == set(want_grads)
    for name in grads:
        err = rel(grads[name], want_grads[name])
        assert err < tol, f"{case} d{name}: rel err {err:.2e}"


@needs_triton
@pytest.mark.parametrize("case", ["plain", "group", "mixer"])
@pytest.mark.parametrize("pruned", [False, True])
def test_triton_matches_the_explicit_reference(case: str, pruned: bool) -> None:
    check(case, pruned, "triton")


@needs_triton
@pytest.mark.parametrize("case,pruned", [("plain", False), ("group", False), ("mixer", False), ("group", True)])
def test_triton_split_along_the_sequence_matches_the_reference(case: str, pruned: bool) -> None:
    """Scans split into 4-step chunks: the forward of concatenated paths (chunk states, then outputs from the
    carried states) and the backward without gaps (segment carries, then the walk back from the folded ones)."""
    with policy.override(scan_seq_split="on", scan_seq_chunk=4):
        check(case, pruned, "triton")


@pytest.mark.parametrize("case", ["plain", "group", "mixer"])
def test_torch_backend_matches_the_explicit_reference(case: str) -> None:
    check(case, True, "torch")


@needs_triton
def test_triton_bf16_inputs_match_the_reference_on_the_same_rounded_inputs() -> None:
    check("plain", True, "triton", torch.bfloat16, tol=5e-2)


def test_the_reference_is_not_trivially_satisfied() -> None:
    """The quirks matter: reading delta/B/C at the token instead of at t, or dropping B_add or the gaps, changes
    the result (an op ignoring them could not pass the tests above)."""
    ins, visits, gaps, kw = make("plain", True)
    want = reference("plain", ins, visits, gaps)
    for change in (dict(bc_at="token"), dict(B_add=None), dict(gap=None)):
        args = dict(kw, **change)
        y = scan_paths(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], D=ins["D"],
                       delta_bias=ins["delta_bias"], delta_softplus=True, B_add=args.pop("B_add", ins["B_add"]),
                       backend="torch", **args)
        assert rel(y, want) > 1e-3, change


def test_bad_input_names_the_problem() -> None:
    ins, _, _, kw = make("group", False)
    call = lambda **ch: scan_paths(**dict(dict(u=ins["u"], delta=ins["delta"], A=ins["A"], B=ins["B"],  # noqa: E731
                                                  C=ins["C"], backend="torch", **kw), **ch))
    with pytest.raises(ValueError, match="choose one of token, step"):
        call(u_at="raster")
    with pytest.raises(ValueError, match="choose one of sum, concat"):
        call(combine="mean")
    with pytest.raises(ValueError, match="expected 3 \\(shared by the paths\\) or 4 x 3"):
        call(u=ins["u"][:, :5])
    with pytest.raises(ValueError, match="index visits 5 tokens"):
        call(index=kw["index"][:, :5])
    with pytest.raises(ValueError, match="gap must be \\(paths, batch, length\\)"):
        call(gap=torch.zeros(4, 12))


# ------------------------------------------------------------------ the mixer's grid orders through TritonPaths
@pytest.fixture
def orders_module():
    sys.path.insert(0, os.path.dirname(__file__))
    import test_scan_orders  # noqa: PLC0415

    return test_scan_orders


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="test_scan_orders' toy backbone runs on CPU tensors (interpreter)")
def test_scan_orders_run_through_the_triton_paths_executor(orders_module, monkeypatch) -> None:
    """tests/test_scan_orders.py's checks (explicitly permuted reference, pruned with gaps, channel groups,
    gradients) on the triton backend, every grid-order call taken by ``TritonPaths``."""
    from mambatrim.models import mamba

    calls = []
    run = mamba.TritonPaths.run
    monkeypatch.setattr(mamba.TritonPaths, "run", staticmethod(lambda *a: (calls.append(1), run(*a))[1]))
    with policy.override(backend="triton", scan_paths_fwd_block_d=16, scan_paths_bwd_block_d=16,
                         scan_ckpt_chunk=8):
        orders_module.test_each_zigzag_path_equals_ref_on_explicitly_permuted_pruned_tokens("decay")
        assert len(calls) == 7  # the dense layer, then four single-path calls and the full call
        orders_module.test_per_group_channel_slices_with_raster_orders()
        orders_module.test_training_gradients_flow_through_every_grid_path()
    assert len(calls) == 10


@needs_triton
@pytest.mark.parametrize("combine", ["mean", "concat"])
def test_grid_mixer_on_triton_equals_torch_with_gradients(combine: str) -> None:
    """A grid-order mixer on pruned tokens with 'decay' alignment, on DEVICE: the TritonPaths executor against
    TorchPaths (backend 'torch'), output and every parameter gradient."""
    from mambatrim.contract import MixerContext, raster_orders, zigzag_orders
    from mambatrim.models.mamba import MultiPathMixer

    torch.manual_seed(0)
    orders = zigzag_orders() if combine == "mean" else raster_orders()
    mixer = MultiPathMixer(8, orders, combine, d_state=4).to(DEVICE)
    kept = torch.tensor([[0, 2, 3, 5, 6, 8, 11], [1, 2, 4, 7, 9, 10, 11]], device=DEVICE)
    ctx = MixerContext(positions=kept, align="decay", grid=(H, W))
    hidden = torch.randn(2, 7, 8, device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        mixer.zero_grad()
        with policy.override(backend=backend, scan_paths_fwd_block_d=16, scan_paths_bwd_block_d=16):
            out = mixer(hidden, ctx)
            out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in mixer.parameters()])
    for a, b in zip(*results):
        assert rel(a.cpu(), b.cpu()) < 1e-4
