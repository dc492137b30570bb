"""GroupMamba: official keys and parameter counts, an independent reference of the official forward (logits and
stage-1 output on a non-square input), per-group scan orders, overrides, input sizes, checkpoint loading."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import mambatrim  # noqa: F401  (registers the configs with timm)
from mambatrim.contract import raster_orders
from mambatrim.models import load_checkpoint
from mambatrim.ops.scan_ref import selective_scan_ref

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from groupmamba_keys import CONFIGS, PARAMS, PARAMS_WITHOUT_DIST_HEAD, official_keys  # noqa: E402

SMALL = dict(stem_hidden_dim=8, embed_dims=[16, 32, 48, 64], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1],
             num_classes=5)


def small_model(**overrides) -> torch.nn.Module:
    return timm.create_model("groupmamba_tiny", **{**SMALL, **overrides})


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and BN statistic random (A_logs, skip_scale, dt biases included), so no term hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=gen, dtype=t.dtype)
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else 0.3 * r)


# ------------------------------------------------------------------------------------- keys and parameters
@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_matches_official_keys_and_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == official_keys(**CONFIGS[name])
    params = sum(p.numel() for p in model.parameters())
    assert params == PARAMS[name]
    if name in PARAMS_WITHOUT_DIST_HEAD:
        assert params - sum(p.numel() for p in model.dist_head.parameters()) == PARAMS_WITHOUT_DIST_HEAD[name]


def test_overrides_build_the_official_class_and_any_input_size():
    model = timm.create_model("groupmamba_tiny", stem_hidden_dim=16, embed_dims=[32, 64, 92, 112],
                              mlp_ratios=[8, 8, 4, 4], depths=[1, 1, 1, 1], num_classes=10).eval()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == official_keys(
        16, [32, 64, 92, 112], [1, 1, 1, 1], [8, 8, 4, 4], num_classes=10)
    with torch.no_grad():
        for size in [(96, 96), (80, 112)]:
            assert model(torch.randn(2, 3, *size)).shape == (2, 10)


def test_bad_dims_and_unknown_arguments_are_refused():
    with pytest.raises(ValueError, match="multiples of 4"):
        small_model(embed_dims=[16, 32, 50, 64])
    with pytest.raises(ValueError, match="one entry per stage"):
        small_model(depths=[1, 1, 1])
    with pytest.raises(TypeError, match="unknown arguments"):
        small_model(embed_dim=16)


def test_train_returns_both_heads_eval_their_mean():
    model = small_model()
    randomise(model)
    x = torch.randn(2, 3, 32, 48)
    model.train()
    with torch.no_grad():
        out, dist = model(x)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model(x), (model.head(feats) + model.dist_head(feats)) / 2)
    assert not torch.allclose(out, dist)
    no_dist = small_model(distillation=False).eval()
    assert "dist_head.weight" not in no_dist.state_dict()


# ------------------------------------------------------------------------------------- reference forward
def _ln(x, sd, p, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"))


def _ref_ss2d(x, sd, p, direction):
    """One VSSS scan on (B, H, W, E), direction 0 rows, 1 columns, 2 reversed rows, 3 reversed columns."""
    bsz, h, w, e = x.shape
    xi, z = _lin(x, sd, f"{p}.in_proj").chunk(2, -1)
    u = F.silu(F.conv2d(xi.permute(0, 3, 1, 2), sd[f"{p}.conv2d.weight"], sd[f"{p}.conv2d.bias"], padding=1,
                        groups=e))
    seq = u.transpose(2, 3).flatten(2) if direction % 2 else u.flatten(2)
    if direction >= 2:
        seq = seq.flip(-1)
    rank = sd[f"{p}.dt_projs_weight"].shape[-1]
    x_dbl = torch.einsum("bel,ce->bcl", seq, sd[f"{p}.x_proj_weight"][0])
    dt, b, c = x_dbl.split([rank, 1, 1], dim=1)
    delta = torch.einsum("brl,er->bel", dt, sd[f"{p}.dt_projs_weight"][0])
    y = selective_scan_ref(seq, delta, -torch.exp(sd[f"{p}.A_logs"]), b, c, sd[f"{p}.Ds"],
                           delta_bias=sd[f"{p}.dt_projs_bias"][0], delta_softplus=True)
    if direction >= 2:
        y = y.flip(-1)
    y = y.view(bsz, e, w, h).transpose(2, 3) if direction % 2 else y.view(bsz, e, h, w)
    y = _ln(y.permute(0, 2, 3, 1), sd, f"{p}.out_norm", 1e-5) * F.silu(z)
    return _lin(y, sd, f"{p}.out_proj")


def _ref_gml(x, sd, p, grid, directions=(0, 1, 2, 3)):
    bsz, length, chans = x.shape
    xn = _ln(x, sd, f"{p}.norm", 1e-5)
    cam = torch.sigmoid(_lin(F.relu(_lin(xn.mean(1), sd, f"{p}.fc1")), sd, f"{p}.fc2"))
    q = chans // 4
    grid_x = xn.reshape(bsz, *grid, chans)
    outs = [_ref_ss2d(grid_x[..., g * q:(g + 1) * q], sd, f"{p}.mamba_g{g + 1}", directions[g]) for g in range(4)]
    mixed = torch.cat(outs, -1).reshape(bsz, length, chans) * sd[f"{p}.skip_scale"] * xn * cam[:, None]
    return _lin(_ln(mixed, sd, f"{p}.norm", 1e-5), sd, f"{p}.proj")


def _ref_tokens_ln(x, sd, p, eps=1e-5):
    return _ln(x.flatten(2).transpose(1, 2), sd, p, eps), (x.shape[2], x.shape[3])


def reference_forward(sd, x, depths, directions=(0, 1, 2, 3)):
    """(logits at eval, stage-1 output (B, C, H, W)) of the official forward, from the rules of the issue."""
    for i, (index, stride, pad) in enumerate([(0, 2, 3), (3, 1, 1), (6, 1, 1)]):
        x = F.conv2d(x, sd[f"patch_embed1.conv.{index}.weight"], stride=stride, padding=pad)
        bn = f"patch_embed1.conv.{index + 1}"
        x = F.relu(F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"],
                                sd[f"{bn}.bias"], eps=1e-5))
    stage1 = None
    for s in range(1, 5):
        x = F.conv2d(x, sd[f"patch_embed{s}.proj.weight"], sd[f"patch_embed{s}.proj.bias"], stride=2, padding=1)
        x, grid = _ref_tokens_ln(x, sd, f"patch_embed{s}.norm")
        for j in range(depths[s - 1]):
            p = f"block{s}.{j}"
            x = x + _ref_gml(x, sd, f"{p}.attn", grid, directions)
            hid = _lin(_ln(x, sd, f"{p}.norm2", 1e-6), sd, f"{p}.mlp.fc1")
            hid = F.conv2d(hid.transpose(1, 2).reshape(x.shape[0], -1, *grid), sd[f"{p}.mlp.dwconv.dwconv.weight"],
                           sd[f"{p}.mlp.dwconv.dwconv.bias"], padding=1, groups=hid.shape[-1])
            x = x + _lin(F.gelu(hid.flatten(2).transpose(1, 2)), sd, f"{p}.mlp.fc2")
        if s < 4:
            x = _ln(x, sd, f"norm{s}", 1e-6).transpose(1, 2).reshape(x.shape[0], -1, *grid)
            stage1 = x if s == 1 else stage1
    cls = x.mean(1, keepdim=True)
    p = "post_network.0"
    cls = cls + _ln(_ref_gml(cls, sd, f"{p}.attn", (1, 1), directions), sd, f"{p}.norm1", 1e-6)
    cls = cls + _lin(F.gelu(_lin(_ln(cls, sd, f"{p}.norm2", 1e-6), sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")
    feat = _ln(cls[:, 0], sd, "norm4", 1e-6)
    return (_lin(feat, sd, "head") + _lin(feat, sd, "dist_head")) / 2, stage1


@pytest.fixture(scope="module")
def fixed_model():
    model = small_model(depths=[2, 1, 1, 1]).double().eval()
    randomise(model, seed=1)
    return model


def test_logits_and_stage1_match_independent_reference_non_square(fixed_model):
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad(), mambatrim.ops.use_backend("torch"):
        logits = fixed_model(x)
        stage1 = fixed_model.forward_stages(x)[0]
        ref_logits, ref_stage1 = reference_forward(fixed_model.state_dict(), x, fixed_model.depths)
    assert stage1.shape == ref_stage1.shape == (2, 16, 10, 14)
    assert torch.allclose(stage1, ref_stage1, atol=1e-4, rtol=0)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert ref_logits.abs().max() > 1e-2  # the comparison is not between two near-zero tensors


def test_each_group_scans_in_its_own_order(fixed_model):
    """Swapping two groups' orders changes the output, and matches the reference with those directions
    swapped: the order data, not the group index, drives each scan."""
    x = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows, cols, rrows, rcols = raster_orders()
    layers = [m for m in fixed_model.modules() if hasattr(m, "orders")]
    with torch.no_grad():
        base = fixed_model.forward_stages(x)[0]
        for swapped, directions in [((cols, rows, rrows, rcols), (1, 0, 2, 3)),
                                    ((rows, cols, rcols, rrows), (0, 1, 3, 2))]:
            for layer in layers:
                layer.orders = swapped
            try:
                out = fixed_model.forward_stages(x)[0]
            finally:
                for layer in layers:
                    layer.orders = (rows, cols, rrows, rcols)
            assert (out - base).abs().max() > 1e-3
            _, ref = reference_forward(fixed_model.state_dict(), x, fixed_model.depths, directions)
            assert torch.allclose(out, ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- checkpoints
def test_load_checkpoint_of_official_layout(tmp_path):
    """A state_dict built from the official key/shape list (no model of ours involved) loads strictly, wrapped
    as the official training script saves it."""
    gen = torch.Generator().manual_seed(4)
    shapes = official_keys(**{k: SMALL[k] for k in ("stem_hidden_dim", "embed_dims", "depths")},
                           mlp_ratios=SMALL["mlp_ratios"], num_classes=SMALL["num_classes"])
    sd = {k: (torch.tensor(7) if not s else torch.randn(s, generator=gen)) for k, s in shapes.items()}
    path = tmp_path / "groupmamba.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    model = small_model()
    load_checkpoint(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].to(v.dtype)), k
    del sd["dist_head.bias"]
    torch.save(sd, path)
    with pytest.raises(Exception, match="dist_head.bias"):
        load_checkpoint(small_model(), path)


# ------------------------------------------------------------------------------------- FLOPs
PAPER_GFLOPS = {"groupmamba_tiny": 4.6, "groupmamba_small": 7.0, "groupmamba_base": 14.0}  # paper, Table 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gflops_against_the_paper(name):
    """Both conventions count all four group scans (each is one direction on its own channels); within 4% of the
    paper's fvcore figures (ours also counts the scan's D and gate terms and the head)."""
    from mambatrim.analysis.flops import count_flops

    with torch.device("meta"):
        model = timm.create_model(name)
    report = count_flops(model, 224)
    assert report.paper == report.full
    assert len(report.layers) == sum(CONFIGS[name]["depths"]) + 1  # every GML, the class block's included
    assert abs(report.gflops() / PAPER_GFLOPS[name] - 1) < 0.04


def test_gml_macs_by_hand():
    """One GML's count written out: CAM on one token, proj, and per group in_proj, conv, projections, scan."""
    from mambatrim.analysis.flops import count_flops

    model = small_model().eval()
    report = count_flops(model, (40, 56))
    layer = report.layers[0]  # stage 1: 10 x 14 tokens, C = 16, groups of 4 channels, R = 1, N = 1
    L, c, q = 140, 16, 4
    assert layer.tokens == L
    assert layer.shared == c * 1 + 1 * c + L * c * c
    assert layer.per_direction == L * (q * 2 * q + q * 9 + q * 3 + 1 * q + 9 * q + 2 * q + q * q)


