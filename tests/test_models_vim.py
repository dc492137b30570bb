"""Vim backbone: official keys/shapes, the v2 mixer against the official flip formulation, input checks, timm."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import mambatrim
from mambatrim.models import OFFICIAL_ALIASES, BiMambaMixer, list_models
from mambatrim.ops import selective_scan
from mambatrim.reduce import Reducer


def meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", list_models("Vim"))
def test_state_dict_matches_official_keys_and_shapes(name, official_state_dict):
    expected = [(k, tuple(v)) for k, v in official_state_dict["configs"][name]]
    model = meta_model(name)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(got) == 415
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == official_state_dict["params"][name]


def test_official_long_names_are_aliases():
    for alias, target in OFFICIAL_ALIASES.items():
        shapes = {k: v.shape for k, v in meta_model(alias, depth=1).state_dict().items()}
        assert shapes == {k: v.shape for k, v in meta_model(target, depth=1).state_dict().items()}, alias


def test_timm_create_model_with_overrides():
    model = timm.create_model("vim_tiny_patch16_224", depth=4, num_classes=10, img_size=64)
    assert len(model.layers) == 4
    assert model.head.out_features == 10
    assert model.pos_embed.shape == (1, 17, 192)  # 4x4 patches + class token
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean: vim_tiny_patch16_224"):
        mambatrim.create_model("vim_tiny_patch16")


def official_mixer(mixer: BiMambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """The official v2 formulation: the backward branch runs on flipped x AND z with the *_b parameters,
    through a causal conv and a forward scan, and is flipped back before the sum and the division by 2."""
    length = hidden.shape[1]
    xz = F.linear(hidden, mixer.in_proj.weight).transpose(1, 2)

    def branch(xz_, conv, x_proj, dt_proj, A_log, D):
        x, z = xz_.chunk(2, dim=1)
        u = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] - 1,
                            groups=x.shape[1])[..., :length])
        x_dbl = F.linear(u.transpose(1, 2), x_proj.weight)
        dt, B, C = x_dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)
        return selective_scan(u, delta, -torch.exp(A_log.float()), B.transpose(1, 2), C.transpose(1, 2), D.float(),
                              z, delta_bias=dt_proj.bias.float(), delta_softplus=True, backend="ref")

    out = branch(xz, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    out_b = branch(xz.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b)
    return F.linear((out + out_b.flip(-1)).transpose(1, 2) / 2, mixer.out_proj.weight)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_mixer_matches_official_flip_formulation(backend):
    torch.manual_seed(0)
    mixer = BiMambaMixer(24)
    with torch.no_grad():  # make the two directions differ so a swapped parameter set would show
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(2, 9, 24)
    with mambatrim.ops.use_backend(backend):
        ours = mixer(hidden)
    ref = official_mixer(mixer, hidden)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_forward_uses_middle_class_token(tiny_kwargs):
    model = mambatrim.create_model("vim_tiny_patch16_224", **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    state = model.embed(x)
    assert int(state.protected[0, 0]) == 2  # 4 patches: class token at 4 // 2
    torch.testing.assert_close(state.hidden[:, 2], (model.cls_token + model.pos_embed[:, 2]).expand(2, -1, -1)[:, 0])
    final = model.forward_tokens(x).hidden
    torch.testing.assert_close(model(x), model.head(final[:, 2]))


@pytest.mark.parametrize("amp", [False, True])
def test_embedding_without_autograd_equals_the_differentiable_one(tiny_kwargs, amp):
    """Inference writes the class token and pos_embed sums in place of the concatenation; the values are those
    of the differentiable path exactly (fp32, and under bf16 autocast), and the patches those of the conv."""
    torch.manual_seed(0)
    model = mambatrim.create_model("vim_tiny_patch16_224", **tiny_kwargs).eval()
    with torch.no_grad():
        model.cls_token.normal_()
        model.pos_embed.normal_()
    x = torch.randn(3, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        grad_path = model.embed(x).hidden
        with torch.no_grad():
            fast = model.embed(x).hidden
        conv = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    assert fast.dtype == grad_path.dtype == torch.float32  # tokens + fp32 pos_embed, as before
    assert torch.equal(fast, grad_path.detach())
    expected_cls = model.cls_token[0, 0].to(conv.dtype) + model.pos_embed[0, 2]
    assert torch.equal(fast[:, 2], expected_cls.expand(3, -1))
    patches = torch.cat([fast[:, :2], fast[:, 3:]], 1) - torch.cat([model.pos_embed[:, :2], model.pos_embed[:, 3:]], 1)
    torch.testing.assert_close(patches, conv.float(), rtol=2e-2 if amp else 1e-5, atol=2e-2 if amp else 1e-5)


def test_noop_reducer_gives_identical_logits(tiny_kwargs):
    model = mambatrim.create_model("vim_tiny_patch16_224", **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        reduced = model.set_reducer(Reducer())(x)
    assert torch.equal(dense, reduced)


def test_add_norm_overwrites_the_stream_only_where_nothing_else_holds_it(tiny_kwargs):
    """Dense inference lets every layer overwrite its input stream (``in_place``); a reducer, a
    forward hook or autograd could hold those tensors, so then no layer may; a hooked layer sees its input
    unchanged after the forward."""
    model = mambatrim.create_model("vim_tiny_patch16_224", **tiny_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    flags = []
    for layer in model.layers:
        layer.norm.add_and_norm = lambda h, r, in_place=False, norm=layer.norm: (
            flags.append(in_place), type(norm).add_and_norm(norm, h, r, in_place))[1]

    def run(*, grad=False, reducer=None):
        flags.clear()
        with torch.set_grad_enabled(grad):
            model.forward_tokens(x, reducer)
        return list(flags)

    depth = len(model.layers)
    assert run() == [True] * depth
    assert run(grad=True) == [False] * depth
    assert run(reducer=Reducer()) == [False] * depth
    seen = {}
    handle = model.layers[1].register_forward_pre_hook(
        lambda mod, args: seen.update(hidden=args[0], copy=args[0].clone()))
    try:
        assert run() == [False] * depth
    finally:
        handle.remove()
    assert torch.equal(seen["hidden"], seen["copy"])
    assert run() == [True] * depth


def test_other_input_sizes_run_and_bad_sizes_are_explained(tiny_kwargs):
    model = mambatrim.create_model("vim_tiny_patch16_224", **tiny_kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 64)).shape == (1, 10)  # pos_embed interpolated on the fly
    with pytest.raises(ValueError, match=r"cannot be tiled by 16x16 patches at stride 16.*e\.g\. 48"):
        model(torch.randn(1, 3, 50, 48))
    with pytest.raises(ValueError, match="takes 3-channel images, got 1 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="cannot be tiled"):
        mambatrim.create_model("vim_tiny_patch16_224", depth=1, img_size=100)


def test_drop_path_schedule_matches_official():
    model = meta_model("vim_tiny_patch16_224", depth=4, drop_path_rate=0.3)
    probs = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.layers]
    # block i drops mixer i-1's output with linspace(0, 0.3, 4)[i-1]; block 0 never drops
    assert probs == pytest.approx([0.0, 0.0, 0.1, 0.2])
    assert model.drop_path.drop_prob == pytest.approx(0.3)
    assert math.isclose(model.layers[0].mixer.dt_rank, 12)


@pytest.mark.parametrize("patch,stride", [(16, 16), (4, 4), (16, 8)])
def test_patch_embedding_equals_the_official_conv(patch, stride):
    """Non-overlapping patches run as one GEMM: same result as the Conv2d whose weights they use (the official
    layout); overlapping ones (stride-8 variants) run the conv itself. Also under bf16 autocast."""
    from mambatrim.models.vim import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(img_size=64, patch_size=patch, stride=stride, in_chans=3, embed_dim=24)
    x = torch.randn(2, 3, 64, 64)
    tokens, grid = embed(x)
    reference = embed.proj(x).flatten(2).transpose(1, 2)
    assert grid == embed.grid_size and tokens.shape == reference.shape
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = embed(x)
        low_ref = embed.proj(x).flatten(2).transpose(1, 2)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), low_ref.float(), rtol=2e-2, atol=2e-2)
