"""R-MeeTo merging: against a per-sample loop reference, invariants (order, class token, conservation), the
ratio <-> r mapping, identity at r = 0, batch independence and gradients, on tiny models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import mambatrim  # noqa: F401  (registers the models)
from mambatrim.models.registry import create_model
from mambatrim.reduce import METHODS, Reducer, TokenState, apply_method
from mambatrim.contract import tokens
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


def _add_in_order(length: int, slot: Tensor, delta: Tensor, order: Tensor) -> Tensor:
    """bf16 scatter-add of ``delta`` rows into ``length`` zero rows, one row at a time in ``order``: what CUDA's
    atomics do in some order of their own."""
    out = torch.zeros(length, delta.shape[-1], dtype=torch.bfloat16)
    for j in order.tolist():
        out[slot[j]] += delta[j].to(torch.bfloat16)
    return out


def test_group_sums_make_the_fold_order_free():
    """Several merged tokens folding into one destination: added one by one in different orders, the raw
    deltas round to different bf16 sums (the run-to-run drift CUDA showed); the grouped deltas do not, and
    they sum to the same values as the raw ones."""
    g = torch.Generator().manual_seed(0)
    length, r, dim = 6, 40, 16
    slot = torch.randint(0, length, (1, r), generator=g)
    delta = torch.randn(1, r, dim, generator=g) * torch.logspace(-3, 1, r)[None, :, None]
    folded_slot, folded = tokens.group_sums(slot, delta)
    ref = torch.zeros(1, length, dim).scatter_add_(1, slot[..., None].expand(-1, -1, dim), delta)
    got = torch.zeros(1, length, dim).scatter_add_(1, folded_slot[..., None].expand(-1, -1, dim), folded)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert int((folded[0].abs().sum(-1) > 0).sum()) == len(set(slot[0].tolist()))  # one row per destination
    orders = [torch.randperm(r, generator=g) for _ in range(8)]
    raw = [_add_in_order(length, slot[0], delta[0], o) for o in orders]
    grouped = [_add_in_order(length, folded_slot[0], folded[0], o) for o in orders]
    assert any(not torch.equal(raw[0], x) for x in raw[1:])
    assert all(torch.equal(grouped[0], x) for x in grouped[1:])


@pytest.mark.parametrize("length,r", [(17, 3), (16, 7), (33, 16)])
def test_merge_with_group_sums_matches_per_sample_reference(length, r, monkeypatch):
    """The CUDA fold (grouped deltas), run here on the CPU, gives the paper's merge."""
    monkeypatch.setattr(tokens, "atomic_scatter", lambda t: True)
    state = random_state(3, length, 8, cls=[length // 2, 0, length - 1])
    out = merge_tokens(state, r)
    for b in range(3):
        x, res, size, anchors, q = reference_merge(state.hidden[b], state.residual[b], state.sizes[b],
                                                   int(state.protected[b, 0]), r)
        torch.testing.assert_close(out.hidden[b], x)
        torch.testing.assert_close(out.residual[b], res)
        assert torch.equal(out.positions[b], anchors)


def test_group_sums_pass_gradients():
    slot = torch.tensor([[2, 0, 2, 1, 2]])
    delta = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 4, 3, dtype=torch.float64)

    def fold(d):
        s, f = tokens.group_sums(slot, d)
        return torch.zeros(1, 4, 3, dtype=d.dtype).scatter_add(1, s[..., None].expand(-1, -1, 3), f)

    fold(delta).mul(weight).sum().backward()
    torch.testing.assert_close(delta.grad, weight.gather(1, slot[..., None].expand(-1, -1, 3)))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA atomics: needs a GPU")
def test_merge_is_deterministic_on_cuda():
    """Without a class token the PyTorch merge runs on the GPU too; two forwards of one batch must agree bit for
    bit (they did not while merged tokens were folded with raw atomic adds)."""
    torch.manual_seed(0)
    model = create_model("vim_small_patch16_224", img_size=256, if_cls_token=False, num_classes=10).cuda().eval()
    rmeeto.apply(model, ratio=0.31)
    x = torch.randn(16, 3, 256, 256, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        first, second = model.forward_tokens(x).hidden, model.forward_tokens(x).hidden
    assert torch.equal(first, second)