def test_group_scan_triton_equals_the_gathered_reference():
    """The four groups in one multi-order Triton launch (interpreter on a CPU) against the per-group gather, scan,
    scatter of the 'ref' backend, dense and at merged positions, values and gradients."""
    from mambatrim.models.groupmamba import group_scan
    from mambatrim.ops import use_backend

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the kernel without a GPU
    gen = torch.Generator().manual_seed(7)
    bsz, groups, e, grid = 2, 4, 3, (3, 4)
    length = 12

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dev)

    args = [rand(bsz, groups, e, length), rand(bsz, groups, e, length), -rand(groups, e, 1).abs() - 0.2,
            rand(bsz, groups, 1, length), rand(bsz, groups, 1, length), rand(groups, e), rand(groups, e)]
    positions = torch.stack([torch.randperm(length, generator=gen)[:8].sort().values for _ in range(bsz)]).to(dev)
    for pos in (None, positions):
        inputs = [a.clone().requires_grad_(True) for a in args]
        if pos is not None:
            inputs[0], inputs[1], inputs[3], inputs[4] = (t.detach()[..., :8].requires_grad_(True)
                                                          for t in (inputs[0], inputs[1], inputs[3], inputs[4]))
        outs = []
        for backend in ("ref", "triton"):
            for t in inputs:
                t.grad = None
            with use_backend(backend):
                y = group_scan(*inputs, raster_orders(), grid, pos)
            y.pow(2).sum().backward()
            outs.append([y.detach()] + [t.grad.clone() for t in inputs])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
