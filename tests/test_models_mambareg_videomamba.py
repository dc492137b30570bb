"""MambaReg and VideoMamba (image) backbones against their official code's structure and forward rules.

The reference forward below is written from the rules of the two papers' official code (plain loops, no module
of the library is called): patch conv, token layout, add -> RMSNorm -> bidirectional mixer with the backward
branch on the flipped sequence, the final norm and each family's head.
"""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from mambatrim.models import CheckpointMismatchError, list_models, load_checkpoint
from mambatrim.reduce import Reducer
from conftest import FIXTURES

FAMILY_FIXTURES = {"MambaReg": "mambareg_keys.json", "VideoMamba": "videomamba_keys.json"}
SMALL = dict(depth=2, embed_dim=24, num_classes=5, img_size=32, patch_size=8, stride=8,
             drop_path_rate=0.0)
REG_SMALL = dict(SMALL, num_cls_tokens=3, cls_reduce=3)  # 16 patches, L = 4: registers at 4, 9, 14


def official(family: str) -> dict:
    return json.loads((FIXTURES / FAMILY_FIXTURES[family]).read_text())


@pytest.mark.parametrize("family,name", [(f, n) for f in FAMILY_FIXTURES for n in list_models(f)])
def test_state_dict_matches_official_keys_and_shapes(family, name):
    ref = official(family)
    with torch.device("meta"):
        model = timm.create_model(name)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert dict(got) == {k: tuple(v) for k, v in ref["configs"][name]}
    assert sum(p.numel() for p in model.parameters()) == ref["params"][name]


def test_published_parameter_counts():
    counts = {"mambar_tiny_patch16_224": 9_264_232, "mambar_small_patch16_224": 27_801_064,
              "mambar_base_patch16_224": 99_301_096, "mambar_large_patch16_224": 341_222_376,
              "videomamba_tiny": 7_148_008}
    for name, count in counts.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in timm.create_model(name).parameters()) == count, name


def test_register_layout_at_224():
    from mambatrim.models.mambareg import register_layout

    order, registers = register_layout(196, 12)
    assert list(registers) == [15 + 16 * g for g in range(12)] and registers[-1] == 191
    assert len(order) == 208
    assert [order[r] for r in registers] == [196 + g for g in range(12)]
    patches = [i for i in order if i < 196]
    assert patches == list(range(196))  # patches keep raster order; the 16 leftovers come last
    assert order[192:] == tuple(range(180, 196))


def test_constructor_overrides_pass_through():
    model = timm.create_model("mambar_tiny_patch16_224", depth=2, num_classes=10, cls_reduce=2)
    assert len(model.layers) == 2 and model.neck.weight.shape == (96, 192)
    assert model.norm_neck.weight.shape == (1152,) and model.head.weight.shape == (10, 1152)
    model = timm.create_model("mambar_small_patch16_224", num_cls_tokens=4, cls_reduce=1, depth=1, img_size=64)
    assert model.cls_token.shape == (1, 4, 384) and model.pos_embed.shape == (1, 16, 384)
    assert not hasattr(model, "neck") and model.head.weight.shape == (1000, 4 * 384)
    model = timm.create_model("videomamba_tiny", depth=2, num_classes=10, embed_dim=96)
    assert len(model.layers) == 2 and model.head.weight.shape == (10, 96) and model.pos_embed.shape == (1, 197, 96)


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="cls_reduce=5 must be a positive divisor"):
        timm.create_model("mambar_tiny_patch16_224", depth=1, cls_reduce=5)
    with pytest.raises(ValueError, match="num_cls_tokens must be at least 1"):
        timm.create_model("mambar_tiny_patch16_224", depth=1, num_cls_tokens=0)
    with pytest.raises(ValueError, match="bimamba=False is not supported"):
        timm.create_model("videomamba_tiny", depth=1, bimamba=False)
    with pytest.raises(ValueError, match="choose one of student, teacher"):
        timm.create_model("videomamba_base_distill", depth=1, model_type="pupil")


