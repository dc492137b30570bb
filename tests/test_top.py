"""ToP and the pruning baselines: dense equivalence at keep 1.0, the hidden-state alignment against a full-length
sequential scan, order and class-token handling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambatrim.models.mamba import BiMambaMixer
from mambatrim.models.vim import VisionMamba
from mambatrim.ops import causal_conv1d, selective_scan
from mambatrim.reduce import MixerContext, apply_method
from mambatrim.reduce import top
from mambatrim.reduce.baselines import NormPruner, StaticPruner
from mambatrim.contract import MixerPlan, scan_gaps
from mambatrim.reduce.top import ProgressivePruner, kept_patches, tokens_per_layer


def tiny_vim(seed: int = 0, depth: int = 4) -> VisionMamba:
    torch.manual_seed(seed)
    model = VisionMamba(img_size=20, patch_size=4, stride=4, depth=depth, embed_dim=16, num_classes=5,
                        drop_path_rate=0.0)  # 25 patches + the class token (index 12) = 26 tokens
    return model.eval()


def random_positions(full: int, gen: torch.Generator) -> torch.Tensor:
    """A random sorted subset of 0..full-1 with at least 2 and at most full-1 elements."""
    k = int(torch.randint(2, full, (1,), generator=gen))
    return torch.randperm(full, generator=gen)[:k].sort().values


def expected_gaps(pos: list[int], reverse: bool) -> list[float]:
    """Pruned positions before each kept token in scan order, written out by hand."""
    n = len(pos)
    if reverse:
        return [float(pos[k + 1] - pos[k] - 1) if k + 1 < n else 0.0 for k in range(n)]
    return [float(pos[k] - pos[k - 1] - 1) if k > 0 else 0.0 for k in range(n)]


def fill_pruned_delta(delta: torch.Tensor, kept: torch.Tensor, reverse: bool) -> torch.Tensor:
    """R2 reference: every pruned position takes the delta of the previous kept token in scan order
    (0 before the first one, where the state is still zero)."""
    out = torch.zeros_like(delta)
    full = delta.shape[-1]
    kept_set = set(kept.tolist())
    order = range(full - 1, -1, -1) if reverse else range(full)
    last = None
    for t in order:
        if t in kept_set:
            out[..., t] = delta[..., t]
            last = t
        elif last is not None:
            out[..., t] = delta[..., last]
    return out


# ----------------------------------------------------------------------------------------------- ops level
@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mode", ["hold", "decay"])
def test_aligned_scan_equals_full_length_scan(backend: str, reverse: bool, mode: str) -> None:
    gen = torch.Generator().manual_seed(hash((backend, reverse, mode)) % 1000)
    bsz, dim, n, full = 2, 3, 4, 17
    for _ in range(3):
        kept = random_positions(full, gen)
        u = torch.randn(bsz, dim, full, generator=gen)
        delta = F.softplus(torch.randn(bsz, dim, full, generator=gen))
        A = -torch.rand(dim, n, generator=gen) * 2 - 0.1
        B, C = torch.randn(bsz, n, full, generator=gen), torch.randn(bsz, n, full, generator=gen)
        D, z = torch.randn(dim, generator=gen), torch.randn(bsz, dim, full, generator=gen)
        pruned = torch.ones(full, dtype=torch.bool)
        pruned[kept] = False
        if mode == "hold":  # delta = 0 at pruned positions: the state passes unchanged
            u_full, delta_full = u, delta.masked_fill(pruned, 0.0)
            gap = None
        else:  # u = 0 and the previous kept token's delta: the state only decays
            u_full, delta_full = u.masked_fill(pruned, 0.0), fill_pruned_delta(delta, kept, reverse)
            gap = torch.tensor([expected_gaps(kept.tolist(), reverse)] * bsz)
        want = selective_scan(u_full, delta_full, A, B, C, D, z, reverse=reverse, backend="ref")[..., kept]
        got = selective_scan(u[..., kept], delta[..., kept], A, B[..., kept], C[..., kept], D, z[..., kept],
                             reverse=reverse, gap=gap, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gaps_from_positions_match_hand_count() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        kept = random_positions(15, gen)
        for reverse in (False, True):
            got = scan_gaps(kept[None], reverse)[0].tolist()
            assert got == expected_gaps(kept.tolist(), reverse)


def test_gaps_class_token_out_of_order_is_transparent() -> None:
    # class token (original index 3) re-inserted between kept patches 5 and 7: it carries no gap, and the one
    # pruned position between 5 and 7 goes to the token after it in scan order
    positions = torch.tensor([[0, 2, 5, 3, 7, 8]])
    cls = torch.tensor([[3]])
    assert scan_gaps(positions, False, cls)[0].tolist() == [0, 1, 2, 0, 1, 0]
    assert scan_gaps(positions, True, cls)[0].tolist() == [1, 2, 1, 0, 0, 0]
    in_order = torch.tensor([[0, 2, 4, 7]])  # class token at 4 between 2 and 7: ordinary gaps
    assert scan_gaps(in_order, False, torch.tensor([[2]]))[0].tolist() == [0, 1, 1, 2]


# ----------------------------------------------------------------------------------------------- mixer level
def reference_mixer(mixer: BiMambaMixer, hidden_full: torch.Tensor, kept: torch.Tensor, mode: str) -> torch.Tensor:
    """The mixer run over the full-length sequence with zeros at pruned slots before the conv and, at pruned
    positions, delta = 0 ('hold') or u = 0 with the previous kept token's delta ('decay'); kept outputs only."""
    full = hidden_full.shape[1]
    pruned = torch.ones(full, dtype=torch.bool)
    pruned[kept] = False
    x, z = mixer.in_proj(hidden_full).transpose(1, 2).chunk(2, dim=1)
    x = x.masked_fill(pruned, 0.0)
    outs = []
    for backward in (False, True):
        conv, x_proj, dt_proj = ((mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b) if backward
                                 else (mixer.conv1d, mixer.x_proj, mixer.dt_proj))
        A = -torch.exp((mixer.A_b_log if backward else mixer.A_log).float())
        D = mixer.D_b if backward else mixer.D
        u = causal_conv1d(x, conv.weight, conv.bias, activation="silu", reverse=backward)
        dt, Bm, Cm = x_proj(u.transpose(1, 2)).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        delta = F.softplus(dt_proj(dt)).transpose(1, 2)
        if mode == "hold":
            delta = delta.masked_fill(pruned, 0.0)
        else:
            u, delta = u.masked_fill(pruned, 0.0), fill_pruned_delta(delta, kept, backward)
        outs.append(selective_scan(u, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), D, z,
                                   reverse=backward, backend="ref"))
    y = (outs[0] + outs[1]) / 2
    return mixer.out_proj(y.transpose(1, 2))[:, kept]


