"""Triton kernels vs the sequential reference, on CPU through the Triton interpreter (tiny shapes).

Values and every gradient are compared with ``selective_scan_ref`` in float64-free fp32 maths; odd L, both
directions, the pruning-aware ``gap``, fp32/fp16/bf16 inputs, the fused two-direction launch, the paired
conv, and a whole tiny Vim forward (+ backward) with backend 'triton' against 'torch'.

Tolerances (relative L2 error, ``|a - b| / |b|``): fp32 1e-5 (we see ~2e-7); fp16 inputs 2e-2 and bf16 inputs
5e-2 against the reference run on the *same rounded inputs* (the difference is the output rounding plus the
reference's own low-precision intermediate casts).
"""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from triton_guard import DEVICE, triton  # noqa: E402,F401  (before the kernels are imported)

from mambatrim.ops import causal_conv1d, selective_scan, use_backend  # noqa: E402
from mambatrim.ops.scan_ref import selective_scan_ref  # noqa: E402
from mambatrim.ops.triton_scan import selective_scan_pair_triton, selective_scan_triton  # noqa: E402
from mambatrim.ops.triton_vim import conv_pair_triton  # noqa: E402

from mambatrim.ops import policy, triton_scan, triton_vim  # noqa: E402


@pytest.fixture(autouse=True)
def small_blocks() -> Iterator[None]:
    """Small channel blocks and chunks: the interpreter runs element by element, and several chunks and
    channel blocks get exercised (the GPU defaults are wider)."""
    if DEVICE == "cpu":
        # several sequence segments per sample in the conv backward
        with policy.override(scan_fwd_block_d=4, scan_bwd_block_d=4, scan_ckpt_chunk=8, conv_bwd_segments=3):
            yield
    else:
        yield