# ---------------------------------------------------------------------------------- the independent reference
def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def scan_loop(u, delta, A, B, C, D, z):
    """Selective scan one step at a time: u, delta, z (b, E, L); A (E, N); B, C (b, N, L)."""
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[..., t]
        state = torch.exp(dt[..., None] * A) * state + (dt * u[..., t])[..., None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(-1) + D * u[..., t])
    return torch.stack(ys, -1) * F.silu(z)


def mixer_ref(p: dict, pre: str, h: torch.Tensor, divide: bool) -> torch.Tensor:
    """Official bidirectional mixer: backward branch on the flipped x and z with the *_b weights, flipped back;
    ``(y_f + y_b) / 2`` (MambaReg) or ``y_f + y_b`` (VideoMamba) into out_proj."""
    length = h.shape[1]
    xz = (h @ p[pre + "in_proj.weight"].T).transpose(1, 2)
    rank = p[pre + "dt_proj.weight"].shape[1]
    n = p[pre + "A_log"].shape[1]

    def branch(xz_: torch.Tensor, s: str) -> torch.Tensor:
        x, z = xz_.chunk(2, 1)
        w = p[f"{pre}conv1d{s}.weight"]
        u = F.silu(F.conv1d(x, w, p[f"{pre}conv1d{s}.bias"], padding=w.shape[-1] - 1, groups=x.shape[1])[..., :length])
        dt, B, C = (u.transpose(1, 2) @ p[f"{pre}x_proj{s}.weight"].T).split([rank, n, n], -1)
        delta = F.softplus(dt @ p[f"{pre}dt_proj{s}.weight"].T + p[f"{pre}dt_proj{s}.bias"]).transpose(1, 2)
        A = -torch.exp(p[f"{pre}A{s}_log"])
        return scan_loop(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), p[f"{pre}D{s}"], z)

    y = branch(xz, "") + branch(xz.flip(-1), "_b").flip(-1)
    return (y / 2 if divide else y).transpose(1, 2) @ p[pre + "out_proj.weight"].T


def blocks_ref(p: dict, seq: torch.Tensor, depth: int, divide: bool) -> torch.Tensor:
    """add -> RMSNorm -> mixer per block, fp64 residual stream; returns norm_f(residual + last output)."""
    hidden, residual = seq, None
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        hidden = mixer_ref(p, f"layers.{i}.mixer.", rms(residual, p[f"layers.{i}.norm.weight"]), divide)
    return rms(residual + hidden, p["norm_f.weight"])


