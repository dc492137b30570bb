"""Every reduction method on MambaReg (12 registers, protected, layout 'spread') and VideoMamba (class token first,
layout 'first'), through the same ``apply_method`` calls as on Vim."""
from __future__ import annotations

import pytest
import timm
import torch

from mambatrim.analysis import count_flops
from mambatrim.reduce import dyvm
from mambatrim.reduce.registry import apply_method, sequence_methods
from test_models_mambareg_videomamba import vim_mixer_macs
from test_protected_tokens import spread_rule, watch_layers

# 64x64 images, 8x8 patches: 64 patches. MambaReg with its 12 registers: L = 64 // 13 = 4, registers at 4, 9, ...,
# 59 and 4 leftover patches (76 tokens); VideoMamba: the class token at 0 (65 tokens).
SMALL = dict(img_size=64, patch_size=8, stride=8, depth=4, embed_dim=16, num_classes=5, drop_path_rate=0.0)
BACKBONES = {"mambareg": ("mambar_small_patch16_224", dict(SMALL, cls_reduce=2)),
             "videomamba": ("videomamba_small", SMALL)}
PROTECTED = {"mambareg": [4 + 5 * g for g in range(12)], "videomamba": [0]}
KEEPS = [0.6, 0.8, 0.95]  # R-MeeTo reaches at most ~0.42 reduction at depth 4


