"""mambatrim.analysis.visualize: what a method did, read from its own hooks and state, drawn as PNG grids."""
from __future__ import annotations

import pytest
import torch

from mambatrim.analysis.visualize import plot_scores, trace, visualize
from mambatrim.engine.dyvm_selectors import set_static_block_policy
from mambatrim.models import create_model
from mambatrim.reduce import apply_method

KW = dict(embed_dim=32, depth=4, patch_size=4, stride=4, in_chans=1, num_classes=10, img_size=24)  # 6x6 grid


def model(method: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return apply_method(create_model("vim_tiny_patch16_224", **KW), method, **options).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 24, 24, generator=torch.Generator().manual_seed(1))


def test_merge_groups_partition_the_patches_and_match_the_methods_own_sizes() -> None:
    m = model("rmeeto", r=5, layers=[1, 2, 3])
    x = images()
    result = trace(m, x)
    with torch.no_grad():
        final = m.forward_tokens(x)  # the method's own bookkeeping: sizes = original tokens per token
    groups = result.groups[3]  # (B, L, N_dense) after the last merge
    members = (groups > 0).sum(-1).float()
    torch.testing.assert_close(members, final.sizes.float())
    covered = (groups > 0).sum(1)  # every dense token is in exactly one group
    assert bool((covered == 1).all())
    assert result.stages() == [1, 2, 3] and result.positions[3].shape[1] == 37 - 15
    assert m.reducer is not None and type(m.reducer).__name__ == "RMeeToReducer"  # restored after tracing


def test_pruner_scores_kept_tokens_above_pruned_ones() -> None:
    """ToP's global selection: after the pruning, every kept patch scored at least as high as every pruned one."""
    result = trace(model("top", keep=0.5, layers=[2]), images())
    positions, scores = result.scores[2]
    kept = result.positions[2]
    for b in range(positions.shape[0]):
        patch = result.patch_index(positions[b]) >= 0
        is_kept = torch.isin(positions[b], kept[b])
        assert scores[b][patch & is_kept].min() >= scores[b][patch & ~is_kept].max()
        assert int((patch & ~is_kept).sum()) == 18


def test_direction_selection_is_read_from_what_the_mixers_ran() -> None:
    m = model("dyvm", keep=None, block_ratio=0.75)
    off = set_static_block_policy(m, 0.75)
    result = trace(m, images(3))
    expected = torch.ones(3, 4, 2)
    for layer, direction in off:
        expected[:, layer, direction] = 0
    torch.testing.assert_close(result.directions, expected)


def test_visualize_writes_the_plots_that_apply(tmp_path) -> None:
    x = images()
    written = {p.name for p in visualize(model("top", keep=0.7, layers=[1, 2]), x, tmp_path, "top")}
    assert written == {"top_tokens.png", "top_scores.png"}
    written = {p.name for p in visualize(model("dyvm", keep=0.7, block_ratio=0.8, layers=[2]), x, tmp_path, "d")}
    assert written == {"d_tokens.png", "d_directions.png"}
    assert all((tmp_path / name).stat().st_size > 2000 for name in written)
    with pytest.raises(ValueError, match="no importance scores"):
        plot_scores(trace(model("rmeeto", r=3), x), x, tmp_path / "s.png")


def test_a_model_without_a_method_is_refused() -> None:
    dense = create_model("vim_tiny_patch16_224", **KW)
    with pytest.raises(ValueError, match="no reduction method attached"):
        trace(dense, images())
