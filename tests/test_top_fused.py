"""Aligned ToP on the fused Triton mixer (inference) against the per-direction PyTorch path, in the Triton
interpreter on CPU (tiny shapes).

The position-mapped pair conv equals the scatter / conv / gather of ``_conv_at_positions``; the fused aligned
mixer ('hold' and 'decay') equals the PyTorch aligned mixer on the 'torch' backend for random sorted position
maps with gaps, the class token re-inserted at the middle (out of positional order) or at its original place,
odd lengths and per-sample maps; a small Vim with ``top.apply(..., align=...)`` gives the same logits on both
paths. Inputs are random and non-zero (a wrong neighbour or gap changes the result), and the channels the conv
must not read are NaN.
"""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from triton_guard import DEVICE, triton  # noqa: E402,F401  (before the kernels are imported)

from mambatrim.models.mamba import BiMambaMixer, _conv_at_positions  # noqa: E402
from mambatrim.models.vim import VisionMamba  # noqa: E402
from mambatrim.ops import policy, triton_vim, use_backend  # noqa: E402
from mambatrim.ops.triton_vim import conv_pair_triton  # noqa: E402
from mambatrim.reduce import MixerContext, top  # noqa: E402



@pytest.fixture(autouse=True)
def small_blocks() -> Iterator[None]:
    """Small token and channel blocks in the interpreter: several blocks per sample, partial last blocks."""
    if DEVICE == "cpu":
        with policy.override(scan_fwd_block_d=16, conv_block_l=4, conv_block_e=16):
            yield
    else:
        yield


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records the keyword arguments of every fused-mixer call (proves the fused path ran)."""
    calls: list[dict] = []
    inner = triton_vim.bimamba_forward_triton

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return inner(*args, **kwargs)

    monkeypatch.setattr(triton_vim, "bimamba_forward_triton", spy)
    return calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def position_maps(bsz: int, full: int, kept: int, placement: str, gen: torch.Generator) -> torch.Tensor:
    """(bsz, kept) random maps into a dense sequence of ``full`` tokens whose class token sits at ``full // 2``:
    ``kept - 1`` sorted patches with gaps, the class token inserted at the middle of them ('middle': generally
    out of positional order) or at its original place ('original'). A different map per row."""
    cls = full // 2
    patches = torch.tensor([p for p in range(full) if p != cls])
    rows = []
    for _ in range(bsz):
        pick = patches[torch.randperm(full - 1, generator=gen)[:kept - 1]].sort().values
        if placement == "middle":
            mid = (kept - 1) // 2
            rows.append(torch.cat([pick[:mid], torch.tensor([cls]), pick[mid:]]))
        else:
            rows.append(torch.cat([pick, torch.tensor([cls])]).sort().values)
    return torch.stack(rows)


def cls_indices(positions: torch.Tensor, full: int) -> torch.Tensor:
    return (positions == full // 2).float().argmax(1)[:, None]


# ----------------------------------------------------------------------------------------------- conv
CONV_CASES = [(17, 9, "middle"), (17, 9, "original"), (13, 7, "middle"), (16, 11, "original"), (11, 10, "middle")]


@pytest.mark.parametrize("full,kept,placement", CONV_CASES)
def test_mapped_conv_pair_equals_scatter_conv_gather(full: int, kept: int, placement: str) -> None:
    """Each kept token sees the kept tokens at its original neighbours' positions, zeros elsewhere: exactly
    ``_conv_at_positions`` (scatter to full length, conv, gather back) of each direction."""
    gen = torch.Generator().manual_seed(full * 100 + kept)
    bsz, dim = 3, 20  # two channel blocks, the second partial
    positions = position_maps(bsz, full, kept, placement, gen)
    big = torch.randn(bsz, kept, 2 * dim, generator=gen)
    big[..., dim:] = float("nan")  # in_proj's z half: the conv must never read it
    x = big[..., :dim]  # strided like the mixer's x
    w, b = torch.randn(2, dim, 4, generator=gen), torch.randn(2, dim, generator=gen)
    want = torch.stack([_conv_at_positions(x.transpose(1, 2), w[d], b[d], positions, reverse=d == 1).transpose(1, 2)
                        for d in range(2)])
    args = [t.to(DEVICE) for t in (x, w, b)]
    got = conv_pair_triton(*args, positions=positions.to(DEVICE), full_length=full)
    assert got.shape == (2, bsz, kept, dim)
    assert rel(got, want) < 1e-6
    # a longer dense length only adds zero slots; without one, the length is read from the positions
    assert rel(conv_pair_triton(*args, positions=positions.to(DEVICE), full_length=full + 5), want) < 1e-6
    assert rel(conv_pair_triton(*args, positions=positions.to(DEVICE)), want) < 1e-6
    # the map matters: the compact conv (no positions) differs wherever a neighbour was pruned
    assert rel(conv_pair_triton(*args), want) > 1e-2
    # and without bias
    want_nb = torch.stack([_conv_at_positions(x.transpose(1, 2), w[d], None, positions, reverse=d == 1)
                           .transpose(1, 2) for d in range(2)])
    assert rel(conv_pair_triton(args[0], args[1], None, positions=positions.to(DEVICE), full_length=full),
               want_nb) < 1e-6


def test_conv_at_positions_full_length_equals_derived_length() -> None:
    """The PyTorch aligned conv: a given dense length (no host sync) gives what ``positions.max() + 1`` gives."""
    gen = torch.Generator().manual_seed(4)
    positions = position_maps(2, 15, 9, "middle", gen)
    x, w, b = torch.randn(2, 6, 9, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    for reverse in (False, True):
        want = _conv_at_positions(x, w, b, positions, reverse)
        torch.testing.assert_close(_conv_at_positions(x, w, b, positions, reverse, full_length=15), want)
        torch.testing.assert_close(_conv_at_positions(x, w, b, positions, reverse, full_length=21), want)


def test_mapped_conv_refuses_autograd_and_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(1)
    positions = position_maps(2, 11, 7, "middle", gen).to(DEVICE)
    x = torch.randn(2, 7, 8, generator=gen).to(DEVICE)
    w, b = torch.randn(2, 8, 4, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="inference-only"):
        conv_pair_triton(x.clone().requires_grad_(), w, b, positions=positions, full_length=11)
    with pytest.raises(ValueError, match="inference-only"):
        conv_pair_triton(x, w.clone().requires_grad_(), b, positions=positions, full_length=11)
    with pytest.raises(ValueError, match="positions must be"):
        conv_pair_triton(x, w, b, positions=positions[:, :5], full_length=11)
    with torch.no_grad():  # under no_grad parameters that require grad are fine
        conv_pair_triton(x, w.clone().requires_grad_(), b, positions=positions, full_length=11)


# ----------------------------------------------------------------------------------------------- mixer
def random_mixer(seed: int) -> BiMambaMixer:
    """A tiny mixer with steps of order 1 and a small skip term, so the scan state (and the decay across
    gaps) dominates the output, and non-zero conv biases."""
    torch.manual_seed(seed)
    mixer = BiMambaMixer(16, d_state=4)
    with torch.no_grad():
        for p in (mixer.dt_proj.bias, mixer.dt_proj_b.bias):
            p.normal_(0.5, 0.5)
        for p in (mixer.D, mixer.D_b):
            p.mul_(0.1)
        for p in (mixer.conv1d.bias, mixer.conv1d_b.bias):
            p.normal_(0.0, 0.5)
    return mixer.to(DEVICE)


def run_mixer(mixer: BiMambaMixer, hidden: torch.Tensor, ctx: MixerContext, backend: str) -> torch.Tensor:
    with torch.no_grad(), use_backend(backend):
        return mixer(hidden, ctx)


@pytest.mark.parametrize("align", ["hold", "decay"])
@pytest.mark.parametrize("full,kept,placement", [(17, 9, "middle"), (17, 9, "original"), (13, 7, "middle"),
                                                 (16, 11, "original"), (15, 12, "middle")])
def test_fused_aligned_mixer_equals_torch_path(align: str, full: int, kept: int, placement: str,
                                               fused_calls: list[dict]) -> None:
    gen = torch.Generator().manual_seed(full * 10 + kept)
    mixer = random_mixer(full)
    bsz = 3
    positions = position_maps(bsz, full, kept, placement, gen).to(DEVICE)
    hidden = torch.randn(bsz, kept, 16, generator=gen).to(DEVICE)
    ctx = MixerContext(positions=positions, protected=cls_indices(positions, full), align=align, full_length=full)
    want = run_mixer(mixer, hidden, ctx, "torch")
    assert not fused_calls
    got = run_mixer(mixer, hidden, ctx, "triton")
    assert len(fused_calls) == 1 and fused_calls[0]["positions"] is positions
    assert (fused_calls[0]["gap"] is None) == (align == "hold")  # 'hold' runs the compact scan, no gaps
    assert rel(got, want) < 1e-5
    # guard: this case is one where the alignment changes the output (plain pruning differs)
    assert rel(run_mixer(mixer, hidden, None, "triton"), want) > 1e-3
    # without a dense length the fused path reads it from the positions: same result
    assert rel(run_mixer(mixer, hidden, MixerContext(positions=positions, protected=ctx.protected, align=align),
                         "triton"), want) < 1e-5


def test_hold_and_decay_differ_on_the_fused_path() -> None:
    """The gaps reach the fused scan: 'decay' differs from 'hold' by as much as on the PyTorch path."""
    gen = torch.Generator().manual_seed(8)
    mixer = random_mixer(3)
    positions = position_maps(2, 17, 9, "middle", gen).to(DEVICE)
    hidden = torch.randn(2, 9, 16, generator=gen).to(DEVICE)
    out = {}
    for align in ("hold", "decay"):
        ctx = MixerContext(positions=positions, protected=cls_indices(positions, 17), align=align, full_length=17)
        out[align] = {b: run_mixer(mixer, hidden, ctx, b) for b in ("torch", "triton")}
    diff = rel(out["decay"]["triton"], out["hold"]["triton"])
    assert diff > 1e-3
    assert abs(diff - rel(out["decay"]["torch"], out["hold"]["torch"])) < 1e-4


@pytest.mark.parametrize("align", ["hold", "decay"])
def test_fused_aligned_mixer_with_direction_skipping(align: str, fused_calls: list[dict]) -> None:
    """Per-sample direction skipping (skip_gated, inference) combines with the alignment in the fused kernels."""
    gen = torch.Generator().manual_seed(5)
    mixer = random_mixer(5)
    positions = position_maps(4, 15, 9, "middle", gen).to(DEVICE)
    hidden = torch.randn(4, 9, 16, generator=gen).to(DEVICE)
    gate = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], device=DEVICE)
    ctx = MixerContext(positions=positions, protected=cls_indices(positions, 15), align=align, full_length=15,
                       direction_gate=gate, skip_gated=True)
    want = run_mixer(mixer, hidden, ctx, "torch")
    got = run_mixer(mixer, hidden, ctx, "triton")
    assert len(fused_calls) == 1 and fused_calls[0]["positions"] is positions
    assert rel(got, want) < 1e-5


def test_aligned_mixer_with_autograd_runs_the_pytorch_path(fused_calls: list[dict]) -> None:
    """Fine-tuning (autograd on) keeps the per-direction path, differentiable, with the fused path's values."""
    gen = torch.Generator().manual_seed(6)
    mixer = random_mixer(6)
    positions = position_maps(2, 13, 7, "middle", gen).to(DEVICE)
    hidden = torch.randn(2, 7, 16, generator=gen).to(DEVICE)
    ctx = MixerContext(positions=positions, protected=cls_indices(positions, 13), align="decay", full_length=13)
    with use_backend("triton"):
        out = mixer(hidden, ctx)
        assert not fused_calls
        out.square().sum().backward()
    assert mixer.conv1d_b.weight.grad is not None and mixer.conv1d_b.weight.grad.abs().sum() > 0
    assert rel(run_mixer(mixer, hidden, ctx, "triton"), out.detach()) < 1e-5
    assert len(fused_calls) == 1