def build(backbone: str) -> torch.nn.Module:
    name, cfg = BACKBONES[backbone]
    torch.manual_seed(0)
    model = timm.create_model(name, **cfg).eval()
    with torch.no_grad():  # distinct, non-trivial tokens and directions
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def images(bsz: int = 2) -> torch.Tensor:
    return torch.randn(bsz, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_dense_layout_declares_the_protected_tokens():
    for backbone, expected in PROTECTED.items():
        state = build(backbone).embed(images())
        assert state.protected.tolist() == [expected] * 2
        assert state.protected_layout == {"mambareg": "spread", "videomamba": "first"}[backbone]


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", sequence_methods())
@pytest.mark.parametrize("keep", KEEPS)
def test_protected_tokens_survive_every_method_at_every_ratio(backbone, method, keep):
    model = apply_method(build(backbone), method, keep=keep, layers=[1, 2]).eval()
    seen = watch_layers(model, PROTECTED[backbone])  # checks order and original positions before every block
    x = images()
    with torch.no_grad():
        final = model.forward_tokens(x)
        logits = model(x)
    assert final.positions.gather(1, final.protected).tolist() == [PROTECTED[backbone]] * 2
    assert final.num_tokens < seen[0].num_tokens
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    if backbone == "videomamba":  # the class token stays first through every method
        assert all((s.protected == 0).all() for s in seen) and (final.protected == 0).all()


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", sequence_methods())
def test_training_forward_keeps_protected_tokens(backbone, method):
    model = apply_method(build(backbone), method, keep=0.6, layers=[1, 2]).train()
    watch_layers(model, PROTECTED[backbone])
    state = model.forward_tokens(images())
    if state.mask is not None:
        assert (state.mask.gather(1, state.protected) == 1).all()
    model.forward_head(model.pool(state)).sum().backward()


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", sequence_methods())
def test_identity_setting_equals_dense_model(backbone, method):
    model = build(backbone)
    x = images()
    with torch.no_grad():
        dense = model(x)
        reduced = apply_method(model, method, keep=1.0, layers=[1, 2]).eval()(x)
    torch.testing.assert_close(reduced, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", ["rmeeto", "top", "prune_static"])
def test_flops_follow_the_real_token_counts(backbone, method):
    model = apply_method(build(backbone), method, keep=0.6, layers=[1, 2]).eval()
    seen = watch_layers(model, PROTECTED[backbone])
    report = count_flops(model)
    counts = [s.num_tokens for s in seen]
    assert report.tokens_per_layer == counts and counts[-1] < counts[0]
    paper_paths = 1 if backbone == "mambareg" else 0
    for layer, tokens in zip(report.layers, counts):
        shared, per_dir = vim_mixer_macs(tokens, 16)
        assert layer.full == pytest.approx(shared + 2 * per_dir)
        assert layer.paper == pytest.approx(shared + paper_paths * per_dir)
    dense = count_flops(build(backbone))
    assert report.full < dense.full


def test_dyvm_on_videomamba_keeps_cls_first_then_kept_then_pruned():
    model = dyvm.apply(build("videomamba"), keep=0.5, block_ratio=0.8, layers=[1, 2]).train()
    seen = watch_layers(model, [0])
    model.forward_tokens(images())
    for state in seen[1:]:
        for b in range(2):
            kept = int(state.mask[b].sum()) - 1
            assert state.protected[b].tolist() == [0]
            assert state.mask[b, :kept + 1].eq(1).all() and state.mask[b, kept + 1:].eq(0).all()
            assert (state.positions[b, 1:kept + 1].diff() > 0).all()
    seen.clear()
    with torch.no_grad():
        model.eval().forward_tokens(images())
    assert all(s.protected.tolist() == [[0]] * 2 for s in seen)


def test_dyvm_on_mambareg_respreads_the_registers_and_selectors_read_their_mean_xz():
    model = dyvm.apply(build("mambareg"), keep=0.7, block_ratio=0.8, layers=[1, 2]).train()
    seen = watch_layers(model, PROTECTED["mambareg"])
    features, xzs = [], []
    for i, layer in enumerate(model.layers):
        layer.mixer.in_proj.register_forward_hook(lambda m, a, out: xzs.append(out))
        model.reducer.selectors[i].register_forward_pre_hook(lambda m, a: features.append(a[0]))
    model.forward_tokens(images())
    for state in seen[1:]:  # training: registers at (interval + 1) * (i + 1) - 1, interval = kept // 13
        kept = state.mask.sum(1).long() - 12
        for b in range(2):
            assert state.protected[b].tolist() == spread_rule(int(kept[b]), 12)
    assert len(features) == len(seen) == 4
    for state, xz, feature in zip(seen, xzs, features):
        want = torch.stack([xz[b, state.protected[b]].float().mean(0) for b in range(2)])
        torch.testing.assert_close(feature.float(), want)
    seen.clear()
    with torch.no_grad():
        model.eval().forward_tokens(images())
    for state in seen[1:]:  # inference: arange(interval, ..., interval + 1) over the kept tokens
        interval = (state.num_tokens - 12) // 13
        assert state.protected[0].tolist() == list(range(interval, 13 * (interval + 1), interval + 1))[:12]


def test_speed_plan_compares_the_three_backbones_in_one_process():
    """The speed plan's rows run other backbones than the plan's (per-row ``model``), each row on its own
    dense weights; speed-ups are against the plan's dense Vim."""
    from pathlib import Path

    from mambatrim.engine.compare import compare, load_plan

    plan = load_plan(Path(__file__).parents[1] / "benchmarks" / "compare" / "mambareg_videomamba.yaml")
    assert plan["model"] == "vim_small_patch16_224"
    models = {c.name: c.model for c in plan["configs"]}
    assert models["MambaReg-S, R-MeeTo 0.31"] == "mambar_small_patch16_224"
    assert models["VideoMamba-S"] == "videomamba_small"
    configs = [c for c in plan["configs"] if c.method is None]
    result = compare("vim_tiny_patch16_224", configs, img_size=64, batch_size=1, device="cpu", rounds=1, iters=1,
                     warmup=0, model_kwargs={"depth": 1})
    tokens = {r["config"]: r["tokens_per_layer"] for r in result["rows"]}
    assert tokens == {"dense": [17], "MambaReg-S": [28], "VideoMamba-S": [17]}  # 16 patches + 12 registers
    assert [c["model"] for c in result["configs"]] == ["vim_tiny_patch16_224", "mambar_small_patch16_224",
                                                       "videomamba_small"]


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_fast_triton_path_equals_the_pytorch_path(backbone):
    """The fused Triton mixer (sum of the directions for VideoMamba, mean for MambaReg) and, with DyVM deployed,
    the per-image direction gates read from the protected tokens (12 registers: their mean xz), against the
    PyTorch path. On a CPU the kernels run in the Triton interpreter (tiny shapes)."""
    from mambatrim.ops import use_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name, cfg = BACKBONES[backbone]
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(cfg, img_size=32, depth=2)).eval().to(device)  # 16 patches
    x = images(3)[:, :, :32, :32].to(device)
    with torch.no_grad():
        with use_backend("torch"):
            dense = model(x)
        with use_backend("triton"):
            fused = model(x)
        torch.testing.assert_close(fused, dense, rtol=1e-4, atol=1e-4)
        dyvm.deploy(dyvm.apply(model, keep=0.7, block_ratio=0.8, layers=[1]).eval())
        for selector in model.reducer.selectors:
            selector.weight.normal_(0, 1.0)
            selector.bias.zero_()
        with use_backend("torch"):
            reference = model(x)
            want = [layer.mixer.last_stats["gate"] for layer in model.layers]
        with use_backend("triton"):
            fused = model(x)
        for layer, gate in zip(model.layers, want):
            assert torch.equal(layer.mixer.last_stats["gate"], gate)
    assert any((g != g[:1]).any() or (g == 0).any() for g in want), "the selectors must switch directions off"
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