NAMES = ["y", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(seed: int, bsz: int = 2, dim: int = 5, length: int = 37, n: int = 4, gap: bool = False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tensors = [r(bsz, dim, length), r(bsz, dim, length) * 0.5, -torch.rand(dim, n, generator=g) * 2 - 0.1,
               r(bsz, n, length), r(bsz, n, length), r(dim), r(bsz, dim, length), r(dim) * 0.3]
    gaps = (torch.rand(bsz, length, generator=g) * 3).floor() if gap else None
    return tensors, gaps, r


def run(fn, tensors, gaps, reverse, dtype, grad_out):
    """Forward + backward; u, delta, B, C, z in ``dtype`` (A, D, bias stay fp32, as in the model)."""
    low = {0, 1, 3, 4, 6}
    xs = [(t.to(dtype) if i in low else t).to(DEVICE).requires_grad_() for i, t in enumerate(tensors)]
    y = fn(*xs[:6], z=xs[6], delta_bias=xs[7], delta_softplus=True, reverse=reverse,
           gap=None if gaps is None else gaps.to(DEVICE))
    assert y.dtype == dtype and y.shape == xs[0].shape
    (y.float() * grad_out.to(DEVICE)).sum().backward()
    return [y.detach().float().cpu()] + [x.grad.float().cpu() for x in xs]


@pytest.mark.parametrize("reverse,gap,tile,bwd_tile", [(False, False, 4, 2), (True, True, 4, 2), (False, True, 0, 0),
                                                      (True, False, 0, 0)])
def test_scan_fp32_values_and_grads_match_ref(reverse: bool, gap: bool, tile: int, bwd_tile: int) -> None:
    """Both forward schedules, the tiled walk (T = 4, the default) and the step walk (T = 0), and both backward
    ones (tiled, T = 2, the default; the step walk, which also runs wherever there are gaps)."""
    tensors, gaps, r = make_inputs(1 + reverse + 2 * gap, gap=gap)
    grad_out = r(*tensors[0].shape)
    with policy.override(scan_fwd_tile=tile, scan_bwd_tile=bwd_tile):
        got = run(selective_scan_triton, tensors, gaps, reverse, torch.float32, grad_out)
    ref = run(selective_scan_ref, tensors, gaps, reverse, torch.float32, grad_out)
    for name, a, b in zip(NAMES, got, ref):
        assert rel(a, b) < 1e-5, f"{name}: rel err {rel(a, b):.2e}"


@pytest.mark.parametrize("dtype,tol,reverse", [(torch.float16, 2e-2, True), (torch.bfloat16, 5e-2, False)])
def test_scan_low_precision_matches_ref(dtype: torch.dtype, tol: float, reverse: bool) -> None:
    tensors, gaps, r = make_inputs(7, length=21)
    grad_out = r(*tensors[0].shape)
    got = run(selective_scan_triton, tensors, gaps, reverse, dtype, grad_out)
    ref = run(selective_scan_ref, tensors, gaps, reverse, dtype, grad_out)
    for name, a, b in zip(NAMES, got, ref):
        assert rel(a, b) < tol, f"{name}: rel err {rel(a, b):.2e}"


def test_scan_without_optional_inputs_and_through_dispatch() -> None:
    tensors, _, _ = make_inputs(3, length=19)
    u, delta, A, B, C = [t.to(DEVICE) for t in tensors[:5]]
    delta = delta.abs()
    got = selective_scan(u, delta, A, B, C, backend="triton")
    want = selective_scan_ref(u, delta, A, B, C)
    assert rel(got.cpu(), want.cpu()) < 1e-5
    # channel-major and token-major memory give the same result (the kernels take strides)
    tm = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    got_tm = selective_scan_triton(tm(u), tm(delta), A, tm(B), tm(C), reverse=True)
    assert rel(got_tm.cpu(), selective_scan_ref(u, delta, A, B, C, reverse=True).cpu()) < 1e-5


def pair_inputs(seed: int, bsz: int, dim: int, length: int, n: int):
    """Inputs of a two-direction scan in token-major storage, seen as (2, b, d, L); returns them and ``r``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = r(2, bsz, length, dim).permute(0, 1, 3, 2)
    delta = (r(2, bsz, length, dim) * 0.5).permute(0, 1, 3, 2)
    A = -torch.rand(2, dim, n, generator=g) - 0.2
    B = r(2, bsz, length, n).permute(0, 1, 3, 2)
    C = r(2, bsz, length, n).permute(0, 1, 3, 2)
    D, bias = r(2, dim), r(2, dim) * 0.3
    z = r(bsz, length, dim).transpose(1, 2)
    return (u, delta, A, B, C, D, z, bias), r


@pytest.mark.parametrize("split", [False, True])
def test_pair_matches_two_reference_scans(split: bool) -> None:
    """One launch, both directions, token-major I/O == (ref(fwd) + ref(reverse)) / 2, values and grads; both
    directions in one program (the gate applied once, to their sum) or in separate programs
    (``scan_pair_split_below``: each direction its own output, added after)."""
    bsz, dim, length = 2, 6, 23
    (u, delta, A, B, C, D, z, bias), r = pair_inputs(11, bsz, dim, length, 4)
    grad_out = r(bsz, dim, length)

    def grads(fn):
        xs = [t.clone().to(DEVICE).requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
        y = fn(*xs)
        (y * grad_out.to(DEVICE)).sum().backward()
        return [y.detach().cpu()] + [x.grad.cpu() for x in xs]

    def pair(u, delta, A, B, C, D, z, bias):
        return selective_scan_pair_triton(u, delta, A, B, C, D, z, bias, delta_softplus=True, scale=0.5)

    def two_refs(u, delta, A, B, C, D, z, bias):
        ys = [selective_scan_ref(u[i], delta[i], A[i], B[i], C[i], D[i], z, bias[i], True, reverse=i == 1)
              for i in range(2)]
        return (ys[0] + ys[1]) / 2

    with policy.override(scan_pair_split_below=16 if split else 0):
        got = grads(pair)
    for name, a, b in zip(NAMES, got, grads(two_refs)):
        assert rel(a, b) < 1e-5, f"{name}: rel err {rel(a, b):.2e}"


@pytest.mark.parametrize("split", [False, True])
def test_pair_writes_into_a_given_strided_output(split: bool) -> None:
    """``out`` (inference): the pair writes into the x half of an in_proj-like (b, L, 2E) buffer, as the fused
    mixer does, with the values of the two reference scans and the z half untouched; both layouts (the separate
    programs' second output takes out's strides). Wrong shapes, dtypes and autograd are refused."""
    bsz, dim, length = 3, 6, 17
    (u, delta, A, B, C, D, _, bias), r = pair_inputs(5, bsz, dim, length, 4)
    xz = r(bsz, length, 2 * dim)
    z = xz[..., dim:].transpose(1, 2)
    refs = [selective_scan_ref(u[i], delta[i], A[i], B[i], C[i], D[i], z, bias[i], True, reverse=i == 1)
            for i in range(2)]
    expected = 0.5 * (refs[0] + refs[1])
    buf = xz.to(DEVICE)
    args = [t.to(DEVICE) for t in (u, delta, A, B, C, D)] + [buf[..., dim:].transpose(1, 2), bias.to(DEVICE)]
    out = buf[..., :dim].transpose(1, 2)
    with torch.no_grad(), policy.override(scan_pair_split_below=16 if split else 0):
        y = selective_scan_pair_triton(*args, True, 0.5, out=out)
    assert y.data_ptr() == buf.data_ptr() and y.stride() == out.stride()
    assert rel(buf[..., :dim].transpose(1, 2).cpu(), expected) < 1e-5
    assert torch.equal(buf[..., dim:].cpu(), xz[..., dim:])
    with pytest.raises(ValueError, match=r"out must be \(batch, dim, length\)"):
        selective_scan_pair_triton(*args, True, 0.5, out=out[:, :, 1:])
    with pytest.raises(ValueError, match="inference-only"):
        selective_scan_pair_triton(*[a.clone().requires_grad_() for a in args], True, 0.5, out=out)


@pytest.mark.parametrize("schedule", [dict(scan_fwd_tile=4), dict(scan_fwd_tile=0),
                                      dict(scan_fwd_tile=4, scan_seq_split="on", scan_seq_chunk=8),
                                      dict(scan_fwd_tile=0, scan_seq_split="on", scan_seq_chunk=8),
                                      dict(scan_fwd_tile=4, scan_pair_split_below=16)])
def test_pair_writes_over_the_first_directions_step_sizes(schedule: dict) -> None:
    """``out`` may be the first direction's step sizes (the fused mixer's (b, L, 3E) buffer: x -> those step
    sizes -> the output | z | the second direction's step sizes): every schedule reads a position's step size
    before writing its output there, so the result equals the two reference scans (tiled and step walks, with
    the sequence split, the directions as separate programs). With a gap it is refused."""
    bsz, dim, length = 2, 6, 19
    (u, delta, A, B, C, D, _, bias), r = pair_inputs(7, bsz, dim, length, 4)
    buf = r(bsz, length, 3 * dim)
    buf[..., :dim] = delta[0].transpose(1, 2)
    buf[..., 2 * dim:] = delta[1].transpose(1, 2)
    z = buf[..., dim:2 * dim].transpose(1, 2)
    refs = [selective_scan_ref(u[i], delta[i], A[i], B[i], C[i], D[i], z, bias[i], True, reverse=i == 1)
            for i in range(2)]
    dev = buf.to(DEVICE)
    steps = dev.view(bsz * length, 3, dim)[:, ::2].transpose(0, 1).view(2, bsz, length, dim).permute(0, 1, 3, 2)
    args = [u.to(DEVICE), steps, A.to(DEVICE), B.to(DEVICE), C.to(DEVICE), D.to(DEVICE),
            dev[..., dim:2 * dim].transpose(1, 2), bias.to(DEVICE)]
    with torch.no_grad(), policy.override(**{"scan_pair_split_below": 0, **schedule}):  # 0: one program
        y = selective_scan_pair_triton(*args, True, 0.5, out=steps[0])
    assert y.data_ptr() == dev.data_ptr()
    assert rel(dev[..., :dim].transpose(1, 2).cpu(), 0.5 * (refs[0] + refs[1])) < 1e-5
    assert torch.equal(dev[..., dim:].cpu(), buf[..., dim:])  # z and the second direction's step sizes kept
    gap = torch.zeros(2, bsz, length, device=DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match="without gap"):
        selective_scan_pair_triton(*args, True, 0.5, gap=gap, out=steps[0])


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter runs no prefetch (inline PTX)")
@pytest.mark.parametrize("schedule", [dict(), dict(scan_pair_split_below=16), dict(scan_seq_split="on")])
def test_prefetch_changes_no_value(schedule: dict) -> None:
    """The tiled walk's prefetch of its 16-bit rows is a hint: outputs equal those without it, bit for bit (the
    pair in one program, the directions as separate programs, the sequence split)."""
    bsz, dim, length = 2, 64, 301
    (u, delta, A, B, C, D, z, bias), _ = pair_inputs(3, bsz, dim, length, 16)
    args = [t.to(DEVICE).to(torch.bfloat16) if i in (0, 1, 3, 4, 6) else t.to(DEVICE)
            for i, t in enumerate((u, delta, A, B, C, D, z, bias))]
    outs = []
    for pf in (0, 32):
        with torch.no_grad(), policy.override(scan_fwd_prefetch=pf, scan_fwd_prefetch_below=10**6, **schedule):
            outs.append(selective_scan_pair_triton(*args, True, 0.5, out=torch.empty_like(args[6])))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kinds", ["each kind once", "random"])
def test_pair_direction_switch_skips_per_sample(kinds: str, split: bool) -> None:
    """``direction_on`` (inference): each sample gets 0.5 * (on_f * fwd + on_b * bwd) -- both, one or neither
    direction -- from outputs the switched-off pairs never wrote (the conv leaves them undefined: NaN here);
    'random' has several samples of each kind. Both layouts: one program walks both directions (the second
    gates the sum, or a pass gates the first's output where the second is off), or each its own."""
    if kinds == "each kind once":
        on = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]])
    else:
        on = torch.tensor([[1, 1], [0, 1], [1, 1], [0, 0], [1, 0], [1, 1], [0, 0], [1, 1], [0, 1]])
        assert (on.sum(1) == 1).sum() % 2 == 1
    bsz, dim, length = on.shape[0], 6, 19
    (u, delta, A, B, C, D, z, bias), r = pair_inputs(3, bsz, dim, length, 4)
    refs = [selective_scan_ref(u[i], delta[i], A[i], B[i], C[i], D[i], z, bias[i], True, reverse=i == 1)
            for i in range(2)]
    expected = 0.5 * (refs[0] * on[:, 0, None, None] + refs[1] * on[:, 1, None, None])
    u_off = u.clone()
    u_off[0, on[:, 0] == 0] = float("nan")  # what a skipped direction's conv output may hold
    u_off[1, on[:, 1] == 0] = float("nan")
    args = [t.to(DEVICE) for t in (u_off, delta, A, B, C, D, z, bias)]
    with torch.no_grad(), policy.override(scan_pair_split_below=16 if split else 0):
        y = selective_scan_pair_triton(*args, delta_softplus=True, scale=0.5, direction_on=on.to(DEVICE)).cpu()
    assert rel(y, expected) < 1e-5
    idle = on.sum(1) == 0
    assert torch.equal(y[idle], torch.zeros_like(y[idle]))
    with pytest.raises(ValueError, match="inference-only"):
        selective_scan_pair_triton(*[a.clone().requires_grad_() for a in args], direction_on=on.to(DEVICE))
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        selective_scan_pair_triton(*args, direction_on=on[:3].to(DEVICE))

    x = r(bsz, length, dim)
    w, b = r(2, dim, 4), r(2, dim)
    full = conv_pair_triton(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)).cpu()
    part = conv_pair_triton(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), direction_on=on.to(DEVICE).int()).cpu()
    for i in range(2):
        written = on[:, i] == 1
        assert torch.equal(part[i, written], full[i, written])


