"""Selective scan backends against the sequential reference, and the causal conv against nn.Conv1d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambatrim.ops import causal_conv1d, selective_scan


def make_inputs(length: int, seed: int = 0, batch: int = 2, dim: int = 3, state: int = 4, gap: bool = False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = dict(
        u=r(batch, dim, length), delta=r(batch, dim, length) * 0.5,
        A=-torch.exp(r(dim, state)),  # random negative A of mixed magnitudes
        B=r(batch, state, length), C=r(batch, state, length), D=r(dim), z=r(batch, dim, length),
        delta_bias=r(dim) * 0.5,
    )
    if gap:
        inputs["gap"] = torch.randint(0, 3, (batch, length), generator=g).float()
    return inputs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def run(backend: str, inputs: dict, reverse: bool, grad: bool):
    leaves = {k: v.clone().requires_grad_(grad and k != "gap") for k, v in inputs.items()}
    y = selective_scan(**leaves, delta_softplus=True, reverse=reverse, backend=backend)
    if not grad:
        return y, {}
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y.float() * w).sum().backward()
    return y, {k: v.grad for k, v in leaves.items() if v.grad is not None}


@pytest.mark.parametrize("length", [1, 7, 197, 730])
@pytest.mark.parametrize("reverse", [False, True])
def test_torch_matches_ref_values_and_grads_fp32(length, reverse):
    inputs = make_inputs(length, seed=length)
    y_ref, g_ref = run("ref", inputs, reverse, grad=True)
    y, g = run("torch", inputs, reverse, grad=True)
    assert rel_err(y, y_ref) < 1e-5
    assert set(g) == set(g_ref) == {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name
    with torch.no_grad():  # the inference path (in-place workspaces) too
        assert rel_err(run("torch", inputs, reverse, grad=False)[0], y_ref) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
def test_torch_matches_ref_with_gaps(reverse):
    inputs = make_inputs(33, seed=3, gap=True)
    y_ref, g_ref = run("ref", inputs, reverse, grad=True)
    y, g = run("torch", inputs, reverse, grad=True)
    assert rel_err(y, y_ref) < 1e-5
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name
    with torch.no_grad():
        assert rel_err(run("torch", inputs, reverse, grad=False)[0], y_ref) < 1e-5
    no_gap = {k: v for k, v in inputs.items() if k != "gap"}
    assert rel_err(run("ref", no_gap, reverse, grad=False)[0], y_ref) > 1e-3  # the gaps do change the result


def test_bf16_inputs_fp32_state():
    """bf16 inputs, fp32 state in both backends: outputs agree to bf16 rounding (documented: 1e-2 relative)."""
    inputs = make_inputs(197, seed=5)
    half = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    y_ref, _ = run("ref", half, False, grad=False)
    y, _ = run("torch", half, False, grad=False)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(y, run("ref", inputs, False, grad=False)[0]) < 5e-2  # close to the fp32 result too


def test_long_sequence_with_strong_decay_stays_finite():
    inputs = make_inputs(730, seed=7)
    inputs["A"] = -torch.full_like(inputs["A"], 50.0)
    inputs["delta"] = inputs["delta"] + 5.0
    y_ref, _ = run("ref", inputs, False, grad=False)
    y, _ = run("torch", inputs, False, grad=False)
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < 1e-5


def test_bad_shapes_and_backend_are_explained():
    inputs = make_inputs(5)
    with pytest.raises(ValueError, match=r"B has shape \(2, 4, 6\), expected \(2, 4, 5\)"):
        selective_scan(**{**inputs, "B": torch.randn(2, 4, 6)})
    with pytest.raises(ValueError, match="unknown scan backend 'cuda'"):
        selective_scan(**inputs, backend="cuda")


@pytest.mark.parametrize("length", [1, 3, 10])
def test_causal_conv_matches_conv1d_and_reverse_is_flipped(length):
    torch.manual_seed(length)
    dim, k = 5, 4
    conv = torch.nn.Conv1d(dim, dim, k, groups=dim, padding=k - 1)
    x = torch.randn(2, dim, length)
    torch.testing.assert_close(causal_conv1d(x, conv.weight, conv.bias), conv(x)[..., :length])
    torch.testing.assert_close(causal_conv1d(x, conv.weight, conv.bias, activation="silu"),
                               F.silu(conv(x)[..., :length]))
    flipped = conv(x.flip(-1))[..., :length].flip(-1)
    torch.testing.assert_close(causal_conv1d(x, conv.weight, conv.bias, reverse=True), flipped)


def test_causal_conv_errors():
    with pytest.raises(ValueError, match="x has 3 channels but the weight has 4"):
        causal_conv1d(torch.randn(1, 3, 5), torch.randn(4, 1, 4))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        causal_conv1d(torch.randn(1, 4, 5), torch.randn(4, 1, 4), activation="relu")
