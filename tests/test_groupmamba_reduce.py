"""Group selection on GroupMamba: gated-off groups pass the normalised input through, skipping equals masking,
the FLOPs counter sees the skipped scans, DyVM's block-ratio loss trains the selectors, bad input is refused."""
from __future__ import annotations

import pytest
import torch

import mambatrim  # noqa: F401
from mambatrim.analysis.flops import count_flops
from mambatrim.contract import MixerContext
from mambatrim.models import create_model
from mambatrim.reduce.groupmamba import apply_group_select

GM = dict(stem_hidden_dim=8, embed_dims=[16, 32, 48, 64], mlp_ratios=[2, 2, 2, 2], depths=[2, 1, 1, 1],
          num_classes=5)


def model(**over) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("groupmamba_tiny", **{**GM, **over}).eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def test_gated_off_group_passes_the_normalised_input_through():
    layer = model().block1[0].attn
    x = torch.randn(3, 8 * 12, 16)
    gate = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        masked = layer(x, MixerContext(direction_gate=gate), (8, 12))
        skipped = layer(x, MixerContext(direction_gate=gate, skip_gated=True), (8, 12))
        dense = layer(x, None, (8, 12))
        # written out: group quarters from the scan where on, the normalised input where off
        xn = layer.norm(x)
        quarters = xn.chunk(4, -1)
        ys = layer.scan(quarters, range(4), (8, 12))
        parts = [torch.where(gate[:, g, None, None] > 0, ys[g] * layer.skip_scale * quarters[g], quarters[g])
                 for g in range(4)]
        cam = torch.sigmoid(layer.fc2(torch.relu(layer.fc1(xn.mean(1)))))
        expected = layer.proj(layer.norm(torch.cat(parts, -1) * cam[:, None]))
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(skipped, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked[2], dense[2], rtol=1e-5, atol=1e-5)
    assert (masked[1] - dense[1]).abs().max() > 1e-3


def test_initial_selectors_run_every_group_and_equal_the_dense_model():
    dense = model()
    with torch.no_grad():
        want = dense(images())
        got = apply_group_select(dense, keep=0.7)(images())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_flops_count_the_skipped_group_scans():
    reduced = apply_group_select(model(), keep=0.75, layers=[0, 2])
    with torch.no_grad():
        reduced.reducer.selectors["0"].bias[1] = -5.0  # group 2 (column-major) off for every image in block 0
        reduced.reducer.selectors["2"].bias[:2] = -5.0  # groups 1, 2 off in block 2
    dense_report = count_flops(model(), images=images())
    report = count_flops(reduced, images=images())
    assert [layer.directions for layer in report.layers[:3]] == [(1.0, 0.0, 1.0, 1.0), (1.0,) * 4,
                                                                (0.0, 0.0, 1.0, 1.0)]
    saved = report.layers[0].per_direction + 2 * report.layers[2].per_direction
    overhead = 16 * 4 + 32 * 4  # the two selectors
    assert report.full == pytest.approx(dense_report.full - saved + overhead, rel=1e-9)
    assert report.paper == report.full


def test_training_samples_gates_and_adds_the_block_ratio_loss():
    reduced = apply_group_select(model(), keep=0.5, block_loss_weight=10.0).train()
    state = reduced.forward_tokens(images())
    gates = state.extras["group_gates"]
    assert len(gates) == 5 and all(g.shape == (3, 4) for g in gates)  # every stage block, one forward pass
    losses = reduced.reducer.extra_losses(state)
    mean = torch.stack([g.mean() for g in gates]).mean()
    torch.testing.assert_close(losses["group_ratio"], 10.0 * (mean - 0.5) ** 2)
    (losses["group_ratio"] + reduced.forward_head(reduced.pool(state))[0].sum()).backward()
    assert reduced.reducer.selectors["0"].bias.grad is not None


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="group_select applies to GroupMamba models, got VisionMamba"):
        apply_group_select(create_model("vim_tiny_patch16_224", depth=2, embed_dim=32, img_size=32))
    with pytest.raises(ValueError, match=r"layers \[7\] out of range; the model has blocks 0..4"):
        apply_group_select(model(), layers=[7])
    with pytest.raises(ValueError, match=r"keep \(block_ratio\) must be a number in \[0, 1\]"):
        apply_group_select(model(), keep=1.5)
    with pytest.raises(ValueError, match="group_select: unknown option 'kep'.*valid options: keep"):
        apply_group_select(model(), kep=0.5)