@pytest.mark.parametrize("width,dtype", [(1500, torch.bfloat16), (40, torch.float32)])
def test_class_token_gate_matches_the_linear_selector(width: int, dtype: torch.dtype) -> None:
    """The fused gate kernel reads each sample's class-token row (a different one per sample), takes the fp32
    products with both selector rows over a width longer than one block (1500: two blocks, the last partial) and
    thresholds at 0, as :class:`LinearDirectionGate` does on the gathered rows."""
    from mambatrim.ops.triton_vim import class_token_gate_triton
    from mambatrim.contract import LinearDirectionGate

    gen = torch.Generator().manual_seed(4)
    bsz, length = 7, 5
    xz = torch.randn(bsz, length, width, generator=gen).to(dtype)
    cls_index = torch.randint(0, length, (bsz,), generator=gen)
    weight, bias = torch.randn(2, width, generator=gen), torch.randn(2, generator=gen)
    ref = LinearDirectionGate(weight, bias)
    rows = xz[torch.arange(bsz), cls_index]
    logits = ref.logits(rows)
    assert logits.abs().min() > 1e-3, "ties at 0 would make the comparison depend on summation order"
    for b in (bias, None):
        want = LinearDirectionGate(weight, b)(rows)
        gate, on = class_token_gate_triton(xz.to(DEVICE), cls_index.to(DEVICE), weight.to(DEVICE),
                                           None if b is None else b.to(DEVICE))
        assert gate.dtype == torch.float32 and on.dtype == torch.int32
        assert torch.equal(gate.cpu(), want) and torch.equal(on.cpu(), want.int())
        assert 0 < want.mean() < 1
    with pytest.raises(ValueError, match="weight must be"):
        class_token_gate_triton(xz.to(DEVICE), cls_index.to(DEVICE), weight[:, 1:].to(DEVICE))
    with pytest.raises(ValueError, match="cls_index"):
        class_token_gate_triton(xz.to(DEVICE), cls_index[:3].to(DEVICE), weight.to(DEVICE))


