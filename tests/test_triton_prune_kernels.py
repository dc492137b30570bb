"""The kernels behind token pruning's fused steps (CPU through the Triton interpreter, tiny shapes): the row
gather equals advanced indexing, the predictor's add + LayerNorm equals ``layer_norm(residual + hidden)``, its
fused MLP head equals the PyTorch linears, GELUs and log-softmax; each leaves a DyVM model's output unchanged
against the PyTorch step."""
from __future__ import annotations

import importlib

import pytest
import torch

from triton_guard import DEVICE, triton  # noqa: E402,F401  (before the kernels are imported)

from mambatrim import create_model  # noqa: E402
from mambatrim.ops import policy, use_backend  # noqa: E402
from mambatrim.ops.triton_head import BLOCK_C, BLOCK_K, BLOCK_M, keep_head_triton  # noqa: E402
from mambatrim.ops.triton_norm import add_layer_norm_triton  # noqa: E402
from mambatrim.ops.triton_rows import BLOCK_D, ROWS_PER_PROGRAM, take_rows_triton  # noqa: E402
from mambatrim.reduce import dyvm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(2, 19, 5, 11), (3, 23, BLOCK_D + 3, ROWS_PER_PROGRAM + 1)])  # B, L, D, K
def test_row_gather_equals_advanced_indexing(dtype, shape) -> None:
    bsz, length, dim, k = shape
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(bsz, length, dim, generator=g) * 100).to(dtype).to(DEV)
    index = torch.stack([torch.randperm(length, generator=g)[:k] for _ in range(bsz)]).to(DEV)  # any order
    index[0, -1] = index[0, 0]  # a row taken twice
    ref = t[torch.arange(bsz, device=DEV)[:, None], index]
    out = take_rows_triton(t, index)
    assert out.shape == (bsz, k, dim) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref)
    # a strided view along L (every other row) and int32 indices
    view = t[:, ::2]
    idx = index.clamp(max=view.shape[1] - 1).to(torch.int32)
    assert torch.equal(take_rows_triton(view, idx), view[torch.arange(bsz, device=DEV)[:, None], idx.long()])


