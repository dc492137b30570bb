"""The compiled CPU kernels (ops.cpu_kernels) against the sequential reference scan and nn.functional.conv1d,
and the fall-back to PyTorch ops where no C compiler is found."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from mambatrim.ops import causal_conv1d, cpu_kernels, policy, selective_scan
from mambatrim.ops.scan_ref import selective_scan_ref
from mambatrim.reduce import dyvm, rmeeto, top

needs_compiler = pytest.mark.skipif(cpu_kernels.unavailable_reason() != "",
                                    reason=f"compiled CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def token_major(gen: torch.Generator, batch: int, channels: int, length: int) -> torch.Tensor:
    """(batch, channels, length) viewed on (batch, length, channels) memory: how Vim's mixer passes tensors."""
    return torch.randn(batch, length, channels, generator=gen).transpose(1, 2)


def scan_inputs(length: int, dim: int, seed: int, layout: str, extras: bool, gap: bool, state: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = 2
    make = (lambda c: token_major(g, batch, c, length)) if layout == "token_major" else (
        lambda c: torch.randn(batch, c, length, generator=g))
    inputs = dict(u=make(dim), delta=make(dim) * 0.5, A=-torch.exp(torch.randn(dim, state, generator=g)),
                  B=make(state), C=make(state))
    if extras:
        inputs.update(D=torch.randn(dim, generator=g), z=make(dim), delta_bias=torch.randn(dim, generator=g) * 0.5,
                      delta_softplus=True)
    else:
        inputs["delta"] = inputs["delta"].abs()  # no softplus: keep delta >= 0 as a discretisation step
    if gap:
        inputs["gap"] = torch.randint(0, 3, (batch, length), generator=g).float()
    return inputs


@needs_compiler
@pytest.mark.parametrize("length", [1, 7, 197])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dim,layout,extras,gap", [
    (37, "token_major", True, False),   # channels not a multiple of the vector width; Vim's layout
    (16, "contiguous", True, True),     # gaps; (b, d, L) contiguous inputs (strided channel loads)
    (3, "token_major", False, False),   # no D, z, delta_bias, softplus
    (40, "contiguous", False, True),
])
def test_compiled_scan_matches_ref(length, reverse, dim, layout, extras, gap):
    inputs = scan_inputs(length, dim, seed=length + dim, layout=layout, extras=extras, gap=gap)
    y_ref = selective_scan_ref(**inputs, reverse=reverse)
    y = cpu_kernels.selective_scan_cpu(**inputs, reverse=reverse)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert rel_err(y, y_ref) < 1e-5
    assert y.transpose(1, 2).is_contiguous()  # token-major output: out_proj reads it without a copy


# Builds of the kernels to test: the machine's own (-march=native) and portable ones, so that the vector width
# and the exp2 / reciprocal code of other CPUs (no AVX-512: clamped exp2, divisions) run here too.
BUILDS = {"native": ("-O3", "-march=native", "-fopenmp"), "avx2": ("-O3", "-mavx2", "-mfma", "-fopenmp"),
          "sse": ("-O3", "-fopenmp")}


@pytest.fixture(params=list(BUILDS))
def build(request, monkeypatch):
    """The compiled kernels as built with one of BUILDS (skipped where it cannot be built or run here)."""
    flags = BUILDS[request.param]
    if request.param == "avx2" and "avx2" not in cpu_kernels._cpu_id():
        pytest.skip("this CPU has no AVX2 (or does not say)")
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    path, why = cpu_kernels._build(compiler, (flags,)) if compiler else (None, "no C compiler")
    if path is None:
        pytest.skip(why)
    monkeypatch.setattr(cpu_kernels, "_library", lambda: (cpu_kernels._load(path), ""))
    return request.param


@needs_compiler
@pytest.mark.parametrize("length", [1, 33])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dim,layout,extras,gap", [
    (48, "token_major", True, True),     # the specialised d_state-16 loop on every vector width
    (40, "token_major", True, False),    # 40 channels: specialised with 8- and 4-wide vectors, general with 16
    (32, "token_major", False, True),    # no D, z, delta_bias, softplus
    (32, "contiguous", True, True),      # strided channels: the general loop
])
def test_compiled_scan_state16_matches_ref(build, length, reverse, dim, layout, extras, gap):
    inputs = scan_inputs(length, dim, seed=length + dim, layout=layout, extras=extras, gap=gap, state=16)
    y_ref = selective_scan_ref(**inputs, reverse=reverse)
    y = cpu_kernels.selective_scan_cpu(**inputs, reverse=reverse)
    assert rel_err(y, y_ref) < 1e-5