def patches_ref(p: dict, img: torch.Tensor, patch: int) -> torch.Tensor:
    w = p["patch_embed.proj.weight"]
    return F.conv2d(img, w, p["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)


def mambareg_ref(p: dict, img: torch.Tensor, cfg: dict) -> torch.Tensor:
    n, patch = cfg["num_cls_tokens"], cfg["patch_size"]
    tokens = patches_ref(p, img, patch) + p["pos_embed"]
    regs = p["cls_token"] + p["pos_embed_cls"]
    m = tokens.shape[1]
    group = m // (n + 1)
    parts = []
    for g in range(n):
        parts += [tokens[:, g * group:(g + 1) * group], regs[:, g:g + 1].expand(img.shape[0], -1, -1)]
    seq = torch.cat(parts + [tokens[:, n * group:]], 1)
    out = blocks_ref(p, seq, cfg["depth"], divide=True)
    feats = out[:, [group + g * (group + 1) for g in range(n)]]
    if cfg["cls_reduce"] > 1:
        feats = rms((feats @ p["neck.weight"].T).flatten(1), p["norm_neck.weight"])
    return feats.flatten(1) @ p["head.weight"].T + p["head.bias"]


def videomamba_ref(p: dict, img: torch.Tensor, cfg: dict) -> torch.Tensor:
    tokens = patches_ref(p, img, cfg["patch_size"])
    seq = torch.cat([p["cls_token"].expand(img.shape[0], -1, -1), tokens], 1) + p["pos_embed"]
    out = blocks_ref(p, seq, cfg["depth"], divide=False)
    return out[:, 0] @ p["head.weight"].T + p["head.bias"]


def randomised(name: str, cfg: dict, seed: int = 0) -> torch.nn.Module:
    """A model whose every parameter is perturbed (directions, biases and tokens all distinct and non-zero)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **cfg).eval()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            value.add_(torch.randn_like(value) * (0.3 if "A_" in key or key.endswith("D") else 0.1))
    return model


CASES = [("mambar_tiny_patch16_224", REG_SMALL, mambareg_ref),
         ("mambar_tiny_patch16_224", dict(REG_SMALL, cls_reduce=1), mambareg_ref),
         ("videomamba_tiny", SMALL, videomamba_ref),
         ("videomamba_middle_distill", SMALL, videomamba_ref)]


@pytest.mark.parametrize("name,cfg,ref", CASES)
def test_logits_match_the_independent_official_forward(name, cfg, ref):
    model = randomised(name, cfg)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(img)
        params = {k: v.double() for k, v in model.state_dict().items()}
        expected = ref(params, img.double(), cfg)
    assert ours.shape == (2, cfg["num_classes"])
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,cfg", [("mambar_small_patch16_224", REG_SMALL), ("videomamba_tiny", SMALL)])
def test_noop_reducer_gives_identical_logits(name, cfg):
    model = randomised(name, cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        assert torch.equal(dense, model.set_reducer(Reducer())(x))


def resample_grid(pe: torch.Tensor, old: int, new: int) -> torch.Tensor:
    dim = pe.shape[-1]
    grid = pe.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(
        1, new * new, dim)


@pytest.mark.parametrize("name,cfg", [("mambar_small_patch16_224", REG_SMALL), ("videomamba_tiny", SMALL),
                                      ("videomamba_base_distill", SMALL)])
def test_official_state_dict_loads_strictly_and_resizes_position_embeddings(name, cfg):
    source = randomised(name, cfg, seed=1)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    target = timm.create_model(name, **cfg)
    report = load_checkpoint(target, {"model": sd})
    assert report.entry == "model" and not report.resized
    assert all(torch.equal(v, sd[k]) for k, v in target.state_dict().items())

    bigger = timm.create_model(name, **dict(cfg, img_size=48))  # 4x4 -> 6x6 patch grid
    report = load_checkpoint(bigger, {"model": {k: v.clone() for k, v in sd.items()}})
    assert len(report.resized) == 1
    got = bigger.pos_embed.detach()
    if name.startswith("mambar"):  # patches only; the registers' own embedding is not on the grid
        torch.testing.assert_close(got, resample_grid(sd["pos_embed"], 4, 6))
        assert torch.equal(bigger.pos_embed_cls, sd["pos_embed_cls"])
    else:  # the leading class slot is kept as it is
        assert torch.equal(got[:, :1], sd["pos_embed"][:, :1])
        torch.testing.assert_close(got[:, 1:], resample_grid(sd["pos_embed"][:, 1:], 4, 6))
    with torch.no_grad():
        assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 5)

    sd.pop("head.bias")
    with pytest.raises(CheckpointMismatchError, match="head.bias"):
        load_checkpoint(target, sd)


def test_other_input_sizes_run_and_keep_the_register_rule():
    model = randomised("mambar_tiny_patch16_224", REG_SMALL)
    state = model.embed(torch.randn(1, 3, 48, 40))  # 6x5 = 30 patches, 3 registers: L = 7
    assert state.num_tokens == 33
    regs = (model.cls_token + model.pos_embed_cls)[0]
    for g, row in enumerate([7, 15, 23]):
        assert torch.equal(state.hidden[0, row], regs[g])


def test_videomamba_official_initialisation():
    """Every Linear bias zero (dt_proj.bias too: the official init overwrites Mamba's dt init), the class token
    zero, the position embedding not."""
    model = timm.create_model("videomamba_small", depth=2)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None or not module.bias.any(), name
    assert not model.cls_token.any() and model.pos_embed.std() > 0.01
    dt = model.layers[0].mixer.dt_proj.weight
    assert dt.std().item() == pytest.approx(0.02, rel=0.1)  # truncated normal, not Mamba's uniform
    vim = timm.create_model("vim_small_patch16_224", depth=2)
    assert vim.layers[0].mixer.dt_proj.bias.any()  # Vim (and MambaReg) keep Mamba's dt bias


def test_videomamba_distill_forward():
    model = randomised("videomamba_middle_distill", SMALL)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model.forward_distill(x)
        assert torch.equal(logits, model(x))
    assert feats.shape == (2, 17, 384)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2, 17))
    assert not hasattr(timm.create_model("videomamba_middle", **SMALL), "distill_head")


def test_forward_features_follow_the_official_heads():
    model = randomised("mambar_tiny_patch16_224", REG_SMALL)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 3 * 24 // 3)
        assert torch.equal(model.forward_head(feats), model(x))
    assert math.isclose(float(model.norm_neck.weight.numel()), 24.0)


# ----------------------------------------------------------------------------------------------------- FLOPs
def vim_mixer_macs(tokens: int, d: int) -> tuple[float, float]:
    """(in_proj + out_proj, one direction's conv + x_proj + dt_proj + scan) MACs of a Vim-family mixer."""
    e, n, r, k = 2 * d, 16, math.ceil(d / 16), 4
    return (3 * tokens * d * e,
            (tokens + k - 1) * e * k + tokens * e * (r + 2 * n) + tokens * r * e + 9 * tokens * e * n + 2 * tokens * e)


@pytest.mark.parametrize("name,d,depth,tokens,head", [
    ("mambar_tiny_patch16_224", 192, 24, 208, 12 * 192 * 1000),
    ("mambar_small_patch16_224", 384, 24, 208, 12 * 384 * 192 + 2304 * 1000),
    ("mambar_large_patch16_224", 1024, 48, 212, 16 * 1024 * 128 + 2048 * 1000),
    ("videomamba_small", 384, 24, 197, 384 * 1000)])
def test_flops_count_the_real_sequence_and_head(name, d, depth, tokens, head):
    """Every layer sees the real sequence (registers included), the neck and the wide head are counted;
    'full' = both directions, 'paper' = one direction (MambaReg, Vim's convention) or none (VideoMamba, whose
    published fvcore counts skip the fused scan op)."""
    from mambatrim.analysis import count_flops

    with torch.device("meta"):
        report = count_flops(timm.create_model(name))
    assert report.tokens_per_layer == [tokens] * depth
    shared, per_dir = vim_mixer_macs(tokens, d)
    outside = 196 * d * 3 * 16 * 16 + head
    assert report.full == pytest.approx(outside + depth * (shared + 2 * per_dir))
    paper_dirs = 0 if name.startswith("videomamba") else 1
    assert report.paper == pytest.approx(outside + depth * (shared + paper_dirs * per_dir))


@pytest.mark.parametrize("name,published", [("videomamba_tiny", 1.1), ("videomamba_small", 4.3),
                                            ("videomamba_middle", 12.7), ("videomamba_base", 16.9)])
def test_videomamba_paper_flops_match_the_published_figures(name, published):
    """Published rounded to 0.1 G, by fvcore, which also counts the norms (LayerNorm) we leave out (< 0.02 G)."""
    from mambatrim.analysis import count_flops

    with torch.device("meta"):
        assert count_flops(timm.create_model(name)).gflops("paper") == pytest.approx(published, abs=0.065)