def test_row_gather_refuses_bad_shapes_and_index_types() -> None:
    t = torch.zeros(2, 5, 3, device=DEV)
    with pytest.raises(ValueError, match=r"\(B, L, D\) and index \(B, K\)"):
        take_rows_triton(t, torch.zeros(3, 2, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="integer"):
        take_rows_triton(t, torch.zeros(2, 2, device=DEV))
    assert take_rows_triton(t, torch.zeros(2, 0, dtype=torch.long, device=DEV)).shape == (2, 0, 3)


@pytest.mark.parametrize("dim", [7, 64, 1100])
def test_add_layer_norm_equals_layer_norm_of_the_sum(dim) -> None:
    g = torch.Generator().manual_seed(dim)
    hidden = (torch.randn(3, 5, dim, generator=g) * 3).bfloat16().to(DEV)
    residual = (torch.randn(3, 5, dim, generator=g) * 10 + 4).to(DEV)
    w, b = torch.randn(dim, generator=g).to(DEV), torch.randn(dim, generator=g).to(DEV)
    out = add_layer_norm_triton(hidden, residual, w, b, eps=1e-5)
    ref = torch.nn.functional.layer_norm(residual + hidden.float(), (dim,), w, b, 1e-5)
    assert out.dtype == torch.float32 and out.shape == hidden.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        add_layer_norm_triton(hidden, residual[:, :4], w, b)
    with pytest.raises(ValueError, match="do not match"):
        add_layer_norm_triton(hidden, residual, w[:-1], b)


def _head_reference(x, g, w1, w2, b2, w3, b3):
    h1 = torch.nn.functional.gelu(x @ w1.T + g[:, None, :])
    h2 = torch.nn.functional.gelu(h1 @ w2.T + b2)
    return torch.log_softmax(h2 @ w3.T + b3, dim=-1)


# (B, T, K, H1, H2): the smallest dot tiles, then widths that are not powers of two, more than one K / H2 step
# and rows that do not fill the last program
@pytest.mark.parametrize("dims", [(2, 5, 16, 16, 8), (3, BLOCK_M // 2 + 7, BLOCK_K + 13, 48, BLOCK_C + 9)])
def test_keep_head_equals_the_pytorch_head(dims) -> None:
    bsz, tokens, k, h1, h2 = dims
    g = torch.Generator().manual_seed(k)
    feats = torch.randn(bsz, tokens, 2 * k, generator=g).to(DEV)
    x = feats[..., :k]  # the local half: a strided view, as the predictor passes it
    w1_full = (torch.randn(h1, 2 * k, generator=g) * 0.3).to(DEV)
    w1 = w1_full[:, :k]  # a column slice of out_conv[0]'s weight
    gb = torch.randn(bsz, h1, generator=g).to(DEV)
    w2, b2 = (torch.randn(h2, h1, generator=g) * 0.3).to(DEV), torch.randn(h2, generator=g).to(DEV)
    w3, b3 = (torch.randn(2, h2, generator=g) * 0.3).to(DEV), torch.randn(2, generator=g).to(DEV)
    out = keep_head_triton(x, gb, w1, w2, b2, w3, b3, precision="fp32")
    assert out.shape == (bsz, tokens, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, _head_reference(x, gb, w1, w2, b2, w3, b3), rtol=1e-5, atol=1e-5)
    gb[1] += 1.0  # the per-sample bias reaches only its own sample's rows
    moved = keep_head_triton(x, gb, w1, w2, b2, w3, b3, precision="fp32")
    assert torch.equal(moved[0], out[0]) and not torch.allclose(moved[1], out[1])
    with pytest.raises(ValueError, match="do not chain"):
        keep_head_triton(x, gb, w1, w2[:, :-1], b2, w3, b3)
    with pytest.raises(ValueError, match="precision"):
        keep_head_triton(x, gb, w1, w2, b2, w3, b3, precision="bf16")


def _dyvm_with_opinionated_predictors() -> tuple[torch.nn.Module, torch.Tensor]:
    """A deployed two-stage DyVM whose predictors have opinions of their own (and a LayerNorm that is not the
    identity), fp32 products (on a GPU cuBLAS and a kernel would round TF32 products differently); and an input."""
    torch.manual_seed(0)
    model = create_model("vim_tiny_patch16_224", depth=3, embed_dim=32, img_size=32, patch_size=8, stride=8,
                         num_classes=5).to(DEV)
    model = dyvm.apply(model, keep_ratio=0.6, block_ratio=None, pruning_layers=[1, 2])
    for predictor in model.reducer.predictors:
        predictor.precision = "fp32"
        for p in predictor.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return dyvm.deploy(model), torch.randn(2, 3, 32, 32, device=DEV)


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    """Replace ``module.name`` by a wrapper that records each call in the returned list."""
    calls: list[int] = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# (kernel module, function, policy setting, calls in two forwards of two stages, exact)
STEPS = [("triton_rows", "take_rows_triton", "fused_row_gather", 8, True),  # hidden and residual
         ("triton_norm", "add_layer_norm_triton", "fused_predictor_norm", 4, False),
         ("triton_head", "keep_head_triton", "fused_predictor_head", 4, False)]


@pytest.mark.parametrize("module, function, switch, num_calls, exact", STEPS, ids=[step[2] for step in STEPS])
def test_each_fused_step_leaves_the_dyvm_model_unchanged(monkeypatch, module, function, switch, num_calls,
                                                          exact) -> None:
    model, x = _dyvm_with_opinionated_predictors()
    calls = _count_calls(monkeypatch, importlib.import_module(f"mambatrim.ops.{module}"), function)
    with torch.no_grad(), use_backend("torch"):
        ref = model(x)
    # the step walk: this tests DyVM's pruning steps, and the interpreter runs the tiled walk's in-thread scan one
    # element at a time (65 s against 9 s here); the tiled walk has its own tests
    with torch.no_grad(), use_backend("triton"), policy.override(scan_fwd_tile=0):
        with policy.override(**{switch: False}):
            plain, plain_state = model(x), model.forward_tokens(x)
        assert not calls
        with policy.override(**{switch: True}):
            fused, fused_state = model(x), model.forward_tokens(x)
    assert len(calls) == num_calls
    assert torch.equal(fused_state.positions, plain_state.positions)  # the same tokens kept
    if exact:  # a row copy
        assert torch.equal(fused, plain)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