@needs_compiler
@pytest.mark.parametrize("dim,state", [(24, 5), (48, 16)])  # the general loop, the d_state-16 one
def test_compiled_scan_extreme_values_match_ref(build, dim, state):
    """exp2, softplus and silu at their edges: softplus past its threshold (20) and far below 0, silu of |z| up
    to ~200 (its exp saturates), decays that underflow to 0."""
    inputs = scan_inputs(64, dim, seed=1, layout="token_major", extras=True, gap=True, state=state)
    inputs["delta"] = inputs["delta"] * 40.0  # delta + bias in about [-80, 80]
    inputs["z"] = inputs["z"] * 60.0
    inputs["A"] = inputs["A"] * 20.0
    y_ref = selective_scan_ref(**inputs)
    y = cpu_kernels.selective_scan_cpu(**inputs)
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < 1e-5


@needs_compiler
@pytest.mark.parametrize("dim,gap", [(48, True), (37, False)])  # the specialised loop and the general one
def test_compiled_scan_low_rank_delta_and_summed_paths(build, dim, gap):
    """dt_proj folded in (delta from its rank-R input, read through the strided view the mixer's x_proj split
    gives) and two directions averaged into one buffer (scale, add_to): equal to the reference on the full delta,
    (forward + reverse) / 2."""
    inputs = scan_inputs(29, dim, seed=dim, layout="token_major", extras=True, gap=gap, state=16)
    g = torch.Generator().manual_seed(7)
    rank = 3
    x_dbl = torch.randn(2, 29, rank + 32, generator=g)  # (b, L, R + 2N), as x_proj writes it
    low = x_dbl[..., :rank].transpose(1, 2)  # (b, R, L), channel stride R + 2N
    weight = torch.randn(dim, rank, generator=g) * 0.5
    full = dict(inputs, delta=torch.einsum("dr,brl->bdl", weight, low))
    low_rank = dict(inputs, delta=low, dt_weight=weight)
    y = cpu_kernels.selective_scan_cpu(**low_rank, scale=0.5)
    out = cpu_kernels.selective_scan_cpu(**low_rank, reverse=True, scale=0.5, add_to=y)
    assert out is y
    expect = (selective_scan_ref(**full) + selective_scan_ref(**full, reverse=True)) / 2
    assert rel_err(out, expect) < 1e-5


@needs_compiler
def test_compiled_scan_rejects_mismatched_extras():
    inputs = scan_inputs(9, 16, seed=0, layout="token_major", extras=True, gap=False, state=16)
    with pytest.raises(ValueError, match="dt_weight .* must be"):
        cpu_kernels.selective_scan_cpu(**inputs, dt_weight=torch.randn(16, 3))  # delta is not (b, 3, L)
    with pytest.raises(ValueError, match="add_to must be a float32"):
        cpu_kernels.selective_scan_cpu(**inputs, add_to=torch.zeros(2, 16, 8))


@needs_compiler
@pytest.mark.parametrize("dim,reverse", [(48, False), (48, True), (37, False)])
def test_compiled_conv_builds_match_conv1d(build, dim, reverse):
    """The conv's whole-vector loop (48 channels) and its general one (37), per build, with silu."""
    g = torch.Generator().manual_seed(dim)
    x = token_major(g, 2, dim, 21) * 30.0  # silu far into both tails
    weight, bias = torch.randn(dim, 1, 4, generator=g), torch.randn(dim, generator=g)
    xs = x.flip(-1) if reverse else x
    expect = F.silu(F.conv1d(F.pad(xs, (3, 0)), weight, bias, groups=dim))
    expect = expect.flip(-1) if reverse else expect
    out = cpu_kernels.causal_conv1d_cpu(x, weight, bias, silu=True, reverse=reverse)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("choice", ["auto", "compiled", "torch"])
def test_torch_backend_inference_paths_match_ref(choice):
    """Every cpu_kernels choice of the torch backend at inference gives the reference result."""
    inputs = scan_inputs(50, 37, seed=2, layout="token_major", extras=True, gap=True)
    with torch.no_grad(), policy.override(cpu_kernels=choice):
        for reverse in (False, True):
            y = selective_scan(**inputs, reverse=reverse, backend="torch")
            assert rel_err(y, selective_scan_ref(**inputs, reverse=reverse)) < 1e-5