def test_static_start_switches_off_the_planned_share():
    reduced = apply_group_select(model(), keep=0.75, start="static")
    report = count_flops(reduced, images=images())
    ran = [layer.directions for layer in report.layers[:5]]
    # one group off per block, block b its group b mod 4
    assert ran == [tuple(0.0 if g == b % 4 else 1.0 for g in range(4)) for b in range(5)]
    with pytest.raises(ValueError, match="start must be one of all, static"):
        apply_group_select(model(), start="random")


# ------------------------------------------------------------------------------------- token merging
def test_layers_read_any_token_order_through_positions_and_sources():
    """The same tokens in a shuffled order (positions = where each sits on the grid, sources = which token each
    grid cell is) give the dense outputs in that order: the scans visit by position, the convs read the grid."""
    from mambatrim.contract import MixerContext as Ctx

    block = model().block1[0]
    x = torch.randn(2, 8 * 12, 16)
    perm = torch.stack([torch.randperm(96, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    shuffled = x.gather(1, perm[..., None].expand(-1, -1, 16))
    ctx = Ctx(positions=perm, sources=perm.argsort(1), grid=(8, 12))
    with torch.no_grad():
        dense = block(x, (8, 12))
        out = block(shuffled, (8, 12), ctx)
    torch.testing.assert_close(out, dense.gather(1, perm[..., None].expand(-1, -1, 16)), rtol=1e-5, atol=1e-5)


def test_bipartite_merge_conserves_sizes_and_sums():
    from mambatrim.contract import TokenState
    from mambatrim.reduce.groupmamba import bipartite_merge

    x = torch.randn(2, 20, 8)
    pos = torch.arange(20).expand(2, -1)
    state = TokenState(hidden=x, residual=None, positions=pos, protected=torch.zeros(2, 0, dtype=torch.long),
                       grid=(4, 5), protected_layout="none")
    merged, sources = bipartite_merge(state, 6, pos.clone())
    merged2, sources2 = bipartite_merge(merged, 4, sources)
    for m, src in [(merged, sources), (merged2, sources2)]:
        assert m.sizes.sum(1).tolist() == [20.0, 20.0]
        torch.testing.assert_close((m.hidden * m.sizes[..., None]).sum(1), x.sum(1), rtol=1e-5, atol=1e-5)
        counts = torch.zeros_like(m.sizes).scatter_add(1, src, torch.ones_like(src, dtype=m.sizes.dtype))
        torch.testing.assert_close(counts, m.sizes)  # each token stands for exactly the cells mapped to it
        assert (m.positions.gather(1, src.gather(1, m.positions)) == m.positions).all()  # a token sits on its own cell
    assert merged.num_tokens == 14 and merged2.num_tokens == 10


def test_stage_merge_runs_in_one_stage_and_unmerges_before_downsampling():
    from mambatrim.reduce import apply_method

    dense = model()
    reduced = apply_method(model(), "stage_merge", keep=0.6, layers=[0, 1])
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        stages = reduced.forward_stages(x)
        logits = reduced(x)
        dense_stages = dense.forward_stages(x)
    assert [s.shape for s in stages] == [s.shape for s in dense_stages]  # full grids after the unmerge
    assert torch.isfinite(logits).all() and not torch.allclose(stages[0], dense_stages[0])
    report = count_flops(reduced, images=x)
    assert report.tokens_per_layer == [256, 192, 80, 20, 6, 1]  # 16x20 = 320: 64 merged at each of blocks 0, 1
    assert report.reducer == 160 * 160 * 16 + 128 * 128 * 16  # |A| * |B| * C of each merge


def test_stage_merge_refuses_bad_layers_and_too_much_merging():
    from mambatrim.reduce import apply_method

    with pytest.raises(ValueError, match=r"must be blocks of one stage; the stages hold blocks 0..1, 2..2"):
        apply_method(model(), "stage_merge", layers=[1, 2])
    with pytest.raises(ValueError, match="stage_merge applies to GroupMamba models"):
        apply_method(create_model("vim_tiny_patch16_224", depth=2, embed_dim=32, img_size=32), "stage_merge")
    reduced = apply_method(model(), "stage_merge", keep=0.3, layers=[0])
    with pytest.raises(ValueError, match="one merge can at most halve the tokens"):
        reduced(torch.randn(1, 3, 64, 80))