# ----------------------------------------------------------------------------------------------- model
def tiny_vim(seed: int = 0) -> VisionMamba:
    torch.manual_seed(seed)
    model = VisionMamba(img_size=20, patch_size=4, stride=4, depth=4, embed_dim=16, num_classes=5, d_state=4,
                        drop_path_rate=0.0)  # 25 patches + the class token = 26 tokens -> 15 -> 9
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.dt_proj.bias.normal_(0.0, 0.5)
            layer.mixer.dt_proj_b.bias.normal_(0.0, 0.5)
    return model.to(DEVICE).eval()


@pytest.mark.parametrize("align,placement", [("hold", "middle"), ("decay", "middle"), ("decay", "original")])
def test_top_vim_fused_logits_equal_torch_path(align: str, placement: str, fused_calls: list[dict]) -> None:
    model = top.apply(tiny_vim(), keep=0.6, layers=[1, 3], align=align, cls_placement=placement)
    images = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        with use_backend("torch"):
            want = model(images)
        with use_backend("triton"):
            got = model(images)
        plain = top.apply(model, keep=0.6, layers=[1, 3], align=None, cls_placement=placement)(images)
    assert rel(got, want) < 1e-5
    assert rel(plain, want) > 1e-4  # the alignment changes the logits: the comparison is not vacuous
    aligned = [c for c in fused_calls if c.get("positions") is not None]
    assert len(aligned) == 3  # blocks 1, 2 and 3 of the fused forward (block 0 is dense)
    assert all(c["full_length"] == 26 for c in aligned)


def test_pruner_context_carries_the_dense_length() -> None:
    model = top.apply(tiny_vim(), keep=0.6, layers=[1, 3], align="hold")
    reducer = model.reducer
    state = reducer.begin(model.embed(torch.randn(2, 3, 20, 20, device=DEVICE)))
    dense = reducer.mixer_context(0, state)  # before the first pruning: only the score's tap
    assert dense.positions is None and dense.align is None and dense.tap is not None
    ctx = reducer.mixer_context(1, state)
    assert ctx.full_length == 26 and ctx.align == "hold"
    reducer.finish(state)