@needs_compiler
def test_compiled_runs_only_for_cpu_inference():
    cpu = torch.device("cpu")
    assert cpu_kernels.compiled_applies(cpu, needs_grad=False)
    assert not cpu_kernels.compiled_applies(cpu, needs_grad=True)
    assert not cpu_kernels.compiled_applies(torch.device("meta"), needs_grad=False)
    with policy.override(cpu_kernels="torch"):
        assert not cpu_kernels.compiled_applies(cpu, needs_grad=False)
    # with gradients the torch backend keeps the differentiable path
    inputs = scan_inputs(9, 4, seed=3, layout="token_major", extras=True, gap=False)
    u = inputs.pop("u").clone().requires_grad_(True)
    selective_scan(u, **inputs, backend="torch").sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


@needs_compiler
@pytest.mark.parametrize("length", [1, 3, 40])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_compiled_conv_matches_conv1d(length, k, reverse, activation):
    g = torch.Generator().manual_seed(length * k)
    dim = 37
    x = token_major(g, 2, dim, length)
    weight, bias = torch.randn(dim, 1, k, generator=g), torch.randn(dim, generator=g)
    xs = x.flip(-1) if reverse else x
    expect = F.conv1d(F.pad(xs, (k - 1, 0)), weight, bias, groups=dim)
    expect = F.silu(expect) if activation else expect
    expect = expect.flip(-1) if reverse else expect
    with torch.no_grad(), policy.override(cpu_kernels="compiled"):
        out = causal_conv1d(x, weight, bias, activation=activation, reverse=reverse)
        no_bias = causal_conv1d(x.contiguous(), weight[:, 0], None, reverse=reverse)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert out.transpose(1, 2).is_contiguous()  # token-major: x_proj reads it without a copy
    plain = F.conv1d(F.pad(xs, (k - 1, 0)), weight, None, groups=dim)
    torch.testing.assert_close(no_bias, plain.flip(-1) if reverse else plain, rtol=1e-5, atol=1e-5)


@pytest.fixture
def no_compiler(monkeypatch):
    """The kernels as on a machine without a C compiler (the library cache is rebuilt around the test)."""
    monkeypatch.setenv("CC", "no-such-c-compiler")
    cpu_kernels._library.cache_clear()
    yield
    monkeypatch.undo()
    cpu_kernels._library.cache_clear()


def test_without_a_compiler_auto_falls_back_and_compiled_explains(no_compiler):
    assert "no C compiler found" in cpu_kernels.unavailable_reason()
    inputs = scan_inputs(20, 37, seed=4, layout="token_major", extras=True, gap=True)
    x = inputs["u"]
    weight, bias = torch.randn(37, 1, 4), torch.randn(37)
    with torch.no_grad():
        assert rel_err(selective_scan(**inputs, backend="torch"), selective_scan_ref(**inputs)) < 1e-5
        conv = causal_conv1d(x, weight, bias, activation="silu")
        torch.testing.assert_close(conv, F.silu(F.conv1d(F.pad(x, (3, 0)), weight, bias, groups=37)))
        with policy.override(cpu_kernels="compiled"), pytest.raises(RuntimeError, match="no C compiler found"):
            selective_scan(**inputs, backend="torch")


def test_cpu_kernels_setting_is_validated():
    with pytest.raises(ValueError, match="one of auto, compiled, torch"):
        policy.set(cpu_kernels="numba")


METHODS = {
    "dense": lambda m: m,
    "rmeeto": lambda m: rmeeto.apply(m, r=3),
    "top_hold": lambda m: top.apply(m, keep=0.7, align="hold", layers=[1, 2]),
    "top_decay": lambda m: top.apply(m, keep=0.7, align="decay", layers=[1, 2]),
    "dyvm_blocks": lambda m: dyvm.deploy(dyvm.apply(m, keep=0.7, block_ratio=0.5)),  # its callable gate
}