@pytest.mark.parametrize("length,with_bias,taps", [(13, True, 4), (3, False, 4), (11, True, 3)])
def test_conv_pair_matches_causal_and_anticausal_conv(length: int, with_bias: bool, taps: int) -> None:
    """Values and the Triton backward (dx, dweight, dbias) against torch's convs; x strided like in_proj's
    x half, several channel blocks and sequence segments, a sequence shorter than the kernel, 3 taps."""
    g = torch.Generator().manual_seed(5)
    bsz, dim = 2, 70  # dim over one channel block
    big = torch.randn(bsz, length, 2 * dim, generator=g)
    w, b = torch.randn(2, dim, taps, generator=g), torch.randn(2, dim, generator=g)
    grad = torch.randn(2, bsz, length, dim, generator=g)

    def grads(fn):
        xs = [t.clone().to(DEVICE).requires_grad_() for t in (big, w, b)]
        y = fn(xs[0][..., :dim], xs[1], xs[2] if with_bias else None)
        (y * grad.to(DEVICE)).sum().backward()
        return [y.detach().cpu()] + [t.grad.cpu() for t in xs[:3 if with_bias else 2]]

    def torch_pair(x, w, b):
        outs = [causal_conv1d(x.transpose(1, 2), w[i], None if b is None else b[i], "silu",
                              reverse=i == 1).transpose(1, 2) for i in range(2)]
        return torch.stack(outs)

    got, ref = grads(conv_pair_triton), grads(torch_pair)
    assert len(got) == len(ref)
    for a, c in zip(got, ref):
        assert rel(a, c) < 1e-5