@pytest.mark.parametrize("mode", ["hold", "decay"])
def test_mixer_alignment_equals_full_length_reference(mode: str) -> None:
    torch.manual_seed(1)
    mixer = BiMambaMixer(8, d_state=4)
    with torch.no_grad():  # steps of order 1 (not the tiny init values) so that the decay across gaps matters
        mixer.dt_proj.bias.normal_(0.5, 0.5)
        mixer.dt_proj_b.bias.normal_(0.5, 0.5)
        mixer.D.mul_(0.1)  # and the skip term small, so the scanned state dominates the output
        mixer.D_b.mul_(0.1)
    gen = torch.Generator().manual_seed(7)
    full = 19
    hidden = torch.randn(2, full, 8)
    for _ in range(3):
        kept = random_positions(full, gen)
        ctx = MixerContext(positions=kept.expand(2, -1), align=mode)
        with torch.no_grad():
            got = mixer(hidden[:, kept], ctx)
            want = reference_mixer(mixer, hidden, kept, mode)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mixer_without_alignment_differs_from_aligned() -> None:
    """Alignment must change something once tokens are pruned (guards against a silently ignored context)."""
    torch.manual_seed(2)
    mixer = BiMambaMixer(8, d_state=4)
    hidden, kept = torch.randn(1, 11, 8), torch.tensor([0, 1, 4, 5, 9])
    with torch.no_grad():
        plain = mixer(hidden[:, kept])
        held = mixer(hidden[:, kept], MixerContext(positions=kept[None], align="hold"))
        decayed = mixer(hidden[:, kept], MixerContext(positions=kept[None], align="decay"))
    assert not torch.allclose(plain, held) and not torch.allclose(held, decayed)


# ----------------------------------------------------------------------------------------------- model level
@pytest.mark.parametrize("method,align", [("top", None), ("top", "hold"), ("top", "decay"),
                                         ("prune_random", None), ("prune_norm", "hold")])
