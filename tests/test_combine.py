"""Combined methods: one chained reducer built from two registered methods (reduce/combine.py)."""
from __future__ import annotations

import pytest
import torch

from mambatrim.analysis import count_flops
from mambatrim.models import create_model
from mambatrim.reduce import apply_method
from mambatrim.reduce.combine import ChainedReducer

KW = dict(embed_dim=32, depth=4, patch_size=4, stride=4, in_chans=1, num_classes=10, img_size=24)  # 36 tokens


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vim_tiny_patch16_224", **KW).eval()


def test_merging_with_every_scan_direction_on_equals_merging_alone() -> None:
    """DyVM block selection that runs every direction (selectors: weight 0, bias +5) changes nothing, so the
    chained reducer must give R-MeeTo's logits exactly: the chain adds no work of its own."""
    x = torch.randn(3, 1, 24, 24)
    merge = {"name": "rmeeto", "r": 4, "layers": [1, 2, 3]}
    combined = apply_method(model(), "combine", methods=[merge, {"name": "dyvm", "keep": None, "block_ratio": 0.8}])
    assert isinstance(combined.reducer, ChainedReducer)
    with torch.no_grad():
        for sel in combined.reducer.parts[1].selectors:
            sel.weight.zero_()
            sel.bias.fill_(5.0)
        alone = apply_method(model(), "rmeeto", r=4, layers=[1, 2, 3])
        torch.testing.assert_close(combined(x), alone(x))


def test_chained_token_counts_follow_both_schedules() -> None:
    """Pruning then merging: tokens per layer by the two rules written out here."""
    methods = [{"name": "prune_static", "keep": 0.5, "layers": [1]}, {"name": "rmeeto", "r": 3, "layers": [2, 3]}]
    combined = apply_method(model(), "combine", methods=methods)
    report = count_flops(combined, images=torch.randn(2, 1, 24, 24))
    after_prune = 18 + 1  # half of the 36 patch tokens (an even count) + the class token
    assert report.tokens_per_layer == [37, after_prune, after_prune - 3, after_prune - 6]


def test_two_direction_gates_in_one_block_are_refused() -> None:
    blocks = {"name": "dyvm", "keep": None, "block_ratio": 0.8}
    combined = apply_method(model(), "combine", methods=[blocks, blocks])
    with pytest.raises(ValueError, match="two methods set the mixer's direction_gate in block 0"):
        with torch.no_grad():
            combined(torch.randn(1, 1, 24, 24))


@pytest.mark.parametrize("methods, message", [
    ([{"name": "rmeeto"}], "at least two mappings"),
    ("rmeeto", "at least two mappings"),
    ([{"name": "rmeeto"}, {"ratio": 0.3}], "at least two mappings"),
    ([{"name": "rmeeto"}, {"name": "combine", "methods": []}], "not another combination"),
    ([{"name": "rmeeto"}, {"name": "rmeto"}], "unknown reduction method 'rmeto'"),
])
def test_bad_combinations_are_one_line_errors(methods, message) -> None:
    with pytest.raises(ValueError, match=message):
        apply_method(model(), "combine", methods=methods)


def test_a_combined_method_trains_with_both_methods_losses() -> None:
    methods = [{"name": "rmeeto", "r": 4, "layers": [1, 2]}, {"name": "dyvm", "keep": None, "block_ratio": 0.8}]
    combined = apply_method(model(), "combine", methods=methods).train()
    state = combined.forward_tokens(torch.randn(2, 1, 24, 24))
    losses = combined.reducer.extra_losses(state)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert combined.reducer.parts[1].selectors[0].weight.grad is not None
