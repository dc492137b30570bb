"""R-MeeTo merging: against a per-sample loop reference, invariants (order, class token, conservation), the
ratio <-> r mapping, identity at r = 0, batch independence and gradients, on tiny models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.models.registry import create_model
from mambatrim.reduce import METHODS, Reducer, TokenState, apply_method
from mambatrim.reduce import rmeeto
from mambatrim.reduce.rmeeto import RMeeToReducer, merge_tokens, r_for_ratio, ratio_for_r


def tiny_model(depth: int = 4, img_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vim_tiny_patch16_224", depth=depth, embed_dim=64, img_size=img_size, num_classes=10)


def random_state(bsz: int, length: int, dim: int, cls: list[int], dtype=torch.float64) -> TokenState:
    g = torch.Generator().manual_seed(length * 31 + dim)
    return TokenState(
        hidden=torch.randn(bsz, length, dim, generator=g, dtype=dtype),
        residual=torch.randn(bsz, length, dim, generator=g, dtype=dtype),
        positions=torch.arange(length).repeat(bsz, 1),
        protected=torch.tensor(cls)[:, None],
        sizes=torch.randint(1, 4, (bsz, length), generator=g).to(dtype),
    )


def reference_merge(x, res, size, p, r):
    """Per-sample loop version of the paper's merge (one sample; x, res (L, C), size (L,), class token at p)."""
    L = x.shape[0]
    r = min(r, (L - 1) // 2)
    others = [i for i in range(L) if i != p]
    a_idx, b_idx = others[0::2], others[1::2]
    m = F.normalize(x, dim=-1)
    scores = m[a_idx] @ m[b_idx].T
    best, partner = scores.max(-1)
    order = sorted(range(len(a_idx)), key=lambda j: -float(best[j]))
    merged = set(order[:r])
    groups = {b: [b] for b in b_idx}  # B token -> members, in sequence index
    for j, a in enumerate(a_idx):
        if j in merged:
            groups[b_idx[int(partner[j])]].append(a)
        else:
            groups[a] = [a]
    anchors = sorted(groups)  # raster order of kept tokens
    def avg(t, members):
        w = size[members]
        return (t[members] * w[:, None]).sum(0) / w.sum()
    xs = [avg(x, groups[g]) for g in anchors]
    rs = [avg(res, groups[g]) for g in anchors]
    ss = [size[groups[g]].sum() for g in anchors]
    q = p * (L - r) // L
    xs.insert(q, x[p]), rs.insert(q, res[p]), ss.insert(q, size[p]), anchors.insert(q, p)
    return torch.stack(xs), torch.stack(rs), torch.stack(ss), torch.tensor(anchors), q


class Recorder(RMeeToReducer):
    """Keeps every state right after a merge event."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after: list[tuple[TokenState, TokenState]] = []

    def before_layer(self, layer_idx: int, state: TokenState) -> TokenState:
        out = super().before_layer(layer_idx, state)
        if layer_idx in self.layers:
            self.after.append((state, out))
        return out


# ---------------------------------------------------------------------------------------------- mapping
def test_ratio_r_mapping_matches_the_paper():
    assert [round(ratio_for_r(r), 2) for r in (5, 10, 11, 15, 20)] == [0.14, 0.28, 0.31, 0.42, 0.54]
    assert [r_for_ratio(x) for x in (0.14, 0.28, 0.31, 0.42, 0.54)] == [5, 10, 11, 15, 20]
    # uncapped closed form: 2 blocks per event, 11 events -> 132 r token-blocks of 24 * 197
    for r in range(12):
        assert ratio_for_r(r) == pytest.approx(132 * r / 4728)
    assert rmeeto.tokens_per_layer(197, 24, 11, rmeeto.merge_layers(24))[-1] == 76
    assert ratio_for_r(0) == 0.0 and r_for_ratio(0.0) == 0
    with pytest.raises(ValueError, match="out of range"):
        r_for_ratio(0.99)


def test_apply_validates_and_registers():
    assert "rmeeto" in METHODS and not METHODS["rmeeto"].learned  # training-free usable
    model = create_model("vim_small_patch16_224", depth=24, embed_dim=32, num_classes=0)
    apply_method(model, "rmeeto", ratio=0.31)
    assert model.reducer.r == 11 and model.reducer.layers == tuple(range(2, 24, 2))
    assert rmeeto.apply(model, r=5, cls_position="middle").reducer.r == 5
    assert rmeeto.apply(model).reducer.r == 11  # default: the paper's ratio 0.31
    with pytest.raises(ValueError, match="only one"):
        rmeeto.apply(model, ratio=0.3, r=3)
    with pytest.raises(ValueError, match="cls_position"):
        rmeeto.apply(model, r=3, cls_position="left")
    with pytest.raises(ValueError, match="outside"):
        rmeeto.apply(model, r=3, layers=[2, 30])
    with pytest.raises(TypeError, match="VisionMamba"):
        rmeeto.apply(torch.nn.Linear(2, 2), r=3)


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("length,r", [(17, 3), (16, 7), (12, 40)])
def test_merge_matches_per_sample_reference(length, r):
    state = random_state(3, length, 8, cls=[length // 2, 0, length - 1])
    out = merge_tokens(state, r)
    for b in range(3):
        x, res, size, anchors, q = reference_merge(state.hidden[b], state.residual[b], state.sizes[b],
                                                   int(state.protected[b, 0]), r)
        assert int(out.protected[b, 0]) == q
        torch.testing.assert_close(out.hidden[b], x)
        torch.testing.assert_close(out.residual[b], res)
        torch.testing.assert_close(out.sizes[b], size)
        assert torch.equal(out.positions[b], anchors)


def test_merge_conserves_size_weighted_sums_and_class_token():
    state = random_state(4, 33, 8, cls=[16, 16, 3, 30])
    for _ in range(4):
        out = merge_tokens(state, 5)
        assert out.num_tokens == state.num_tokens - 5
        for field in ("hidden", "residual"):
            before = (getattr(state, field) * state.sizes[..., None]).sum(1)
            after = (getattr(out, field) * out.sizes[..., None]).sum(1)
            torch.testing.assert_close(after, before)
        torch.testing.assert_close(out.sizes.sum(1), state.sizes.sum(1))
        rows = torch.arange(4)
        for field in ("hidden", "residual", "sizes", "positions"):  # class token copied exactly, never merged
            assert torch.equal(getattr(out, field)[rows, out.protected[:, 0]],
                               getattr(state, field)[rows, state.protected[:, 0]])
        state = out


def test_boundary_and_middle_class_positions():
    state = random_state(3, 41, 8, cls=[20, 20, 20])
    for _ in range(5):
        state = merge_tokens(state, 4, cls_position="boundary")
        assert (state.positions.diff(dim=1) > 0).all()  # sorted including the class token
        assert (state.positions.gather(1, state.protected[:, 0][:, None]) == 20).all()
    mid = merge_tokens(random_state(2, 41, 8, cls=[20, 20]), 6, cls_position="middle")
    assert mid.protected[:, 0].tolist() == [17, 17]  # (35 - 1) // 2


def test_model_merges_keep_order_and_class_token():
    model = tiny_model(depth=6).eval()
    rec = Recorder(r=3, layers=(2, 4))
    model.set_reducer(rec)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        final = model.forward_tokens(x)
    assert len(rec.after) == 2 and final.num_tokens == 17 - 6
    rows = torch.arange(3)
    for before, after in rec.after:
        assert after.num_tokens == before.num_tokens - 3
        not_cls = torch.arange(after.num_tokens)[None] != after.protected[:, 0][:, None]
        pos = after.positions[not_cls].view(3, -1)
        assert (pos.diff(dim=1) > 0).all()  # merged sequence stays in raster order
        assert (after.positions[rows, after.protected[:, 0]] == 8).all()
        assert torch.equal(after.hidden[rows, after.protected[:, 0]], before.hidden[rows, before.protected[:, 0]])
        assert torch.equal(after.residual[rows, after.protected[:, 0]], before.residual[rows, before.protected[:, 0]])
        assert (after.sizes[rows, after.protected[:, 0]] == 1).all()
        assert after.sizes.sum(1).eq(17).all()


def test_r_zero_is_identity():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense = model(x)
        merged = rmeeto.apply(model, r=0)(x)
    assert torch.equal(dense, merged)
    with torch.no_grad():
        assert not torch.allclose(rmeeto.apply(model, r=4)(x), dense)  # r > 0 does change the output
        assert torch.equal(model.set_reducer(None)(x), dense)


def test_samples_are_independent_of_the_batch():
    model = rmeeto.apply(tiny_model().eval(), r=4)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        parts = torch.cat([model(x[:2]), model(x[2:3]), model(x[3:])])
    torch.testing.assert_close(full, parts, rtol=1e-4, atol=1e-5)


def test_gradients_flow_in_train_mode():
    model = rmeeto.apply(tiny_model().train(), r=4)
    x = torch.randn(2, 3, 64, 64)
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    for name in ("patch_embed.proj.weight", "layers.0.mixer.in_proj.weight", "layers.3.mixer.in_proj.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_masked_state_is_refused():
    state = random_state(1, 9, 4, cls=[4])
    with pytest.raises(ValueError, match="mask"):
        merge_tokens(state.replace(mask=torch.ones(1, 9)), 2)
    assert isinstance(RMeeToReducer(2, (2,)), Reducer)


@pytest.mark.parametrize("name,r,dense,merged", [
    ("vim_tiny_patch16_224", 5, 1.45, 1.28),
    ("vim_small_patch16_224", 11, 5.08, 3.58),
    ("vim_base_patch16_224", 11, 18.87, 13.21),
])
def test_flops_reproduce_the_paper(name, r, dense, merged):
    from mambatrim.analysis.flops import count_flops

    with torch.device("meta"):
        model = create_model(name)
    assert round(count_flops(model).gflops(), 2) == dense
    report = count_flops(rmeeto.apply(model, r=r))
    assert round(report.gflops(), 2) == merged
    assert report.tokens_per_layer == rmeeto.tokens_per_layer(197, 24, r, rmeeto.merge_layers(24))
    assert report.reducer > 0  # the matching cost is counted