def test_keep_one_equals_dense(method: str, align: str | None) -> None:
    model = tiny_vim()
    images = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        dense = model(images)
        apply_method(model, method, keep=1.0, layers=[1, 2, 3], align=align)
        pruned = model(images)
    torch.testing.assert_close(pruned, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", ["middle", "original"])
def test_decay_gaps_computed_once_per_pruning_event_equal_per_layer_ones(placement: str) -> None:
    """ToP hands the mixers the decay gaps it computed when it pruned; they give what each mixer would derive
    from the positions itself, and the mixer does use them (zero gaps change the logits)."""
    import dataclasses

    model = tiny_vim()
    images = torch.randn(2, 3, 20, 20)
    reducer = apply_method(model, "top", keep=0.7, layers=[1, 2], align="decay", cls_placement=placement).reducer
    own = reducer.mixer_context
    seen: list[torch.Tensor] = []

    def without_gaps(i: int, state):  # the mixer derives them from the positions
        ctx = own(i, state)
        if ctx is not None and ctx.gaps is not None:
            seen.append(ctx.gaps)
            ctx = dataclasses.replace(ctx, gaps=None)
        return ctx

    with torch.no_grad():
        given = model(images)
        reducer.mixer_context = without_gaps
        derived = model(images)
        reducer.mixer_context = lambda i, state: (lambda c: c if c is None or c.gaps is None else dataclasses.replace(
            c, gaps=torch.zeros_like(c.gaps)))(own(i, state))
        zeroed = model(images)
    assert seen and all(g.shape[0] == 2 for g in seen)
    torch.testing.assert_close(given, derived, rtol=0, atol=0)
    assert not torch.allclose(given, zeroed)


def capture_final_state(model: VisionMamba, images: torch.Tensor):
    with torch.no_grad():
        return model.forward_tokens(images)


@pytest.mark.parametrize("placement", ["middle", "original"])
def test_order_preserved_and_class_token_kept(placement: str) -> None:
    model = tiny_vim(depth=4)
    top.apply(model, keep=0.6, layers=[1, 3], align="decay", cls_placement=placement)
    images = torch.randn(3, 3, 20, 20)
    state = capture_final_state(model, images)
    counts = tokens_per_layer(26, 4, [1, 3], 0.6)
    assert state.num_tokens == counts[-1] < 26
    cls_orig = 25 // 2
    for row in range(3):
        pos = state.positions[row]
        c = int(state.protected[row, 0])
        assert int(pos[c]) == cls_orig and int((pos == cls_orig).sum()) == 1
        patches = torch.cat([pos[:c], pos[c + 1:]])
        assert bool((patches[1:] > patches[:-1]).all())  # survivors in original order
        if placement == "middle":
            assert c == (state.num_tokens - 1) // 2
        else:
            assert bool((pos[1:] > pos[:-1]).all())
    # the class token read by the head is the one the backbone carries: logits come from it
    torch.testing.assert_close(model.head(state.hidden[torch.arange(3), state.protected[:, 0]]), model(images))


class FavourClass(ProgressivePruner):
    """Scores the class token highest, every other token by its position: the class token must not be doubled."""

    def scores(self, layer_idx, state):
        score = state.positions.float().clone()
        score[torch.arange(score.shape[0]), state.protected[:, 0]] = 1e9
        return score


def test_class_token_never_picked_as_patch_for_any_batch_row() -> None:
    model = tiny_vim(depth=2).set_reducer(FavourClass(layers=[1], keep=0.5))
    state = capture_final_state(model, torch.randn(4, 3, 20, 20))
    n = kept_patches(26, 0.5)
    for row in range(4):
        pos = state.positions[row].tolist()
        assert pos.count(12) == 1
        assert sorted(p for p in pos if p != 12) == list(range(26 - n, 26))  # the highest-scored patches


def test_top_scores_are_clipped_ssm_output_of_previous_block() -> None:
    model = tiny_vim(depth=3)
    images = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        emb = model.embed(images).hidden
        mixer = model.layers[0].mixer
        x, z = mixer.in_proj(model.layers[0].norm(emb.float())).transpose(1, 2).chunk(2, dim=1)
        plan = MixerPlan.build(None, mixer.orders, x.shape[0], x.device)
        y = (mixer.run_path(0, x, z, plan, None) + mixer.run_path(1, x, z, plan, None)) / 2
        score = y.clamp(min=0).sum(1)  # (B, L)
    score[:, 12] = -float("inf")
    n = kept_patches(26, 0.5)
    want = score.topk(n, dim=1).indices.sort(1).values
    top.apply(model, keep=0.5, layers=[1], align=None)
    state = capture_final_state(model, images)
    got = torch.cat([state.positions[:, : n // 2], state.positions[:, n // 2 + 1:]], 1)
    assert torch.equal(got, want)


def test_baselines() -> None:
    model = tiny_vim(depth=2)
    images = torch.randn(2, 3, 20, 20)
    apply_method(model, "prune_random", keep=0.5, layers=[1], seed=5)
    a, b = capture_final_state(model, images).positions, capture_final_state(model, images).positions
    assert torch.equal(a, b)  # seeded: repeatable
    model.set_reducer(StaticPruner(layers=[1], keep=0.5))
    pos = capture_final_state(model, images).positions
    assert torch.equal(pos[0], pos[1])  # input-independent
    steps = (pos[0][1:] - pos[0][:-1]).tolist()
    assert max(steps) - min(steps) <= 2  # evenly spread
    model.set_reducer(NormPruner(layers=[1], keep=0.5))
    with torch.no_grad():
        state1 = model.embed(images)
        hidden, residual = model.layers[0](state1.hidden, None)
        norm = (residual + hidden.float()).norm(dim=-1)
    norm[:, 12] = -float("inf")
    want = norm.topk(kept_patches(26, 0.5), dim=1).indices.sort(1).values
    pos = capture_final_state(model, images).positions
    n = want.shape[1]
    assert torch.equal(torch.cat([pos[:, : n // 2], pos[:, n // 2 + 1:]], 1), want)


def test_flops_overhead_and_schedule() -> None:
    assert tokens_per_layer(197, 24, [5, 10, 15], 0.8)[::5] == [197, 157, 125, 101, 101]
    counts = tokens_per_layer(197, 24, [5, 10, 15], 0.8)
    assert top.ToP(align=None).flops_overhead(counts, 384) > 0  # the score itself
    plain = top.ToP(align=None).flops_overhead(counts, 384)
    hold = top.ToP(align="hold").flops_overhead(counts, 384)
    decay = top.ToP(align="decay").flops_overhead(counts, 384)
    assert plain < hold < decay < 0.01 * 5.08e9


@pytest.mark.parametrize("kwargs,match", [(dict(keep=0.0), "keep"), (dict(keep=1.5), "keep"),
                                          (dict(align="sideways"), "align"), (dict(layers=[10, 5]), "layers"),
                                          (dict(cls_placement="end"), "cls_placement")])
def test_bad_options_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        top.apply(tiny_vim(depth=2), **kwargs)


def test_too_deep_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="blocks"):
        top.apply(tiny_vim(depth=2), layers=[5])


def test_deep_copy_records_independently() -> None:
    """EMA / teacher copies of a ToP model must score from their own forward pass, not the original's."""
    import copy

    model = top.apply(tiny_vim(depth=3), keep=0.5, layers=[1, 2])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 20, 20)
    want = capture_final_state(twin, images).positions
    assert twin.reducer is not model.reducer
    capture_final_state(model, images)  # the original records into its own reducer only
    assert torch.equal(capture_final_state(twin, images).positions, want)
    original = model.reducer.mixer_context
    model.reducer.mixer_context = lambda i, state: None  # no tap: nothing recorded, a clear error
    with pytest.raises(RuntimeError, match="no SSM-output score recorded"):
        model(images)
    model.reducer.mixer_context = original


@pytest.mark.parametrize("name,layers,plain,aligned", [("vim_tiny_patch16_224", [10], 1.28, 1.29),
                                                       ("vim_small_patch16_224", [5, 10, 15], 3.57, 3.60)])
def test_paper_flops_figures(name: str, layers: list[int], plain: float, aligned: float) -> None:
    """R-MeeTo's table: token pruning 1.28 / 3.57 G and ToP with alignment 1.29 / 3.60 G (Vim-Ti / Vim-S, 224)."""
    from mambatrim.analysis.flops import count_flops
    from mambatrim.models import create_model

    with torch.device("meta"):
        model = create_model(name)
    top.apply(model, keep=0.8, layers=layers, align=None)
    report = count_flops(model, 224)
    assert round(report.gflops("paper"), 2) == plain
    mixer = model.layers[0].mixer
    stepwise = top.stepwise_alignment_macs(report.tokens_per_layer, mixer.d_inner, mixer.d_state)
    assert round(report.gflops("paper") + stepwise / 1e9, 2) == aligned


def test_score_order_ranks_survivors_by_score_as_vit_pruning_does() -> None:
    """order='score' keeps the same tokens as order='original' but ranked by descending score (the class token
    at the middle), which changes what the scans see; misuse with alignment is refused."""
    model = tiny_vim(depth=2)
    images = torch.randn(3, 3, 20, 20)
    model.set_reducer(NormPruner(layers=[1], keep=0.5))
    kept = capture_final_state(model, images)
    with torch.no_grad():
        state1 = model.embed(images)
        hidden, residual = model.layers[0](state1.hidden, None)
        norm = (residual + hidden.float()).norm(dim=-1)
    norm[:, 12] = -float("inf")
    n = kept_patches(26, 0.5)
    model.set_reducer(NormPruner(layers=[1], keep=0.5, order="score"))
    ranked = capture_final_state(model, images)
    pos = torch.cat([ranked.positions[:, : n // 2], ranked.positions[:, n // 2 + 1:]], 1)
    assert bool((ranked.positions[:, n // 2] == 12).all())
    assert torch.equal(pos, norm.topk(n, dim=1).indices)  # descending score, not sorted
    assert torch.equal(pos.sort(1).values, torch.cat([kept.positions[:, : n // 2], kept.positions[:, n // 2 + 1:]], 1))
    with torch.no_grad():
        assert not torch.allclose(model(images), model.set_reducer(NormPruner(layers=[1], keep=0.5))(images))
    for bad in (dict(align="hold"), dict(cls_placement="original")):
        with pytest.raises(ValueError, match="order='score'"):
            NormPruner(layers=[1], order="score", **bad)
    with pytest.raises(ValueError, match="order must be"):
        NormPruner(layers=[1], order="random")


def _window_reference(score: torch.Tensor, cls: int, n_keep: int) -> list[int]:
    """One sample, by hand: patches (class token left out) in runs of consecutive tokens, run r holding patches
    j with floor(j * R / n) == r; with R = n - n_keep runs each drops its lowest-scored, else R = n_keep runs
    each keep their best."""
    patches = [i for i in range(score.numel()) if i != cls]
    n = len(patches)
    drop = n - n_keep <= n_keep
    runs = n - n_keep if drop else n_keep
    picked = []
    for r in range(runs):
        members = [p for j, p in enumerate(patches) if j * runs // n == r]
        values = [float(score[p]) for p in members]
        picked.append(members[values.index(min(values) if drop else max(values))])
    return [p for p in patches if p not in picked] if drop else picked


@pytest.mark.parametrize("length,n_keep", [(11, 8), (11, 5), (11, 2), (11, 10), (26, 12), (257, 204), (205, 164),
                                           (9, 1)])
def test_window_selection_matches_a_per_sample_reference(length: int, n_keep: int) -> None:
    torch.manual_seed(length * 100 + n_keep)
    score = torch.randn(4, length)
    cls = torch.tensor([length // 2, 0, length - 1, 3])
    kept = top.window_keep(score, cls[:, None], n_keep)
    assert kept.shape == (4, n_keep)
    for b in range(4):
        assert kept[b].tolist() == _window_reference(score[b], int(cls[b]), n_keep)
    with pytest.raises(ValueError, match="window selection"):
        top.window_keep(score, cls[:, None], length)


def test_window_selection_in_the_pruner_and_its_options() -> None:
    """A pruner with selection='window' keeps window_keep's tokens (original order, class token at the middle);
    the same score with global selection keeps other ones; misuse is refused."""
    model = tiny_vim(depth=2)
    images = torch.randn(3, 3, 20, 20)
    model.set_reducer(NormPruner(layers=[1], keep=0.7, selection="window"))
    state = capture_final_state(model, images)
    with torch.no_grad():
        first = model.embed(images)
        hidden, residual = model.layers[0](first.hidden, None)
        norm = (residual + hidden.float()).norm(dim=-1)
    n = kept_patches(26, 0.7)
    expected = top.window_keep(norm, first.protected, n)
    assert bool((state.positions[:, n // 2] == 12).all())
    assert torch.equal(torch.cat([state.positions[:, : n // 2], state.positions[:, n // 2 + 1:]], 1), expected)
    model.set_reducer(NormPruner(layers=[1], keep=0.7))
    assert not torch.equal(capture_final_state(model, images).positions, state.positions)
    with pytest.raises(ValueError, match="selection must be"):
        top.apply(tiny_vim(depth=2), selection="local")
    with pytest.raises(ValueError, match="order='score'"):
        NormPruner(layers=[1], order="score", selection="window")
