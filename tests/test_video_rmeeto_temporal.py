"""R-MeeTo's temporal pairing (pairing='temporal'): the batched merge against a per-sample reference written
here from the rule (columns of one spatial location in time order, odd ranks merge into the more similar column
neighbour, top r by similarity, size-weighted averages at the destination's slot), and its contract on models."""
from __future__ import annotations

import pytest
import timm
import torch

from mambatrim.analysis import count_flops
from mambatrim.contract import TokenState
from mambatrim.reduce import rmeeto
from mambatrim.reduce.registry import apply_method
from mambatrim.reduce.rmeeto_temporal import patch_index

GRID = (4, 3, 3)  # odd patches per frame: alternate sequence indices would not pair the frames' same locations


def video_state(bsz: int = 3, grid: tuple[int, int, int] = GRID, dim: int = 8, seed: int = 0) -> TokenState:
    """A dense clip's state as VideoMambaVideo.embed makes it: class token first, grid (T, H, W), float64."""
    g = torch.Generator().manual_seed(seed)
    length = 1 + grid[0] * grid[1] * grid[2]
    hidden = torch.randn(bsz, length, dim, generator=g, dtype=torch.float64)
    residual = torch.randn(bsz, length, dim, generator=g, dtype=torch.float64)
    return TokenState(hidden=hidden, residual=residual, positions=torch.arange(length).expand(bsz, -1),
                      protected=torch.zeros(bsz, 1, dtype=torch.long), grid=grid, protected_layout="first")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def reference_event(state: TokenState, r: int) -> TokenState:
    """One temporal merge event, one sample at a time, from the rule (class token at index 0, kept first)."""
    frames, height, width = state.grid
    hw = height * width
    sizes = state.sizes if state.sizes is not None else torch.ones(state.hidden.shape[:2], dtype=torch.float64)
    r = min(r, (state.num_tokens - 1 - hw) // 2)
    out = {"hidden": [], "residual": [], "positions": [], "sizes": []}
    for b in range(state.hidden.shape[0]):
        h = state.hidden[b]
        columns: dict[int, list[tuple[int, int]]] = {}
        for s in range(1, state.num_tokens):
            patch = int(state.positions[b, s]) - 1
            columns.setdefault(patch % hw, []).append((patch // hw, s))
        candidates = []  # (similarity, source, destination)
        for column in columns.values():
            column.sort()
            for i in range(1, len(column), 2):
                options = [column[i - 1][1]] + ([column[i + 1][1]] if i + 1 < len(column) else [])
                sims = [cosine(h[column[i][1]], h[o]) for o in options]
                j = 1 if len(sims) == 2 and sims[1] > sims[0] else 0
                candidates.append((sims[j], column[i][1], options[j]))
        chosen = sorted(candidates, key=lambda c: -c[0])[:r]
        into = {src: dst for _, src, dst in chosen}
        for s in range(state.num_tokens):
            if s in into:
                continue
            group = [s] + [src for src, dst in into.items() if dst == s]
            w = sizes[b, group]
            out["hidden"].append((w[:, None] * h[group]).sum(0) / w.sum())
            out["residual"].append((w[:, None] * state.residual[b, group]).sum(0) / w.sum())
            out["positions"].append(state.positions[b, s])
            out["sizes"].append(w.sum())
    bsz = state.hidden.shape[0]
    stacked = {k: torch.stack(v).view(bsz, -1, *torch.stack(v).shape[1:]) for k, v in out.items()}
    return state.replace(protected=torch.zeros(bsz, 1, dtype=torch.long), **stacked)


def temporal(state: TokenState, r: int) -> TokenState:
    return rmeeto.merge_tokens(state, r, pairing="temporal")


def test_batched_merge_equals_the_per_sample_reference_over_several_events():
    state, ref = video_state(), video_state()
    for r in (6, 5, 4, 40):  # the last one is capped: one token per location at least
        state, ref = temporal(state, r), reference_event(ref, r)
        for key in ("hidden", "residual", "positions", "sizes", "protected"):
            torch.testing.assert_close(getattr(state, key), getattr(ref, key).to(getattr(state, key).dtype),
                                       rtol=1e-6, atol=1e-6, msg=key)  # fp32 merge weights


def test_order_is_kept_the_class_token_stays_first_and_merges_stay_within_a_location():
    state = video_state(bsz=4, grid=(5, 2, 3), seed=1)
    cls_row = state.hidden[:, 0].clone()
    while True:
        merged = temporal(state, 4)
        if merged.num_tokens == state.num_tokens:
            break
        state = merged
        assert bool((state.positions[:, 1:] > state.positions[:, :-1]).all())
        assert bool((state.protected == 0).all()) and bool((state.positions[:, 0] == 0).all())
        torch.testing.assert_close(state.hidden[:, 0], cls_row)
    assert state.num_tokens <= 1 + 6 + 1  # the cap: (n - H*W) // 2, about one token per location left
    loc = (state.positions[:, 1:] - 1) % 6
    per_location = torch.zeros(4, 6, dtype=state.sizes.dtype).scatter_add_(1, loc, state.sizes[:, 1:])
    assert bool((per_location == 5).all())  # each location's tokens stand for its 5 frames: no cross-location merge


def test_first_event_pairs_odd_frames_with_the_same_location_in_an_adjacent_frame():
    state = video_state(bsz=2, grid=(4, 2, 2), dim=4, seed=2)
    # make frame 1's location 3 a near copy of frame 2's: the best pair of all
    state.hidden[:, 1 + 1 * 4 + 3] = state.hidden[:, 1 + 2 * 4 + 3] * 1.5
    merged = temporal(state, 1)
    gone = set(range(state.num_tokens)) - set(merged.positions[0].tolist())
    assert gone == {1 + 1 * 4 + 3}
    assert float(merged.sizes[0, 1 + 2 * 4 + 3 - 1]) == 2.0  # landed on frame 2's slot (one earlier row gone)


def test_one_frame_merges_nothing_and_image_grids_are_refused():
    state = video_state(grid=(1, 3, 3))
    assert temporal(state, 4) is state
    image = video_state(grid=(1, 3, 3)).replace(grid=(3, 3))
    with pytest.raises(ValueError, match="pairing='temporal' needs a video model"):
        temporal(image, 2)


def test_patch_index_leaves_out_a_middle_class_token():
    positions = torch.arange(10).expand(2, -1)
    protected = torch.full((2, 1), 5)
    seq = torch.tensor([[0, 4, 6, 9], [1, 2, 7, 8]])
    assert patch_index(positions, protected, seq).tolist() == [[0, 4, 5, 8], [1, 2, 6, 7]]


def small_video(depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("videomamba_video_tiny", embed_dim=32, depth=depth, num_classes=5, img_size=32,
                             patch_size=8, num_frames=4).eval()  # 4 x 4 x 4 = 64 patch tokens


def test_r_zero_equals_dense_and_merging_changes_the_logits():
    model = small_video()
    clip = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        dense = model(clip)
        same = rmeeto.apply(model, r=0, pairing="temporal")(clip)
        merged = rmeeto.apply(model, r=8, layers=[1, 2, 3], pairing="temporal")(clip)
    torch.testing.assert_close(same, dense)
    assert not torch.allclose(merged, dense, atol=1e-4)


def test_flops_follow_the_token_counts_and_the_ratio_maps_under_the_cap():
    model = small_video()
    dense = count_flops(model)
    rmeeto.apply(model, r=20, layers=[1, 2, 3], pairing="temporal")
    report = count_flops(model)
    expected = rmeeto.tokens_per_layer(65, 4, 20, [1, 2, 3], protected=1, floor=16)
    assert report.tokens_per_layer == expected == [65, 45, 31, 24]  # capped: (44 - 16) // 2, (30 - 16) // 2
    per_token = (dense.total() - dense.patch_embed - dense.head) / (4 * 65)
    saved = dense.total() - report.total() + model.reducer.flops_overhead(expected, 32)
    assert saved == pytest.approx(per_token * (4 * 65 - sum(expected)), rel=0.02)
    rmeeto.apply(model, ratio=0.15, pairing="temporal")
    assert model.reducer.r == rmeeto.r_for_ratio(0.15, 65, 4, [2], 1, floor=16) == 19  # 0.15 * 4 * 65 / 2 blocks
    rmeeto.apply(model, ratio=0.3, layers=[1])  # the sequence pairing reaches 0.3 (r = 26 of at most 32) ...
    with pytest.raises(ValueError, match="out of range"):  # ... the temporal one at most 24 * 3 / (4 * 65) = 0.28
        rmeeto.apply(model, ratio=0.3, layers=[1], pairing="temporal")


def test_training_forward_backward_reaches_every_block():
    model = small_video().train()
    rmeeto.apply(model, r=8, layers=[1, 3], pairing="temporal")
    model(torch.randn(2, 3, 4, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.layers[-1].parameters() if p.requires_grad)


def test_bad_pairings_and_image_models_get_one_line_errors():
    model = small_video()
    with pytest.raises(ValueError, match="unknown pairing 'time'; choose one of sequence, temporal"):
        apply_method(model, "rmeeto", pairing="time")
    image = timm.create_model("videomamba_tiny", embed_dim=32, depth=2, num_classes=5, img_size=32, patch_size=8,
                              stride=8)
    with pytest.raises(ValueError, match="needs a video model; VideoMamba has no frames: use pairing='sequence'"):
        apply_method(image, "rmeeto", pairing="temporal")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_temporal_merge_is_cuda_graph_capturable():
    state = video_state(bsz=2, grid=(8, 4, 4), dim=32)
    state = state.replace(**{k: getattr(state, k).cuda().float() for k in ("hidden", "residual")},
                          positions=state.positions.cuda(), protected=state.protected.cuda())
    eager = temporal(state, 20)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        temporal(state, 20)  # warm-up off the default stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = temporal(state, 20)
    graph.replay()
    torch.testing.assert_close(captured.hidden, eager.hidden)
    torch.testing.assert_close(captured.positions, eager.positions)


def test_the_demo_rows_pair_each_rmeeto_setting_with_its_temporal_twin_and_fit_the_gpu_model():
    from mambatrim.engine.video_demo import VIDEO_DEMO, VIDEO_GPU_DEMO

    for task in (VIDEO_DEMO, VIDEO_GPU_DEMO):
        rows = {v.name: v for v in task.variants}
        for name in ("rmeeto", "rmeeto re-trained"):
            twin = rows[name.replace("rmeeto", "rmeeto temporal")]
            assert twin.options == {**rows[name].options, "pairing": "temporal"}
            assert twin.retrain == rows[name].retrain
    model = timm.create_model("videomamba_video_tiny", img_size=32, num_frames=8, num_classes=10,
                              **VIDEO_GPU_DEMO.recipe["model_kwargs"])
    assert model.patch_embed.num_patches + 1 == 513
    for v in VIDEO_GPU_DEMO.variants:
        if v.method == "rmeeto":  # ratio 0.31 -> r = 64 before blocks 2, 4, ..., 10 with either pairing
            apply_method(model, v.method, **v.options)
            assert (model.reducer.r, model.reducer.layers) == (64, (2, 4, 6, 8, 10))