@needs_compiler
@pytest.mark.parametrize("name,extra,method", [
    ("vim_tiny_patch16_224", {}, "dense"),
    ("mambar_tiny_patch16_224", {}, "dense"),
    ("vim_tiny_patch16_224", {"if_divide_out": False}, "dense"),  # the paths summed, not averaged
    ("vim_tiny_patch16_224", {}, "rmeeto"),
    ("vim_tiny_patch16_224", {}, "top_hold"),  # alignment: position-mapped conv
    ("vim_tiny_patch16_224", {}, "top_decay"),  # alignment: gaps in the scan
    ("vim_tiny_patch16_224", {}, "dyvm_blocks"),
])
def test_compiled_cpu_executor_matches_pytorch_ops(monkeypatch, name, extra, method):
    """At CPU inference the sequence paths run on CompiledCpuPaths (low-rank delta, gates and the paths' sum
    inside the scan); its logits equal the PyTorch-ops executor's and the sequential reference backend's, dense
    and under the methods whose plans it takes (merging, alignment, skipped direction gates)."""
    import mambatrim
    from mambatrim.models import mamba
    from mambatrim.ops import use_backend

    torch.manual_seed(0)
    try:
        model = mambatrim.create_model(name, depth=4, embed_dim=64, img_size=64, num_classes=7, **extra)
    except TypeError as err:  # an option this family does not take
        pytest.skip(str(err))
    model = METHODS[method](model).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    calls = []
    run = mamba.CompiledCpuPaths.run
    monkeypatch.setattr(mamba.CompiledCpuPaths, "run", staticmethod(lambda *a: calls.append(1) or run(*a)))
    with torch.no_grad():
        with use_backend("torch"):
            compiled = model(x)
            assert calls, "the compiled CPU executor did not run"
            n = len(calls)
            with policy.override(cpu_kernels="torch"):
                pytorch_ops = model(x)
            with policy.override(fused_mixer=False):
                unfused = model(x)  # compiled scan and conv, PyTorch dt_proj and combine
            assert len(calls) == n  # either setting keeps the executor off
        with use_backend("ref"):
            reference = model(x)
    assert rel_err(compiled, pytorch_ops) < 1e-4
    assert rel_err(compiled, unfused) < 1e-4
    assert rel_err(compiled, reference) < 1e-4


@needs_compiler
@pytest.mark.parametrize("dim,with_residual", [(192, True), (37, True), (48, False)])
def test_compiled_add_rms_norm_matches_pytorch(build, dim, with_residual):
    """The fused add-norm against Mamba's rule written out: r = hidden + residual; r / sqrt(mean(r^2) + eps) * w."""
    g = torch.Generator().manual_seed(dim)
    hidden, residual = torch.randn(3, 5, dim, generator=g) * 3, torch.randn(3, 5, dim, generator=g)
    weight = torch.randn(dim, generator=g)
    out, res = cpu_kernels.add_rms_norm_cpu(hidden, residual if with_residual else None, weight, 1e-5)
    r = hidden + residual if with_residual else hidden
    torch.testing.assert_close(res, r)
    torch.testing.assert_close(out, r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * weight)


@needs_compiler
def test_add_and_norm_uses_the_compiled_pass_only_without_autograd(monkeypatch):
    from mambatrim.models.mamba import RMSNorm
    from mambatrim.ops import use_backend

    calls = []
    real = cpu_kernels.add_rms_norm_cpu
    monkeypatch.setattr("mambatrim.models.mamba.add_rms_norm_cpu", lambda *a: calls.append(1) or real(*a))
    norm = RMSNorm(16)
    hidden, residual = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with use_backend("torch"):
        with torch.no_grad():
            fast, fast_res = norm.add_and_norm(hidden, residual)
        assert calls == [1]
        slow, slow_res = norm.add_and_norm(hidden, residual)  # the weight has a gradient: PyTorch ops
        assert calls == [1] and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach())
    torch.testing.assert_close(fast_res, slow_res)


@needs_compiler
@pytest.mark.parametrize("skip", [True, False])
def test_compiled_cpu_executor_gates_paths_per_sample(monkeypatch, skip):
    """Per-sample direction gates on the compiled executor: skipped (a gate read as on above 0.5, off below: that
    sample's path not scanned) or multiplying the path's output; equal to PyTorch ops and the reference."""
    from mambatrim.contract import MixerContext
    from mambatrim.models import mamba
    from mambatrim.ops import use_backend

    torch.manual_seed(0)
    mixer = mamba.BiMambaMixer(32).eval()
    hidden = torch.randn(4, 11, 32)
    ctx = MixerContext(direction_gate=torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.8], [0.0, 0.0]]),
                       skip_gated=skip)
    calls = []
    run = mamba.CompiledCpuPaths.run
    monkeypatch.setattr(mamba.CompiledCpuPaths, "run", staticmethod(lambda *a: calls.append(1) or run(*a)))
    with torch.no_grad():
        with use_backend("torch"):
            compiled = mixer(hidden, ctx)
            with policy.override(cpu_kernels="torch"):
                pytorch_ops = mixer(hidden, ctx)
        with use_backend("ref"):
            reference = mixer(hidden, ctx)
    assert calls == [1]
    assert rel_err(compiled, pytorch_ops) < 1e-5 and rel_err(compiled, reference) < 1e-5
    assert compiled[3].abs().max() == 0  # both paths off: nothing but out_proj of zeros (no bias)