def test_tiny_vim_triton_matches_torch_backend() -> None:
    from mambatrim.models.vim import VisionMamba

    torch.manual_seed(0)
    model = VisionMamba(img_size=24, patch_size=8, stride=8, depth=2, embed_dim=8, num_classes=7, d_state=4,
                        drop_path_rate=0.0).to(DEVICE)
    images = torch.randn(2, 3, 24, 24, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with use_backend(backend):
            logits = model(images)
        logits.square().sum().backward()
        results[backend] = (logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    (lt, gt), (lr, gr) = results["triton"], results["torch"]
    assert rel(lt.cpu(), lr.cpu()) < 1e-5
    for key in ("layers.0.mixer.conv1d_b.weight", "layers.1.mixer.A_b_log", "layers.0.mixer.x_proj.weight",
                "layers.1.mixer.dt_proj_b.bias", "patch_embed.proj.weight", "layers.0.mixer.in_proj.weight",
                "layers.1.norm.weight"):
        assert rel(gt[key].cpu(), gr[key].cpu()) < 1e-4, key
    # inference caches the stacked direction weights and the compute-dtype linear weights: an in-place
    # update of any of them must reach the next call
    mixer = model.layers[0].mixer
    for update in (lambda: mixer.A_b_log.add_(0.5), lambda: mixer.in_proj.weight.mul_(1.5),
                   lambda: mixer.out_proj.weight.add_(0.1), lambda: mixer.x_proj_b.weight.mul_(0.5)):
        with torch.no_grad(), use_backend("triton"):
            before = model(images)
            update()
            after = model(images)
        with torch.no_grad(), use_backend("torch"):
            want = model(images)
        assert rel(want.cpu(), before.cpu()) > 1e-6  # the update changed the output
        assert rel(after.cpu(), want.cpu()) < 1e-5
    # under autocast the cached weights are in the autocast dtype, as autocast's own casts would be
    kind = DEVICE.type if isinstance(DEVICE, torch.device) else str(DEVICE).split(":")[0]
    with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16):
        with use_backend("triton"):
            low = model(images)
        with use_backend("torch"):
            low_ref = model(images)
    assert mixer._triton_cast_cache[1][0].dtype == torch.bfloat16
    # inference mode (tensors without version counters) runs the cached path too
    with torch.inference_mode(), use_backend("triton"):
        inferred = model(images)
    assert rel(inferred.cpu(), want.cpu()) < 1e-5
    assert rel(low.float().cpu(), low_ref.float().cpu()) < 3e-2
    # in_proj's output, the step sizes and the scan's output in one buffer (policy mixer_in_place, the default),
    # in both pair layouts, and without it
    for in_place in (True, False):
        for split in (0, 16):
            with torch.no_grad(), use_backend("triton"), policy.override(mixer_in_place=in_place,
                                                                         scan_pair_split_below=split):
                got = model(images)
            assert rel(got.cpu(), want.cpu()) < 1e-5, (in_place, split)


def test_pair_rejects_bad_shape() -> None:
    u = torch.zeros(1, 2, 3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="2, batch, dim, length"):
        selective_scan_pair_triton(u, u, torch.zeros(1, 3, 4, device=DEVICE), u, u, None, None, None)


def test_fused_add_rms_norm_matches_pytorch() -> None:
    """The fused add + RMSNorm kernel equals the PyTorch form in values and gradients (with and without a
    residual, bf16 hidden with the fp32 residual stream)."""
    from mambatrim.models.mamba import RMSNorm
    from mambatrim.ops.triton_norm import add_rms_norm_triton

    torch.manual_seed(0)
    norm = RMSNorm(24).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for with_res in (False, True):
            h = torch.randn(3, 5, 24, device=DEVICE).to(dtype).requires_grad_()
            r = torch.randn(3, 5, 24, device=DEVICE, requires_grad=True) if with_res else None
            y, res = add_rms_norm_triton(h, r, norm.weight, norm.eps)
            res_ref = h.float() + (r if with_res else 0)
            y_ref = norm(res_ref).to(dtype)
            assert y.dtype == dtype and res.dtype == torch.float32
            assert rel(res, res_ref) < 1e-6 and rel(y, y_ref) < tol
            gy, gr = torch.randn_like(y), torch.randn_like(res)
            grads = torch.autograd.grad((y.float() * gy.float()).sum() + (res * gr).sum(),
                                        [h, norm.weight] + ([r] if with_res else []))
            refs = torch.autograd.grad((y_ref.float() * gy.float()).sum() + (res_ref * gr).sum(),
                                       [h, norm.weight] + ([r] if with_res else []))
            for g, gref in zip(grads, refs):
                assert rel(g, gref) < tol


def test_fused_add_rms_norm_in_place() -> None:
    """``in_place`` (inference): the results are written over the inputs (same storage) with the values of the
    allocating call; a non-fp32 residual falls back to allocating; under autograd it is refused."""
    from mambatrim.ops.triton_norm import add_rms_norm_triton

    torch.manual_seed(0)
    w = torch.rand(24, device=DEVICE) + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(3, 5, 24, device=DEVICE).to(dtype)
        r = torch.randn(3, 5, 24, device=DEVICE)
        with torch.no_grad():
            want_y, want_res = add_rms_norm_triton(h, r, w)
            h2, r2 = h.clone(), r.clone()
            y, res = add_rms_norm_triton(h2, r2, w, in_place=True)
        assert y.data_ptr() == h2.data_ptr() and res.data_ptr() == r2.data_ptr()
        assert torch.equal(y, want_y) and torch.equal(res, want_res)
    with torch.no_grad():  # the first layer: an fp32 hidden becomes the residual, normed is new
        want_y, want_res = add_rms_norm_triton(h.float(), None, w)
        h32 = h.float()
        y, res = add_rms_norm_triton(h32, None, w, in_place=True)
    assert res.data_ptr() == h32.data_ptr() and y.data_ptr() != h32.data_ptr()
    assert torch.equal(y, want_y) and torch.equal(res, want_res)
    with torch.no_grad():
        r16 = r.to(torch.bfloat16)
        _, res = add_rms_norm_triton(h.clone(), r16, w, in_place=True)
    assert res.dtype == torch.float32 and res.data_ptr() != r16.data_ptr()
    with pytest.raises(ValueError, match="inference-only"):
        add_rms_norm_triton(h.clone().float().requires_grad_(), r.clone(), w, in_place=True)


def test_fused_rms_norm_backward_over_many_row_blocks() -> None:
    """The backward kernel's programs each walk several 8-row blocks (more rows than 4 programs a
    multiprocessor hold, the last block partial) and sum their shares of the weight gradient."""
    from mambatrim.models.mamba import RMSNorm
    from mambatrim.ops import triton_norm

    torch.manual_seed(1)
    norm = RMSNorm(20).to(DEVICE)
    rows = triton_norm.ROWS_PER_BLOCK * triton_norm.BWD_PROGRAMS_PER_SM * 132 * 2 + 3
    h = torch.randn(rows, 20, device=DEVICE, requires_grad=True)
    r = torch.randn(rows, 20, device=DEVICE, requires_grad=True)
    y, res = triton_norm.add_rms_norm_triton(h, r, norm.weight, norm.eps)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum() + res.sum(), [h, r, norm.weight])
    refs = torch.autograd.grad((norm(h + r) * gy).sum() + (h + r).sum(), [h, r, norm.weight])
    for g, gref in zip(grads, refs):
        assert rel(g, gref) < 1e-5
